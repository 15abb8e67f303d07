//! The TOML configuration: the typed model (this file), loading with `FILE:LINE:COLUMN` errors
//! (`load.rs`), semantic validation that reports every problem at once (`validate.rs`) and units.
//!
//! Every struct denies unknown keys, so a misspelt key is an error and never a silent default.
//! Each doc comment below is the reference for its key; `configs/gateway.toml` shows them all.

mod load;
mod units;
pub mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub use load::{load, locate, parse, ConfigError, Problem};
pub use units::{Bytes, Dur};

use crate::base::topic::Template;
pub use crate::drivers::{DeviceConfig, SimulatorConfig};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewaySection,
    #[serde(default)]
    pub broker: BrokerSection,
    #[serde(default)]
    pub api: ApiSection,
    /// WASM plugins, by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// Filled by the loader from `[devices.NAME]` tables, dispatched on their `driver` key.
    #[serde(skip)]
    pub devices: BTreeMap<String, DeviceConfig>,
    /// Filled by the loader from `[simulators.NAME]` tables, dispatched on their `kind` key.
    #[serde(skip)]
    pub simulators: BTreeMap<String, SimulatorConfig>,
    /// Filled by the loader from `[north.NAME]` tables, dispatched on their `type` key.
    #[serde(skip)]
    pub north: BTreeMap<String, NorthConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// The gateway's identity, used in topics and logs. Letters, digits, `-`, `_` and `.`.
    pub id: String,
    /// Where the gateway keeps its state. A relative path resolves against the config file's folder.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How often the last value of every tag is written to `{data_dir}/last-values.json` (also at
    /// every clean shutdown). At the next start they are the local bus's retained values until
    /// each tag is read again, so a client connecting after a restart sees the plant at once.
    /// `"0s"` turns saving and restoring off.
    #[serde(default = "default_save_values_every")]
    pub save_values_every: Dur,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

const fn default_save_values_every() -> Dur {
    Dur::from_millis(5 * 60 * 1000)
}

/// The embedded MQTT broker, the park's local data bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// Whether to run the embedded broker at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Address of the MQTT listener (3.1.1 and 5). Loopback by default; expose it deliberately.
    #[serde(default = "default_broker_listen")]
    pub listen: SocketAddr,
    /// Most simultaneous client connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest accepted publish payload; a bigger one disconnects the client.
    #[serde(default = "default_max_payload_size")]
    pub max_payload_size: Bytes,
    /// Message log the broker keeps per subscription filter, counted as topic + payload bytes
    /// (the real memory is about five times this). A subscriber that falls further behind loses
    /// its oldest unread messages. 1 MiB holds about 12,000 readings.
    #[serde(default = "default_buffer_per_subscription")]
    pub buffer_per_subscription: Bytes,
    /// How long the session of a persistent MQTT client (clean session off: its subscriptions and
    /// the messages queued for it) is kept while the client is away. At most `max_connections`
    /// sessions are kept; beyond that the oldest is forgotten first.
    #[serde(default = "default_session_expiry")]
    pub session_expiry: Dur,
    /// Accept clients without a user name and password on a listener reachable from other
    /// machines. Only needed (and only allowed) when no `[broker.users.*]` are configured; the
    /// gateway warns at every start while it is on.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Whether clients of this broker may write to equipment through `updraft/{device}/{tag}/set`.
    /// Default: `"on"` while every listener is on loopback, `"off"` once one is reachable from
    /// other machines. Cloud commands are not affected (they arrive through the sinks).
    pub writes: Option<Switch>,
    /// Serve MQTT over TLS. Without `tls.listen`, `listen` itself becomes the TLS listener; with it,
    /// both are served (plain on `listen`, TLS on `tls.listen`).
    pub tls: Option<BrokerTls>,
    /// Accounts, by user name. Once one exists, every client must log in, on every listener.
    #[serde(default)]
    pub users: BTreeMap<String, BrokerUser>,
    /// Topic rights of clients without a login (where the broker takes them: no users).
    pub anonymous: Option<TopicRights>,
}

