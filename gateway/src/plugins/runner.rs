//! Runs one plugin on its own thread: batches subscribed points by size or time, calls the
//! instance, turns emits into points on the hub's derived input, and recreates a trapped instance
//! with exponential backoff. Guest code never runs on the async runtime's workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::host::{
    Batch, CallFailure, DataPoint, Emit, Emits, LoadedPlugin, Message, PluginInstance, TagView, WitQuality, WitValue,
};
use crate::base::topic::{Template, Vars};
use crate::config::PluginConfig;
use crate::hub::{batch, BusSender};
use crate::metrics::{Counter, Metrics};

use crate::base::point::{now_ms, Batch as PointBatch, Point, Quality, Registry, TagKey, Value};

/// Per-plugin counters, on `/metrics` as `updraft_plugin_*_total{plugin}`.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: Counter,
    pub points_in: Counter,
    pub points_out: Counter,
    /// Calls that trapped (timeout, memory, panic, forbidden import); the instance was recreated.
    pub traps: Counter,
    /// Calls where the plugin returned an error.
    pub errors: Counter,
    /// Points not processed because the instance was down (restart backoff) or its call failed.
    pub points_dropped: Counter,
    pub restarts: Counter,
    /// Instances whose `init` refused the deployment's config.
    pub init_failures: Counter,
    /// Failed writes of the state journal (the state then lives in memory only).
    pub state_errors: Counter,
    /// Time spent in calls (`on-batch`, `on-tick`), summed, in microseconds.
    pub call_us: Counter,
    /// The same, as a distribution.
    pub call_seconds: crate::base::metrics::CallLatency,
    /// Kind and reason of the latest trap, for the API and for tests.
    pub last_trap: std::sync::Mutex<Option<(String, String)>>,
}

impl PluginStats {
    fn observe_call(&self, took: std::time::Duration) {
        self.call_us.add(took.as_micros() as u64);
        self.call_seconds.observe(took);
    }

    /// The kind of the latest trap (`timeout`, `memory`, `panic`, …), if any.
    pub fn last_trap_kind(&self) -> Option<String> {
        self.last_trap.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(k, _)| k.clone())
    }

    /// The reason logged for the latest trap.
    pub fn last_trap_reason(&self) -> Option<String> {
        self.last_trap.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, r)| r.clone())
    }
}

/// Most emits accepted from one call; a runaway plugin cannot flood the bus.
const MAX_EMITS_PER_CALL: usize = 10_000;
/// Most distinct output topics one plugin may create: each costs a tag key, a current-value slot
/// and a retained message for the life of the process, so a plugin that makes up a new tag name
/// for every point must not grow the gateway without bound.
pub const MAX_KEYS_PER_PLUGIN: usize = 10_000;
/// Longest device, tag or subject name a plugin may emit, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

struct Runner {
    name: Arc<str>,
    cfg: PluginConfig,
    config_json: String,
    loaded: LoadedPlugin,
    registry: Arc<Registry>,
    out: BusSender,
    stats: Arc<PluginStats>,
    instance: Option<PluginInstance>,
    failures: u32,
    restart_at: Instant,
    healthy_since: Instant,
    seq: u64,
    /// Per tag id: `None` not yet decided, else whether the subscription matches.
    matches: Vec<Option<bool>>,
    pending: Vec<DataPoint>,
    pending_since: Option<Instant>,
    /// Output topics this plugin created in the registry.
    created: usize,
    /// The last committed state, handed to every new instance.
    state: Option<Arc<[u8]>>,
    /// Where committed state and outputs are kept across restarts (none in the harness, or after
    /// the disk failed).
    journal: Option<super::state::Journal>,
    /// Commits so far (the journal's sequence).
    commits: u64,
}

/// The deployment's `config` table as the JSON `init` receives.
pub fn config_json(cfg: &PluginConfig) -> String {
    serde_json::to_string(&cfg.config).unwrap_or_else(|_| "{}".into())
}

