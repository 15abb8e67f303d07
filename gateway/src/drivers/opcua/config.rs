//! The OPC-UA driver's config: the `[devices.NAME]` keys of `driver = "opcua"`, its tags, the
//! `[simulators.NAME]` keys of `kind = "opcua"`, and the checks serde cannot express. Each doc
//! comment is the reference for its key; `configs/gateway.toml` shows them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use opcua::types::NodeId;
use serde::Deserialize;

use crate::config::validate::{key, name_problem, with, Found, Seg};
use crate::config::{Access, Dur};
use crate::drivers::report::{Deadband, Publish};
use crate::drivers::wave::{Shape, Wave};

/// `driver = "opcua"`: one OPC-UA server (one session), its variables as tags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaDevice {
    /// The server's endpoint URL, `opc.tcp://host:port[/path]`.
    pub endpoint: String,
    /// `"subscribe"` (default: the server reports changes) or `"poll"` (read every tag each
    /// `poll`, for servers that limit subscriptions).
    #[serde(default)]
    pub mode: Mode,
    /// How often to read every tag in `mode = "poll"`.
    #[serde(default = "default_poll")]
    pub poll: Dur,
    /// How often the server sends the changes it has collected (subscriptions).
    #[serde(default = "default_publishing_interval")]
    pub publishing_interval: Dur,
    /// How often the server samples each variable, unless a tag says otherwise; default: the
    /// publishing interval.
    pub sampling_interval: Option<Dur>,
    /// Changes the server keeps per variable between two publishes (1: only the latest).
    #[serde(default = "default_queue_size")]
    pub queue_size: u32,
    /// Most monitored items in one subscription; more tags are spread over more subscriptions.
    /// The server's own limits (read at connect) lower it further.
    #[serde(default = "default_max_items")]
    pub max_items_per_subscription: u32,
    /// How long one request (connect, read, write, create) may take.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// `"None"` (default), `"Basic256Sha256"`, `"Aes128_Sha256_RsaOaep"` or `"Aes256_Sha256_RsaPss"`.
    #[serde(default)]
    pub security_policy: SecurityPolicy,
    /// `"None"` (default), `"Sign"` or `"SignAndEncrypt"`.
    #[serde(default)]
    pub security_mode: SecurityMode,
    /// Log in with this user name (and `password_file`); anonymous when neither this nor
    /// `user_certificate` is set.
    pub username: Option<String>,
    /// A file holding the password (its first line), readable only by the gateway.
    pub password_file: Option<PathBuf>,
    /// Log in with an X.509 user certificate (DER or PEM) and its private key (PEM).
    pub user_certificate: Option<PathBuf>,
    pub user_private_key: Option<PathBuf>,
    /// Trust the server's certificate the first time it is seen (it is stored in `pki/trusted`).
    /// Off by default: an unknown certificate lands in `pki/rejected` and the connection is
    /// refused until an admin trusts it (`updraft opcua trust`).
    #[serde(default)]
    pub trust_on_first_use: bool,
    /// Report by exception for the device's tags (each tag may override).
    pub publish: Option<Publish>,
    pub deadband: Option<Deadband>,
    pub heartbeat: Option<Dur>,
    pub tags: Vec<OpcuaTag>,
}

/// One variable of an OPC-UA device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaTag {
    /// The tag's name, unique in its device; the last segment of its topic.
    pub name: String,
    /// The variable's NodeId: `ns=2;s=Line3.Speed`, `ns=2;i=1042`,
    /// `ns=2;g=09087e75-8e5e-499b-954f-f2a9603db28a` or `ns=2;b=M/RbKBsRVkePCePcx24oRA==`.
    pub node: String,
    /// How often the server samples this variable (subscriptions).
    pub sampling_interval: Option<Dur>,
    /// Changes the server keeps between publishes for this variable.
    pub queue_size: Option<u32>,
    /// Engineering unit, carried as metadata.
    pub unit: Option<String>,
    #[serde(default)]
    pub access: Access,
    /// Report by exception for this tag. An absolute `deadband` is also handed to the server as a
    /// data-change filter, so unchanged values do not even cross the network.
    pub publish: Option<Publish>,
    pub deadband: Option<Deadband>,
    pub heartbeat: Option<Dur>,
}

/// How the driver learns of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Subscribe,
    Poll,
}

/// `security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum SecurityPolicy {
    #[default]
    None,
    Basic256Sha256,
    #[serde(rename = "Aes128_Sha256_RsaOaep")]
    Aes128Sha256RsaOaep,
    #[serde(rename = "Aes256_Sha256_RsaPss")]
    Aes256Sha256RsaPss,
}

impl SecurityPolicy {
    pub fn to_opcua(self) -> opcua::crypto::SecurityPolicy {
        use opcua::crypto::SecurityPolicy as P;
        match self {
            SecurityPolicy::None => P::None,
            SecurityPolicy::Basic256Sha256 => P::Basic256Sha256,
            SecurityPolicy::Aes128Sha256RsaOaep => P::Aes128Sha256RsaOaep,
            SecurityPolicy::Aes256Sha256RsaPss => P::Aes256Sha256RsaPss,
        }
    }
}

