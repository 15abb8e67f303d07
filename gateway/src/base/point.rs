//! The one data model every component shares: a `Point` is one reading of one tag of one device.
//!
//! Drivers produce points, the hub fans them out, the broker publisher and (later) plugins and sinks
//! consume them. The JSON shape published on the local bus is defined here once, so every consumer
//! agrees on it: `{"value": 21.5, "ts": 1732860000123, "quality": "good"}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Serialize, Serializer};

use super::topic::TOPIC_PREFIX;

/// A decoded value. `F32` is kept apart from `Float` so that an `f32` register reading of `0.1`
/// prints as `0.1` and not as the `f64` widening `0.10000000149011612`. A `String` (a device's
/// serial number, recipe name or status text) is shared, so fanning a point out to every
/// consumer never copies its text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    F32(f32),
    Float(f64),
    String(Arc<str>),
}

impl Value {
    /// The value as a number, for scaling, deadbands and comparisons in tests; `None` for text.
    pub fn number(&self) -> Option<f64> {
        Some(match *self {
            Value::Bool(b) => f64::from(u8::from(b)),
            Value::Int(i) => i as f64,
            Value::UInt(u) => u as f64,
            Value::F32(f) => f64::from(f),
            Value::Float(f) => f,
            Value::String(_) => return None,
        })
    }

    /// The value as `f64`; text is NaN (it has no numeric reading).
    pub fn as_f64(&self) -> f64 {
        self.number().unwrap_or(f64::NAN)
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
            Value::String(ref t) => s.serialize_str(t),
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

/// The identity of one tag, interned once: its names, a dense id and its topic on the local bus.
/// Points carry an `Arc<TagKey>`, so the hot path never hashes, compares or formats names.
#[derive(Debug, PartialEq, Eq)]
pub struct TagKey {
    /// Dense index, assigned in interning order; used for O(1) current-value slots.
    pub id: u32,
    pub device: Arc<str>,
    pub tag: Arc<str>,
    /// `updraft/{device}/{tag}` for device points; the output's topic for derived points.
    pub topic: Bytes,
    /// Emitted by a plugin rather than read from a device.
    pub derived: bool,
    /// Published into the local broker by an MQTT client (a local device), picked up for the cloud
    /// sinks: the broker must not publish it again.
    pub external: bool,
}

/// Interns tag identities. Shared by every producer of points.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Interned>,
}

/// Keys by topic, so a plugin's derived point never collides with a device point of the same
/// device and tag name.
#[derive(Debug, Default)]
struct Interned {
    by_topic: HashMap<Arc<str>, Arc<TagKey>>,
    /// Index = id.
    by_id: Vec<Arc<TagKey>>,
}

impl Registry {
    /// The key of a device's tag, published on `updraft/{device}/{tag}`; created on first use.
    pub fn intern(&self, device: &str, tag: &str) -> Arc<TagKey> {
        self.intern_at(device, tag, &format!("{TOPIC_PREFIX}/{device}/{tag}"), false)
    }

    /// The key of a point published on `topic`; `derived` marks points emitted by plugins.
    pub fn intern_at(&self, device: &str, tag: &str, topic: &str, derived: bool) -> Arc<TagKey> {
        self.intern_with(device, tag, topic, derived, false)
    }

    /// The key of messages a local MQTT client publishes on `topic` (the whole topic stands in
    /// for the device name; the tag is empty).
    pub fn intern_external(&self, topic: &str) -> Arc<TagKey> {
        self.intern_with(topic, "", topic, true, true)
    }

    fn intern_with(&self, device: &str, tag: &str, topic: &str, derived: bool, external: bool) -> Arc<TagKey> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = inner.by_topic.get(topic) {
            return k.clone();
        }
        let key = Arc::new(TagKey {
            id: inner.by_id.len() as u32,
            device: Arc::from(device),
            tag: Arc::from(tag),
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            derived,
            external,
        });
        inner.by_id.push(key.clone());
        inner.by_topic.insert(Arc::from(topic), key.clone());
        key
    }

