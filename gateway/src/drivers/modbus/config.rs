//! The Modbus driver's config: the `[devices.NAME]` keys of `driver = "modbus-tcp"`,
//! `"modbus-rtu-tcp"` and `"modbus-rtu"`, their tags, the `[simulators.NAME]` keys of the Modbus
//! simulators, and the checks serde cannot express (one device's, and those across the devices
//! that share a link). Each doc comment is the reference for its key; `configs/gateway.toml`
//! shows them all.

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::Deserialize;

use super::codec::{Area, ByteOrder, DataType};
use crate::config::validate::{key, name_problem, with, Found, Seg};
use crate::config::{Access, Dur};
use crate::drivers::report::{Deadband, Publish};
use crate::drivers::wave::Shape;
pub use crate::drivers::wave::Wave;

/// `driver = "modbus-tcp"`, `"modbus-rtu-tcp"` or `"modbus-rtu"`: one device (one unit id).
/// Devices naming the same `address` or `port` share one link, which serves them in turn.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    /// Which of the three the `driver` key chose; set by the loader.
    #[serde(skip)]
    pub kind: Kind,
    /// `host:port` of the Modbus TCP server or gateway, or of the serial device server (TCP
    /// drivers only).
    #[serde(default)]
    pub address: String,
    /// The serial port of a `modbus-rtu` device, e.g. `/dev/ttyUSB0` (or a stable
    /// `/dev/serial/by-id/…` name, which survives replugging).
    pub port: Option<String>,
    /// Line speed of a `modbus-rtu` port; default 9600.
    pub baud: Option<u32>,
    /// `"none"` (default), `"even"` or `"odd"`.
    pub parity: Option<Parity>,
    /// 7 or 8 (default).
    pub data_bits: Option<u8>,
    /// 1 (default) or 2.
    pub stop_bits: Option<u8>,
    /// Modbus unit identifier (slave address), 1–247 on a serial line; over Modbus TCP also 0,
    /// and 255 to address a TCP device directly.
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// How often to read every tag.
    #[serde(default = "default_poll")]
    pub poll: Dur,
    /// How long to wait for one response (and for the TCP connection).
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Default byte order for the device's 32/64-bit tags.
    #[serde(default)]
    pub order: ByteOrder,
    /// Registers (or bits ÷ 16) that may be read in between two tags to merge them into one request.
    #[serde(default = "default_max_read_gap")]
    pub max_read_gap: u16,
    /// Largest register count in one read request (the protocol allows 125).
    #[serde(default = "default_max_read_registers")]
    pub max_read_registers: u16,
    /// Largest bit count in one coil or discrete-input read (the protocol allows 2000).
    #[serde(default = "default_max_read_bits")]
    pub max_read_bits: u16,
    /// Read every tag with a request of its own, never merged with its neighbours (for devices
    /// that refuse reads spanning several tags).
    #[serde(default)]
    pub single_register_reads: bool,
    /// Which function writes holding registers: `"auto"` (06 for one register, 16 for more),
    /// `"single"` (06 only: values of one register) or `"multiple"` (16 always, for devices
    /// without function 06).
    #[serde(default)]
    pub write_function: WriteFunction,
    /// Pause between two requests to the device (slow serial gateways, devices that drop
    /// back-to-back frames).
    #[serde(default)]
    pub request_delay: Option<Dur>,
    /// Pause after connecting before the first request (devices that need a moment after accept).
    #[serde(default)]
    pub connect_delay: Option<Dur>,
    /// How the tags' `address`es count: `0` (default, the wire's 0-based offsets) or `1` (register
    /// numbers as most device manuals print them: 1 is offset 0). With `1`, the 5-digit form is
    /// accepted too: 40001 is holding register 1, 30001 input register 1, 10001 discrete input 1.
    #[serde(default)]
    pub address_base: u8,
    /// Report by exception for the device's tags (each tag may override): `"always"` (default) or
    /// `"on-change"`.
    pub publish: Option<Publish>,
    /// With on-change: how far a number must move to be published again, absolute (`0.5`) or a
    /// percentage of the last published value (`"2%"`). Setting it implies on-change.
    pub deadband: Option<Deadband>,
    /// With on-change: publish an unchanged value again this often. Setting it implies on-change.
    pub heartbeat: Option<Dur>,
    /// Tags in a CSV file (relative to the config file), one per row, the tag keys as column
    /// names (`name,area,address,type,order,scale,offset,unit,access,bit,publish,deadband,heartbeat`;
    /// an empty cell leaves a key out). Added after the inline `tags`.
    pub tags_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub tags: Vec<ModbusTag>,
    /// Where each tag read from `tags_file` came from, for locating problems in it.
    #[serde(skip)]
    pub tag_origins: Vec<CsvOrigin>,
}

