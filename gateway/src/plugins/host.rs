//! The WASM plugin host: one shared wasmtime engine, components compiled once and cached in
//! `data_dir`, and sandboxed instances with a memory cap and a per-call deadline.
//!
//! The sandbox: besides the world's imports (`tags`, `log`, `state`), the linker provides WASI p2 — Rust's
//! std imports it for hash seeds, clocks and panics — from a deny-all context: no preopened
//! directories, no environment, no arguments, no network, stdin empty, output discarded, and both
//! clocks frozen at the gateway time of the current call. Any other import traps. A plugin that
//! opens a file or a socket gets an error, never a resource. Memory is capped by a
//! `ResourceLimiter`, time by epoch interruption (a 10 ms ticker thread), and a trap poisons only
//! the instance, which the runner recreates.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};
use wasmtime::component::ResourceTable;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, ResourceLimiter, Store};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use crate::base::point::Registry;

/// The current world, `updraft:plugin@0.3.0`.
mod wit {
    wasmtime::component::bindgen!({
        world: "updraft-plugin",
        path: "../plugin-sdk/wit",
    });
}

/// The 0.2.0 world (no state), for plugins built before 0.3.0.
mod wit02 {
    wasmtime::component::bindgen!({
        world: "updraft-plugin",
        path: "../plugin-sdk/wit-0.2.0",
    });
}

/// The first world, `updraft:plugin@0.1.0` (no text values), for plugins built before 0.2.0.
/// All are linked: their imports have different versioned names, so a component picks its own.
mod wit01 {
    wasmtime::component::bindgen!({
        world: "updraft-plugin",
        path: "../plugin-sdk/wit-0.1.0",
    });
}

pub use wit::exports::updraft::plugin::plugin::{Batch, Emits};
pub use wit::updraft::plugin::types::{DataPoint, PluginError, Quality as WitQuality, Value as WitValue};
pub use wit::updraft::plugin::types::{Emit, Message};
use wit::updraft::plugin::{log as wit_log, state as wit_state, tags as wit_tags, types as wit_types};