    /// The key of a device's tag if it exists.
    pub fn get(&self, device: &str, tag: &str) -> Option<Arc<TagKey>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_topic.get(format!("{TOPIC_PREFIX}/{device}/{tag}").as_str()).cloned()
    }

    /// The key of whatever is published on `topic`, if it exists.
    pub fn get_topic(&self, topic: &str) -> Option<Arc<TagKey>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_topic.get(topic).cloned()
    }

    /// The key with this id.
    pub fn by_id(&self, id: u32) -> Option<Arc<TagKey>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.get(id as usize).cloned()
    }
}

/// One reading of one tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub key: Arc<TagKey>,
    /// `None` exactly when `quality` is `Bad`.
    pub value: Option<Value>,
    pub quality: Quality,
    /// Unix milliseconds of the read.
    pub ts: i64,
    /// Why the point is bad; `None` for good points.
    pub error: Option<Arc<str>>,
    /// A plugin's message published as is (not retained) instead of the point JSON.
    pub payload: Option<Bytes>,
}

impl Point {
    pub fn good(key: Arc<TagKey>, value: Value, ts: i64) -> Self {
        Point { key, value: Some(value), quality: Quality::Good, ts, error: None, payload: None }
    }

    pub fn bad(key: Arc<TagKey>, error: Arc<str>, ts: i64) -> Self {
        Point { key, value: None, quality: Quality::Bad, ts, error: Some(error), payload: None }
    }

    /// A message from a plugin, published verbatim on its key's topic.
    pub fn message(key: Arc<TagKey>, payload: Bytes, ts: i64) -> Self {
        Point { key, value: None, quality: Quality::Good, ts, error: None, payload: Some(payload) }
    }

    pub fn device(&self) -> &str {
        &self.key.device
    }

    pub fn tag(&self) -> &str {
        &self.key.tag
    }

    /// Appends the payload published on `updraft/{device}/{tag}` to `out`, so a caller can reuse
    /// one buffer for many points.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct Payload<'a> {
            value: Option<&'a Value>,
            ts: i64,
            quality: Quality,
            #[serde(skip_serializing_if = "Option::is_none")]
            error: Option<&'a str>,
        }
        let payload =
            Payload { value: self.value.as_ref(), ts: self.ts, quality: self.quality, error: self.error.as_deref() };
        // Serializing this struct into memory cannot fail: every field is a number, string or enum.
        let _ = serde_json::to_writer(out, &payload);
    }
}

/// A batch of points from one poll of one device. Shared by reference between consumers.
pub type Batch = Arc<[Point]>;

/// The wall clock in Unix milliseconds, as carried in `Point::ts`.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(p: &Point) -> String {
        let mut out = Vec::new();
        p.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn key(device: &str, tag: &str) -> Arc<TagKey> {
        Registry::default().intern(device, tag)
    }

    #[test]
    fn interning_gives_one_key_per_tag() {
        let r = Registry::default();
        let a = r.intern("boiler-1", "temperature");
        let b = r.intern("boiler-1", "pressure");
        assert!(Arc::ptr_eq(&a, &r.intern("boiler-1", "temperature")));
        assert_eq!((a.id, b.id), (0, 1));
        assert_eq!(&a.topic[..], b"updraft/boiler-1/temperature");
        assert_eq!(r.get("boiler-1", "pressure").map(|k| k.id), Some(1));
    }

    #[test]
    fn good_point_json_matches_the_contract() {
        let p = Point::good(key("boiler-1", "temperature"), Value::Float(21.5), 1732860000123);
        assert_eq!(json(&p), r#"{"value":21.5,"ts":1732860000123,"quality":"good"}"#);
    }

    #[test]
    fn bad_point_carries_null_and_error() {
        let p = Point::bad(key("b", "t"), "timeout after 500ms".into(), 5);
        assert_eq!(json(&p), r#"{"value":null,"ts":5,"quality":"bad","error":"timeout after 500ms"}"#);
    }

    #[test]
    fn f32_prints_shortest_form() {
        let p = Point::good(key("b", "t"), Value::F32(0.1), 1);
        assert!(json(&p).starts_with(r#"{"value":0.1,"#));
    }
}
