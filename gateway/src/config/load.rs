//! Loads a config file and turns every problem into `FILE:LINE:COLUMN: message`.
//!
//! The document is parsed once into toml's spanned tree (`DeTable`). The fixed sections are
//! deserialized from it directly; `[devices.*]` and `[simulators.*]` are dispatched by hand on their
//! `driver`/`kind` key and deserialized from their own spanned sub-tree. serde's internally tagged
//! enums would buffer the table and lose every position inside it; this way a misspelt key deep in a
//! device still points at its own line, and problems in several devices are all reported at once.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::validate::{self, Seg};
use super::{Config, DeviceConfig, NorthConfig, SimulatorConfig};
use crate::drivers::modbus::config::{Kind as ModbusKind, ModbusDevice, ModbusSimulator};

/// One problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates a config file. Relative paths inside it resolve against its folder.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![Problem {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message: format!("cannot read the config file: {e}"),
        }],
    })?;
    parse(&text, path)
}

/// Parses and validates config text; `file` names it in messages, and relative paths inside it
/// resolve against its folder.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let mut loc = Locator { text, file, problems: Vec::new() };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            loc.toml_error(&e);
            return Err(loc.finish());
        }
    };
    let root_span = root.span();
    let spanned_root = root.clone();
    let mut table = root.into_inner();
    let devices = table.remove("devices");
    let simulators = table.remove("simulators");
    let north = table.remove("north");

    let config: Option<Config> = loc.deserialize(Spanned::new(root_span, DeValue::Table(table)));
    let devices = loc.named_tables(devices, "devices", "driver", DeviceConfig::DRIVERS, |loc, kind, v| match kind {
        "modbus-tcp" | "modbus-rtu-tcp" | "modbus-rtu" => {
            let kind = match kind {
                "modbus-rtu-tcp" => ModbusKind::RtuOverTcp,
                "modbus-rtu" => ModbusKind::Rtu,
                _ => ModbusKind::Tcp,
            };
            loc.deserialize(v).map(|d| DeviceConfig::Modbus(ModbusDevice { kind, ..d }))
        }
        "opcua" => loc.deserialize(v).map(DeviceConfig::Opcua),
        _ => None,
    });
    let simulators =
        loc.named_tables(simulators, "simulators", "kind", SimulatorConfig::KINDS, |loc, kind, v| match kind {
            "modbus-tcp" | "modbus-rtu-tcp" | "modbus-rtu" => {
                let kind = match kind {
                    "modbus-rtu-tcp" => ModbusKind::RtuOverTcp,
                    "modbus-rtu" => ModbusKind::Rtu,
                    _ => ModbusKind::Tcp,
                };
                loc.deserialize(v).map(|s| SimulatorConfig::Modbus(ModbusSimulator { kind, ..s }))
            }
            "opcua" => loc.deserialize(v).map(SimulatorConfig::Opcua),
            _ => None,
        });

    let north = loc.named_tables(north, "north", "type", NorthConfig::TYPES, |loc, kind, v| match kind {
        "mqtt" => loc.deserialize(v).map(NorthConfig::Mqtt),
        "http" => loc.deserialize(v).map(NorthConfig::Http),
        _ => None,
    });

    let mut config = match config {
        Some(c) if loc.problems.is_empty() => c,
        _ => return Err(loc.finish()),
    };
    config.devices = devices;
    config.simulators = simulators;
    config.north = north;
    let base = file.parent().unwrap_or(Path::new("."));
    if config.gateway.data_dir.is_relative() {
        config.gateway.data_dir = base.join(&config.gateway.data_dir);
    }
    for plugin in config.plugins.values_mut() {
        if plugin.wasm.is_relative() {
            plugin.wasm = base.join(&plugin.wasm);
        }
    }
    let broker_files =
        config.broker.tls.iter_mut().flat_map(|t| [Some(&mut t.cert_file), Some(&mut t.key_file), t.ca_file.as_mut()]);
    let user_files = config.broker.users.values_mut().map(|u| u.password_file.as_mut());
    let api_files = std::iter::once(config.api.token_file.as_mut());
    for f in broker_files.chain(user_files).chain(api_files).flatten() {
        if f.is_relative() {
            *f = base.join(&*f);
        }
    }
    for (name, device) in config.devices.iter_mut() {
        let at = span_of(spanned_root.get_ref(), &[Seg::Key("devices".into()), Seg::Key(name.clone())])
            .map_or(0, |s| s.start);
        for (file, line, column, message) in device.load_files(base) {
            loc.push_located(at, Problem { file, line, column, message });
        }
    }
    for sink in config.north.values_mut() {
        for f in sink.files_mut().into_iter().flatten() {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
    }

    for (path, message) in validate::validate(&config) {
        let span = span_of(spanned_root.get_ref(), &path).unwrap_or(0..0);
        // A problem about a tag from a CSV register map points into that file.
        let elsewhere = match path.as_slice() {
            [Seg::Key(d), Seg::Key(name), rest @ ..] if d == "devices" => {
                config.devices.get(name).and_then(|dev| dev.locate(rest))
            }
            _ => None,
        };
        match elsewhere {
            Some((file, line, column)) => loc.push_located(span.start, Problem { file, line, column, message }),
            None => loc.push(span.start, message),
        }
    }
    if loc.problems.is_empty() {
        Ok(config)
    } else {
        Err(loc.finish())
    }
}

