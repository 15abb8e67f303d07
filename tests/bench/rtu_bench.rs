//! Modbus RTU line benchmark: a real `updraft run` polls the built-in simulator over a serial line
//! that keeps time, and prints reads/s and points/s against the line's physical capacity.
//!
//! A pty pair moves bytes at memory speed whatever baud rate is set on it, so the line here is two
//! socat pty pairs joined by a relay (in this process) that hands each byte on when it would have
//! finished arriving at the configured baud rate: gateway ⇄ pty pair ⇄ relay ⇄ pty pair ⇄ simulator.
//! The relay also reports how far behind each byte's due time it actually delivered it, which is
//! how closely the benchmark's line keeps to a real one.
//! Run it with `bash tests/bench/rtu.sh` (builds release binaries first).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;
use common::{cpu_seconds, free_ports, metrics, updraft, wait_port};

struct Args {
    baud: u32,
    registers: usize,
    seconds: u64,
    warmup: u64,
}

fn parse_args() -> Args {
    let mut a = Args { baud: 115_200, registers: 125, seconds: 20, warmup: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--baud" => a.baud = v().parse().unwrap(),
            "--registers" => a.registers = v().parse().unwrap(),
            "--seconds" => a.seconds = v().parse().unwrap(),
            "--warmup" => a.warmup = v().parse().unwrap(),
            other => panic!("unknown argument {other}; see tests/bench/rtu.sh"),
        }
    }
    assert!((1..=125).contains(&a.registers), "--registers must be 1..125 (one read)");
    a
}

/// What one direction of the relay measured.
#[derive(Default)]
struct Relayed {
    bytes: AtomicU64,
    /// Lateness of every delivery (now − the due time of the first byte it carried), in µs.
    late_us: Mutex<Vec<u32>>,
}

/// One direction of the line: bytes read from `from` are stamped with the time their last bit
/// would arrive (the wire is busy until the previous byte is through), then written to `to` when
/// that time comes.
fn relay(mut from: File, mut to: File, char_time: Duration, out: Arc<Relayed>) {
    let (tx, rx) = mpsc::channel::<(Instant, u8)>();
    std::thread::spawn(move || {
        let mut busy_until = Instant::now();
        let mut buf = [0u8; 512];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                return;
            }
            let start = busy_until.max(Instant::now());
            for (i, b) in buf[..n].iter().enumerate() {
                if tx.send((start + char_time * (i as u32 + 1), *b)).is_err() {
                    return;
                }
            }
            busy_until = start + char_time * n as u32;
        }
    });
    std::thread::spawn(move || {
        let mut pending: std::collections::VecDeque<(Instant, u8)> = Default::default();
        let mut batch = Vec::with_capacity(512);
        loop {
            if pending.is_empty() {
                match rx.recv() {
                    Ok(x) => pending.push_back(x),
                    Err(_) => return,
                }
            }
            pending.extend(rx.try_iter());
            let due = pending[0].0;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
                continue;
            }
            let now = Instant::now();
            batch.clear();
            while pending.front().is_some_and(|(t, _)| *t <= now) {
                batch.push(pending.pop_front().unwrap().1);
            }
            if to.write_all(&batch).is_err() {
                return;
            }
            out.bytes.fetch_add(batch.len() as u64, Ordering::Relaxed);
            out.late_us.lock().unwrap().push((now - due).as_micros() as u32);
        }
    });
}

