//! A Modbus link: one task per physical connection (a TCP socket to a device or gateway, an RTU
//! socket to a serial device server, a serial port) that serves every device behind it in turn.
//!
//! Devices keep their own logic (plan, decode, encode, schedule, backoff) in `driver.rs` and send
//! each request here as a `Job`; the link runs the jobs one at a time, in arrival order, so the
//! devices on a shared line take turns and never interleave frames. Each job carries its device's
//! unit id, timeout and pacing, so every slave keeps its own timeout: a silent slave costs the line
//! its own timeouts and nothing else, and its device backs off on its own.
//!
//! The link owns only what belongs to the connection: opening it (with capped backoff while it
//! cannot be opened), the inter-frame gap of a serial line, and deciding when a connection is dead.
//! A timeout on a serial line or on a shared socket is one slave's silence, not the link's: the
//! connection is dropped only when every unit behind it has timed out in a row (with one unit, at
//! its first timeout, as a TCP device that stops answering usually means a half-open socket).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{self, Instant};
use tokio_modbus::client::{Client, Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::codec::Area;
use super::config::{Framing, ModbusDevice, SerialLine};
use crate::backoff::backoff;
use crate::metrics::DeviceStats;

/// One Modbus request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read {
        area: Area,
        start: u16,
        count: u16,
    },
    WriteCoil {
        address: u16,
        on: bool,
    },
    WriteRegister {
        address: u16,
        word: u16,
    },
    WriteRegisters {
        address: u16,
        words: Vec<u16>,
    },
    /// Function 22: `(register AND and) OR (or AND NOT and)`, in the device.
    MaskWrite {
        address: u16,
        and: u16,
        or: u16,
    },
}

/// What a request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Bits(Vec<bool>),
    Words(Vec<u16>),
    Written,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Modbus(#[from] tokio_modbus::Error),
    /// The connection could not be opened, or is waiting to be reopened.
    #[error("{0}")]
    Down(String),
    #[error("the link has stopped")]
    Stopped,
}

/// A request's outcome: the link failed, the device answered with an exception, or data.
pub type Reply = Result<Result<Data, ExceptionCode>, LinkError>;

/// How one device uses the link: its unit id and its own timing.
#[derive(Debug, Clone)]
pub struct Caller {
    pub unit: u8,
    pub timeout: Duration,
    /// Quiet time the line keeps before this device's requests (`request_delay`).
    pub delay: Duration,
    /// Quiet time after opening the connection, if this device's request opens it.
    pub connect_delay: Duration,
    pub stats: Arc<DeviceStats>,
}

struct Job {
    caller: Caller,
    op: Op,
    reply: oneshot::Sender<Reply>,
}

/// A device's way onto its link.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    tx: mpsc::Sender<Job>,
    name: Arc<str>,
}

impl LinkHandle {
    /// Runs `op` on the link and waits for its outcome.
    pub async fn call(&self, caller: &Caller, op: Op) -> Reply {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Job { caller: caller.clone(), op, reply }).await.is_err() {
            return Err(LinkError::Stopped);
        }
        rx.await.unwrap_or(Err(LinkError::Stopped))
    }

    /// The link's name (its address or port), for logs.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The links of a config's Modbus devices, one per address or port, started as devices ask.
#[derive(Debug, Default)]
pub struct Links {
    /// The unit ids behind each link, noted before any starts.
    units: HashMap<String, std::collections::HashSet<u8>>,
    started: HashMap<String, LinkHandle>,
}

impl Links {
    /// Notes the unit ids behind each link (devices naming one address or port share it).
    pub fn count(&mut self, device: &ModbusDevice) {
        self.units.entry(device.link_key()).or_default().insert(device.unit_id);
    }

    /// The link of `device`, started on first use.
    pub fn handle(&mut self, device: &ModbusDevice, cancel: &CancellationToken) -> LinkHandle {
        let key = device.link_key();
        if let Some(h) = self.started.get(&key) {
            return h.clone();
        }
        let units = self.units.get(&key).map_or(1, |u| u.len().max(1));
        // Each device has at most one request in flight, so the queue never holds more than one
        // request per device; its bound only has to be positive.
        let (tx, rx) = mpsc::channel(16);
        let name: Arc<str> = Arc::from(key.as_str());
        let link = Link::new(name.clone(), device.framing(), units);
        let span = tracing::error_span!("link", link = %name);
        tokio::spawn(link.run(rx, cancel.clone()).instrument(span));
        let handle = LinkHandle { tx, name };
        self.started.insert(key, handle.clone());
        handle
    }
}

