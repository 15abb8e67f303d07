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
