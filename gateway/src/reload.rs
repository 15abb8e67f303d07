//! What a reload would change: a fingerprint of every part of a config that can restart on its
//! own (each device group, plugin and sink) and of the sections that need a restart, the diff of
//! two fingerprints, and the last good config kept in `{data_dir}/running-config.json`.
//!
//! A fingerprint hashes what the gateway would run: the parsed config (so a CSV register map that
//! changed counts, and a comment that changed does not) and the contents of the files a part
//! loads (a plugin's `.wasm`, a sink's certificates and secrets), so a rebuilt plugin restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// What each part of a config hashes to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprints {
    /// Parts only a restart applies: `[gateway]`, `[broker]`, `[api]`, `[simulators]`, and the
    /// local MQTT topics the sinks take in (one subscription made at start).
    pub restart: BTreeMap<String, String>,
    /// Each device: (its group, its hash).
    pub devices: BTreeMap<String, (String, String)>,
    pub plugins: BTreeMap<String, String>,
    pub sinks: BTreeMap<String, String>,
}

fn hash_of(parts: &[&[u8]]) -> String {
    // `DefaultHasher::new` has fixed keys: the same input hashes the same in every run of a build
    // (a new release may hash differently, which makes its first reload restart everything).
    let mut h = std::hash::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// The contents of a file a part loads; a missing file hashes as such (the loader has already
/// refused a config whose files are missing, so this only happens between check and reload).
fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| format!("unreadable: {e}").into_bytes())
}

impl Fingerprints {
    pub fn of(config: &Config) -> Self {
        let debug = |v: &dyn fmt::Debug| format!("{v:?}");
        let mut restart = BTreeMap::new();
        restart.insert("[gateway]".to_owned(), hash_of(&[debug(&config.gateway).as_bytes()]));
        restart.insert("[broker]".to_owned(), hash_of(&[debug(&config.broker).as_bytes()]));
        restart.insert("[api]".to_owned(), hash_of(&[debug(&config.api).as_bytes()]));
        restart.insert("[simulators]".to_owned(), hash_of(&[debug(&config.simulators).as_bytes()]));
        restart.insert(
            "local topics taken in by [north.*] sources".to_owned(),
            hash_of(&[debug(&crate::sinks::local_topics(config)).as_bytes()]),
        );
        let devices = config
            .devices
            .iter()
            .map(|(name, d)| (name.clone(), (d.group(name), hash_of(&[debug(d).as_bytes()]))))
            .collect();
        let plugins = config
            .plugins
            .iter()
            .map(|(name, p)| (name.clone(), hash_of(&[debug(p).as_bytes(), &file_bytes(&p.wasm)])))
            .collect();
        let sinks = config
            .north
            .iter()
            .map(|(name, s)| {
                let mut parts = vec![debug(s).into_bytes()];
                for (_, f) in s.files() {
                    if let Some(f) = f {
                        parts.push(file_bytes(f));
                    }
                }
                let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                (name.clone(), hash_of(&parts))
            })
            .collect();
        Fingerprints { restart, devices, plugins, sinks }
    }

    /// The names in each device group.
    fn groups(&self) -> BTreeMap<&str, BTreeSet<&str>> {
        let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (name, (group, _)) in &self.devices {
            out.entry(group).or_default().insert(name);
        }
        out
    }
}

/// Added, removed and changed names of one kind of part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    fn between(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Self {
        let mut c = Changes::default();
        for (name, h) in new {
            match old.get(name) {
                None => c.added.push(name.clone()),
                Some(o) if o != h => c.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        c.removed = old.keys().filter(|n| !new.contains_key(*n)).cloned().collect();
        c
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// Everything that stops (removed or changed).
    pub fn stopping(&self) -> impl Iterator<Item = &String> {
        self.removed.iter().chain(&self.changed)
    }

    /// Everything that starts (added or changed).
    pub fn starting(&self) -> impl Iterator<Item = &String> {
        self.added.iter().chain(&self.changed)
    }
}

/// What applying a new config to a running one means.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Parts that changed and only a restart applies; a reload with any is refused.
    pub restart: Vec<String>,
    pub devices: Changes,
    /// Device groups that restart (a changed device restarts the devices sharing its link).
    pub groups: Vec<String>,
    /// Devices that restart only because they share a link with a changed one.
    pub along: Vec<String>,
    pub plugins: Changes,
    pub sinks: Changes,
}

