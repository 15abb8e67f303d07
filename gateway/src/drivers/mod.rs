//! Southbound drivers: each turns a device's protocol into `Point`s on the internal bus.

pub mod modbus;

use tokio::sync::{mpsc, oneshot};

/// A request to write one tag of one device, from the cloud or from the local broker.
#[derive(Debug)]
pub struct WriteCommand {
    pub tag: String,
    pub value: serde_json::Value,
    /// `Ok` once the device confirmed the write; `Err` with the reason otherwise.
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub type WriteTx = mpsc::Sender<WriteCommand>;
pub type WriteRx = mpsc::Receiver<WriteCommand>;

/// Queues a write of `device`'s `tag` and returns where its result will arrive. Refuses at once
/// (rather than waiting) when the device is unknown or its queue is full, so a flood of commands
/// cannot stall the caller.
pub fn submit(
    devices: &std::collections::HashMap<String, WriteTx>,
    device: &str,
    tag: &str,
    value: serde_json::Value,
) -> Result<oneshot::Receiver<Result<(), String>>, String> {
    let tx = devices.get(device).ok_or_else(|| format!("unknown device `{device}`"))?;
    let (reply, wait) = oneshot::channel();
    tx.try_send(WriteCommand { tag: tag.to_owned(), value, reply }).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => "busy".to_owned(),
        mpsc::error::TrySendError::Closed(_) => format!("the driver of `{device}` has stopped"),
    })?;
    Ok(wait)
}
