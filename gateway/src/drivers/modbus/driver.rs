//! A Modbus device: its tags, read plan, schedule, decoding, writes and backoff. The bytes go
//! through the device's link (`link.rs`), which it may share with other devices on the same line
//! or gateway.
//!
//! "The link failed" and "the device said no" are kept apart (tokio-modbus returns them as the
//! outer and inner `Result`): a timeout or transport error makes the device back off on its own
//! (the first time it retries at the next poll, then with jittered exponential backoff, skipping
//! polls meanwhile), so a dead slave is polled less and costs its line only its own timeouts; a
//! Modbus exception only marks the affected points bad. A merged request that draws an exception
//! is split into one request per tag from then on, so a single unmapped register in a gap does
//! not blind its neighbours.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_modbus::ExceptionCode;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::codec::{self, Area, ByteOrder, DataType};
use super::config::{ModbusDevice, WriteFunction};
use super::link::{Caller, Data, LinkError, LinkHandle, Op};
use super::planner::{self, Limits, ReadRequest, Span};
use crate::backoff::backoff;
use crate::base::point::{now_ms, Point, Registry, TagKey, Value};
use crate::config::Access;
use crate::drivers::report::Exceptions;
use crate::drivers::{recv_command, WriteCommand, WriteRx};
use crate::hub::BusSender;
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
    /// Registers (or bits) the tag spans.
    len: u16,
}

pub struct ModbusDriver {
    device: Arc<str>,
    driver: &'static str,
    link: LinkHandle,
    caller: Caller,
    poll: Duration,
    tags: Vec<Tag>,
    plan: Vec<ReadRequest>,
    stats: Arc<DeviceStats>,
    out: BusSender,
    commands: Option<WriteRx>,
    /// Report by exception, if any tag asks for it.
    exceptions: Option<Exceptions>,
    write_function: WriteFunction,
    /// Failures in a row and when the device may be tried again.
    failures: u32,
    next_try: Instant,
}