/// Epoch tick of the shared engine: the resolution of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    #[error("cannot read plugin {path}: {source}{hint}")]
    Read { path: PathBuf, source: std::io::Error, hint: &'static str },
    #[error("{path} is not a valid Updraft plugin component: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The process-wide engine and its epoch ticker.
pub struct PluginEngine {
    engine: Engine,
    cache_dir: PathBuf,
}

impl PluginEngine {
    /// Creates the engine (once per process is enough; engines are cheap to share).
    pub fn new(cache_dir: &Path) -> wasmtime::Result<Self> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(512 * 1024);
        let engine = Engine::new(&config)?;
        start_ticker(&engine);
        Ok(PluginEngine { engine, cache_dir: cache_dir.to_owned() })
    }

    /// Loads a component: from the compiled cache if this engine compiled the same bytes before,
    /// else compiles it (tens to hundreds of ms) and writes the cache for the next start.
    pub fn load(&self, path: &Path) -> Result<LoadedPlugin, PluginLoadError> {
        let started = Instant::now();
        let bytes = std::fs::read(path).map_err(|source| {
            let hint = if source.kind() == std::io::ErrorKind::NotFound {
                "; build it first (the example plugins: `cargo build --release` in plugins/, which `bash configs/demo.sh` runs)"
            } else {
                ""
            };
            PluginLoadError::Read { path: path.to_owned(), source, hint }
        })?;
        let mut h = Sha256::new();
        h.update(&bytes);
        // The cache key covers the wasmtime build and settings, so an upgrade recompiles.
        std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut HashWriter(&mut h));
        let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let cached = self.cache_dir.join(format!("{key}.cwasm"));
        let invalid = |e: wasmtime::Error| PluginLoadError::Invalid { path: path.to_owned(), reason: format!("{e:#}") };
        let (component, warm) = match load_cached(&self.engine, &cached) {
            Some(c) => (c, true),
            None => {
                let compiled = self.engine.precompile_component(&bytes).map_err(invalid)?;
                let dir = &self.cache_dir;
                // Write then rename, so a crash never leaves a half-written file to be loaded.
                let tmp = cached.with_extension("tmp");
                let written = private_dir(dir)
                    .and_then(|()| write_private(&tmp, &compiled))
                    .and_then(|()| std::fs::rename(&tmp, &cached));
                match written {
                    Ok(()) => (
                        load_cached(&self.engine, &cached)
                            .ok_or_else(|| invalid(wasmtime::Error::msg("cache reload failed")))?,
                        false,
                    ),
                    // A full or read-only disk must not stop the gateway (under systemd that would
                    // be a restart loop): compile in memory and go on without the cache.
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        warn!(dir = %dir.display(), error = %e, "Cannot write the compiled plugin cache; compiling in memory.");
                        (Component::new(&self.engine, &bytes).map_err(invalid)?, false)
                    }
                }
            }
        };
        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        wit::UpdraftPlugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(invalid)?;
        wit02::UpdraftPlugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(invalid)?;
        wit01::UpdraftPlugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s).map_err(invalid)?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(invalid)?;
        forbid_waiting(&mut linker).map_err(invalid)?;
        let pre = linker.instantiate_pre(&component).map_err(invalid)?;
        // The world version is the one whose `plugin` interface the component exports.
        let pre = if let Ok(p) = wit::UpdraftPluginPre::new(pre.clone()) {
            Pre::V3(p)
        } else if let Ok(p) = wit02::UpdraftPluginPre::new(pre.clone()) {
            Pre::V2(p)
        } else {
            match wit01::UpdraftPluginPre::new(pre) {
                Ok(p) => Pre::V1(p),
                Err(e) => return Err(invalid(e.context("it exports none of updraft:plugin@0.3.0, @0.2.0 and @0.1.0"))),
            }
        };
        debug!(path = %path.display(), warm, world = pre.version(), elapsed = ?started.elapsed(), "Plugin loaded.");
        Ok(LoadedPlugin { engine: self.engine.clone(), pre, warm, load_time: started.elapsed() })
    }
}

/// Most WASI resources (streams, pollables, …) one instance may hold at once. The default is
/// millions; a plugin that leaks handles must trap long before it costs the gateway memory.
pub const MAX_WASI_RESOURCES: usize = 1024;
/// Most elements of one table (function references); compilers emit a few hundred at most.
pub const MAX_TABLE_ELEMENTS: usize = 20_000;

fn wasi_table() -> ResourceTable {
    let mut t = ResourceTable::new();
    t.set_max_capacity(MAX_WASI_RESOURCES);
    t
}

/// The store's resource limits: one budget for all linear memories together (a component may hold
/// several, each of which wasmtime's `StoreLimits` would cap separately), bounded tables, and a
/// few instances. A refused growth traps, so the runner sees and counts it.
struct Limits {
    memory_total: usize,
    memory_used: usize,
}

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let used = self.memory_used.saturating_add(desired.saturating_sub(current));
        if used > self.memory_total {
            return Err(wasmtime::Error::msg(format!(
                "plugin memory limit of {} reached (all memories together)",
                bytesize::ByteSize(self.memory_total as u64).display().iec()
            )));
        }
        self.memory_used = used;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::msg(format!("plugin table limit of {MAX_TABLE_ELEMENTS} elements reached")));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        8
    }
    fn tables(&self) -> usize {
        16
    }
    fn memories(&self) -> usize {
        4
    }
}