/// Starts the plugin's thread; its state journal is in `state_dir`.
#[allow(clippy::too_many_arguments)] // Each is one wire of the plugin; a struct would only rename them. It ends after `input` closes and the last batch is flushed.
pub fn spawn(
    name: &str,
    cfg: &PluginConfig,
    loaded: LoadedPlugin,
    registry: Arc<Registry>,
    input: mpsc::Receiver<PointBatch>,
    out: BusSender,
    metrics: &Metrics,
    state_dir: &std::path::Path,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let config_json = config_json(cfg);
    let stats = metrics.plugin(name);
    // The journal is read before the thread starts, so a damaged state directory stops start-up
    // (or the reload) with a clear message rather than losing the state quietly.
    let (journal, recovered) = super::state::Journal::open(state_dir, name).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("plugin `{name}`: cannot open its state journal in {}: {e}", state_dir.display()),
        )
    })?;
    if recovered.cut > 0 {
        warn!(plugin = %name, bytes = recovered.cut, "Cut a torn tail from the plugin's state journal.");
    }
    let mut r = Runner {
        name: Arc::from(name),
        cfg: cfg.clone(),
        config_json,
        loaded,
        registry,
        out,
        stats,
        instance: None,
        failures: 0,
        restart_at: Instant::now(),
        healthy_since: Instant::now(),
        seq: 0,
        matches: Vec::new(),
        pending: Vec::new(),
        pending_since: None,
        created: 0,
        state: recovered.state.map(Arc::from),
        journal: Some(journal),
        commits: recovered.seq,
    };
    let replay = recovered.undelivered;
    std::thread::Builder::new().name(format!("plugin-{name}")).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
            Ok(rt) => rt,
            Err(e) => {
                error!(plugin = %r.name, error = %e, "Cannot start the plugin thread's runtime.");
                return;
            }
        };
        rt.block_on(async {
            if let Some(emits) = replay {
                // The last committed call's outputs never reached the hub before the stop.
                info!(plugin = %r.name, "Handing over the outputs of the plugin's last committed call.");
                let blob = r.state.clone().unwrap_or_else(|| Arc::from(Vec::new()));
                r.publish(emits).await;
                if let Some(j) = r.journal.as_mut() {
                    if let Err(e) = j.delivered(r.commits, &blob) {
                        r.journal_failed(&e);
                    }
                }
            }
            r.run(input).await
        });
    })
}