/// `security_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum SecurityMode {
    #[default]
    None,
    Sign,
    SignAndEncrypt,
}

impl SecurityMode {
    pub fn to_opcua(self) -> opcua::types::MessageSecurityMode {
        use opcua::types::MessageSecurityMode as M;
        match self {
            SecurityMode::None => M::None,
            SecurityMode::Sign => M::Sign,
            SecurityMode::SignAndEncrypt => M::SignAndEncrypt,
        }
    }
}

const fn default_poll() -> Dur {
    Dur::from_millis(1000)
}
const fn default_publishing_interval() -> Dur {
    Dur::from_millis(1000)
}
const fn default_queue_size() -> u32 {
    1
}
const fn default_max_items() -> u32 {
    1000
}
const fn default_timeout() -> Dur {
    Dur::from_millis(5000)
}

/// Parses a NodeId as written in a config, with a message saying what is accepted.
pub fn parse_node(text: &str) -> Result<NodeId, String> {
    NodeId::from_str(text.trim()).map_err(|_| {
        format!(
            "`{text}` is not a NodeId; write ns=<index>;s=<name>, ns=<index>;i=<number>, ns=<index>;g=<guid> or ns=<index>;b=<base64>"
        )
    })
}

/// The checks of one OPC-UA device; `base` is its key path.
pub fn validate_device(d: &OpcuaDevice, base: Vec<Seg>, found: &mut Found) {
    if let Err(e) = endpoint_host(&d.endpoint) {
        found.push((with(base.clone(), [key("endpoint")]), e));
    }
    for (k, v) in [("poll", d.poll), ("publishing_interval", d.publishing_interval), ("timeout", d.timeout)] {
        if v.0.is_zero() {
            found.push((with(base.clone(), [key(k)]), "must be longer than 0s".into()));
        }
    }
    if d.max_items_per_subscription == 0 {
        found.push((with(base.clone(), [key("max_items_per_subscription")]), "must be at least 1".into()));
    }
    let secure = d.security_policy != SecurityPolicy::None;
    if secure != (d.security_mode != SecurityMode::None) {
        found.push((
            with(base.clone(), [key("security_mode")]),
            "security_policy and security_mode go together: both \"None\", or a policy with \"Sign\" or \"SignAndEncrypt\"".into(),
        ));
    }
    if d.username.is_some() != d.password_file.is_some() {
        found.push((base.clone(), "`username` and `password_file` go together".into()));
    }
    if d.user_certificate.is_some() != d.user_private_key.is_some() {
        found.push((base.clone(), "`user_certificate` and `user_private_key` go together".into()));
    }
    if d.username.is_some() && d.user_certificate.is_some() {
        found.push((base.clone(), "choose one identity: `username` or `user_certificate`".into()));
    }
    if d.tags.is_empty() {
        found.push((with(base.clone(), [key("tags")]), "a device needs at least one tag".into()));
    }
    let mut names = std::collections::HashSet::new();
    for (i, t) in d.tags.iter().enumerate() {
        let tp = with(base.clone(), [key("tags"), Seg::Index(i)]);
        if let Some(p) = name_problem(&t.name) {
            found.push((with(tp.clone(), [key("name")]), format!("tag name `{}` {p}", t.name)));
        }
        if !names.insert(t.name.as_str()) {
            found.push((with(tp.clone(), [key("name")]), format!("tag `{}` appears twice in this device", t.name)));
        }
        if let Err(e) = parse_node(&t.node) {
            found.push((with(tp.clone(), [key("node")]), e));
        }
        if t.sampling_interval.is_some_and(|s| s.0.is_zero()) {
            found.push((with(tp.clone(), [key("sampling_interval")]), "must be longer than 0s".into()));
        }
    }
}

/// The host and port of an `opc.tcp://` endpoint, or why it is not one.
pub fn endpoint_host(endpoint: &str) -> Result<(String, u16), String> {
    let rest = endpoint
        .strip_prefix("opc.tcp://")
        .ok_or_else(|| format!("`{endpoint}` is not an OPC-UA endpoint; write opc.tcp://host:port"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| format!("`{p}` in `{endpoint}` is not a port"))?)
        }
        _ => (authority, 4840),
    };
    if host.is_empty() {
        return Err(format!("`{endpoint}` names no host; write opc.tcp://host:port"));
    }
    Ok((host.trim_matches(|c| c == '[' || c == ']').to_owned(), port))
}