/// Replaces WASI's blocking waits with traps. A guest that sleeps (`std::thread::sleep` is a
/// monotonic-clock pollable and `poll`) would block the host thread in a host call, where epoch
/// interruption cannot reach it: a one-hour sleep would stall the plugin for an hour. A plugin has
/// nothing to wait for (no I/O, a frozen clock), so any wait is a bug and is stopped at once; timed
/// work belongs in `on-tick`.
fn forbid_waiting(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynPollable;
    const WHY: &str = "plugins may not sleep or wait (wasi:io/poll); use on-tick for timed work";
    linker.allow_shadowing(true);
    let mut poll = linker.instance("wasi:io/poll@0.2.12")?;
    poll.func_wrap("poll", |_, (_,): (Vec<Resource<DynPollable>>,)| -> wasmtime::Result<(Vec<u32>,)> {
        Err(wasmtime::Error::msg(WHY))
    })?;
    poll.func_wrap("[method]pollable.block", |_, (_,): (Resource<DynPollable>,)| -> wasmtime::Result<()> {
        Err(wasmtime::Error::msg(WHY))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Feeds the hash of the engine's compatibility data into SHA-256.
struct HashWriter<'a>(&'a mut Sha256);
impl std::hash::Hasher for HashWriter<'_> {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Creates the cache folder readable and writable by the gateway's user only (0700), or checks
/// that an existing one is owned by that user and writable by nobody else: the cache holds native
/// code that the gateway runs.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != rustix::process::geteuid().as_raw() || m.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} must be a folder owned by the gateway's user and writable by no one else", dir.display()),
        ));
    }
    Ok(())
}

/// Writes a new file readable and writable by the gateway's user only (0600).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Whether a cache entry is one this gateway wrote: a regular file (not a link) owned by the
/// gateway's user, in a folder of its own, that nobody else can read or write.
fn trusted(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let euid = rustix::process::geteuid().as_raw();
    let m = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !m.is_file() || m.uid() != euid || m.mode() & 0o077 != 0 {
        return Err(format!("not a private file of this user (mode {:o}, owner {})", m.mode() & 0o7777, m.uid()));
    }
    let dir = path.parent().ok_or("no folder")?;
    let d = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if d.uid() != euid || d.mode() & 0o022 != 0 {
        return Err(format!("its folder is writable by others (mode {:o}, owner {})", d.mode() & 0o7777, d.uid()));
    }
    Ok(())
}

#[allow(unsafe_code)]
fn load_cached(engine: &Engine, path: &Path) -> Option<Component> {
    if !path.exists() {
        return None;
    }
    if let Err(why) = trusted(path) {
        warn!(path = %path.display(), %why, "Refusing a plugin cache entry this gateway did not write; recompiling.");
        let _ = std::fs::remove_file(path);
        return None;
    }
    // SAFETY: `deserialize_file` trusts the file to be wasmtime's own output. Only files this
    // gateway wrote into its own data directory are loaded: named by the SHA-256 of the source and
    // of the engine's compatibility hash, written atomically, private to the gateway's user (0600
    // in a 0700 folder, checked just above), and wasmtime still checks the header and version.
    match unsafe { Component::deserialize_file(engine, path) } {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "Ignoring unusable plugin cache; recompiling.");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// Increments the engine's epoch every `EPOCH_TICK` on one thread for the whole process.
fn start_ticker(engine: &Engine) {
    static STARTED: OnceLock<()> = OnceLock::new();
    static ENGINES: std::sync::Mutex<Vec<wasmtime::EngineWeak>> = std::sync::Mutex::new(Vec::new());
    ENGINES.lock().unwrap_or_else(|e| e.into_inner()).push(engine.weak());
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new().name("wasm-epoch".into()).spawn(|| loop {
            std::thread::sleep(EPOCH_TICK);
            let mut engines = ENGINES.lock().unwrap_or_else(|e| e.into_inner());
            engines.retain(|w| match w.upgrade() {
                Some(e) => {
                    e.increment_epoch();
                    true
                }
                None => false,
            });
        });
    });
}

