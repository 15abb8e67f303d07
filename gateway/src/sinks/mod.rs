//! Northbound sinks: store-and-forward to the cloud.
//!
//! Each `[north.NAME]` sink is a terminal consumer of the hub and runs in two halves that meet at
//! its disk buffer (`{data_dir}/north/{name}`):
//! - `buffer`: a thread that filters the hub's batches by the sink's `sources`, encodes them
//!   (`codec`) and appends them to the store (`store`), making them durable on a short interval
//!   (group commit) and applying acknowledgements;
//! - a transport (`mqtt`, `http`) that reads records in order through an `Outbox`, groups points
//!   into one JSON message per device, sends them, and acknowledges records once the cloud confirmed
//!   every point in them (MQTT PUBACK, HTTP 2xx).
//!
//! The only copy of undelivered data that matters is the one on disk: the transport may lose its
//! connection, its in-flight window or its process at any time and starts again from the first
//! unacknowledged record (at-least-once; duplicates only within the in-flight window).

pub mod buffer;
pub mod codec;
pub mod http;
pub mod mqtt;
pub mod outbox;
pub mod store;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::base::point::TagKey;
use crate::config::NorthConfig;
use crate::metrics::{Counter, Gauge, Metrics};

/// One entry of a sink's `sources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `device/tag` with `*` for a whole segment: device points only.
    Tag { device: String, tag: String },
    /// An MQTT topic filter (`+`, `#`) matched against a point's topic on the local broker, which
    /// is how plugin outputs (`updraft/derived/#`) are selected.
    Topic(Vec<String>),
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, String> {
        let segs: Vec<&str> = s.split('/').collect();
        if s.contains(['+', '#']) || segs.len() != 2 {
            for (i, seg) in segs.iter().enumerate() {
                let bad_hash = seg.contains('#') && (*seg != "#" || i + 1 != segs.len());
                let bad_plus = seg.contains('+') && *seg != "+";
                if bad_hash || bad_plus || seg.contains('*') {
                    return Err(format!(
                        "source `{s}` is neither `device/tag` (with `*` for any one segment) nor an MQTT topic filter \
                         (`+` for one level, `#` at the end)"
                    ));
                }
            }
            return Ok(Source::Topic(segs.into_iter().map(str::to_owned).collect()));
        }
        if segs.iter().any(|seg| seg.is_empty() || (seg.contains('*') && *seg != "*")) {
            return Err(format!("source `{s}` must be `device/tag`, with `*` for a whole segment"));
        }
        Ok(Source::Tag { device: segs[0].to_owned(), tag: segs[1].to_owned() })
    }

    pub fn matches(&self, key: &TagKey) -> bool {
        match self {
            Source::Tag { device, tag } => {
                !key.derived && (device == "*" || **device == *key.device) && (tag == "*" || **tag == *key.tag)
            }
            Source::Topic(filter) => filter_matches(filter, &String::from_utf8_lossy(&key.topic)),
        }
    }
}

