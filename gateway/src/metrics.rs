//! Counters the gateway keeps about itself, rendered in the Prometheus text format on `/metrics`.
//!
//! Plain atomics: a counter update on the hot path is one relaxed add. Label sets stay small (the
//! device name is the only label), as Vector's metric naming rules ask.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

pub use crate::base::metrics::{Counter, Gauge};
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

    pub fn render(&self) -> String {
        let mut out = String::new();
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        type Series = (&'static str, &'static str, fn(&DeviceStats) -> u64);
        let series: [Series; 11] = [
            ("updraft_polls_total", "Polls started.", |s| s.polls.get()),
            ("updraft_polls_late_total", "Polls that started more than a tenth of their period late.", |s| {
                s.polls_late.get()
            }),
            ("updraft_polls_skipped_total", "Scheduled polls skipped because the previous one overran.", |s| {
                s.polls_skipped.get()
            }),
            ("updraft_points_good_total", "Good points read.", |s| s.points_good.get()),
            ("updraft_points_bad_total", "Bad points (read failed or could not be decoded).", |s| s.points_bad.get()),
            ("updraft_requests_total", "Device requests sent.", |s| s.requests.get()),
            ("updraft_request_errors_total", "Device requests that failed (exception, timeout or link error).", |s| {
                s.request_errors.get()
            }),
            ("updraft_connects_total", "Connections established to devices.", |s| s.connects.get()),
            ("updraft_connect_failures_total", "Failed connection attempts to devices.", |s| s.connect_failures.get()),
            (
                "updraft_resubscribes_total",
                "Subscriptions recreated after staying silent past their keep-alive.",
                |s| s.resubscribes.get(),
            ),
            ("updraft_driver_dropped_points_total", "Points a driver lost before the bus.", |s| s.points_dropped.get()),
        ];
        for (name, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (device, s) in devices.iter() {
                let _ = writeln!(out, "{name}{{device=\"{}\"}} {}", escape(device), get(s));
            }
        }
        let plugins = self.plugins.read().unwrap_or_else(|e| e.into_inner());
        type PluginSeries = (&'static str, &'static str, fn(&PluginStats) -> u64);
        let plugin_series: [PluginSeries; 7] = [
            ("updraft_plugin_calls_total", "Calls into the plugin.", |s| s.calls.get()),
            ("updraft_plugin_points_in_total", "Points handed to the plugin.", |s| s.points_in.get()),
            ("updraft_plugin_points_out_total", "Points the plugin emitted.", |s| s.points_out.get()),
            ("updraft_plugin_traps_total", "Calls that trapped (timeout, memory, panic, forbidden import).", |s| {
                s.traps.get()
            }),
            ("updraft_plugin_errors_total", "Calls where the plugin returned an error.", |s| s.errors.get()),
            (
                "updraft_plugin_points_dropped_total",
                "Points lost to a failed call, a down instance or a bad emit.",
                |s| s.points_dropped.get(),
            ),
            ("updraft_plugin_restarts_total", "Instances recreated after a trap.", |s| s.restarts.get()),
        ];
        for (name, help, get) in plugin_series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (plugin, s) in plugins.iter() {
                let _ = writeln!(out, "{name}{{plugin=\"{}\"}} {}", escape(plugin), get(s));
            }
        }
        let _ = writeln!(
            out,
            "# HELP updraft_broker_published_total Points published to the embedded broker.\n# TYPE updraft_broker_published_total counter\nupdraft_broker_published_total {}",
            self.broker_published.get()
        );
        for (name, help, v) in [
            (
                "updraft_broker_auth_failures_total",
                "MQTT logins the embedded broker refused.",
                self.broker_auth_failures.get(),
            ),
            (
                "updraft_broker_writes_refused_total",
                "Local write commands refused because [broker] writes = \"off\".",
                self.broker_writes_refused.get(),
            ),
            (
                "updraft_broker_publish_denied_total",
                "Publishes of local MQTT clients dropped as outside their topic rights.",
                self.broker_denied_publish.get(),
            ),
            (
                "updraft_broker_subscribe_denied_total",
                "Subscription filters of local MQTT clients refused as outside their topic rights.",
                self.broker_denied_subscribe.get(),
            ),
            (
                "updraft_broker_messages_lost_total",
                "Messages local subscribers never got because they fell further behind than buffer_per_subscription.",
                self.broker_router.lost_messages.load(Relaxed),
            ),
            (
                "updraft_broker_sessions_expired_total",
                "Sessions of persistent MQTT clients forgotten (session_expiry passed, or the oldest beyond max_connections).",
                self.broker_router.expired_sessions.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP updraft_broker_saved_sessions Sessions kept for persistent MQTT clients that are away.\n# TYPE updraft_broker_saved_sessions gauge\nupdraft_broker_saved_sessions {}",
            self.broker_router.saved_sessions.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP updraft_reloads_total Config reloads by result (refused: a bad file or a change that needs a restart; the running config stays).\n# TYPE updraft_reloads_total counter\nupdraft_reloads_total{{result=\"applied\"}} {}\nupdraft_reloads_total{{result=\"refused\"}} {}",
            self.reloads_applied.get(),
            self.reloads_refused.get()
        );
        let c = &self.commands;
        let _ = writeln!(out, "# HELP updraft_commands_total Write commands (local and cloud) by result: ok, failed, retained (ignored), duplicate (answered, not executed).\n# TYPE updraft_commands_total counter");
        for (result, v) in
            [("ok", &c.ok), ("failed", &c.failed), ("retained", &c.retained), ("duplicate", &c.duplicate)]
        {
            let _ = writeln!(out, "updraft_commands_total{{result=\"{result}\"}} {}", v.get());
        }
        let _ = writeln!(out, "# HELP updraft_dropped_batches_total Batches dropped because a consumer's queue was full.\n# TYPE updraft_dropped_batches_total counter");
        let dropped = self.dropped.read().unwrap_or_else(|e| e.into_inner());
        for (consumer, (c, _)) in dropped.iter() {
            let _ = writeln!(out, "updraft_dropped_batches_total{{consumer=\"{}\"}} {}", escape(consumer), c.get());
        }
        let _ = writeln!(out, "# HELP updraft_dropped_points_total Points dropped because a consumer's queue was full.\n# TYPE updraft_dropped_points_total counter");
        for (consumer, (_, p)) in dropped.iter() {
            let _ = writeln!(out, "updraft_dropped_points_total{{consumer=\"{}\"}} {}", escape(consumer), p.get());
        }
        self.render_sinks(&mut out);
        out
    }

    fn render_sinks(&self, out: &mut String) {
        let sinks = self.sinks.read().unwrap_or_else(|e| e.into_inner());
        type SinkSeries = (&'static str, &'static str, &'static str, fn(&SinkStats) -> i64);
        let series: [SinkSeries; 11] = [
            ("updraft_north_accepted_points_total", "counter", "Points written to the sink's buffer.", |s| {
                s.accepted.get() as i64
            }),
            ("updraft_north_delivered_points_total", "counter", "Points the cloud acknowledged.", |s| {
                s.delivered.get() as i64
            }),
            ("updraft_north_messages_sent_total", "counter", "Messages sent (including resends).", |s| {
                s.messages_sent.get() as i64
            }),
            ("updraft_north_pending_points", "gauge", "Points buffered and not yet acknowledged.", |s| {
                s.pending_points.get()
            }),
            ("updraft_north_buffer_bytes", "gauge", "Bytes of undelivered data on disk.", |s| s.buffer_bytes.get()),
            ("updraft_north_connected", "gauge", "1 while connected to the cloud.", |s| s.connected.get()),
            ("updraft_north_disk_ok", "gauge", "0 while the buffer's disk refuses writes.", |s| s.disk_ok.get()),
            ("updraft_north_disk_errors_total", "counter", "Failed writes or syncs of the buffer.", |s| {
                s.disk_errors.get() as i64
            }),
            ("updraft_north_connects_total", "counter", "Connections established.", |s| s.connects.get() as i64),
            ("updraft_north_connect_failures_total", "counter", "Failed connection attempts.", |s| {
                s.connect_failures.get() as i64
            }),
            ("updraft_north_truncated_bytes_total", "counter", "Bytes of a torn buffer tail cut at start-up.", |s| {
                s.truncated_bytes.get() as i64
            }),
        ];
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (sink, s) in sinks.iter() {
                let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", escape(sink), get(s));
            }
        }
        let name = "updraft_north_dropped_points_total";
        let _ = writeln!(out, "# HELP {name} Points dropped by the sink, by reason.\n# TYPE {name} counter");
        for (sink, s) in sinks.iter() {
            for (reason, c) in [
                ("buffer_full", &s.dropped_full),
                ("expired", &s.dropped_expired),
                ("disk", &s.dropped_disk),
                ("rejected", &s.dropped_rejected),
                ("corrupt", &s.dropped_corrupt),
                ("reserved", &s.dropped_reserved),
                ("poison", &s.dropped_poison),
            ] {
                let _ = writeln!(out, "{name}{{sink=\"{}\",reason=\"{reason}\"}} {}", escape(sink), c.get());
            }
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