/// A CSV row: its file, line, and the column where each of its fields starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOrigin {
    pub file: std::path::PathBuf,
    pub line: usize,
    pub columns: std::collections::BTreeMap<String, usize>,
}

/// A problem in a CSV file: file, line, column, message.
pub type CsvProblem = (std::path::PathBuf, usize, usize, String);

/// Which Modbus driver a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    Tcp,
    RtuOverTcp,
    Rtu,
}

impl Kind {
    pub fn driver(self) -> &'static str {
        match self {
            Kind::Tcp => "modbus-tcp",
            Kind::RtuOverTcp => "modbus-rtu-tcp",
            Kind::Rtu => "modbus-rtu",
        }
    }
}

/// `parity` of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// A serial line's settings (`Default`: no port, 9600 8N1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLine {
    pub port: String,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

impl Default for SerialLine {
    fn default() -> Self {
        SerialLine { port: String::new(), baud: 9600, parity: Parity::None, data_bits: 8, stop_bits: 1 }
    }
}

impl SerialLine {
    /// Bits on the wire per character: start, data, parity, stop.
    pub fn char_bits(&self) -> u32 {
        1 + u32::from(self.data_bits) + u32::from(self.parity != Parity::None) + u32::from(self.stop_bits)
    }

    /// The silent interval that ends an RTU frame: 3.5 characters, fixed at 1.75 ms above 19200
    /// baud (Modbus over serial line, 2.5.1.1).
    pub fn frame_gap(&self) -> std::time::Duration {
        if self.baud > 19_200 {
            return std::time::Duration::from_micros(1750);
        }
        std::time::Duration::from_secs_f64(3.5 * f64::from(self.char_bits()) / f64::from(self.baud.max(1)))
    }
}

/// How a device's frames reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    Tcp { address: String },
    RtuOverTcp { address: String },
    Serial(SerialLine),
}

impl Framing {
    pub fn name(&self) -> &'static str {
        match self {
            Framing::Tcp { .. } => "modbus-tcp",
            Framing::RtuOverTcp { .. } => "modbus-rtu-tcp",
            Framing::Serial(_) => "modbus-rtu",
        }
    }

    pub fn is_serial(&self) -> bool {
        matches!(self, Framing::Serial(_))
    }

    /// The quiet time between two frames on the line.
    pub fn frame_gap(&self) -> std::time::Duration {
        match self {
            Framing::Serial(line) => line.frame_gap(),
            _ => std::time::Duration::ZERO,
        }
    }
}

impl ModbusDevice {
    /// The device's framing and where it goes.
    pub fn framing(&self) -> Framing {
        match self.kind {
            Kind::Tcp => Framing::Tcp { address: self.address.clone() },
            Kind::RtuOverTcp => Framing::RtuOverTcp { address: self.address.clone() },
            Kind::Rtu => Framing::Serial(SerialLine {
                port: self.port.clone().unwrap_or_default(),
                baud: self.baud.unwrap_or(9600),
                parity: self.parity.unwrap_or_default(),
                data_bits: self.data_bits.unwrap_or(8),
                stop_bits: self.stop_bits.unwrap_or(1),
            }),
        }
    }

    /// What names the device's link: devices with the same key share one connection.
    pub fn link_key(&self) -> String {
        match self.kind {
            Kind::Rtu => self.port.clone().unwrap_or_default(),
            Kind::Tcp | Kind::RtuOverTcp => self.address.clone(),
        }
    }

