//! Polling benchmark: N simulated Modbus devices × M tags, polled by a real `updraft run` process,
//! every reading published to the embedded broker and counted by a real MQTT subscriber.
//!
//! Prints points/s (polled and delivered to the subscriber), CPU seconds per million points of the
//! gateway process, its peak RSS, and the share of polls that started on schedule.
//! Run it with `bash tests/bench/poll.sh` (builds release binaries first).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[path = "common.rs"]
mod common;
use common::{cpu_seconds, free_ports, metrics, status_kb, updraft, wait_port};

struct Args {
    devices: usize,
    tags: usize,
    poll: String,
    seconds: u64,
    warmup: u64,
    subscribe: bool,
    cloud: bool,
}

fn parse_args() -> Args {
    let mut a =
        Args { devices: 100, tags: 100, poll: "1s".into(), seconds: 30, warmup: 5, subscribe: true, cloud: false };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--devices" => a.devices = v().parse().unwrap(),
            "--tags" => a.tags = v().parse().unwrap(),
            "--poll" => a.poll = v(),
            "--seconds" => a.seconds = v().parse().unwrap(),
            "--warmup" => a.warmup = v().parse().unwrap(),
            "--no-subscriber" => a.subscribe = false,
            "--cloud" => a.cloud = true,
            other => panic!("unknown argument {other}; see tests/bench/poll.sh"),
        }
    }
    a
}

/// Appends, for each point in a local (one point) or cloud (`points` array) message, how long ago
/// the gateway read it, in milliseconds. The clock is read first and the payload only scanned for
/// its `"ts":` fields: a full JSON parse per message made the subscriber itself the bottleneck of a
/// 10,000-message burst and added its own queueing to the figure.
fn latencies(payload: &[u8], out: &mut Vec<i64>) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    const KEY: &[u8] = b"\"ts\":";
    let mut rest = payload;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if let Some(ts) = std::str::from_utf8(&rest[..digits]).ok().and_then(|d| d.parse::<i64>().ok()) {
            out.push(now - ts);
        }
        rest = &rest[digits..];
    }
}

