//! Southbound drivers: each turns a device's protocol into `Point`s on the internal bus.
//!
//! This file is the one dispatch point: `DeviceConfig` and `SimulatorConfig` name every driver and
//! simulator, and their methods hand each variant to its own folder. A driver owns its config
//! types, their checks, its polling task and its simulator (`modbus/`). Adding a driver is a
//! folder beside `modbus/`, a variant and one arm per method here, and one line in the loader's
//! `driver` dispatch (`config/load.rs`).

pub mod modbus;
pub mod opcua;
pub mod report;
pub mod wave;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::base::point::Registry;
use crate::config::validate::{Found, Seg};
use crate::hub::BusSender;
use crate::metrics::DeviceStats;

/// One southbound device; the variant is chosen by the table's `driver` key.
#[derive(Debug, Clone)]
pub enum DeviceConfig {
    /// `modbus-tcp`, `modbus-rtu-tcp` (RTU frames over TCP, for serial device servers) and
    /// `modbus-rtu` (a serial port): one driver, three framings (`ModbusDevice::kind`).
    Modbus(modbus::ModbusDevice),
    /// `opcua`: one server, one session.
    Opcua(opcua::OpcuaDevice),
}

/// What the drivers' tasks share at run time: the links that several devices use, and the
/// gateway's identity as an OPC-UA client.
#[derive(Debug)]
pub struct Shared {
    modbus: modbus::Links,
    opcua: opcua::Context,
}

impl Shared {
    /// What `devices` (one group, see [`DeviceConfig::group`]) share: fresh links, and the
    /// gateway's OPC-UA identity.
    pub fn for_devices<'a>(opcua: opcua::Context, devices: impl Iterator<Item = &'a DeviceConfig>) -> Self {
        let mut shared = Shared { modbus: modbus::Links::default(), opcua };
        for d in devices {
            match d {
                DeviceConfig::Modbus(d) => shared.modbus.count(d),
                DeviceConfig::Opcua(_) => {}
            }
        }
        shared
    }
}

/// The checks across devices (those sharing a link must agree).
pub fn validate_all(devices: &std::collections::BTreeMap<String, DeviceConfig>, found: &mut Found) {
    let modbus = devices.iter().filter_map(|(n, d)| match d {
        DeviceConfig::Modbus(d) => Some((n.as_str(), d)),
        DeviceConfig::Opcua(_) => None,
    });
    modbus::config::validate_links(modbus, found);
}

impl DeviceConfig {
    /// The `driver` values, for the loader's messages.
    pub const DRIVERS: &'static [&'static str] = &["modbus-tcp", "modbus-rtu-tcp", "modbus-rtu", "opcua"];

    /// The devices that start and stop together: those on one Modbus line or address share its
    /// link (and its task), so a reload that changes one of them restarts them all.
    pub fn group(&self, name: &str) -> String {
        match self {
            DeviceConfig::Modbus(d) => format!("modbus:{}", d.link_key()),
            DeviceConfig::Opcua(_) => format!("opcua:{name}"),
        }
    }

    /// The device's `driver`.
    pub fn driver(&self) -> &'static str {
        match self {
            DeviceConfig::Modbus(d) => d.kind.driver(),
            DeviceConfig::Opcua(_) => "opcua",
        }
    }

    /// The names of the device's tags.
    pub fn tag_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            DeviceConfig::Modbus(d) => Box::new(d.tags.iter().map(|t| t.name.as_str())),
            DeviceConfig::Opcua(d) => Box::new(d.tags.iter().map(|t| t.name.as_str())),
        }
    }

    /// The driver's own checks; `base` is the device's key path.
    pub fn validate(&self, base: Vec<Seg>, found: &mut Found) {
        match self {
            DeviceConfig::Modbus(d) => modbus::config::validate_device(d, base, found),
            DeviceConfig::Opcua(d) => opcua::config::validate_device(d, base, found),
        }
    }

    /// Reads the files the device's config names (a CSV register map), relative to `base`;
    /// returns the problems found in them, located in those files.
    pub fn load_files(&mut self, base: &std::path::Path) -> Vec<modbus::config::CsvProblem> {
        match self {
            DeviceConfig::Modbus(d) => d.load_tags_file(base),
            DeviceConfig::Opcua(_) => Vec::new(),
        }
    }

    /// Where a checked problem about `path` (below the device) is, when it is not in the TOML file.
    pub fn locate(&self, path: &[Seg]) -> Option<(std::path::PathBuf, usize, usize)> {
        match (self, path) {
            (DeviceConfig::Modbus(d), [Seg::Key(k), Seg::Index(i), rest @ ..]) if k == "tags" => {
                let field = match rest.first() {
                    Some(Seg::Key(f)) => Some(f.as_str()),
                    _ => None,
                };
                d.locate(*i, field)
            }
            _ => None,
        }
    }

    /// The device's polling task, reading write commands from `commands`.
    #[allow(clippy::too_many_arguments)]
    pub fn task(
        &self,
        shared: &mut Shared,
        name: &str,
        registry: &Arc<Registry>,
        stats: Arc<DeviceStats>,
        out: BusSender,
        commands: Option<WriteRx>,
        cancel: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        match self {
            DeviceConfig::Modbus(d) => {
                let link = shared.modbus.handle(d, &cancel);
                let mut driver = modbus::ModbusDriver::new(name, d, link, registry, stats, out);
                if let Some(rx) = commands {
                    driver = driver.with_commands(rx);
                }
                Box::pin(driver.run(cancel))
            }
            DeviceConfig::Opcua(d) => {
                let mut driver = opcua::OpcuaDriver::new(name, d, shared.opcua.clone(), registry, stats, out);
                if let Some(rx) = commands {
                    driver = driver.with_commands(rx);
                }
                Box::pin(driver.run(cancel))
            }
        }
    }
}

