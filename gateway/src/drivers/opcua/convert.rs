//! OPC-UA values to and from the point model: a `DataValue` becomes a `Point` (status code to
//! quality, source timestamp kept), and a JSON value from a write command becomes a `Variant` of
//! the node's data type.

use std::sync::Arc;

use opcua::types::{DataTypeId, DataValue, NodeId, StatusCode, Variant};

use crate::base::point::{now_ms, Point, TagKey, Value};

/// Unix milliseconds of an OPC-UA timestamp.
pub fn millis(t: &opcua::types::DateTime) -> i64 {
    t.as_chrono().timestamp_millis()
}

/// One reported value as a point. The source timestamp (when the value changed at the device) is
/// kept; without one, the server's, and without that, the gateway's clock. A bad status makes a
/// bad point named after its code (`BadNodeIdUnknown`); an uncertain one keeps its value.
pub fn point(key: &Arc<TagKey>, dv: &DataValue) -> Point {
    let ts = dv.source_timestamp.as_ref().or(dv.server_timestamp.as_ref()).map(millis).unwrap_or_else(now_ms);
    let status = dv.status.unwrap_or(StatusCode::Good);
    if status.is_bad() {
        return Point::bad(key.clone(), Arc::from(status.to_string()), ts);
    }
    match dv.value.as_ref().map(value) {
        Some(Ok(v)) => Point::good(key.clone(), v, ts),
        Some(Err(e)) => Point::bad(key.clone(), Arc::from(e), ts),
        None => Point::bad(key.clone(), Arc::from("the server sent no value"), ts),
    }
}

/// A scalar variant as a point value. Date-times become RFC 3339 text, identifiers and names
/// their text forms; arrays and structures are refused with a message naming what was sent.
pub fn value(v: &Variant) -> Result<Value, String> {
    Ok(match v {
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(x) => Value::Int((*x).into()),
        Variant::Int16(x) => Value::Int((*x).into()),
        Variant::Int32(x) => Value::Int((*x).into()),
        Variant::Int64(x) => Value::Int(*x),
        Variant::Byte(x) => Value::UInt((*x).into()),
        Variant::UInt16(x) => Value::UInt((*x).into()),
        Variant::UInt32(x) => Value::UInt((*x).into()),
        Variant::UInt64(x) => Value::UInt(*x),
        Variant::Float(x) => Value::F32(*x),
        Variant::Double(x) => Value::Float(*x),
        Variant::String(s) => Value::String(Arc::from(s.as_ref())),
        Variant::LocalizedText(t) => Value::String(Arc::from(t.text.as_ref())),
        Variant::QualifiedName(q) => Value::String(Arc::from(q.name.as_ref())),
        Variant::DateTime(t) => Value::String(Arc::from(t.to_rfc3339())),
        Variant::Guid(g) => Value::String(Arc::from(g.to_string())),
        Variant::NodeId(n) => Value::String(Arc::from(n.to_string())),
        Variant::StatusCode(s) => Value::UInt(u64::from(s.bits())),
        Variant::Empty => return Err("the variable has no value (null)".into()),
        Variant::Array(_) => return Err("arrays are not supported; map one element per tag".into()),
        other => return Err(format!("values of type {:?} are not supported", other.type_id())),
    })
}

/// The built-in scalar types a write can produce, by the node's `DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteType {
    Boolean,
    SByte,
    Byte,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Int64,
    UInt64,
    Float,
    Double,
    String,
}

impl WriteType {
    /// The write type of a `DataType` attribute, if it is a built-in scalar.
    pub fn of(data_type: &NodeId) -> Option<WriteType> {
        let id = data_type.as_data_type_id().ok()?;
        Some(match id {
            DataTypeId::Boolean => WriteType::Boolean,
            DataTypeId::SByte => WriteType::SByte,
            DataTypeId::Byte => WriteType::Byte,
            DataTypeId::Int16 => WriteType::Int16,
            DataTypeId::UInt16 => WriteType::UInt16,
            DataTypeId::Int32 => WriteType::Int32,
            DataTypeId::UInt32 => WriteType::UInt32,
            DataTypeId::Int64 => WriteType::Int64,
            DataTypeId::UInt64 => WriteType::UInt64,
            DataTypeId::Float => WriteType::Float,
            DataTypeId::Double => WriteType::Double,
            DataTypeId::String => WriteType::String,
            _ => return None,
        })
    }

