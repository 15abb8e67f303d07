//! Semantic checks that serde cannot express. Each problem carries the key path it is about, so the
//! loader can point at the offending line; every problem is collected, none stops the others.

use std::collections::BTreeMap;

use super::{Config, NorthConfig};
use crate::base::topic::{Var, Vars};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Problems found, each with the key path it is about.
pub type Found = Vec<(Vec<Seg>, String)>;

/// A key path from table keys.
pub fn path(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|p| Seg::Key((*p).to_owned())).collect()
}

/// `base` followed by `more`.
pub fn with(mut base: Vec<Seg>, more: impl IntoIterator<Item = Seg>) -> Vec<Seg> {
    base.extend(more);
    base
}

/// One table key of a path.
pub fn key(k: &str) -> Seg {
    Seg::Key(k.to_owned())
}

/// Names end up in MQTT topics, log fields and file paths (`{data_dir}/north/{name}`): no topic
/// separators or wildcards, no `..`, at most 128 bytes.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > 128 {
        return Some("must be at most 128 bytes long".into());
    }
    if name == "." || name.contains("..") {
        return Some("must not be `.` or contain `..` (it is used in file paths)".into());
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '+' | '#') || c.is_whitespace() || c.is_control()) {
        return Some(format!("must not contain {c:?} (it is used in MQTT topics)"));
    }
    None
}

/// What is wrong with a plugin's `device/tag` subscription filter, if anything.
pub fn filter_problem(f: &str) -> Option<String> {
    let segs: Vec<&str> = f.split('/').collect();
    if segs.len() != 2 || segs.iter().any(|s| s.is_empty()) {
        return Some(format!("filter `{f}` must be `device/tag`, with `*` for any one segment"));
    }
    // `*/power*` would silently match nothing: `*` stands only for a whole segment.
    let seg = segs.iter().find(|s| s.contains('*') && **s != "*")?;
    Some(format!(
        "filter `{f}`: `*` matches a whole device or tag name, not part of one (`{seg}`); list the tags, or use `*` alone"
    ))
}

