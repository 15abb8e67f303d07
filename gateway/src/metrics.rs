//! Counters the gateway keeps about itself, rendered in the Prometheus text format on `/metrics`
//! by prometheus-client (which also escapes label values).
//!
//! Plain atomics: a counter update on the hot path is one relaxed add; a collector reads them at
//! each scrape. Label sets stay small (the device name is the only label), as Vector's metric
//! naming rules ask.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use crate::base::metrics::{CallLatency, Counter, Gauge, RequestLatency};
pub use crate::plugins::PluginStats;
pub use crate::sinks::SinkStats;

/// Per-device polling statistics.
#[derive(Debug, Default)]
pub struct DeviceStats {
    pub polls: Counter,
    /// Polls that started later than a tenth of the poll period after their scheduled time.
    pub polls_late: Counter,
    /// Scheduled polls that never ran because the previous one overran its period.
    pub polls_skipped: Counter,
    pub points_good: Counter,
    pub points_bad: Counter,
    pub requests: Counter,
    pub request_errors: Counter,
    pub connects: Counter,
    pub connect_failures: Counter,
    /// Time from request to answer (or timeout).
    pub request_seconds: RequestLatency,
    /// Subscriptions recreated by the data-flow watchdog (OPC-UA).
    pub resubscribes: Counter,
    /// Points lost inside the driver before the bus (counted, never silent).
    pub points_dropped: Counter,
    /// Unix ms of the last read with at least one good point (0: none yet).
    pub last_good_ms: Gauge,
    /// Unix ms the device last showed it is alive: a good read, or an OPC-UA subscription's
    /// keep-alive (a quiet subscription reports nothing else while nothing changes).
    pub last_heard_ms: Gauge,
    /// How long the device may stay silent before it counts as stalled (set by its driver from
    /// its poll period, timeout or keep-alive).
    pub stall_after_ms: Gauge,
}

impl DeviceStats {
    /// Notes a good read now.
    pub fn heard_good(&self) {
        let now = crate::base::point::now_ms();
        self.last_good_ms.set(now);
        self.last_heard_ms.set(now);
    }
}

/// Batches and points a hub consumer could not take.
type DropCounters = (Arc<Counter>, Arc<Counter>);

#[derive(Debug, Default)]
pub struct Metrics {
    devices: RwLock<BTreeMap<String, Arc<DeviceStats>>>,
    plugins: RwLock<BTreeMap<String, Arc<PluginStats>>>,
    /// Points handed to the embedded broker.
    pub broker_published: Counter,
    /// MQTT logins the embedded broker refused (a CONNECT without any login is refused by rumqttd
    /// before the gateway sees it, and not counted).
    pub broker_auth_failures: Arc<Counter>,
    /// Local write commands refused because `[broker] writes = "off"`.
    pub broker_writes_refused: Arc<Counter>,
    /// Publishes of local MQTT clients dropped as outside their topic rights.
    pub broker_denied_publish: Arc<Counter>,
    /// Subscription filters of local MQTT clients refused as outside their topic rights.
    pub broker_denied_subscribe: Arc<Counter>,
    /// What the broker's router lost or forgot: messages of subscribers that fell behind,
    /// sessions of persistent clients that are away.
    pub broker_router: Arc<rumqttd::Counters>,
    /// Reloads applied and refused (a bad file, a change only a restart applies).
    pub reloads_applied: Counter,
    pub reloads_refused: Counter,
    /// Write commands by outcome.
    pub commands: Arc<crate::commands::CommandStats>,
    /// Batches (and their points) a consumer could not take because its queue was full.
    dropped: RwLock<BTreeMap<String, DropCounters>>,
    sinks: RwLock<BTreeMap<String, Arc<SinkStats>>>,
}

impl Metrics {
    pub fn device(&self, name: &str) -> Arc<DeviceStats> {
        if let Some(s) = self.devices.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return s.clone();
        }
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    /// Drops a removed device's, plugin's or sink's series (reload), so /metrics lists what runs.
    pub fn forget(&self, device: Option<&str>, plugin: Option<&str>, sink: Option<&str>) {
        if let Some(d) = device {
            self.devices.write().unwrap_or_else(|e| e.into_inner()).remove(d);
        }
        if let Some(p) = plugin {
            self.plugins.write().unwrap_or_else(|e| e.into_inner()).remove(p);
        }
        if let Some(s) = sink {
            self.sinks.write().unwrap_or_else(|e| e.into_inner()).remove(s);
        }
    }

    pub fn plugin(&self, name: &str) -> Arc<PluginStats> {
        let mut map = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    /// The (batches, points) dropped counters of a hub consumer.
    pub fn dropped(&self, consumer: &str) -> DropCounters {
        let mut map = self.dropped.write().unwrap_or_else(|e| e.into_inner());
        map.entry(consumer.to_owned()).or_default().clone()
    }

    pub fn sink(&self, name: &str) -> Arc<SinkStats> {
        let mut map = self.sinks.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    /// The Prometheus text page (format 0.0.4), rendered by prometheus-client from the atomics
    /// the gateway keeps (a collector reads them at each scrape: nothing is registered twice).
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Collect(self.clone())));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// Reads [`Metrics`] at each scrape.
#[derive(Debug)]
struct Collect(Arc<Metrics>);

type Labels = Vec<(&'static str, String)>;

/// One family: a descriptor, then each labelled metric.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in rows {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One family of counters (`name` without `_total`: the encoder adds it).
fn counters(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Counter, rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v))))
}

