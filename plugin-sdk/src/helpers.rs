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

/// Threshold alarm with hysteresis per tag: raised when the value exceeds `high`, cleared when it
/// falls below `low` (≤ `high`), so a value hovering at the threshold does not flap.
#[derive(Debug)]
pub struct Threshold {
    pub high: f64,
    pub low: f64,
    active: BTreeMap<u32, bool>,
}

impl Threshold {
    pub fn new(high: f64, low: f64) -> Self {
        Threshold { high, low: low.min(high), active: BTreeMap::new() }
    }

    /// The transition this point causes, if any.
    pub fn check(&mut self, p: &Point) -> Option<Alarm> {
        let v = p.number()?;
        let active = self.active.entry(p.info.id).or_insert(false);
        if !*active && v > self.high {
            *active = true;
            Some(Alarm::Raised)
        } else if *active && v < self.low {
            *active = false;
            Some(Alarm::Cleared)
        } else {
            None
        }
    }
}