pub fn validate(config: &Config) -> Found {
    let mut found = Found::new();
    if let Some(p) = name_problem(&config.gateway.id) {
        found.push((path(&["gateway", "id"]), format!("gateway id {p}")));
    }
    if config.broker.enabled
        && config.api.enabled
        && config.broker.listen.port() != 0
        && config.broker.listen == config.api.listen
    {
        found.push((path(&["api", "listen"]), "the API and the broker cannot listen on the same address".into()));
    }
    if let Some(f) = &config.api.token_file {
        match config.api.reload_token() {
            Ok(Some(t)) if t.len() < 16 => found.push((
                path(&["api", "token_file"]),
                format!(
                    "{} holds a token of {} characters: use at least 16 (e.g. `openssl rand -hex 16`)",
                    f.display(),
                    t.len()
                ),
            )),
            Ok(_) => {}
            Err(e) => found.push((path(&["api", "token_file"]), e.to_string())),
        }
    }
    if config.broker.max_connections == 0 {
        found.push((path(&["broker", "max_connections"]), "must be at least 1".into()));
    }
    if config.broker.buffer_per_subscription.0 < 64 * 1024 {
        found.push((path(&["broker", "buffer_per_subscription"]), "must be at least 64KiB".into()));
    }
    if config.broker.enabled {
        broker(&config.broker, &mut found);
    }
    for (name, device) in &config.devices {
        let base = path(&["devices", name]);
        if let Some(p) = name_problem(name) {
            found.push((base.clone(), format!("device name `{name}` {p}")));
        }
        device.validate(base, &mut found);
    }
    crate::drivers::validate_all(&config.devices, &mut found);
    for (name, plugin) in &config.plugins {
        let base = path(&["plugins", name]);
        if let Some(p) = name_problem(name) {
            found.push((base.clone(), format!("plugin name `{name}` {p}")));
        }
        // An empty `subscribe` takes the plugin's own default (checked where the plugin is loaded).
        for (i, f) in plugin.subscribe.iter().enumerate() {
            if let Some(problem) = filter_problem(f) {
                found.push((with(base.clone(), [key("subscribe"), Seg::Index(i)]), problem));
            }
        }
        if !plugin.outputs.contains_key("default") {
            found.push((with(base.clone(), [key("outputs")]), "an output named `default` is required".into()));
        }
        for (out, template) in &plugin.outputs {
            let at = with(base.clone(), [key("outputs"), key(out)]);
            let unsupported = template.unsupported(&[Var::Device, Var::Tag, Var::Plugin, Var::Subject]);
            let template = template.source();
            if !unsupported.is_empty() {
                found.push((at, format!("topic template `{template}` cannot use {} here; use {{device}}, {{tag}}, {{plugin}}, {{subject}}", unsupported.join(", "))));
            } else if template.contains(['+', '#']) || template.is_empty() || template.starts_with('/') {
                found.push((
                    at,
                    format!("topic template `{template}` must be a plain topic (no wildcards, no leading '/')"),
                ));
            } else if let Some(p) = reserved_output(template, name, config) {
                found.push((at, format!("topic template `{template}` {p}")));
            }
        }
        if plugin.limits.call_timeout.0 < std::time::Duration::from_millis(10) {
            found.push((with(base.clone(), [key("limits"), key("call_timeout")]), "must be at least 10ms".into()));
        }
        if plugin.limits.memory.0 < (1 << 20) || plugin.limits.memory.0 > (4 << 30) {
            found.push((with(base.clone(), [key("limits"), key("memory")]), "must be between 1MiB and 4GiB".into()));
        }
        if plugin.batch.max_points == 0 {
            found.push((with(base.clone(), [key("batch"), key("max_points")]), "must be at least 1".into()));
        }
        if plugin.tick.is_some_and(|t| t.0 < std::time::Duration::from_millis(10)) {
            found.push((with(base, [key("tick")]), "must be at least 10ms".into()));
        }
    }
    // Two connections with one client id to one broker take each other's session over and over.
    let mut client_ids: BTreeMap<(String, String), &str> = BTreeMap::new();
    for (name, sink) in &config.north {
        if let NorthConfig::Mqtt(m) = sink {
            let id = m.client_id.clone().unwrap_or_else(|| format!("updraft-{}-{name}", config.gateway.id));
            if let Some(other) = client_ids.insert((m.url.clone(), id.clone()), name) {
                found.push((
                    path(&["north", name, if m.client_id.is_some() { "client_id" } else { "url" }]),
                    format!("sink `{other}` already connects to {} as `{id}`; give each a different client_id", m.url),
                ));
            }
        }
    }
    for (name, sink) in &config.north {
        if let NorthConfig::Mqtt(m) = sink {
            let status = crate::sinks::mqtt::status_topic(m, &config.gateway.id);
            for device in config.devices.keys() {
                let vars = Vars { gateway: &config.gateway.id, device, ..Vars::default() };
                if m.topic.render(&vars) == status {
                    found.push((
                        path(&["north", name, "topic"]),
                        format!("device `{device}` would publish on the status topic `{status}`; set `status_topic`"),
                    ));
                }
            }
        }
    }
    let longest_device = config.devices.keys().map(String::len).max().unwrap_or(0);
    let longest_tag = config.devices.values().flat_map(|d| d.tag_names()).map(str::len).max().unwrap_or(0);
    for (name, sink) in &config.north {
        let base = path(&["north", name]);
        if let Some(p) = name_problem(name) {
            found.push((base.clone(), format!("sink name `{name}` {p}")));
        }
        north(sink, base, longest_device, longest_tag, &mut found);
    }
    let mut listens: BTreeMap<_, &str> = BTreeMap::new();
    for (name, sim) in &config.simulators {
        let base = path(&["simulators", name]);
        if let Some(p) = name_problem(name) {
            found.push((base.clone(), format!("simulator name `{name}` {p}")));
        }
        if let Some(listen) = sim.listen().filter(|l| l.port() != 0) {
            if let Some(other) = listens.insert(listen, name) {
                found.push((
                    with(base.clone(), [key("listen")]),
                    format!("simulator `{other}` already listens on {listen}"),
                ));
            }
        }
        sim.validate(base, &mut found);
    }
    found
}