fn gauges(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, i64)>,
) -> fmt::Result {
    family(enc, name, help, MetricType::Gauge, rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v))))
}

fn one(label: &'static str, value: &str) -> Labels {
    vec![(label, value.to_owned())]
}

impl Collector for Collect {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let m = &self.0;
        let devices = m.devices.read().unwrap_or_else(|e| e.into_inner()).clone();
        type Series = (&'static str, &'static str, fn(&DeviceStats) -> u64);
        let series: [Series; 11] = [
            ("updraft_polls", "Polls started.", |s| s.polls.get()),
            ("updraft_polls_late", "Polls that started more than a tenth of their period late.", |s| {
                s.polls_late.get()
            }),
            ("updraft_polls_skipped", "Scheduled polls skipped because the previous one overran.", |s| {
                s.polls_skipped.get()
            }),
            ("updraft_points_good", "Good points read.", |s| s.points_good.get()),
            ("updraft_points_bad", "Bad points (read failed or could not be decoded).", |s| s.points_bad.get()),
            ("updraft_requests", "Device requests sent.", |s| s.requests.get()),
            ("updraft_request_errors", "Device requests that failed (exception, timeout or link error).", |s| {
                s.request_errors.get()
            }),
            ("updraft_connects", "Connections established to devices.", |s| s.connects.get()),
            ("updraft_connect_failures", "Failed connection attempts to devices.", |s| s.connect_failures.get()),
            ("updraft_resubscribes", "Subscriptions recreated after staying silent past their keep-alive.", |s| {
                s.resubscribes.get()
            }),
            ("updraft_driver_dropped_points", "Points a driver lost before the bus.", |s| s.points_dropped.get()),
        ];
        for (name, help, get) in series {
            counters(&mut enc, name, help, devices.iter().map(|(d, s)| (one("device", d), get(s))))?;
        }
        {
            let mut family = enc.encode_descriptor(
                "updraft_request_duration_seconds",
                "Time from sending a device request to its answer (or its timeout).",
                None,
                MetricType::Histogram,
            )?;
            for (d, s) in &devices {
                s.request_seconds.0.encode(family.encode_family(&one("device", d))?)?;
            }
        }

        let plugins = m.plugins.read().unwrap_or_else(|e| e.into_inner()).clone();
        type PluginSeries = (&'static str, &'static str, fn(&PluginStats) -> u64);
        let plugin_series: [PluginSeries; 9] = [
            ("updraft_plugin_calls", "Calls into the plugin.", |s| s.calls.get()),
            ("updraft_plugin_points_in", "Points handed to the plugin.", |s| s.points_in.get()),
            ("updraft_plugin_points_out", "Points the plugin emitted.", |s| s.points_out.get()),
            ("updraft_plugin_traps", "Calls that trapped (timeout, memory, panic, forbidden import).", |s| {
                s.traps.get()
            }),
            ("updraft_plugin_errors", "Calls where the plugin returned an error.", |s| s.errors.get()),
            ("updraft_plugin_points_dropped", "Points lost to a failed call, a down instance or a bad emit.", |s| {
                s.points_dropped.get()
            }),
            ("updraft_plugin_restarts", "Instances recreated after a trap or a refused config.", |s| s.restarts.get()),
            ("updraft_plugin_init_failures", "Instances whose init refused the deployment's config.", |s| {
                s.init_failures.get()
            }),
            (
                "updraft_plugin_state_errors",
                "Failed writes of the plugin's state journal (its state then survives traps, not restarts).",
                |s| s.state_errors.get(),
            ),
        ];
        for (name, help, get) in plugin_series {
            counters(&mut enc, name, help, plugins.iter().map(|(p, s)| (one("plugin", p), get(s))))?;
        }
        {
            let mut family = enc.encode_descriptor(
                "updraft_plugin_call_duration_seconds",
                "Time spent in one call into the plugin (on-batch, on-tick).",
                None,
                MetricType::Histogram,
            )?;
            for (p, s) in &plugins {
                s.call_seconds.0.encode(family.encode_family(&one("plugin", p))?)?;
            }
        }

