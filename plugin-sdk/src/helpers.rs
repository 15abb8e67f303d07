//! Helpers for the common shapes of plugin logic: tumbling windows per tag, deadband (report by
//! exception) and threshold alarms with hysteresis. All keyed by tag, all plain data structures.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::{Point, TagInfo, Timestamp};

/// Aggregates of one tag over one closed window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStats {
    pub info: Rc<TagInfo>,
    /// Window start (inclusive) and end (exclusive), Unix ms.
    pub start: Timestamp,
    pub end: Timestamp,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub last: f64,
}

impl WindowStats {
    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// Tumbling windows aligned to multiples of `period` since the Unix epoch, one per tag. Good
/// numeric points are added; windows are closed by [`Windows::close_due`], typically from `on-tick`.
#[derive(Debug)]
pub struct Windows {
    period: Timestamp,
    open: BTreeMap<u32, WindowStats>,
}

impl Windows {
    pub fn new(period_ms: Timestamp) -> Self {
        Windows { period: period_ms.max(1), open: BTreeMap::new() }
    }

    /// Adds a point; points without a numeric good value are ignored. A point that belongs to a
    /// later window than the tag's open one closes the open one, which is returned.
    pub fn add(&mut self, p: &Point) -> Option<WindowStats> {
        let v = p.number()?;
        let start = p.ts.div_euclid(self.period) * self.period;
        let mut closed = None;
        if let Some(w) = self.open.get(&p.info.id) {
            if w.start != start {
                closed = self.open.remove(&p.info.id);
            }
        }
        let w = self.open.entry(p.info.id).or_insert_with(|| WindowStats {
            info: p.info.clone(),
            start,
            end: start + self.period,
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            last: v,
        });
        w.count += 1;
        w.min = w.min.min(v);
        w.max = w.max.max(v);
        w.sum += v;
        w.last = v;
        closed
    }

    /// Closes and returns every window that ended at or before `now`.
    pub fn close_due(&mut self, now: Timestamp) -> Vec<WindowStats> {
        let due: Vec<u32> = self.open.iter().filter(|(_, w)| w.end <= now).map(|(id, _)| *id).collect();
        due.into_iter().filter_map(|id| self.open.remove(&id)).collect()
    }
}

/// Report by exception: passes a point when it moved more than `abs` (or `percent` of the last
/// reported value) since the last one passed, when its quality changed, or when `max_silence` ms
/// passed without a report.
#[derive(Debug)]
pub struct Deadband {
    pub abs: f64,
    pub percent: Option<f64>,
    pub max_silence: Option<Timestamp>,
    last: BTreeMap<u32, (Option<f64>, Timestamp)>,
}

impl Deadband {
    pub fn new(abs: f64, percent: Option<f64>, max_silence: Option<Timestamp>) -> Self {
        Deadband { abs, percent, max_silence, last: BTreeMap::new() }
    }

    /// Whether to report this point; remembers it if so.
    pub fn pass(&mut self, p: &Point) -> bool {
        let v = p.number();
        let report = match self.last.get(&p.info.id) {
            None => true,
            Some((last, at)) => {
                let silent_too_long = self.max_silence.is_some_and(|s| p.ts - at >= s);
                let moved = match (last, v) {
                    (Some(a), Some(b)) => {
                        let band = self.percent.map_or(self.abs, |pc| self.abs.max(a.abs() * pc / 100.0));
                        (b - a).abs() > band
                    }
                    (None, None) => false,
                    _ => true,
                };
                moved || silent_too_long
            }
        };
        if report {
            self.last.insert(p.info.id, (v, p.ts));
        }
        report
    }
}

/// An alarm state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alarm {
    Raised,
    Cleared,
}

/// Threshold alarm with hysteresis per device and tag: raised when the value has stayed above
/// `high` for the on-delay (by the points' `ts`; none by default), cleared when it falls below
/// `low` (≤ `high`), so a value hovering at the threshold, or a short spike, does not flap.
/// Keyed by `device/tag` names, so it can be part of a plugin's saved state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Threshold {
    pub high: f64,
    pub low: f64,
    /// How long the value must stay above `high` before the alarm is raised, in ms.
    pub on_delay: Timestamp,
    state: BTreeMap<String, AlarmState>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct AlarmState {
    active: bool,
    /// When the value went above `high` (while not yet raised).
    above_since: Option<Timestamp>,
}