impl Runner {
    async fn run(&mut self, mut input: mpsc::Receiver<PointBatch>) {
        let span = tracing::info_span!("plugin", plugin = %self.name);
        let _enter = span.enter();
        self.ensure_instance();
        let tick = self.cfg.tick.map(|t| t.0);
        let mut next_tick = tick.map(|t| Instant::now() + t);
        loop {
            let mut deadline = next_tick;
            if let Some(since) = self.pending_since {
                let flush_at = since + self.cfg.batch.max_wait.0;
                deadline = Some(deadline.map_or(flush_at, |d| d.min(flush_at)));
            }
            let received = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), input.recv()).await.ok(),
                None => Some(input.recv().await),
            };
            match received {
                Some(Some(b)) => self.accept(&b).await,
                Some(None) => break,
                None => {}
            }
            let now = Instant::now();
            if self.pending_since.is_some_and(|s| now >= s + self.cfg.batch.max_wait.0) {
                self.flush().await;
            }
            if let (Some(t), Some(at)) = (tick, next_tick) {
                if now >= at {
                    self.tick().await;
                    // Skip missed ticks rather than bursting after a stall.
                    let mut n = at + t;
                    while n <= now {
                        n += t;
                    }
                    next_tick = Some(n);
                }
            }
        }
        // Input closed: flush the last batch and let windows close.
        self.flush().await;
        if tick.is_some() {
            self.tick().await;
        }
        info!("Plugin stopped.");
    }

    fn subscribed(&mut self, key: &TagKey) -> bool {
        let i = key.id as usize;
        if i >= self.matches.len() {
            self.matches.resize(i + 1, None);
        }
        *self.matches[i].get_or_insert_with(|| self.cfg.subscribe.iter().any(|f| filter_matches(f, key)))
    }

    async fn accept(&mut self, b: &PointBatch) {
        let text_ok = self.loaded.world() != "0.1.0";
        for p in b.iter() {
            if !self.subscribed(&p.key) {
                continue;
            }
            // A plugin built for the 0.1.0 world has no way to receive text.
            if !text_ok && matches!(p.value, Some(Value::String(_))) {
                continue;
            }
            self.pending.push(DataPoint {
                tag: p.key.id,
                value: p.value.as_ref().map(to_wit),
                quality: if p.quality == Quality::Good { WitQuality::Good } else { WitQuality::Bad },
                ts: p.ts,
            });
            self.pending_since.get_or_insert_with(Instant::now);
            if self.pending.len() >= self.cfg.batch.max_points {
                self.flush().await;
            }
        }
    }

    /// Makes sure an instance exists, unless a restart is still backing off.
    fn ensure_instance(&mut self) -> bool {
        if self.instance.as_ref().is_some_and(|i| !i.is_poisoned()) {
            return true;
        }
        self.instance = None;
        if Instant::now() < self.restart_at {
            return false;
        }
        let lim = &self.cfg.limits;
        match self.loaded.instantiate(
            &self.name,
            &self.config_json,
            lim.memory.0,
            lim.call_timeout.0,
            TagView { registry: self.registry.clone(), subscribe: self.cfg.subscribe.clone().into() },
            self.state.clone(),
        ) {
            Ok(i) => {
                if self.failures > 0 {
                    self.stats.restarts.inc();
                    info!(after_failures = self.failures, "Plugin instance recreated.");
                }
                self.instance = Some(i);
                self.healthy_since = Instant::now();
                true
            }
            Err(CallFailure::Error(m)) => {
                // The plugin refused its config: the same refusal comes back until the config
                // changes, so it waits like a trapped plugin instead of being asked again and
                // again, and says so once per attempt.
                self.stats.init_failures.inc();
                self.failures += 1;
                let wait = restart_backoff(self.failures);
                self.restart_at = Instant::now() + wait;
                error!(
                    error = %m,
                    retry_in = ?wait,
                    "Plugin refused its config, so it does not run; its points are dropped (counted) until it accepts. Fix its config table and reload; `updraft check` shows the same refusal at its line."
                );
                false
            }
            Err(f) => {
                self.failed(&f, "init");
                false
            }
        }
    }

    fn failed(&mut self, f: &CallFailure, call: &str) {
        match f {
            CallFailure::Trap { kind, reason } => {
                *self.stats.last_trap.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(((*kind).to_owned(), reason.clone()));
                self.stats.traps.inc();
                self.instance = None;
                self.failures += 1;
                let wait = restart_backoff(self.failures);
                self.restart_at = Instant::now() + wait;
                error!(call, kind, %reason, retry_in = ?wait, "Plugin trapped; its output for this call is dropped.");
            }
            CallFailure::Error(m) => {
                self.stats.errors.inc();
                warn!(call, error = %m, "Plugin returned an error; its output for this call is dropped.");
            }
        }
    }

    async fn flush(&mut self) {
        self.pending_since = None;
        if self.pending.is_empty() {
            return;
        }
        let points = std::mem::take(&mut self.pending);
        let n = points.len() as u64;
        if !self.ensure_instance() {
            self.stats.points_dropped.add(n);
            return;
        }
        self.seq += 1;
        let batch = Batch { seq: self.seq, points };
        self.stats.calls.inc();
        self.stats.points_in.add(n);
        let started = std::time::Instant::now();
        let result = match self.instance.as_mut() {
            Some(i) => i.on_batch(&batch, now_ms()),
            None => return,
        };
        self.stats.observe_call(started.elapsed());
        match result {
            Ok(emits) => self.committed(emits).await,
            Err(f) => {
                self.stats.points_dropped.add(n);
                self.failed(&f, "on-batch");
            }
        }
    }

    /// After a successful call: commits the state it staged together with its outputs, hands
    /// the outputs to the hub, then marks them handed over (`state.rs` says why in that order).
    async fn committed(&mut self, emits: Emits) {
        let Some(blob) = self.instance.as_mut().and_then(|i| i.take_staged()) else {
            self.publish(emits).await;
            return;
        };
        let blob: Arc<[u8]> = Arc::from(blob);
        self.commits += 1;
        let seq = self.commits;
        if let Some(j) = self.journal.as_mut() {
            if let Err(e) = j.commit(seq, &blob, &emits) {
                self.journal_failed(&e);
            }
        }
        if let Some(i) = self.instance.as_mut() {
            i.committed(blob.clone());
        }
        self.state = Some(blob.clone());
        self.publish(emits).await;
        if let Some(j) = self.journal.as_mut() {
            if let Err(e) = j.delivered(seq, &blob) {
                self.journal_failed(&e);
            }
        }
    }

    /// A journal that cannot be written (a full or failing disk) is given up: the plugin keeps
    /// running with its state in memory, which survives traps but not a restart.
    fn journal_failed(&mut self, e: &std::io::Error) {
        self.stats.state_errors.inc();
        error!(error = %e, "Cannot write the plugin's state journal; its state now survives traps but not a restart.");
        self.journal = None;
    }

    async fn tick(&mut self) {
        if !self.ensure_instance() {
            return;
        }
        self.stats.calls.inc();
        let started = std::time::Instant::now();
        let result = match self.instance.as_mut() {
            Some(i) => i.on_tick(now_ms()),
            None => return,
        };
        self.stats.observe_call(started.elapsed());
        match result {
            Ok(emits) => self.committed(emits).await,
            Err(f) => self.failed(&f, "on-tick"),
        }
    }

    async fn publish(&mut self, emits: Emits) {
        if self.failures > 0 && self.healthy_since.elapsed() > Duration::from_secs(60) {
            self.failures = 0;
        }
        let Emits { points: emitted, messages } = emits;
        if emitted.is_empty() && messages.is_empty() {
            return;
        }
        let total = emitted.len() + messages.len();
        let mut points = Vec::with_capacity(total.min(MAX_EMITS_PER_CALL));
        let mut rejected = 0usize;
        let mut converted = Vec::with_capacity(total.min(MAX_EMITS_PER_CALL));
        for e in emitted.into_iter().take(MAX_EMITS_PER_CALL) {
            converted.push(self.emit_to_point(e));
        }
        for m in messages.into_iter().take(MAX_EMITS_PER_CALL - converted.len()) {
            converted.push(self.message_to_point(m));
        }
        for r in converted {
            match r {
                Ok(p) => points.push(p),
                Err(why) => {
                    rejected += 1;
                    if rejected == 1 {
                        warn!(%why, "Plugin emitted an unusable point; dropped.");
                    }
                }
            }
        }
        let dropped = rejected + total.saturating_sub(MAX_EMITS_PER_CALL);
        if total > MAX_EMITS_PER_CALL {
            warn!(
                emitted = total,
                limit = MAX_EMITS_PER_CALL,
                "Plugin emitted too many points in one call; extra dropped."
            );
        }
        self.stats.points_dropped.add(dropped as u64);
        self.stats.points_out.add(points.len() as u64);
        if !points.is_empty() && self.out.send(batch(points)).await.is_err() {
            warn!("Hub closed; plugin output dropped.");
        }
    }

    fn message_to_point(&mut self, m: Message) -> Result<Point, String> {
        let output = if m.output.is_empty() { "default" } else { m.output.as_str() };
        let template = self.cfg.outputs.get(output).ok_or_else(|| format!("unknown output `{output}`"))?;
        if !m.subject.is_empty() {
            name_ok("subject", &m.subject)?;
        }
        let vars = Vars { device: &m.subject, subject: &m.subject, plugin: &self.name, ..Vars::default() };
        let topic = template.render(&vars);
        let key = self.key(&m.subject, "", &topic)?;
        Ok(Point::message(key, bytes::Bytes::from(m.payload), now_ms()))
    }

    fn emit_to_point(&mut self, e: Emit) -> Result<Point, String> {
        let output = if e.output.is_empty() { "default" } else { e.output.as_str() };
        let template = self.cfg.outputs.get(output).ok_or_else(|| format!("unknown output `{output}`"))?;
        name_ok("device", &e.device)?;
        name_ok("tag", &e.tag)?;
        let topic = output_topic(template, &self.name, &e.device, &e.tag);
        let key = self.key(&e.device, &e.tag, &topic)?;
        Ok(match (e.value, e.quality) {
            (Some(v), WitQuality::Good) => Point::good(key, from_wit(v), e.ts),
            _ => Point::bad(key, Arc::from("bad quality from plugin"), e.ts),
        })
    }

    /// The key of an output topic. A plugin may not publish where a device's readings, a local
    /// client's messages or write commands go, nor create more than `MAX_KEYS_PER_PLUGIN` topics.
    fn key(&mut self, device: &str, tag: &str, topic: &str) -> Result<Arc<TagKey>, String> {
        if topic.rsplit('/').next() == Some("set") {
            return Err(format!("topic `{topic}` ends in /set, which is reserved for write commands"));
        }
        match self.registry.get_topic(topic) {
            Some(k) if k.derived && !k.external => Ok(k),
            Some(_) => Err(format!("topic `{topic}` belongs to a device or a local MQTT client")),
            None if self.created >= MAX_KEYS_PER_PLUGIN => {
                Err(format!("the plugin already created {MAX_KEYS_PER_PLUGIN} distinct output topics"))
            }
            None => {
                self.created += 1;
                let k = self.registry.intern_at(device, tag, topic, true);
                // Another producer may have taken the topic in between.
                if !k.derived || k.external {
                    return Err(format!("topic `{topic}` belongs to a device or a local MQTT client"));
                }
                Ok(k)
            }
        }
    }
}

