//! The embedded MQTT broker (rumqttd): start-up and its probe. The broker's other jobs each have
//! a file: `publisher` (every point onto the bus), `tap` (local topics for the cloud sinks),
//! `commands` (local write commands), `auth` (user accounts) and `tls` (the TLS front).
//!
//! rumqttd has no stop API and its `start()` blocks, so it runs on its own named thread for the
//! life of the process. Two of its habits are guarded here: it only logs a listener that cannot
//! bind (we check the port first and watch the listener come up), and its default memory budget is
//! about 1 GB per subscription filter (we size it from the config).

pub mod auth;
mod commands;
mod publisher;
pub mod retained;
pub mod rights;
mod tap;
pub mod tls;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use tracing::{info, warn};

pub use commands::SET_FILTER;
pub use tap::MAX_EXTERNAL_TOPICS;

use crate::config::BrokerSection;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the MQTT broker cannot listen on {addr}: {source}; another broker may be running there — change [broker] listen or stop the other program")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the MQTT broker did not start listening on {addr} within {waited:?}")]
    NotListening { addr: SocketAddr, waited: Duration },
    #[error("the MQTT broker stopped during start-up (see the log above)")]
    Stopped,
    #[error("cannot open an in-process link to the broker: {0}")]
    Link(String),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the MQTT broker cannot listen with TLS on {addr}: {source}; change [broker] tls.listen (or listen) or stop the other program")]
    TlsBind { addr: SocketAddr, source: std::io::Error },
    #[error("[broker] tls: {0}")]
    Tls(String),
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// The address the listener actually bound (port 0 in the config is resolved here).
    pub addr: SocketAddr,
    pub_tx: LinkTx,
    /// Kept open so the router never sees the publisher link as half-closed; nothing is read.
    _pub_rx: LinkRx,
    /// In-process subscriber link, for cloud commands and local writes (taken by later stages).
    pub local: Option<(LinkTx, LinkRx)>,
    /// In-process subscriber link for local topics the cloud sinks forward.
    pub tap: Option<(LinkTx, LinkRx)>,
    /// The TLS listener, bound at start and served by `spawn_tls`.
    tls: Option<(std::net::TcpListener, rustls::ServerConfig)>,
    /// The router's subscription filters, for the publisher's interest check.
    filters: Arc<rumqttd::FilterWatch>,
}

/// Most points handed to the router in one wake-up.
const MAX_BURST: usize = 512;

pub use crate::base::topic::TOPIC_PREFIX;

/// Most messages the router hands a QoS 0 subscriber in one read (QoS 1 and 2 are bounded by
/// the in-flight window); retained messages beyond it follow in the next reads.
const OUTGOING_PACKET_COUNT: u64 = 1024;

/// Starts rumqttd on its own thread and waits until its listener accepts connections. With
/// `accounts`, every network client must log in; the in-process links never do. The retained
/// values of the gateway's own topics are `values`, read when a client subscribes. With `rights`,
/// network clients publish and subscribe only within their topic rights. The router counts what
/// it loses and forgets in `counters`.
pub fn start(
    cfg: &BrokerSection,
    values: Arc<crate::hub::CurrentValues>,
    accounts: Option<Arc<auth::Accounts>>,
    rights: Option<Arc<rights::TopicRights>>,
    counters: Arc<rumqttd::Counters>,
) -> Result<EmbeddedBroker, BrokerError> {
    let addr = check_bind(cfg.plain_listen())?;
    let tls = match (&cfg.tls, cfg.tls_listen()) {
        (Some(t), Some(at)) => {
            let config = tls::server_config(t).map_err(|(k, e)| BrokerError::Tls(format!("{k}: {e}")))?;
            let listener = tls::bind(at).map_err(|source| BrokerError::TlsBind { addr: at, source })?;
            Some((listener, config))
        }
        _ => None,
    };
    // rumqttd keeps every filter's log full at all times (old segments go only when a new one is
    // needed), so the budget is memory spent per subscription filter, always. Four segments let a
    // slow subscriber lose a quarter of its backlog at a time rather than all of it.
    let segments = 4usize;
    let segment = (cfg.buffer_per_subscription.0 / segments as u64).max(16 * 1024);
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: cfg.max_payload_size.0 as usize,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(a) = &accounts {
        a.install(&mut connections);
    }
    let server = rumqttd::ServerSettings {
        name: "mqtt-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // The gateway's own three in-process links (publisher, command listener, north tap)
            // take router slots too.
            max_connections: cfg.max_connections + 3,
            max_outgoing_packet_count: OUTGOING_PACKET_COUNT,
            max_segment_size: segment as usize,
            max_segment_count: segments,
            session_expiry: Some(cfg.session_expiry.0),
            max_saved_sessions: Some(cfg.max_connections),
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    let filters = Arc::new(rumqttd::FilterWatch::default());
    let hooks = rumqttd::Hooks {
        retained: Some(Arc::new(retained::Retained { values })),
        filters: Some(filters.clone()),
        rights: rights.map(|r| r as Arc<dyn rumqttd::Rights>),
        counters: Some(counters),
    };
    let mut broker = rumqttd::Broker::with_hooks(config, hooks);
    // In-process links must be taken before `start()`, which never returns while healthy.
    let (pub_tx, pub_rx) = broker.link("updraft-publisher").map_err(|e| BrokerError::Link(e.to_string()))?;
    let local = broker.link("updraft-local").map_err(|e| BrokerError::Link(e.to_string()))?;
    let tap = broker.link("updraft-north-tap").map_err(|e| BrokerError::Link(e.to_string()))?;
    let (done_tx, done_rx) = std_mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                warn!(error = %e, "Embedded MQTT broker stopped.");
            }
            let _ = done_tx.send(());
        })
        .map_err(BrokerError::Thread)?;
    let login = accounts.as_ref().map(|a| a.probe_login());
    wait_listening(addr, login, &done_rx)?;
    info!(%addr, "Embedded MQTT broker listening.");
    if cfg.exposed() && accounts.is_none() && cfg.allow_anonymous {
        warn!("The embedded broker accepts anonymous clients from the network (allow_anonymous = true): anyone who can reach it reads the plant's data{}.",
            if cfg.writes_on() { " and writes to equipment" } else { "" });
    }
    Ok(EmbeddedBroker { addr, pub_tx, _pub_rx: pub_rx, local: Some(local), tap: Some(tap), tls, filters })
}