    /// Reads `tags_file` (relative paths against `base`) and appends its tags. Every problem is
    /// returned, located in the CSV.
    pub fn load_tags_file(&mut self, base: &std::path::Path) -> Vec<CsvProblem> {
        let Some(rel) = self.tags_file.clone() else { return Vec::new() };
        let path = if rel.is_relative() { base.join(&rel) } else { rel };
        self.tags_file = Some(path.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => return vec![(path.clone(), 0, 0, format!("cannot read the tags file: {e}"))],
        };
        let mut problems = Vec::new();
        let mut reader =
            csv::ReaderBuilder::new().trim(csv::Trim::All).comment(Some(b'#')).from_reader(text.as_bytes());
        let headers = match reader.headers() {
            Ok(h) => h.clone(),
            Err(e) => return vec![(path.clone(), 1, 1, format!("cannot read the header row: {e}"))],
        };
        let line_col = |offset: usize| {
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let start = before.rfind('\n').map_or(0, |i| i + 1);
            (line, text[start..offset.min(text.len())].chars().count() + 1)
        };
        for record in reader.records() {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    let (line, col) = e.position().map_or((0, 0), |p| line_col(p.byte() as usize));
                    problems.push((path.clone(), line, col, e.to_string()));
                    continue;
                }
            };
            let row_start = record.position().map_or(0, |p| p.byte() as usize);
            // Field offsets inside the record are of its unescaped text; close enough for a column.
            let col_of = |i: usize| {
                let at = record.range(i).map_or(0, |r| r.start);
                let raw_line = &text[row_start..];
                // Find the field's text in the raw line to point at its real column.
                let field = record.get(i).unwrap_or_default();
                let pos = if field.is_empty() { at } else { raw_line.find(field).unwrap_or(at) };
                line_col(row_start + pos)
            };
            let (line, _) = line_col(row_start);
            match record.deserialize::<ModbusTag>(Some(&headers)) {
                Ok(tag) => {
                    let columns = headers.iter().enumerate().map(|(i, h)| (h.to_owned(), col_of(i).1)).collect();
                    self.tags.push(tag);
                    self.tag_origins.push(CsvOrigin { file: path.clone(), line, columns });
                }
                Err(e) => {
                    let field = match e.kind() {
                        csv::ErrorKind::Deserialize { err, .. } => err.field(),
                        _ => None,
                    };
                    let message = match e.kind() {
                        csv::ErrorKind::Deserialize { err, .. } => err.kind().to_string(),
                        _ => e.to_string(),
                    };
                    // serde does not always say which field; the value it quotes finds the cell.
                    let quoted = message.split('`').nth(1).filter(|q| !q.is_empty());
                    let cell =
                        field.map(|f| f as usize).or_else(|| quoted.and_then(|q| record.iter().position(|c| c == q)));
                    let (l, c) = cell.map_or((line, 1), col_of);
                    problems.push((path.clone(), l, c, message));
                }
            }
        }
        problems
    }

    /// The CSV position of a problem about `tags[index].field`, if that tag came from the CSV.
    pub fn locate(&self, index: usize, field: Option<&str>) -> Option<(std::path::PathBuf, usize, usize)> {
        let inline = self.tags.len() - self.tag_origins.len();
        let o = self.tag_origins.get(index.checked_sub(inline)?)?;
        let col = field.and_then(|f| o.columns.get(f).copied()).unwrap_or(1);
        Some((o.file.clone(), o.line, col))
    }
}

/// `write_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteFunction {
    #[default]
    Auto,
    Single,
    Multiple,
}