fn north(sink: &NorthConfig, base: Vec<Seg>, longest_device: usize, longest_tag: usize, found: &mut Found) {
    let at = |k: &str| with(base.clone(), [key(k)]);
    match sink {
        NorthConfig::Mqtt(m) => {
            if let Err(e) = crate::sinks::mqtt::Endpoint::parse(&m.url) {
                found.push((at("url"), e));
            }
            if m.qos > 1 {
                found
                    .push((at("qos"), "qos must be 0 or 1 (QoS 1 already guarantees delivery with the buffer)".into()));
            }
            let data = [Var::Gateway, Var::Device, Var::Tag, Var::Topic];
            for (k, t, allowed) in [
                ("topic", Some(&m.topic), &data[..]),
                ("command_topic", m.command_topic.as_ref(), &[Var::Gateway, Var::Device, Var::Tag][..]),
                ("status_topic", m.status_topic.as_ref(), &[Var::Gateway][..]),
            ] {
                if let Some(t) = t {
                    let unsupported = t.unsupported(allowed);
                    if !unsupported.is_empty() {
                        found.push((at(k), format!("`{k}` cannot use {} (`{t}`)", unsupported.join(", "))));
                    }
                    let t = t.source();
                    if t.contains(['+', '#']) || t.is_empty() || t.starts_with('/') {
                        found
                            .push((at(k), format!("topic `{t}` must be a plain topic (no wildcards, no leading '/')")));
                    }
                }
            }
            if m.max_inflight == 0 {
                found.push((at("max_inflight"), "must be at least 1".into()));
            }
            if m.keep_alive.0 < std::time::Duration::from_secs(1) {
                found.push((at("keep_alive"), "must be at least 1s".into()));
            }
            if m.password_file.is_some() && m.username.is_none() {
                found.push((at("password_file"), "a password needs a `username`".into()));
            }
        }
        NorthConfig::Http(h) => {
            let unsupported = h.url.unsupported(&[Var::Gateway, Var::Device, Var::Tag, Var::Topic]);
            if !unsupported.is_empty() {
                found.push((at("url"), format!("url cannot use {}", unsupported.join(", "))));
            }
            let url = h.url.source();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                found.push((at("url"), format!("url `{url}` must start with http:// or https://")));
            }
            if h.token_file.is_some() && h.username.is_some() {
                found.push((at("token_file"), "use either a bearer token or a username, not both".into()));
            }
            if h.max_inflight == 0 {
                found.push((at("max_inflight"), "must be at least 1".into()));
            }
            if h.timeout.0.is_zero() {
                found.push((at("timeout"), "must be longer than 0s".into()));
            }
        }
    }
    files(&sink.files(), &at, found);
    let (tls, pem) = sink.tls();
    if pem[1].is_some() != pem[2].is_some() {
        found.push((at("cert_file"), "cert_file and key_file go together".into()));
    }
    tls_material(tls, pem, &at, found);
    if sink.sources().is_empty() {
        found.push((at("sources"), "forward at least one source, e.g. \"*/*\"".into()));
    }
    for (i, s) in sink.sources().iter().enumerate() {
        if let Err(e) = crate::sinks::Source::parse(s) {
            found.push((with(base.clone(), [key("sources"), Seg::Index(i)]), e));
        }
    }
    let batch = sink.batch();
    if batch.max_points == 0 || batch.max_points > 100_000 {
        found.push((with(base.clone(), [key("batch"), key("max_points")]), "must be between 1 and 100000".into()));
    }
    let limit = sink.max_message_size();
    if !(1024..=256 << 20).contains(&limit) {
        found.push((at("max_message_size"), "must be between 1KiB and 256MiB".into()));
    } else {
        // A point's JSON is at most about this long: names, a 24-digit value, a 13-digit time
        // and an error text of up to 128 bytes.
        let longest_name = longest_tag.max(16) as u64;
        let per_point = 150 + longest_name;
        let worst = 64 + longest_device as u64 + batch.max_points as u64 * per_point;
        if worst > limit {
            found.push((
                with(base.clone(), [key("batch"), key("max_points")]),
                format!(
                    "{} points can make a message of about {} bytes, over max_message_size ({limit} bytes): lower \
                     max_points to {} or raise max_message_size",
                    batch.max_points,
                    worst,
                    ((limit - 64 - longest_device as u64) / per_point).max(1)
                ),
            ));
        }
    }
    if !(1..=1000).contains(&sink.poison_attempts()) {
        found.push((at("poison_attempts"), "must be between 1 and 1000".into()));
    }
    let buffer = sink.buffer();
    if buffer.max_bytes.0 < (1 << 20) {
        found.push((with(base.clone(), [key("buffer"), key("max_bytes")]), "must be at least 1MiB".into()));
    }
    if buffer.max_age.0.is_zero() {
        found.push((with(base.clone(), [key("buffer"), key("max_age")]), "must be longer than 0s".into()));
    }
    let fi = buffer.flush_interval.0;
    if fi < std::time::Duration::from_millis(10) || fi > std::time::Duration::from_secs(10) {
        found.push((with(base.clone(), [key("buffer"), key("flush_interval")]), "must be between 10ms and 10s".into()));
    }
    if buffer.stall_after.0 < std::time::Duration::from_secs(1) {
        found.push((with(base.clone(), [key("buffer"), key("stall_after")]), "must be at least 1s".into()));
    }
    if buffer.memory_bytes.0 < (64 << 10) {
        found.push((with(base, [key("buffer"), key("memory_bytes")]), "must be at least 64KiB".into()));
    }
}

