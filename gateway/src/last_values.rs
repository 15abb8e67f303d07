//! Keeps the last value of every tag across restarts, so the local bus is not empty after one.
//!
//! An HMI that connects right after a gateway restart (a power cut, an upgrade) should see the
//! plant, not nothing until each device's next poll. The hub already holds every tag's last point
//! (`CurrentValues`) and the broker answers retained requests from it, so it is enough to write
//! those points to `{data_dir}/last-values.json` now and then and at a clean shutdown, and to put
//! them back into `CurrentValues` at start, before the broker accepts its first client.
//!
//! What is restored keeps its original `ts` and quality, so a client can tell an old value from a
//! fresh one; each is replaced by the tag's next read. Restored values are never sent to the cloud
//! sinks (they were sent when they were read) and never reach plugins. Only tags the current config
//! still produces are restored: a device tag that is still configured, a plugin output whose topic
//! a configured plugin's output template still renders. A missing, unreadable or corrupt file costs
//! nothing but the restore and a warning: it is a cache, not a record.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::base::point::{now_ms, Point, Quality, Registry, Value};
use crate::config::Config;
use crate::hub::CurrentValues;

/// The file's name under `data_dir`.
pub const FILE_NAME: &str = "last-values.json";
/// Bumped when the layout changes; a file of another version is ignored.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    /// Unix milliseconds of the save, for the operator reading the file.
    saved_at: i64,
    points: Vec<Saved>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    device: String,
    tag: String,
    /// Only plugin outputs carry their topic: a device tag's topic follows from its names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    ts: i64,
    /// `None` for a bad point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Typed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A value with its type, so an `f32` reading comes back as an `f32` and a `u64` as a `u64`.
/// JSON has no NaN or infinity: a non-finite float is written as `null` and read back as NaN.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Typed {
    Bool(bool),
    Int(i64),
    UInt(u64),
    F32(Option<f32>),
    Float(Option<f64>),
    String(String),
}

impl From<&Value> for Typed {
    fn from(v: &Value) -> Self {
        match v {
            Value::Bool(b) => Typed::Bool(*b),
            Value::Int(i) => Typed::Int(*i),
            Value::UInt(u) => Typed::UInt(*u),
            Value::F32(f) => Typed::F32(Some(*f)),
            Value::Float(f) => Typed::Float(Some(*f)),
            Value::String(s) => Typed::String(s.to_string()),
        }
    }
}

impl From<Typed> for Value {
    fn from(t: Typed) -> Self {
        match t {
            Typed::Bool(b) => Value::Bool(b),
            Typed::Int(i) => Value::Int(i),
            Typed::UInt(u) => Value::UInt(u),
            Typed::F32(f) => Value::F32(f.unwrap_or(f32::NAN)),
            Typed::Float(f) => Value::Float(f.unwrap_or(f64::NAN)),
            Typed::String(s) => Value::String(Arc::from(s)),
        }
    }
}

/// Whether a point is kept: device readings and plugin outputs. A plugin's verbatim message is an
/// event, not state, and a local client's message belongs to that client.
fn kept(p: &Point) -> bool {
    !p.key.external && p.payload.is_none()
}

/// Where the file of a config lives.
pub fn path(config: &Config) -> PathBuf {
    config.gateway.data_dir.join(FILE_NAME)
}

/// Writes the current values to `path` atomically: a temporary file in the same folder, flushed
/// to disk, then renamed over the old one. A failure (disk full, read-only) leaves the previous
/// file as it was.
pub fn save(values: &CurrentValues, path: &Path) -> std::io::Result<usize> {
    // Cloning the points is cheap (their names and text are shared); the read lock the drivers'
    // updates wait on is held only for that, not for the rendering and the disk.
    let mut points = Vec::new();
    values.visit(|p| {
        if kept(p) {
            points.push(p.clone());
        }
    });
    let file = File {
        version: VERSION,
        saved_at: now_ms(),
        points: points
            .iter()
            .map(|p| Saved {
                device: p.device().to_owned(),
                tag: p.tag().to_owned(),
                topic: p.key.derived.then(|| String::from_utf8_lossy(&p.key.topic).into_owned()),
                ts: p.ts,
                value: p.value.as_ref().map(Typed::from),
                error: p.error.as_deref().map(str::to_owned),
            })
            .collect(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".last-values-").tempfile_in(dir)?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file_mut());
        serde_json::to_writer(&mut w, &file)?;
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename itself is durable once the folder is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(file.points.len())
}