struct Locator<'a> {
    text: &'a str,
    file: &'a Path,
    problems: Vec<(usize, Problem)>,
}

impl Locator<'_> {
    fn push(&mut self, offset: usize, message: String) {
        let (line, column) = line_col(self.text, offset);
        self.problems.push((offset, Problem { file: self.file.to_owned(), line, column, message }));
    }

    /// A problem located in another file (a CSV register map), sorted with the TOML's at `offset`.
    fn push_located(&mut self, offset: usize, problem: Problem) {
        self.problems.push((offset, problem));
    }

    fn toml_error(&mut self, e: &toml::de::Error) {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let message = improve_message(e.message().trim());
        self.push(offset, message);
    }

    /// Deserializes a spanned value, reporting every problem in it, not only serde's first: after
    /// each error the offending entry is cut out of a copy and deserialization is tried again.
    fn deserialize<T: DeserializeOwned>(&mut self, value: Spanned<DeValue<'_>>) -> Option<T> {
        let first = match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        self.toml_error(&first);
        let (span, mut rest) = (value.span(), value.into_inner());
        let mut removed: Vec<String> = Vec::new();
        let mut err = first;
        // A bounded number of rounds: each removes one entry, so this always ends.
        for _ in 0..32 {
            // A misspelt key whose intended name is required would reappear as "missing field".
            if let Some(meant) = suggestion(err.message()) {
                removed.push(meant);
            }
            let Some(at) = err.span().map(|s| s.start) else { break };
            match remove_at(&mut rest, at) {
                Some(key) => removed.push(key),
                None => break,
            }
            match T::deserialize(ValueDeserializer::from(Spanned::new(span.clone(), rest.clone()))) {
                Ok(_) => break,
                Err(e) => {
                    // A "missing field" for a key we cut out ourselves is our artefact, not news.
                    let artefact = e.message().starts_with("missing field")
                        && removed.iter().any(|k| e.message().contains(&format!("`{k}`")));
                    if artefact {
                        break;
                    }
                    self.toml_error(&e);
                    err = e;
                }
            }
        }
        None
    }

    /// Deserializes `[section.NAME]` tables whose variant is chosen by the `tag_key` key.
    fn named_tables<T>(
        &mut self,
        section: Option<Spanned<DeValue<'_>>>,
        section_name: &str,
        tag_key: &str,
        kinds: &[&str],
        build: impl Fn(&mut Self, &str, Spanned<DeValue<'_>>) -> Option<T>,
    ) -> std::collections::BTreeMap<String, T> {
        let mut out = std::collections::BTreeMap::new();
        let Some(section) = section else { return out };
        let span = section.span();
        let DeValue::Table(tables) = section.into_inner() else {
            self.push(
                span.start,
                format!("`{section_name}` must be a table of named tables, e.g. [{section_name}.NAME]"),
            );
            return out;
        };
        for (name, value) in tables {
            let name_span = name.span();
            let name = name.into_inner().into_owned();
            let value_span = value.span();
            let DeValue::Table(mut table) = value.into_inner() else {
                self.push(name_span.start, format!("`{section_name}.{name}` must be a table"));
                continue;
            };
            let Some(kind) = table.remove(tag_key) else {
                self.push(
                    value_span.start,
                    format!("`{section_name}.{name}` has no `{tag_key}` key; add one of: {}", kinds.join(", ")),
                );
                continue;
            };
            let kind_span = kind.span();
            let Some(kind) = kind.get_ref().as_str().map(str::to_owned) else {
                self.push(kind_span.start, format!("`{tag_key}` must be a string, one of: {}", kinds.join(", ")));
                continue;
            };
            if !kinds.contains(&kind.as_str()) {
                let hint = suggest(&kind, kinds).map(|s| format!("; did you mean `{s}`?")).unwrap_or_default();
                self.push(
                    kind_span.start,
                    format!("unknown {tag_key} `{kind}`, expected one of: {}{hint}", kinds.join(", ")),
                );
                continue;
            }
            if let Some(v) = build(self, &kind, Spanned::new(value_span, DeValue::Table(table))) {
                out.insert(name, v);
            }
        }
        out
    }

    fn finish(mut self) -> ConfigError {
        self.problems.sort_by_key(|(offset, _)| *offset);
        ConfigError { problems: self.problems.into_iter().map(|(_, p)| p).collect() }
    }
}