fn open(path: &str) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let a = parse_args();
    let dir = std::env::temp_dir().join(format!("updraft-rtu-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("gw-side")).unwrap();
    std::fs::create_dir_all(dir.join("dev-side")).unwrap();

    // gateway ⇄ (gw-side pair) ⇄ relay ⇄ (dev-side pair) ⇄ simulator
    let gw_pair = updraft_tests::SerialPair::new(&dir.join("gw-side"));
    let dev_pair = updraft_tests::SerialPair::new(&dir.join("dev-side"));
    // 8N1: ten bits a character.
    let char_time = Duration::from_secs_f64(10.0 / a.baud as f64);
    let (to_dev, to_gw) = (Arc::new(Relayed::default()), Arc::new(Relayed::default()));
    let (gw_end, dev_end) = (open(&gw_pair.dev), open(&dev_pair.gw));
    relay(gw_end.try_clone().unwrap(), dev_end.try_clone().unwrap(), char_time, to_dev.clone());
    relay(dev_end, gw_end, char_time, to_gw.clone());

    let ports = free_ports(2);
    let (broker_port, api_port) = (ports[0], ports[1]);
    let mut sim = format!(
        "[gateway]\nid = \"bench-sim\"\n\n[simulators.line]\nkind = \"modbus-rtu\"\nport = \"{}\"\nbaud = {}\nunit_id = 1\nupdate = \"100ms\"\nregisters = [\n",
        dev_pair.dev, a.baud
    );
    let mut gw = format!(
        "[gateway]\nid = \"bench-rtu\"\ndata_dir = \"data\"\n\n[broker]\nlisten = \"127.0.0.1:{broker_port}\"\n\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n\n\
         [devices.plc]\ndriver = \"modbus-rtu\"\nport = \"{}\"\nbaud = {}\nunit_id = 1\n\
         # As fast as the line allows: each poll starts at the next millisecond after the last.\npoll = \"1ms\"\ntimeout = \"500ms\"\ntags = [\n",
        gw_pair.gw, a.baud
    );
    for r in 0..a.registers {
        sim += &format!("  {{ area = \"holding\", address = {r}, type = \"u16\", wave = \"ramp\", min = 0, max = 1000, period = \"10s\" }},\n");
        gw += &format!("  {{ name = \"r{r}\", area = \"holding\", address = {r}, type = \"u16\" }},\n");
    }
    sim += "]\n";
    gw += "]\n";
    std::fs::write(dir.join("sim.toml"), sim).unwrap();
    std::fs::write(dir.join("gw.toml"), gw).unwrap();

    let _sim = updraft("simulate", &dir.join("sim.toml"));
    let gateway = updraft("run", &dir.join("gw.toml"));
    let pid = gateway.0.id();
    let api = SocketAddr::from(([127, 0, 0, 1], api_port));
    wait_port(api);

    std::thread::sleep(Duration::from_secs(a.warmup));
    to_dev.late_us.lock().unwrap().clear();
    to_gw.late_us.lock().unwrap().clear();
    let bytes = || to_dev.bytes.load(Ordering::Relaxed) + to_gw.bytes.load(Ordering::Relaxed);
    let (m0, c0, b0, t0) = (metrics(api), cpu_seconds(pid), bytes(), Instant::now());
    std::thread::sleep(Duration::from_secs(a.seconds));
    let (m1, c1, b1, t1) = (metrics(api), cpu_seconds(pid), bytes(), Instant::now());
    let secs = (t1 - t0).as_secs_f64();
    let diff = |k: &str| m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0);
    let polls = diff("updraft_polls_total");
    let good = diff("updraft_points_good_total");
    let bad = diff("updraft_points_bad_total");

    // The line's capacity for this read: 8 request bytes, 5 + 2n response bytes, and the silent
    // interval after each frame (3.5 characters, fixed at 1.75 ms above 19200 baud).
    let gap = if a.baud > 19_200 { 1.75e-3 } else { 3.5 * char_time.as_secs_f64() };
    let per_read = (8.0 + 5.0 + 2.0 * a.registers as f64) * char_time.as_secs_f64() + 2.0 * gap;
    let capacity = 1.0 / per_read;
    let mut late: Vec<u32> = to_dev.late_us.lock().unwrap().clone();
    late.extend(to_gw.late_us.lock().unwrap().iter());
    late.sort_unstable();

    println!(
        "updraft Modbus RTU line benchmark: {} baud 8N1, one slave, reads of {} holding registers, {:.0} s measured after {} s warm-up",
        a.baud, a.registers, secs, a.warmup
    );
    println!(
        "  line capacity          {:>10.1} reads/s  ({:.2} ms a read: {} characters + two {:.2} ms gaps)",
        capacity,
        per_read * 1e3,
        13 + 2 * a.registers,
        gap * 1e3
    );
    println!(
        "  reads                  {:>10.1} /s       ({:.1} % of capacity)",
        polls / secs,
        100.0 * polls / secs / capacity
    );
    println!("  points                 {:>10.0} /s       ({bad:.0} bad)", good / secs);
    println!(
        "  line busy              {:>10.1} %        of the time (bytes × {:.1} µs)",
        100.0 * (b1 - b0) as f64 * char_time.as_secs_f64() / secs,
        char_time.as_secs_f64() * 1e6
    );
    println!(
        "  relay lateness         {:>10} µs p50, {} µs p99, {} µs max after each byte's due time ({} deliveries)",
        percentile(&late, 0.5),
        percentile(&late, 0.99),
        late.last().copied().unwrap_or(0),
        late.len()
    );
    println!("  gateway CPU            {:>10.1} % of one core", 100.0 * (c1 - c0) / secs);
    drop(gateway);
    drop(gw_pair);
    drop(dev_pair);
    let _ = std::fs::remove_dir_all(&dir);
}