const fn default_unit_id() -> u8 {
    1
}
const fn default_poll() -> Dur {
    Dur::from_millis(1000)
}
const fn default_timeout() -> Dur {
    Dur::from_millis(1000)
}
const fn default_max_read_gap() -> u16 {
    8
}
const fn default_max_read_registers() -> u16 {
    125
}
const fn default_max_read_bits() -> u16 {
    2000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTag {
    /// The tag's name, unique in its device; the last segment of its topic.
    pub name: String,
    pub area: Area,
    /// 0-based register (or bit) offset.
    pub address: u16,
    /// Defaults to `bool` for coils and discrete inputs (and for a `bit`), `u16` for registers.
    /// `string` is text of `length` registers.
    #[serde(rename = "type")]
    pub data_type: Option<DataType>,
    /// A `string`'s size in registers (two characters each); the text ends at the first NUL and
    /// trailing spaces are trimmed. Its `order` is `"ABCD"` (first character in the high byte, the
    /// default) or `"BADC"` (in the low byte).
    pub length: Option<u16>,
    /// One bit (0 = least significant … 15) of a holding or input register, read as a bool and
    /// written with a masked write (function 22), which leaves the other bits alone.
    pub bit: Option<u8>,
    /// Byte order for 32/64-bit types; defaults to the device's `order`.
    pub order: Option<ByteOrder>,
    /// Published value = raw × scale + offset.
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    /// Engineering unit, carried as metadata.
    pub unit: Option<String>,
    #[serde(default)]
    pub access: Access,
    /// Report by exception for this tag, over the device's `publish`, `deadband` and `heartbeat`.
    pub publish: Option<Publish>,
    pub deadband: Option<Deadband>,
    pub heartbeat: Option<Dur>,
}

impl ModbusTag {
    pub fn data_type(&self) -> DataType {
        self.data_type.unwrap_or(if self.area.is_bit() || self.bit.is_some() { DataType::Bool } else { DataType::U16 })
    }

    /// How many registers (or bits) the tag spans.
    pub fn registers(&self) -> u16 {
        match self.data_type() {
            DataType::String => self.length.unwrap_or(1).max(1),
            ty => ty.registers(),
        }
    }

    /// The 0-based offset on the wire, given the device's `address_base`.
    pub fn wire_address(&self, base: u8) -> Result<u16, String> {
        wire_address(self.area, self.address, base)
    }
}

/// The 0-based offset on the wire of a configured address. With base 1, `n` is register `n`
/// (offset `n - 1`), and `4xxxx`-style numbers are accepted for the area they name.
pub fn wire_address(area: Area, address: u16, base: u8) -> Result<u16, String> {
    let prefix: u16 = match area {
        Area::Coil => 0,
        Area::Discrete => 1,
        Area::Input => 3,
        Area::Holding => 4,
    };
    if base == 0 {
        if address > 10_000 && address / 10_000 == prefix && prefix != 0 {
            let offset = address - prefix * 10_000 - 1;
            return Err(format!(
                "{address} looks like a register number in the {prefix}xxxx style (offset {offset}); set \
                 address_base = 1 on the device, or write the 0-based offset {offset}"
            ));
        }
        return Ok(address);
    }
    let n = if address > 10_000 && address / 10_000 == prefix && prefix != 0 {
        address - prefix * 10_000
    } else if address > 10_000 {
        let named = address / 10_000;
        return Err(format!(
            "{address} is a {named}xxxx-style number, which names another area than `{}`",
            area_name(area)
        ));
    } else {
        address
    };
    if n == 0 {
        return Err("with address_base = 1 registers are numbered from 1".into());
    }
    Ok(n - 1)
}

/// `kind = "modbus-tcp"`, `"modbus-rtu-tcp"` or `"modbus-rtu"`: a Modbus slave with registers
/// that follow waveforms, on a TCP `listen` address or, for `modbus-rtu`, a serial `port`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSimulator {
    /// Which framing the `kind` key chose; set by the loader.
    #[serde(skip)]
    pub kind: Kind,
    /// Where a TCP simulator listens (port 0: any free port).
    pub listen: Option<SocketAddr>,
    /// The serial port of a `modbus-rtu` simulator (one end of a virtual pair, or a real port
    /// wired to the gateway's).
    pub port: Option<String>,
    /// Its line speed; default 9600 (8N1).
    pub baud: Option<u32>,
    /// The unit id a `modbus-rtu` simulator answers as; requests to other units get no answer,
    /// as on a shared line. Default 1.
    pub unit_id: Option<u8>,
    /// How often waveforms advance.
    #[serde(default = "crate::drivers::wave::default_update")]
    pub update: Dur,
    /// Answer reads of unconfigured addresses with exception 2 (illegal data address) instead of 0.
    #[serde(default)]
    pub strict: bool,
    pub registers: Vec<SimRegister>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimRegister {
    pub area: Area,
    pub address: u16,
    #[serde(rename = "type")]
    pub data_type: Option<DataType>,
    #[serde(default)]
    pub order: ByteOrder,
    #[serde(default = "crate::drivers::wave::default_wave")]
    pub wave: Wave,
    /// The value of a `constant` register (and the start of a `random-walk`).
    #[serde(default)]
    pub value: f64,
    #[serde(default)]
    pub min: f64,
    #[serde(default = "crate::drivers::wave::default_max")]
    pub max: f64,
    /// Period of `ramp`, `sine` and `square`.
    #[serde(default = "crate::drivers::wave::default_period")]
    pub period: Dur,
    /// Largest change per update of a `random-walk`.
    #[serde(default = "crate::drivers::wave::default_step")]
    pub step: f64,
    /// The text of a `type = "string"` register (constant).
    pub text: Option<String>,
    /// A string's size in registers.
    pub length: Option<u16>,
}

impl SimRegister {
    pub fn shape(&self) -> Shape {
        Shape {
            wave: self.wave,
            value: self.value,
            min: self.min,
            max: self.max,
            period: self.period.0,
            step: self.step,
        }
    }

    pub fn data_type(&self) -> DataType {
        self.data_type.unwrap_or(if self.area.is_bit() { DataType::Bool } else { DataType::U16 })
    }
}

/// The checks of one Modbus device; `base` is its key path.
pub fn validate_device(d: &ModbusDevice, base: Vec<Seg>, found: &mut Found) {
    let driver = d.kind.driver();
    if d.kind == Kind::Rtu {
        if !d.address.is_empty() {
            found.push((
                with(base.clone(), [key("address")]),
                "a modbus-rtu device names its serial `port`, not an `address` (for a serial device server \
                 reached over TCP, use driver = \"modbus-rtu-tcp\")"
                    .into(),
            ));
        }
        match &d.port {
            Some(p) if !p.is_empty() => {}
            _ => found.push((base.clone(), "a modbus-rtu device needs `port`, e.g. port = \"/dev/ttyUSB0\"".into())),
        }
        if d.baud.is_some_and(|b| !(300..=4_000_000).contains(&b)) {
            found.push((with(base.clone(), [key("baud")]), "must be between 300 and 4000000".into()));
        }
        if d.data_bits.is_some_and(|b| b != 7 && b != 8) {
            found.push((with(base.clone(), [key("data_bits")]), "must be 7 or 8".into()));
        }
        if d.stop_bits.is_some_and(|b| b != 1 && b != 2) {
            found.push((with(base.clone(), [key("stop_bits")]), "must be 1 or 2".into()));
        }
    } else {
        for (k, set) in [
            ("port", d.port.is_some()),
            ("baud", d.baud.is_some()),
            ("parity", d.parity.is_some()),
            ("data_bits", d.data_bits.is_some()),
            ("stop_bits", d.stop_bits.is_some()),
        ] {
            if set {
                found.push((
                    with(base.clone(), [key(k)]),
                    format!("`{k}` is a serial line setting: it belongs to driver = \"modbus-rtu\", not \"{driver}\""),
                ));
            }
        }
        match d.address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
            _ if d.address.is_empty() => found.push((
                base.clone(),
                format!("a {driver} device needs `address`, e.g. address = \"192.168.1.10:502\""),
            )),
            _ => found.push((
                with(base.clone(), [key("address")]),
                format!("address `{}` must be host:port, e.g. \"192.168.1.10:502\"", d.address),
            )),
        }
    }
    if d.kind != Kind::Tcp && !(1..=247).contains(&d.unit_id) {
        found.push((
            with(base.clone(), [key("unit_id")]),
            "must be 1..247 on a serial line (0 is broadcast, which no slave answers)".into(),
        ));
    }
    if d.poll.0.is_zero() {
        found.push((with(base.clone(), [key("poll")]), "must be longer than 0s".into()));
    }
    if d.timeout.0.is_zero() {
        found.push((with(base.clone(), [key("timeout")]), "must be longer than 0s".into()));
    }
    if !(1..=125).contains(&d.max_read_registers) {
        found.push((with(base.clone(), [key("max_read_registers")]), "must be between 1 and 125".into()));
    }
    if !(1..=2000).contains(&d.max_read_bits) {
        found.push((with(base.clone(), [key("max_read_bits")]), "must be between 1 and 2000".into()));
    }
    if d.tags.is_empty() {
        found.push((with(base.clone(), [key("tags")]), "a device needs at least one tag".into()));
    }
    let explicit_always = |p: Option<Publish>, d: Option<Deadband>, h: Option<Dur>| {
        p == Some(Publish::Always) && (d.is_some() || h.is_some())
    };
    if explicit_always(d.publish, d.deadband, d.heartbeat) {
        found
            .push((with(base.clone(), [key("publish")]), "deadband and heartbeat need publish = \"on-change\"".into()));
    }
    for (k, v) in [("request_delay", d.request_delay), ("connect_delay", d.connect_delay)] {
        if v.is_some_and(|v| v.0 > std::time::Duration::from_secs(10)) {
            found.push((with(base.clone(), [key(k)]), "must be at most 10s".into()));
        }
    }
    if d.address_base > 1 {
        found.push((with(base.clone(), [key("address_base")]), "must be 0 or 1".into()));
    }
    if d.heartbeat.is_some_and(|h| h.0 < std::time::Duration::from_millis(100)) {
        found.push((with(base.clone(), [key("heartbeat")]), "must be at least 100ms".into()));
    }
    let mut names = HashSet::new();
    for (i, t) in d.tags.iter().enumerate() {
        let tp = with(base.clone(), [key("tags"), Seg::Index(i)]);
        if let Some(p) = name_problem(&t.name) {
            found.push((with(tp.clone(), [key("name")]), format!("tag name `{}` {p}", t.name)));
        }
        if explicit_always(t.publish, t.deadband, t.heartbeat) {
            found.push((
                with(tp.clone(), [key("publish")]),
                "deadband and heartbeat need publish = \"on-change\"".into(),
            ));
        }
        if !names.insert(t.name.as_str()) {
            found.push((with(tp.clone(), [key("name")]), format!("duplicate tag name `{}` in this device", t.name)));
        }
        let ty = t.data_type();
        let wire = match t.wire_address(d.address_base) {
            Ok(a) => a,
            Err(e) => {
                found.push((with(tp.clone(), [key("address")]), e));
                t.address
            }
        };
        if let Some(bit) = t.bit {
            if t.area.is_bit() || ty != DataType::Bool || bit > 15 {
                found.push((
                    with(tp.clone(), [key("bit")]),
                    "bit = 0..15 picks one bit of a holding or input register, as type = \"bool\"".into(),
                ));
            }
        }
        if t.area.is_bit() && ty != DataType::Bool {
            found.push((
                with(tp.clone(), [key("type")]),
                format!("area `{}` holds single bits: use type = \"bool\" or a register area", area_name(t.area)),
            ));
        }
        if ty == DataType::String {
            match t.length {
                None => found.push((
                    with(tp.clone(), [key("type")]),
                    "a string needs `length`, its size in registers (two characters each)".into(),
                )),
                Some(n) if n == 0 || n > d.max_read_registers.min(123) => found.push((
                    with(tp.clone(), [key("length")]),
                    format!("must be 1..{} registers (one read, one write)", d.max_read_registers.min(123)),
                )),
                Some(_) => {}
            }
            if t.area.is_bit() {
                found.push((with(tp.clone(), [key("type")]), "a string lives in holding or input registers".into()));
            }
            if t.order.is_some_and(|o| !matches!(o, ByteOrder::ABCD | ByteOrder::BADC)) {
                found.push((
                    with(tp.clone(), [key("order")]),
                    "a string's order is \"ABCD\" (first character in the high byte) or \"BADC\" (in the low byte)"
                        .into(),
                ));
            }
            if t.scale.is_some() || t.offset.is_some() || t.deadband.is_some() {
                found.push((with(tp.clone(), [key("type")]), "a string has no scale, offset or deadband".into()));
            }
        } else if t.length.is_some() {
            found.push((with(tp.clone(), [key("length")]), "`length` is for type = \"string\"".into()));
        }
        if u32::from(wire) + u32::from(t.registers()) > 65536 {
            found.push((
                with(tp.clone(), [key("address")]),
                format!("a {ty:?} at {} runs past address 65535", t.address).to_lowercase(),
            ));
        }
        if ty == DataType::Bool && (t.scale.is_some() || t.offset.is_some()) {
            found.push((with(tp.clone(), [key("scale")]), "a bool tag cannot have scale or offset".into()));
        }
        if t.scale == Some(0.0) {
            found.push((with(tp.clone(), [key("scale")]), "scale 0 would make every reading 0".into()));
        }
        if t.access == Access::Rw && !t.area.is_writable() {
            found.push((
                with(tp, [key("access")]),
                format!(
                    "area `{}` is read-only in Modbus; only coil and holding tags can be \"rw\"",
                    area_name(t.area)
                ),
            ));
        }
    }
}