/// Removes the innermost table entry or array element at byte `offset`; returns the key removed
/// (empty for an array element).
fn remove_at(value: &mut DeValue<'_>, offset: usize) -> Option<String> {
    let contains = |s: std::ops::Range<usize>| s.start <= offset && offset < s.end.max(s.start + 1);
    match value {
        DeValue::Table(t) => {
            let key = t
                .iter()
                .find(|(k, v)| contains(k.span()) || contains(v.span()))
                .map(|(k, _)| k.get_ref().to_string())?;
            let inner = t.get_mut(key.as_str()).map(|v| v.get_mut())?;
            if let Some(k) = remove_at(inner, offset) {
                return Some(k);
            }
            t.remove(key.as_str());
            Some(key)
        }
        DeValue::Array(a) => {
            let i = a.iter().position(|v| contains(v.span()))?;
            let mut items: Vec<_> = std::mem::replace(a, toml::de::DeArray::new()).iter().cloned().collect();
            let found = remove_at(items[i].get_mut(), offset);
            if found.is_none() {
                items.remove(i);
            }
            for item in items {
                a.push(item);
            }
            Some(found.unwrap_or_default())
        }
        _ => None,
    }
}

/// Adds "did you mean" to serde's unknown-field and unknown-variant messages.
fn improve_message(message: &str) -> String {
    match suggestion(message) {
        Some(s) => format!("{message}; did you mean `{s}`?"),
        None => message.to_owned(),
    }
}

/// The likely intended name for serde's unknown-field or unknown-variant message.
fn suggestion(message: &str) -> Option<String> {
    let grab = |m: &str| -> Option<(String, Vec<String>)> {
        let start = m.find('`')? + 1;
        let end = start + m[start..].find('`')?;
        let got = m[start..end].to_owned();
        let expected = m.split_once("expected one of ").or_else(|| m.split_once("expected "))?.1;
        let options = expected
            .split(", ")
            .flat_map(|s| s.split(" or "))
            .map(|s| s.trim_matches(|c| c == '`' || c == ' ').to_owned())
            .collect();
        Some((got, options))
    };
    if !(message.starts_with("unknown field") || message.starts_with("unknown variant")) {
        return None;
    }
    let (got, options) = grab(message)?;
    let refs: Vec<&str> = options.iter().map(String::as_str).collect();
    suggest(&got, &refs).map(str::to_owned)
}