/// One built-in simulator; the variant is chosen by the table's `kind` key.
#[derive(Debug, Clone)]
pub enum SimulatorConfig {
    /// `modbus-tcp`, `modbus-rtu-tcp` and `modbus-rtu` (on a serial port).
    Modbus(modbus::ModbusSimulator),
    /// `opcua`: an OPC-UA server.
    Opcua(opcua::OpcuaSimulator),
}

impl SimulatorConfig {
    /// The `kind` values, for the loader's messages.
    pub const KINDS: &'static [&'static str] = &["modbus-tcp", "modbus-rtu-tcp", "modbus-rtu", "opcua"];

    /// Where it listens, if on TCP (port 0: a free port).
    pub fn listen(&self) -> Option<SocketAddr> {
        match self {
            SimulatorConfig::Modbus(s) => s.listen,
            SimulatorConfig::Opcua(s) => Some(s.listen),
        }
    }

    /// The simulator's own checks; `base` is its key path.
    pub fn validate(&self, base: Vec<Seg>, found: &mut Found) {
        match self {
            SimulatorConfig::Modbus(s) => modbus::config::validate_simulator(s, base, found),
            SimulatorConfig::Opcua(s) => opcua::config::validate_simulator(s, base, found),
        }
    }

    /// Starts it and returns the bound address (none for a serial port).
    pub async fn start(&self, name: &str, cancel: CancellationToken) -> std::io::Result<Option<SocketAddr>> {
        match self {
            SimulatorConfig::Modbus(s) => modbus::simulator::start(name, s, cancel).await,
            SimulatorConfig::Opcua(s) => opcua::simulator::start(name, s, cancel).await.map(|s| Some(s.addr)),
        }
    }
}

/// A request to write one tag of one device, from the cloud or from the local broker.
#[derive(Debug)]
pub struct WriteCommand {
    pub tag: String,
    pub value: serde_json::Value,
    /// `Ok` once the device confirmed the write; `Err` with the reason otherwise.
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub type WriteTx = mpsc::Sender<WriteCommand>;
pub type WriteRx = mpsc::Receiver<WriteCommand>;

/// The next write command, or never if the driver takes none.
pub(crate) async fn recv_command(rx: &mut Option<WriteRx>) -> Option<WriteCommand> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Hands one read's points to the bus, as every driver does: counted good and bad, filtered by
/// report by exception, and sent as one batch. `Err` when the bus has closed (shutdown).
pub(crate) async fn emit(
    mut points: Vec<crate::base::point::Point>,
    stats: &DeviceStats,
    exceptions: &mut Option<report::Exceptions>,
    out: &BusSender,
) -> Result<(), ()> {
    let bad = points.iter().filter(|p| p.value.is_none()).count() as u64;
    stats.points_bad.add(bad);
    stats.points_good.add(points.len() as u64 - bad);
    if bad < points.len() as u64 {
        stats.heard_good();
    }
    if let Some(x) = exceptions {
        x.filter(&mut points, std::time::Instant::now());
    }
    if points.is_empty() {
        return Ok(());
    }
    out.send(crate::hub::batch(points)).await.map_err(|_| ())
}

/// Queues a write of `device`'s `tag` and returns where its result will arrive. Refuses at once
/// (rather than waiting) when the device is unknown or its queue is full, so a flood of commands
/// cannot stall the caller.
pub fn submit(
    devices: &std::collections::HashMap<String, WriteTx>,
    device: &str,
    tag: &str,
    value: serde_json::Value,
) -> Result<oneshot::Receiver<Result<(), String>>, String> {
    let tx = devices.get(device).ok_or_else(|| format!("unknown device `{device}`"))?;
    let (reply, wait) = oneshot::channel();
    tx.try_send(WriteCommand { tag: tag.to_owned(), value, reply }).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => "busy".to_owned(),
        mpsc::error::TrySendError::Closed(_) => format!("the driver of `{device}` has stopped"),
    })?;
    Ok(wait)
}