/// Whether an MQTT topic filter (its levels: `+` one level, `#` the rest) matches `topic`.
pub fn filter_matches(filter: &[impl AsRef<str>], topic: &str) -> bool {
    let mut levels = topic.split('/');
    for f in filter {
        let f = f.as_ref();
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(l) if f == "+" || f == l => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// A sink's counters, on `/metrics` with a `sink` label.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Points written to the buffer.
    pub accepted: Counter,
    /// Points the cloud acknowledged.
    pub delivered: Counter,
    /// Points dropped at the buffer's cap (`drop-oldest` or `reject-new`).
    pub dropped_full: Counter,
    /// Points older than `max_age` when their turn came.
    pub dropped_expired: Counter,
    /// Points dropped from memory while the disk refused writes.
    pub dropped_disk: Counter,
    /// Points the cloud refused for good (HTTP 4xx other than 401, 403, 408, 429).
    pub dropped_rejected: Counter,
    /// Records that passed their checksum but could not be decoded.
    pub dropped_corrupt: Counter,
    /// Points whose destination would be one of the sink's own control topics (commands, status).
    pub dropped_reserved: Counter,
    /// Points in messages the cloud could never take (quarantined).
    pub dropped_poison: Counter,
    /// Bytes cut from a torn tail at start-up.
    pub truncated_bytes: Counter,
    pub messages_sent: Counter,
    pub connects: Counter,
    pub connect_failures: Counter,
    pub disk_errors: Counter,
    pub pending_points: Gauge,
    pub buffer_bytes: Gauge,
    /// 1 while connected to the cloud.
    pub connected: Gauge,
    /// 0 while the disk refuses writes (data is then held in memory, up to `memory_bytes`).
    pub disk_ok: Gauge,
    /// Unix ms of the cloud's last acknowledgement (0: none yet).
    pub last_ack_ms: Gauge,
    /// Unix ms the sink last had nothing waiting (everything accepted was settled); how long ago
    /// that was is the age of its backlog.
    pub caught_up_ms: Gauge,
}

/// What the sinks want from the embedded broker itself: the topic filters in their `sources`
/// outside the gateway's own `updraft/…` topics (what local MQTT devices publish), and the fixed
/// start of every MQTT sink's own topics, which must never be taken in again (a sink whose "cloud"
/// is this very broker, as in the demo, would feed on its own output).
pub fn local_topics(config: &crate::config::Config) -> (Vec<String>, Vec<String>) {
    let ours = format!("{}/", crate::base::topic::TOPIC_PREFIX);
    let filters: std::collections::BTreeSet<String> = config
        .north
        .values()
        .flat_map(|n| n.sources().iter())
        .filter(|s| matches!(Source::parse(s), Ok(Source::Topic(_))) && !s.starts_with(&ours))
        .cloned()
        .collect();
    let own_output = config
        .north
        .values()
        .filter_map(|n| match n {
            NorthConfig::Mqtt(m) => {
                let t = m.topic.with_gateway(&config.gateway.id);
                Some(t[..t.find('{').unwrap_or(t.len())].to_owned()).filter(|p| !p.is_empty())
            }
            NorthConfig::Http(_) => None,
        })
        .collect();
    (filters.into_iter().collect(), own_output)
}

/// A fresh, empty folder for a unit test of the sink modules.
#[cfg(test)]
pub(crate) fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("updraft-{tag}-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts every configured sink. Each registers as a terminal consumer of the hub.
/// A running sink: its buffer thread (which ends when its hub queue closes) and its client task.
pub struct SinkRun {
    pub thread: std::thread::JoinHandle<()>,
    pub client: tokio::task::JoinHandle<()>,
    pub cancel: CancellationToken,
}

/// The name a sink's queue has at the hub (and on `updraft_dropped_points_total`).
pub fn consumer_name(sink: &str) -> String {
    format!("north:{sink}")
}

/// Opens the sink's buffer (repairing it if needed), subscribes it to the hub and starts its
/// client. `subscribe` is the hub's, before it runs, or a running hub's handle (reload).
pub fn start_one(
    config: &crate::config::Config,
    name: &str,
    subscribe: impl FnOnce(&str) -> tokio::sync::mpsc::Receiver<crate::base::point::Batch>,
    metrics: &Arc<Metrics>,
    commands: &Arc<crate::commands::Commands>,
    cancel: CancellationToken,
) -> std::io::Result<SinkRun> {
    let sink = &config.north[name];
    let stats = metrics.sink(name);
    let dir = config.gateway.data_dir.join("north").join(name);
    let sources = sink.sources().iter().filter_map(|s| Source::parse(s).ok()).collect();
    let (shared, dict) = buffer::open(name, &dir, sink.buffer(), stats.clone())?;
    let gateway = &config.gateway.id;
    let mut outbox =
        outbox::Outbox::new(shared.clone(), gateway, sink.template(), sink.batch(), sink.buffer().max_age.0);
    outbox.limit_size(sink.max_message_size());
    if let NorthConfig::Mqtt(m) = sink {
        // A forwarded local topic must never come out as one of the sink's own control topics:
        // a local client could then issue cloud commands, or fake the gateway's status.
        let commands = crate::commands::Route::new(&mqtt::command_template(m, gateway)).filter;
        outbox.reserve(&[commands, mqtt::status_topic(m, gateway)]);
    }
    let client = match sink {
        NorthConfig::Mqtt(m) => {
            let client = mqtt::MqttSink::new(name, &config.gateway.id, m, commands.clone(), stats)
                .map_err(std::io::Error::other)?;
            tokio::spawn(client.run(outbox, cancel.clone()))
        }
        NorthConfig::Http(h) => {
            let client = http::HttpSink::new(name, h, stats).map_err(std::io::Error::other)?;
            tokio::spawn(client.run(outbox, cancel.clone()))
        }
    };
    let rx = subscribe(&consumer_name(name));
    match buffer::spawn(name, rx, sources, shared, dict) {
        Ok(thread) => Ok(SinkRun { thread, client, cancel }),
        Err(e) => {
            cancel.cancel();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::point::Registry;

    #[test]
    fn sources_select_device_points_and_topics() {
        let r = Registry::default();
        let t = r.intern("boiler-1", "temperature");
        let d = r.intern_at("boiler-1", "avg", "updraft/derived/boiler-1/avg", true);
        let all = Source::parse("*/*").unwrap();
        assert!(all.matches(&t) && !all.matches(&d), "device filters skip derived points");
        assert!(Source::parse("boiler-1/*").unwrap().matches(&t));
        assert!(!Source::parse("boiler-2/*").unwrap().matches(&t));
        let derived = Source::parse("updraft/derived/#").unwrap();
        assert!(derived.matches(&d) && !derived.matches(&t));
        assert!(Source::parse("updraft/+/temperature").unwrap().matches(&t));
        assert!(!Source::parse("updraft/+").unwrap().matches(&t));
        assert!(Source::parse("a/b#").is_err());
        assert!(Source::parse("a*/b").is_err());
        assert!(Source::parse("#/x").is_err());
    }
}