/// The tags a plugin may look up by id: those its subscription delivers to it, and no others (the
/// names of every device in the park are not every plugin's business).
#[derive(Debug, Clone)]
pub struct TagView {
    pub registry: Arc<Registry>,
    /// `device/tag` filters, as in the plugin's `subscribe`.
    pub subscribe: Arc<[String]>,
}

impl TagView {
    fn get(&self, id: u32) -> Option<Arc<crate::base::point::TagKey>> {
        let key = self.registry.by_id(id)?;
        let visible = !key.derived && self.subscribe.iter().any(|f| super::runner::filter_matches(f, &key));
        visible.then_some(key)
    }
}

/// A compiled, linked plugin from which instances are made.
/// A component ready to instantiate, with the world version it was built for.
enum Pre {
    V3(wit::UpdraftPluginPre<HostState>),
    V2(wit02::UpdraftPluginPre<HostState>),
    V1(wit01::UpdraftPluginPre<HostState>),
}

impl Pre {
    fn version(&self) -> &'static str {
        match self {
            Pre::V3(_) => "0.3.0",
            Pre::V2(_) => "0.2.0",
            Pre::V1(_) => "0.1.0",
        }
    }
}

enum Bindings {
    V3(wit::UpdraftPlugin),
    V2(wit02::UpdraftPlugin),
    V1(wit01::UpdraftPlugin),
}

pub struct LoadedPlugin {
    engine: Engine,
    pre: Pre,
    /// Whether it came from the compiled cache.
    pub warm: bool,
    pub load_time: Duration,
}

/// What an instance's imports can see.
pub struct HostState {
    limits: Limits,
    plugin: Arc<str>,
    tags: TagView,
    /// Lines logged during the current call, to enforce the per-call budget.
    log_lines: u32,
    /// Messages logged at error level during the current call (the panic message lands here).
    pub last_error: Option<String>,
    wasi: WasiCtx,
    table: ResourceTable,
    /// The frozen clock both WASI clocks read: Unix nanoseconds of the current call.
    clock: Arc<AtomicU64>,
    /// The last committed state (`state.load`), and what the current call staged (`state.save`).
    committed: Option<Arc<[u8]>>,
    staged: Option<Vec<u8>>,
}

/// Largest state blob a plugin may keep.
pub const MAX_STATE_BYTES: usize = 64 * 1024;

impl wit_state::Host for HostState {
    fn load(&mut self) -> Option<Vec<u8>> {
        self.staged.clone().or_else(|| self.committed.as_ref().map(|c| c.to_vec()))
    }

