//! Whether the pipeline moves, not whether its connections are up: per device the last good read,
//! per sink the last acknowledgement and the age of its backlog, and readiness from both.
//!
//! "Connected" flags are not health: a bridge can stay connected while forwarding nothing, and a
//! subscription can stay open while its data has stopped. So a device is **stalled** when it has
//! not shown it is alive (a good read, or an OPC-UA keep-alive) for longer than its driver allows
//! (`DeviceStats::stall_after_ms`: two polls, or one poll and a timeout), and a sink is stalled when
//! it has points waiting and the cloud has acknowledged nothing for its `buffer.stall_after`. Anything stalled
//! makes the gateway unready (`/ready` answers 503) and is logged once when it stalls and once when
//! it recovers. The process's own liveness is a different question (`/health`, the systemd
//! watchdog): a plant with a dead device is not a reason to restart the gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::base::point::now_ms;
use crate::metrics::Metrics;

/// How a component is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Stalled,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceHealth {
    pub state: State,
    /// Unix ms of the last read with a good point, if any since start.
    pub last_good_ms: Option<i64>,
    /// Milliseconds since the device last showed it is alive (or since start).
    pub silent_ms: i64,
    pub stall_after_ms: i64,
    pub points_good: u64,
    pub points_bad: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkHealth {
    pub state: State,
    pub connected: bool,
    pub pending_points: i64,
    /// Unix ms of the cloud's last acknowledgement, if any since start.
    pub last_ack_ms: Option<i64>,
    /// Milliseconds since the sink last had nothing waiting: the age of its backlog.
    pub backlog_age_ms: i64,
    pub delivered: u64,
}

/// The whole picture, as `/ready` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ready: bool,
    pub devices: BTreeMap<String, DeviceHealth>,
    pub sinks: BTreeMap<String, SinkHealth>,
}

#[derive(Debug, Default)]
struct Watched {
    /// Device → unix ms it started.
    devices: BTreeMap<String, i64>,
    /// Sink → (stall_after, unix ms it started).
    sinks: BTreeMap<String, (Duration, i64)>,
}