/// The checks of one `kind = "modbus-tcp"` simulator (its name and listen address are checked with
/// the others').
pub fn validate_simulator(s: &ModbusSimulator, base: Vec<Seg>, found: &mut Found) {
    if s.kind == Kind::Rtu {
        if s.port.as_deref().is_none_or(str::is_empty) {
            found.push((base.clone(), "a modbus-rtu simulator needs `port`".into()));
        }
        if s.listen.is_some() {
            found.push((with(base.clone(), [key("listen")]), "a modbus-rtu simulator serves a serial `port`".into()));
        }
        if s.unit_id.is_some_and(|u| !(1..=247).contains(&u)) {
            found.push((with(base.clone(), [key("unit_id")]), "must be 1..247".into()));
        }
    } else {
        if s.listen.is_none() {
            found.push((base.clone(), "a TCP simulator needs `listen`, e.g. listen = \"127.0.0.1:5020\"".into()));
        }
        for (k, set) in [("port", s.port.is_some()), ("baud", s.baud.is_some()), ("unit_id", s.unit_id.is_some())] {
            if set {
                found.push((with(base.clone(), [key(k)]), format!("`{k}` is for kind = \"modbus-rtu\"")));
            }
        }
    }
    if s.update.0.is_zero() {
        found.push((with(base.clone(), [key("update")]), "must be longer than 0s".into()));
    }
    let mut used: HashSet<(Area, u16)> = HashSet::new();
    for (i, r) in s.registers.iter().enumerate() {
        let rp = with(base.clone(), [key("registers"), Seg::Index(i)]);
        let ty = r.data_type();
        if r.area.is_bit() && ty != DataType::Bool {
            found.push((
                with(rp.clone(), [key("type")]),
                format!("area `{}` holds single bits: use type = \"bool\"", area_name(r.area)),
            ));
        }
        let size = if ty == DataType::String { r.length.unwrap_or(1).max(1) } else { ty.registers() };
        if ty == DataType::String {
            let text = r.text.as_deref().unwrap_or_default();
            match r.length {
                Some(n) if (1..=123).contains(&n) && text.len() <= 2 * usize::from(n) => {}
                Some(n) if (1..=123).contains(&n) => found.push((
                    with(rp.clone(), [key("text")]),
                    format!("{} bytes do not fit length = {n} registers ({} bytes)", text.len(), 2 * n),
                )),
                _ => found.push((
                    with(rp.clone(), [key("length")]),
                    "a string register needs length = 1..123 (registers, two characters each)".into(),
                )),
            }
            if r.wave != Wave::Constant || r.area.is_bit() {
                found
                    .push((with(rp.clone(), [key("type")]), "a string is a constant holding or input register".into()));
            }
        } else if r.text.is_some() || r.length.is_some() {
            found.push((with(rp.clone(), [key("text")]), "`text` and `length` are for type = \"string\"".into()));
        }
        if u32::from(r.address) + u32::from(size) > 65536 {
            found.push((with(rp.clone(), [key("address")]), "runs past address 65535".into()));
        }
        for a in 0..size {
            if !used.insert((r.area, r.address.wrapping_add(a))) {
                found.push((
                    with(rp.clone(), [key("address")]),
                    format!("overlaps another register at address {}", r.address.wrapping_add(a)),
                ));
                break;
            }
        }
        if r.min > r.max {
            found.push((with(rp.clone(), [key("min")]), "min must not exceed max".into()));
        }
        if r.period.0.is_zero() {
            found.push((with(rp, [key("period")]), "must be longer than 0s".into()));
        }
    }
}