    fn save(&mut self, blob: Vec<u8>) -> Result<(), String> {
        if blob.len() > MAX_STATE_BYTES {
            return Err(format!("state of {} bytes refused: at most {MAX_STATE_BYTES}", blob.len()));
        }
        self.staged = Some(blob);
        Ok(())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// A clock that reads the time the host froze for the current call, so plugins are deterministic
/// given their input, state and `now`.
struct FrozenClock(Arc<AtomicU64>);

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

const MAX_LOG_LINES_PER_CALL: u32 = 20;
const MAX_LOG_LINE: usize = 1024;

impl wit_types::Host for HostState {}

impl wit_tags::Host for HostState {
    fn describe(&mut self, id: u32) -> Option<wit_tags::TagInfo> {
        let key = self.tags.get(id)?;
        Some(wit_tags::TagInfo { id, device: key.device.to_string(), tag: key.tag.to_string(), unit: None })
    }
}

impl wit_log::Host for HostState {
    fn log(&mut self, level: wit_log::Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let plugin = &*self.plugin;
        match level {
            wit_log::Level::Trace | wit_log::Level::Debug => debug!(plugin, "{message}"),
            wit_log::Level::Info => info!(plugin, "{message}"),
            wit_log::Level::Warn => warn!(plugin, "{message}"),
            wit_log::Level::Error => {
                error!(plugin, "{message}");
                self.last_error = Some(message);
            }
        }
    }
}

/// Why a call produced no output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    /// The instance trapped and must be recreated: `kind` is a short label for metrics.
    Trap { kind: &'static str, reason: String },
    /// The plugin returned an error; the instance is still usable.
    Error(String),
}

/// A live instance with its own store: memory, limits and state.
pub struct PluginInstance {
    store: Store<HostState>,
    bindings: Bindings,
    call_timeout: Duration,
    /// Set by a trap: wasmtime refuses further calls into a trapped instance.
    poisoned: bool,
    /// What it declared (world 0.3.0 and later).
    manifest: Option<Manifest>,
}

/// What a plugin declares about itself (world 0.3.0 and later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The outputs it emits to.
    pub outputs: Vec<String>,
    /// Its default `subscribe`.
    pub subscribe: Vec<String>,
}

impl LoadedPlugin {
    /// Instantiates and initializes the plugin with its JSON config.
    pub fn instantiate(
        &self,
        plugin: &str,
        config_json: &str,
        memory: u64,
        call_timeout: Duration,
        tags: TagView,
        state: Option<Arc<[u8]>>,
    ) -> Result<PluginInstance, CallFailure> {
        let mut inst = self.instance(plugin, memory, call_timeout, tags, state)?;
        inst.manifest = inst.describe()?;
        let now = (now_nanos() / 1_000_000) as i64;
        inst.call(now, |b, s| match b {
            Bindings::V3(b) => b.updraft_plugin_plugin().call_init(s, config_json),
            Bindings::V2(b) => Ok(b.updraft_plugin_plugin().call_init(s, config_json)?.map_err(v02::error)),
            Bindings::V1(b) => Ok(b.updraft_plugin_plugin().call_init(s, config_json)?.map_err(v01::error)),
        })?;
        // What init staged is part of the first commit, not committed by itself.
        Ok(inst)
    }

    /// What the plugin declares about itself (`describe`, world 0.3.0 and later), from an
    /// instance made for the question and never initialized.
    pub fn manifest(
        &self,
        plugin: &str,
        memory: u64,
        call_timeout: Duration,
        tags: TagView,
    ) -> Result<Option<Manifest>, CallFailure> {
        self.instance(plugin, memory, call_timeout, tags, None)?.describe()
    }

    /// A fresh instance in its own store with its limits, not yet initialized.
    fn instance(
        &self,
        plugin: &str,
        memory: u64,
        call_timeout: Duration,
        tags: TagView,
        state: Option<Arc<[u8]>>,
    ) -> Result<PluginInstance, CallFailure> {
        let limits = Limits { memory_total: memory as usize, memory_used: 0 };
        let clock = Arc::new(AtomicU64::new(now_nanos()));
        // Deny-all: the builder's defaults grant no directories, environment, arguments or
        // network; only the clocks are replaced.
        let wasi = WasiCtx::builder()
            .wall_clock(FrozenClock(clock.clone()))
            .monotonic_clock(FrozenClock(clock.clone()))
            .build();
        let state = HostState {
            limits,
            plugin: Arc::from(plugin),
            tags,
            log_lines: 0,
            last_error: None,
            wasi,
            table: wasi_table(),
            clock,
            committed: state,
            staged: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(deadline_ticks(call_timeout));
        let bindings = match &self.pre {
            Pre::V3(pre) => pre.instantiate(&mut store).map(Bindings::V3),
            Pre::V2(pre) => pre.instantiate(&mut store).map(Bindings::V2),
            Pre::V1(pre) => pre.instantiate(&mut store).map(Bindings::V1),
        }
        .map_err(|e| classify(&e, None))?;
        Ok(PluginInstance { store, bindings, call_timeout, poisoned: false, manifest: None })
    }

    /// The world version the plugin was built for.
    pub fn world(&self) -> &'static str {
        self.pre.version()
    }
}

/// A plugin's config refusal as an operator should read it. The SDK before 0.3 prefixed serde's
/// message with `config: ` and serde_json ends it with `at line 1 column 8`: a position in JSON the
/// gateway built from the TOML, which points nowhere the operator can look (`updraft check`
/// points at the TOML instead).
fn config_message(m: &str) -> String {
    let m = m.strip_prefix("config: ").unwrap_or(m);
    let trimmed = match m.rfind(" at line ") {
        Some(i)
            if m[i + 9..].split_once(" column ").is_some_and(|(l, c)| {
                [l, c].iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            }) =>
        {
            &m[..i]
        }
        _ => m,
    };
    trimmed.to_owned()
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis().div_ceil(EPOCH_TICK.as_millis())).max(1) as u64
}

