//! `thingsboard`: reshapes readings into the ThingsBoard IoT Gateway telemetry format, one message
//! per batch, for a ThingsBoard server's `v1/gateway/telemetry` topic:
//!
//! ```json
//! {"boiler-1": [{"ts": 1732860000123, "values": {"temperature": 21.5, "running": true}}]}
//! ```
//!
//! Readings of one device with the same timestamp share one `values` object. Bad readings are left
//! out (ThingsBoard has no quality flag) unless `include_bad` is set, which sends them as `null`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value as Json};
use updraft_plugin_sdk::{export, Emitter, Error, Plugin, Point, Timestamp, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    include_bad: bool,
}

struct ThingsBoard {
    include_bad: bool,
}

fn to_json(v: &Option<Value>) -> Json {
    match v {
        Some(Value::Bool(b)) => json!(b),
        Some(Value::Int(i)) => json!(i),
        Some(Value::UInt(u)) => json!(u),
        Some(Value::Float(f)) => json!(f),
        Some(Value::String(s)) => json!(s),
        // A value kind from a later SDK than this plugin knows.
        Some(_) | None => Json::Null,
    }
}

impl Plugin for ThingsBoard {
    type Config = Config;

    fn init(c: Config) -> Result<Self, Error> {
        Ok(ThingsBoard { include_bad: c.include_bad })
    }

    fn on_batch(&mut self, points: &[Point], _now: Timestamp, out: &mut Emitter) -> Result<(), Error> {
        // device → ts → values, in a stable order so the same input gives the same bytes.
        let mut devices: BTreeMap<&str, BTreeMap<Timestamp, Map<String, Json>>> = BTreeMap::new();
        for p in points.iter().filter(|p| self.include_bad || p.value.is_some()) {
            devices
                .entry(p.device())
                .or_default()
                .entry(p.ts)
                .or_default()
                .insert(p.tag().to_owned(), to_json(&p.value));
        }
        if devices.is_empty() {
            return Ok(());
        }
        let body: Map<String, Json> = devices
            .into_iter()
            .map(|(d, by_ts)| {
                let rows = by_ts.into_iter().map(|(ts, values)| json!({ "ts": ts, "values": values })).collect();
                (d.to_owned(), Json::Array(rows))
            })
            .collect();
        let payload = serde_json::to_vec(&Json::Object(body)).map_err(|e| Error::internal(e.to_string()))?;
        out.message("default", "telemetry", payload);
        Ok(())
    }
}

export!(ThingsBoard);
