//! Register codec: turns Modbus registers into typed values and back, for every type and byte order.
//!
//! Byte order is the peer gateways' most reported bug class (see PEERS.md), so the rules live in one
//! place and are pinned by golden vectors below. The canonical form is big-endian bytes `A B C D …`
//! (A most significant). An order names how those bytes appear on the wire, register by register:
//! `ABCD` as is, `CDAB` with the 16-bit words reversed, `BADC` with the bytes swapped inside each
//! word, `DCBA` fully reversed. Each transformation is its own inverse, so encoding uses it too.

use serde::Deserialize;

use crate::base::point::Value;

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Area {
    Coil,
    Discrete,
    Input,
    Holding,
}

impl Area {
    /// Coils and discrete inputs are bits; the other two are 16-bit registers.
    pub fn is_bit(self) -> bool {
        matches!(self, Area::Coil | Area::Discrete)
    }

    pub fn is_writable(self) -> bool {
        matches!(self, Area::Coil | Area::Holding)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    /// Text of `length` registers, two bytes each (`decode_string`, `encode_string`).
    String,
}

impl DataType {
    /// How many 16-bit registers one value takes (1 for `bool`, which reads one bit or register).
    /// A string's size is its tag's `length`; 1 here is only its smallest.
    pub fn registers(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 | DataType::String => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

/// Byte order of multi-register values. The 8-letter names are aliases for 64-bit values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ByteOrder {
    #[default]
    #[serde(alias = "ABCDEFGH")]
    ABCD,
    #[serde(alias = "GHEFCDAB")]
    CDAB,
    #[serde(alias = "BADCFEHG")]
    BADC,
    #[serde(alias = "HGFEDCBA")]
    DCBA,
}

impl ByteOrder {
    /// Rearranges big-endian bytes into wire order, or wire order back into big-endian; the
    /// transformation is an involution.
    fn transform(self, bytes: &mut [u8]) {
        match self {
            ByteOrder::ABCD => {}
            ByteOrder::DCBA => bytes.reverse(),
            ByteOrder::BADC => bytes.chunks_exact_mut(2).for_each(|w| w.swap(0, 1)),
            ByteOrder::CDAB => {
                // Reversing all bytes then swapping back within words reverses the word order.
                bytes.reverse();
                bytes.chunks_exact_mut(2).for_each(|w| w.swap(0, 1));
            }
        }
    }
}

/// Why a value could not be encoded for a write.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("value {value} is out of range for {ty:?}")]
    OutOfRange { value: f64, ty: DataType },
    #[error("value must be a number or a boolean")]
    NotANumber,
    #[error("text of {bytes} bytes does not fit {registers} registers ({} bytes)", 2 * u32::from(*registers))]
    TooLong { bytes: usize, registers: u16 },
    #[error("a string register takes text")]
    NotText,
}

/// Decodes `ty.registers()` registers from the front of `regs`. The caller guarantees the length;
/// a short slice (a device that answered with fewer registers than asked) yields `None`.
pub fn decode(ty: DataType, order: ByteOrder, regs: &[u16]) -> Option<Value> {
    let n = ty.registers() as usize;
    let regs = regs.get(..n)?;
    let mut buf = [0u8; 8];
    for (i, r) in regs.iter().enumerate() {
        buf[2 * i..2 * i + 2].copy_from_slice(&r.to_be_bytes());
    }
    let bytes = &mut buf[..2 * n];
    if n > 1 {
        order.transform(bytes);
    }
    Some(match ty {
        DataType::String => return None,
        DataType::Bool => Value::Bool(regs[0] != 0),
        DataType::U16 => Value::UInt(u64::from(regs[0])),
        DataType::I16 => Value::Int(i64::from(regs[0] as i16)),
        DataType::U32 => Value::UInt(u64::from(u32::from_be_bytes(arr4(bytes)))),
        DataType::I32 => Value::Int(i64::from(i32::from_be_bytes(arr4(bytes)))),
        DataType::F32 => Value::F32(f32::from_be_bytes(arr4(bytes))),
        DataType::U64 => Value::UInt(u64::from_be_bytes(arr8(bytes))),
        DataType::I64 => Value::Int(i64::from_be_bytes(arr8(bytes))),
        DataType::F64 => Value::Float(f64::from_be_bytes(arr8(bytes))),
    })
}

/// Encodes a value into registers in wire order.
pub fn encode(ty: DataType, order: ByteOrder, value: Value) -> Result<Vec<u16>, EncodeError> {
    let mut bytes: Vec<u8> = match ty {
        DataType::String => return Err(EncodeError::NotText),
        DataType::Bool => return Ok(vec![u16::from(value.as_f64() != 0.0)]),
        DataType::U16 => (int_in_range(value, ty, 0.0, f64::from(u16::MAX))? as u16).to_be_bytes().to_vec(),
        DataType::I16 => {
            (int_in_range(value, ty, f64::from(i16::MIN), f64::from(i16::MAX))? as i16).to_be_bytes().to_vec()
        }
        DataType::U32 => (int_in_range(value, ty, 0.0, f64::from(u32::MAX))? as u32).to_be_bytes().to_vec(),
        DataType::I32 => {
            (int_in_range(value, ty, f64::from(i32::MIN), f64::from(i32::MAX))? as i32).to_be_bytes().to_vec()
        }
        DataType::F32 => {
            let v = finite(value)?;
            // Past f32's range the cast would send infinity to the device.
            if v.abs() > f64::from(f32::MAX) {
                return Err(EncodeError::OutOfRange { value: v, ty });
            }
            (v as f32).to_be_bytes().to_vec()
        }
        // 2^64 and 2^63 are exact in f64; the upper bounds are exclusive because `as` would
        // saturate a value at them to the type's maximum instead of refusing it.
        DataType::U64 => match value {
            Value::UInt(u) => u.to_be_bytes().to_vec(),
            Value::Int(i) if i >= 0 => (i as u64).to_be_bytes().to_vec(),
            Value::Int(_) => return Err(EncodeError::OutOfRange { value: value.as_f64(), ty }),
            other => {
                let v = finite(other)?.round();
                if !(0.0..18_446_744_073_709_551_616.0).contains(&v) {
                    return Err(EncodeError::OutOfRange { value: v, ty });
                }
                (v as u64).to_be_bytes().to_vec()
            }
        },
        DataType::I64 => match value {
            Value::Int(i) => i.to_be_bytes().to_vec(),
            Value::UInt(u) => {
                i64::try_from(u).map_err(|_| EncodeError::OutOfRange { value: u as f64, ty })?.to_be_bytes().to_vec()
            }
            other => {
                let v = finite(other)?.round();
                if !(-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&v) {
                    return Err(EncodeError::OutOfRange { value: v, ty });
                }
                (v as i64).to_be_bytes().to_vec()
            }
        },
        DataType::F64 => finite(value)?.to_be_bytes().to_vec(),
    };
    if bytes.len() > 2 {
        order.transform(&mut bytes);
    }
    Ok(bytes.chunks_exact(2).map(|w| u16::from_be_bytes([w[0], w[1]])).collect())
}

/// Decodes text from registers: two bytes per register, the first character in the high byte
/// (`ABCD`, the common layout) or in the low byte (`BADC`). The text ends at the first NUL;
/// trailing spaces (the padding of fixed-width fields) are trimmed; bytes that are not UTF-8
/// become U+FFFD rather than failing the read.
pub fn decode_string(order: ByteOrder, regs: &[u16]) -> Value {
    let mut bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
    if order == ByteOrder::BADC {
        ByteOrder::BADC.transform(&mut bytes);
    }
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..end]);
    Value::String(text.trim_end_matches(' ').into())
}