/// Which topics a client may publish to and subscribe to, as MQTT filters. A list that is left
/// out does not restrict; an empty list allows nothing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRights {
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
}

/// `"on"` or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

/// `[broker] tls = { cert_file, key_file, ca_file, listen }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// PEM certificate chain the broker presents.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
    /// PEM certificate authorities of client certificates. When set, every TLS client must present
    /// a certificate signed by one of them.
    pub ca_file: Option<PathBuf>,
    /// A separate TLS listener (e.g. "0.0.0.0:8883"), served beside the plain `listen`.
    pub listen: Option<SocketAddr>,
}

/// `[broker.users.NAME]`: one account; exactly one of the two password keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    /// File holding the password (surrounding whitespace trimmed), readable only by the gateway's
    /// user; re-read at every login, so a changed password needs no restart.
    pub password_file: Option<PathBuf>,
    /// An Argon2 hash in PHC form (`$argon2id$v=19$…`), made with `updraft hash-password`.
    pub password_hash: Option<String>,
    /// Topic filters this user may publish to; left out, any.
    pub publish: Option<Vec<String>>,
    /// Topic filters this user may subscribe to (a filter must lie within one); left out, any.
    pub subscribe: Option<Vec<String>>,
}

impl BrokerSection {
    /// Where rumqttd's own (plain) listener binds: `listen`, unless `listen` serves TLS, in which case
    /// the plain listener is a private loopback port that only the TLS front connects to.
    pub fn plain_listen(&self) -> SocketAddr {
        match &self.tls {
            Some(t) if t.listen.is_none() => SocketAddr::new(
                if self.listen.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() },
                0,
            ),
            _ => self.listen,
        }
    }

    /// The TLS listener's address, if TLS is on.
    pub fn tls_listen(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|t| t.listen.unwrap_or(self.listen))
    }

    /// Whether a listener is reachable from other machines.
    pub fn exposed(&self) -> bool {
        self.enabled
            && (!self.plain_listen().ip().is_loopback() || self.tls_listen().is_some_and(|a| !a.ip().is_loopback()))
    }

    /// Whether local clients may write to equipment (see `writes`).
    pub fn writes_on(&self) -> bool {
        match self.writes {
            Some(w) => w == Switch::On,
            None => !self.exposed(),
        }
    }
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            enabled: true,
            listen: default_broker_listen(),
            max_connections: default_max_connections(),
            max_payload_size: default_max_payload_size(),
            buffer_per_subscription: default_buffer_per_subscription(),
            session_expiry: default_session_expiry(),
            allow_anonymous: false,
            writes: None,
            tls: None,
            users: BTreeMap::new(),
            anonymous: None,
        }
    }
}

const fn yes() -> bool {
    true
}
fn default_broker_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}
const fn default_max_connections() -> usize {
    256
}
const fn default_max_payload_size() -> Bytes {
    Bytes(256 * 1024)
}
const fn default_session_expiry() -> Dur {
    Dur::from_millis(24 * 60 * 60 * 1000)
}
const fn default_buffer_per_subscription() -> Bytes {
    Bytes(1 << 20)
}

/// The local HTTP API: current values, health and Prometheus metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// A file holding the token `POST /api/v1/reload` must present (`Authorization: Bearer …`).
    /// Without it, reloads over the API are taken only when the API listens on loopback.
    pub token_file: Option<PathBuf>,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection { enabled: true, listen: default_api_listen(), token_file: None }
    }
}

impl ApiSection {
    /// The reload token, read from `token_file` (surrounding whitespace trimmed).
    pub fn reload_token(&self) -> std::io::Result<Option<String>> {
        let Some(path) = &self.token_file else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read [api] token_file {}: {e}", path.display()))
        })?;
        Ok(Some(text.trim().to_owned()))
    }
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// `[plugins.NAME]`: a sandboxed WASM component that transforms subscribed points.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The component (`.wasm`), relative to the config file.
    pub wasm: PathBuf,
    /// `device/tag` filters; `*` matches one whole segment (`"boiler-1/*"`, `"*/temperature"`).
    /// Left out, the plugin's own default (world 0.3.0 `describe`).
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    #[serde(default)]
    pub limits: PluginLimits,
    /// Output name → topic template on the embedded broker (`{device}`, `{tag}`, `{plugin}`).
    #[serde(default = "default_outputs")]
    pub outputs: BTreeMap<String, Template>,
    /// How often `on-tick` runs; none if absent.
    pub tick: Option<Dur>,
    #[serde(default)]
    pub batch: PluginBatch,
}

