//! The Modbus TCP driver: one task per device that polls its tags on a fixed schedule.
//!
//! "The link failed" and "the device said no" are kept apart (tokio-modbus returns them as the
//! outer and inner `Result`): a transport error or timeout drops the connection and reconnects with
//! jittered exponential backoff; a Modbus exception only marks the affected points bad. A merged
//! request that draws an exception is split into one request per tag from then on, so a single
//! unmapped register in a gap does not blind its neighbours.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::{ExceptionCode, Slave};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::codec::{self, Area, ByteOrder, DataType};
use super::config::{ModbusTcpDevice, WriteFunction};
use super::planner::{self, Limits, ReadRequest, Span};
use crate::backoff::backoff;
use crate::base::point::{now_ms, Point, Registry, TagKey, Value};
use crate::config::Access;
use crate::drivers::report::{Exceptions, Rule};
use crate::drivers::{WriteCommand, WriteRx};
use crate::hub::{batch, BusSender};
use crate::metrics::DeviceStats;

/// A tag ready for decoding.
#[derive(Debug, Clone)]
struct Tag {
    key: Arc<TagKey>,
    access: Access,
    area: Area,
    address: u16,
    ty: DataType,
    order: ByteOrder,
    scale: Option<f64>,
    offset: Option<f64>,
    /// A single bit of a register.
    bit: Option<u8>,
}

/// Data returned by one read.
enum Data {
    Bits(Vec<bool>),
    Words(Vec<u16>),
}

/// Why a read failed at the link level.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Modbus(#[from] tokio_modbus::Error),
}

pub struct ModbusTcpDriver {
    device: Arc<str>,
    address: String,
    unit_id: u8,
    poll: Duration,
    timeout: Duration,
    tags: Vec<Tag>,
    plan: Vec<ReadRequest>,
    stats: Arc<DeviceStats>,
    out: BusSender,
    commands: Option<WriteRx>,
    /// Report by exception, if any tag asks for it.
    exceptions: Option<Exceptions>,
    write_function: WriteFunction,
    request_delay: Duration,
    connect_delay: Duration,
    /// When the last request went out, to keep `request_delay` between requests.
    last_request: std::sync::Mutex<Option<std::time::Instant>>,
    /// RTU frames (address byte, CRC) over the TCP connection instead of MBAP headers.
    rtu_over_tcp: bool,
}

impl ModbusTcpDriver {
    pub fn new(
        name: &str,
        cfg: &ModbusTcpDevice,
        registry: &Registry,
        stats: Arc<DeviceStats>,
        out: BusSender,
    ) -> Self {
        let tags: Vec<Tag> = cfg
            .tags
            .iter()
            .map(|t| Tag {
                key: registry.intern(name, &t.name),
                access: t.access,
                area: t.area,
                // Checked by the config's validation; a bad one cannot get here.
                address: t.wire_address(cfg.address_base).unwrap_or(t.address),
                ty: t.data_type(),
                order: t.order.unwrap_or(cfg.order),
                scale: t.scale,
                offset: t.offset,
                bit: t.bit,
            })
            .collect();
        let spans: Vec<Span> = tags
            .iter()
            .map(|t| Span { area: t.area, address: t.address, len: if t.area.is_bit() { 1 } else { t.ty.registers() } })
            .collect();
        let limits =
            Limits { max_gap: cfg.max_read_gap, max_registers: cfg.max_read_registers, max_bits: cfg.max_read_bits };
        let mut plan = planner::plan(&spans, limits);
        if cfg.single_register_reads {
            plan = plan.iter().flat_map(|r| split_request(r, &tags)).collect();
        }
        let rules = cfg
            .tags
            .iter()
            .zip(&tags)
            .map(|(t, tag)| {
                let rule =
                    Rule::resolve((cfg.publish, cfg.deadband, cfg.heartbeat), (t.publish, t.deadband, t.heartbeat));
                (tag.key.id, rule)
            })
            .collect();
        ModbusTcpDriver {
            device: Arc::from(name),
            address: cfg.address.clone(),
            unit_id: cfg.unit_id,
            poll: cfg.poll.0,
            timeout: cfg.timeout.0,
            tags,
            plan,
            stats,
            out,
            commands: None,
            exceptions: Exceptions::new(rules),
            write_function: cfg.write_function,
            request_delay: cfg.request_delay.map_or(Duration::ZERO, |d| d.0),
            connect_delay: cfg.connect_delay.map_or(Duration::ZERO, |d| d.0),
            last_request: std::sync::Mutex::new(None),
            rtu_over_tcp: false,
        }
    }

