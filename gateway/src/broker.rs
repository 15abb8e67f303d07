//! The embedded MQTT broker (rumqttd) and the thread that publishes every point into it.
//!
//! rumqttd has no stop API and its `start()` blocks, so it runs on its own named thread for the
//! life of the process. Two of its habits are guarded here: it only logs a listener that cannot
//! bind (we check the port first and watch the listener come up), and its default memory budget is
//! about 1 GB per subscription filter (we size it from the config).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::BrokerSection;
use crate::metrics::Metrics;
use crate::point::Batch;

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
}

/// Most points handed to the router in one wake-up.
const MAX_BURST: usize = 512;

/// Topic prefix of every device reading on the local bus.
pub const TOPIC_PREFIX: &str = "updraft";

/// How many retained messages rumqttd hands a new QoS 0 subscriber at once. It truncates the
/// retained set to its `max_outgoing_packet_count`, so this must exceed the number of tags.
fn outgoing_packet_count(expected_topics: usize) -> u64 {
    (expected_topics as u64 * 2).max(1024)
}

/// Starts rumqttd on its own thread and waits until its listener accepts connections.
pub fn start(cfg: &BrokerSection, expected_topics: usize) -> Result<EmbeddedBroker, BrokerError> {
    let addr = check_bind(cfg.listen)?;
    // rumqttd keeps every filter's log full at all times (old segments go only when a new one is
    // needed), so the budget is memory spent per subscription filter, always. Four segments let a
    // slow subscriber lose a quarter of its backlog at a time rather than all of it.
    let segments = 4usize;
    let segment = (cfg.buffer_per_subscription.0 / segments as u64).max(16 * 1024);
    let server = rumqttd::ServerSettings {
        name: "mqtt-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: cfg.max_payload_size.0 as usize,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: cfg.max_connections + 4,
            max_outgoing_packet_count: outgoing_packet_count(expected_topics),
            max_segment_size: segment as usize,
            max_segment_count: segments,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
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
    wait_listening(addr, &done_rx)?;
    info!(%addr, "Embedded MQTT broker listening.");
    Ok(EmbeddedBroker { addr, pub_tx, _pub_rx: pub_rx, local: Some(local), tap: Some(tap) })
}

/// Fails with a clear message if the address is taken, and resolves port 0 to a free port.
fn check_bind(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| BrokerError::Bind { addr, source })?;
    drop(listener);
    Ok(bound)
}

fn wait_listening(addr: SocketAddr, done: &std_mpsc::Receiver<()>) -> Result<(), BrokerError> {
    let waited = Duration::from_secs(5);
    let deadline = Instant::now() + waited;
    let probe = if addr.ip().is_unspecified() {
        SocketAddr::new(
            if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() },
            addr.port(),
        )
    } else {
        addr
    };
    while Instant::now() < deadline {
        if done.try_recv().is_ok() {
            return Err(BrokerError::Stopped);
        }
        if mqtt_handshake(probe).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening { addr, waited })
}

/// Proves the listener speaks MQTT: CONNECT, expect CONNACK "accepted", DISCONNECT. A bare TCP
/// probe would also work but makes rumqttd log an error for the aborted handshake.
fn mqtt_handshake(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let client_id = b"updraft-startup-probe";
    let mut connect = vec![0x10, (10 + 2 + client_id.len()) as u8];
    connect.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C]);
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id);
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

impl EmbeddedBroker {
    /// Spawns the publisher thread: every point of every batch goes to `updraft/{device}/{tag}`,
    /// retained, so a late subscriber sees the last value at once. `LinkTx` sends block, so this
    /// runs on its own OS thread and never on the async runtime.
    pub fn spawn_publisher(
        mut self,
        mut rx: mpsc::Receiver<Batch>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("mqtt-publisher".into()).spawn(move || {
            let mut json = Vec::with_capacity(256);
            while let Some(first) = rx.blocking_recv() {
                let mut batches = vec![first];
                // Drain what is already queued so the router is woken once per burst, not per
                // point, but keep bursts small: the link's and the router's queues keep the
                // capacity of the largest burst they ever held.
                let mut points = batches[0].len();
                while points < MAX_BURST {
                    match rx.try_recv() {
                        Ok(b) => {
                            points += b.len();
                            batches.push(b);
                        }
                        Err(_) => break,
                    }
                }
                let mut publishes = Vec::with_capacity(points);
                for batch in &batches {
                    for p in batch.iter() {
                        // A local client's message is already on the broker.
                        if p.key.external {
                            continue;
                        }
                        // A plugin's message goes out verbatim and is an event, not state: not retained.
                        if let Some(raw) = &p.payload {
                            publishes
                                .push(Packet::Publish(Publish::new(p.key.topic.clone(), raw.clone(), false), None));
                            continue;
                        }
                        json.clear();
                        p.write_json(&mut json);
                        // An exact-size copy: the broker keeps payloads alive in its retained map
                        // and logs, where a spare-capacity `Vec` would cost twice the memory.
                        let payload = Bytes::copy_from_slice(&json);
                        publishes.push(Packet::Publish(Publish::new(p.key.topic.clone(), payload, true), None));
                    }
                }
                let Some(last) = publishes.pop() else {
                    continue;
                };
                let count = publishes.len() as u64 + 1;
                // Backpressure: the router takes the link's whole buffer at each wake-up, so a buffer
                // that still holds a burst means the router is behind. Wait for it rather than queue
                // without bound; meanwhile the hub drops (and counts) what the broker cannot take.
                while self.pub_tx.buffer().len() >= MAX_BURST {
                    std::thread::sleep(Duration::from_micros(200));
                }
                // Queue the burst straight into the link's buffer, then send the last packet the
                // normal way, which wakes the router once for the whole burst.
                self.pub_tx.buffer().extend(publishes);
                if let Err(e) = complete_now(self.pub_tx.send(last)) {
                    warn!(error = %e, "Embedded broker link closed; stopping the publisher.");
                    break;
                }
                metrics.broker_published.add(count);
            }
            debug!("Broker publisher stopped.");
        })
    }
}

