//! Counters the gateway keeps about itself, rendered in the Prometheus text format on `/metrics`.
//!
//! Plain atomics: a counter update on the hot path is one relaxed add. Label sets stay small (the
//! device name is the only label), as Vector's metric naming rules ask.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub use crate::plugins::PluginStats;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

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
}

#[derive(Debug, Default)]
pub struct Metrics {
    devices: RwLock<BTreeMap<String, Arc<DeviceStats>>>,
    plugins: RwLock<BTreeMap<String, Arc<PluginStats>>>,
    /// Points handed to the embedded broker.
    pub broker_published: Counter,
    /// Batches a consumer could not take because its queue was full, per consumer.
    dropped: RwLock<BTreeMap<String, Arc<Counter>>>,
}

impl Metrics {
    pub fn device(&self, name: &str) -> Arc<DeviceStats> {
        if let Some(s) = self.devices.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return s.clone();
        }
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    pub fn plugin(&self, name: &str) -> Arc<PluginStats> {
        let mut map = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_owned()).or_default().clone()
    }

    pub fn dropped(&self, consumer: &str) -> Arc<Counter> {
        let mut map = self.dropped.write().unwrap_or_else(|e| e.into_inner());
        map.entry(consumer.to_owned()).or_default().clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        type Series = (&'static str, &'static str, fn(&DeviceStats) -> u64);
        let series: [Series; 9] = [
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
        let _ = writeln!(out, "# HELP updraft_dropped_batches_total Batches dropped because a consumer's queue was full.\n# TYPE updraft_dropped_batches_total counter");
        for (consumer, c) in self.dropped.read().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "updraft_dropped_batches_total{{consumer=\"{}\"}} {}", escape(consumer), c.get());
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
