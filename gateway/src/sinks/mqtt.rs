//! The MQTT transport of a sink (rumqttc): sends the outbox's messages, maps PUBACKs back to
//! buffer records, keeps the gateway's status topic, and takes write commands from the cloud.
//!
//! rumqttc's `publish` returns once the request is queued, not when the broker has it, and it has no
//! delivery token. So each connection gets a fresh client and event loop, driven from one task:
//! publishes are requested in a known order, `Outgoing::Publish(pkid)` events come back in that
//! order and give each message its packet id, and `Incoming::PubAck(pkid)` settles it. A fresh event
//! loop per connection also means rumqttc never replays its own copy of unacknowledged messages
//! after a reconnect: the outbox rewinds to the first unacknowledged record instead, the one source
//! of truth.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::outbox::{Outbox, Token};
use super::{tls, SinkStats};
use crate::backoff::backoff;
use crate::commands::{reply, Commands, Route};
use crate::config::MqttNorth;

/// Where the cloud broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let bad = || format!("url `{url}` must be mqtt://host[:port] or mqtts://host[:port]");
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let tls = match scheme {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => return Err(bad()),
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains(['/', '@', '?']) {
            return Err(bad());
        }
        let default_port = if tls { 8883 } else { 1883 };
        // `[::1]:1883` style IPv6 literals keep their brackets out of the host.
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (h, p.parse::<u16>().map_err(|_| bad())?),
            _ => (rest, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Endpoint { host: host.to_owned(), port, tls })
    }
}

pub struct MqttSink {
    name: String,
    cfg: MqttNorth,
    endpoint: Endpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    client_id: String,
    qos: QoS,
    status_topic: String,
    commands_route: Route,
    commands: Arc<Commands>,
    stats: Arc<SinkStats>,
}

/// Why a connection ended.
struct Ended {
    connected: bool,
    error: String,
    /// The oldest unacknowledged data message (first offset, target), if the connection was lost
    /// within `POISON_WINDOW` of sending it: the suspect when a broker disconnects on a message.
    suspect: Option<(u64, String)>,
}

/// A disconnect this soon after sending the message in flight counts against it. Brokers drop a
/// connection on a message they refuse at once; a dead link is noticed much later (keep-alive),
/// so a link failure rarely looks like a poison message.
const POISON_WINDOW: Duration = Duration::from_secs(5);
/// After a lost connection the next one starts careful: one message in flight at a time, until
/// this many were acknowledged. A broker that resets the connection on a message discards the
/// acknowledgements still in flight, so only with one message at a time is the culprit certain.
const CAREFUL_ACKS: u32 = 128;

/// Data messages sent and not yet acknowledged, by send order: (first offset, target, sent at).
type Sent = std::collections::BTreeMap<u64, (u64, String, std::time::Instant)>;

fn suspect(sent: &Sent) -> Option<(u64, String)> {
    let (_, (offset, target, at)) = sent.first_key_value()?;
    (at.elapsed() <= POISON_WINDOW).then(|| (*offset, target.clone()))
}