impl Threshold {
    pub fn new(high: f64, low: f64) -> Self {
        Threshold { high, low: low.min(high), on_delay: 0, state: BTreeMap::new() }
    }

    /// Raises only after the value stayed above `high` for `delay`.
    pub fn with_on_delay(mut self, delay: Duration) -> Self {
        self.on_delay = delay.0.max(0);
        self
    }

    /// Takes which alarms are raised (and pending) from a saved `Threshold`, keeping this one's
    /// limits: a restarted plugin with a new `high` keeps its raised alarms under the new limits.
    pub fn resume(&mut self, saved: Threshold) {
        self.state = saved.state;
    }

    /// The transition this point causes, if any.
    pub fn check(&mut self, p: &Point) -> Option<Alarm> {
        let v = p.number()?;
        let s = self.state.entry(format!("{}/{}", p.device(), p.tag())).or_default();
        if s.active {
            if v < self.low {
                s.active = false;
                return Some(Alarm::Cleared);
            }
            return None;
        }
        if v <= self.high {
            s.above_since = None;
            return None;
        }
        let since = *s.above_since.get_or_insert(p.ts);
        if p.ts - since >= self.on_delay {
            s.active = true;
            s.above_since = None;
            return Some(Alarm::Raised);
        }
        None
    }
}

/// A duration in a plugin's config, written as operators write them in the gateway's TOML:
/// `"500ms"`, `"10s"`, `"5m"`, `"8h"`, `"1d"` (or a number of milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Duration(pub Timestamp);

impl Duration {
    pub fn ms(self) -> Timestamp {
        self.0
    }

    /// Parses `"10s"`-style text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let n: Timestamp = n.parse().map_err(|_| format!("`{text}`: expected a number and a unit, e.g. \"10s\""))?;
        let scale = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            u => return Err(format!("`{text}`: unknown unit `{u}`; use ms, s, m, h or d")),
        };
        n.checked_mul(scale).map(Duration).ok_or_else(|| format!("`{text}` is too long"))
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Ms(Timestamp),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Ms(ms) => Ok(Duration(ms)),
            Raw::Text(t) => Duration::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Clock-aligned periods (shifts, hours, days): period `n` starts at `offset + n × period`
/// (Unix ms, UTC; a local 06:00 shift start in UTC+8 is an offset of 22 h). A period is closed
/// once `now` passes its end by `late`, the allowance for points that arrive late (a device that
/// answers slowly, a backlog after an outage): a point stamped inside a period that is not yet
/// closed still counts in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marks {
    pub period: Timestamp,
    pub offset: Timestamp,
    pub late: Timestamp,
}

impl Marks {
    pub fn new(period: Duration, offset: Duration, late: Duration) -> Self {
        Marks { period: period.0.max(1), offset: offset.0.rem_euclid(period.0.max(1)), late: late.0.max(0) }
    }

    /// The start of the period `ts` falls in.
    pub fn start_of(&self, ts: Timestamp) -> Timestamp {
        (ts - self.offset).div_euclid(self.period) * self.period + self.offset
    }

    /// Whether the period starting at `start` is closed at `now` (its end plus `late` passed).
    pub fn closed(&self, start: Timestamp, now: Timestamp) -> bool {
        now >= start + self.period + self.late
    }
}

/// The time integral of a rate per key (energy from power: kW over hours gives kWh), by the
/// trapezoid rule between consecutive good points. A gap longer than `max_gap` is not bridged
/// (the device was off or unreachable; guessing would invent energy): integration restarts at
/// the next point. Out-of-order points (older than the key's last) are ignored. Serializable, so
/// it can be part of a plugin's saved state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Integrator {
    /// Milliseconds per unit of the result: 3,600,000 for per-hour rates.
    pub unit: Timestamp,
    pub max_gap: Timestamp,
    last: BTreeMap<String, (Timestamp, f64)>,
}

impl Integrator {
    /// For rates per hour (kW → kWh).
    pub fn per_hour(max_gap: Duration) -> Self {
        Integrator { unit: 3_600_000, max_gap: max_gap.0, last: BTreeMap::new() }
    }

