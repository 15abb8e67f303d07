//! Shared fixtures for the black-box tests: a Modbus TCP server with scriptable faults, a gateway
//! started from TOML text, an MQTT client on the embedded broker, and the Python peers.
//!
//! Every server binds `127.0.0.1:0`; nothing here talks to another machine.

use std::collections::HashMap;
use std::future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response};
use updraft::runtime::Gateway;

pub mod cloud;

/// How the fixture server misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer register reads that touch these holding addresses with this exception.
    pub exception_at: HashMap<u16, ExceptionCode>,
    /// Hold every response this long before answering.
    pub delay: Option<Duration>,
}

#[derive(Debug, Default)]
struct State {
    holding: HashMap<u16, u16>,
    input: HashMap<u16, u16>,
    coils: HashMap<u16, bool>,
    discrete: HashMap<u16, bool>,
    faults: Faults,
    /// Every read request as (function, start, count), for planner assertions.
    reads: Vec<(&'static str, u16, u16)>,
    /// A holding register that counts the reads that include it (1, 2, 3, …).
    counter_at: Option<u16>,
    /// Write requests served.
    writes: usize,
    /// The function of each write request, in order.
    write_fns: Vec<&'static str>,
    /// When each holding-register read arrived, with its start address.
    read_at: Vec<(u16, std::time::Instant)>,
}

/// A Modbus TCP server built on tokio-modbus, independent of the gateway's own simulator.
#[derive(Clone, Default)]
pub struct ModbusFixture {
    state: Arc<Mutex<State>>,
}

impl ModbusFixture {
    pub fn set_holding(&self, address: u16, words: &[u16]) {
        let mut s = self.state.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            s.holding.insert(address + i as u16, *w);
        }
    }
    pub fn set_input(&self, address: u16, words: &[u16]) {
        let mut s = self.state.lock().unwrap();
        for (i, w) in words.iter().enumerate() {
            s.input.insert(address + i as u16, *w);
        }
    }
    pub fn set_coil(&self, address: u16, v: bool) {
        self.state.lock().unwrap().coils.insert(address, v);
    }
    pub fn set_discrete(&self, address: u16, v: bool) {
        self.state.lock().unwrap().discrete.insert(address, v);
    }
    pub fn holding(&self, address: u16) -> Option<u16> {
        self.state.lock().unwrap().holding.get(&address).copied()
    }
    /// Makes holding register `address` a sequence number: every read that includes it first
    /// increments it, so each poll returns a value never served before.
    pub fn count_reads_at(&self, address: u16) {
        self.state.lock().unwrap().counter_at = Some(address);
    }

    pub fn set_faults(&self, f: Faults) {
        self.state.lock().unwrap().faults = f;
    }
    /// When each holding-register read starting at `address` arrived, in order.
    pub fn read_times(&self, address: u16) -> Vec<std::time::Instant> {
        self.state.lock().unwrap().read_at.iter().filter(|(a, _)| *a == address).map(|(_, t)| *t).collect()
    }

    /// The function of each write request answered (`single`, `multiple`, `mask`, `coil`).
    pub fn write_functions(&self) -> Vec<&'static str> {
        self.state.lock().unwrap().write_fns.clone()
    }

    /// How many write requests the server has answered.
    pub fn writes(&self) -> usize {
        self.state.lock().unwrap().writes
    }
    pub fn reads(&self) -> Vec<(&'static str, u16, u16)> {
        self.state.lock().unwrap().reads.clone()
    }

    /// Serves on `127.0.0.1:0` and returns the bound address.
    pub async fn serve(&self) -> SocketAddr {
        self.serve_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on a given loopback address.
    pub async fn serve_at(&self, addr: SocketAddr) -> SocketAddr {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = self.clone();
        tokio::spawn(async move {
            let server = Server::new(listener);
            let new_service = move |_| Ok(Some(svc.clone()));
            let on_connected = |stream, a| {
                let r = accept_tcp_connection(stream, a, &new_service);
                async move { r }
            };
            let _ = server.serve(&on_connected, |_e| {}).await;
        });
        addr
    }
}

type Reply = Result<Response, ExceptionCode>;