/// Certificates and keys are parsed at check time too, so a wrong file is found by `updraft check`
/// rather than at the first connection. Only named files: the system's roots are loaded once, when
/// the sink starts (every `run` validates its config first).
fn tls_material(
    tls: bool,
    [ca, cert, key]: [&Option<std::path::PathBuf>; 3],
    at: &dyn Fn(&str) -> Vec<Seg>,
    found: &mut Found,
) {
    let all_exist = [ca, cert, key].iter().all(|f| f.as_ref().is_none_or(|f| f.exists()));
    let none_named = [ca, cert, key].iter().all(|f| f.is_none());
    if !tls || none_named || !all_exist || cert.is_some() != key.is_some() {
        return;
    }
    if let Err(e) = crate::sinks::tls::client_config(ca.as_deref(), cert.as_deref(), key.as_deref()) {
        let k = if e.starts_with("cannot read cert_file") || e.starts_with("client certificate") {
            "cert_file"
        } else if e.starts_with("cannot read key_file") {
            "key_file"
        } else if ca.is_some() {
            "ca_file"
        } else {
            "url"
        };
        found.push((at(k), e));
    }
}

/// Secret and certificate files must exist when the config is checked, not on the first reconnect.
fn files(list: &[(&str, &Option<std::path::PathBuf>)], at: &dyn Fn(&str) -> Vec<Seg>, found: &mut Found) {
    for (k, f) in list {
        if let Some(f) = f {
            if let Err(e) = std::fs::metadata(f) {
                found.push((at(k), format!("cannot read {}: {e}", f.display())));
            }
        }
    }
}