/// Encodes text into exactly `registers` registers, NUL-padded, in the layout `decode_string`
/// reads. Text longer than the registers hold is refused, never cut.
pub fn encode_string(order: ByteOrder, text: &str, registers: u16) -> Result<Vec<u16>, EncodeError> {
    let room = 2 * usize::from(registers);
    if text.len() > room {
        return Err(EncodeError::TooLong { bytes: text.len(), registers });
    }
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(room, 0);
    if order == ByteOrder::BADC {
        ByteOrder::BADC.transform(&mut bytes);
    }
    Ok(bytes.chunks_exact(2).map(|w| u16::from_be_bytes([w[0], w[1]])).collect())
}

fn finite(value: Value) -> Result<f64, EncodeError> {
    let v = value.as_f64();
    if v.is_finite() {
        Ok(v)
    } else {
        Err(EncodeError::NotANumber)
    }
}

fn int_in_range(value: Value, ty: DataType, min: f64, max: f64) -> Result<f64, EncodeError> {
    let v = value.as_f64();
    if !v.is_finite() {
        return Err(EncodeError::NotANumber);
    }
    let v = v.round();
    if v < min || v > max {
        return Err(EncodeError::OutOfRange { value: value.as_f64(), ty });
    }
    Ok(v)
}

fn arr4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

