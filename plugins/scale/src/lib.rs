//! `scale`: converts every numeric point linearly (value × factor + offset), e.g. raw counts to
//! engineering units or °F to °C. Bad points pass through unchanged.

use serde::Deserialize;
use updraft_plugin_sdk::{export, Emitter, Error, Plugin, Point, Timestamp, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    factor: f64,
    #[serde(default)]
    offset: f64,
    /// Appended to the tag name of emitted points (e.g. "_c"); empty keeps the name.
    #[serde(default)]
    suffix: String,
}

fn one() -> f64 {
    1.0
}

struct Scale {
    cfg: Config,
}

impl Plugin for Scale {
    type Config = Config;

    fn init(cfg: Config) -> Result<Self, Error> {
        if !cfg.factor.is_finite() || !cfg.offset.is_finite() {
            return Err(Error::config("factor and offset must be finite numbers"));
        }
        Ok(Scale { cfg })
    }

    fn on_batch(&mut self, points: &[Point], _now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        for p in points {
            let tag = format!("{}{}", p.tag(), self.cfg.suffix);
            match p.number() {
                Some(v) => out.point(p.device(), &tag, Value::Float(v * self.cfg.factor + self.cfg.offset), p.ts),
                None => out.emit("default", p.device(), &tag, p.value.clone(), p.quality, p.ts),
            }
        }
        Ok(())
    }
}

export!(Scale);
