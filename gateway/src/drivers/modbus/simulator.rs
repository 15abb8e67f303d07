//! The built-in Modbus simulator: registers that follow waveforms, served by tokio-modbus over
//! Modbus TCP, RTU over TCP, or RTU on a serial port (one slave on the line, silent to other
//! unit ids).
//!
//! It powers the demo (live data with no hardware), lets park IT commission a config before the
//! equipment is wired (`updraft simulate`), and serves as the Modbus peer in benchmarks. Clients may
//! write coils and holding registers; a written `constant` register keeps its value, a waveform
//! register is overwritten at its next update.

use std::collections::HashMap;
use std::future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::time::{self, Instant};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::codec::{self, Area, DataType};
use super::config::{Kind, ModbusSimulator, SerialLine, SimRegister};
use crate::base::point::Value;
use crate::drivers::wave::{Shape, Wave};

/// The register memory of one simulated device. Sparse, so a simulator of a hundred devices costs
/// only the registers it defines.
#[derive(Debug, Default)]
struct Memory {
    bits: HashMap<(Area, u16), bool>,
    words: HashMap<(Area, u16), u16>,
    strict: bool,
}

impl Memory {
    fn read_bits(&self, area: Area, start: u16, count: u16) -> Result<Vec<bool>, ExceptionCode> {
        check_range(start, count, 2000)?;
        // `start + count` can be 65536, one past u16; the addresses themselves never are.
        (0..count)
            .map(|i| start + i)
            .map(|a| match self.bits.get(&(area, a)) {
                Some(b) => Ok(*b),
                None if self.strict => Err(ExceptionCode::IllegalDataAddress),
                None => Ok(false),
            })
            .collect()
    }

    fn read_words(&self, area: Area, start: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        check_range(start, count, 125)?;
        (0..count)
            .map(|i| start + i)
            .map(|a| match self.words.get(&(area, a)) {
                Some(w) => Ok(*w),
                None if self.strict => Err(ExceptionCode::IllegalDataAddress),
                None => Ok(0),
            })
            .collect()
    }

    fn write_bits(&mut self, start: u16, bits: &[bool]) -> Result<(), ExceptionCode> {
        check_range(start, u16::try_from(bits.len()).unwrap_or(u16::MAX), 1968)?;
        for (i, b) in bits.iter().enumerate() {
            let key = (Area::Coil, start + i as u16);
            if self.strict && !self.bits.contains_key(&key) {
                return Err(ExceptionCode::IllegalDataAddress);
            }
            self.bits.insert(key, *b);
        }
        Ok(())
    }

    fn write_words(&mut self, start: u16, words: &[u16]) -> Result<(), ExceptionCode> {
        check_range(start, u16::try_from(words.len()).unwrap_or(u16::MAX), 123)?;
        for (i, w) in words.iter().enumerate() {
            let key = (Area::Holding, start + i as u16);
            if self.strict && !self.words.contains_key(&key) {
                return Err(ExceptionCode::IllegalDataAddress);
            }
            self.words.insert(key, *w);
        }
        Ok(())
    }

    fn set(&mut self, r: &SimRegister, value: f64) {
        if r.area.is_bit() {
            self.bits.insert((r.area, r.address), value != 0.0);
            return;
        }
        let ty = r.data_type();
        if ty == DataType::String {
            let text = r.text.as_deref().unwrap_or_default();
            if let Ok(words) = codec::encode_string(r.order, text, r.length.unwrap_or(1)) {
                for (i, w) in words.into_iter().enumerate() {
                    self.words.insert((r.area, r.address + i as u16), w);
                }
            }
            return;
        }
        let v = match ty {
            DataType::F32 | DataType::F64 => Value::Float(value),
            DataType::Bool => Value::Bool(value != 0.0),
            _ => Value::Float(clamp_to(ty, value)),
        };
        if let Ok(words) = codec::encode(ty, r.order, v) {
            for (i, w) in words.into_iter().enumerate() {
                self.words.insert((r.area, r.address + i as u16), w);
            }
        }
    }
}

