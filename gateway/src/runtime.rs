//! Builds the pipeline from a config, starts it, and drains it on shutdown.
//!
//! Start order: simulators (so the demo's devices answer at once), the embedded broker, the hub's
//! consumers, the HTTP API, then the plugins and the drivers. A reload stops and starts only the
//! device groups, plugins and sinks whose config changed (`reload.rs` says which). Shutdown is one `CancellationToken`: drivers stop and
//! drop their senders, the hub sees its channel close and closes its consumers' queues, and the
//! publisher thread drains what is left. The whole drain runs under a grace period.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api;
use crate::base::point::Registry;
use crate::broker::{self, BrokerError};
use crate::config::Config;
use crate::hub::{BusSender, CurrentValues, Hub, HubHandle, Stage};
use crate::metrics::Metrics;
use crate::plugins::host::PluginEngine;
use crate::reload::{Diff, Fingerprints};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("plugin `{name}`: {source}")]
    Plugin { name: String, source: crate::plugins::host::PluginLoadError },
    #[error("cannot start the plugin engine: {0}")]
    PluginEngine(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
}

/// A running gateway. Dropping it without `shutdown` leaves its tasks running.
pub struct Gateway {
    /// Where the embedded broker's plain MQTT listener is, if enabled (with `[broker] tls` and no
    /// `tls.listen`, a private loopback port).
    pub broker_addr: Option<SocketAddr>,
    /// Where the embedded broker's TLS listener is, if configured.
    pub broker_tls_addr: Option<SocketAddr>,
    /// Where the HTTP API listens, if enabled.
    pub api_addr: Option<SocketAddr>,
    /// Bound address of each TCP simulator.
    pub simulators: BTreeMap<String, SocketAddr>,
    pub values: Arc<CurrentValues>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<crate::health::Health>,
    /// What the dashboard shows, including the outcome of reloads.
    pub sources: Arc<crate::status::Sources>,
    cancel: CancellationToken,
    /// The built-in simulators stop after the drivers, so no driver sees its device vanish (and
    /// logs it) during an orderly shutdown.
    simulators_cancel: CancellationToken,
    hub: tokio::task::JoinHandle<()>,
    hub_handle: HubHandle,
    registry: Arc<Registry>,
    /// The gateway's own senders into the hub, for drivers and plugins started by a reload;
    /// dropped at shutdown so the hub sees its producers end.
    bus_tx: Option<BusSender>,
    derived_tx: Option<BusSender>,
    publisher: Option<std::thread::JoinHandle<()>>,
    /// Device groups (devices sharing a link) by group key.
    groups: BTreeMap<String, GroupRun>,
    plugins: BTreeMap<String, std::thread::JoinHandle<()>>,
    sinks: BTreeMap<String, crate::sinks::SinkRun>,
    commands: Arc<crate::commands::Commands>,
    engine: Option<Arc<PluginEngine>>,
    opcua: crate::drivers::opcua::Context,
    /// The running config and what it hashes to.
    config: Config,
    fingerprints: Fingerprints,
    /// Reload requests from `POST /api/v1/reload`, for the loop that owns the gateway.
    reload_rx: Option<tokio::sync::mpsc::Receiver<ReloadRequest>>,
    /// Where the last values are saved at shutdown, unless that is off.
    last_values: Option<std::path::PathBuf>,
}