    /// Adds a reading of `key` (for example `"press-1/power"`) and returns the area since its
    /// previous reading (0 for the first, after a gap, or for an old point).
    pub fn add(&mut self, key: &str, ts: Timestamp, value: f64) -> f64 {
        if !value.is_finite() {
            return 0.0;
        }
        let area = match self.last.get(key) {
            Some(&(t0, _)) if ts <= t0 => return 0.0,
            Some(&(t0, v0)) if ts - t0 <= self.max_gap => (v0 + value) / 2.0 * (ts - t0) as f64 / self.unit as f64,
            _ => 0.0,
        };
        self.last.insert(key.to_owned(), (ts, value));
        area
    }
}

#[cfg(test)]
mod time_tests {
    use super::*;

    fn point(device: &str, tag: &str, ts: Timestamp, v: f64) -> Point {
        let info = std::rc::Rc::new(TagInfo { id: 0, device: device.into(), tag: tag.into(), unit: None });
        Point { info, value: Some(crate::Value::Float(v)), quality: crate::Quality::Good, ts }
    }

    #[test]
    fn a_threshold_waits_out_its_on_delay_per_device_and_tag() {
        let mut t = Threshold::new(80.0, 75.0).with_on_delay(Duration(10_000));
        assert_eq!(t.check(&point("a", "temp", 0, 90.0)), None, "above, but not for long yet");
        assert_eq!(t.check(&point("b", "temp", 5_000, 90.0)), None, "another device has its own clock");
        assert_eq!(t.check(&point("a", "temp", 5_000, 79.0)), None, "a dip resets the delay");
        assert_eq!(t.check(&point("a", "temp", 6_000, 90.0)), None);
        assert_eq!(t.check(&point("a", "temp", 16_000, 90.0)), Some(Alarm::Raised));
        assert_eq!(t.check(&point("b", "temp", 15_000, 90.0)), Some(Alarm::Raised));
        assert_eq!(t.check(&point("a", "temp", 17_000, 76.0)), None, "hysteresis");
        assert_eq!(t.check(&point("a", "temp", 18_000, 74.0)), Some(Alarm::Cleared));
        let saved: Threshold = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(saved, t, "it can be saved with the plugin's state");
    }

    #[test]
    fn durations_parse_like_the_gateway_config() {
        assert_eq!(Duration::parse("10s"), Ok(Duration(10_000)));
        assert_eq!(Duration::parse("8h"), Ok(Duration(28_800_000)));
        assert_eq!(Duration::parse("250ms"), Ok(Duration(250)));
        assert!(Duration::parse("10").is_err() && Duration::parse("5 parsecs").is_err());
        let d: Duration = serde_json::from_str("\"5m\"").unwrap();
        assert_eq!(d.ms(), 300_000);
    }

    #[test]
    fn marks_align_to_the_clock_with_an_offset_and_wait_for_late_points() {
        let shifts = Marks::new(Duration(8 * 3_600_000), Duration(6 * 3_600_000), Duration(60_000));
        let h = 3_600_000;
        assert_eq!(shifts.start_of(7 * h), 6 * h);
        assert_eq!(shifts.start_of(5 * h), -2 * h, "before 06:00 belongs to the 22:00 shift of the day before");
        assert!(!shifts.closed(6 * h, 14 * h), "late points are still taken at the boundary");
        assert!(shifts.closed(6 * h, 14 * h + 60_000));
    }

    #[test]
    fn the_integrator_uses_trapezoids_and_does_not_bridge_gaps() {
        let mut i = Integrator::per_hour(Duration(300_000));
        assert_eq!(i.add("p", 0, 100.0), 0.0);
        assert!((i.add("p", 3_600_000 / 60, 200.0) - 2.5).abs() < 1e-12, "1 min at 150 kW average is 2.5 kWh");
        assert_eq!(i.add("p", 3_600_000 / 60 + 600_000, 200.0), 0.0, "a 10 min gap is not bridged");
        assert_eq!(i.add("p", 1, 50.0), 0.0, "an old point is ignored");
        let saved = serde_json::to_string(&i).unwrap();
        let back: Integrator = serde_json::from_str(&saved).unwrap();
        assert_eq!(back, i);
    }
}
