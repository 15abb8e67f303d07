//! The publisher thread: the points some subscription wants go to the embedded broker, live.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{Packet, Publish};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{complete_now, EmbeddedBroker, MAX_BURST};
use crate::base::point::{Batch, Point};
use crate::metrics::Metrics;

impl EmbeddedBroker {
    /// The hub's question for this broker: does any subscription want a point of the batch?
    pub fn interest(&self) -> Interest {
        Interest::new(self.filters.clone())
    }

    /// Spawns the publisher thread: a point goes to `updraft/{device}/{tag}` when a subscription
    /// filter matches that topic; its retained value is served from the hub's current values (see
    /// `retained`), so a late subscriber still sees the last value at once. `LinkTx` sends
    /// block, so this runs on its own OS thread and never on the async runtime.
    pub fn spawn_publisher(
        mut self,
        mut rx: mpsc::Receiver<Batch>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("mqtt-publisher".into()).spawn(move || {
            let mut json = Vec::with_capacity(256);
            let mut interest = Interest::new(self.filters.clone());
            while let Some(first) = rx.blocking_recv() {
                let mut batches = vec![first];
                // Drain what is already queued so the router is woken once per burst, not per
                // point, but keep bursts small: the link's and the router's queues keep the
                // capacity of the largest burst they ever held.
                let mut points = batches[0].len();
                while points < MAX_BURST {
                    match rx.try_recv() {
                        Ok(b) => {
                            points += b.len();
                            batches.push(b);
                        }
                        Err(_) => break,
                    }
                }
                let mut publishes = Vec::with_capacity(points);
                for batch in &batches {
                    for p in batch.iter() {
                        if !interest.wanted(p) {
                            continue;
                        }
                        // A plugin's message goes out verbatim.
                        let payload = match &p.payload {
                            Some(raw) => raw.clone(),
                            None => {
                                json.clear();
                                p.write_json(&mut json);
                                // An exact-size copy: the broker keeps payloads alive in its logs,
                                // where a spare-capacity `Vec` would cost twice the memory.
                                Bytes::copy_from_slice(&json)
                            }
                        };
                        // Not retained: the router would keep a second copy of what the hub keeps.
                        publishes.push(Packet::Publish(Publish::new(p.key.topic.clone(), payload, false), None));
                    }
                }
                let Some(last) = publishes.pop() else {
                    continue;
                };
                let count = publishes.len() as u64 + 1;
                // Backpressure: the router takes the link's whole buffer at each wake-up, so a buffer
                // that still holds a burst means the router is behind. Wait for it rather than queue
                // without bound; meanwhile the hub drops (and counts) what the broker cannot take.
                while self.pub_tx.buffer().len() >= MAX_BURST {
                    std::thread::sleep(Duration::from_micros(200));
                }
                // Queue the burst straight into the link's buffer, then send the last packet the
                // normal way, which wakes the router once for the whole burst.
                self.pub_tx.buffer().extend(publishes);
                if let Err(e) = complete_now(self.pub_tx.send(last)) {
                    warn!(error = %e, "Embedded broker link closed; stopping the publisher.");
                    break;
                }
                metrics.broker_published.add(count);
            }
            debug!("Broker publisher stopped.");
        })
    }
}

/// Whether any subscription filter matches a point's topic, remembered per tag until the router's
/// filters change. The check happens after the hub stored the point in its current values, and a
/// new filter is registered before the router reads the retained values for it, so a point is
/// either in that read or published live (see `retained`).
pub struct Interest {
    watch: Arc<rumqttd::FilterWatch>,
    /// Per tag id: the filter generation + 1 the answer was found at (0: not yet), and the answer.
    seen: Vec<(u64, bool)>,
}

impl Interest {
    pub fn new(watch: Arc<rumqttd::FilterWatch>) -> Self {
        Interest { watch, seen: Vec::new() }
    }

    /// Whether the broker wants any point of a batch; the hub asks before queueing it.
    pub fn any(&mut self, batch: &Batch) -> bool {
        batch.iter().any(|p| self.wanted(p))
    }

    /// A local client's message is already on the broker, so it is never wanted again.
    fn wanted(&mut self, p: &Point) -> bool {
        if p.key.external {
            return false;
        }
        let generation = self.watch.generation() + 1;
        let i = p.key.id as usize;
        if i >= self.seen.len() {
            self.seen.resize(i + 1, (0, false));
        }
        let (at, wanted) = &mut self.seen[i];
        if *at != generation {
            *wanted = std::str::from_utf8(&p.key.topic).is_ok_and(|t| self.watch.any_match(t));
            *at = generation;
        }
        *wanted
    }
}