/// The devices of one group: they start and stop together.
struct GroupRun {
    devices: Vec<String>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// A reload asked for over the API; the answer goes back on `reply`.
pub struct ReloadRequest {
    pub reply: tokio::sync::oneshot::Sender<Result<Diff, String>>,
}

/// Starts simulators only, for `updraft simulate`.
pub async fn start_simulators(
    config: &Config,
    cancel: &CancellationToken,
) -> std::io::Result<BTreeMap<String, SocketAddr>> {
    let mut out = BTreeMap::new();
    for (name, sim) in &config.simulators {
        if let Some(addr) = sim.start(name, cancel.child_token()).await? {
            out.insert(name.clone(), addr);
        }
    }
    Ok(out)
}

pub async fn start(config: Config) -> Result<Gateway, StartError> {
    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    std::fs::create_dir_all(&config.gateway.data_dir)
        .map_err(|source| StartError::DataDir { path: config.gateway.data_dir.clone(), source })?;

    let simulators_cancel = CancellationToken::new();
    let simulators = start_simulators(&config, &simulators_cancel).await?;

    let mut hub = Hub::new(metrics.clone());
    let values = hub.values();
    let registry = hub.registry();
    // Before the broker accepts its first client, so nobody sees an empty bus after a restart.
    let save_every = config.gateway.save_values_every.0;
    let last_values = (!save_every.is_zero()).then(|| crate::last_values::path(&config));
    if let Some(path) = &last_values {
        let restored = crate::last_values::restore(&config, &registry, &values, path);
        if restored > 0 {
            info!(values = restored, path = %path.display(), "Restored the last values saved before the restart.");
        }
        crate::last_values::spawn_saver(values.clone(), path.clone(), save_every, cancel.child_token());
    }

    let tag_count: usize = config.devices.values().map(|d| d.tag_names().count()).sum();
    // The devices' write queues, shared by the local broker's command listener and the cloud
    // sinks' command subscriptions; each device's queue is added as its driver starts.
    let commands = crate::commands::Commands::new(Default::default(), metrics.commands.clone());
    let mut broker_tls_addr = None;
    let (broker_addr, publisher) = if config.broker.enabled {
        let cfg = config.broker.clone();
        let accounts = broker::auth::Accounts::new(&cfg.users, metrics.broker_auth_failures.clone());
        let rights = broker::rights::TopicRights::new(
            &cfg,
            metrics.broker_denied_publish.clone(),
            metrics.broker_denied_subscribe.clone(),
        )
        .map(Arc::new);
        let values = values.clone();
        let counters = metrics.broker_router.clone();
        let mut b = tokio::task::spawn_blocking(move || broker::start(&cfg, values, accounts, rights, counters))
            .await
            .map_err(|e| StartError::Io(std::io::Error::other(e)))??;
        let addr = b.addr;
        broker_tls_addr = b.spawn_tls(config.broker.max_connections, cancel.child_token())?;
        b.spawn_command_listener(commands.clone(), config.broker.writes_on(), metrics.broker_writes_refused.clone());
        let (filters, own_output) = crate::sinks::local_topics(&config);
        if !filters.is_empty() {
            let dropped = metrics.dropped("local-topics").1;
            b.spawn_tap(&filters, &own_output, registry.clone(), hub.derived_sender(), dropped, cancel.child_token());
        }
        // Batches nobody subscribes to never wake the publisher.
        let mut interest = b.interest();
        let rx = hub.subscribe_filtered("broker", Stage::Terminal, Some(Box::new(move |batch| interest.any(batch))));
        (Some(addr), Some(b.spawn_publisher(rx, metrics.clone())?))
    } else {
        (None, None)
    };

    // Sinks register before the hub runs; their buffers open (and are repaired) here, so a
    // problem with the data directory stops start-up with a clear message.
    let mut sinks = BTreeMap::new();
    for name in config.north.keys() {
        let run = crate::sinks::start_one(
            &config,
            name,
            |consumer| hub.subscribe(consumer, Stage::Terminal),
            &metrics,
            &commands,
            cancel.child_token(),
        )?;
        sinks.insert(name.clone(), run);
    }

    let health = Arc::new(crate::health::Health::new(
        metrics.clone(),
        config.devices.keys().cloned().collect(),
        config.north.iter().map(|(n, s)| (n.clone(), s.buffer().stall_after.0)).collect(),
    ));
    crate::health::spawn_monitor(health.clone(), cancel.child_token());
    let sources = Arc::new(crate::status::Sources {
        gateway: Arc::from(config.gateway.id.as_str()),
        started_ms: crate::base::point::now_ms(),
        values: values.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        inventory: std::sync::RwLock::new(crate::status::Inventory::of(&config)),
        reload: std::sync::RwLock::new(crate::status::ReloadState {
            applied_ms: crate::base::point::now_ms(),
            ..Default::default()
        }),
    });
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let api_addr = if config.api.enabled {
        let ctx = api::Ctx::new(sources.clone()).with_reload(reload_tx, config.api.reload_token()?);
        Some(api::start(config.api.listen, ctx, cancel.child_token()).await?)
    } else {
        None
    };

    let hub_handle = hub.handle();
    let bus_tx = hub.sender();
    let derived_tx = hub.derived_sender();
    let hub = tokio::spawn(hub.run());
    let mut gw = Gateway {
        broker_addr,
        broker_tls_addr,
        api_addr,
        simulators,
        values,
        metrics,
        health,
        sources,
        cancel,
        simulators_cancel,
        hub,
        hub_handle,
        registry,
        bus_tx: Some(bus_tx),
        derived_tx: Some(derived_tx),
        publisher,
        groups: BTreeMap::new(),
        plugins: BTreeMap::new(),
        sinks,
        commands,
        engine: None,
        opcua: crate::drivers::opcua::Context::new(&config.gateway.data_dir, &config.gateway.id),
        fingerprints: Fingerprints::of(&config),
        config,
        reload_rx: Some(reload_rx),
        last_values,
    };
    // Plugins subscribe before the drivers start (the hub takes subscriptions before batches),
    // so they see the first poll.
    let names: Vec<String> = gw.config.plugins.keys().cloned().collect();
    let loaded = gw.load_plugins(&names).await?;
    for (name, loaded) in loaded {
        gw.start_plugin(&name, loaded)?;
    }
    let all: Vec<String> = gw.config.devices.keys().cloned().collect();
    for (group, devices) in groups_of(&gw.config, &all) {
        gw.start_group(group, devices);
    }
    info!(gateway = %gw.config.gateway.id, devices = gw.config.devices.len(), tags = tag_count, "Gateway running.");
    Ok(gw)
}

/// The device groups `names` belong to, each with every device of the config in it.
fn groups_of(config: &Config, names: &[String]) -> BTreeMap<String, Vec<String>> {
    let wanted: std::collections::BTreeSet<String> =
        names.iter().filter_map(|n| config.devices.get(n).map(|d| d.group(n))).collect();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, d) in &config.devices {
        let g = d.group(name);
        if wanted.contains(&g) {
            out.entry(g).or_default().push(name.clone());
        }
    }
    out
}

