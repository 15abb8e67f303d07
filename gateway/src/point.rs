//! The one data model every component shares: a `Point` is one reading of one tag of one device.
//!
//! Drivers produce points, the hub fans them out, the broker publisher and (later) plugins and sinks
//! consume them. The JSON shape published on the local bus is defined here once, so every consumer
//! agrees on it: `{"value": 21.5, "ts": 1732860000123, "quality": "good"}`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// A decoded value. `F32` is kept apart from `Float` so that an `f32` register reading of `0.1`
/// prints as `0.1` and not as the `f64` widening `0.10000000149011612`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    F32(f32),
    Float(f64),
}

impl Value {
    /// The value as `f64`, for scaling and for comparisons in tests.
    pub fn as_f64(&self) -> f64 {
        match *self {
            Value::Bool(b) => f64::from(u8::from(b)),
            Value::Int(i) => i as f64,
            Value::UInt(u) => u as f64,
            Value::F32(f) => f64::from(f),
            Value::Float(f) => f,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Value::Bool(b) => s.serialize_bool(b),
            Value::Int(i) => s.serialize_i64(i),
            Value::UInt(u) => s.serialize_u64(u),
            // JSON has no NaN or infinity; a device that reports one gets `null`, and the point
            // keeps its quality so the reading is still visible as having happened.
            Value::F32(f) if !f.is_finite() => s.serialize_none(),
            Value::Float(f) if !f.is_finite() => s.serialize_none(),
            Value::F32(f) => s.serialize_f32(f),
            Value::Float(f) => s.serialize_f64(f),
        }
    }
}

/// Whether a reading can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Good,
    Bad,
}

/// One reading. Device and tag names are shared `Arc<str>` so that a point costs no string
/// allocation on the hot path.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub device: Arc<str>,
    pub tag: Arc<str>,
    /// `None` exactly when `quality` is `Bad`.
    pub value: Option<Value>,
    pub quality: Quality,
    /// Unix milliseconds of the read.
    pub ts: i64,
    /// Why the point is bad; `None` for good points.
    pub error: Option<Arc<str>>,
}

impl Point {
    pub fn good(device: Arc<str>, tag: Arc<str>, value: Value, ts: i64) -> Self {
        Point {
            device,
            tag,
            value: Some(value),
            quality: Quality::Good,
            ts,
            error: None,
        }
    }

    pub fn bad(device: Arc<str>, tag: Arc<str>, error: Arc<str>, ts: i64) -> Self {
        Point {
            device,
            tag,
            value: None,
            quality: Quality::Bad,
            ts,
            error: Some(error),
        }
    }

    /// The payload published on `updraft/{device}/{tag}`.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Payload<'a> {
            value: Option<Value>,
            ts: i64,
            quality: Quality,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'a str>,
        }
        let payload = Payload {
            value: self.value,
            ts: self.ts,
            quality: self.quality,
            error: self.error.as_deref(),
        };
        // Serializing this struct cannot fail: every field is a plain number, string or enum.
        serde_json::to_vec(&payload).unwrap_or_default()
    }
}

/// A batch of points from one poll of one device. Shared by reference between consumers.
pub type Batch = Arc<[Point]>;

/// The wall clock in Unix milliseconds, as carried in `Point::ts`.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_point_json_matches_the_contract() {
        let p = Point::good(
            "boiler-1".into(),
            "temperature".into(),
            Value::Float(21.5),
            1732860000123,
        );
        assert_eq!(
            String::from_utf8(p.to_json()).unwrap(),
            r#"{"value":21.5,"ts":1732860000123,"quality":"good"}"#
        );
    }

    #[test]
    fn bad_point_carries_null_and_error() {
        let p = Point::bad("b".into(), "t".into(), "timeout after 500ms".into(), 5);
        assert_eq!(
            String::from_utf8(p.to_json()).unwrap(),
            r#"{"value":null,"ts":5,"quality":"bad","error":"timeout after 500ms"}"#
        );
    }

    #[test]
    fn f32_prints_shortest_form() {
        let p = Point::good("b".into(), "t".into(), Value::F32(0.1), 1);
        assert!(String::from_utf8(p.to_json())
            .unwrap()
            .starts_with(r#"{"value":0.1,"#));
    }
}
