//! Helpers the benchmark binaries share: child processes, free ports, CPU and memory of a process
//! from /proc, and the gateway's /metrics. Each binary uses some of them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped, so a panicking benchmark leaves nothing running.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `n` distinct ports free on 127.0.0.1 at the time of the call.
pub fn free_ports(n: usize) -> Vec<u16> {
    // Hold all listeners until every port is chosen so none repeats.
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // Linux reports in USER_HZ, 100 on every mainstream build.
    ticks / 100.0
}

/// A `kB` field of /proc/PID/status (`VmRSS:`, `VmHWM:`).
pub fn status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The gateway's /metrics, summed per metric name over its labels.
pub fn metrics(api: SocketAddr) -> HashMap<String, f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let mut out: HashMap<String, f64> = HashMap::new();
    for line in body.lines().filter(|l| l.starts_with("updraft_")) {
        let (name_labels, value) = line.rsplit_once(' ').unwrap();
        let name = name_labels.split('{').next().unwrap().to_owned();
        *out.entry(name).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// Waits until something accepts connections on `addr`.
pub fn wait_port(addr: SocketAddr) {
    let t = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "{addr} never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `updraft` binary under test: `$UPDRAFT_BIN`, or this workspace's release build.
pub fn updraft_bin() -> PathBuf {
    let bin = std::env::var("UPDRAFT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/updraft"));
    assert!(bin.exists(), "{} is missing: run `cargo build --release -p updraft-gateway`", bin.display());
    bin
}

/// Starts `updraft SUBCOMMAND --log-level warn -c CONFIG`. The gateway's warnings go to our
/// stderr; a simulator's are dropped (it warns of every connection the benchmark's end cuts).
pub fn updraft(subcommand: &str, config: &Path) -> Proc {
    let child = Command::new(updraft_bin())
        .args([subcommand, "--log-level", "warn", "-c"])
        .arg(config)
        .stderr(if subcommand == "simulate" { Stdio::null() } else { Stdio::inherit() })
        .spawn()
        .unwrap();
    Proc(child)
}