/// Serves `service` on `listener` with one of tokio-modbus's TCP server skeletons (`tcp` for
/// Modbus TCP, `rtu_over_tcp` for RTU frames over TCP) until `cancel`; the two share their shape
/// but not their types.
macro_rules! serve {
    ($framing:ident, $listener:expr, $service:expr, $cancel:expr) => {{
        use tokio_modbus::server::$framing::{accept_tcp_connection, Server};
        let server = Server::new($listener);
        let service = $service;
        let new_service = move |_addr: SocketAddr| Ok(Some(service.clone()));
        let on_connected = |stream, addr| {
            let r = accept_tcp_connection(stream, addr, &new_service);
            async move { r }
        };
        let on_error = |e: std::io::Error| warn!(error = %e, "Simulator connection failed.");
        tokio::select! {
            r = server.serve(&on_connected, on_error) => {
                if let Err(e) = r {
                    warn!(error = %e, "Simulator stopped.");
                }
            }
            _ = $cancel.cancelled() => {}
        }
    }};
}

/// The Modbus rules for a request's range: a count out of bounds is an illegal data value, a range
/// past the last address an illegal data address.
fn check_range(start: u16, count: u16, max: u16) -> Result<(), ExceptionCode> {
    if count == 0 || count > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    if u32::from(start) + u32::from(count) > 65536 {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(())
}

fn clamp_to(ty: DataType, v: f64) -> f64 {
    let (lo, hi) = match ty {
        DataType::U16 => (0.0, f64::from(u16::MAX)),
        DataType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
        DataType::U32 => (0.0, f64::from(u32::MAX)),
        DataType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
        DataType::U64 => (0.0, u64::MAX as f64),
        DataType::I64 => (i64::MIN as f64, i64::MAX as f64),
        _ => (f64::MIN, f64::MAX),
    };
    v.round().clamp(lo, hi)
}

#[derive(Clone)]
struct SimService(Arc<Mutex<Memory>>);

impl Service for SimService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let r = match req {
            Request::ReadCoils(a, n) => m.read_bits(Area::Coil, a, n).map(Response::ReadCoils),
            Request::ReadDiscreteInputs(a, n) => m.read_bits(Area::Discrete, a, n).map(Response::ReadDiscreteInputs),
            Request::ReadHoldingRegisters(a, n) => {
                m.read_words(Area::Holding, a, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(a, n) => m.read_words(Area::Input, a, n).map(Response::ReadInputRegisters),
            Request::WriteSingleCoil(a, b) => m.write_bits(a, &[b]).map(|()| Response::WriteSingleCoil(a, b)),
            Request::WriteMultipleCoils(a, bits) => {
                m.write_bits(a, &bits).map(|()| Response::WriteMultipleCoils(a, bits.len() as u16))
            }
            Request::WriteSingleRegister(a, w) => m.write_words(a, &[w]).map(|()| Response::WriteSingleRegister(a, w)),
            Request::WriteMultipleRegisters(a, words) => {
                m.write_words(a, &words).map(|()| Response::WriteMultipleRegisters(a, words.len() as u16))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        future::ready(r)
    }
}

/// Starts a simulator and serves it until `cancel`. Returns the bound address of a TCP simulator,
/// which differs from the configured one when that asks for port 0.
pub async fn start(
    name: &str,
    cfg: &ModbusSimulator,
    cancel: CancellationToken,
) -> std::io::Result<Option<SocketAddr>> {
    // Open the endpoint first, so a taken port fails start-up before anything runs.
    let endpoint = match (&cfg.kind, cfg.listen, &cfg.port) {
        (Kind::Rtu, _, Some(port)) => {
            let line = SerialLine { port: port.clone(), baud: cfg.baud.unwrap_or(9600), ..SerialLine::default() };
            let serial = super::link::open_serial(&line)
                .map_err(|e| std::io::Error::other(format!("simulator `{name}` cannot open {e}")))?;
            Endpoint::Serial(serial)
        }
        (_, Some(listen), _) => Endpoint::Tcp(TcpListener::bind(listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("simulator `{name}` cannot listen on {listen}: {e}"))
        })?),
        _ => return Err(std::io::Error::other(format!("simulator `{name}` has no listen address or port"))),
    };
    let memory = Arc::new(Mutex::new(Memory { strict: cfg.strict, ..Memory::default() }));
    let registers = cfg.registers.clone();
    let shapes: Vec<Shape> = registers.iter().map(SimRegister::shape).collect();
    let mut walks: Vec<f64> = shapes.iter().map(Shape::start).collect();
    {
        let mut m = memory.lock().unwrap_or_else(|e| e.into_inner());
        for (r, v) in registers.iter().zip(&walks) {
            m.set(r, *v);
        }
    }
    let span = tracing::info_span!("simulator", simulator = %name);
    let update = cfg.update.0;
    let mem = memory.clone();
    let c = cancel.clone();
    let animated = registers.iter().any(|r| r.wave != Wave::Constant);
    tokio::spawn(
        async move {
            if !animated {
                return;
            }
            let start = Instant::now();
            let mut tick = time::interval(update);
            tick.set_missed_tick_behavior(time::MissedTickBehavior::Skip);
            while c.run_until_cancelled(tick.tick()).await.is_some() {
                let t = start.elapsed().as_secs_f64();
                let mut m = mem.lock().unwrap_or_else(|e| e.into_inner());
                for ((r, shape), w) in registers.iter().zip(&shapes).zip(walks.iter_mut()) {
                    if r.wave != Wave::Constant {
                        m.set(r, shape.at(t, w));
                    }
                }
            }
        }
        .instrument(span.clone()),
    );
    let service = SimService(memory);
    let listener = match endpoint {
        Endpoint::Serial(serial) => {
            let unit = cfg.unit_id.unwrap_or(1);
            let server = tokio_modbus::server::rtu::Server::new(serial);
            let service = OneUnit { unit, inner: service };
            let port = cfg.port.clone().unwrap_or_default();
            info!(simulator = %name, %port, unit, "Modbus RTU simulator serving its serial port.");
            tokio::spawn(
                async move {
                    if let Err(e) = server.serve_until(service, async move { cancel.cancelled().await }).await {
                        warn!(error = %e, "Simulator stopped.");
                    }
                }
                .instrument(span),
            );
            return Ok(None);
        }
        Endpoint::Tcp(l) => l,
    };
    let addr = listener.local_addr()?;
    if cfg.kind == Kind::RtuOverTcp {
        tokio::spawn(async move { serve!(rtu_over_tcp, listener, service, cancel) }.instrument(span));
        info!(simulator = %name, %addr, "Modbus RTU-over-TCP simulator listening.");
        return Ok(Some(addr));
    }
    tokio::spawn(async move { serve!(tcp, listener, service, cancel) }.instrument(span));
    info!(simulator = %name, %addr, "Modbus simulator listening.");
    Ok(Some(addr))
}

enum Endpoint {
    Tcp(TcpListener),
    Serial(tokio_serial::SerialStream),
}

/// One slave on a serial line: answers its own unit id and keeps silent for the others, as a
/// real slave does (an answer to another unit's request would collide with that unit's).
#[derive(Clone)]
struct OneUnit {
    unit: u8,
    inner: SimService,
}

impl Service for OneUnit {
    type Request = tokio_modbus::SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        if req.slave != self.unit {
            return future::ready(Ok(None));
        }
        future::ready(self.inner.call(req.request).into_inner().map(Some))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_address_reads_without_overflow() {
        let mut m = Memory { bits: HashMap::new(), words: HashMap::new(), strict: false };
        m.words.insert((Area::Holding, 65535), 7);
        assert_eq!(m.read_words(Area::Holding, 65535, 1), Ok(vec![7]));
        assert_eq!(m.read_bits(Area::Coil, 65535, 1), Ok(vec![false]));
        assert_eq!(m.read_words(Area::Holding, 65535, 2), Err(ExceptionCode::IllegalDataAddress));
        assert!(m.write_words(65535, &[1]).is_ok());
        assert!(m.write_words(65535, &[1, 2]).is_err());
    }
}