impl ModbusDriver {
    pub fn new(
        name: &str,
        cfg: &ModbusDevice,
        link: LinkHandle,
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
                // The device's default order is for its 32/64-bit numbers, not its text.
                order: match t.data_type() {
                    DataType::String => t.order.unwrap_or_default(),
                    _ => t.order.unwrap_or(cfg.order),
                },
                scale: t.scale,
                offset: t.offset,
                bit: t.bit,
                len: if t.area.is_bit() { 1 } else { t.registers() },
            })
            .collect();
        let spans: Vec<Span> = tags.iter().map(|t| Span { area: t.area, address: t.address, len: t.len }).collect();
        let limits =
            Limits { max_gap: cfg.max_read_gap, max_registers: cfg.max_read_registers, max_bits: cfg.max_read_bits };
        let mut plan = planner::plan(&spans, limits);
        if cfg.single_register_reads {
            plan = plan.iter().flat_map(|r| split_request(r, &tags)).collect();
        }
        let exceptions = Exceptions::for_tags(
            (cfg.publish, cfg.deadband, cfg.heartbeat),
            cfg.tags.iter().zip(&tags).map(|(t, tag)| (tag.key.id, (t.publish, t.deadband, t.heartbeat))),
        );
        // Stalled: no good read for two polls, or for one poll and a whole request timeout.
        stats.stall_after_ms.set((2 * cfg.poll.0).max(cfg.poll.0 + cfg.timeout.0).as_millis() as i64);
        let caller = Caller {
            unit: cfg.unit_id,
            timeout: cfg.timeout.0,
            delay: cfg.request_delay.map_or(Duration::ZERO, |d| d.0),
            connect_delay: cfg.connect_delay.map_or(Duration::ZERO, |d| d.0),
            stats: stats.clone(),
        };
        ModbusDriver {
            device: Arc::from(name),
            driver: cfg.kind.driver(),
            link,
            caller,
            poll: cfg.poll.0,
            tags,
            plan,
            stats,
            out,
            commands: None,
            exceptions,
            write_function: cfg.write_function,
            failures: 0,
            next_try: Instant::now(),
        }
    }

    /// Accepts write commands (from the cloud or the local broker) on this queue.
    pub fn with_commands(mut self, rx: WriteRx) -> Self {
        self.commands = Some(rx);
        self
    }

    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::error_span!("driver", device = %self.device, driver = self.driver);
        self.run_inner(cancel).instrument(span).await;
    }

    async fn run_inner(mut self, cancel: CancellationToken) {
        info!(
            link = %self.link.name(),
            unit = self.caller.unit,
            tags = self.tags.len(),
            requests = self.plan.len(),
            "Polling device."
        );
        let mut ticker = time::interval(self.poll);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut last_scheduled: Option<Instant> = None;
        let mut commands = self.commands.take();
        loop {
            let scheduled = tokio::select! {
                _ = cancel.cancelled() => break,
                t = ticker.tick() => t,
                Some(cmd) = recv_command(&mut commands) => {
                    let result = self.write(&cmd).await;
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
            if Instant::now() < self.next_try {
                // Backing off: a dead slave is polled less often, which gives its line back to
                // the other devices.
                continue;
            }
            let (points, link_error) = self.poll_once().await;
            if cancel.is_cancelled() {
                // Shutting down: the link may have stopped under this poll; nothing to report.
                break;
            }
            if self.emit(points).await.is_err() {
                break;
            }
            match link_error {
                Some(e) => {
                    self.failures += 1;
                    // The first failure retries at the next poll; repeated ones back off.
                    let wait = if self.failures > 1 { backoff(self.failures - 1) } else { Duration::ZERO };
                    if self.failures <= 2 || self.failures % 10 == 0 {
                        warn!(error = %e, retry_in = ?wait, failures = self.failures, "Device not answering.");
                    }
                    self.next_try = Instant::now() + wait;
                }
                None => {
                    if self.failures > 0 {
                        info!("Device answers again.");
                    }
                    self.failures = 0;
                }
            }
        }
        debug!("Driver stopped.");
    }

    /// Writes one tag. Refuses tags that are not `access = "rw"` and values that do not fit the
    /// tag's type. While the device is backing off the write is refused at once, and a write that
    /// gets no answer backs off like a poll: a burst of writes to an unreachable device costs one
    /// timeout, not one per write, so it cannot starve polling or the line.
    async fn write(&mut self, cmd: &WriteCommand) -> Result<(), String> {
        let tag = self
            .tags
            .iter()
            .find(|t| t.key.tag.as_ref() == cmd.tag.as_str())
            .ok_or_else(|| format!("unknown tag `{}`", cmd.tag))?;
        if tag.access != Access::Rw {
            return Err(format!("tag `{}` is read-only (set access = \"rw\" in its config to allow writes)", cmd.tag));
        }
        // Encode before touching the link, so a value that does not fit is refused cleanly.
        let op = match tag.area {
            Area::Coil => Op::WriteCoil { address: tag.address, on: coil_value(&cmd.value)? },
            Area::Holding if tag.bit.is_some() => {
                // Function 22 changes the one bit in the device itself: no read-modify-write race
                // with the PLC's own program.
                let mask = 1u16 << tag.bit.unwrap_or(0);
                let on = coil_value(&cmd.value)?;
                Op::MaskWrite { address: tag.address, and: !mask, or: if on { mask } else { 0 } }
            }
            Area::Holding => {
                let words = encode_write(tag, &cmd.value)?;
                match (self.write_function, words.len()) {
                    (WriteFunction::Auto | WriteFunction::Single, 1) => {
                        Op::WriteRegister { address: tag.address, word: words[0] }
                    }
                    (WriteFunction::Single, n) => {
                        return Err(format!(
                            "write_function = \"single\" writes one register, and a {:?} takes {n}; use \"auto\" or \"multiple\"",
                            tag.ty
                        ))
                    }
                    _ => Op::WriteRegisters { address: tag.address, words },
                }
            }
            Area::Input | Area::Discrete => return Err("input registers and discrete inputs cannot be written".into()),
        };
        let now = Instant::now();
        if now < self.next_try {
            let wait = self.next_try - now;
            return Err(format!("device unreachable; retrying in {:.1}s, not written", wait.as_secs_f64()));
        }
        match self.link.call(&self.caller, op).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(exc)) => Err(exception_text(exc)),
            Err(e) => {
                self.failures += 1;
                self.next_try = Instant::now() + backoff(self.failures);
                Err(match e {
                    LinkError::Modbus(e) => format!("link failed: {e}"),
                    e => e.to_string(),
                })
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

    async fn emit(&mut self, points: Vec<Point>) -> Result<(), ()> {
        crate::drivers::emit(points, &self.stats, &mut self.exceptions, &self.out).await
    }

    /// Reads every request once. Returns the points and, if the device or its link did not
    /// answer, why; after that the remaining requests are not sent and their points are bad.
    async fn poll_once(&mut self) -> (Vec<Point>, Option<LinkError>) {
        let mut points = Vec::with_capacity(self.tags.len());
        let mut split: Vec<usize> = Vec::new();
        let mut link_error: Option<LinkError> = None;
        for (i, req) in self.plan.iter().enumerate() {
            if let Some(e) = &link_error {
                self.bad_points(req, &format!("not read: {e}"), &mut points);
                continue;
            }
            match self.read(req).await {
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
                        match self.read(&single).await {
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

    async fn read(&self, req: &ReadRequest) -> Result<Result<Data, ExceptionCode>, LinkError> {
        self.link.call(&self.caller, Op::Read { area: req.area, start: req.start, count: req.count }).await
    }

    fn decode(&self, req: &ReadRequest, data: &Data, out: &mut Vec<Point>) {
        let ts = now_ms();
        for &i in &req.tags {
            let t = &self.tags[i];
            let at = usize::from(t.address - req.start);
            let value = match data {
                Data::Bits(bits) => bits.get(at).map(|b| Value::Bool(*b)),
                Data::Words(words) => match (t.bit, t.ty) {
                    (Some(b), _) => words.get(at).map(|w| Value::Bool(w >> b & 1 == 1)),
                    (None, DataType::String) => {
                        words.get(at..at + usize::from(t.len)).map(|w| codec::decode_string(t.order, w))
                    }
                    (None, _) => words.get(at..).and_then(|w| codec::decode(t.ty, t.order, w)),
                },
                Data::Written => None,
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
    if tag.ty == DataType::String {
        let serde_json::Value::String(text) = value else {
            return Err(format!("a string tag takes text (a JSON string), not {value}"));
        };
        return codec::encode_string(tag.order, text, tag.len).map_err(|e| e.to_string());
    }
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

/// A coil takes `true`/`false` or `1`/`0`, nothing else.
pub(super) fn coil_value(value: &serde_json::Value) -> Result<bool, String> {
    match value {
        serde_json::Value::Bool(b) => Ok(*b),
        serde_json::Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        serde_json::Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        other => Err(format!("a coil takes true, false, 1 or 0, not {other}")),
    }
}

fn split_request(req: &ReadRequest, tags: &[Tag]) -> Vec<ReadRequest> {
    req.tags
        .iter()
        .map(|&i| {
            let t = &tags[i];
            ReadRequest { area: t.area, start: t.address, count: t.len, tags: vec![i] }
        })
        .collect()
}

fn exception_text(exc: ExceptionCode) -> String {
    format!("modbus exception: {exc}")
}