fn area_name(a: Area) -> &'static str {
    match a {
        Area::Coil => "coil",
        Area::Discrete => "discrete",
        Area::Input => "input",
        Area::Holding => "holding",
    }
}

/// The checks across the Modbus devices that share a link (one address or port): one framing and
/// one set of line settings per link. Several devices may name the same unit id: one slave's
/// register map split into several devices.
pub fn validate_links<'a>(devices: impl Iterator<Item = (&'a str, &'a ModbusDevice)>, found: &mut Found) {
    let mut first: std::collections::HashMap<String, (&str, &ModbusDevice)> = std::collections::HashMap::new();
    for (name, d) in devices {
        let link = d.link_key();
        if link.is_empty() {
            continue;
        }
        let base = crate::config::validate::path(&["devices", name]);
        match first.get(&link) {
            None => {
                first.insert(link.clone(), (name, d));
            }
            Some((other, o)) if o.kind != d.kind => found.push((
                with(base, [key("driver")]),
                format!(
                    "device `{other}` reaches {link} with driver \"{}\": one link speaks one framing",
                    o.kind.driver()
                ),
            )),
            Some((other, o)) if o.framing() != d.framing() => found.push((
                with(base, [key("baud")]),
                format!(
                    "device `{other}` sets {link} up differently (baud, parity, data_bits and stop_bits are the \
                     line's, so every device on it must agree)"
                ),
            )),
            Some(_) => {}
        }
    }
}
