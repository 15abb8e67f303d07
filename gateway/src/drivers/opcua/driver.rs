//! An OPC-UA device: one client session to one server, its tags as monitored items in one or more
//! subscriptions (or read every `poll`), writes, and recovery.
//!
//! Recovery has three layers. async-opcua's session event loop reconnects a lost channel with
//! capped exponential backoff, reactivates the same session (a new one only when the server has
//! forgotten it) and transfers or recreates its subscriptions. Above it, this driver reconnects
//! from scratch (endpoint discovery included) when the first connection fails or the event loop
//! gives up, again with capped backoff; no session is created until a channel is open, so a dead
//! server never collects sessions. And a data-flow watchdog: every subscription must be heard from
//! (a change or a keep-alive) within three keep-alive periods, or it is deleted and created again,
//! because "connected" is not the same as "data arrives".

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opcua::client::transport::TcpConnector;
use opcua::client::{
    Client, ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore, Password, Session,
    SessionConnectMode, SessionPollResult,
};
use opcua::crypto::{CertificateStore, X509};
use opcua::types::{
    AttributeId, DataChangeFilter, DataChangeNotification, DataChangeTrigger, DataValue, DeadbandType,
    EndpointDescription, ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode,
    MonitoringParameters, NodeId, NotificationMessage, ReadValueId, StatusCode, TimestampsToReturn, VariableId,
    Variant, WriteValue,
};
use tokio::sync::mpsc;
use tokio::time::{self, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::config::{parse_node, Mode, OpcuaDevice, SecurityPolicy};
use super::convert::{self, WriteType};
use super::Context;
use crate::backoff::backoff;
use crate::base::point::{now_ms, Point, Registry, TagKey};
use crate::config::Access;
use crate::drivers::report::{Deadband, Exceptions};
use crate::drivers::{recv_command, WriteCommand, WriteRx};
use crate::hub::BusSender;
use crate::metrics::DeviceStats;

/// A tag whose monitored item the server refused (an unknown NodeId, say) is tried again this
/// much later, not at every reconnect: it is usually a typo that only an edit will fix.
const BAD_NODE_RETRY: Duration = Duration::from_secs(300);

struct Tag {
    key: Arc<TagKey>,
    node: NodeId,
    access: Access,
    sampling_ms: f64,
    queue_size: u32,
    /// An absolute deadband, handed to the server as a data-change filter.
    deadband: Option<f64>,
}

/// One subscription and the tags it carries.
struct Group {
    tags: Vec<usize>,
    /// The subscription's id on the server, if created.
    id: Option<u32>,
    /// Unix ms of the last message (changes or keep-alive) the server sent for it.
    heard: Arc<AtomicI64>,
    /// How long it may stay silent before it is recreated.
    silence: Duration,
    /// The tags the server accepted as monitored items.
    monitored: std::collections::HashSet<usize>,
}

/// What the session's event loop reports to the driver.
enum Event {
    Connected(SessionConnectMode),
    Lost(StatusCode),
    RetryFailed(StatusCode),
    Ended(StatusCode),
}

pub struct OpcuaDriver {
    device: Arc<str>,
    cfg: OpcuaDevice,
    ctx: Context,
    tags: Vec<Tag>,
    stats: Arc<DeviceStats>,
    out: BusSender,
    commands: Option<WriteRx>,
    exceptions: Option<Exceptions>,
    /// The write type of each written tag, learned from its node's `DataType` on first write.
    write_types: HashMap<usize, WriteType>,
    /// Tags the server refused to monitor, and when to try them again.
    refused: HashMap<usize, Instant>,
    /// The server's limit of monitored items per call, once read.
    per_call: Option<u32>,
    /// Every tag's key by index (= client handle - 1), shared with the subscription callbacks.
    keys: Arc<[Arc<TagKey>]>,
}

impl OpcuaDriver {
    pub fn new(
        name: &str,
        cfg: &OpcuaDevice,
        ctx: Context,
        registry: &Registry,
        stats: Arc<DeviceStats>,
        out: BusSender,
    ) -> Self {
        let default_sampling = cfg.sampling_interval.unwrap_or(cfg.publishing_interval).0;
        let tags: Vec<Tag> = cfg
            .tags
            .iter()
            .map(|t| Tag {
                key: registry.intern(name, &t.name),
                // Checked by the config's validation; a bad one cannot get here.
                node: parse_node(&t.node).unwrap_or_else(|_| NodeId::null()),
                access: t.access,
                sampling_ms: t.sampling_interval.map_or(default_sampling, |d| d.0).as_secs_f64() * 1000.0,
                queue_size: t.queue_size.unwrap_or(cfg.queue_size).max(1),
                deadband: match t.deadband.or(cfg.deadband) {
                    Some(Deadband::Absolute(d)) => Some(d),
                    _ => None,
                },
            })
            .collect();
        let exceptions = Exceptions::for_tags(
            (cfg.publish, cfg.deadband, cfg.heartbeat),
            cfg.tags.iter().zip(&tags).map(|(t, tag)| (tag.key.id, (t.publish, t.deadband, t.heartbeat))),
        );
        let keys = tags.iter().map(|t| t.key.clone()).collect();
        // Stalled: in poll mode, no good read for two polls (or one and a timeout); with
        // subscriptions, silence (not even a keep-alive) for as long as the watchdog allows,
        // estimated here from the default keep-alive count until the server says.
        let stall_after = match cfg.mode {
            Mode::Poll => (2 * cfg.poll.0).max(cfg.poll.0 + cfg.timeout.0),
            Mode::Subscribe => cfg.publishing_interval.0 * 30 + cfg.timeout.0,
        };
        stats.stall_after_ms.set(stall_after.as_millis() as i64);
        OpcuaDriver {
            device: Arc::from(name),
            cfg: cfg.clone(),
            ctx,
            tags,
            stats,
            out,
            commands: None,
            exceptions,
            write_types: HashMap::new(),
            refused: HashMap::new(),
            per_call: None,
            keys,
        }
    }

    /// Accepts write commands (from the cloud or the local broker) on this queue.
    pub fn with_commands(mut self, rx: WriteRx) -> Self {
        self.commands = Some(rx);
        self
    }

    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::error_span!("driver", device = %self.device, driver = "opcua");
        self.run_inner(cancel).instrument(span).await;
    }

    async fn run_inner(mut self, cancel: CancellationToken) {
        info!(endpoint = %self.cfg.endpoint, tags = self.tags.len(), mode = ?self.cfg.mode, "Connecting to OPC-UA server.");
        let mut commands = self.commands.take();
        let mut client = match self.client().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "OPC-UA client cannot start; this device stays offline.");
                self.all_bad(&format!("client cannot start: {e}")).await;
                cancel.cancelled().await;
                return;
            }
        };
        let mut failures: u32 = 0;
        loop {
            match self.connect(&mut client).await {
                Ok((session, event_loop)) => {
                    failures = 0;
                    let stop = self.serve(&session, event_loop, &mut commands, &cancel).await;
                    if stop {
                        break;
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.stats.connect_failures.inc();
                    let wait = backoff(failures);
                    if failures <= 2 || failures % 10 == 0 {
                        warn!(error = %e, retry_in = ?wait, failures, "OPC-UA server not reachable.");
                    }
                    if failures == 1 {
                        self.all_bad(&format!("server not reachable: {e}")).await;
                    }
                    let sleep = time::sleep(wait);
                    tokio::pin!(sleep);
                    // Writes are answered while waiting, so a command never hangs on a dead server.
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = &mut sleep => break,
                            Some(cmd) = recv_command(&mut commands) => {
                                let _ = cmd.reply.send(Err(format!("server not reachable; retrying in {:.0}s, not written", wait.as_secs_f64())));
                            }
                        }
                    }
                }
            }
        }
        debug!("Driver stopped.");
    }

    /// The client, with the gateway's application certificate (created on first start).
    async fn client(&self) -> Result<Client, String> {
        let ctx = self.ctx.clone();
        let cfg = self.cfg.clone();
        // Creating the certificate is an RSA key generation: keep it off the async workers, and
        // one at a time, so two devices starting together do not both write the files.
        tokio::task::spawn_blocking(move || {
            let _one = super::CERT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            ClientBuilder::new()
                .application_name(ctx.application_name.clone())
                .application_uri(ctx.application_uri.clone())
                .product_uri("urn:updraft")
                .pki_dir(ctx.pki_dir.clone())
                .create_sample_keypair(true)
                .trust_server_certs(cfg.trust_on_first_use)
                .verify_server_certs(true)
                .session_retry_limit(-1)
                .session_retry_initial(Duration::from_secs(1))
                .session_retry_max(Duration::from_secs(60))
                .request_timeout(cfg.timeout.0)
                .keep_alive_interval(Duration::from_secs(10).max(cfg.publishing_interval.0))
                .session_timeout(60_000)
                .session_name(format!("updraft {}", ctx.application_name))
                .client()
                .map_err(|e| e.join("; "))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Discovers the server's endpoints, picks the configured one and prepares a session. No
    /// session exists on the server until the event loop is polled.
    async fn connect(
        &mut self,
        client: &mut Client,
    ) -> Result<(Arc<Session>, opcua::client::SessionEventLoop<TcpConnector>), String> {
        let identity = self.identity()?;
        let policy = self.cfg.security_policy.to_opcua();
        let mode: MessageSecurityMode = self.cfg.security_mode.to_opcua();
        let endpoints =
            time::timeout(self.cfg.timeout.0, client.get_server_endpoints_from_url(self.cfg.endpoint.as_str()))
                .await
                .map_err(|_| format!("no answer within {:?}", self.cfg.timeout.0))?
                .map_err(|e| e.to_string())?;
        let Some(found) = endpoints
            .iter()
            .find(|e| e.security_mode == mode && e.security_policy_uri.as_ref() == policy.to_uri())
            .cloned()
        else {
            let offered: Vec<String> = endpoints
                .iter()
                .map(|e| {
                    format!(
                        "{} {:?}",
                        opcua::crypto::SecurityPolicy::from_uri(e.security_policy_uri.as_ref()),
                        e.security_mode
                    )
                })
                .collect();
            return Err(format!(
                "the server offers no endpoint with security_policy = \"{}\" and security_mode = \"{:?}\"; it offers: {}",
                policy,
                self.cfg.security_mode,
                offered.join(", ")
            ));
        };
        if self.cfg.security_policy != SecurityPolicy::None {
            self.check_trust(&found)?;
        }
        // Keep the configured URL: a server often advertises a host name the gateway cannot resolve.
        let endpoint = EndpointDescription { endpoint_url: self.cfg.endpoint.as_str().into(), ..found };
        client.connect_to_endpoint_directly(endpoint, identity).map_err(|e| e.to_string())
    }

    /// Refuses an unknown server certificate with the exact move that trusts it.
    fn check_trust(&self, endpoint: &EndpointDescription) -> Result<(), String> {
        let der = endpoint.server_certificate.as_ref();
        let Ok(cert) = X509::from_der(der) else {
            return Err("the server sent no valid certificate".into());
        };
        let name = CertificateStore::cert_file_name(&cert);
        let trusted = self.ctx.pki_dir.join("trusted").join(&name);
        if trusted.exists() || self.cfg.trust_on_first_use {
            return Ok(());
        }
        let rejected = self.ctx.pki_dir.join("rejected").join(&name);
        if !rejected.exists() {
            let _ = std::fs::create_dir_all(self.ctx.pki_dir.join("rejected"));
            let _ = std::fs::write(&rejected, der);
        }
        Err(format!(
            "the server's certificate is not trusted; if it is the right server, trust it with `updraft opcua trust {}` (or move {} to {}), and the gateway connects on its next try",
            name,
            rejected.display(),
            trusted.display()
        ))
    }

    fn identity(&self) -> Result<IdentityToken, String> {
        if let (Some(user), Some(file)) = (&self.cfg.username, &self.cfg.password_file) {
            let text = std::fs::read_to_string(file).map_err(|e| format!("password_file {}: {e}", file.display()))?;
            let password = text.lines().next().unwrap_or_default().to_owned();
            return Ok(IdentityToken::UserName(user.clone(), Password::new(password)));
        }
        if let (Some(cert), Some(key)) = (&self.cfg.user_certificate, &self.cfg.user_private_key) {
            let bytes = std::fs::read(cert).map_err(|e| format!("user_certificate {}: {e}", cert.display()))?;
            let x509 = X509::from_der(&bytes)
                .or_else(|_| X509::from_pem(&bytes))
                .map_err(|e| format!("user_certificate {}: {e:?}", cert.display()))?;
            let pkey =
                CertificateStore::read_pkey(key).map_err(|e| format!("user_private_key {}: {e}", key.display()))?;
            return Ok(IdentityToken::X509(Box::new(x509), Box::new(pkey)));
        }
        Ok(IdentityToken::Anonymous)
    }

    /// Runs one session until it ends for good (`false`: connect again) or the gateway stops
    /// (`true`).
    async fn serve(
        &mut self,
        session: &Arc<Session>,
        event_loop: opcua::client::SessionEventLoop<TcpConnector>,
        commands: &mut Option<WriteRx>,
        cancel: &CancellationToken,
    ) -> bool {
        // The event loop runs on its own task: session calls made here are carried out by it.
        let (ev_tx, mut events) = mpsc::channel::<Event>(16);
        let pump = tokio::spawn(
            async move {
                use futures::StreamExt;
                let stream = event_loop.enter();
                tokio::pin!(stream);
                while let Some(r) = stream.next().await {
                    let ev = match r {
                        Ok(SessionPollResult::Reconnected(mode)) => Event::Connected(mode),
                        Ok(SessionPollResult::ConnectionLost(code)) => Event::Lost(code),
                        Ok(SessionPollResult::ReconnectFailed(code)) => Event::RetryFailed(code),
                        Ok(_) => continue,
                        Err(code) => Event::Ended(code),
                    };
                    if ev_tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        let (data_tx, mut data) = mpsc::channel::<Vec<Point>>(256);
        let mut groups: Vec<Group> = Vec::new();
        let mut connected = false;
        let mut lost_failures = 0u32;
        let mut poll = time::interval(self.cfg.poll.0);
        poll.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut watchdog = time::interval(self.cfg.publishing_interval.0.max(Duration::from_millis(500)));
        watchdog.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let stop = loop {
            tokio::select! {
                _ = cancel.cancelled() => break true,
                ev = events.recv() => match ev {
                    Some(Event::Connected(mode)) => {
                        connected = true;
                        self.stats.connects.inc();
                        lost_failures = 0;
                        info!(session = ?mode, "OPC-UA session active.");
                        let now = now_ms();
                        for g in &groups {
                            g.heard.store(now, Ordering::Relaxed);
                        }
                        if self.cfg.mode == Mode::Subscribe {
                            if groups.is_empty() {
                                groups = self.subscribe(session, &data_tx).await;
                            } else {
                                // async-opcua transferred or recreated the subscriptions (new ids).
                                refresh_ids(session, &mut groups);
                            }
                        }
                    }
                    Some(Event::Lost(code)) => {
                        connected = false;
                        warn!(status = %code, "OPC-UA connection lost; reconnecting.");
                        self.all_bad(&format!("connection lost: {code}")).await;
                    }
                    Some(Event::RetryFailed(code)) => {
                        lost_failures += 1;
                        self.stats.connect_failures.inc();
                        if lost_failures <= 2 || lost_failures % 10 == 0 {
                            warn!(status = %code, failures = lost_failures, "OPC-UA session could not be opened; retrying.");
                        }
                        if lost_failures == 1 {
                            // Never connected, or the server refuses now (a wrong password, an
                            // untrusted certificate): say why on every tag.
                            self.all_bad(&format!("the server refused the session: {code}")).await;
                        }
                    }
                    Some(Event::Ended(code)) => {
                        warn!(status = %code, "OPC-UA session ended; connecting afresh.");
                        break false;
                    }
                    None => break false,
                },
                Some(points) = data.recv() => {
                    if self.emit(points).await.is_err() {
                        break true;
                    }
                }
                _ = poll.tick(), if self.cfg.mode == Mode::Poll && connected => {
                    let points = self.read_all(session).await;
                    if self.emit(points).await.is_err() {
                        break true;
                    }
                }
                _ = watchdog.tick(), if self.cfg.mode == Mode::Subscribe && connected => {
                    self.watch(session, &mut groups, &data_tx).await;
                }
                Some(cmd) = recv_command(commands) => {
                    let result = if connected {
                        self.write(session, &cmd).await
                    } else {
                        Err("server not connected; not written".to_owned())
                    };
                    match &result {
                        Err(e) => warn!(tag = %cmd.tag, error = %e, "Write refused or failed."),
                        Ok(()) => info!(tag = %cmd.tag, value = %cmd.value, "Written."),
                    }
                    let _ = cmd.reply.send(result);
                }
            }
        };
        // Close the session on the server, so a restart never leaves one behind to time out
        // (without a connection there is nothing to close, and trying only logs a warning).
        if connected {
            let _ = time::timeout(Duration::from_secs(1), session.disconnect()).await;
        }
        pump.abort();
        if !stop {
            self.all_bad("session ended").await;
        }
        stop
    }

    /// Creates the subscriptions for every tag, as many as the item limits require.
    async fn subscribe(&mut self, session: &Arc<Session>, data: &mpsc::Sender<Vec<Point>>) -> Vec<Group> {
        let limits = server_limits(session).await;
        self.per_call = limits.per_call;
        let per_sub = limits
            .per_subscription
            .map_or(self.cfg.max_items_per_subscription, |l| l.min(self.cfg.max_items_per_subscription))
            as usize;
        let all: Vec<usize> = (0..self.tags.len()).collect();
        let mut groups = Vec::new();
        for chunk in all.chunks(per_sub.max(1)) {
            let mut g = Group {
                tags: chunk.to_vec(),
                id: None,
                heard: Arc::new(AtomicI64::new(now_ms())),
                silence: Duration::ZERO,
                monitored: Default::default(),
            };
            self.create_group(session, &mut g, data).await;
            groups.push(g);
        }
        let refused = self.refused.len();
        info!(subscriptions = groups.len(), items = self.tags.len() - refused, refused, "Subscribed.");
        groups
    }

    /// Creates one group's subscription and its monitored items.
    async fn create_group(&mut self, session: &Arc<Session>, g: &mut Group, data: &mpsc::Sender<Vec<Point>>) {
        let interval = self.cfg.publishing_interval.0;
        // A keep-alive at least every five seconds, so the watchdog notices a dead flow quickly.
        let keep_alive = ((5_000.0 / interval.as_secs_f64().max(0.001) / 1000.0).ceil() as u32).clamp(1, 100);
        let handler =
            Notify { keys: self.keys.clone(), tx: data.clone(), heard: g.heard.clone(), dropped: self.stats.clone() };
        g.monitored.clear();
        g.heard.store(now_ms(), Ordering::Relaxed);
        let id = match session.create_subscription(interval, keep_alive * 3, keep_alive, 0, 0, true, handler).await {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "Subscription refused; the watchdog tries again.");
                g.id = None;
                return;
            }
        };
        g.id = Some(id);
        // The server may revise both; the watchdog allows three keep-alive periods.
        let (revised_interval, revised_keep_alive) = {
            let state = session.subscription_state().lock();
            state.get(id).map_or((interval, keep_alive), |s| (s.publishing_interval(), s.max_keep_alive_count()))
        };
        g.silence = revised_interval * revised_keep_alive.max(1) * 3 + self.cfg.timeout.0;
        // The device counts as stalled once a subscription would be recreated for its silence.
        let longest = g.silence.as_millis() as i64;
        if longest > self.stats.stall_after_ms.get() {
            self.stats.stall_after_ms.set(longest);
        }
        self.add_items(session, g).await;
    }

    /// Adds the group's tags that are not monitored yet (and not waiting out a refusal) to its
    /// subscription, in calls no larger than the server's limit. Items the server refuses are
    /// marked bad with its reason and tried again after `BAD_NODE_RETRY`.
    async fn add_items(&mut self, session: &Arc<Session>, g: &mut Group) {
        let Some(id) = g.id else { return };
        let now = Instant::now();
        let wanted: Vec<usize> = g
            .tags
            .iter()
            .copied()
            .filter(|i| !g.monitored.contains(i) && self.refused.get(i).is_none_or(|at| *at <= now))
            .collect();
        let per_call = self.per_call.map_or(wanted.len(), |n| n as usize).max(1);
        let mut bad = Vec::new();
        for chunk in wanted.chunks(per_call) {
            let items: Vec<MonitoredItemCreateRequest> = chunk.iter().map(|&i| self.item(i)).collect();
            match session.create_monitored_items(id, TimestampsToReturn::Both, items).await {
                Ok(results) => {
                    for (&i, r) in chunk.iter().zip(&results) {
                        let status = r.result.status_code;
                        if status.is_good() {
                            self.refused.remove(&i);
                            g.monitored.insert(i);
                        } else {
                            warn!(tag = %self.tags[i].key.tag, node = %self.tags[i].node, %status, "Server refused to monitor the tag.");
                            self.refused.insert(i, Instant::now() + BAD_NODE_RETRY);
                            bad.push(Point::bad(self.tags[i].key.clone(), Arc::from(status.to_string()), now_ms()));
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "Creating monitored items failed; the watchdog tries again.");
                    for &i in chunk {
                        bad.push(Point::bad(self.tags[i].key.clone(), Arc::from(e.to_string()), now_ms()));
                    }
                }
            }
        }
        if !bad.is_empty() {
            let _ = self.emit(bad).await;
        }
        if g.monitored.is_empty() {
            // Nothing to watch: an empty subscription would only cost the server. The watchdog
            // creates it again when a refused item is due for another try.
            let _ = session.delete_subscription(id).await;
            g.id = None;
        }
    }

    fn item(&self, i: usize) -> MonitoredItemCreateRequest {
        let t = &self.tags[i];
        let filter = match t.deadband {
            Some(d) => ExtensionObject::from_message(DataChangeFilter {
                // Not StatusValueTimestamp: a new timestamp alone would pass the deadband.
                trigger: DataChangeTrigger::StatusValue,
                deadband_type: DeadbandType::Absolute as u32,
                deadband_value: d,
            }),
            None => ExtensionObject::null(),
        };
        MonitoredItemCreateRequest {
            item_to_monitor: ReadValueId::from(t.node.clone()),
            monitoring_mode: MonitoringMode::Reporting,
            requested_parameters: MonitoringParameters {
                // The tag's index: the handle survives the library recreating the item.
                client_handle: i as u32 + 1,
                sampling_interval: t.sampling_ms,
                filter,
                queue_size: t.queue_size,
                discard_oldest: true,
            },
        }
    }

    /// The data-flow watchdog: a subscription the server has not sent anything for (not even a
    /// keep-alive) is deleted and created again; refused items are tried again when due.
    async fn watch(&mut self, session: &Arc<Session>, groups: &mut [Group], data: &mpsc::Sender<Vec<Point>>) {
        let now_wall = now_ms();
        let now = Instant::now();
        for g in groups.iter_mut() {
            let silent_ms = now_wall - g.heard.load(Ordering::Relaxed);
            let due: bool =
                g.tags.iter().any(|i| !g.monitored.contains(i) && self.refused.get(i).is_none_or(|at| *at <= now));
            match g.id {
                // A subscription that went silent past three keep-alive periods.
                Some(id) if g.silence > Duration::ZERO && silent_ms > g.silence.as_millis() as i64 => {
                    warn!(silent_for = ?Duration::from_millis(silent_ms.max(0) as u64), "Subscription silent past its keep-alive; recreating it.");
                    self.stats.resubscribes.inc();
                    let _ = session.delete_subscription(id).await;
                    self.create_group(session, g, data).await;
                }
                Some(_) if due => self.add_items(session, g).await,
                // None created yet, or refused: tried again every ten seconds while it has tags to carry.
                None if due && silent_ms > 10_000 => self.create_group(session, g, data).await,
                _ => {}
            }
        }
    }

    /// Reads every tag once (`mode = "poll"`), in requests of at most 1000 nodes.
    async fn read_all(&mut self, session: &Arc<Session>) -> Vec<Point> {
        self.stats.polls.inc();
        let mut points = Vec::with_capacity(self.tags.len());
        let now = Instant::now();
        let wanted: Vec<usize> =
            (0..self.tags.len()).filter(|i| self.refused.get(i).is_none_or(|at| *at <= now)).collect();
        for chunk in wanted.chunks(1000) {
            let ids: Vec<ReadValueId> = chunk.iter().map(|&i| ReadValueId::from(self.tags[i].node.clone())).collect();
            self.stats.requests.inc();
            let sent = Instant::now();
            let read = session.read(&ids, TimestampsToReturn::Both, 0.0).await;
            self.stats.request_seconds.observe(sent.elapsed());
            match read {
                Ok(values) => {
                    for (&i, dv) in chunk.iter().zip(&values) {
                        let p = convert::point(&self.tags[i].key, dv);
                        if matches!(dv.status, Some(s) if s == StatusCode::BadNodeIdUnknown || s == StatusCode::BadNodeIdInvalid)
                        {
                            self.refused.insert(i, Instant::now() + BAD_NODE_RETRY);
                        } else {
                            self.refused.remove(&i);
                        }
                        points.push(p);
                    }
                }
                Err(e) => {
                    self.stats.request_errors.inc();
                    let error: Arc<str> = Arc::from(e.to_string());
                    points.extend(chunk.iter().map(|&i| Point::bad(self.tags[i].key.clone(), error.clone(), now_ms())));
                }
            }
        }
        points
    }

    /// Writes one tag: refused unless `access = "rw"`; the value takes the node's data type.
    async fn write(&mut self, session: &Arc<Session>, cmd: &WriteCommand) -> Result<(), String> {
        let i = self
            .tags
            .iter()
            .position(|t| t.key.tag.as_ref() == cmd.tag.as_str())
            .ok_or_else(|| format!("unknown tag `{}`", cmd.tag))?;
        if self.tags[i].access != Access::Rw {
            return Err(format!("tag `{}` is read-only (set access = \"rw\" in its config to allow writes)", cmd.tag));
        }
        let node = self.tags[i].node.clone();
        let ty = match self.write_types.get(&i) {
            Some(t) => *t,
            None => {
                let read =
                    ReadValueId { attribute_id: AttributeId::DataType as u32, ..ReadValueId::from(node.clone()) };
                let dv = session.read(&[read], TimestampsToReturn::Neither, 0.0).await.map_err(|e| e.to_string())?;
                let data_type = match dv.first().and_then(|d| d.value.as_ref()) {
                    Some(Variant::NodeId(id)) => (**id).clone(),
                    _ => {
                        let status = dv.first().and_then(|d| d.status).unwrap_or(StatusCode::BadUnexpectedError);
                        return Err(format!("cannot read the node's data type: {status}"));
                    }
                };
                let ty = WriteType::of(&data_type).ok_or_else(|| {
                    format!("the node's data type {data_type} is not a built-in scalar Updraft can write")
                })?;
                self.write_types.insert(i, ty);
                ty
            }
        };
        let variant = ty.variant(&cmd.value)?;
        let write = WriteValue {
            node_id: node,
            attribute_id: AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::value_only(variant),
        };
        let results = session.write(&[write]).await.map_err(|e| e.to_string())?;
        match results.first() {
            Some(s) if s.is_good() => Ok(()),
            Some(s) => Err(format!("the server refused the write: {s}")),
            None => Err("the server returned no result".into()),
        }
    }

    async fn emit(&mut self, points: Vec<Point>) -> Result<(), ()> {
        crate::drivers::emit(points, &self.stats, &mut self.exceptions, &self.out).await
    }

    /// Marks every tag bad (the server is gone), so no consumer mistakes the last value for live.
    async fn all_bad(&mut self, why: &str) {
        let error: Arc<str> = Arc::from(why);
        let ts = now_ms();
        let points = self.tags.iter().map(|t| Point::bad(t.key.clone(), error.clone(), ts)).collect();
        let _ = self.emit(points).await;
    }
}

/// The subscription callback: turns each publish into one batch of points and notes that the
/// server was heard from (keep-alives included).
struct Notify {
    keys: Arc<[Arc<TagKey>]>,
    tx: mpsc::Sender<Vec<Point>>,
    heard: Arc<AtomicI64>,
    dropped: Arc<DeviceStats>,
}

impl OnSubscriptionNotificationCore for Notify {
    fn on_subscription_notification(&mut self, n: NotificationMessage, _items: MonitoredItemMap<'_>) {
        let now = now_ms();
        self.heard.store(now, Ordering::Relaxed);
        self.dropped.last_heard_ms.set(now);
        let Some(data) = n.notification_data else { return };
        let mut points = Vec::new();
        for obj in &data {
            let Some(change) = obj.inner_as::<DataChangeNotification>() else { continue };
            for item in change.monitored_items.iter().flatten() {
                let Some(key) = (item.client_handle as usize).checked_sub(1).and_then(|i| self.keys.get(i)) else {
                    continue;
                };
                points.push(convert::point(key, &item.value));
            }
        }
        if points.is_empty() {
            return;
        }
        // The driver drains this queue between polls of the session; it is full only if the hub
        // has been blocked for 256 publishes, and then the loss is counted.
        if self.tx.try_send(points).is_err() {
            self.dropped.points_dropped.inc();
        }
    }
}

/// Finds each group's subscription id after async-opcua moved the subscriptions to a new session:
/// the subscription holding one of the group's client handles (handles are tag indices, so the
/// groups' sets are disjoint). A group whose subscription the library could not recreate gets no
/// id, and the watchdog creates it.
fn refresh_ids(session: &Session, groups: &mut [Group]) {
    let state = session.subscription_state().lock();
    let ids = state.subscription_ids().unwrap_or_default();
    for g in groups.iter_mut() {
        let handles: std::collections::HashSet<u32> = g.tags.iter().map(|&i| i as u32 + 1).collect();
        g.id = ids.iter().copied().find(|id| {
            state.get(*id).is_some_and(|s| s.monitored_items().any(|m| handles.contains(&m.client_handle())))
        });
    }
}

/// The server's limits on monitored items, where it publishes them.
struct Limits {
    per_call: Option<u32>,
    per_subscription: Option<u32>,
}

async fn server_limits(session: &Session) -> Limits {
    let ids = [
        VariableId::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
        VariableId::Server_ServerCapabilities_MaxMonitoredItemsPerSubscription,
    ];
    let reads: Vec<ReadValueId> = ids.iter().map(|id| ReadValueId::from(NodeId::from(*id))).collect();
    let values = session.read(&reads, TimestampsToReturn::Neither, 0.0).await.unwrap_or_default();
    let limit = |i: usize| -> Option<u32> {
        match values.get(i).and_then(|d| d.value.as_ref()) {
            Some(Variant::UInt32(n)) if *n > 0 => Some(*n),
            _ => None,
        }
    };
    Limits { per_call: limit(0), per_subscription: limit(1) }
}