impl Gateway {
    /// Compiles plugins (hundreds of milliseconds of CPU each: not on an async worker).
    async fn load_plugins(
        &mut self,
        names: &[String],
    ) -> Result<Vec<(String, crate::plugins::host::LoadedPlugin)>, StartError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let engine = match &self.engine {
            Some(e) => e.clone(),
            None => {
                let e = Arc::new(
                    PluginEngine::new(&self.config.gateway.data_dir.join("plugin-cache"))
                        .map_err(|e| StartError::PluginEngine(format!("{e:#}")))?,
                );
                self.engine = Some(e.clone());
                e
            }
        };
        let mut out = Vec::new();
        for name in names {
            let (e, wasm) = (engine.clone(), self.config.plugins[name].wasm.clone());
            let loaded = tokio::task::spawn_blocking(move || e.load(&wasm))
                .await
                .map_err(|e| StartError::PluginEngine(e.to_string()))?
                .map_err(|source| StartError::Plugin { name: name.clone(), source })?;
            info!(plugin = %name, warm = loaded.warm, load_time = ?loaded.load_time, "Plugin loaded.");
            out.push((name.clone(), loaded));
        }
        Ok(out)
    }

    fn start_plugin(&mut self, name: &str, loaded: crate::plugins::host::LoadedPlugin) -> Result<(), StartError> {
        if self.config.plugins[name].subscribe.is_empty() {
            // The deployment leaves the subscription to the plugin (`describe`).
            let p = &self.config.plugins[name];
            let tags = crate::plugins::host::TagView { registry: self.registry.clone(), subscribe: Arc::from([]) };
            let suggested = loaded
                .manifest(name, p.limits.memory.0, p.limits.call_timeout.0, tags)
                .ok()
                .flatten()
                .map(|m| m.subscribe)
                .unwrap_or_default();
            if suggested.is_empty() || suggested.iter().any(|f| crate::config::validate::filter_problem(f).is_some()) {
                return Err(StartError::Io(std::io::Error::other(format!(
                    "plugin `{name}` needs a subscribe list: it suggests no usable one (`updraft check` says more)"
                ))));
            }
            info!(plugin = %name, subscribe = ?suggested, "Subscribing the plugin to its own default filters.");
            if let Some(p) = self.config.plugins.get_mut(name) {
                p.subscribe = suggested;
            }
        }
        let rx = self.hub_handle.subscribe(&plugin_consumer(name), Stage::Transform);
        let out = self.derived_tx.clone().expect("the gateway runs");
        let state_dir = self.config.gateway.data_dir.join("plugin-state");
        let thread = crate::plugins::spawn(
            name,
            &self.config.plugins[name],
            loaded,
            self.registry.clone(),
            rx,
            out,
            &self.metrics,
            &state_dir,
        )?;
        self.plugins.insert(name.to_owned(), thread);
        Ok(())
    }

    /// Closes the plugin's queue and waits for it to finish what it holds.
    async fn stop_plugin(&mut self, name: &str) {
        self.hub_handle.unsubscribe(&plugin_consumer(name));
        if let Some(t) = self.plugins.remove(name) {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    fn start_group(&mut self, group: String, devices: Vec<String>) {
        let cancel = self.cancel.child_token();
        let mut shared =
            crate::drivers::Shared::for_devices(self.opcua.clone(), devices.iter().map(|n| &self.config.devices[n]));
        let mut tasks = JoinSet::new();
        let bus = self.bus_tx.clone().expect("the gateway runs");
        for name in &devices {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            self.commands.set_device(name, Some(tx));
            tasks.spawn(self.config.devices[name].task(
                &mut shared,
                name,
                &self.registry,
                self.metrics.device(name),
                bus.clone(),
                Some(rx),
                cancel.child_token(),
            ));
        }
        self.groups.insert(group, GroupRun { devices, cancel, tasks });
    }

    async fn stop_group(&mut self, group: &str) {
        if let Some(mut g) = self.groups.remove(group) {
            g.cancel.cancel();
            while g.tasks.join_next().await.is_some() {}
            for d in &g.devices {
                self.commands.set_device(d, None);
            }
        }
    }

    /// Stops the sink's client, then closes its queue: the buffer thread writes what is queued to
    /// disk and records the last acknowledgement, so its successor resends only what the cloud
    /// has not confirmed.
    async fn stop_sink(&mut self, name: &str) {
        if let Some(run) = self.sinks.remove(name) {
            run.cancel.cancel();
            let _ = run.client.await;
            self.hub_handle.unsubscribe(&crate::sinks::consumer_name(name));
            let _ = tokio::task::spawn_blocking(move || run.thread.join()).await;
        }
    }

    /// The reload requests from the HTTP API; taken once by the loop that owns the gateway.
    pub fn reload_requests(&mut self) -> Option<tokio::sync::mpsc::Receiver<ReloadRequest>> {
        self.reload_rx.take()
    }

    /// Records the running config as the last good one (`{data_dir}/running-config.json`).
    pub fn keep_config(&self, source: &std::path::Path) {
        if let Err(e) = crate::reload::keep(&self.config.gateway.data_dir, source, &self.fingerprints) {
            warn!(error = %e, "Cannot record the running config.");
        }
    }

    /// Loads `path` and applies it (see [`Gateway::reload`]); the outcome is counted, logged and
    /// shown on the dashboard.
    pub async fn reload_from(&mut self, path: &std::path::Path) -> Result<Diff, String> {
        let p = path.to_path_buf();
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(&p))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("invalid config:\n{e}")));
        let result = match loaded {
            Ok(config) => self.reload(config).await,
            Err(e) => Err(e),
        };
        let now = crate::base::point::now_ms();
        let mut state = self.sources.reload.write().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(diff) => {
                self.metrics.reloads_applied.inc();
                state.applied += 1;
                state.applied_ms = now;
                state.last_error = None;
                state.last_error_ms = None;
                drop(state);
                self.keep_config(path);
                info!(changes = %diff.to_string().trim_end().replace('\n', "; "), "Config reloaded.");
            }
            Err(e) => {
                self.metrics.reloads_refused.inc();
                state.refused += 1;
                state.last_error = Some(e.clone());
                state.last_error_ms = Some(now);
                warn!(path = %path.display(), error = %e, "Reload refused; the running config stays.");
            }
        }
        result
    }

    /// Applies a new, valid config: only the devices, plugins and sinks that changed restart; the
    /// broker (its sessions and retained values), the hub's current values and every buffer
    /// carry on. A change only a restart applies (`[broker]`, `[gateway]`, …) refuses the whole
    /// reload, and so does a plugin that does not compile: nothing is half-applied.
    pub async fn reload(&mut self, new: Config) -> Result<Diff, String> {
        let fingerprints = Fingerprints::of(&new);
        let diff = Diff::between(&self.fingerprints, &fingerprints);
        if !diff.restart.is_empty() {
            return Err(format!(
                "{} changed, which only a restart applies (systemctl restart updraft); nothing was changed",
                diff.restart.join(", ")
            ));
        }
        if diff.is_empty() {
            return Ok(diff);
        }
        // Everything that can fail before anything stops: compile the new plugins with the new
        // config's files.
        let old = std::mem::replace(&mut self.config, new);
        let starting: Vec<String> = diff.plugins.starting().cloned().collect();
        let loaded = match self.load_plugins(&starting).await {
            Ok(l) => l,
            Err(e) => {
                self.config = old;
                return Err(format!("{e}; nothing was changed"));
            }
        };
        // Stop what goes or changes: devices first (no new points for a plugin that stops),
        // then plugins, then sinks.
        for g in &diff.groups {
            self.stop_group(g).await;
        }
        for name in &diff.devices.removed {
            self.values.forget_device(name);
            self.metrics.forget(Some(name), None, None);
        }
        for name in diff.plugins.stopping() {
            self.stop_plugin(name).await;
        }
        for name in &diff.plugins.removed {
            self.metrics.forget(None, Some(name), None);
        }
        for name in diff.sinks.stopping() {
            self.stop_sink(name).await;
        }
        for name in &diff.sinks.removed {
            self.metrics.forget(None, None, Some(name));
        }
        // Start in the reverse order: sinks, plugins, devices.
        let mut failed = Vec::new();
        for name in diff.sinks.starting() {
            let hub = self.hub_handle.clone();
            match crate::sinks::start_one(
                &self.config,
                name,
                |consumer| hub.subscribe(consumer, Stage::Terminal),
                &self.metrics,
                &self.commands,
                self.cancel.child_token(),
            ) {
                Ok(run) => {
                    self.sinks.insert(name.clone(), run);
                }
                Err(e) => failed.push(format!("sink `{name}`: {e}")),
            }
        }
        for (name, loaded) in loaded {
            if let Err(e) = self.start_plugin(&name, loaded) {
                failed.push(format!("plugin `{name}`: {e}"));
            }
        }
        let names: Vec<String> = diff.devices.starting().chain(&diff.along).cloned().collect();
        for (group, devices) in groups_of(&self.config, &names) {
            self.start_group(group, devices);
        }
        self.fingerprints = fingerprints;
        self.health.watch(
            self.config.devices.keys().cloned().collect(),
            self.config.north.iter().map(|(n, s)| (n.clone(), s.buffer().stall_after.0)).collect(),
            &names,
            &diff.sinks.starting().cloned().collect::<Vec<_>>(),
        );
        *self.sources.inventory.write().unwrap_or_else(|e| e.into_inner()) = crate::status::Inventory::of(&self.config);
        if failed.is_empty() {
            Ok(diff)
        } else {
            // The config is applied, but a part of it could not start: say which, loudly.
            Err(format!("applied, but these did not start: {}", failed.join("; ")))
        }
    }
}