/// Evaluates health from the metrics; remembers what is stalled to log each change once.
pub struct Health {
    metrics: Arc<Metrics>,
    /// The devices, and each sink with its `stall_after`, each with the time it started (it has
    /// its stall window from then to show it moves); replaced on reload.
    watched: RwLock<Watched>,
    stalled: Mutex<BTreeSet<String>>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>, devices: Vec<String>, sinks: Vec<(String, Duration)>) -> Self {
        let now = now_ms();
        let watched = Watched {
            devices: devices.into_iter().map(|d| (d, now)).collect(),
            sinks: sinks.into_iter().map(|(s, after)| (s, (after, now))).collect(),
        };
        Health { metrics, watched: RwLock::new(watched), stalled: Mutex::default() }
    }

    /// What to watch after a reload; `restarted` devices and sinks (added or changed) get a new
    /// stall window, the others keep theirs.
    pub fn watch(
        &self,
        devices: Vec<String>,
        sinks: Vec<(String, Duration)>,
        restarted_devices: &[String],
        restarted_sinks: &[String],
    ) {
        let now = now_ms();
        let mut w = self.watched.write().unwrap_or_else(|e| e.into_inner());
        let since = |old: Option<i64>, restarted: bool| if restarted { now } else { old.unwrap_or(now) };
        let devices = devices
            .into_iter()
            .map(|d| {
                let s = since(w.devices.get(&d).copied(), restarted_devices.contains(&d));
                (d, s)
            })
            .collect();
        let sinks = sinks
            .into_iter()
            .map(|(n, after)| {
                let s = since(w.sinks.get(&n).map(|(_, s)| *s), restarted_sinks.contains(&n));
                (n, (after, s))
            })
            .collect();
        *w = Watched { devices, sinks };
    }

    /// The current report; logs components that stalled or recovered since the last one.
    pub fn report(&self) -> Report {
        let now = now_ms();
        let watched = self.watched.read().unwrap_or_else(|e| e.into_inner());
        let devices: BTreeMap<String, DeviceHealth> = watched
            .devices
            .iter()
            .map(|(name, since)| {
                let s = self.metrics.device(name);
                let heard = s.last_heard_ms.get().max(*since);
                let silent_ms = (now - heard).max(0);
                let stall_after_ms = s.stall_after_ms.get();
                let stalled = stall_after_ms > 0 && silent_ms > stall_after_ms;
                let good = s.last_good_ms.get();
                let h = DeviceHealth {
                    state: if stalled { State::Stalled } else { State::Ok },
                    last_good_ms: (good > 0).then_some(good),
                    silent_ms,
                    stall_after_ms,
                    points_good: s.points_good.get(),
                    points_bad: s.points_bad.get(),
                };
                (name.clone(), h)
            })
            .collect();
        let sinks: BTreeMap<String, SinkHealth> = watched
            .sinks
            .iter()
            .map(|(name, (stall_after, since))| {
                let s = self.metrics.sink(name);
                let pending = s.pending_points.get();
                let ack = s.last_ack_ms.get();
                let caught_up = s.caught_up_ms.get().max(*since);
                let stalled = pending > 0 && now - ack.max(caught_up) > stall_after.as_millis() as i64;
                let h = SinkHealth {
                    state: if stalled { State::Stalled } else { State::Ok },
                    connected: s.connected.get() == 1,
                    pending_points: pending,
                    last_ack_ms: (ack > 0).then_some(ack),
                    backlog_age_ms: if pending > 0 { (now - caught_up).max(0) } else { 0 },
                    delivered: s.delivered.get(),
                };
                (name.clone(), h)
            })
            .collect();
        self.log_changes(&devices, &sinks);
        let ready = devices.values().all(|d| d.state == State::Ok) && sinks.values().all(|s| s.state == State::Ok);
        Report { ready, devices, sinks }
    }

    fn log_changes(&self, devices: &BTreeMap<String, DeviceHealth>, sinks: &BTreeMap<String, SinkHealth>) {
        let mut stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        for (name, d) in devices {
            let key = format!("device:{name}");
            match (d.state, stalled.contains(&key)) {
                (State::Stalled, false) => {
                    warn!(device = %name, silent_ms = d.silent_ms, "Device stalled: no good read for longer than its polls allow.");
                    stalled.insert(key);
                }
                (State::Ok, true) => {
                    info!(device = %name, "Device delivers good reads again.");
                    stalled.remove(&key);
                }
                _ => {}
            }
        }
        for (name, s) in sinks {
            let key = format!("sink:{name}");
            match (s.state, stalled.contains(&key)) {
                (State::Stalled, false) => {
                    warn!(sink = %name, pending_points = s.pending_points, connected = s.connected, "Sink stalled: points are waiting and the cloud has acknowledged nothing for buffer.stall_after.");
                    stalled.insert(key);
                }
                (State::Ok, true) => {
                    info!(sink = %name, "Sink delivers again.");
                    stalled.remove(&key);
                }
                _ => {}
            }
        }
    }
}

/// Checks health every second (so stalls are logged even when nobody asks `/ready`) and, under
/// systemd with `WatchdogSec=`, pings the watchdog from the same task: the ping stops only when
/// the async runtime itself no longer runs tasks, which is when a restart helps.
pub fn spawn_monitor(health: Arc<Health>, cancel: CancellationToken) {
    let mut usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec) / 2);
    tokio::spawn(async move {
        let every = watchdog.map_or(Duration::from_secs(1), |w| w.min(Duration::from_secs(1)));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let _ = health.report();
            if watchdog.is_some() {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        }
    });
}

/// Tells systemd (`Type=notify`) that the gateway is up; nothing outside systemd.
pub fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// Tells systemd a reload is under way (`Type=notify` with `ExecReload=`); `notify_ready` ends it.
pub fn notify_reloading() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
}

/// Tells systemd the gateway is stopping, so it does not count the drain as a hang.
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}
