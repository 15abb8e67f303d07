//! `threshold-alarm`: raises `{tag}_alarm = true` on the `alarms` output when a value exceeds
//! `high`, and clears it (`false`) when it falls below `low`. The gap between the two keeps a value
//! hovering at the limit from flapping.

use serde::Deserialize;
use updraft_plugin_sdk::helpers::{Alarm, Threshold};
use updraft_plugin_sdk::{export, Emitter, Error, Plugin, Point, Quality, Timestamp, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    high: f64,
    low: Option<f64>,
}

struct Alarms(Threshold);

impl Plugin for Alarms {
    type Config = Config;
    const OUTPUTS: &'static [&'static str] = &["alarms"];

    fn init(c: Config) -> Result<Self, Error> {
        let low = c.low.unwrap_or(c.high);
        if low > c.high {
            return Err(Error::config("low must not exceed high"));
        }
        Ok(Alarms(Threshold::new(c.high, low)))
    }

    fn on_batch(&mut self, points: &[Point], _now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for p in points {
            if let Some(change) = self.0.check(p) {
                let raised = change == Alarm::Raised;
                let tag = format!("{}_alarm", p.tag());
                out.emit("alarms", p.device(), &tag, Some(Value::Bool(raised)), Quality::Good, p.ts);
            }
        }
        Ok(())
    }
}

export!(Alarms);