impl EmbeddedBroker {
    /// Serves the TLS listener, if configured; returns its address.
    pub fn spawn_tls(
        &mut self,
        max_connections: usize,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Option<SocketAddr>, BrokerError> {
        let Some((listener, config)) = self.tls.take() else { return Ok(None) };
        let upstream = probe_addr(self.addr);
        let at = listener.local_addr().map_err(BrokerError::Thread)?;
        tls::spawn(listener, config, upstream, max_connections, cancel)
            .map(Some)
            .map_err(|source| BrokerError::TlsBind { addr: at, source })
    }
}

/// Fails with a clear message if the address is taken, and resolves port 0 to a free port.
fn check_bind(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| BrokerError::Bind { addr, source })?;
    drop(listener);
    Ok(bound)
}

/// The address this machine reaches a listener at (a wildcard address is reached on loopback).
fn probe_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() },
            addr.port(),
        )
    } else {
        addr
    }
}

fn wait_listening(
    addr: SocketAddr,
    login: Option<(&str, &str)>,
    done: &std_mpsc::Receiver<()>,
) -> Result<(), BrokerError> {
    let waited = Duration::from_secs(5);
    let deadline = Instant::now() + waited;
    let probe = probe_addr(addr);
    while Instant::now() < deadline {
        if done.try_recv().is_ok() {
            return Err(BrokerError::Stopped);
        }
        if mqtt_handshake(probe, login).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening { addr, waited })
}

/// Proves the listener speaks MQTT: CONNECT, expect CONNACK "accepted", DISCONNECT. A bare TCP
/// probe would also work but makes rumqttd log an error for the aborted handshake.
fn mqtt_handshake(addr: SocketAddr, login: Option<(&str, &str)>) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let client_id = b"updraft-startup-probe";
    // Variable header: protocol name, level 4, flags (clean session, plus user name and password
    // when logging in), keep-alive 60 s; then the payload's length-prefixed strings.
    let flags = if login.is_some() { 0xC2 } else { 0x02 };
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, flags, 0x00, 0x3C];
    let mut field = |b: &[u8]| {
        body.extend_from_slice(&(b.len() as u16).to_be_bytes());
        body.extend_from_slice(b);
    };
    field(client_id);
    if let Some((user, password)) = login {
        field(user.as_bytes());
        field(password.as_bytes());
    }
    if body.len() > 127 {
        return Err(std::io::Error::other("probe CONNECT too long"));
    }
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend_from_slice(&body);
    s.write_all(&connect)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other(format!("unexpected CONNACK {connack:02x?}")));
    }
    s.write_all(&[0xE0, 0x00])?;
    // Wait for the broker to close its side, so it is done with the session before we go.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    Ok(())
}

/// Completes a future that is known to be ready on its first poll: `LinkTx::send` is an `async fn`
/// that never awaits (its channel send blocks instead).
fn complete_now<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