impl PluginInstance {
    /// Calls `on-batch`; `now` (Unix ms) is also what the plugin's clocks read during the call.
    pub fn on_batch(&mut self, batch: &Batch, now: i64) -> Result<Emits, CallFailure> {
        self.call(now, |b, s| match b {
            Bindings::V3(b) => b.updraft_plugin_plugin().call_on_batch(s, batch, now),
            Bindings::V2(b) => {
                let old = v02::batch(batch);
                Ok(b.updraft_plugin_plugin().call_on_batch(s, &old, now)?.map(v02::emits).map_err(v02::error))
            }
            Bindings::V1(b) => {
                let old = v01::batch(batch);
                Ok(b.updraft_plugin_plugin().call_on_batch(s, &old, now)?.map(v01::emits).map_err(v01::error))
            }
        })
    }

    pub fn on_tick(&mut self, now: i64) -> Result<Emits, CallFailure> {
        self.call(now, |b, s| match b {
            Bindings::V3(b) => b.updraft_plugin_plugin().call_on_tick(s, now),
            Bindings::V2(b) => Ok(b.updraft_plugin_plugin().call_on_tick(s, now)?.map(v02::emits).map_err(v02::error)),
            Bindings::V1(b) => Ok(b.updraft_plugin_plugin().call_on_tick(s, now)?.map(v01::emits).map_err(v01::error)),
        })
    }

    /// Whether a trap has made the instance unusable (the runner then recreates it).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// What the plugin declared, if its world has `describe`.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    fn describe(&mut self) -> Result<Option<Manifest>, CallFailure> {
        let Bindings::V3(b) = &self.bindings else { return Ok(None) };
        self.store.set_epoch_deadline(deadline_ticks(self.call_timeout));
        match b.updraft_plugin_plugin().call_describe(&mut self.store) {
            Ok(m) => Ok(Some(Manifest { outputs: m.outputs, subscribe: m.subscribe })),
            Err(e) => {
                self.poisoned = true;
                Err(classify(&e, self.store.data().last_error.clone()))
            }
        }
    }

    /// The state the last successful call (or `init`) staged with `state.save`, if any; the
    /// caller commits it with that call's outputs, then calls [`PluginInstance::committed`].
    pub fn take_staged(&mut self) -> Option<Vec<u8>> {
        self.store.data_mut().staged.take()
    }

    /// Records `blob` as committed: what `state.load` returns from now on.
    pub fn committed(&mut self, blob: Arc<[u8]>) {
        self.store.data_mut().committed = Some(blob);
    }

    fn call<T>(
        &mut self,
        now_ms: i64,
        f: impl FnOnce(&Bindings, &mut Store<HostState>) -> wasmtime::Result<Result<T, PluginError>>,
    ) -> Result<T, CallFailure> {
        if self.is_poisoned() {
            return Err(CallFailure::Trap { kind: "poisoned", reason: "instance trapped earlier".into() });
        }
        self.store.data_mut().log_lines = 0;
        self.store.data_mut().last_error = None;
        self.store.data().clock.store(now_ms.max(0) as u64 * 1_000_000, Ordering::Relaxed);
        self.store.set_epoch_deadline(deadline_ticks(self.call_timeout));
        let result = f(&self.bindings, &mut self.store);
        if !matches!(result, Ok(Ok(_))) {
            // A failed call commits nothing: its staged state goes with its outputs.
            self.store.data_mut().staged = None;
        }
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(PluginError::InvalidConfig(m))) => Err(CallFailure::Error(config_message(&m))),
            Ok(Err(PluginError::Internal(m))) => Err(CallFailure::Error(m)),
            Err(e) => {
                self.poisoned = true;
                Err(classify(&e, self.store.data().last_error.clone()))
            }
        }
    }
}