    /// The JSON value of a write command as this type; integers must be whole and in range.
    pub fn variant(self, v: &serde_json::Value) -> Result<Variant, String> {
        use serde_json::Value as J;
        if self == WriteType::String {
            return match v {
                J::String(s) => Ok(Variant::from(s.as_str())),
                other => Err(format!("this node takes text (a JSON string), not {other}")),
            };
        }
        if self == WriteType::Boolean {
            return match v {
                J::Bool(b) => Ok(Variant::Boolean(*b)),
                J::Number(n) if n.as_u64() == Some(1) => Ok(Variant::Boolean(true)),
                J::Number(n) if n.as_u64() == Some(0) => Ok(Variant::Boolean(false)),
                other => Err(format!("this node is a Boolean: write true, false, 1 or 0, not {other}")),
            };
        }
        let n = match v {
            J::Number(n) => n,
            J::Bool(b) => &serde_json::Number::from(u8::from(*b)),
            other => return Err(format!("this node is a {self:?}: write a number, not {other}")),
        };
        let int = || -> Result<i128, String> {
            if let Some(i) = n.as_i64() {
                return Ok(i.into());
            }
            if let Some(u) = n.as_u64() {
                return Ok(u.into());
            }
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 1e19 {
                Ok(f as i128)
            } else {
                Err(format!("this node is a {self:?}: {n} is not a whole number"))
            }
        };
        let range = |what: &str| format!("{n} is out of range for {what}");
        Ok(match self {
            WriteType::SByte => Variant::SByte(i8::try_from(int()?).map_err(|_| range("SByte"))?),
            WriteType::Byte => Variant::Byte(u8::try_from(int()?).map_err(|_| range("Byte"))?),
            WriteType::Int16 => Variant::Int16(i16::try_from(int()?).map_err(|_| range("Int16"))?),
            WriteType::UInt16 => Variant::UInt16(u16::try_from(int()?).map_err(|_| range("UInt16"))?),
            WriteType::Int32 => Variant::Int32(i32::try_from(int()?).map_err(|_| range("Int32"))?),
            WriteType::UInt32 => Variant::UInt32(u32::try_from(int()?).map_err(|_| range("UInt32"))?),
            WriteType::Int64 => Variant::Int64(i64::try_from(int()?).map_err(|_| range("Int64"))?),
            WriteType::UInt64 => Variant::UInt64(u64::try_from(int()?).map_err(|_| range("UInt64"))?),
            WriteType::Float => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.is_finite() && f.abs() > f64::from(f32::MAX) {
                    return Err(range("Float"));
                }
                Variant::Float(f as f32)
            }
            WriteType::Double => Variant::Double(n.as_f64().unwrap_or(f64::NAN)),
            WriteType::Boolean | WriteType::String => unreachable!("handled above"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_map_to_the_point_model() {
        assert_eq!(value(&Variant::Boolean(true)).unwrap(), Value::Bool(true));
        assert_eq!(value(&Variant::Int16(-3)).unwrap(), Value::Int(-3));
        assert_eq!(value(&Variant::UInt64(u64::MAX)).unwrap(), Value::UInt(u64::MAX));
        assert_eq!(value(&Variant::Float(0.1)).unwrap(), Value::F32(0.1));
        assert_eq!(value(&Variant::from("BOILER-A7")).unwrap(), Value::String(Arc::from("BOILER-A7")));
        let t = opcua::types::DateTime::ymd_hms(2026, 12, 2, 8, 30, 0);
        assert_eq!(value(&Variant::from(t)).unwrap(), Value::String(Arc::from("2026-12-02T08:30:00.000Z")));
        assert!(value(&Variant::Empty).is_err());
        assert!(value(&Variant::from(vec![1i32, 2])).unwrap_err().contains("arrays"));
    }

    #[test]
    fn writes_take_the_node_type_and_refuse_what_does_not_fit() {
        assert_eq!(WriteType::Int16.variant(&json!(-7)).unwrap(), Variant::Int16(-7));
        assert_eq!(WriteType::Int16.variant(&json!(12.0)).unwrap(), Variant::Int16(12));
        assert!(WriteType::Int16.variant(&json!(40000)).unwrap_err().contains("out of range"));
        assert!(WriteType::UInt32.variant(&json!(-1)).is_err());
        assert!(WriteType::Int32.variant(&json!(1.5)).unwrap_err().contains("whole"));
        assert_eq!(WriteType::UInt64.variant(&json!(u64::MAX)).unwrap(), Variant::UInt64(u64::MAX));
        assert_eq!(WriteType::Double.variant(&json!(2.5)).unwrap(), Variant::Double(2.5));
        assert_eq!(WriteType::Boolean.variant(&json!(1)).unwrap(), Variant::Boolean(true));
        assert!(WriteType::Boolean.variant(&json!("on")).is_err());
        assert_eq!(WriteType::String.variant(&json!("A7")).unwrap(), Variant::from("A7"));
        assert!(WriteType::String.variant(&json!(7)).is_err());
        assert!(WriteType::Float.variant(&json!(1e300)).is_err());
    }
}