struct Link {
    name: Arc<str>,
    framing: Framing,
    units: usize,
    ctx: Option<Context>,
    /// Consecutive failures to open or keep the connection.
    failures: u32,
    next_connect: Instant,
    last_error: String,
    /// Timeouts in a row, from any unit, since the last answer.
    silent: usize,
    /// When the line last carried a frame, to keep the inter-frame gap and `request_delay`.
    last_frame: Option<Instant>,
}

impl Link {
    fn new(name: Arc<str>, framing: Framing, units: usize) -> Self {
        Link {
            name,
            framing,
            units,
            ctx: None,
            failures: 0,
            next_connect: Instant::now(),
            last_error: String::new(),
            silent: 0,
            last_frame: None,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Job>, cancel: CancellationToken) {
        info!(framing = self.framing.name(), units = self.units, "Link ready.");
        loop {
            let job = tokio::select! {
                _ = cancel.cancelled() => break,
                job = rx.recv() => match job { Some(j) => j, None => break },
            };
            let reply = self.serve(&job.caller, &job.op).await;
            let _ = job.reply.send(reply);
        }
        if let Some(mut c) = self.ctx.take() {
            let _ = time::timeout(Duration::from_millis(100), c.disconnect()).await;
        }
        debug!("Link stopped.");
    }

    async fn serve(&mut self, caller: &Caller, op: &Op) -> Reply {
        if self.ctx.is_none() {
            let now = Instant::now();
            if now < self.next_connect {
                let wait = self.next_connect - now;
                return Err(LinkError::Down(format!(
                    "{}; reconnecting in {:.1}s",
                    self.last_error,
                    wait.as_secs_f64()
                )));
            }
            match open(self.name.clone(), &self.framing, caller).await {
                Ok(c) => {
                    caller.stats.connects.inc();
                    info!("Connected.");
                    self.ctx = Some(c);
                    self.silent = 0;
                    if !caller.connect_delay.is_zero() {
                        time::sleep(caller.connect_delay).await;
                    }
                }
                Err(e) => {
                    caller.stats.connect_failures.inc();
                    self.failures += 1;
                    let wait = backoff(self.failures);
                    warn!(error = %e, retry_in = ?wait, "Cannot connect.");
                    self.next_connect = Instant::now() + wait;
                    self.last_error = format!("connect failed: {e}");
                    return Err(LinkError::Down(self.last_error.clone()));
                }
            }
        }
        pace(self.last_frame, caller.delay.max(self.framing.frame_gap())).await;
        let Some(ctx) = self.ctx.as_mut() else { return Err(LinkError::Down("not connected".into())) };
        ctx.set_slave(Slave(caller.unit));
        caller.stats.requests.inc();
        let sent = Instant::now();
        let result = time::timeout(caller.timeout, execute(ctx, op)).await;
        self.last_frame = Some(Instant::now());
        caller.stats.request_seconds.observe(sent.elapsed());
        match result {
            Ok(Ok(answer)) => {
                self.silent = 0;
                self.failures = 0;
                if answer.is_err() {
                    caller.stats.request_errors.inc();
                }
                Ok(answer)
            }
            Ok(Err(e)) => {
                caller.stats.request_errors.inc();
                if matches!(e, tokio_modbus::Error::Transport(_)) {
                    // The connection itself broke: reopen at once the first time, then back off.
                    self.failures += 1;
                    let wait = if self.failures > 1 { backoff(self.failures - 1) } else { Duration::ZERO };
                    warn!(error = %e, retry_in = ?wait, "Link failed; reconnecting.");
                    self.drop_connection(wait, format!("link failed: {e}")).await;
                }
                // A mismatched answer (a late reply to an earlier request) is that request's
                // problem: the next request starts on a drained line (`trace.rs`).
                Err(LinkError::Modbus(e))
            }
            Err(_) => {
                caller.stats.request_errors.inc();
                self.silent += 1;
                if !self.framing.is_serial() && self.silent >= self.units {
                    warn!(timeouts = self.silent, "No unit behind the connection answers; reconnecting.");
                    self.failures += 1;
                    let wait = if self.failures > 1 { backoff(self.failures - 1) } else { Duration::ZERO };
                    self.drop_connection(wait, format!("timeout after {:?}", caller.timeout)).await;
                }
                Err(LinkError::Timeout(caller.timeout))
            }
        }
    }

    async fn drop_connection(&mut self, wait: Duration, why: String) {
        self.next_connect = Instant::now() + wait;
        self.last_error = why;
        self.silent = 0;
        if let Some(mut c) = self.ctx.take() {
            let _ = time::timeout(Duration::from_millis(100), c.disconnect()).await;
        }
    }
}

/// Waits until the line has been quiet for `quiet` since the last frame (the inter-frame gap of a
/// serial line, or the device's `request_delay`, whichever is longer).
async fn pace(last_frame: Option<Instant>, quiet: Duration) {
    if let Some(last) = last_frame.filter(|_| !quiet.is_zero()) {
        time::sleep_until(last + quiet).await;
    }
}

async fn open(label: Arc<str>, framing: &Framing, caller: &Caller) -> Result<Context, String> {
    Ok(match framing {
        Framing::Tcp { address } => {
            let s = tcp_connect(address, caller.timeout).await?;
            tokio_modbus::client::tcp::attach_slave(super::trace::Traced::new(s, label), Slave(caller.unit))
        }
        Framing::RtuOverTcp { address } => {
            let s = tcp_connect(address, caller.timeout).await?;
            tokio_modbus::client::rtu::attach_slave(super::trace::Traced::new(s, label), Slave(caller.unit))
        }
        Framing::Serial(line) => {
            let s = open_serial(line)?;
            tokio_modbus::client::rtu::attach_slave(super::trace::Traced::new(s, label), Slave(caller.unit))
        }
    })
}

async fn execute(ctx: &mut Context, op: &Op) -> Result<Result<Data, ExceptionCode>, tokio_modbus::Error> {
    Ok(match op {
        Op::Read { area: Area::Coil, start, count } => ctx.read_coils(*start, *count).await?.map(Data::Bits),
        Op::Read { area: Area::Discrete, start, count } => {
            ctx.read_discrete_inputs(*start, *count).await?.map(Data::Bits)
        }
        Op::Read { area: Area::Holding, start, count } => {
            ctx.read_holding_registers(*start, *count).await?.map(Data::Words)
        }
        Op::Read { area: Area::Input, start, count } => {
            ctx.read_input_registers(*start, *count).await?.map(Data::Words)
        }
        Op::WriteCoil { address, on } => ctx.write_single_coil(*address, *on).await?.map(|()| Data::Written),
        Op::WriteRegister { address, word } => {
            ctx.write_single_register(*address, *word).await?.map(|()| Data::Written)
        }
        Op::WriteRegisters { address, words } => {
            ctx.write_multiple_registers(*address, words).await?.map(|()| Data::Written)
        }
        Op::MaskWrite { address, and, or } => {
            ctx.masked_write_register(*address, *and, *or).await?.map(|()| Data::Written)
        }
    })
}

/// A TCP connection to a Modbus device within `timeout`, without Nagle's delay (Modbus is
/// strictly request/response with small frames: Nagle would only add latency).
pub(super) async fn tcp_connect(address: &str, timeout: Duration) -> Result<tokio::net::TcpStream, String> {
    let stream = match time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("timeout after {timeout:?}")),
    };
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Opens a serial port with the line's settings, exclusively (a second process on the same
/// RS-485 line would garble every frame).
pub(super) fn open_serial(line: &SerialLine) -> Result<tokio_serial::SerialStream, String> {
    use tokio_serial::SerialPortBuilderExt as _;
    let parity = match line.parity {
        super::config::Parity::None => tokio_serial::Parity::None,
        super::config::Parity::Even => tokio_serial::Parity::Even,
        super::config::Parity::Odd => tokio_serial::Parity::Odd,
    };
    let data_bits = match line.data_bits {
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let stop_bits = if line.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One };
    tokio_serial::new(&line.port, line.baud)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|e| format!("{}: {e}", line.port))
}
