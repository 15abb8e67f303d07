//! Builds the pipeline from a config, starts it, and drains it on shutdown.
//!
//! Start order: simulators (so the demo's devices answer at once), the embedded broker, the hub's
//! consumers, the HTTP API, then the drivers. Shutdown is one `CancellationToken`: drivers stop and
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
use crate::broker::{self, BrokerError};
use crate::config::Config;
use crate::hub::{CurrentValues, Hub, Stage};
use crate::metrics::Metrics;
use crate::plugins::host::PluginEngine;

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
    cancel: CancellationToken,
    /// The built-in simulators stop after the drivers, so no driver sees its device vanish (and
    /// logs it) during an orderly shutdown.
    simulators_cancel: CancellationToken,
    drivers: JoinSet<()>,
    hub: tokio::task::JoinHandle<()>,
    publisher: Option<std::thread::JoinHandle<()>>,
    plugins: Vec<std::thread::JoinHandle<()>>,
    sinks: Vec<std::thread::JoinHandle<()>>,
    /// Where the last values are saved at shutdown, unless that is off.
    last_values: Option<std::path::PathBuf>,
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
    // Before the broker accepts its first client, so nobody sees an empty bus after a restart.
    let save_every = config.gateway.save_values_every.0;
    let last_values = (!save_every.is_zero()).then(|| crate::last_values::path(&config));
    if let Some(path) = &last_values {
        let restored = crate::last_values::restore(&config, &hub.registry(), &values, path);
        if restored > 0 {
            info!(values = restored, path = %path.display(), "Restored the last values saved before the restart.");
        }
        crate::last_values::spawn_saver(values.clone(), path.clone(), save_every, cancel.child_token());
    }

    let tag_count: usize = config.devices.values().map(|d| d.tag_names().count()).sum();
    // One write queue per device, shared by the local broker's command listener and the cloud
    // sinks' command subscriptions.
    let mut write_txs = std::collections::HashMap::new();
    let mut write_rxs = std::collections::HashMap::new();
    for name in config.devices.keys() {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        write_txs.insert(name.clone(), tx);
        write_rxs.insert(name.clone(), rx);
    }
    let commands = crate::commands::Commands::new(write_txs, metrics.commands.clone());
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
            b.spawn_tap(&filters, &own_output, hub.registry(), hub.derived_sender(), dropped, cancel.child_token());
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
    let sinks = crate::sinks::start_all(&config, &mut hub, &metrics, &commands, &cancel)?;

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
        reload: std::sync::RwLock::default(),
    });
    let api_addr = if config.api.enabled {
        let ctx = api::Ctx::new(sources.clone());
        Some(api::start(config.api.listen, ctx, cancel.child_token()).await?)
    } else {
        None
    };

    let mut plugins = Vec::new();
    if !config.plugins.is_empty() {
        let engine = Arc::new(
            PluginEngine::new(&config.gateway.data_dir.join("plugin-cache"))
                .map_err(|e| StartError::PluginEngine(format!("{e:#}")))?,
        );
        for (name, p) in &config.plugins {
            // Compiling takes hundreds of milliseconds of CPU: not on an async worker.
            let (e, wasm) = (engine.clone(), p.wasm.clone());
            let loaded = tokio::task::spawn_blocking(move || e.load(&wasm))
                .await
                .map_err(|e| StartError::PluginEngine(e.to_string()))?
                .map_err(|source| StartError::Plugin { name: name.clone(), source })?;
            info!(plugin = %name, warm = loaded.warm, load_time = ?loaded.load_time, "Plugin loaded.");
            let rx = hub.subscribe(&format!("plugin:{name}"), Stage::Transform);
            plugins.push(crate::plugins::spawn(name, p, loaded, hub.registry(), rx, hub.derived_sender(), &metrics)?);
        }
    }

    let mut drivers = JoinSet::new();
    let mut shared = crate::drivers::Shared::new(&config);
    for (name, device) in &config.devices {
        let commands = write_rxs.remove(name);
        drivers.spawn(device.task(
            &mut shared,
            name,
            &hub.registry(),
            metrics.device(name),
            hub.sender(),
            commands,
            cancel.child_token(),
        ));
    }
    let hub = tokio::spawn(hub.run());
    info!(gateway = %config.gateway.id, devices = config.devices.len(), tags = tag_count, "Gateway running.");
    Ok(Gateway {
        broker_addr,
        broker_tls_addr,
        api_addr,
        simulators,
        values,
        metrics,
        health,
        cancel,
        simulators_cancel,
        drivers,
        hub,
        publisher,
        plugins,
        sinks,
        last_values,
    })
}

/// Compiles and links every plugin of a config, for `updraft check`. Uses a throw-away cache.
pub fn check_plugins(config: &Config) -> Vec<String> {
    if config.plugins.is_empty() {
        return Vec::new();
    }
    // A private, unpredictable folder (a fixed name under /tmp could be planted by another user).
    let tmp = match tempfile::Builder::new().prefix("updraft-check-").tempdir() {
        Ok(t) => t,
        Err(e) => return vec![format!("cannot create a temporary folder to compile plugins in: {e}")],
    };
    let dir = tmp.path().join("cache");
    let engine = match PluginEngine::new(&dir) {
        Ok(e) => e,
        Err(e) => return vec![format!("cannot start the plugin engine: {e:#}")],
    };
    let problems = config
        .plugins
        .iter()
        .filter_map(|(name, p)| engine.load(&p.wasm).err().map(|e| format!("plugin `{name}`: {e}")))
        .collect();
    drop(tmp);
    problems
}

impl Gateway {
    /// Stops polling and drains the pipeline, giving up after `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        self.cancel.cancel();
        let drain = async {
            while self.drivers.join_next().await.is_some() {}
            self.simulators_cancel.cancel();
            let _ = (&mut self.hub).await;
            for p in self.plugins.drain(..) {
                let _ = tokio::task::spawn_blocking(move || p.join()).await;
            }
            if let Some(p) = self.publisher.take() {
                let _ = tokio::task::spawn_blocking(move || p.join()).await;
            }
            // Buffer threads sync and record the last acknowledgements as their queues close.
            for s in self.sinks.drain(..) {
                let _ = tokio::task::spawn_blocking(move || s.join()).await;
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
            self.drivers.abort_all();
            self.hub.abort();
        } else {
            info!("Gateway stopped cleanly.");
        }
    }
}
