//! The whole picture in one JSON document, for the dashboard (`/api/v1/status` and, every second,
//! `/api/v1/events`): devices with their health and live values, plugins, sinks, recent warnings.
//!
//! Built from the same counters and gauges as `/metrics` and `/ready`, so the dashboard never says
//! something the other two contradict.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::base::point::{now_ms, Point, Quality, Value};
use crate::health::{DeviceHealth, Health, SinkHealth};
use crate::hub::CurrentValues;
use crate::metrics::Metrics;

/// What the running config has, by name: what each device is (its driver), which plugins and
/// sinks run. Replaced as a whole on reload.
#[derive(Debug, Default, Clone)]
pub struct Inventory {
    pub devices: BTreeMap<String, &'static str>,
    pub plugins: Vec<String>,
    /// Each sink with its kind (`mqtt`, `http`).
    pub sinks: BTreeMap<String, &'static str>,
}

impl Inventory {
    pub fn of(config: &crate::config::Config) -> Self {
        Inventory {
            devices: config.devices.iter().map(|(n, d)| (n.clone(), d.driver())).collect(),
            plugins: config.plugins.keys().cloned().collect(),
            sinks: config.north.iter().map(|(n, s)| (n.clone(), s.kind())).collect(),
        }
    }
}

/// The outcome of the latest reload, if any.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReloadState {
    /// Unix ms the running config was applied (start-up or the last good reload).
    pub applied_ms: i64,
    /// Reloads applied since start.
    pub applied: u64,
    /// Reloads refused since start (a bad file, or a change that needs a restart).
    pub refused: u64,
    /// Why the latest reload was refused, while the running config is older than that refusal.
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
}

/// Everything the dashboard reads, shared with the runtime, which updates the inventory.
pub struct Sources {
    pub gateway: Arc<str>,
    pub started_ms: i64,
    pub values: Arc<CurrentValues>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub inventory: RwLock<Inventory>,
    pub reload: RwLock<ReloadState>,
}

#[derive(Serialize)]
pub struct PointView<'a> {
    pub value: Option<&'a Value>,
    pub ts: i64,
    pub quality: Quality,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

impl<'a> From<&'a Point> for PointView<'a> {
    fn from(p: &'a Point) -> Self {
        PointView { value: p.value.as_ref(), ts: p.ts, quality: p.quality, error: p.error.as_deref() }
    }
}

#[derive(Serialize)]
struct DeviceView<'a> {
    driver: &'static str,
    #[serde(flatten)]
    health: DeviceHealth,
    polls: u64,
    request_errors: u64,
    connects: u64,
    connect_failures: u64,
    values: BTreeMap<&'a str, PointView<'a>>,
}

#[derive(Serialize)]
struct PluginView {
    calls: u64,
    points_in: u64,
    points_out: u64,
    traps: u64,
    errors: u64,
    points_dropped: u64,
    restarts: u64,
    init_failures: u64,
    state_errors: u64,
    /// Time spent in calls, summed, in microseconds (the dashboard shows the mean per call).
    call_us_total: u64,
    last_trap: Option<String>,
}

#[derive(Serialize)]
struct SinkView {
    kind: &'static str,
    #[serde(flatten)]
    health: SinkHealth,
    buffer_bytes: i64,
    dropped: u64,
    disk_ok: bool,
}

impl Sources {
    /// The status document.
    pub fn status(&self) -> serde_json::Value {
        let now = now_ms();
        let report = self.health.report();
        let inventory = self.inventory.read().unwrap_or_else(|e| e.into_inner()).clone();
        let snapshot = self.values.snapshot(None);
        let derived = self.values.snapshot_derived();
        let devices: BTreeMap<&str, DeviceView<'_>> = report
            .devices
            .into_iter()
            .filter_map(|(name, health)| {
                let driver = *inventory.devices.get(&name)?;
                let s = self.metrics.device(&name);
                let values = snapshot
                    .iter()
                    .find(|(d, _)| ***d == *name)
                    .map(|(_, tags)| tags.iter().map(|(t, p)| (&**t, PointView::from(p))).collect())
                    .unwrap_or_default();
                let view = DeviceView {
                    driver,
                    health,
                    polls: s.polls.get(),
                    request_errors: s.request_errors.get(),
                    connects: s.connects.get(),
                    connect_failures: s.connect_failures.get(),
                    values,
                };
                let (key, _) = inventory.devices.get_key_value(&name)?;
                Some((key.as_str(), view))
            })
            .collect();
        let plugins: BTreeMap<&str, PluginView> = inventory
            .plugins
            .iter()
            .map(|name| {
                let s = self.metrics.plugin(name);
                let view = PluginView {
                    calls: s.calls.get(),
                    points_in: s.points_in.get(),
                    points_out: s.points_out.get(),
                    traps: s.traps.get(),
                    errors: s.errors.get(),
                    points_dropped: s.points_dropped.get(),
                    restarts: s.restarts.get(),
                    init_failures: s.init_failures.get(),
                    state_errors: s.state_errors.get(),
                    call_us_total: s.call_us.get(),
                    last_trap: s.last_trap_reason(),
                };
                (name.as_str(), view)
            })
            .collect();
        let sinks: BTreeMap<&str, SinkView> = report
            .sinks
            .into_iter()
            .filter_map(|(name, health)| {
                let (key, kind) = inventory.sinks.get_key_value(&name)?;
                let s = self.metrics.sink(&name);
                let dropped = [
                    &s.dropped_full,
                    &s.dropped_expired,
                    &s.dropped_disk,
                    &s.dropped_rejected,
                    &s.dropped_corrupt,
                    &s.dropped_reserved,
                    &s.dropped_poison,
                ]
                .iter()
                .map(|c| c.get())
                .sum();
                let view = SinkView {
                    kind,
                    health,
                    buffer_bytes: s.buffer_bytes.get(),
                    dropped,
                    disk_ok: s.disk_ok.get() != 0,
                };
                Some((key.as_str(), view))
            })
            .collect();
        let derived: BTreeMap<&str, BTreeMap<&str, PointView<'_>>> = derived
            .iter()
            .map(|(d, tags)| (&**d, tags.iter().map(|(t, p)| (&**t, PointView::from(p))).collect()))
            .collect();
        let reload = self.reload.read().unwrap_or_else(|e| e.into_inner()).clone();
        serde_json::json!({
            "gateway": &*self.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "now_ms": now,
            "started_ms": self.started_ms,
            "ready": report.ready,
            "devices": devices,
            "derived": derived,
            "plugins": plugins,
            "sinks": sinks,
            "reload": reload,
            "errors": crate::telemetry::recent(),
        })
    }
}