/// The closest known name, if it is close enough to be a likely typo.
fn suggest<'a>(got: &str, options: &[&'a str]) -> Option<&'a str> {
    options
        .iter()
        .map(|o| (strsim::damerau_levenshtein(&got.to_lowercase(), &o.to_lowercase()), *o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

/// `FILE:LINE:COLUMN` of the value at `path` in a config file that loaded, for problems found
/// later (a plugin refusing its `config`); the first of `keys` found inside that value, if any,
/// narrows it to that key's value.
pub fn locate(file: &Path, path: &[&str], keys: &[&str]) -> String {
    let Ok(text) = std::fs::read_to_string(file) else { return file.display().to_string() };
    let Ok(root) = DeTable::parse(&text) else { return file.display().to_string() };
    let mut segs: Vec<Seg> = path.iter().map(|k| Seg::Key((*k).to_owned())).collect();
    let mut span = span_of(root.get_ref(), &segs);
    for k in keys {
        segs.push(Seg::Key((*k).to_owned()));
        let inner = span_of(root.get_ref(), &segs);
        segs.pop();
        // `span_of` stops at the deepest part that exists: a longer span means the key was found.
        if inner.as_ref().zip(span.as_ref()).is_some_and(|(i, s)| i != s) {
            span = inner;
            break;
        }
    }
    let (line, column) = line_col(&text, span.map_or(0, |s| s.start));
    format!("{}:{line}:{column}", file.display())
}

/// The span of the value at `path`, or of the deepest part of it that exists.
fn span_of(root: &DeTable<'_>, path: &[Seg]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let Seg::Key(k) = first else { return None };
    let mut cur = root.get(k.as_str())?;
    for seg in rest {
        let next = match (seg, cur.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => t.get(k.as_str()),
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => break,
        }
    }
    Some(cur.span())
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, text[line_start..offset].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse(text, Path::new("t.toml")).unwrap_err().problems.iter().map(ToString::to_string).collect()
    }

    const GOOD: &str = r#"
[gateway]
id = "gw"

[devices.boiler-1]
driver = "modbus-tcp"
address = "127.0.0.1:5020"
tags = [
  { name = "temperature", area = "holding", address = 0, type = "f32", order = "ABCD", scale = 0.1, unit = "°C" },
  { name = "running", area = "coil", address = 0, type = "bool" },
]
"#;

    #[test]
    fn contract_example_parses() {
        let c = parse(GOOD, Path::new("t.toml")).unwrap();
        let DeviceConfig::Modbus(d) = &c.devices["boiler-1"] else { panic!("a Modbus device") };
        assert_eq!(d.tags.len(), 2);
        assert_eq!(d.unit_id, 1);
    }

    #[test]
    fn misspelt_key_points_at_its_line_and_suggests() {
        let p = problems(&GOOD.replace("address = \"127", "adress = \"127"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("t.toml:7:1: unknown field `adress`"), "{p:?}");
        assert!(p[0].contains("did you mean `address`?"), "{p:?}");
    }

    #[test]
    fn bad_type_inside_inline_tag_points_at_the_value() {
        let p = problems(&GOOD.replace("type = \"f32\"", "type = \"float\""));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("t.toml:9:"), "{p:?}");
        assert!(p[0].contains("unknown variant `float`"), "{p:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = GOOD
            .replace("type = \"bool\"", "type = \"boolean\"")
            .replace("[gateway]\nid = \"gw\"", "[gateway]\nid = \"gw\"\nname = 1");
        let p = problems(&text);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("t.toml:4:"), "{p:?}");
        assert!(p[1].starts_with("t.toml:11:"), "{p:?}");
    }

    #[test]
    fn opcua_devices_are_checked_where_the_operator_wrote_them() {
        let text = "[gateway]\nid = \"gw\"\n[devices.press]\ndriver = \"opcua\"\nendpoint = \"http://plc:4840\"\n\
                    security_policy = \"Basic256Sha256\"\nusername = \"op\"\n\
                    tags = [\n  { name = \"a\", node = \"ns=2;s=Line3.Speed\" },\n  { name = \"a\", node = \"Line3.Speed\" },\n]\n";
        let p = problems(text);
        let has = |at: &str, what: &str| p.iter().any(|l| l.starts_with(at) && l.contains(what));
        assert!(has("t.toml:5:12:", "not an OPC-UA endpoint; write opc.tcp://host:port"), "{p:?}");
        assert!(p.iter().any(|l| l.contains("security_policy and security_mode go together")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("`username` and `password_file` go together")), "{p:?}");
        assert!(has("t.toml:10:12:", "appears twice"), "{p:?}");
        assert!(has("t.toml:10:24:", "is not a NodeId; write ns=<index>;s=<name>"), "{p:?}");
        let sim = "[gateway]\nid = \"gw\"\n[simulators.s]\nkind = \"opcua\"\nlisten = \"127.0.0.1:0\"\nvariables = [{ name = \"v\", type = \"f128\" }]\n";
        let p = problems(sim);
        assert!(p.iter().any(|l| l.starts_with("t.toml:6:35:") && l.contains("did you mean `f32`?")), "{p:?}");
        let ok = "[gateway]\nid = \"gw\"\n[devices.press]\ndriver = \"opcua\"\nendpoint = \"opc.tcp://plc:4840\"\n\
                  tags = [{ name = \"speed\", node = \"ns=2;s=Line3.Speed\", access = \"rw\" }]\n";
        assert!(parse(ok, Path::new("t.toml")).is_ok());
    }

    #[test]
    fn serial_lines_are_checked_per_device_and_across_the_devices_on_them() {
        let dev = |name: &str, extra: &str| {
            format!(
                "[devices.{name}]\ndriver = \"modbus-rtu\"\nport = \"/dev/ttyUSB0\"\n{extra}\ntags = [{{ name = \"t\", area = \"holding\", address = 0 }}]\n"
            )
        };
        let ok =
            format!("[gateway]\nid = \"gw\"\n{}{}", dev("a", "baud = 19200"), dev("b", "baud = 19200\nunit_id = 2"));
        assert!(parse(&ok, Path::new("t.toml")).is_ok(), "two slaves on one line, set up alike");
        let text = format!(
            "[gateway]\nid = \"gw\"\n{}{}[devices.c]\ndriver = \"modbus-tcp\"\naddress = \"10.0.0.1:502\"\nbaud = 9600\n\
             tags = [{{ name = \"t\", area = \"holding\", address = 0 }}]\n[devices.d]\ndriver = \"modbus-rtu\"\n\
             address = \"10.0.0.1:502\"\nunit_id = 0\ntags = [{{ name = \"t\", area = \"holding\", address = 0 }}]\n",
            dev("a", "baud = 19200"),
            dev("b", "baud = 9600\nunit_id = 2"),
        );
        let p = problems(&text);
        let has = |at: &str, what: &str| p.iter().any(|l| l.starts_with(at) && l.contains(what));
        // b's baud disagrees with a's on the same port: the line's settings are the line's.
        assert!(has("t.toml:11:8:", "sets /dev/ttyUSB0 up differently"), "{p:?}");
        assert!(has("t.toml:17:8:", "`baud` is a serial line setting"), "{p:?}");
        assert!(has("t.toml:21:11:", "names its serial `port`, not an `address`"), "{p:?}");
        assert!(p.iter().any(|l| l.contains("needs `port`")), "{p:?}");
        assert!(has("t.toml:22:11:", "must be 1..247 on a serial line"), "{p:?}");
        // One address cannot be both a Modbus TCP gateway and an RTU-over-TCP device server.
        let mixed = GOOD.replace("[devices.boiler-1]", "[devices.x]\ndriver = \"modbus-rtu-tcp\"\naddress = \"ADDR\"\ntags = [{ name = \"t\", area = \"holding\", address = 0 }]\n\n[devices.boiler-1]");
        let addr = GOOD.lines().find_map(|l| l.strip_prefix("address = \"")).map(|a| a.trim_end_matches('"')).unwrap();
        let p = problems(&mixed.replace("ADDR", addr));
        assert!(p.iter().any(|l| l.contains("one link speaks one framing")), "{p:?}");
    }

    #[test]
    fn string_tags_need_a_length_and_a_text_order() {
        let text = GOOD.replace(
            "{ name = \"running\", area = \"coil\", address = 0, type = \"bool\" },",
            "{ name = \"running\", area = \"coil\", address = 0, type = \"bool\" },\n  \
             { name = \"a\", area = \"holding\", address = 10, type = \"string\" },\n  \
             { name = \"b\", area = \"holding\", address = 20, type = \"string\", length = 4, order = \"CDAB\" },\n  \
             { name = \"c\", area = \"holding\", address = 30, length = 4 },",
        );
        let p = problems(&text);
        assert!(p.iter().any(|l| l.contains("a string needs `length`")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("a string's order is \"ABCD\"")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("`length` is for type = \"string\"")), "{p:?}");
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn unknown_driver_is_named() {
        let p = problems(&GOOD.replace("\"modbus-tcp\"", "\"modbus-tpc\""));
        assert!(p[0].starts_with("t.toml:6:10: unknown driver `modbus-tpc`"), "{p:?}");
        assert!(p[0].contains("did you mean `modbus-tcp`?"), "{p:?}");
    }

    #[test]
    fn validation_problems_point_at_the_key() {
        let text = GOOD.replace(
            "name = \"running\", area = \"coil\", address = 0",
            "name = \"temperature\", area = \"coil\", address = 0",
        );
        let p = problems(&text);
        assert!(p[0].starts_with("t.toml:10:"), "{p:?}");
        assert!(p[0].contains("duplicate tag name `temperature`"), "{p:?}");
    }

    #[test]
    fn the_contract_sink_parses_and_its_mistakes_are_located() {
        let sink = r#"
[north.cloud]
type = "mqtt"
url = "mqtts://iot.example.com:8883"
client_id = "park-a-gw-01"
topic = "parks/{gateway}/{device}"
qos = 1
sources = ["*/*", "updraft/derived/#"]
batch = { max_points = 500, max_wait = "1s" }
[north.cloud.buffer]
max_bytes = "1GiB"
max_age = "7d"
on_full = "drop-oldest"
"#;
        let c = parse(&format!("{GOOD}{sink}"), Path::new("t.toml")).unwrap();
        let super::super::NorthConfig::Mqtt(m) = &c.north["cloud"] else { panic!("an mqtt sink") };
        assert_eq!(m.buffer.max_bytes.0, 1 << 30);
        assert_eq!(m.batch.max_wait.unwrap().0, std::time::Duration::from_secs(1));

        let p = problems(&format!("{GOOD}{}", sink.replace("\"mqtt\"", "\"mqqt\"")));
        assert!(p[0].starts_with("t.toml:14:8: unknown type `mqqt`") && p[0].contains("did you mean `mqtt`?"), "{p:?}");
        let bad = sink
            .replace("mqtts://iot.example.com:8883", "iot.example.com:8883")
            .replace("qos = 1", "qos = 2")
            .replace("\"*/*\"", "\"*/a/#/b\"")
            .replace("drop-oldest", "drop-newest")
            .replace("[north.cloud.buffer]", "password_file = \"/nonexistent/cloud.secret\"\n[north.cloud.buffer]");
        let p = problems(&format!("{GOOD}{bad}"));
        // The enum mistake is found by serde first; fix it to see the semantic checks.
        assert!(p.iter().any(|p| p.starts_with("t.toml:25:11:") && p.contains("did you mean `drop-oldest`?")), "{p:?}");
        let p = problems(&format!("{GOOD}{}", bad.replace("drop-newest", "drop-oldest")));
        assert!(p.iter().any(|p| p.starts_with("t.toml:15:") && p.contains("mqtt://host[:port]")), "{p:?}");
        assert!(p.iter().any(|p| p.starts_with("t.toml:18:") && p.contains("qos must be 0 or 1")), "{p:?}");
        assert!(p.iter().any(|p| p.starts_with("t.toml:19:") && p.contains("*/a/#/b")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("cannot read /nonexistent/cloud.secret")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("a password needs a `username`")), "{p:?}");
    }

    #[test]
    fn a_batch_that_can_outgrow_the_clouds_message_size_is_refused() {
        let sink = "[north.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"\nmax_message_size = \"16KiB\"\nbatch = { max_points = 500 }\n";
        let p = problems(&format!("{GOOD}{sink}"));
        assert!(
            p.iter().any(|p| p.starts_with("t.toml:16:")
                && p.contains("over max_message_size")
                && p.contains("lower max_points to")),
            "{p:?}"
        );
        let fits = sink.replace("500", "80");
        assert!(parse(&format!("{GOOD}{fits}"), Path::new("t.toml")).is_ok());
    }

    #[test]
    fn template_placeholders_are_checked_at_the_line() {
        let sink = "[north.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"\ntopic = \"parks/{gateway}/{devcie}\"\n";
        let p = problems(&format!("{GOOD}{sink}"));
        assert!(p.iter().any(|p| p.starts_with("t.toml:15:") && p.contains("unknown placeholder `{devcie}`")), "{p:?}");
        let status = sink.replace("{devcie}", "{device}") + "status_topic = \"s/{device}\"\n";
        let p = problems(&format!("{GOOD}{status}"));
        assert!(p.iter().any(|p| p.starts_with("t.toml:16:") && p.contains("cannot use {device}")), "{p:?}");
    }

    #[test]
    fn topic_rights_are_checked_at_the_filter() {
        let users = "[broker.users.hmi]\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"\npublish = [\"hmi/#\", \"updraft/#/set\"]\n";
        let p = problems(&format!("{GOOD}{users}"));
        assert!(
            p.iter().any(|p| p.starts_with("t.toml:14:21:") && p.contains("`#` must be a whole level and the last")),
            "{p:?}"
        );
        let anonymous = "[broker.anonymous]\nsubscribe = [\"updraft/#\"]\n";
        let p = problems(&format!("{GOOD}{}{anonymous}", users.replace("/#/set", "/+/+/set")));
        assert!(
            p.iter().any(|p| p.starts_with("t.toml:15:") && p.contains("anonymous clients cannot connect")),
            "{p:?}"
        );
        assert!(parse(&format!("{GOOD}{anonymous}"), Path::new("t.toml")).is_ok());
    }

    #[test]
    fn syntax_error_is_located() {
        let p = problems("[gateway]\nid = = 1\n");
        assert!(p[0].starts_with("t.toml:2:6:"), "{p:?}");
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\n°cd", 5), (2, 2));
        assert_eq!(line_col("", 0), (1, 1));
    }

    #[test]
    fn a_star_inside_a_plugin_filter_is_refused_at_its_line() {
        let text = "[gateway]\nid = \"g\"\n[plugins.p]\nwasm = \"p.wasm\"\nsubscribe = [\"*/power\", \"*/power*\"]\n";
        let p = problems(text);
        assert!(
            p.iter().any(|p| p.starts_with("t.toml:5:25:") && p.contains("`*` matches a whole device or tag name")),
            "{p:?}"
        );
        assert!(!p.iter().any(|p| p.contains("`*/power`")), "a whole-segment `*` is fine: {p:?}");
    }
}