impl MqttSink {
    pub fn new(
        name: &str,
        gateway: &str,
        cfg: &MqttNorth,
        commands: Arc<Commands>,
        stats: Arc<SinkStats>,
    ) -> Result<Self, String> {
        let endpoint = Endpoint::parse(&cfg.url)?;
        let tls = if endpoint.tls {
            let c = tls::client_config(cfg.ca_file.as_deref(), cfg.cert_file.as_deref(), cfg.key_file.as_deref())
                .map_err(|e| format!("sink `{name}`: {e}"))?;
            Some(Arc::new(c))
        } else {
            None
        };
        let status_topic = status_topic(cfg, gateway);
        let commands_route = Route::new(&command_template(cfg, gateway));
        Ok(MqttSink {
            name: name.to_owned(),
            client_id: cfg.client_id.clone().unwrap_or_else(|| format!("updraft-{gateway}-{name}")),
            qos: if cfg.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce },
            cfg: cfg.clone(),
            endpoint,
            tls,
            status_topic,
            commands_route,
            commands,
            stats,
        })
    }

    fn options(&self) -> Result<MqttOptions, String> {
        let mut o = MqttOptions::new(&self.client_id, &self.endpoint.host, self.endpoint.port);
        o.set_keep_alive(self.cfg.keep_alive.0);
        o.set_clean_session(true);
        o.set_inflight(self.cfg.max_inflight.saturating_add(16));
        o.set_request_channel_capacity(usize::from(self.cfg.max_inflight) * 2 + 64);
        o.set_max_packet_size(16 << 20, 16 << 20);
        o.set_last_will(LastWill::new(&self.status_topic, "offline", QoS::AtLeastOnce, true));
        if let Some(user) = &self.cfg.username {
            // Re-read on every connection, so a rotated password needs no restart.
            let password = match &self.cfg.password_file {
                Some(f) => tls::read_secret(f)?,
                None => String::new(),
            };
            o.set_credentials(user, password);
        }
        if let Some(c) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(c.clone())));
        }
        Ok(o)
    }

    /// Runs until cancelled: connect, send, reconnect with backoff.
    pub async fn run(self, mut outbox: Outbox, cancel: CancellationToken) {
        let mut failures = 0u32;
        // The message suspected of ending connections, and how many times in a row it did.
        let mut strikes: Option<((u64, String), u32)> = None;
        let mut careful = false;
        loop {
            let ended = match self.session(&mut outbox, &cancel, careful).await {
                Ok(()) => return,
                Err(e) => e,
            };
            self.stats.connected.set(0);
            if let Some(id) = ended.suspect.clone().filter(|_| ended.connected) {
                let n = match &strikes {
                    Some((s, n)) if *s == id => n + 1,
                    _ => 1,
                };
                if n >= self.cfg.poison_attempts {
                    warn!(sink = %self.name, target = %id.1, attempts = n, "The cloud ended the connection every time this message was sent; quarantining it.");
                    outbox.mark_poison(id.0, &id.1);
                    strikes = None;
                } else {
                    strikes = Some((id, n));
                }
            }
            careful = ended.connected;
            if ended.connected {
                failures = 0;
            }
            failures += 1;
            let delay = backoff(failures);
            warn!(sink = %self.name, url = %self.cfg.url, error = %ended.error, retry_in = ?delay,
                "{}", if ended.connected { "Cloud connection lost; undelivered points stay buffered." } else { "Cannot connect to the cloud; points are buffered." });
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    async fn session(&self, outbox: &mut Outbox, cancel: &CancellationToken, careful: bool) -> Result<(), Ended> {
        let fail = |connected, error: String| Ended { connected, error, suspect: None };
        let opts = self.options().map_err(|e| fail(false, e))?;
        let (client, mut el) = AsyncClient::new(opts, usize::from(self.cfg.max_inflight) * 2 + 64);
        let connect = tokio::time::timeout(Duration::from_secs(30), wait_connack(&mut el));
        let connected = tokio::select! {
            r = connect => r,
            _ = cancel.cancelled() => return Ok(()),
        };
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.stats.connect_failures.inc();
                return Err(fail(false, e));
            }
            Err(_) => {
                self.stats.connect_failures.inc();
                return Err(fail(false, "no CONNACK within 30s".into()));
            }
        }
        self.stats.connects.inc();
        self.stats.connected.set(1);
        info!(sink = %self.name, url = %self.cfg.url, client_id = %self.client_id, "Connected to the cloud broker.");

        // The event loop runs in its own task: its `poll` is not safe to drop halfway, which a
        // `select!` here would do.
        let (ev_tx, mut ev_rx) = mpsc::channel(1024);
        let pump = tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let stop = ev.is_err();
                if ev_tx.send(ev).await.is_err() || stop {
                    break;
                }
            }
        });
        let _pump = AbortOnDrop(pump);
        let lost = |e: rumqttc::ClientError| fail(true, e.to_string());

        // Every publish request, in order; `Some` for data messages, with their send number.
        let mut order: VecDeque<Option<(Token, u64)>> = VecDeque::new();
        let mut inflight: HashMap<u16, (Token, u64)> = HashMap::new();
        let mut sent = Sent::new();
        let mut seq = 0u64;
        let mut careful_acks = if careful { 0 } else { CAREFUL_ACKS };
        // Only a careful session (one message in flight) can tell which message the broker refused.
        let lost_after = |sent: &Sent, careful_acks: u32, error: String| Ended {
            connected: true,
            error,
            suspect: if careful_acks < CAREFUL_ACKS { suspect(sent) } else { None },
        };
        let mut window = 0usize;
        let full_window = usize::from(self.cfg.max_inflight);
        let mut max_window = if careful { 1 } else { full_window };
        client.try_publish(&self.status_topic, QoS::AtLeastOnce, true, "online").map_err(lost)?;
        order.push_back(None);
        client.try_subscribe(&self.commands_route.filter, QoS::AtLeastOnce).map_err(lost)?;
        outbox.rewind();
        let (reply_tx, mut reply_rx) = mpsc::channel::<(String, String)>(64);
        loop {
            while window < max_window {
                let Some(msg) = outbox.next_message() else { break };
                // Never an await here: if this task waited on a full request channel while the event
                // pump waited on this task, neither would move. The window keeps the channel from
                // filling; if it ever does, the session restarts and the outbox rewinds.
                seq += 1;
                sent.insert(seq, (msg.first_offset, msg.target.clone(), std::time::Instant::now()));
                client.try_publish(msg.target, self.qos, false, msg.payload).map_err(lost)?;
                order.push_back(Some((msg.token, seq)));
                window += 1;
                self.stats.messages_sent.inc();
            }
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => match order.pop_front() {
                        Some(Some((token, n))) if self.qos == QoS::AtMostOnce => {
                            sent.remove(&n);
                            outbox.done(token);
                            window -= 1;
                        }
                        Some(Some(entry)) => {
                            inflight.insert(pkid, entry);
                        }
                        _ => {}
                    },
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some((token, n)) = inflight.remove(&ack.pkid) {
                            sent.remove(&n);
                            outbox.done(token);
                            window -= 1;
                            careful_acks = careful_acks.saturating_add(1);
                            if careful_acks >= CAREFUL_ACKS {
                                max_window = full_window;
                            }
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => self.command(&p.topic, &p.payload, p.retain, reply_tx.clone()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(lost_after(&sent, careful_acks, e.to_string())),
                    None => return Err(lost_after(&sent, careful_acks, "event loop stopped".into())),
                },
                Some((topic, body)) = reply_rx.recv() => {
                    match client.try_publish(topic, QoS::AtLeastOnce, false, body) {
                        Ok(()) => order.push_back(None),
                        // A flood of commands: the write was done, only its reply is lost.
                        Err(e) => warn!(sink = %self.name, error = %e, "Command reply dropped: the connection is saturated."),
                    }
                }
                _ = outbox.wait(), if window < max_window => {}
                _ = cancel.cancelled() => {
                    // A clean goodbye: retained `offline` (the broker does not fire the will on a
                    // DISCONNECT), then wait briefly for it to leave.
                    let _ = client.try_publish(&self.status_topic, QoS::AtLeastOnce, true, "offline");
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some(Ok(ev)) = ev_rx.recv().await {
                            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                                break;
                            }
                        }
                    })
                    .await;
                    self.stats.connected.set(0);
                    return Ok(());
                }
            }
        }
    }

    /// Runs a write command from the cloud; its reply is published by the session loop.
    fn command(&self, topic: &str, payload: &[u8], retained: bool, replies: mpsc::Sender<(String, String)>) {
        let reply_topic = format!("{topic}/reply");
        let parsed = self.commands_route.parse(topic, payload);
        let commands = self.commands.clone();
        let origin = format!("north:{}", self.name);
        let topic = topic.to_owned();
        tokio::spawn(async move {
            let (outcome, device, tag, id) = match parsed {
                _ if retained => (commands.refuse_retained(&origin, &topic), None, None, None),
                Ok(c) => {
                    let (device, tag, id) = (c.device.clone(), c.tag.clone(), c.id.clone());
                    (commands.execute(&origin, c).await, Some(device.into()), Some(tag.into()), id)
                }
                Err((e, id)) => {
                    warn!(%origin, %topic, error = %e, "Cloud write refused.");
                    (crate::commands::Outcome { result: Err(e), duplicate: false }, None, None, id)
                }
            };
            let body = reply(&outcome, &[("device", device), ("tag", tag), ("id", id)]);
            if replies.send((reply_topic, body)).await.is_err() {
                debug!(%origin, "Connection ended before a command reply could be sent.");
            }
        });
    }
}