impl Service for ModbusFixture {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::pin::Pin<Box<dyn future::Future<Output = Reply> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let mut s = self.state.lock().unwrap();
        let words = |m: &HashMap<u16, u16>, a: u16, n: u16| {
            (a..a + n).map(|i| m.get(&i).copied().unwrap_or(0)).collect::<Vec<_>>()
        };
        let bits = |m: &HashMap<u16, bool>, a: u16, n: u16| {
            (a..a + n).map(|i| m.get(&i).copied().unwrap_or(false)).collect::<Vec<_>>()
        };
        let exception = |s: &State, a: u16, n: u16| (a..a + n).find_map(|i| s.faults.exception_at.get(&i).copied());
        let reply: Reply = match req {
            Request::ReadHoldingRegisters(a, n) => {
                s.reads.push(("holding", a, n));
                s.read_at.push((a, std::time::Instant::now()));
                if let Some(c) = s.counter_at.filter(|c| (a..a.saturating_add(n)).contains(c)) {
                    *s.holding.entry(c).or_default() += 1;
                }
                match exception(&s, a, n) {
                    Some(e) => Err(e),
                    None => Ok(Response::ReadHoldingRegisters(words(&s.holding, a, n))),
                }
            }
            Request::ReadInputRegisters(a, n) => {
                s.reads.push(("input", a, n));
                Ok(Response::ReadInputRegisters(words(&s.input, a, n)))
            }
            Request::ReadCoils(a, n) => {
                s.reads.push(("coil", a, n));
                Ok(Response::ReadCoils(bits(&s.coils, a, n)))
            }
            Request::ReadDiscreteInputs(a, n) => {
                s.reads.push(("discrete", a, n));
                Ok(Response::ReadDiscreteInputs(bits(&s.discrete, a, n)))
            }
            Request::WriteSingleRegister(a, w) => {
                s.write_fns.push("single");
                s.writes += 1;
                s.holding.insert(a, w);
                Ok(Response::WriteSingleRegister(a, w))
            }
            Request::WriteMultipleRegisters(a, ws) => {
                s.write_fns.push("multiple");
                s.writes += 1;
                for (i, w) in ws.iter().enumerate() {
                    s.holding.insert(a + i as u16, *w);
                }
                Ok(Response::WriteMultipleRegisters(a, ws.len() as u16))
            }
            Request::MaskWriteRegister(a, and, or) => {
                s.write_fns.push("mask");
                s.writes += 1;
                let cur = s.holding.get(&a).copied().unwrap_or(0);
                s.holding.insert(a, (cur & and) | (or & !and));
                Ok(Response::MaskWriteRegister(a, and, or))
            }
            Request::WriteSingleCoil(a, b) => {
                s.write_fns.push("coil");
                s.writes += 1;
                s.coils.insert(a, b);
                Ok(Response::WriteSingleCoil(a, b))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        let delay = s.faults.delay;
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            reply
        })
    }
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("updraft-test-{tag}-{}-{}", std::process::id(), fastrand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fastrand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// The `[gateway]`, `[broker]` and `[api]` header every test config starts with: free ports only.
pub fn header(id: &str) -> String {
    format!("[gateway]\nid = \"{id}\"\n\n[broker]\nlisten = \"127.0.0.1:0\"\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n")
}

/// Writes `toml` to a temp folder, loads it like `updraft run` does, and starts the gateway.
pub async fn start_gateway(toml: &str) -> (Gateway, TempDir) {
    let dir = TempDir::new("gw");
    let path = dir.path().join("updraft.toml");
    std::fs::write(&path, toml).unwrap();
    let config = updraft::config::load(&path).unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{toml}"));
    let gw = updraft::runtime::start(config).await.expect("gateway starts");
    (gw, dir)
}

/// An MQTT client connected to `addr`, subscribed to `filter`.
pub struct Subscriber {
    pub client: AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
}

impl Subscriber {
    pub async fn connect(addr: SocketAddr, filter: &str, qos: QoS) -> Self {
        Self::connect_with(mqtt_options(addr), filter, qos).await
    }

    /// Connects with prepared options (credentials, TLS), subscribed to `filter`.
    pub async fn connect_with(opts: MqttOptions, filter: &str, qos: QoS) -> Self {
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        client.subscribe(filter, qos).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec(), p.retain)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Subscriber { client, rx }
    }

    /// The next message (topic, payload, retain), in arrival order.
    pub async fn next(&mut self) -> Option<(String, Vec<u8>, bool)> {
        self.rx.recv().await
    }

    /// Waits up to `within` for a message on `topic` whose JSON payload satisfies `pred`.
    pub async fn wait_for(
        &mut self,
        topic: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.recv()).await.ok()??;
            if msg.0 == topic {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.1) {
                    if pred(&v) {
                        return Some(v);
                    }
                }
            }
        }
    }

    /// Collects the topics of retained messages for `window` (live messages keep flowing, so
    /// there is no quiet moment to wait for).
    pub async fn collect_retained(&mut self, window: Duration) -> std::collections::HashSet<String> {
        let mut out = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some((topic, _, retain))) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if retain {
                out.insert(topic);
            }
        }
        out
    }

    /// Every message (topic, payload) until `quiet` passes with no message, or `max` elapses.
    pub async fn drain(&mut self, quiet: Duration, max: Duration) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + max;
        while let Ok(Some((topic, payload, _))) =
            tokio::time::timeout(quiet.min(deadline - tokio::time::Instant::now()), self.rx.recv()).await
        {
            out.push((topic, payload));
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        out
    }

    /// Collects the latest payload per topic until `quiet` passes with no message, or `max` elapses.
    /// The latest good value of each of `topics`, waiting (at most `within`) until all have one.
    pub async fn latest_good(&mut self, topics: &[&str], within: Duration) -> HashMap<String, serde_json::Value> {
        let mut seen = HashMap::new();
        let start = std::time::Instant::now();
        while topics.iter().any(|t| !seen.contains_key(*t)) {
            let missing: Vec<&&str> = topics.iter().filter(|t| !seen.contains_key(**t)).collect();
            assert!(start.elapsed() < within, "still missing after {within:?}: {missing:?}");
            for (topic, v) in self.collect(Duration::from_millis(200), Duration::from_secs(1)).await {
                if v["quality"] == "good" {
                    seen.insert(topic, v);
                }
            }
        }
        seen
    }

    pub async fn collect(&mut self, quiet: Duration, max: Duration) -> HashMap<String, serde_json::Value> {
        let mut out = HashMap::new();
        let deadline = tokio::time::Instant::now() + max;
        while let Ok(Some((topic, payload, _))) =
            tokio::time::timeout(quiet.min(deadline - tokio::time::Instant::now()), self.rx.recv()).await
        {
            if let Ok(v) = serde_json::from_slice(&payload) {
                out.insert(topic, v);
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        out
    }
}

/// MQTT options for a test client of `addr`, with a fresh client id.
pub fn mqtt_options(addr: SocketAddr) -> MqttOptions {
    let mut opts = MqttOptions::new(format!("test-{}", fastrand_suffix()), addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts
}

/// Tries one MQTT connection and reports how it ended: `Ok` on an accepted CONNACK, `Err` with
/// the reason otherwise (a refused login, a closed socket, a TLS failure).
pub async fn try_connect(opts: MqttOptions) -> Result<(), String> {
    let (_client, mut el) = AsyncClient::new(opts, 10);
    let attempt = async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == rumqttc::ConnectReturnCode::Success => {
                    return Ok(())
                }
                Ok(Event::Incoming(Packet::ConnAck(a))) => return Err(format!("refused: {:?}", a.code)),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.unwrap_or_else(|_| Err("no answer in 10s".into()))
}

/// A plain HTTP/1.1 GET over loopback; returns (status, body). Enough for the local API, and it
/// keeps an HTTP client library out of the test build.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], "").await
}

/// A plain HTTP/1.1 POST with extra header lines (`Name: value`); returns (status, body).
pub async fn http_post(addr: SocketAddr, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    http_request(addr, "POST", path, headers, body).await
}

async fn http_request(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    (status, body)
}

/// The value of one series in a Prometheus text page, by its exact name and labels
/// (`updraft_north_pending_points{sink="cloud"}`).
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The Python interpreter with the peer packages (pymodbus, …). `.ci/run` and `tests/run.sh`
/// create the venv and export `UPDRAFT_PYTHON`; the default is the venv they create.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("UPDRAFT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "the Python peers are not installed: run `bash tests/run.sh` (it creates .venv with pymodbus), or set UPDRAFT_PYTHON"
    );
    venv
}