fn default_outputs() -> BTreeMap<String, Template> {
    let t = Template::parse("updraft/derived/{device}/{tag}", crate::base::topic::ALL).expect("a valid template");
    BTreeMap::from([("default".to_owned(), t)])
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Largest linear memory of the instance.
    #[serde(default = "default_plugin_memory")]
    pub memory: Bytes,
    /// Longest a single call may run before it is interrupted.
    #[serde(default = "default_call_timeout")]
    pub call_timeout: Dur,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits { memory: default_plugin_memory(), call_timeout: default_call_timeout() }
    }
}

const fn default_plugin_memory() -> Bytes {
    Bytes(32 << 20)
}
const fn default_call_timeout() -> Dur {
    Dur::from_millis(50)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginBatch {
    /// Most points in one call.
    #[serde(default = "default_batch_points")]
    pub max_points: usize,
    /// Longest a point waits for its batch to fill.
    #[serde(default = "default_batch_wait")]
    pub max_wait: Dur,
}

impl Default for PluginBatch {
    fn default() -> Self {
        PluginBatch { max_points: default_batch_points(), max_wait: default_batch_wait() }
    }
}

const fn default_batch_points() -> usize {
    256
}
const fn default_batch_wait() -> Dur {
    Dur::from_millis(20)
}

/// Whether the cloud or local clients may write a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Ro,
    Rw,
}

/// One northbound sink; the variant is chosen by the table's `type` key.
#[derive(Debug, Clone)]
pub enum NorthConfig {
    Mqtt(MqttNorth),
    Http(HttpNorth),
}

impl NorthConfig {
    pub const TYPES: &'static [&'static str] = &["mqtt", "http"];

    /// The sink's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            NorthConfig::Mqtt(_) => "mqtt",
            NorthConfig::Http(_) => "http",
        }
    }

    /// The files the sink reads (secrets and TLS material), by key.
    pub fn files(&self) -> Vec<(&'static str, &Option<PathBuf>)> {
        match self {
            NorthConfig::Mqtt(m) => vec![
                ("password_file", &m.password_file),
                ("ca_file", &m.ca_file),
                ("cert_file", &m.cert_file),
                ("key_file", &m.key_file),
            ],
            NorthConfig::Http(h) => vec![
                ("token_file", &h.token_file),
                ("password_file", &h.password_file),
                ("ca_file", &h.ca_file),
                ("cert_file", &h.cert_file),
                ("key_file", &h.key_file),
            ],
        }
    }

    /// The same files, to resolve relative paths.
    pub fn files_mut(&mut self) -> Vec<&mut Option<PathBuf>> {
        match self {
            NorthConfig::Mqtt(m) => vec![&mut m.password_file, &mut m.ca_file, &mut m.cert_file, &mut m.key_file],
            NorthConfig::Http(h) => {
                vec![&mut h.token_file, &mut h.password_file, &mut h.ca_file, &mut h.cert_file, &mut h.key_file]
            }
        }
    }

    /// Whether the URL asks for TLS, and the CA, certificate and key files.
    pub fn tls(&self) -> (bool, [&Option<PathBuf>; 3]) {
        match self {
            NorthConfig::Mqtt(m) => (
                crate::sinks::mqtt::Endpoint::parse(&m.url).is_ok_and(|e| e.tls),
                [&m.ca_file, &m.cert_file, &m.key_file],
            ),
            NorthConfig::Http(h) => (h.url.source().starts_with("https://"), [&h.ca_file, &h.cert_file, &h.key_file]),
        }
    }

    /// Where messages go: the MQTT topic or the HTTP URL template.
    pub fn template(&self) -> &Template {
        match self {
            NorthConfig::Mqtt(m) => &m.topic,
            NorthConfig::Http(h) => &h.url,
        }
    }

    pub fn sources(&self) -> &[String] {
        match self {
            NorthConfig::Mqtt(m) => &m.sources,
            NorthConfig::Http(h) => &h.sources,
        }
    }
    pub fn batch(&self) -> &NorthBatch {
        match self {
            NorthConfig::Mqtt(m) => &m.batch,
            NorthConfig::Http(h) => &h.batch,
        }
    }
    pub fn max_message_size(&self) -> u64 {
        match self {
            NorthConfig::Mqtt(m) => m.max_message_size.0,
            NorthConfig::Http(h) => h.max_message_size.0,
        }
    }
    pub fn poison_attempts(&self) -> u32 {
        match self {
            NorthConfig::Mqtt(m) => m.poison_attempts,
            NorthConfig::Http(h) => h.poison_attempts,
        }
    }
    pub fn buffer(&self) -> &NorthBuffer {
        match self {
            NorthConfig::Mqtt(m) => &m.buffer,
            NorthConfig::Http(h) => &h.buffer,
        }
    }
}

