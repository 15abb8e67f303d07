//! Local write commands: `updraft/{device}/{tag}/set` from clients of the embedded broker.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::EmbeddedBroker;

/// Topic filter of local write commands: `updraft/{device}/{tag}/set`.
pub const SET_FILTER: &str = "updraft/+/+/set";

impl EmbeddedBroker {
    /// Spawns the task that turns `updraft/{device}/{tag}/set` messages from local clients into
    /// device writes and answers on `…/set/reply` with `{"ok": true}` or `{"ok": false, "error"}`.
    /// The payload is the value (`42`, `true`) or `{"value": 42}`. Each write is bounded by its
    /// device's timeout. With `writes` off every command is answered with a refusal and counted in
    /// `refused`, so a client learns why nothing moves.
    pub fn spawn_command_listener(
        &mut self,
        devices: HashMap<String, crate::drivers::WriteTx>,
        writes: bool,
        refused: Arc<crate::metrics::Counter>,
    ) {
        let Some((mut tx, mut rx)) = self.local.take() else { return };
        if let Err(e) = tx.subscribe(SET_FILTER) {
            warn!(error = %e, "Cannot subscribe to local write commands.");
            return;
        }
        let devices = Arc::new(devices);
        // Commands run concurrently (a slow device does not hold up writes to the others); each
        // reply comes back here because only this task owns the link.
        let (reply_tx, mut replies) = mpsc::channel::<(String, String)>(64);
        tokio::spawn(async move {
            loop {
                let publish = tokio::select! {
                    n = rx.next() => match n {
                        Ok(Some(rumqttd::Notification::Forward(f))) => f.publish,
                        Ok(_) => continue,
                        Err(e) => {
                            debug!(error = %e, "Command link closed.");
                            break;
                        }
                    },
                    Some((topic, body)) = replies.recv() => {
                        if let Err(e) = tx.publish(topic, body) {
                            warn!(error = %e, "Cannot publish a command reply.");
                        }
                        continue;
                    }
                };
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                let submitted = if writes {
                    submit_command(&topic, &publish.payload, &devices)
                } else {
                    refused.inc();
                    if refused.get() <= 10 || refused.get() % 100 == 0 {
                        warn!(%topic, refused_total = refused.get(), "Local write refused: [broker] writes = \"off\".");
                    }
                    Err("writes through the local broker are off ([broker] writes = \"off\")".to_owned())
                };
                let reply_tx = reply_tx.clone();
                tokio::spawn(async move {
                    let result = match submitted {
                        Ok(wait) => wait.await.unwrap_or_else(|_| Err("the device's driver has stopped".into())),
                        Err(e) => Err(e),
                    };
                    let body = match &result {
                        Ok(()) => serde_json::json!({ "ok": true }),
                        Err(e) => serde_json::json!({ "ok": false, "error": e }),
                    };
                    let _ = reply_tx.send((format!("{topic}/reply"), body.to_string())).await;
                });
            }
        });
    }
}

/// Parses a local write command and queues it on its device's driver.
fn submit_command(
    topic: &str,
    payload: &[u8],
    devices: &HashMap<String, crate::drivers::WriteTx>,
) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, String> {
    let parts: Vec<&str> = topic.split('/').collect();
    let [_, device, tag, _] = parts.as_slice() else { return Err(format!("bad command topic `{topic}`")) };
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("payload is not JSON ({e}); send e.g. 42 or {{\"value\": 42}}"))?;
    let value = match value {
        serde_json::Value::Object(mut m) => m.remove("value").ok_or("object payload needs a `value` key")?,
        v => v,
    };
    crate::drivers::submit(devices, device, tag, value)
}
