//! Store-and-forward benchmark: synthetic device batches → the hub → an MQTT sink with its disk
//! buffer on → a real mosquitto on loopback (through the test proxy, to stage an outage).
//!
//! Prints, for the sink alone (no Modbus, no embedded broker, in one process):
//! 1. sustained points/s at offered rates: accepted into the buffer and acknowledged by the broker
//!    (PUBACK), with the backlog left at the end (a rate is sustained if the backlog stays small);
//! 2. disk bytes per point in the buffer, measured on an outage's backlog;
//! 3. the drain: after the outage, how fast the backlog empties while live data keeps flowing, as
//!    a multiple of the live rate.
//!
//! Run it with `bash tests/bench/north.sh` (builds release binaries first).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use updraft::base::point::{now_ms, Point, TagKey, Value};
use updraft::hub::{batch, Hub};
use updraft::metrics::Metrics;
use updraft::sinks::SinkStats;
use updraft_tests::cloud::{Link, Mosquitto, Proxy};

struct Args {
    devices: usize,
    tags: usize,
    seconds: u64,
    rates: Vec<u64>,
    live: u64,
    outage: u64,
}

fn parse_args() -> Args {
    let mut a = Args { devices: 1000, tags: 100, seconds: 15, rates: vec![200_000, 300_000], live: 50_000, outage: 20 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--devices" => a.devices = v().parse().unwrap(),
            "--tags" => a.tags = v().parse().unwrap(),
            "--seconds" => a.seconds = v().parse().unwrap(),
            "--rates" => a.rates = v().split(',').map(|r| r.parse().unwrap()).collect(),
            "--live" => a.live = v().parse().unwrap(),
            "--outage" => a.outage = v().parse().unwrap(),
            other => panic!("unknown argument {other}; see tests/bench/north.sh"),
        }
    }
    a
}

/// A value like a scaled register reading: mostly one-decimal floats, some counters and flags.
fn value(tag: usize, tick: u64) -> Value {
    match tag % 10 {
        0 => Value::Bool(tick % 7 < 3),
        1 => Value::Int((tick * 13) as i64 % 5000),
        _ => Value::Float(((200 + (tag * 37) % 500) as f64 * 10.0 + (tick % 50) as f64).round() / 10.0),
    }
}

/// Offers `rate` points/s for `seconds`, one device batch of `tags` points at a time, paced every
/// 10 ms. Returns points offered.
async fn offer(
    tx: &updraft::hub::BusSender,
    keys: &[Vec<Arc<TagKey>>],
    rate: u64,
    seconds: f64,
    tick0: &mut u64,
) -> u64 {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut dev = 0usize;
    let mut interval = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed().as_secs_f64() < seconds {
        interval.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let ts = now_ms();
            let tags = &keys[dev % keys.len()];
            let points: Vec<Point> =
                tags.iter().enumerate().map(|(i, k)| Point::good(k.clone(), value(i, *tick0), ts)).collect();
            sent += points.len() as u64;
            dev += 1;
            *tick0 += 1;
            if tx.send(batch(points)).await.is_err() {
                return sent;
            }
        }
    }
    sent
}

