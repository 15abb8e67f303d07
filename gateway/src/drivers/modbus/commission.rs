//! Commissioning from the command line: `updraft modbus read` and `updraft modbus write`, for the
//! technician who hunts for the right address, type and byte order before writing the config.
//!
//! Without `--type`, a read prints every interpretation side by side: the raw word, u16 and i16,
//! and, starting at each register, the 32-bit types in each byte order. The right one is usually
//! the column where a known value (a temperature, a setpoint) shows up.

use std::fmt::Write as _;
use std::time::Duration;

use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::Slave;

use super::codec::{self, Area, ByteOrder, DataType};
use crate::base::point::Value;

/// Where and what to read or write.
#[derive(Debug, Clone)]
pub struct Target {
    /// A TCP address (Modbus TCP or RTU over TCP) or a serial line.
    pub link: super::config::Framing,
    pub unit: u8,
    pub area: Area,
    pub start: u16,
    pub timeout: Duration,
}

async fn connect(t: &Target) -> Result<Context, String> {
    use super::config::Framing;
    let slave = Slave(t.unit);
    Ok(match &t.link {
        Framing::Tcp { address } | Framing::RtuOverTcp { address } => {
            let stream = super::link::tcp_connect(address, t.timeout)
                .await
                .map_err(|e| format!("cannot connect to {address}: {e}"))?;
            let stream = super::trace::Traced::new(stream, std::sync::Arc::from(address.as_str()));
            if matches!(t.link, Framing::Tcp { .. }) {
                tokio_modbus::client::tcp::attach_slave(stream, slave)
            } else {
                tokio_modbus::client::rtu::attach_slave(stream, slave)
            }
        }
        Framing::Serial(line) => {
            let port = super::link::open_serial(line).map_err(|e| format!("cannot open {e}"))?;
            tokio_modbus::client::rtu::attach_slave(
                super::trace::Traced::new(port, std::sync::Arc::from(line.port.as_str())),
                slave,
            )
        }
    })
}