    /// Speaks Modbus RTU frames over the TCP connection (a serial device server in transparent
    /// mode) instead of Modbus TCP.
    pub fn rtu_over_tcp(mut self, on: bool) -> Self {
        self.rtu_over_tcp = on;
        self
    }

    /// Accepts write commands (from the cloud or the local broker) on this queue.
    pub fn with_commands(mut self, rx: WriteRx) -> Self {
        self.commands = Some(rx);
        self
    }

    pub async fn run(self, cancel: CancellationToken) {
        let driver = if self.rtu_over_tcp { "modbus-rtu-tcp" } else { "modbus-tcp" };
        let span = tracing::error_span!("driver", device = %self.device, driver);
        self.run_inner(cancel).instrument(span).await;
    }

    async fn run_inner(mut self, cancel: CancellationToken) {
        info!(address = %self.address, tags = self.tags.len(), requests = self.plan.len(), "Polling device.");
        let mut ctx: Option<Context> = None;
        let mut failures: u32 = 0;
        let mut next_connect = Instant::now();
        let mut ticker = time::interval(self.poll);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut last_scheduled: Option<Instant> = None;
        let mut commands = self.commands.take();
        loop {
            let scheduled = tokio::select! {
                _ = cancel.cancelled() => break,
                t = ticker.tick() => t,
                Some(cmd) = recv_command(&mut commands) => {
                    let result = self.write(&mut ctx, &cmd, &mut failures, &mut next_connect).await;
                    if let Err(e) = &result {
                        warn!(tag = %cmd.tag, error = %e, "Write refused or failed.");
                    } else {
                        info!(tag = %cmd.tag, value = %cmd.value, "Written.");
                    }
                    let _ = cmd.reply.send(result);
                    continue;
                }
            };
            self.account_schedule(scheduled, last_scheduled);
            last_scheduled = Some(scheduled);

            if ctx.is_none() {
                if Instant::now() < next_connect {
                    continue;
                }
                match self.connect().await {
                    Ok(c) => {
                        self.stats.connects.inc();
                        info!("Connected.");
                        ctx = Some(c);
                    }
                    Err(e) => {
                        self.stats.connect_failures.inc();
                        failures += 1;
                        let wait = backoff(failures);
                        warn!(error = %e, retry_in = ?wait, "Cannot connect.");
                        next_connect = Instant::now() + wait;
                        let points = self.all_bad(&format!("connect failed: {e}"));
                        if self.emit(points).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
            }
            let Some(c) = ctx.as_mut() else { continue };
            let (points, link_error) = self.poll_once(c).await;
            if self.emit(points).await.is_err() {
                break;
            }
            if let Some(e) = link_error {
                failures += 1;
                // The first failure reconnects at the next poll; repeated ones back off.
                let wait = if failures > 1 { backoff(failures - 1) } else { Duration::ZERO };
                warn!(error = %e, retry_in = ?wait, "Link failed; reconnecting.");
                next_connect = Instant::now() + wait;
                if let Some(mut c) = ctx.take() {
                    let _ = time::timeout(Duration::from_millis(100), tokio_modbus::client::Client::disconnect(&mut c))
                        .await;
                }
            } else {
                failures = 0;
            }
        }
        debug!("Driver stopped.");
    }

    /// Writes one tag. Refuses tags that are not `access = "rw"` and values that do not fit the
    /// tag's type. While the link is down and in backoff the write is refused at once, and a write
    /// whose link fails backs off like a poll: a burst of writes to an unreachable device costs one
    /// timeout, not one per write, so it cannot starve polling.
    async fn write(
        &self,
        ctx: &mut Option<Context>,
        cmd: &WriteCommand,
        failures: &mut u32,
        next_connect: &mut Instant,
    ) -> Result<(), String> {
        let tag = self
            .tags
            .iter()
            .find(|t| t.key.tag.as_ref() == cmd.tag.as_str())
            .ok_or_else(|| format!("unknown tag `{}`", cmd.tag))?;
        if tag.access != Access::Rw {
            return Err(format!("tag `{}` is read-only (set access = \"rw\" in its config to allow writes)", cmd.tag));
        }
        // Encode before touching the link, so a value that does not fit is refused cleanly.
        let (words, coil) = match tag.area {
            Area::Holding if tag.bit.is_some() => (Vec::new(), coil_value(&cmd.value)?),
            Area::Holding => (encode_write(tag, &cmd.value)?, false),
            Area::Coil => (Vec::new(), coil_value(&cmd.value)?),
            Area::Input | Area::Discrete => return Err("input registers and discrete inputs cannot be written".into()),
        };
        if ctx.is_none() {
            let now = Instant::now();
            if now < *next_connect {
                let wait = next_connect.duration_since(now);
                return Err(format!("device unreachable; reconnecting in {:.1}s, not written", wait.as_secs_f64()));
            }
            match self.connect().await {
                Ok(c) => {
                    self.stats.connects.inc();
                    *ctx = Some(c);
                }
                Err(e) => {
                    self.stats.connect_failures.inc();
                    *failures += 1;
                    *next_connect = Instant::now() + backoff(*failures);
                    return Err(format!("device unreachable: {e}"));
                }
            }
        }
        if self.write_function == WriteFunction::Single && words.len() > 1 {
            return Err(format!(
                "write_function = \"single\" writes one register, and a {:?} takes {}; use \"auto\" or \"multiple\"",
                tag.ty,
                words.len()
            ));
        }
        let Some(c) = ctx.as_mut() else { return Err("device unreachable".into()) };
        self.pace().await;
        let fut = async {
            match tag.area {
                Area::Coil => c.write_single_coil(tag.address, coil).await,
                Area::Holding if tag.bit.is_some() => {
                    // Function 22 changes the one bit in the device itself: no read-modify-write
                    // race with the PLC's own program.
                    let mask = 1u16 << tag.bit.unwrap_or(0);
                    c.masked_write_register(tag.address, !mask, if coil { mask } else { 0 }).await
                }
                Area::Holding => match (self.write_function, words.len()) {
                    (WriteFunction::Auto | WriteFunction::Single, 1) => {
                        c.write_single_register(tag.address, words[0]).await
                    }
                    _ => c.write_multiple_registers(tag.address, &words).await,
                },
                Area::Input | Area::Discrete => Ok(Err(ExceptionCode::IllegalFunction)),
            }
        };
        let link_failed = |ctx: &mut Option<Context>, failures: &mut u32, next_connect: &mut Instant| {
            *ctx = None;
            *failures += 1;
            *next_connect = Instant::now() + backoff(*failures);
        };
        match time::timeout(self.timeout, fut).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(exc))) => Err(exception_text(exc)),
            Ok(Err(e)) => {
                link_failed(ctx, failures, next_connect);
                Err(format!("link failed: {e}"))
            }
            Err(_) => {
                link_failed(ctx, failures, next_connect);
                Err(format!("timeout after {:?}", self.timeout))
            }
        }
    }

    fn account_schedule(&self, scheduled: Instant, last: Option<Instant>) {
        self.stats.polls.inc();
        let delay = Instant::now().saturating_duration_since(scheduled);
        if delay > self.poll / 10 {
            self.stats.polls_late.inc();
        }
        if let Some(last) = last {
            let gap = scheduled.saturating_duration_since(last).as_nanos();
            let period = self.poll.as_nanos().max(1);
            let skipped = (gap / period).saturating_sub(1);
            if skipped > 0 {
                self.stats.polls_skipped.add(skipped as u64);
            }
        }
    }

    async fn connect(&self) -> Result<Context, String> {
        let stream = tcp_connect(&self.address, self.timeout).await?;
        if !self.connect_delay.is_zero() {
            time::sleep(self.connect_delay).await;
        }
        let stream = super::trace::Traced::new(stream, self.device.clone());
        Ok(if self.rtu_over_tcp {
            tokio_modbus::client::rtu::attach_slave(stream, Slave(self.unit_id))
        } else {
            tokio_modbus::client::tcp::attach_slave(stream, Slave(self.unit_id))
        })
    }

    async fn emit(&mut self, mut points: Vec<Point>) -> Result<(), ()> {
        let bad = points.iter().filter(|p| p.value.is_none()).count() as u64;
        self.stats.points_bad.add(bad);
        self.stats.points_good.add(points.len() as u64 - bad);
        if let Some(x) = &mut self.exceptions {
            x.filter(&mut points, std::time::Instant::now());
        }
        if points.is_empty() {
            return Ok(());
        }
        self.out.send(batch(points)).await.map_err(|_| ())
    }

    fn all_bad(&self, error: &str) -> Vec<Point> {
        let error: Arc<str> = Arc::from(error);
        let ts = now_ms();
        self.tags.iter().map(|t| Point::bad(t.key.clone(), error.clone(), ts)).collect()
    }

    /// Reads every request once. Returns the points and, if the link failed, why; after a link
    /// failure the remaining requests are not sent and their points are bad.
    async fn poll_once(&mut self, ctx: &mut Context) -> (Vec<Point>, Option<LinkError>) {
        let mut points = Vec::with_capacity(self.tags.len());
        let mut split: Vec<usize> = Vec::new();
        let mut link_error: Option<LinkError> = None;
        for (i, req) in self.plan.iter().enumerate() {
            if let Some(e) = &link_error {
                self.bad_points(req, &format!("not read: {e}"), &mut points);
                continue;
            }
            match self.read(ctx, req).await {
                Ok(Ok(data)) => self.decode(req, &data, &mut points),
                Ok(Err(exc)) if req.tags.len() > 1 => {
                    // A merged range may cover registers the device does not map. Read each tag on
                    // its own now, and keep them apart from now on.
                    debug!(start = req.start, count = req.count, %exc, "Merged read refused; splitting it per tag.");
                    split.push(i);
                    for single in split_request(req, &self.tags) {
                        if let Some(e) = &link_error {
                            self.bad_points(&single, &format!("not read: {e}"), &mut points);
                            continue;
                        }
                        match self.read(ctx, &single).await {
                            Ok(Ok(data)) => self.decode(&single, &data, &mut points),
                            Ok(Err(exc)) => self.bad_points(&single, &exception_text(exc), &mut points),
                            Err(e) => {
                                self.bad_points(&single, &e.to_string(), &mut points);
                                link_error = Some(e);
                            }
                        }
                    }
                }
                Ok(Err(exc)) => self.bad_points(req, &exception_text(exc), &mut points),
                Err(e) => {
                    self.bad_points(req, &e.to_string(), &mut points);
                    link_error = Some(e);
                }
            }
        }
        for i in split.into_iter().rev() {
            let req = self.plan.remove(i);
            let singles = split_request(&req, &self.tags);
            self.plan.splice(i..i, singles);
        }
        (points, link_error)
    }

    /// Waits out `request_delay` since the last request, then notes this one.
    async fn pace(&self) {
        if self.request_delay.is_zero() {
            return;
        }
        let last = *self.last_request.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wait) = last.and_then(|t| self.request_delay.checked_sub(t.elapsed())) {
            time::sleep(wait).await;
        }
        *self.last_request.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    async fn read(&self, ctx: &mut Context, req: &ReadRequest) -> Result<Result<Data, ExceptionCode>, LinkError> {
        self.pace().await;
        self.stats.requests.inc();
        let fut = async {
            Ok::<_, tokio_modbus::Error>(match req.area {
                Area::Coil => ctx.read_coils(req.start, req.count).await?.map(Data::Bits),
                Area::Discrete => ctx.read_discrete_inputs(req.start, req.count).await?.map(Data::Bits),
                Area::Holding => ctx.read_holding_registers(req.start, req.count).await?.map(Data::Words),
                Area::Input => ctx.read_input_registers(req.start, req.count).await?.map(Data::Words),
            })
        };
        let result = match time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(LinkError::Modbus(e)),
            Err(_) => Err(LinkError::Timeout(self.timeout)),
        };
        if !matches!(result, Ok(Ok(_))) {
            self.stats.request_errors.inc();
        }
        result
    }

    fn decode(&self, req: &ReadRequest, data: &Data, out: &mut Vec<Point>) {
        let ts = now_ms();
        for &i in &req.tags {
            let t = &self.tags[i];
            let at = usize::from(t.address - req.start);
            let value = match data {
                Data::Bits(bits) => bits.get(at).map(|b| crate::base::point::Value::Bool(*b)),
                Data::Words(words) => match t.bit {
                    Some(b) => words.get(at).map(|w| crate::base::point::Value::Bool(w >> b & 1 == 1)),
                    None => words.get(at..).and_then(|w| codec::decode(t.ty, t.order, w)),
                },
            };
            out.push(match value {
                Some(v) => Point::good(t.key.clone(), codec::apply_scale(v, t.scale, t.offset), ts),
                None => Point::bad(t.key.clone(), Arc::from("short response from device"), ts),
            });
        }
    }

    fn bad_points(&self, req: &ReadRequest, error: &str, out: &mut Vec<Point>) {
        let error: Arc<str> = Arc::from(error);
        let ts = now_ms();
        for &i in &req.tags {
            out.push(Point::bad(self.tags[i].key.clone(), error.clone(), ts));
        }
    }
}