impl Diff {
    pub fn between(old: &Fingerprints, new: &Fingerprints) -> Self {
        let restart =
            new.restart.iter().filter(|(k, v)| old.restart.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
        let hashes = |f: &Fingerprints| f.devices.iter().map(|(n, (g, h))| (n.clone(), format!("{g}/{h}"))).collect();
        let devices = Changes::between(&hashes(old), &hashes(new));
        let (old_groups, new_groups) = (old.groups(), new.groups());
        let touched: BTreeSet<&str> = devices
            .added
            .iter()
            .chain(&devices.changed)
            .filter_map(|n| new.devices.get(n).map(|(g, _)| g.as_str()))
            .chain(
                devices
                    .removed
                    .iter()
                    .chain(&devices.changed)
                    .filter_map(|n| old.devices.get(n).map(|(g, _)| g.as_str())),
            )
            .collect();
        let along = touched
            .iter()
            .flat_map(|g| old_groups.get(g).into_iter().flatten().chain(new_groups.get(g).into_iter().flatten()))
            .filter(|n| {
                let n = n.to_string();
                !devices.added.contains(&n) && !devices.removed.contains(&n) && !devices.changed.contains(&n)
            })
            .map(|n| n.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Diff {
            restart,
            devices,
            groups: touched.into_iter().map(str::to_owned).collect(),
            along,
            plugins: Changes::between(&old.plugins, &new.plugins),
            sinks: Changes::between(&old.sinks, &new.sinks),
        }
    }

    /// Nothing would restart.
    pub fn is_empty(&self) -> bool {
        self.restart.is_empty() && self.devices.is_empty() && self.plugins.is_empty() && self.sinks.is_empty()
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no change: a reload would restart nothing");
        }
        if !self.restart.is_empty() {
            writeln!(f, "needs a restart (a reload is refused): {}", self.restart.join(", "))?;
        }
        for (kind, c) in [("device", &self.devices), ("plugin", &self.plugins), ("sink", &self.sinks)] {
            for n in &c.added {
                writeln!(f, "+ {kind} {n} (added: starts)")?;
            }
            for n in &c.changed {
                writeln!(f, "~ {kind} {n} (changed: restarts)")?;
            }
            for n in &c.removed {
                writeln!(f, "- {kind} {n} (removed: stops)")?;
            }
        }
        for n in &self.along {
            writeln!(f, "~ device {n} (unchanged, restarts: it shares a link with a changed device)")?;
        }
        Ok(())
    }
}

/// The last good config, as `{data_dir}/running-config.json` keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Kept {
    /// The file it was loaded from.
    pub source: PathBuf,
    /// Unix ms it was applied (start-up or reload).
    pub applied_ms: i64,
    pub fingerprints: Fingerprints,
    /// The file's text as it was applied.
    pub toml: String,
}

pub fn kept_path(data_dir: &Path) -> PathBuf {
    data_dir.join("running-config.json")
}

/// Records `source` (as read now) as the running config: written aside and renamed, so a crash
/// leaves the old record or the new one.
pub fn keep(data_dir: &Path, source: &Path, fingerprints: &Fingerprints) -> std::io::Result<()> {
    let kept = Kept {
        source: source.to_path_buf(),
        applied_ms: crate::base::point::now_ms(),
        fingerprints: fingerprints.clone(),
        toml: std::fs::read_to_string(source)?,
    };
    let path = kept_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create(true).truncate(true);
    // The text may hold password hashes: readable by the gateway's user only.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    let mut f = file.open(&tmp)?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(&kept).map_err(std::io::Error::other)?)?;
    drop(f);
    std::fs::rename(&tmp, &path)
}

/// The running config recorded in `data_dir`, if any.
pub fn kept(data_dir: &Path) -> std::io::Result<Kept> {
    let bytes = std::fs::read(kept_path(data_dir))?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(devices: &[(&str, &str, &str)], plugins: &[(&str, &str)]) -> Fingerprints {
        Fingerprints {
            restart: [("[broker]".to_owned(), "b".to_owned())].into(),
            devices: devices.iter().map(|(n, g, h)| (n.to_string(), (g.to_string(), h.to_string()))).collect(),
            plugins: plugins.iter().map(|(n, h)| (n.to_string(), h.to_string())).collect(),
            sinks: BTreeMap::new(),
        }
    }

    #[test]
    fn a_changed_device_restarts_the_devices_on_its_link_and_nothing_else() {
        let old = fp(&[("a", "modbus:x", "1"), ("b", "modbus:x", "2"), ("c", "modbus:y", "3")], &[("p", "1")]);
        let new = fp(
            &[("a", "modbus:x", "1"), ("b", "modbus:x", "9"), ("c", "modbus:y", "3"), ("d", "opcua:d", "4")],
            &[("p", "2")],
        );
        let d = Diff::between(&old, &new);
        assert_eq!(d.devices.changed, ["b"]);
        assert_eq!(d.devices.added, ["d"]);
        assert_eq!(d.groups, ["modbus:x", "opcua:d"]);
        assert_eq!(d.along, ["a"], "a shares b's link");
        assert_eq!(d.plugins.changed, ["p"]);
        assert!(d.restart.is_empty());
        let text = d.to_string();
        assert!(text.contains("~ device b (changed: restarts)") && text.contains("+ device d"), "{text}");
        assert!(Diff::between(&old, &old).is_empty());
    }

    #[test]
    fn a_device_moving_to_another_link_restarts_both() {
        let old = fp(&[("a", "modbus:x", "1"), ("b", "modbus:x", "2")], &[]);
        let new = fp(&[("a", "modbus:x", "1"), ("b", "modbus:z", "2")], &[]);
        let d = Diff::between(&old, &new);
        assert_eq!(d.devices.changed, ["b"]);
        assert_eq!(d.groups, ["modbus:x", "modbus:z"]);
        assert_eq!(d.along, ["a"]);
    }

    #[test]
    fn a_changed_restart_section_is_named() {
        let old = fp(&[], &[]);
        let mut new = old.clone();
        new.restart.insert("[broker]".into(), "other".into());
        assert_eq!(Diff::between(&old, &new).restart, ["[broker]"]);
    }
}
