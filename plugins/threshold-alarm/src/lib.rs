//! `threshold-alarm`: raises `{tag}_alarm = true` on the `alarms` output when a value exceeds
//! `high` (for at least `on_delay`, if set), and clears it (`false`) when it falls below `low`. The
//! gap between the two keeps a value hovering at the limit from flapping, the on-delay a short
//! spike from raising. Which alarms are raised is saved, so a restart neither repeats nor forgets
//! one.

use serde::Deserialize;
use updraft_plugin_sdk::helpers::{Alarm, Duration, Threshold};
use updraft_plugin_sdk::{export, state, Emitter, Error, Plugin, Point, Timestamp, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    high: f64,
    low: Option<f64>,
    /// How long the value must stay above `high` before the alarm is raised ("30s").
    on_delay: Option<Duration>,
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
        Ok(Alarms(Threshold::new(c.high, low).with_on_delay(c.on_delay.unwrap_or(Duration(0)))))
    }

    fn on_batch(&mut self, points: &[Point], _now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for p in points {
            if let Some(change) = self.0.check(p) {
                let raised = change == Alarm::Raised;
                let tag = format!("{}_alarm", p.tag());
                out.good("alarms", p.device(), &tag, Value::Bool(raised), p.ts);
            }
        }
        Ok(())
    }

    fn save(&self) -> Option<Vec<u8>> {
        state::encode(&self.0)
    }

    fn restore(&mut self, saved: &[u8]) -> Result<(), Error> {
        self.0.resume(state::decode(saved)?);
        Ok(())
    }
}

export!(Alarms);