/// `kind = "opcua"`: an OPC-UA server whose variables follow waveforms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaSimulator {
    /// Where it listens (port 0: any free port). Its endpoint is `opc.tcp://ADDRESS/`.
    pub listen: SocketAddr,
    /// The namespace URI of its variables (index 2 on the server).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// How often waveforms advance.
    #[serde(default = "crate::drivers::wave::default_update")]
    pub update: Dur,
    /// Offer Basic256Sha256 (Sign and SignAndEncrypt), Aes128_Sha256_RsaOaep and
    /// Aes256_Sha256_RsaPss (SignAndEncrypt) endpoints beside the unsecured one.
    #[serde(default)]
    pub secure: bool,
    /// Where a secure simulator keeps its certificate and trusts clients; default a folder in
    /// the system's temporary directory.
    pub pki_dir: Option<PathBuf>,
    /// User names and passwords it accepts besides anonymous logins (a simulator's accounts,
    /// for commissioning a gateway's `username` and `password_file`; not for production).
    #[serde(default)]
    pub users: Vec<SimUser>,
    pub variables: Vec<SimVariable>,
}

/// A login a simulator accepts: a password, or an X.509 user certificate (`.der` or `.pem`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimUser {
    pub name: String,
    pub password: Option<String>,
    pub certificate: Option<PathBuf>,
}

/// One simulated variable, `ns=2;s=NAME`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimVariable {
    /// Its string NodeId in the simulator's namespace, e.g. `Line3.Speed`.
    pub name: String,
    /// `bool`, `i16`, `i32`, `i64`, `u16`, `u32`, `u64`, `f32`, `f64` (default) or `string`.
    #[serde(rename = "type", default)]
    pub data_type: SimType,
    /// Clients may write it.
    #[serde(default)]
    pub writable: bool,
    #[serde(default = "crate::drivers::wave::default_wave")]
    pub wave: Wave,
    #[serde(default)]
    pub value: f64,
    #[serde(default)]
    pub min: f64,
    #[serde(default = "crate::drivers::wave::default_max")]
    pub max: f64,
    #[serde(default = "crate::drivers::wave::default_period")]
    pub period: Dur,
    #[serde(default = "crate::drivers::wave::default_step")]
    pub step: f64,
    /// The text of a `string` variable.
    pub text: Option<String>,
}

impl SimVariable {
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
}

/// The type of a simulated variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimType {
    Bool,
    I16,
    I32,
    I64,
    U16,
    U32,
    U64,
    F32,
    #[default]
    F64,
    String,
}

fn default_namespace() -> String {
    "urn:updraft:simulator".into()
}

/// The checks of one `kind = "opcua"` simulator.
pub fn validate_simulator(s: &OpcuaSimulator, base: Vec<Seg>, found: &mut Found) {
    if s.update.0.is_zero() {
        found.push((with(base.clone(), [key("update")]), "must be longer than 0s".into()));
    }
    if s.variables.is_empty() {
        found.push((with(base.clone(), [key("variables")]), "a simulator needs at least one variable".into()));
    }
    for (i, u) in s.users.iter().enumerate() {
        if u.password.is_some() == u.certificate.is_some() {
            found.push((
                with(base.clone(), [key("users"), Seg::Index(i)]),
                "a user has a `password` or a `certificate`".into(),
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    for (i, v) in s.variables.iter().enumerate() {
        let vp = with(base.clone(), [key("variables"), Seg::Index(i)]);
        if v.name.is_empty() || v.name.len() > 256 || v.name.chars().any(char::is_control) {
            found.push((with(vp.clone(), [key("name")]), "must be 1 to 256 printable characters".into()));
        }
        if !names.insert(v.name.as_str()) {
            found.push((with(vp.clone(), [key("name")]), format!("variable `{}` appears twice", v.name)));
        }
        if v.min > v.max {
            found.push((with(vp.clone(), [key("min")]), "must not be above `max`".into()));
        }
        if v.text.is_some() && v.data_type != SimType::String {
            found.push((with(vp.clone(), [key("text")]), "`text` is for type = \"string\"".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_of_every_kind_parse() {
        for ok in [
            "ns=2;s=Line3.Speed",
            "ns=2;i=1042",
            "i=2258",
            "ns=2;g=09087e75-8e5e-499b-954f-f2a9603db28a",
            "ns=2;b=M/RbKBsRVkePCePcx24oRA==",
        ] {
            assert!(parse_node(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Line3.Speed", "ns=x;s=a", "ns=2;q=1"] {
            assert!(parse_node(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_name_host_and_port() {
        assert_eq!(endpoint_host("opc.tcp://10.0.0.5:4840/UA/Server").unwrap(), ("10.0.0.5".into(), 4840));
        assert_eq!(endpoint_host("opc.tcp://plc").unwrap(), ("plc".into(), 4840));
        assert_eq!(endpoint_host("opc.tcp://[::1]:4841").unwrap(), ("::1".into(), 4841));
        assert!(endpoint_host("http://plc:4840").is_err());
        assert!(endpoint_host("opc.tcp://:4840").is_err());
        assert!(endpoint_host("opc.tcp://plc:99999").is_err());
    }
}