/// The command topic template with `{gateway}` filled in: `command_topic`, or the data topic
/// followed by `/set`.
pub fn command_template(cfg: &MqttNorth, gateway: &str) -> String {
    match &cfg.command_topic {
        Some(t) => t.with_gateway(gateway),
        None => format!("{}/set", cfg.topic.with_gateway(gateway)),
    }
}

/// The gateway's status topic: `status_topic`, or `{prefix}/{gateway}/status` where `prefix` is
/// the part of `topic` before `/{gateway}`.
pub fn status_topic(cfg: &MqttNorth, gateway: &str) -> String {
    match &cfg.status_topic {
        Some(t) => t.with_gateway(gateway),
        None => {
            let topic = cfg.topic.source();
            let prefix = match topic.split_once("/{gateway}") {
                Some((p, _)) if !p.is_empty() && !p.contains('{') => p.to_owned(),
                _ => topic.split('/').next().filter(|s| !s.contains('{')).unwrap_or("updraft").to_owned(),
            };
            format!("{prefix}/{gateway}/status")
        }
    }
}

async fn wait_connack(el: &mut EventLoop) -> Result<(), String> {
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        let e = Endpoint::parse("mqtts://iot.example.com").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("iot.example.com", 8883, true));
        let e = Endpoint::parse("mqtt://10.0.0.5:1884").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("10.0.0.5", 1884, false));
        assert_eq!(Endpoint::parse("mqtt://[::1]:1884").unwrap().host, "::1");
        for bad in ["http://x", "mqtt://", "mqtt://h:0", "mqtt://h:port", "iot.example.com:8883", "mqtt://u@h"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