/// Puts the saved values back into `values`, keeping only tags `config` still produces. Returns
/// how many were restored.
pub fn restore(config: &Config, registry: &Registry, values: &CurrentValues, path: &Path) -> usize {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "Cannot read the saved last values; starting without them.");
            return 0;
        }
    };
    let file: File = match serde_json::from_slice(&bytes) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "The saved last values are corrupt; starting without them.");
            return 0;
        }
    };
    if file.version != VERSION {
        warn!(path = %path.display(), version = file.version, "The saved last values are of another version; starting without them.");
        return 0;
    }
    let mut points = Vec::with_capacity(file.points.len());
    for s in file.points {
        let key = match &s.topic {
            None => {
                let configured = config.devices.get(&s.device).is_some_and(|d| d.tag_names().any(|t| t == s.tag));
                if !configured {
                    continue;
                }
                registry.intern(&s.device, &s.tag)
            }
            Some(topic) => {
                if !plugin_output(config, &s.device, &s.tag, topic) {
                    continue;
                }
                let k = registry.intern_at(&s.device, &s.tag, topic, true);
                // A topic that is a device's or a local client's stays theirs.
                if !k.derived || k.external {
                    continue;
                }
                k
            }
        };
        points.push(match s.value {
            Some(v) => Point::good(key, v.into(), s.ts),
            None => Point::bad(key, Arc::from(s.error.unwrap_or_default()), s.ts),
        });
    }
    // A good point has a value and a bad one has none; that is all the file says about quality.
    debug_assert!(points.iter().all(|p| p.value.is_some() == (p.quality == Quality::Good)));
    values.restore(&points);
    points.len()
}

/// Whether a configured plugin's output template renders `topic` for this device and tag.
fn plugin_output(config: &Config, device: &str, tag: &str, topic: &str) -> bool {
    config
        .plugins
        .iter()
        .any(|(name, p)| p.outputs.values().any(|t| crate::plugins::output_topic(t, name, device, tag) == topic))
}

/// Saves every `every` until `cancel`; the final save belongs to the shutdown, after the pipeline
/// has drained.
pub fn spawn_saver(values: Arc<CurrentValues>, path: PathBuf, every: Duration, cancel: CancellationToken) {
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let (v, p) = (values.clone(), path.clone());
            let result = tokio::task::spawn_blocking(move || save(&v, &p)).await;
            match result {
                Ok(Ok(_)) if failing => {
                    failing = false;
                    info!(path = %path.display(), "Saving the last values works again.");
                }
                Ok(Ok(_)) => {}
                // Said once per run of failures: a full disk must not flood the journal.
                Ok(Err(e)) if !failing => {
                    failing = true;
                    warn!(path = %path.display(), error = %e, "Cannot save the last values; the previous save is kept.");
                }
                Ok(Err(_)) | Err(_) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let toml = format!(
            r#"
            [gateway]
            id = "t"
            data_dir = "{}"
            [devices.boiler-1]
            driver = "modbus-tcp"
            address = "127.0.0.1:1"
            tags = [
              {{ name = "temperature", area = "holding", address = 0, type = "f32" }},
              {{ name = "count", area = "holding", address = 2, type = "u32" }},
            ]
            "#,
            dir.display()
        );
        crate::config::parse(&toml, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn values_come_back_with_their_types_and_only_for_configured_tags() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let file = dir.path().join(FILE_NAME);

        let before = Registry::default();
        let values = CurrentValues::new(Arc::new(Registry::default()));
        values.restore(&[
            Point::good(before.intern("boiler-1", "temperature"), Value::F32(0.1), 10),
            Point::bad(before.intern("boiler-1", "count"), "timeout".into(), 11),
            Point::good(before.intern("gone", "tag"), Value::Int(3), 12),
        ]);
        assert_eq!(save(&values, &file).unwrap(), 3);

        let registry = Arc::new(Registry::default());
        let after = CurrentValues::new(registry.clone());
        assert_eq!(restore(&cfg, &registry, &after, &file), 2);
        let t = after.get("boiler-1", "temperature").unwrap();
        assert_eq!((t.value, t.ts, t.quality), (Some(Value::F32(0.1)), 10, Quality::Good));
        let c = after.get("boiler-1", "count").unwrap();
        assert_eq!((c.quality, c.error.as_deref()), (Quality::Bad, Some("timeout")));
        assert!(after.get("gone", "tag").is_none(), "a device no longer configured is not restored");
    }

    #[test]
    fn a_corrupt_file_restores_nothing_and_a_failed_save_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let file = dir.path().join(FILE_NAME);
        std::fs::write(&file, b"{\"version\":1,\"points\":[{\"dev").unwrap();
        let registry = Arc::new(Registry::default());
        let values = CurrentValues::new(registry.clone());
        assert_eq!(restore(&cfg, &registry, &values, &file), 0);

        // A save into a folder that does not exist fails and writes nothing anywhere.
        let missing = dir.path().join("no-such-folder").join(FILE_NAME);
        assert!(save(&values, &missing).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"{\"version\":1,\"points\":[{\"dev");
    }
}