/// Names a trap for logs and metrics; `logged` is what the plugin logged at error level during
/// the call (the SDK's panic hook logs the panic message there).
fn classify(e: &wasmtime::Error, logged: Option<String>) -> CallFailure {
    let text = format!("{e:#}");
    let kind = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "timeout",
        Some(wasmtime::Trap::UnreachableCodeReached) if logged.as_deref().is_some_and(|m| m.starts_with("panic")) => {
            "panic"
        }
        Some(wasmtime::Trap::UnreachableCodeReached) => "abort",
        Some(wasmtime::Trap::StackOverflow) => "stack-overflow",
        Some(_) => "trap",
        None if text.contains("forcing trap when growing memory")
            || text.contains("memory") && text.contains("limit") =>
        {
            "memory"
        }
        None if text.contains("table limit") || text.contains("resource table has no free keys") => "resources",
        None if text.contains("may not sleep or wait") => "wait",
        None if text.contains("unknown import") || text.contains("wasi:") => "forbidden-import",
        None => "error",
    };
    let reason = match logged {
        Some(m) => format!("{m} ({text})"),
        None => text,
    };
    CallFailure::Trap { kind, reason }
}

/// An older world's imports are the current ones under older names.
macro_rules! older_world_imports {
    ($world:ident) => {
        impl $world::updraft::plugin::types::Host for HostState {}

        impl $world::updraft::plugin::tags::Host for HostState {
            fn describe(&mut self, id: u32) -> Option<$world::updraft::plugin::tags::TagInfo> {
                let t = wit_tags::Host::describe(self, id)?;
                Some($world::updraft::plugin::tags::TagInfo { id: t.id, device: t.device, tag: t.tag, unit: t.unit })
            }
        }

        impl $world::updraft::plugin::log::Host for HostState {
            fn log(&mut self, level: $world::updraft::plugin::log::Level, message: String) {
                use $world::updraft::plugin::log::Level as L;
                let level = match level {
                    L::Trace => wit_log::Level::Trace,
                    L::Debug => wit_log::Level::Debug,
                    L::Info => wit_log::Level::Info,
                    L::Warn => wit_log::Level::Warn,
                    L::Error => wit_log::Level::Error,
                };
                wit_log::Host::log(self, level, message);
            }
        }
    };
}

older_world_imports!(wit02);
older_world_imports!(wit01);

/// Conversions between the current world's types and the 0.2.0 world's, which have the same shapes.
mod v02 {
    use super::wit02::updraft::plugin::types as old;
    use super::{Batch, Emit, Emits, Message, PluginError, WitQuality, WitValue};

    pub fn batch(b: &Batch) -> old::Batch {
        let points = b
            .points
            .iter()
            .map(|p| {
                let value = p.value.as_ref().map(|v| match v {
                    WitValue::Boolean(v) => old::Value::Boolean(*v),
                    WitValue::Int(v) => old::Value::Int(*v),
                    WitValue::Uint(v) => old::Value::Uint(*v),
                    WitValue::Float(v) => old::Value::Float(*v),
                    WitValue::Text(t) => old::Value::Text(t.clone()),
                });
                let quality = match p.quality {
                    WitQuality::Good => old::Quality::Good,
                    WitQuality::Bad => old::Quality::Bad,
                };
                old::DataPoint { tag: p.tag, value, quality, ts: p.ts }
            })
            .collect();
        old::Batch { seq: b.seq, points }
    }