fn plugin_consumer(name: &str) -> String {
    format!("plugin:{name}")
}

/// Compiles and links every plugin of a config and runs its `init` with its deployment's
/// `config`, in the same sandbox as at run time, for `updraft check`. Uses a throw-away cache.
/// A refusal is reported at the plugin's `config` (at the key the message names, if any).
pub fn check_plugins(config: &Config, file: &std::path::Path) -> Vec<String> {
    if config.plugins.is_empty() {
        return Vec::new();
    }
    let at_file = || file.display().to_string();
    // A private, unpredictable folder (a fixed name under /tmp could be planted by another user).
    let tmp = match tempfile::Builder::new().prefix("updraft-check-").tempdir() {
        Ok(t) => t,
        Err(e) => return vec![format!("{}: cannot create a temporary folder to compile plugins in: {e}", at_file())],
    };
    let dir = tmp.path().join("cache");
    let engine = match PluginEngine::new(&dir) {
        Ok(e) => e,
        Err(e) => return vec![format!("{}: cannot start the plugin engine: {e:#}", at_file())],
    };
    let problems = config
        .plugins
        .iter()
        .flat_map(|(name, p)| {
            let loaded = match engine.load(&p.wasm) {
                Ok(l) => l,
                Err(e) => return vec![format!("{}: plugin `{name}`: {e}", at_file())],
            };
            let json = crate::plugins::config_json(p);
            let tags = crate::plugins::host::TagView {
                registry: Arc::new(Registry::default()),
                subscribe: p.subscribe.clone().into(),
            };
            // Without the running gateway's state: check judges the config, not what was saved.
            match loaded.instantiate(name, &json, p.limits.memory.0, p.limits.call_timeout.0, tags, None) {
                Ok(inst) => declared(file, name, p, inst.manifest()),
                Err(crate::plugins::host::CallFailure::Error(m)) => {
                    // The key the message names first, if it names any.
                    let mut keys: Vec<(usize, &str)> =
                        p.config.keys().filter_map(|k| mentions(&m, k).map(|at| (at, k.as_str()))).collect();
                    keys.sort();
                    let keys: Vec<&str> = keys.into_iter().map(|(_, k)| k).collect();
                    let at = crate::config::locate(file, &["plugins", name, "config"], &keys);
                    vec![format!("{at}: plugin `{name}` refused its config: {m}")]
                }
                Err(crate::plugins::host::CallFailure::Trap { kind, reason }) => {
                    let at = crate::config::locate(file, &["plugins", name], &[]);
                    vec![format!("{at}: plugin `{name}` trapped in init ({kind}): {reason}")]
                }
            }
        })
        .collect();
    drop(tmp);
    problems
}