/// Connects a new subscriber to `updraft/#` and counts the distinct retained topics it receives.
async fn late_subscriber_retained(port: u16, qos: QoS) -> usize {
    let mut opts = MqttOptions::new(format!("bench-late-{}", qos as u8), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = AsyncClient::new(opts, 1024);
    client.subscribe("updraft/#", qos).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(r) = tokio::time::timeout_at(deadline, ev.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = r {
            if p.retain {
                seen.insert(p.topic);
            }
        }
    }
    seen.len()
}

fn main() {
    let a = parse_args();
    let dir = std::env::temp_dir().join(format!("updraft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    // With --cloud, every point also goes through a northbound sink (disk buffer on) to mosquitto.
    let cloud = a.cloud.then(|| rt.block_on(updraft_tests::cloud::Mosquitto::start()));
    let ports = free_ports(a.devices + 2);
    let (broker_port, api_port) = (ports[a.devices], ports[a.devices + 1]);
    let mut sim = String::from("[gateway]\nid = \"bench-sim\"\n\n");
    let mut gw = format!(
        "[gateway]\nid = \"bench-gw\"\ndata_dir = \"data\"\n\n[broker]\nlisten = \"127.0.0.1:{broker_port}\"\n\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n\n"
    );
    for (d, port) in ports.iter().take(a.devices).enumerate() {
        sim += &format!("[simulators.sim-{d}]\nkind = \"modbus-tcp\"\nlisten = \"127.0.0.1:{port}\"\nupdate = \"1s\"\nregisters = [\n");
        gw += &format!("[devices.dev-{d}]\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:{port}\"\npoll = \"{}\"\ntimeout = \"1s\"\ntags = [\n", a.poll);
        for t in 0..a.tags {
            // A mix of types as a real device has: every fourth tag a float over two registers.
            let (ty, addr) = if t % 4 == 0 { ("f32", t * 2) } else { ("u16", t * 2) };
            sim += &format!("  {{ area = \"holding\", address = {addr}, type = \"{ty}\", wave = \"sine\", min = 0, max = 1000, period = \"60s\" }},\n");
            gw += &format!(
                "  {{ name = \"t{t}\", area = \"holding\", address = {addr}, type = \"{ty}\", scale = 0.1 }},\n"
            );
        }
        sim += "]\n\n";
        gw += "]\n\n";
    }
    if let Some(c) = &cloud {
        gw += &format!(
            "[north.cloud]\ntype = \"mqtt\"\nurl = \"mqtt://{}\"\ntopic = \"bench/{{gateway}}/{{device}}\"\n\n",
            c.addr
        );
    }
    std::fs::write(dir.join("sim.toml"), sim).unwrap();
    std::fs::write(dir.join("gw.toml"), gw).unwrap();

    let _sim = updraft("simulate", &dir.join("sim.toml"));
    wait_port(SocketAddr::from(([127, 0, 0, 1], ports[a.devices - 1])));
    let gateway = updraft("run", &dir.join("gw.toml"));
    let pid = gateway.0.id();
    let api = SocketAddr::from(([127, 0, 0, 1], api_port));
    wait_port(api);

    let delivered = Arc::new(AtomicU64::new(0));
    // Gateway `ts` (the read) → arrival, in ms, for points arriving during the window.
    let measuring = Arc::new(AtomicBool::new(false));
    let local_lat = Arc::new(Mutex::new(Vec::new()));
    let cloud_lat = Arc::new(Mutex::new(Vec::new()));
    if a.subscribe {
        let delivered = delivered.clone();
        let (measuring, lat) = (measuring.clone(), local_lat.clone());
        rt.spawn(async move {
            let mut opts = MqttOptions::new("bench-subscriber", "127.0.0.1", broker_port);
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut ev) = AsyncClient::new(opts, 1024);
            client.subscribe("updraft/#", QoS::AtMostOnce).await.unwrap();
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        delivered.fetch_add(1, Ordering::Relaxed);
                        if measuring.load(Ordering::Relaxed) {
                            latencies(&p.payload, &mut lat.lock().unwrap());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    if let Some(c) = &cloud {
        let (measuring, lat, addr) = (measuring.clone(), cloud_lat.clone(), c.addr);
        rt.spawn(async move {
            let mut opts = MqttOptions::new("bench-cloud-subscriber", addr.ip().to_string(), addr.port());
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_max_packet_size(8 << 20, 8 << 20);
            let (client, mut ev) = AsyncClient::new(opts, 1024);
            client.subscribe("bench/#", QoS::AtMostOnce).await.unwrap();
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) if measuring.load(Ordering::Relaxed) => {
                        latencies(&p.payload, &mut lat.lock().unwrap());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }

    std::thread::sleep(Duration::from_secs(a.warmup));
    measuring.store(true, Ordering::Relaxed);
    let (m0, c0, d0, t0) = (metrics(api), cpu_seconds(pid), delivered.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs(a.seconds));
    let (m1, c1, d1, t1) = (metrics(api), cpu_seconds(pid), delivered.load(Ordering::Relaxed), Instant::now());
    measuring.store(false, Ordering::Relaxed);
    let secs = (t1 - t0).as_secs_f64();
    let diff = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
    let points = diff("updraft_points_good_total") + diff("updraft_points_bad_total");
    let bad = diff("updraft_points_bad_total");
    let polls = diff("updraft_polls_total");
    let late = diff("updraft_polls_late_total");
    let skipped = diff("updraft_polls_skipped_total");
    let cpu = c1 - c0;
    let scheduled = polls + skipped;
    println!(
        "updraft poll benchmark: {} devices × {} tags, poll {}, {:.0} s measured after {} s warm-up",
        a.devices, a.tags, a.poll, secs, a.warmup
    );
    println!("  points polled          {:>12.0} /s  ({bad:.0} bad)", points / secs);
    println!(
        "  points into the broker {:>12.0} /s  ({:.0} batches dropped at its queue)",
        diff("updraft_broker_published_total") / secs,
        diff("updraft_dropped_batches_total")
    );
    if a.subscribe {
        println!("  points delivered (MQTT){:>12.0} /s  to one subscriber of updraft/#", (d1 - d0) as f64 / secs);
    }
    if a.cloud {
        println!(
            "  points to the cloud    {:>12.0} /s  acknowledged by mosquitto; {:.0} pending at the end",
            diff("updraft_north_delivered_points_total") / secs,
            m1.get("updraft_north_pending_points").copied().unwrap_or(0.0)
        );
    }
    for (what, lat) in [("local MQTT", &local_lat), ("cloud", &cloud_lat)] {
        let mut v = lat.lock().unwrap().clone();
        if v.is_empty() {
            continue;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
        println!(
            "  read → {what:<10}     {:>12} ms p50, {} ms p99, {} ms max  ({} points)",
            at(0.5),
            at(0.99),
            v[v.len() - 1],
            v.len()
        );
    }
    println!(
        "  gateway CPU            {:>12.3} s per million points  ({:.1} % of one core)",
        cpu / (points / 1e6),
        100.0 * cpu / secs
    );
    println!(
        "  gateway RSS            {:>12.1} MB now, {:.1} MB peak",
        status_kb(pid, "VmRSS:") as f64 / 1024.0,
        status_kb(pid, "VmHWM:") as f64 / 1024.0
    );
    println!(
        "  polls on schedule      {:>12.2} %  ({polls:.0} run, {late:.0} late > period/10, {skipped:.0} skipped)",
        if scheduled > 0.0 { 100.0 * (polls - late) / scheduled } else { 0.0 }
    );
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let n = rt.block_on(late_subscriber_retained(broker_port, qos));
        println!("  late subscriber {qos:?}: {n} of {} retained values within 5 s", a.devices * a.tags);
    }
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}