/// The register words of a write: integers of integer tags without scale or offset are written
/// exactly (a u64 or i64 keeps every bit, no trip through f64); anything else goes through the
/// inverse scale as a float, range-checked by the codec.
fn encode_write(tag: &Tag, value: &serde_json::Value) -> Result<Vec<u16>, String> {
    let n = match value {
        serde_json::Value::Number(n) => n,
        serde_json::Value::Bool(b) => &serde_json::Number::from(u8::from(*b)),
        other => return Err(format!("value must be a number or a boolean, not {other}")),
    };
    let exact = tag.scale.is_none() && tag.offset.is_none() && !matches!(tag.ty, DataType::F32 | DataType::F64);
    let value = match (exact, n.as_i64(), n.as_u64()) {
        (true, Some(i), _) => Value::Int(i),
        (true, None, Some(u)) => Value::UInt(u),
        _ => {
            let f = n.as_f64().ok_or("value is not a number")?;
            Value::Float(codec::unapply_scale(f, tag.scale, tag.offset))
        }
    };
    codec::encode(tag.ty, tag.order, value).map_err(|e| e.to_string())
}

/// A TCP connection to a Modbus device within `timeout`, without Nagle's delay (Modbus is
/// strictly request/response with small frames: Nagle would only add latency).
pub(super) async fn tcp_connect(address: &str, timeout: Duration) -> Result<TcpStream, String> {
    let stream = match time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("timeout after {timeout:?}")),
    };
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// A coil takes `true`/`false` or `1`/`0`, nothing else.
pub(super) fn coil_value(value: &serde_json::Value) -> Result<bool, String> {
    match value {
        serde_json::Value::Bool(b) => Ok(*b),
        serde_json::Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        serde_json::Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        other => Err(format!("a coil takes true, false, 1 or 0, not {other}")),
    }
}

/// The next command, or never if the driver takes no commands.
async fn recv_command(rx: &mut Option<WriteRx>) -> Option<WriteCommand> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn split_request(req: &ReadRequest, tags: &[Tag]) -> Vec<ReadRequest> {
    req.tags
        .iter()
        .map(|&i| {
            let t = &tags[i];
            ReadRequest {
                area: t.area,
                start: t.address,
                count: if t.area.is_bit() { 1 } else { t.ty.registers() },
                tags: vec![i],
            }
        })
        .collect()
}

fn exception_text(exc: ExceptionCode) -> String {
    format!("modbus exception: {exc}")
}