/// What a deployment gets wrong about what its plugin declares: an output the plugin emits to
/// that `[plugins.NAME.outputs]` leaves unmapped (its points would be dropped at run time), an
/// output mapped that the plugin never emits to (a typo), no `subscribe` where the plugin suggests
/// none.
fn declared(
    file: &std::path::Path,
    name: &str,
    p: &crate::config::PluginConfig,
    manifest: Option<&crate::plugins::host::Manifest>,
) -> Vec<String> {
    let mut out = Vec::new();
    if p.subscribe.is_empty() && manifest.is_none_or(|m| m.subscribe.is_empty()) {
        let at = crate::config::locate(file, &["plugins", name], &[]);
        out.push(format!(
            "{at}: plugin `{name}` needs a subscribe list (`subscribe = [\"device/tag\", \"device/*\"]`): it suggests none"
        ));
    }
    let Some(m) = manifest else { return out };
    if p.subscribe.is_empty() {
        for problem in m.subscribe.iter().filter_map(|f| crate::config::validate::filter_problem(f)) {
            let at = crate::config::locate(file, &["plugins", name], &[]);
            out.push(format!("{at}: plugin `{name}`'s default subscribe: {problem}"));
        }
    }
    for o in m.outputs.iter().filter(|o| *o != "default" && !p.outputs.contains_key(*o)) {
        let at = crate::config::locate(file, &["plugins", name], &[]);
        out.push(format!(
            "{at}: plugin `{name}` emits to output `{o}`, which [plugins.{name}.outputs] does not map, so those points would be dropped: add {o} = \"updraft/{o}/{{device}}/{{tag}}\" (or another topic)"
        ));
    }
    for o in p.outputs.keys().filter(|o| *o != "default" && !m.outputs.contains(o)) {
        let at = crate::config::locate(file, &["plugins", name, "outputs", o], &[]);
        out.push(format!(
            "{at}: plugin `{name}` never emits to an output `{o}` (it emits to: {})",
            m.outputs.join(", ")
        ));
    }
    out
}

