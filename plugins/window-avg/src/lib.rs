//! `window-avg`: per-tag aggregates over tumbling windows of `window_secs` (aligned to the clock):
//! emits `{tag}_avg`, `{tag}_min`, `{tag}_max` and `{tag}_count` when a window closes. Windows close
//! in `on-tick`, so set the deployment's `tick` to a fraction of the window.

use serde::Deserialize;
use updraft_plugin_sdk::helpers::{WindowStats, Windows};
use updraft_plugin_sdk::{export, Emitter, Error, Plugin, Point, Timestamp, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "minute")]
    window_secs: u64,
}

fn minute() -> u64 {
    60
}

struct WindowAvg(Windows);

fn emit(w: &WindowStats, out: &mut Emitter) {
    let (d, t, ts) = (&w.info.device, &w.info.tag, w.end);
    out.point(d, &format!("{t}_avg"), Value::Float(w.avg()), ts);
    out.point(d, &format!("{t}_min"), Value::Float(w.min), ts);
    out.point(d, &format!("{t}_max"), Value::Float(w.max), ts);
    out.point(d, &format!("{t}_count"), Value::UInt(w.count), ts);
}

impl Plugin for WindowAvg {
    type Config = Config;

    fn init(c: Config) -> Result<Self, Error> {
        if c.window_secs == 0 {
            return Err(Error::config("window_secs must be at least 1"));
        }
        Ok(WindowAvg(Windows::new(c.window_secs as i64 * 1000)))
    }

    fn on_batch(&mut self, points: &[Point], _now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for p in points {
            if let Some(closed) = self.0.add(p) {
                emit(&closed, out);
            }
        }
        Ok(())
    }

    fn on_tick(&mut self, now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for w in self.0.close_due(now) {
            emit(&w, out);
        }
        Ok(())
    }
}

export!(WindowAvg);