fn answer<T>(
    r: Result<Result<Result<T, tokio_modbus::ExceptionCode>, tokio_modbus::Error>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<T, String> {
    match r {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Err(format!("link failed: {e}")),
        Ok(Ok(Err(exc))) => Err(format!("the device answered with exception: {exc}")),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

/// Reads `count` registers (or bits) and renders them: as `ty` in `order` if given, else every
/// interpretation side by side.
pub async fn read(t: &Target, count: u16, ty: Option<DataType>, order: ByteOrder) -> Result<String, String> {
    let mut ctx = connect(t).await?;
    let mut out = String::new();
    match t.area {
        Area::Coil | Area::Discrete => {
            let call = async {
                if t.area == Area::Coil {
                    ctx.read_coils(t.start, count).await
                } else {
                    ctx.read_discrete_inputs(t.start, count).await
                }
            };
            let bits = answer(tokio::time::timeout(t.timeout, call).await, t.timeout)?;
            for (i, b) in bits.iter().take(usize::from(count)).enumerate() {
                let _ = writeln!(out, "{:>5}  {}", u32::from(t.start) + i as u32, b);
            }
        }
        Area::Holding | Area::Input => {
            let words = match ty {
                Some(DataType::String) | None => 1,
                Some(ty) => ty.registers(),
            };
            let n = count.max(1).saturating_mul(words);
            let call = async {
                if t.area == Area::Holding {
                    ctx.read_holding_registers(t.start, n).await
                } else {
                    ctx.read_input_registers(t.start, n).await
                }
            };
            let regs = answer(tokio::time::timeout(t.timeout, call).await, t.timeout)?;
            match ty {
                Some(DataType::String) => {
                    let hex: Vec<String> = regs.iter().map(|w| format!("{w:04x}")).collect();
                    let text = codec::decode_string(order, &regs);
                    let _ = writeln!(out, "{:>5}  {}  {}", t.start, hex.join(" "), show(&text));
                }
                Some(ty) => {
                    for (i, chunk) in regs.chunks(usize::from(ty.registers())).enumerate() {
                        let at = u32::from(t.start) + (i * usize::from(ty.registers())) as u32;
                        let hex: Vec<String> = chunk.iter().map(|w| format!("{w:04x}")).collect();
                        let v = codec::decode(ty, order, chunk).map_or("?".into(), |v| show(&v));
                        let _ = writeln!(out, "{at:>5}  {:<19}  {v}", hex.join(" "));
                    }
                }
                None => side_by_side(&mut out, t.start, &regs),
            }
        }
    }
    Ok(out)
}

fn show(v: &Value) -> String {
    match v {
        Value::Float(f) => short(*f),
        Value::F32(f) => short(f64::from(*f)),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// A float in a column: plain when it reads well, in scientific notation when it is tiny or huge
/// (what a wrong byte order usually gives).
fn short(f: f64) -> String {
    if f != 0.0 && f.is_finite() && !(1e-4..1e12).contains(&f.abs()) {
        format!("{f:.4e}")
    } else {
        format!("{f}")
    }
}

fn side_by_side(out: &mut String, start: u16, regs: &[u16]) {
    let orders = [ByteOrder::ABCD, ByteOrder::CDAB, ByteOrder::BADC, ByteOrder::DCBA];
    let _ = write!(out, "{:>5}  {:>4}  {:>6}  {:>6}", "addr", "hex", "u16", "i16");
    for ty in ["u32", "i32", "f32"] {
        for o in &orders {
            let _ = write!(out, "  {:>14}", format!("{ty} {o:?}"));
        }
    }
    out.push('\n');
    for (i, w) in regs.iter().enumerate() {
        let at = u32::from(start) + i as u32;
        let _ = write!(out, "{at:>5}  {w:04x}  {:>6}  {:>6}", w, *w as i16);
        let pair = regs.get(i..i + 2);
        for ty in [DataType::U32, DataType::I32, DataType::F32] {
            for o in orders {
                let v = pair.and_then(|p| codec::decode(ty, o, p)).map_or(String::new(), |v| show(&v));
                let _ = write!(out, "  {v:>14}");
            }
        }
        out.push('\n');
    }
}

/// Writes `value` (JSON: a number or a boolean; for a string, the text as is) at the target,
/// encoded as `ty` in `order`; a string fills `length` registers (default: just enough).
pub async fn write(
    t: &Target,
    ty: DataType,
    order: ByteOrder,
    length: Option<u16>,
    value: &str,
) -> Result<String, String> {
    let v: serde_json::Value = if ty == DataType::String {
        serde_json::Value::String(value.to_owned())
    } else {
        serde_json::from_str(value).map_err(|_| format!("`{value}` is not a number or true/false"))?
    };
    let mut ctx = connect(t).await?;
    match t.area {
        Area::Coil => {
            let on = super::driver::coil_value(&v)?;
            answer(tokio::time::timeout(t.timeout, ctx.write_single_coil(t.start, on)).await, t.timeout)?;
        }
        Area::Holding => {
            let value = match &v {
                serde_json::Value::String(text) => {
                    let n = length.unwrap_or(u16::try_from(text.len().div_ceil(2)).unwrap_or(u16::MAX).max(1));
                    let words = codec::encode_string(order, text, n).map_err(|e| e.to_string())?;
                    let call = ctx.write_multiple_registers(t.start, &words);
                    answer(tokio::time::timeout(t.timeout, call).await, t.timeout)?;
                    return Ok(format!("wrote {value:?} at {} ({:?}, {n} registers)", t.start, t.area));
                }
                serde_json::Value::Bool(b) => Value::Bool(*b),
                serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => Value::Int(i),
                    (None, Some(u)) => Value::UInt(u),
                    _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                _ => return Err("a register takes a number".into()),
            };
            let words = codec::encode(ty, order, value).map_err(|e| e.to_string())?;
            let call = async {
                if words.len() == 1 {
                    ctx.write_single_register(t.start, words[0]).await
                } else {
                    ctx.write_multiple_registers(t.start, &words).await
                }
            };
            answer(tokio::time::timeout(t.timeout, call).await, t.timeout)?;
        }
        Area::Input | Area::Discrete => return Err("input registers and discrete inputs cannot be written".into()),
    }
    Ok(format!("wrote {value} at {} ({:?})", t.start, t.area).to_lowercase())
}