/// Where `message` first names `key` as a word (not inside a longer name).
fn mentions(message: &str, key: &str) -> Option<usize> {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    message.match_indices(key).map(|(i, _)| i).find(|&i| {
        let before = message[..i].chars().next_back();
        let after = message[i + key.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

impl Gateway {
    /// Stops polling and drains the pipeline, giving up after `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        self.cancel.cancel();
        let drain = async {
            for (_, mut g) in std::mem::take(&mut self.groups) {
                while g.tasks.join_next().await.is_some() {}
            }
            // The hub's first phase ends once no driver can send any more.
            self.bus_tx = None;
            self.derived_tx = None;
            self.simulators_cancel.cancel();
            let _ = (&mut self.hub).await;
            for (_, p) in std::mem::take(&mut self.plugins) {
                let _ = tokio::task::spawn_blocking(move || p.join()).await;
            }
            if let Some(p) = self.publisher.take() {
                let _ = tokio::task::spawn_blocking(move || p.join()).await;
            }
            // Buffer threads sync and record the last acknowledgements as their queues close.
            for (_, s) in std::mem::take(&mut self.sinks) {
                let _ = tokio::task::spawn_blocking(move || s.thread.join()).await;
            }
        };
        let finished = tokio::time::timeout(grace, drain).await;
        self.simulators_cancel.cancel();
        // After the drain, so the file holds the last reads; also after an expired grace period,
        // since the values in memory are good whatever is still in flight.
        if let Some(path) = self.last_values.take() {
            let values = self.values.clone();
            let saved = tokio::task::spawn_blocking(move || {
                let r = crate::last_values::save(&values, &path);
                (r, path)
            })
            .await;
            match saved {
                Ok((Ok(n), path)) => info!(values = n, path = %path.display(), "Saved the last values."),
                Ok((Err(e), path)) => warn!(path = %path.display(), error = %e, "Cannot save the last values."),
                Err(e) => warn!(error = %e, "Cannot save the last values."),
            }
        }
        if finished.is_err() {
            warn!(?grace, "Shutdown grace period expired; exiting with work in flight.");
            for g in self.groups.values_mut() {
                g.tasks.abort_all();
            }
            self.hub.abort();
        } else {
            info!("Gateway stopped cleanly.");
        }
    }
}
