//! The internal bus: drivers send batches in, the hub keeps the current value of every tag and fans
//! each batch out to its consumers (the broker publisher now; plugins and sinks later).
//!
//! Every queue is bounded. A consumer whose queue is full loses that batch, and the loss is counted
//! and logged: a slow consumer must never stall polling. Consumers that cannot lose data (the
//! store-and-forward sinks) keep their own disk buffer behind a fast queue.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use tracing::warn;

use crate::metrics::{Counter, Metrics};
use crate::point::{Batch, Point, Registry};

/// The sending side handed to drivers.
pub type BusSender = mpsc::Sender<Batch>;

/// Capacity of every queue, in batches (one batch is one poll of one device).
pub const QUEUE_BATCHES: usize = 1024;

/// Current points of a gateway: device → tag → last point.
pub type Snapshot = BTreeMap<Arc<str>, BTreeMap<Arc<str>, Point>>;

/// The last point of every tag, in a slot per interned tag id.
#[derive(Debug, Default)]
pub struct CurrentValues {
    slots: RwLock<Vec<Option<Point>>>,
    registry: Arc<Registry>,
}

impl CurrentValues {
    fn update(&self, batch: &[Point]) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        for p in batch {
            let i = p.key.id as usize;
            if i >= slots.len() {
                slots.resize(i + 1, None);
            }
            slots[i] = Some(p.clone());
        }
    }

    /// A copy of the current values, optionally of one device.
    pub fn snapshot(&self, device: Option<&str>) -> Snapshot {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Snapshot::new();
        for p in slots.iter().flatten() {
            if device.is_none_or(|d| d == p.device()) {
                out.entry(p.key.device.clone()).or_default().insert(p.key.tag.clone(), p.clone());
            }
        }
        out
    }

    pub fn get(&self, device: &str, tag: &str) -> Option<Point> {
        let key = self.registry.get(device, tag)?;
        self.slots.read().unwrap_or_else(|e| e.into_inner()).get(key.id as usize)?.clone()
    }
}

struct Consumer {
    name: String,
    tx: mpsc::Sender<Batch>,
    dropped: Arc<Counter>,
}

/// Built before the drivers start: consumers register, then `run` takes over.
pub struct Hub {
    rx: mpsc::Receiver<Batch>,
    tx: Option<BusSender>,
    consumers: Vec<Consumer>,
    values: Arc<CurrentValues>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
        let registry = Arc::new(Registry::default());
        let values = Arc::new(CurrentValues { slots: RwLock::default(), registry: registry.clone() });
        Hub { rx, tx: Some(tx), consumers: Vec::new(), values, registry, metrics }
    }

    /// The tag registry every producer interns its tags in.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// A sender for a producer. The hub stops once every sender is dropped.
    pub fn sender(&self) -> BusSender {
        self.tx.clone().expect("senders are taken before the hub runs")
    }

    pub fn values(&self) -> Arc<CurrentValues> {
        self.values.clone()
    }

    /// Registers a consumer and returns its queue.
    pub fn subscribe(&mut self, name: &str) -> mpsc::Receiver<Batch> {
        let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
        let dropped = self.metrics.dropped(name);
        self.consumers.push(Consumer { name: name.to_owned(), tx, dropped });
        rx
    }

    /// Runs until every producer has hung up, then closes the consumers' queues, which is how
    /// shutdown propagates down the pipeline.
    pub async fn run(mut self) {
        // The hub's own sender would keep the channel open forever.
        self.tx = None;
        while let Some(batch) = self.rx.recv().await {
            self.values.update(&batch);
            for c in &self.consumers {
                if let Err(mpsc::error::TrySendError::Full(_)) = c.tx.try_send(batch.clone()) {
                    c.dropped.inc();
                    // Log the first drop and then every thousandth, so a stuck consumer is visible
                    // without flooding the journal.
                    let n = c.dropped.get();
                    if n == 1 || n % 1000 == 0 {
                        warn!(consumer = %c.name, dropped_batches = n, "Consumer queue full; batch dropped.");
                    }
                }
            }
        }
    }
}

/// Helper for drivers: build a batch from points.
pub fn batch(points: Vec<Point>) -> Batch {
    Arc::from(points)
}