fn arr8(b: &[u8]) -> [u8; 8] {
    [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Applies `value × scale + offset`. A decimal scale such as `0.1` is applied as a division by its
/// reciprocal (`× 0.1` → `÷ 10`), which rounds correctly: `217 × 0.1` is `21.700000000000003` in
/// binary floating point, while `217 ÷ 10` is `21.7`.
pub fn apply_scale(value: Value, scale: Option<f64>, offset: Option<f64>) -> Value {
    if scale.is_none() && offset.is_none() {
        return value;
    }
    let raw = value.as_f64();
    let scaled = match scale {
        Some(s) if s != 0.0 && s.abs() < 1.0 && is_integer(1.0 / s) => raw / (1.0 / s).round(),
        Some(s) => raw * s,
        None => raw,
    };
    Value::Float(scaled + offset.unwrap_or(0.0))
}

/// Inverts `apply_scale` for writes: `(value − offset) ÷ scale`.
pub fn unapply_scale(value: f64, scale: Option<f64>, offset: Option<f64>) -> f64 {
    let v = value - offset.unwrap_or(0.0);
    match scale {
        Some(s) if s != 0.0 && s.abs() < 1.0 && is_integer(1.0 / s) => v * (1.0 / s).round(),
        Some(s) if s != 0.0 => v / s,
        _ => v,
    }
}

fn is_integer(x: f64) -> bool {
    (x - x.round()).abs() < 1e-9 * x.abs().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vectors: the registers a device sends for a known value in every order. The
    /// big-endian images are well known (1.5f32 = 3FC0_0000, 123456789 = 075B_CD15).
    #[test]
    fn golden_32_bit_vectors() {
        let cases: &[(DataType, ByteOrder, [u16; 2], Value)] = &[
            (DataType::F32, ByteOrder::ABCD, [0x3FC0, 0x0000], Value::F32(1.5)),
            (DataType::F32, ByteOrder::CDAB, [0x0000, 0x3FC0], Value::F32(1.5)),
            (DataType::F32, ByteOrder::BADC, [0xC03F, 0x0000], Value::F32(1.5)),
            (DataType::F32, ByteOrder::DCBA, [0x0000, 0xC03F], Value::F32(1.5)),
            (DataType::U32, ByteOrder::ABCD, [0x075B, 0xCD15], Value::UInt(123_456_789)),
            (DataType::U32, ByteOrder::CDAB, [0xCD15, 0x075B], Value::UInt(123_456_789)),
            (DataType::U32, ByteOrder::BADC, [0x5B07, 0x15CD], Value::UInt(123_456_789)),
            (DataType::U32, ByteOrder::DCBA, [0x15CD, 0x5B07], Value::UInt(123_456_789)),
            (DataType::I32, ByteOrder::ABCD, [0xFFFF, 0xFFFE], Value::Int(-2)),
            (DataType::I32, ByteOrder::CDAB, [0xFFFE, 0xFFFF], Value::Int(-2)),
            (DataType::I32, ByteOrder::BADC, [0xFFFF, 0xFEFF], Value::Int(-2)),
            (DataType::I32, ByteOrder::DCBA, [0xFEFF, 0xFFFF], Value::Int(-2)),
        ];
        for (ty, order, regs, value) in cases {
            assert_eq!(decode(*ty, *order, regs), Some(value.clone()), "decode {ty:?} {order:?}");
            assert_eq!(encode(*ty, *order, value.clone()).unwrap(), regs.to_vec(), "encode {ty:?} {order:?}");
        }
    }

    /// 64-bit: 0x0102030405060708 and -1.5f64 (BFF8_0000_0000_0000).
    #[test]
    fn golden_64_bit_vectors() {
        let cases: &[(DataType, ByteOrder, [u16; 4], Value)] = &[
            (DataType::U64, ByteOrder::ABCD, [0x0102, 0x0304, 0x0506, 0x0708], Value::UInt(0x0102030405060708)),
            (DataType::U64, ByteOrder::CDAB, [0x0708, 0x0506, 0x0304, 0x0102], Value::UInt(0x0102030405060708)),
            (DataType::U64, ByteOrder::BADC, [0x0201, 0x0403, 0x0605, 0x0807], Value::UInt(0x0102030405060708)),
            (DataType::U64, ByteOrder::DCBA, [0x0807, 0x0605, 0x0403, 0x0201], Value::UInt(0x0102030405060708)),
            (DataType::I64, ByteOrder::ABCD, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFD], Value::Int(-3)),
            (DataType::I64, ByteOrder::CDAB, [0xFFFD, 0xFFFF, 0xFFFF, 0xFFFF], Value::Int(-3)),
            (DataType::F64, ByteOrder::ABCD, [0xBFF8, 0, 0, 0], Value::Float(-1.5)),
            (DataType::F64, ByteOrder::CDAB, [0, 0, 0, 0xBFF8], Value::Float(-1.5)),
            (DataType::F64, ByteOrder::BADC, [0xF8BF, 0, 0, 0], Value::Float(-1.5)),
            (DataType::F64, ByteOrder::DCBA, [0, 0, 0, 0xF8BF], Value::Float(-1.5)),
        ];
        for (ty, order, regs, value) in cases {
            assert_eq!(decode(*ty, *order, regs), Some(value.clone()), "decode {ty:?} {order:?}");
            assert_eq!(encode(*ty, *order, value.clone()).unwrap(), regs.to_vec(), "encode {ty:?} {order:?}");
        }
    }

    #[test]
    fn sixteen_bit_and_bool_ignore_order() {
        for order in [ByteOrder::ABCD, ByteOrder::CDAB, ByteOrder::BADC, ByteOrder::DCBA] {
            assert_eq!(decode(DataType::U16, order, &[0xFFFE]), Some(Value::UInt(65534)));
            assert_eq!(decode(DataType::I16, order, &[0xFFFE]), Some(Value::Int(-2)));
            assert_eq!(decode(DataType::Bool, order, &[7]), Some(Value::Bool(true)));
        }
    }

    #[test]
    fn eight_letter_names_are_aliases() {
        #[derive(Deserialize)]
        struct T {
            o: ByteOrder,
        }
        for (name, order) in [
            ("ABCDEFGH", ByteOrder::ABCD),
            ("GHEFCDAB", ByteOrder::CDAB),
            ("BADCFEHG", ByteOrder::BADC),
            ("HGFEDCBA", ByteOrder::DCBA),
        ] {
            let t: T = toml::from_str(&format!("o = \"{name}\"")).unwrap();
            assert_eq!(t.o, order);
        }
    }

    #[test]
    fn short_input_is_none_not_panic() {
        assert_eq!(decode(DataType::F64, ByteOrder::ABCD, &[1, 2]), None);
        assert_eq!(decode(DataType::U16, ByteOrder::ABCD, &[]), None);
    }

    #[test]
    fn golden_string_vectors() {
        // "AB-7" in 3 registers: 0x4142 0x2D37 0x0000, first character in the high byte.
        let abcd = [0x4142, 0x2D37, 0x0000];
        assert_eq!(decode_string(ByteOrder::ABCD, &abcd), Value::String("AB-7".into()));
        assert_eq!(encode_string(ByteOrder::ABCD, "AB-7", 3).unwrap(), abcd);
        // Low byte first: the same text with each register's bytes swapped.
        let badc = [0x4241, 0x372D, 0x0000];
        assert_eq!(decode_string(ByteOrder::BADC, &badc), Value::String("AB-7".into()));
        assert_eq!(encode_string(ByteOrder::BADC, "AB-7", 3).unwrap(), badc);
        // Space padding is trimmed, and the text ends at the first NUL whatever follows it.
        assert_eq!(decode_string(ByteOrder::ABCD, &[0x4F4B, 0x2020]), Value::String("OK".into()));
        assert_eq!(decode_string(ByteOrder::ABCD, &[0x4F00, 0x5858]), Value::String("O".into()));
        // UTF-8 survives; bytes that are not UTF-8 read as U+FFFD instead of failing.
        let words = encode_string(ByteOrder::ABCD, "温度", 3).unwrap();
        assert_eq!(decode_string(ByteOrder::ABCD, &words), Value::String("温度".into()));
        assert_eq!(decode_string(ByteOrder::ABCD, &[0xFF41]), Value::String("\u{FFFD}A".into()));
        // Too long is refused, not cut; an empty string clears the field.
        assert_eq!(encode_string(ByteOrder::ABCD, "ABCDE", 2), Err(EncodeError::TooLong { bytes: 5, registers: 2 }));
        assert_eq!(encode_string(ByteOrder::ABCD, "", 2).unwrap(), [0, 0]);
    }

    #[test]
    fn out_of_range_writes_are_refused() {
        assert!(encode(DataType::U16, ByteOrder::ABCD, Value::Int(70_000)).is_err());
        assert!(encode(DataType::I16, ByteOrder::ABCD, Value::Int(-40_000)).is_err());
        assert!(encode(DataType::U32, ByteOrder::ABCD, Value::Float(f64::NAN)).is_err());
    }

    #[test]
    fn decimal_scales_round_correctly() {
        assert_eq!(apply_scale(Value::UInt(217), Some(0.1), None), Value::Float(21.7));
        assert_eq!(apply_scale(Value::UInt(215), Some(0.1), Some(-40.0)), Value::Float(-18.5));
        assert_eq!(apply_scale(Value::Int(3), Some(2.5), None), Value::Float(7.5));
        assert_eq!(unapply_scale(21.7, Some(0.1), None), 217.0);
        assert_eq!(apply_scale(Value::UInt(5), None, None), Value::UInt(5));
    }

    /// Every value survives encode then decode, in every order.
    #[test]
    fn round_trip_all_types_and_orders() {
        let values = [
            (DataType::U16, Value::UInt(40_000)),
            (DataType::I16, Value::Int(-12_345)),
            (DataType::U32, Value::UInt(4_000_000_000)),
            (DataType::I32, Value::Int(-2_000_000_000)),
            (DataType::F32, Value::F32(-273.15)),
            (DataType::U64, Value::UInt(u64::MAX - 7)),
            (DataType::I64, Value::Int(i64::MIN + 9)),
            (DataType::F64, Value::Float(std::f64::consts::PI)),
        ];
        for order in [ByteOrder::ABCD, ByteOrder::CDAB, ByteOrder::BADC, ByteOrder::DCBA] {
            for (ty, v) in values.clone() {
                let regs = encode(ty, order, v.clone()).unwrap();
                assert_eq!(regs.len(), ty.registers() as usize);
                assert_eq!(decode(ty, order, &regs), Some(v), "{ty:?} {order:?}");
            }
        }
    }

    #[test]
    fn writes_keep_every_bit_and_refuse_what_does_not_fit() {
        use ByteOrder::ABCD as Abcd;
        let words = |v: u64| vec![(v >> 48) as u16, (v >> 32) as u16, (v >> 16) as u16, v as u16];
        assert_eq!(encode(DataType::U64, Abcd, Value::UInt(u64::MAX)).unwrap(), words(u64::MAX));
        assert_eq!(
            encode(DataType::U64, Abcd, Value::UInt(9_007_199_254_740_993)).unwrap(),
            words(9_007_199_254_740_993)
        );
        assert_eq!(encode(DataType::I64, Abcd, Value::Int(i64::MIN)).unwrap(), words(i64::MIN as u64));
        assert_eq!(encode(DataType::I64, Abcd, Value::Int(-3)).unwrap(), words(-3i64 as u64));
        // At the type's maximum a float would have saturated: refused instead.
        assert!(encode(DataType::U64, Abcd, Value::Float(18_446_744_073_709_551_616.0)).is_err());
        assert!(encode(DataType::I64, Abcd, Value::Float(9_223_372_036_854_775_808.0)).is_err());
        assert!(encode(DataType::I64, Abcd, Value::UInt(1 << 63)).is_err());
        assert!(encode(DataType::U64, Abcd, Value::Int(-1)).is_err());
        // No infinity or NaN reaches a device.
        assert!(encode(DataType::F32, Abcd, Value::Float(1e39)).is_err());
        assert!(encode(DataType::F32, Abcd, Value::Float(f64::INFINITY)).is_err());
        assert!(encode(DataType::F64, Abcd, Value::Float(f64::NAN)).is_err());
        assert_eq!(encode(DataType::F32, Abcd, Value::Float(1.5)).unwrap(), vec![0x3FC0, 0]);
        assert!(encode(DataType::U16, Abcd, Value::Float(65536.0)).is_err());
        assert!(encode(DataType::I16, Abcd, Value::Int(-32769)).is_err());
    }
}