/// Most distinct local topics taken in for the cloud sinks. Each costs a tag key and a dictionary
/// entry for the life of the process, so a client publishing on ever-new topics must not grow them
/// without bound.
pub const MAX_EXTERNAL_TOPICS: usize = 10_000;

impl EmbeddedBroker {
    /// Subscribes to `filters` on the local broker and feeds what local MQTT clients publish there
    /// to the cloud sinks, as verbatim messages. The gateway's own `updraft/…` topics are skipped
    /// (their points reach the sinks directly), and so are topics starting with `skip_prefixes`
    /// (the sinks' own output, when a sink publishes to this broker).
    pub fn spawn_tap(
        &mut self,
        filters: &[String],
        skip_prefixes: &[String],
        registry: Arc<crate::point::Registry>,
        tx: crate::hub::BusSender,
        dropped: Arc<crate::metrics::Counter>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let Some((mut link_tx, mut rx)) = self.tap.take() else { return };
        for f in filters {
            if let Err(e) = link_tx.subscribe(f.as_str()) {
                warn!(filter = %f, error = %e, "Cannot subscribe to a local topic for the cloud sinks.");
            }
        }
        let mut external = 0usize;
        let mut skip: Vec<String> = skip_prefixes.to_vec();
        skip.push(format!("{TOPIC_PREFIX}/"));
        tokio::spawn(async move {
            let _keep = link_tx;
            loop {
                let publish = tokio::select! {
                    n = rx.next() => match n {
                        Ok(Some(rumqttd::Notification::Forward(f))) => f.publish,
                        Ok(_) => continue,
                        Err(_) => break,
                    },
                    _ = cancel.cancelled() => break,
                };
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                if skip.iter().any(|p| topic.starts_with(p.as_str())) {
                    continue;
                }
                let key = match registry.get_topic(&topic) {
                    Some(k) => k,
                    None if external >= MAX_EXTERNAL_TOPICS => {
                        dropped.inc();
                        if dropped.get() == 1 {
                            warn!(limit = MAX_EXTERNAL_TOPICS, %topic, "Too many distinct local topics for the cloud sinks; dropping messages on new ones.");
                        }
                        continue;
                    }
                    None => {
                        external += 1;
                        registry.intern_external(&topic)
                    }
                };
                let point = crate::point::Point::message(key, publish.payload, crate::point::now_ms());
                if tx.send(crate::hub::batch(vec![point])).await.is_err() {
                    break;
                }
            }
            debug!("Local topic tap stopped.");
        });
    }
}

/// Topic filter of local write commands: `updraft/{device}/{tag}/set`.
pub const SET_FILTER: &str = "updraft/+/+/set";

impl EmbeddedBroker {
    /// Spawns the task that turns `updraft/{device}/{tag}/set` messages from local clients into
    /// device writes and answers on `…/set/reply` with `{"ok": true}` or `{"ok": false, "error"}`.
    /// The payload is the value (`42`, `true`) or `{"value": 42}`. Each write is bounded by its
    /// device's timeout.
    pub fn spawn_command_listener(&mut self, devices: HashMap<String, crate::drivers::WriteTx>) {
        let Some((mut tx, mut rx)) = self.local.take() else { return };
        if let Err(e) = tx.subscribe(SET_FILTER) {
            warn!(error = %e, "Cannot subscribe to local write commands.");
            return;
        }
        let devices = Arc::new(devices);
        // Commands run concurrently (a slow device does not hold up writes to the others); each
        // reply comes back here because only this task owns the link.
        let (reply_tx, mut replies) = mpsc::channel::<(String, String)>(64);
        tokio::spawn(async move {
            loop {
                let publish = tokio::select! {
                    n = rx.next() => match n {
                        Ok(Some(rumqttd::Notification::Forward(f))) => f.publish,
                        Ok(_) => continue,
                        Err(e) => {
                            debug!(error = %e, "Command link closed.");
                            break;
                        }
                    },
                    Some((topic, body)) = replies.recv() => {
                        if let Err(e) = tx.publish(topic, body) {
                            warn!(error = %e, "Cannot publish a command reply.");
                        }
                        continue;
                    }
                };
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                let submitted = submit_command(&topic, &publish.payload, &devices);
                let reply_tx = reply_tx.clone();
                tokio::spawn(async move {
                    let result = match submitted {
                        Ok(wait) => wait.await.unwrap_or_else(|_| Err("the device's driver has stopped".into())),
                        Err(e) => Err(e),
                    };
                    let body = match &result {
                        Ok(()) => serde_json::json!({ "ok": true }),
                        Err(e) => serde_json::json!({ "ok": false, "error": e }),
                    };
                    let _ = reply_tx.send((format!("{topic}/reply"), body.to_string())).await;
                });
            }
        });
    }
}

/// Parses a local write command and queues it on its device's driver.
fn submit_command(
    topic: &str,
    payload: &[u8],
    devices: &HashMap<String, crate::drivers::WriteTx>,
) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, String> {
    let parts: Vec<&str> = topic.split('/').collect();
    let [_, device, tag, _] = parts.as_slice() else { return Err(format!("bad command topic `{topic}`")) };
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("payload is not JSON ({e}); send e.g. 42 or {{\"value\": 42}}"))?;
    let value = match value {
        serde_json::Value::Object(mut m) => m.remove("value").ok_or("object payload needs a `value` key")?,
        v => v,
    };
    crate::drivers::submit(devices, device, tag, value)
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
