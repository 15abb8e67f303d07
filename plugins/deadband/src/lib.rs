//! `deadband`: report by exception. A point passes only when it moved more than `abs` (or
//! `percent` of the last reported value) since the last one that passed, when its quality changed,
//! or after `max_silence_secs` without a report, so slow-changing tags stop flooding the uplink.

use serde::Deserialize;
use updraft_plugin_sdk::helpers::Deadband;
use updraft_plugin_sdk::{export, Emitter, Error, Plugin, Point, Timestamp};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    abs: f64,
    percent: Option<f64>,
    max_silence_secs: Option<u64>,
}

struct Filter(Deadband);

impl Plugin for Filter {
    type Config = Config;

    fn init(c: Config) -> Result<Self, Error> {
        if c.abs < 0.0 || c.percent.is_some_and(|p| p < 0.0) {
            return Err(Error::config("abs and percent must not be negative"));
        }
        Ok(Filter(Deadband::new(c.abs, c.percent, c.max_silence_secs.map(|s| s as i64 * 1000))))
    }

    fn on_batch(&mut self, points: &[Point], _now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for p in points.iter().filter(|p| self.0.pass(p)) {
            out.forward(p);
        }
        Ok(())
    }
}

export!(Filter);
