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

use crate::base::point::{Batch, Point, Registry};
use crate::metrics::{Counter, Metrics};

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
    /// Empty, for the tags of `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        CurrentValues { slots: RwLock::default(), registry }
    }

    /// Puts points back that were saved before a restart (`last_values`); the hub's own updates
    /// replace them as reads arrive.
    pub fn restore(&self, points: &[Point]) {
        self.update(points);
    }

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

    /// Forgets a removed device's values, so neither the API nor the broker's retained messages
    /// keep offering them.
    pub fn forget_device(&self, device: &str) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        for slot in slots.iter_mut() {
            if slot.as_ref().is_some_and(|p| !p.key.derived && p.device() == device) {
                *slot = None;
            }
        }
    }

    /// A copy of the current values, optionally of one device.
    pub fn snapshot(&self, device: Option<&str>) -> Snapshot {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Snapshot::new();
        for p in slots.iter().flatten() {
            if !p.key.derived && device.is_none_or(|d| d == p.device()) {
                out.entry(p.key.device.clone()).or_default().insert(p.key.tag.clone(), p.clone());
            }
        }
        out
    }

    /// A copy of the current points plugins derived (device → tag, as the plugins named them);
    /// not the messages of local MQTT clients, which are no tag of the gateway.
    pub fn snapshot_derived(&self) -> Snapshot {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Snapshot::new();
        for p in slots.iter().flatten().filter(|p| p.key.derived && !p.key.external) {
            out.entry(p.key.device.clone()).or_default().insert(p.key.tag.clone(), p.clone());
        }
        out
    }

    /// Calls `f` with every current point, under the read lock (keep `f` short: drivers wait).
    pub fn visit(&self, mut f: impl FnMut(&Point)) {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).iter().flatten().for_each(&mut f);
    }

    pub fn get(&self, device: &str, tag: &str) -> Option<Point> {
        let key = self.registry.get(device, tag)?;
        self.slots.read().unwrap_or_else(|e| e.into_inner()).get(key.id as usize)?.clone()
    }
}

/// Decides, on the hub's task, whether a consumer wants a batch at all.
pub type Wants = Box<dyn FnMut(&Batch) -> bool + Send>;

struct Consumer {
    name: String,
    tx: mpsc::Sender<Batch>,
    dropped: Arc<Counter>,
    dropped_points: Arc<Counter>,
    /// A batch this says no to is not queued: the consumer is not woken for nothing, and a busy
    /// consumer does not report drops of batches it would have ignored.
    wants: Option<Wants>,
}

impl Consumer {
    fn new(name: &str, metrics: &Metrics, wants: Option<Wants>) -> (Self, mpsc::Receiver<Batch>) {
        let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
        let (dropped, dropped_points) = metrics.dropped(name);
        (Consumer { name: name.to_owned(), tx, dropped, dropped_points, wants }, rx)
    }

    fn offer(&mut self, batch: &Batch) {
        if let Some(wants) = &mut self.wants {
            if !wants(batch) {
                return;
            }
        }
        let why = match self.tx.try_send(batch.clone()) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => "Consumer queue full; batch dropped.",
            // A consumer that stopped (a plugin or sink thread that died) loses every batch from
            // then on: counted like a full queue, so the loss shows on /metrics.
            Err(mpsc::error::TrySendError::Closed(_)) => "Consumer has stopped; batch dropped.",
        };
        self.dropped.inc();
        self.dropped_points.add(batch.len() as u64);
        // Log the first drop and then every thousandth, so a stuck consumer is visible without
        // flooding the journal.
        let n = self.dropped.get();
        if n == 1 || n % 1000 == 0 {
            warn!(consumer = %self.name, dropped_batches = n, "{why}");
        }
    }
}

/// Which points a consumer receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Device points only (plugins: they never see derived points, so plugins cannot loop).
    Transform,
    /// Device points and points derived by plugins (the broker, cloud sinks).
    Terminal,
}

/// A change to the set of consumers while the hub runs (a reload).
enum Ctl {
    Add(Stage, Consumer),
    Remove(String),
}

/// Adds and removes consumers of a running hub (reload). Cheap to clone.
#[derive(Clone)]
pub struct HubHandle {
    ctl: mpsc::UnboundedSender<Ctl>,
    metrics: Arc<Metrics>,
}

impl HubHandle {
    /// Registers a consumer; it receives the batches the hub handles after this call.
    pub fn subscribe(&self, name: &str, stage: Stage) -> mpsc::Receiver<Batch> {
        let (c, rx) = Consumer::new(name, &self.metrics, None);
        let _ = self.ctl.send(Ctl::Add(stage, c));
        rx
    }

    /// Closes a consumer's queue: it gets what is queued, then `None`, and stops.
    pub fn unsubscribe(&self, name: &str) {
        let _ = self.ctl.send(Ctl::Remove(name.to_owned()));
    }
}

