//! OPC-UA benchmark: one server (the built-in simulator, in its own process) with N variables
//! changing every second, read by a real `updraft run` through subscriptions, then through
//! `mode = "poll"`. Prints value changes/s, gateway CPU per million changes and peak RSS.
//! Run it with `bash tests/bench/opcua.sh` (builds release binaries first).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;
use common::{cpu_seconds, free_ports, metrics, status_kb, updraft, wait_port};

fn main() {
    let mut items = 10_000usize;
    let mut seconds = 30u64;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--items" => items = v().parse().unwrap(),
            "--seconds" => seconds = v().parse().unwrap(),
            other => panic!("unknown argument {other}; see tests/bench/opcua.sh"),
        }
    }
    for mode in ["subscribe", "poll"] {
        run(items, seconds, mode);
    }
}

fn run(items: usize, seconds: u64, mode: &str) {
    let dir = std::env::temp_dir().join(format!("updraft-opcua-bench-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports = free_ports(3);
    let (opc, broker, api) = (ports[0], ports[1], ports[2]);
    let mut sim = format!(
        "[gateway]\nid = \"bench-opc-sim\"\n\n[simulators.plant]\nkind = \"opcua\"\nlisten = \"127.0.0.1:{opc}\"\nupdate = \"1s\"\nvariables = [\n"
    );
    let mut gw = format!(
        "[gateway]\nid = \"bench-opc\"\ndata_dir = \"data\"\n\n[broker]\nlisten = \"127.0.0.1:{broker}\"\n\n[api]\nlisten = \"127.0.0.1:{api}\"\n\n\
         [devices.plant]\ndriver = \"opcua\"\nendpoint = \"opc.tcp://127.0.0.1:{opc}/\"\nmode = \"{mode}\"\npoll = \"1s\"\npublishing_interval = \"1s\"\ntimeout = \"10s\"\ntags = [\n"
    );
    for i in 0..items {
        // A ramp one step per update: every variable changes every second.
        sim += &format!("  {{ name = \"v{i}\", type = \"f64\", wave = \"ramp\", min = 0, max = 1000000, period = \"1000000s\" }},\n");
        gw += &format!("  {{ name = \"v{i}\", node = \"ns=2;s=v{i}\" }},\n");
    }
    sim += "]\n";
    gw += "]\n";
    std::fs::write(dir.join("sim.toml"), sim).unwrap();
    std::fs::write(dir.join("gw.toml"), gw).unwrap();
    let _sim = updraft("simulate", &dir.join("sim.toml"));
    wait_port(SocketAddr::from(([127, 0, 0, 1], opc)));
    let gateway = updraft("run", &dir.join("gw.toml"));
    let pid = gateway.0.id();
    let api = SocketAddr::from(([127, 0, 0, 1], api));
    wait_port(api);
    // Until every item reports (the first publish carries every initial value).
    let t = Instant::now();
    while metrics(api).get("updraft_points_good_total").copied().unwrap_or(0.0) < items as f64 {
        assert!(t.elapsed() < Duration::from_secs(120), "items never all reported");
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready = t.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let (m0, c0, t0) = (metrics(api), cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (m1, c1, t1) = (metrics(api), cpu_seconds(pid), Instant::now());
    let secs = (t1 - t0).as_secs_f64();
    let diff = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
    let good = diff("updraft_points_good_total");
    let bad = diff("updraft_points_bad_total");
    println!("updraft OPC-UA benchmark: {items} items changing every second, mode = \"{mode}\", {secs:.0} s measured");
    println!("  all items reporting after {:>8.1} s", ready.as_secs_f64());
    println!("  value changes          {:>10.0} /s  ({bad:.0} bad)", good / secs);
    println!(
        "  gateway CPU            {:>10.2} s per million changes  ({:.1} % of one core)",
        (c1 - c0) / (good / 1e6),
        100.0 * (c1 - c0) / secs
    );
    println!(
        "  gateway RSS            {:>10.1} MB now, {:.1} MB peak",
        status_kb(pid, "VmRSS:") as f64 / 1024.0,
        status_kb(pid, "VmHWM:") as f64 / 1024.0
    );
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}