/// The topic an emit of `device`/`tag` on an output with this template goes to.
pub fn output_topic(template: &Template, plugin: &str, device: &str, tag: &str) -> String {
    template.render(&Vars { device, tag, plugin, subject: device, ..Vars::default() })
}

/// A device, tag or subject name from a plugin: a single topic level of bounded length.
fn name_ok(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.contains(['+', '#', '/']) || s.chars().any(char::is_control) {
        return Err(format!("{what} `{s}` must be non-empty without '/', '+', '#' or control characters"));
    }
    if s.len() > MAX_NAME_BYTES {
        return Err(format!("{what} is {} bytes long; at most {MAX_NAME_BYTES}", s.len()));
    }
    Ok(())
}

/// Restart delay after `n` consecutive traps: 100 ms doubling, capped at 5 minutes.
fn restart_backoff(n: u32) -> Duration {
    Duration::from_millis(100).saturating_mul(1u32 << n.saturating_sub(1).min(12)).min(Duration::from_secs(300))
}

/// `device/tag` filter with `*` matching one whole segment.
pub fn filter_matches(filter: &str, key: &TagKey) -> bool {
    let Some((d, t)) = filter.split_once('/') else { return false };
    (d == "*" || d == &*key.device) && (t == "*" || t == &*key.tag)
}