/// A plugin built by `tests/run.sh` (`cargo build --release` in `plugins/`).
pub fn plugin_wasm(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../plugins/target/wasm32-wasip2/release/{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run `bash tests/run.sh`, or `cargo build --release` in plugins/ (needs `rustup target add wasm32-wasip2`)",
        p.display()
    );
    p
}

/// Path of a file under `tests/`.
pub fn test_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Polls `f` until it returns `Some` or `within` passes.
pub async fn eventually<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A virtual serial line: two pseudo-terminals joined by socat, `gw` for the gateway and `dev`
/// for the slaves. Bytes cross at memory speed whatever the baud rate.
/// A Python test peer (`tests/peers/*.py`) as a child process: started, waited for until it
/// prints `READY`, its output lines kept for the test, killed when dropped.
pub struct PythonPeer {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl PythonPeer {
    pub fn start(script: &str, args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(python())
            .arg(test_file(&format!("peers/{script}")))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                // Kept before READY is signalled, so a caller counting lines after `start`
                // never sees READY arrive later.
                seen.lock().unwrap().push(line.trim().to_owned());
                if line.trim() == "READY" {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("{script} is ready"));
        PythonPeer { child, lines }
    }

    /// Sends one command line to its standard input.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).expect("the peer reads its stdin");
    }

    /// Every line it printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until it has printed `line`.
    pub async fn printed(&self, line: &str, within: Duration) -> bool {
        eventually(within, || self.lines.lock().unwrap().iter().any(|l| l == line).then_some(())).await.is_some()
    }
}

impl Drop for PythonPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct SerialPair {
    child: std::process::Child,
    pub gw: String,
    pub dev: String,
}

impl SerialPair {
    pub fn new(dir: &std::path::Path) -> Self {
        let (gw, dev) = (dir.join("gw"), dir.join("dev"));
        let child = std::process::Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", gw.display()))
            .arg(format!("pty,raw,echo=0,link={}", dev.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("socat starts (apt-get install socat; tests/run.sh does)");
        for _ in 0..100 {
            if gw.exists() && dev.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gw.exists() && dev.exists(), "socat made the pty pair");
        SerialPair { child, gw: gw.display().to_string(), dev: dev.display().to_string() }
    }
}

impl Drop for SerialPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls the API's `/ready` until it answers `want` (200 or 503), then returns its JSON report.
pub async fn wait_ready(api: SocketAddr, want: u16, within: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (code, body) = http_get(api, "/ready").await;
        if code == want {
            return serde_json::from_str(&body).unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "/ready never answered {want}: {code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