        let router = &m.broker_router;
        for (name, help, v) in [
            ("updraft_broker_published", "Points published to the embedded broker.", m.broker_published.get()),
            ("updraft_broker_auth_failures", "MQTT logins the embedded broker refused.", m.broker_auth_failures.get()),
            (
                "updraft_broker_writes_refused",
                "Local write commands refused because [broker] writes = \"off\".",
                m.broker_writes_refused.get(),
            ),
            (
                "updraft_broker_publish_denied",
                "Publishes of local MQTT clients dropped as outside their topic rights.",
                m.broker_denied_publish.get(),
            ),
            (
                "updraft_broker_subscribe_denied",
                "Subscription filters of local MQTT clients refused as outside their topic rights.",
                m.broker_denied_subscribe.get(),
            ),
            (
                "updraft_broker_messages_lost",
                "Messages local subscribers never got because they fell further behind than buffer_per_subscription.",
                router.lost_messages.load(Relaxed),
            ),
            (
                "updraft_broker_sessions_expired",
                "Sessions of persistent MQTT clients forgotten (session_expiry passed, or the oldest beyond max_connections).",
                router.expired_sessions.load(Relaxed),
            ),
        ] {
            counters(&mut enc, name, help, [(Labels::new(), v)])?;
        }
        gauges(
            &mut enc,
            "updraft_broker_saved_sessions",
            "Sessions kept for persistent MQTT clients that are away.",
            [(Labels::new(), router.saved_sessions.load(Relaxed) as i64)],
        )?;
        counters(
            &mut enc,
            "updraft_reloads",
            "Config reloads by result (refused: a bad file or a change that needs a restart; the running config stays).",
            [
                (one("result", "applied"), m.reloads_applied.get()),
                (one("result", "refused"), m.reloads_refused.get()),
            ],
        )?;
        let c = &m.commands;
        counters(
            &mut enc,
            "updraft_commands",
            "Write commands (local and cloud) by result: ok, failed, retained (ignored), duplicate (answered, not executed).",
            [("ok", &c.ok), ("failed", &c.failed), ("retained", &c.retained), ("duplicate", &c.duplicate)]
                .map(|(r, v)| (one("result", r), v.get())),
        )?;
        let dropped = m.dropped.read().unwrap_or_else(|e| e.into_inner()).clone();
        counters(
            &mut enc,
            "updraft_dropped_batches",
            "Batches dropped because a consumer's queue was full.",
            dropped.iter().map(|(name, (b, _))| (one("consumer", name), b.get())),
        )?;
        counters(
            &mut enc,
            "updraft_dropped_points",
            "Points dropped because a consumer's queue was full.",
            dropped.iter().map(|(name, (_, p))| (one("consumer", name), p.get())),
        )?;
        self.encode_sinks(&mut enc)
    }
}

impl Collect {
    fn encode_sinks(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let sinks = self.0.sinks.read().unwrap_or_else(|e| e.into_inner()).clone();
        type SinkCounter = (&'static str, &'static str, fn(&SinkStats) -> u64);
        let counter_series: [SinkCounter; 7] = [
            ("updraft_north_accepted_points", "Points written to the sink's buffer.", |s| s.accepted.get()),
            ("updraft_north_delivered_points", "Points the cloud acknowledged.", |s| s.delivered.get()),
            ("updraft_north_messages_sent", "Messages sent (including resends).", |s| s.messages_sent.get()),
            ("updraft_north_disk_errors", "Failed writes or syncs of the buffer.", |s| s.disk_errors.get()),
            ("updraft_north_connects", "Connections established.", |s| s.connects.get()),
            ("updraft_north_connect_failures", "Failed connection attempts.", |s| s.connect_failures.get()),
            ("updraft_north_truncated_bytes", "Bytes of a torn buffer tail cut at start-up.", |s| {
                s.truncated_bytes.get()
            }),
        ];
        for (name, help, get) in counter_series {
            counters(enc, name, help, sinks.iter().map(|(n, s)| (one("sink", n), get(s))))?;
        }
        type SinkGauge = (&'static str, &'static str, fn(&SinkStats) -> i64);
        let gauge_series: [SinkGauge; 4] = [
            ("updraft_north_pending_points", "Points buffered and not yet acknowledged.", |s| s.pending_points.get()),
            ("updraft_north_buffer_bytes", "Bytes of undelivered data on disk.", |s| s.buffer_bytes.get()),
            ("updraft_north_connected", "1 while connected to the cloud.", |s| s.connected.get()),
            ("updraft_north_disk_ok", "0 while the buffer's disk refuses writes.", |s| s.disk_ok.get()),
        ];
        for (name, help, get) in gauge_series {
            gauges(enc, name, help, sinks.iter().map(|(n, s)| (one("sink", n), get(s))))?;
        }
        let reasons = |s: &SinkStats| {
            [
                ("buffer_full", s.dropped_full.get()),
                ("expired", s.dropped_expired.get()),
                ("disk", s.dropped_disk.get()),
                ("rejected", s.dropped_rejected.get()),
                ("corrupt", s.dropped_corrupt.get()),
                ("reserved", s.dropped_reserved.get()),
                ("poison", s.dropped_poison.get()),
            ]
        };
        counters(
            enc,
            "updraft_north_dropped_points",
            "Points dropped by the sink, by reason.",
            sinks.iter().flat_map(|(n, s)| {
                reasons(s).map(|(reason, v)| (vec![("sink", n.clone()), ("reason", reason.to_owned())], v))
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let m = Arc::new(Metrics::default());
        m.device("we\"ird\nname\\").polls.inc();
        let page = m.render();
        assert!(page.contains(r#"updraft_polls_total{device="we\"ird\nname\\"} 1"#), "{page}");
    }
}