/// Who may connect to the local broker, and with what. A listener other machines can reach must
/// not take anonymous clients unless the operator says so in as many words.
fn broker(b: &super::BrokerSection, found: &mut Found) {
    let users = !b.users.is_empty();
    if users && b.allow_anonymous {
        found.push((
            path(&["broker", "allow_anonymous"]),
            "allow_anonymous = true cannot be combined with [broker.users.*]: once users exist every client must log in; remove one of them".into(),
        ));
    }
    let plain = b.plain_listen();
    if !plain.ip().is_loopback() && !users && !b.allow_anonymous {
        found.push((
            path(&["broker", "listen"]),
            format!(
                "the broker would accept anyone on the network at {plain} without a password: add a [broker.users.NAME] \
                 with a password_file (or password_hash), keep listen on 127.0.0.1, or set allow_anonymous = true"
            ),
        ));
    }
    if let Some(t) = &b.tls {
        let at = |k: &str| path(&["broker", "tls", k]);
        let addr = b.tls_listen().expect("tls is set");
        if !addr.ip().is_loopback() && !users && t.ca_file.is_none() && !b.allow_anonymous {
            found.push((
                path(&["broker", "tls"]),
                format!(
                    "the TLS listener at {addr} would accept anyone on the network: add [broker.users.NAME], \
                     require client certificates with ca_file, or set allow_anonymous = true"
                ),
            ));
        }
        if t.listen.is_some_and(|l| l == b.listen) {
            found.push((at("listen"), "must differ from [broker] listen (leave it out to serve TLS on listen)".into()));
        }
        let files =
            [("cert_file", Some(&t.cert_file)), ("key_file", Some(&t.key_file)), ("ca_file", t.ca_file.as_ref())];
        let mut readable = true;
        for (k, f) in files {
            if let Some(f) = f {
                if let Err(e) = std::fs::metadata(f) {
                    found.push((at(k), format!("cannot read {}: {e}", f.display())));
                    readable = false;
                }
            }
        }
        if readable {
            if let Err((k, e)) = crate::broker::tls::server_config(t) {
                found.push((at(k), e));
            }
        }
    }
    for (name, u) in &b.users {
        let at = |k: &str| path(&["broker", "users", name, k]);
        if name.is_empty() || name.chars().any(char::is_control) || name.len() > 128 {
            found.push((
                path(&["broker", "users", name]),
                "a user name is 1 to 128 characters, no control characters".into(),
            ));
        }
        match (&u.password_file, &u.password_hash) {
            (Some(f), None) => {
                if let Err(e) = std::fs::metadata(f) {
                    found.push((at("password_file"), format!("cannot read {}: {e}", f.display())));
                }
            }
            (None, Some(h)) => {
                if let Err(e) = crate::broker::auth::check_hash(h) {
                    found.push((at("password_hash"), e));
                }
            }
            (Some(_), Some(_)) => {
                found.push((at("password_hash"), "give either password_file or password_hash, not both".into()))
            }
            (None, None) => found.push((
                path(&["broker", "users", name]),
                "a user needs a password_file or a password_hash (make one with `updraft hash-password`)".into(),
            )),
        }
        rights(&["broker", "users", name], &u.publish, &u.subscribe, found);
    }
    if let Some(a) = &b.anonymous {
        if users {
            found.push((
                path(&["broker", "anonymous"]),
                "anonymous clients cannot connect once [broker.users.*] exist, so their rights would never apply: \
                 remove [broker.anonymous], or give the clients an account with these rights"
                    .into(),
            ));
        }
        rights(&["broker", "anonymous"], &a.publish, &a.subscribe, found);
    }
}

/// Each topic right must be a valid MQTT filter; the message names the rule.
fn rights(at: &[&str], publish: &Option<Vec<String>>, subscribe: &Option<Vec<String>>, found: &mut Found) {
    for (key, list) in [("publish", publish), ("subscribe", subscribe)] {
        for (i, f) in list.iter().flatten().enumerate() {
            if let Err(e) = crate::broker::rights::check_filter(f) {
                let mut p = path(at);
                p.push(Seg::Key(key.into()));
                p.push(Seg::Index(i));
                found.push((p, e));
            }
        }
    }
}

/// Why a plugin output template would publish where only the gateway may: a device's readings
/// (`updraft/{device}/{tag}`) or a write command (`…/set`). What only the emitted names decide is
/// refused at run time instead.
fn reserved_output(template: &str, plugin: &str, config: &Config) -> Option<String> {
    let t = template.replace("{plugin}", plugin);
    let levels: Vec<&str> = t.split('/').collect();
    if levels.last() == Some(&"set") {
        return Some("ends in /set, which is reserved for write commands".into());
    }
    let placeholder = |l: &str| l.contains('{');
    if levels.len() == 3 && levels[0] == crate::base::topic::TOPIC_PREFIX {
        let device = levels[1];
        if placeholder(device) || config.devices.contains_key(device) {
            return Some(format!(
                "could publish as a device's reading (`{}/{{device}}/{{tag}}`); use e.g. `updraft/derived/{{device}}/{{tag}}`",
                crate::base::topic::TOPIC_PREFIX
            ));
        }
    }
    None
}