async fn settle(stats: &SinkStats, within: Duration) -> Duration {
    let start = Instant::now();
    while stats.pending_points.get() > 0 && start.elapsed() < within {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn main() {
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let cloud = Mosquitto::start().await;
    let proxy = Proxy::start(cloud.addr).await;
    let dir = updraft_tests::TempDir::new("north-bench");
    let toml = format!(
        r#"[gateway]
id = "bench"
data_dir = "{}"
[broker]
enabled = false
[api]
enabled = false
[north.cloud]
type = "mqtt"
url = "mqtt://{}"
topic = "bench/{{gateway}}/{{device}}"
batch = {{ max_points = 500, max_wait = "200ms" }}
max_inflight = 64
"#,
        dir.path().join("data").display(),
        proxy.addr
    );
    let config = updraft::config::parse(&toml, std::path::Path::new("bench.toml")).unwrap();
    let metrics = Arc::new(Metrics::default());
    let mut hub = Hub::new(metrics.clone());
    let cancel = CancellationToken::new();
    let commands = Default::default();
    let sink = updraft::sinks::start_one(
        &config,
        "cloud",
        |consumer| hub.subscribe(consumer, updraft::hub::Stage::Terminal),
        &metrics,
        &commands,
        cancel.child_token(),
    )
    .unwrap();
    let registry = hub.registry();
    let keys: Vec<Vec<Arc<TagKey>>> = (0..a.devices)
        .map(|d| (0..a.tags).map(|t| registry.intern(&format!("dev-{d:04}"), &format!("tag-{t:03}"))).collect())
        .collect();
    let tx = hub.sender();
    let hub_task = tokio::spawn(hub.run());
    let stats = metrics.sink("cloud");
    let dropped = metrics.dropped("north:cloud").1;
    let mut tick = 0u64;
    while stats.connected.get() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "sink benchmark: {} devices x {} tags, batches of {} points, mosquitto on loopback, disk buffer on",
        a.devices, a.tags, a.tags
    );

    // 1. Sustained rates.
    for &rate in &a.rates {
        let (acc0, del0, drop0) = (stats.accepted.get(), stats.delivered.get(), dropped.get());
        let start = Instant::now();
        let offered = offer(&tx, &keys, rate, a.seconds as f64, &mut tick).await;
        let secs = start.elapsed().as_secs_f64();
        let delivered = stats.delivered.get() - del0;
        let backlog = stats.pending_points.get();
        println!(
            "offered {:>7} pts/s for {:.0}s: accepted {:>7.0} pts/s, acknowledged {:>7.0} pts/s, backlog at end {} points ({:.2} s), dropped at the hub {}",
            rate,
            secs,
            (stats.accepted.get() - acc0) as f64 / secs,
            delivered as f64 / secs,
            backlog,
            backlog as f64 / rate as f64,
            dropped.get() - drop0
        );
        let _ = offered;
        settle(&stats, Duration::from_secs(60)).await;
    }

    // 2 + 3. An outage at the live rate, then the drain while live data keeps flowing.
    let bytes0 = stats.buffer_bytes.get();
    let acc0 = stats.accepted.get();
    proxy.set(Link::Down);
    offer(&tx, &keys, a.live, a.outage as f64, &mut tick).await;
    let backlog = stats.pending_points.get() as u64;
    let backlog_bytes = (stats.buffer_bytes.get() - bytes0).max(0) as u64;
    let buffered = stats.accepted.get() - acc0;
    println!(
        "outage of {}s at {} pts/s: {} points buffered in {} bytes on disk = {:.2} bytes/point",
        a.outage,
        a.live,
        backlog,
        backlog_bytes,
        backlog_bytes as f64 / buffered.max(1) as f64
    );
    proxy.set(Link::Up);
    let live = tokio::spawn({
        let (tx, keys) = (tx.clone(), keys.clone());
        async move {
            let mut t = 1u64 << 40;
            loop {
                if offer(&tx, &keys, a.live, 1.0, &mut t).await == 0 {
                    break;
                }
            }
        }
    });
    // The reconnect waits out the backoff the outage built up; the drain is timed from the
    // connection on.
    let up = Instant::now();
    while stats.connected.get() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reconnect = up.elapsed();
    let backlog = stats.pending_points.get() as u64;
    let del0 = stats.delivered.get();
    let start = Instant::now();
    // Drained when what is left is no more than a second of live data in flight.
    while stats.pending_points.get() as u64 > a.live && start.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let sent = stats.delivered.get() - del0;
    live.abort();
    println!(
        "drain: reconnected {:.1}s after the link returned; backlog of {} points gone in {:.1}s with live data at {} pts/s: {:.0} pts/s acknowledged = {:.1}x the live rate",
        reconnect.as_secs_f64(),
        backlog,
        secs,
        a.live,
        sent as f64 / secs,
        sent as f64 / secs / a.live as f64
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("VmHWM: ?");
    println!(
        "peak RSS of the whole benchmark process (generator, hub, sink): {}",
        hwm.trim_start_matches("VmHWM:").trim()
    );
    drop(tx);
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), hub_task).await;
    let _ = sink.thread.join();
}
