//! Benchmark fixture: the cheapest useful plugin. It sums the values it receives and emits one
//! point per call, so a benchmark measures the host's per-call and per-point cost, not plugin logic.

use serde::Deserialize;
use updraft_plugin_sdk::{export, Emitter, Error, Plugin, Point, Timestamp, Value};

#[derive(Deserialize)]
struct Config {}

struct Noop {
    total: f64,
}

impl Plugin for Noop {
    type Config = Config;

    fn init(_: Config) -> Result<Self, Error> {
        Ok(Noop { total: 0.0 })
    }

    fn on_batch(&mut self, points: &[Point], now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        self.total += points.iter().filter_map(Point::number).sum::<f64>();
        out.point("bench", "total", Value::Float(self.total), now);
        Ok(())
    }
}

export!(Noop);