fn to_wit(v: &Value) -> WitValue {
    match *v {
        Value::Bool(b) => WitValue::Boolean(b),
        Value::Int(i) => WitValue::Int(i),
        Value::UInt(u) => WitValue::Uint(u),
        Value::F32(f) => WitValue::Float(f64::from(f)),
        Value::Float(f) => WitValue::Float(f),
        Value::String(ref t) => WitValue::Text(t.to_string()),
    }
}

fn from_wit(v: WitValue) -> Value {
    match v {
        WitValue::Boolean(b) => Value::Bool(b),
        WitValue::Int(i) => Value::Int(i),
        WitValue::Uint(u) => Value::UInt(u),
        WitValue::Float(f) => Value::Float(f),
        WitValue::Text(t) => Value::String(t.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_whole_segments() {
        let r = Registry::default();
        let k = r.intern("boiler-1", "temperature");
        assert!(filter_matches("boiler-1/*", &k));
        assert!(filter_matches("*/temperature", &k));
        assert!(filter_matches("*/*", &k));
        assert!(!filter_matches("boiler-2/*", &k));
        assert!(!filter_matches("boiler/*", &k));
        assert!(!filter_matches("boiler-1", &k));
    }

    #[test]
    fn restart_backoff_doubles_and_caps() {
        assert_eq!(restart_backoff(1), Duration::from_millis(100));
        assert_eq!(restart_backoff(3), Duration::from_millis(400));
        assert_eq!(restart_backoff(40), Duration::from_secs(300));
    }
}
