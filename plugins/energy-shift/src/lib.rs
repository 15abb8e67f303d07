//! `energy-shift`: energy per shift from power readings. Each subscribed power tag (kW) is
//! integrated by the trapezoid rule into kWh; the running total of the current shift is emitted
//! with every reading (`{tag}_kwh`), and when a shift closes its total goes to the `shifts`
//! output (`{tag}_shift_kwh`, stamped with the shift's end). The totals are saved with every
//! call, so they are exact across a trap, a reload or a restart of the gateway: nothing is
//! counted twice and nothing is lost (a gap longer than `max_gap` is not bridged).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use updraft_plugin_sdk::helpers::{Duration, Integrator, Marks};
use updraft_plugin_sdk::{export, state, Emitter, Error, Plugin, Point, Quality, Timestamp, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Shift length.
    #[serde(default = "eight_hours")]
    shift: Duration,
    /// Where shifts start, from midnight UTC (06:00 UTC: "6h").
    #[serde(default)]
    offset: Option<Duration>,
    /// How long after its end a shift still takes late points before its total is final.
    #[serde(default)]
    late: Option<Duration>,
    /// Longest gap between readings that is bridged.
    #[serde(default = "five_minutes")]
    max_gap: Duration,
}

fn eight_hours() -> Duration {
    Duration(8 * 3_600_000)
}

fn five_minutes() -> Duration {
    Duration(300_000)
}

/// One tag's shift.
#[derive(Serialize, Deserialize)]
struct Shift {
    device: String,
    tag: String,
    start: Timestamp,
    kwh: f64,
}

/// Everything that must survive a restart.
#[derive(Serialize, Deserialize)]
struct Totals {
    integrator: Integrator,
    shifts: BTreeMap<String, Shift>,
}

struct EnergyShift {
    marks: Marks,
    totals: Totals,
}

impl EnergyShift {
    fn close(&mut self, key: &str, out: &mut Emitter) {
        if let Some(s) = self.totals.shifts.remove(key) {
            let end = s.start + self.marks.period;
            out.emit(
                "shifts",
                &s.device,
                &format!("{}_shift_kwh", s.tag),
                Some(Value::Float(s.kwh)),
                Quality::Good,
                end,
            );
        }
    }
}

impl Plugin for EnergyShift {
    type Config = Config;
    const OUTPUTS: &'static [&'static str] = &["default", "shifts"];
    /// Every device's `power` tag, unless the deployment says otherwise.
    const SUBSCRIBE: &'static [&'static str] = &["*/power"];

    fn init(c: Config) -> Result<Self, Error> {
        if c.shift.ms() < 60_000 {
            return Err(Error::config("shift must be at least 1m"));
        }
        if c.max_gap.ms() <= 0 {
            return Err(Error::config("max_gap must be more than 0"));
        }
        let marks = Marks::new(c.shift, c.offset.unwrap_or(Duration(0)), c.late.unwrap_or(Duration(60_000)));
        let totals = Totals { integrator: Integrator::per_hour(c.max_gap), shifts: BTreeMap::new() };
        Ok(EnergyShift { marks, totals })
    }

    fn on_batch(&mut self, points: &[Point], now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for p in points {
            let Some(kw) = p.number() else { continue };
            let key = format!("{}/{}", p.device(), p.tag());
            let start = self.marks.start_of(p.ts);
            // A point of a later shift closes this tag's shift; a point of a closed one is too late.
            match self.totals.shifts.get(&key).map(|s| s.start) {
                Some(open) if open < start => self.close(&key, out),
                Some(open) if open > start => continue,
                None if self.marks.closed(start, now) => continue,
                _ => {}
            }
            let kwh = self.totals.integrator.add(&key, p.ts, kw);
            let shift = self.totals.shifts.entry(key).or_insert_with(|| Shift {
                device: p.device().to_owned(),
                tag: p.tag().to_owned(),
                start,
                kwh: 0.0,
            });
            shift.kwh += kwh;
            out.point(p.device(), &format!("{}_kwh", p.tag()), Value::Float(shift.kwh), p.ts);
        }
        Ok(())
    }

    fn on_tick(&mut self, now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        let due: Vec<String> = self
            .totals
            .shifts
            .iter()
            .filter(|(_, s)| self.marks.closed(s.start, now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.close(&key, out);
        }
        Ok(())
    }

    fn save(&self) -> Option<Vec<u8>> {
        state::encode(&self.totals)
    }

    fn restore(&mut self, saved: &[u8]) -> Result<(), Error> {
        self.totals = state::decode(saved)?;
        Ok(())
    }
}

export!(EnergyShift);