/// `type = "mqtt"`: an MQTT 3.1.1 broker in the cloud.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttNorth {
    /// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS, default port 8883).
    pub url: String,
    /// Defaults to `updraft-{gateway id}-{sink name}`. Must be unique on the cloud broker.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// File holding the password (surrounding whitespace is trimmed). Never inline, never logged.
    pub password_file: Option<PathBuf>,
    /// PEM file of the certificate authorities to trust; the system's roots if absent.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and its private key, for brokers that want client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Topic template of data messages: `{gateway}`, `{device}`, `{tag}` (one message per tag then)
    /// and `{topic}` (the point's topic on the local broker).
    #[serde(default = "default_north_topic")]
    pub topic: Template,
    /// 1: a point leaves the buffer only once the broker acknowledged it. 0: once it is written to
    /// the connection (lost if the connection drops at that moment).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Where write commands arrive (`{device}` becomes the `+` wildcard). Default: the data topic
    /// followed by `/set`. Replies go to the command's topic followed by `/reply`.
    pub command_topic: Option<Template>,
    /// Retained `online`, with last will `offline`. Default: `{prefix}/{gateway}/status`, where
    /// `{prefix}` is the part of `topic` before `/{gateway}`.
    pub status_topic: Option<Template>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur,
    /// Most data messages sent and not yet acknowledged.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Largest message the cloud broker takes (its `max_packet_size` or message size limit). Messages
    /// are split to stay under it; a single point or plugin message larger than it is quarantined.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: Bytes,
    /// A message that ends the connection this many times in a row (the broker disconnects on it:
    /// too large, refused by an ACL) is moved to `quarantine/`, counted as `poison`, and the rest
    /// flows.
    #[serde(default = "default_poison_attempts")]
    pub poison_attempts: u32,
    #[serde(default = "default_north_sources")]
    pub sources: Vec<String>,
    #[serde(default)]
    pub batch: NorthBatch,
    #[serde(default)]
    pub buffer: NorthBuffer,
}

/// `type = "http"`: each message is POSTed as JSON; any 2xx answer acknowledges it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpNorth {
    /// `http://…` or `https://…`; `{gateway}` and `{device}` are filled in.
    pub url: Template,
    /// File holding a bearer token, sent as `Authorization: Bearer …`; re-read on every retry, so a
    /// rotated token is picked up without a restart.
    pub token_file: Option<PathBuf>,
    /// Basic authentication, with the password read from a file.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Longest one request may take.
    #[serde(default = "default_http_timeout")]
    pub timeout: Dur,
    /// Requests in flight at once, each for a different destination (one device's messages go one
    /// at a time, so they arrive in order even across retries).
    #[serde(default = "default_http_inflight")]
    pub max_inflight: u16,
    /// Largest request body the endpoint takes; messages are split to stay under it.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: Bytes,
    /// A message answered with the same server error (500, 501, …; not 502/503/504, which mean
    /// the service is down) this many times in a row is moved to `quarantine/` and counted as
    /// `poison`, so one message the cloud cannot digest does not stall the rest.
    #[serde(default = "default_poison_attempts")]
    pub poison_attempts: u32,
    #[serde(default = "default_north_sources")]
    pub sources: Vec<String>,
    #[serde(default)]
    pub batch: NorthBatch,
    #[serde(default)]
    pub buffer: NorthBuffer,
}