    pub fn emits(e: old::Emits) -> Emits {
        let points = e
            .points
            .into_iter()
            .map(|p| Emit {
                output: p.output,
                device: p.device,
                tag: p.tag,
                value: p.value.map(|v| match v {
                    old::Value::Boolean(v) => WitValue::Boolean(v),
                    old::Value::Int(v) => WitValue::Int(v),
                    old::Value::Uint(v) => WitValue::Uint(v),
                    old::Value::Float(v) => WitValue::Float(v),
                    old::Value::Text(t) => WitValue::Text(t),
                }),
                quality: match p.quality {
                    old::Quality::Good => WitQuality::Good,
                    old::Quality::Bad => WitQuality::Bad,
                },
                ts: p.ts,
            })
            .collect();
        let messages = e
            .messages
            .into_iter()
            .map(|m| Message { output: m.output, subject: m.subject, payload: m.payload })
            .collect();
        Emits { points, messages }
    }

    pub fn error(e: old::PluginError) -> PluginError {
        match e {
            old::PluginError::InvalidConfig(m) => PluginError::InvalidConfig(m),
            old::PluginError::Internal(m) => PluginError::Internal(m),
        }
    }
}

/// Conversions between the current world's types and the 0.1.0 world's: a batch loses its text
/// points (a 0.1.0 plugin cannot receive them), emits convert one to one.
mod v01 {
    use super::wit01::updraft::plugin::types as old;
    use super::{Batch, Emit, Emits, Message, PluginError, WitQuality, WitValue};

    pub fn batch(b: &Batch) -> old::Batch {
        let points = b
            .points
            .iter()
            .filter_map(|p| {
                let value = match &p.value {
                    None => None,
                    Some(WitValue::Boolean(v)) => Some(old::Value::Boolean(*v)),
                    Some(WitValue::Int(v)) => Some(old::Value::Int(*v)),
                    Some(WitValue::Uint(v)) => Some(old::Value::Uint(*v)),
                    Some(WitValue::Float(v)) => Some(old::Value::Float(*v)),
                    Some(WitValue::Text(_)) => return None,
                };
                Some(old::DataPoint { tag: p.tag, value, quality: quality_to(p.quality), ts: p.ts })
            })
            .collect();
        old::Batch { seq: b.seq, points }
    }

    fn quality_to(q: WitQuality) -> old::Quality {
        match q {
            WitQuality::Good => old::Quality::Good,
            WitQuality::Bad => old::Quality::Bad,
        }
    }

    pub fn emits(e: old::Emits) -> Emits {
        let points = e
            .points
            .into_iter()
            .map(|p| Emit {
                output: p.output,
                device: p.device,
                tag: p.tag,
                value: p.value.map(|v| match v {
                    old::Value::Boolean(v) => WitValue::Boolean(v),
                    old::Value::Int(v) => WitValue::Int(v),
                    old::Value::Uint(v) => WitValue::Uint(v),
                    old::Value::Float(v) => WitValue::Float(v),
                }),
                quality: match p.quality {
                    old::Quality::Good => WitQuality::Good,
                    old::Quality::Bad => WitQuality::Bad,
                },
                ts: p.ts,
            })
            .collect();
        let messages = e
            .messages
            .into_iter()
            .map(|m| Message { output: m.output, subject: m.subject, payload: m.payload })
            .collect();
        Emits { points, messages }
    }

    pub fn error(e: old::PluginError) -> PluginError {
        match e {
            old::PluginError::InvalidConfig(m) => PluginError::InvalidConfig(m),
            old::PluginError::Internal(m) => PluginError::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refusals_lose_the_position_in_generated_json() {
        assert_eq!(
            config_message("config: unknown field `limit`, expected `limit_kw` at line 1 column 8"),
            "unknown field `limit`, expected `limit_kw`"
        );
        assert_eq!(config_message("limit_kw must be positive"), "limit_kw must be positive");
        assert_eq!(config_message("stop at line 3"), "stop at line 3");
    }
}
