//! Local write commands: `updraft/{device}/{tag}/set` from clients of the embedded broker.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::EmbeddedBroker;
use crate::commands::{parse_local, reply, Commands, Outcome};

/// Topic filter of local write commands: `updraft/{device}/{tag}/set`.
pub const SET_FILTER: &str = "updraft/+/+/set";

impl EmbeddedBroker {
    /// Spawns the task that turns `updraft/{device}/{tag}/set` messages from local clients into
    /// device writes and answers on `…/set/reply` with `{"ok": true}` or `{"ok": false, "error"}`.
    /// The payload is the value (`42`, `true`) or `{"value": 42, "id": …}`. With `writes` off every
    /// command is answered with a refusal and counted in `refused`, so a client learns why nothing
    /// moves.
    pub fn spawn_command_listener(
        &mut self,
        commands: Arc<Commands>,
        writes: bool,
        refused: Arc<crate::metrics::Counter>,
    ) {
        let Some((mut tx, mut rx)) = self.local.take() else { return };
        // `try_`: this runs on an async worker, where rumqttd's blocking calls must not.
        if let Err(e) = tx.try_subscribe(SET_FILTER) {
            warn!(error = %e, "Cannot subscribe to local write commands.");
            return;
        }
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
                        if let Err(e) = tx.try_publish(topic, body) {
                            warn!(error = %e, "Cannot publish a command reply; the broker is saturated.");
                        }
                        continue;
                    }
                };
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                let commands = commands.clone();
                let reply_tx = reply_tx.clone();
                let refused = refused.clone();
                tokio::spawn(async move {
                    let outcome = if publish.retain {
                        commands.refuse_retained("local", &topic)
                    } else if !writes {
                        refused.inc();
                        if refused.get() <= 10 || refused.get() % 100 == 0 {
                            warn!(%topic, refused_total = refused.get(), "Local write refused: [broker] writes = \"off\".");
                        }
                        Outcome {
                            result: Err("writes through the local broker are off ([broker] writes = \"off\")".into()),
                            duplicate: false,
                        }
                    } else {
                        match parse_local(&topic, &publish.payload) {
                            Ok(cmd) => commands.execute("local", cmd).await,
                            Err(e) => Outcome { result: Err(e), duplicate: false },
                        }
                    };
                    let _ = reply_tx.send((format!("{topic}/reply"), reply(&outcome, &[]))).await;
                });
            }
        });
    }
}