fn default_north_topic() -> Template {
    Template::parse("updraft/{gateway}/{device}", crate::base::topic::ALL).expect("a valid template")
}
const fn default_qos() -> u8 {
    1
}
const fn default_keep_alive() -> Dur {
    Dur::from_millis(30_000)
}
const fn default_max_inflight() -> u16 {
    64
}
fn default_north_sources() -> Vec<String> {
    vec!["*/*".to_owned()]
}
const fn default_max_message_size() -> Bytes {
    Bytes(128 << 10)
}
const fn default_poison_attempts() -> u32 {
    5
}
const fn default_http_inflight() -> u16 {
    4
}
const fn default_http_timeout() -> Dur {
    Dur::from_millis(10_000)
}

/// How points are grouped into messages: by default one message per device (per rendered
/// topic) per poll, sent as soon as the poll is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NorthBatch {
    /// Most points in one message.
    #[serde(default = "default_north_points")]
    pub max_points: usize,
    /// Merge several polls into fewer, larger messages: a message waits at most this long for
    /// more points. Unset (default), each poll's points leave as soon as the poll is complete.
    #[serde(default)]
    pub max_wait: Option<Dur>,
}

impl Default for NorthBatch {
    fn default() -> Self {
        NorthBatch { max_points: default_north_points(), max_wait: None }
    }
}

const fn default_north_points() -> usize {
    500
}

/// The store-and-forward buffer on disk, under `{data_dir}/north/{name}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NorthBuffer {
    /// Cap on undelivered data on disk; at about 8 bytes per point, 1GiB holds ~130 million points.
    #[serde(default = "default_buffer_bytes")]
    pub max_bytes: Bytes,
    /// Points older than this when their turn comes are dropped (and counted) instead of sent.
    #[serde(default = "default_buffer_age")]
    pub max_age: Dur,
    /// What to do at the cap: `drop-oldest` (keep the newest data) or `reject-new`.
    #[serde(default)]
    pub on_full: OnFull,
    /// How often appended data is made durable (fdatasync). A power cut loses at most this much; a
    /// crashed process loses nothing.
    #[serde(default = "default_flush_interval")]
    pub flush_interval: Dur,
    /// Held in memory while the disk refuses writes (disk full, I/O errors); the oldest is dropped
    /// past it.
    #[serde(default = "default_memory_bytes")]
    pub memory_bytes: Bytes,
    /// With points waiting and no acknowledgement from the cloud for this long, the sink counts as
    /// stalled: `/ready` answers 503 and the stall is logged (once).
    #[serde(default = "default_stall_after")]
    pub stall_after: Dur,
}

impl Default for NorthBuffer {
    fn default() -> Self {
        NorthBuffer {
            max_bytes: default_buffer_bytes(),
            max_age: default_buffer_age(),
            on_full: OnFull::default(),
            flush_interval: default_flush_interval(),
            memory_bytes: default_memory_bytes(),
            stall_after: default_stall_after(),
        }
    }
}

const fn default_buffer_bytes() -> Bytes {
    Bytes(1 << 30)
}
const fn default_buffer_age() -> Dur {
    Dur::from_millis(7 * 24 * 3600 * 1000)
}
const fn default_flush_interval() -> Dur {
    Dur::from_millis(200)
}
const fn default_stall_after() -> Dur {
    Dur::from_millis(30_000)
}
const fn default_memory_bytes() -> Bytes {
    Bytes(16 << 20)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    #[default]
    DropOldest,
    RejectNew,
}