/// Built before the drivers start: consumers register, then `run` takes over.
///
/// Two inputs: device points from drivers, and derived points from plugins. Shutdown is two-phase:
/// when the drivers hang up, the plugins' queues close; the plugins flush and hang up in turn; then
/// the terminal consumers' queues close.
pub struct Hub {
    rx: mpsc::Receiver<Batch>,
    tx: Option<BusSender>,
    derived_rx: mpsc::Receiver<Batch>,
    derived_tx: Option<BusSender>,
    transforms: Vec<Consumer>,
    terminals: Vec<Consumer>,
    ctl_rx: mpsc::UnboundedReceiver<Ctl>,
    ctl_tx: mpsc::UnboundedSender<Ctl>,
    values: Arc<CurrentValues>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
        let (derived_tx, derived_rx) = mpsc::channel(QUEUE_BATCHES);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry::default());
        let values = Arc::new(CurrentValues::new(registry.clone()));
        Hub {
            rx,
            tx: Some(tx),
            derived_rx,
            derived_tx: Some(derived_tx),
            transforms: Vec::new(),
            terminals: Vec::new(),
            ctl_rx,
            ctl_tx,
            values,
            registry,
            metrics,
        }
    }

    /// The tag registry every producer interns its tags in.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// A sender for a driver. The hub's first phase ends once every driver sender is dropped.
    pub fn sender(&self) -> BusSender {
        self.tx.clone().expect("senders are taken before the hub runs")
    }

    /// A sender for a plugin's derived points.
    pub fn derived_sender(&self) -> BusSender {
        self.derived_tx.clone().expect("senders are taken before the hub runs")
    }

    pub fn values(&self) -> Arc<CurrentValues> {
        self.values.clone()
    }

    /// A handle to add and remove consumers once the hub runs.
    pub fn handle(&self) -> HubHandle {
        HubHandle { ctl: self.ctl_tx.clone(), metrics: self.metrics.clone() }
    }

    /// Registers a consumer and returns its queue.
    pub fn subscribe(&mut self, name: &str, stage: Stage) -> mpsc::Receiver<Batch> {
        self.subscribe_filtered(name, stage, None)
    }

    /// Registers a consumer that only receives the batches `wants` accepts.
    pub fn subscribe_filtered(&mut self, name: &str, stage: Stage, wants: Option<Wants>) -> mpsc::Receiver<Batch> {
        let (c, rx) = Consumer::new(name, &self.metrics, wants);
        self.add(stage, c);
        rx
    }

    fn add(&mut self, stage: Stage, c: Consumer) {
        match stage {
            Stage::Transform => self.transforms.push(c),
            Stage::Terminal => self.terminals.push(c),
        }
    }

    fn control(&mut self, ctl: Ctl) {
        match ctl {
            Ctl::Add(stage, c) => self.add(stage, c),
            Ctl::Remove(name) => {
                self.transforms.retain(|c| c.name != name);
                self.terminals.retain(|c| c.name != name);
            }
        }
    }

    /// Runs until every producer has hung up, closing queues in pipeline order.
    pub async fn run(mut self) {
        // The hub's own senders would keep the channels open forever.
        self.tx = None;
        self.derived_tx = None;
        let mut derived_open = true;
        loop {
            tokio::select! {
                // Consumer changes first: one added before a driver starts sees its first batch.
                biased;
                Some(ctl) = self.ctl_rx.recv() => self.control(ctl),
                batch = self.rx.recv() => match batch {
                    Some(batch) => {
                        self.values.update(&batch);
                        self.transforms.iter_mut().chain(&mut self.terminals).for_each(|c| c.offer(&batch));
                    }
                    None => break,
                },
                batch = self.derived_rx.recv(), if derived_open => match batch {
                    Some(batch) => {
                        self.values.update(&batch);
                        self.terminals.iter_mut().for_each(|c| c.offer(&batch));
                    }
                    None => derived_open = false,
                },
            }
        }
        // Drivers are done: close the plugins' queues, then forward what they flush.
        self.transforms.clear();
        while let Ok(ctl) = self.ctl_rx.try_recv() {
            self.control(ctl);
        }
        while let Some(batch) = self.derived_rx.recv().await {
            self.values.update(&batch);
            self.terminals.iter_mut().for_each(|c| c.offer(&batch));
        }
    }
}

/// Helper for drivers: build a batch from points.
pub fn batch(points: Vec<Point>) -> Batch {
    Arc::from(points)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::point::{Point, Value};

    #[tokio::test]
    async fn batches_for_a_stopped_consumer_are_counted() {
        let metrics = Arc::new(Metrics::default());
        let mut hub = Hub::new(metrics.clone());
        let key = hub.registry().intern("d", "t");
        let rx = hub.subscribe("gone", Stage::Terminal);
        drop(rx);
        let tx = hub.sender();
        let run = tokio::spawn(hub.run());
        for i in 0..3 {
            tx.send(batch(vec![Point::good(key.clone(), Value::Int(i), i)])).await.unwrap();
        }
        drop(tx);
        run.await.unwrap();
        let (batches, points) = metrics.dropped("gone");
        assert_eq!((batches.get(), points.get()), (3, 3));
    }

    #[tokio::test]
    async fn a_consumer_gets_only_the_batches_it_wants_and_the_rest_are_not_drops() {
        let metrics = Arc::new(Metrics::default());
        let mut hub = Hub::new(metrics.clone());
        let key = hub.registry().intern("d", "t");
        let mut rx = hub.subscribe_filtered("odd", Stage::Terminal, Some(Box::new(|b: &Batch| b[0].ts % 2 == 1)));
        let values = hub.values();
        let tx = hub.sender();
        let run = tokio::spawn(hub.run());
        for i in 0..4 {
            tx.send(batch(vec![Point::good(key.clone(), Value::Int(i), i)])).await.unwrap();
        }
        drop(tx);
        run.await.unwrap();
        let mut got = Vec::new();
        while let Ok(b) = rx.try_recv() {
            got.push(b[0].ts);
        }
        assert_eq!(got, [1, 3]);
        assert_eq!(metrics.dropped("odd").0.get(), 0);
        // The current value is kept whoever wants the batch.
        assert_eq!(values.get("d", "t").unwrap().ts, 3);
    }
}
