//! Stand-ins for the cloud: a real mosquitto broker on a free loopback port, a TCP proxy that can
//! cut the uplink or swallow the broker's replies (PUBACKs), the `updraft` binary as a separate
//! process (for `kill -9`), and a subscriber that keeps every message it sees.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A free loopback port (bound and released; good enough for a server started right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// mosquitto (Debian's package), on a free loopback port, killed on drop. Sessions and queued
/// messages persist across `stop`/`restart` (saved on SIGTERM), like a real cloud broker's.
pub struct Mosquitto {
    pub addr: SocketAddr,
    child: Option<Child>,
    conf: PathBuf,
    _dir: crate::TempDir,
}

impl Mosquitto {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts mosquitto with extra lines for its listener (TLS settings, say).
    pub async fn start_with(listener_extra: &str) -> Self {
        let dir = crate::TempDir::new("mosquitto");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            // `user root`: as root, mosquitto would otherwise switch to its own user and could no
            // longer read the test's key files.
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 max_queued_messages 1000000\n{listener_extra}\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Self::spawn(&conf, addr).await;
        Mosquitto { addr, child: Some(child), conf, _dir: dir }
    }

    async fn spawn(conf: &Path, addr: SocketAddr) -> Child {
        // Debian puts it in /usr/sbin, which is not on every PATH.
        let bin = if Path::new("/usr/sbin/mosquitto").exists() { "/usr/sbin/mosquitto" } else { "mosquitto" };
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is not installed: run `bash tests/run.sh` (it installs Debian's mosquitto)");
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_ok() {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("mosquitto did not start on {addr}");
    }
}

impl Mosquitto {
    /// Stops the broker cleanly (SIGTERM: it saves its sessions), as in a cloud outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the saved sessions.
    pub async fn restart(&mut self) {
        self.stop();
        self.child = Some(Self::spawn(&self.conf, self.addr).await);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Link {
    /// Forwards both ways.
    Up = 0,
    /// Closes every connection and refuses new ones: the uplink or the broker is down.
    Down = 1,
    /// Forwards the gateway's bytes to the broker but drops everything coming back (CONNACK,
    /// PUBACK, PINGRESP): the broker has the messages, the gateway never hears so.
    DropReplies = 2,
}

/// A TCP proxy between the gateway and the cloud broker.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    cut: watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Link::Up as u8));
        let (cut, _) = watch::channel(0u64);
        let (m, c) = (mode.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if m.load(Ordering::SeqCst) == Link::Down as u8 {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, c.subscribe(), None));
                tokio::spawn(pump(sr, cw, c.subscribe(), Some(m.clone())));
            }
        });
        Proxy { addr, mode, cut }
    }

    pub fn set(&self, link: Link) {
        self.mode.store(link as u8, Ordering::SeqCst);
        if link == Link::Down {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

/// Copies one direction of a proxied connection until either side closes or the link is cut;
/// with `replies`, drops what it reads while the mode is `DropReplies`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<u64>,
    replies: Option<Arc<AtomicU8>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if replies.as_ref().is_some_and(|m| m.load(Ordering::SeqCst) == Link::DropReplies as u8) {
                        continue;
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
            _ = cut.changed() => break,
        }
    }
}

/// An MQTT client on the cloud broker that keeps every message, in arrival order.
pub struct CloudClient {
    pub client: AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>,
}

impl CloudClient {
    /// A subscriber with a persistent session (QoS 1, clean session off): messages published while
    /// it is disconnected, e.g. across a broker restart, are kept for it by the broker.
    pub async fn connect(addr: SocketAddr, filter: &str) -> Self {
        let mut opts = MqttOptions::new(format!("cloud-{}", free_port()), addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(false);
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut el) = AsyncClient::new(opts, 1024);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
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
        tokio::time::timeout(Duration::from_secs(10), ready_rx).await.expect("SUBACK from the cloud broker").unwrap();
        CloudClient { client, rx }
    }

    /// The next message within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<(String, Vec<u8>, bool)> {
        tokio::time::timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// Waits for a message on `topic` whose payload satisfies `pred`.
    pub async fn wait_for(&mut self, topic: &str, within: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (t, p, _) = tokio::time::timeout_at(deadline, self.rx.recv()).await.ok()??;
            if t == topic && pred(&p) {
                return Some(p);
            }
        }
    }
}

/// Values of tag `tag` in the gateway's cloud messages (`{"points": [{"tag", "value"}]}`), in order.
pub fn tag_values(payload: &[u8], tag: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    v["points"]
        .as_array()
        .map(|ps| ps.iter().filter(|p| p["tag"] == tag).map(|p| p["value"].clone()).collect())
        .unwrap_or_default()
}

/// The `updraft` binary built beside the test binary (`cargo nextest --workspace` builds it).
pub fn updraft_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("updraft");
    assert!(bin.exists(), "{} is missing: build the workspace (`cargo build --workspace`)", bin.display());
    bin
}

/// `updraft run -c CONFIG` as a child process; SIGKILLed on drop.
pub struct GatewayProcess {
    child: Child,
}

impl GatewayProcess {
    pub fn start(config: &Path) -> Self {
        let log = std::fs::File::create(config.with_extension(format!("log.{}", free_port()))).unwrap();
        let child = Command::new(updraft_bin())
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        GatewayProcess { child }
    }

    /// Sends a signal by name (`HUP`, `TERM`, …).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success(), "kill -{name}");
    }

    /// `kill -9`: no drain, no goodbye.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.child.wait().unwrap()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throw-away PKI made with the openssl command line: a CA, a server certificate for
/// `localhost`/127.0.0.1 and a client certificate, all PEM files in `dir`.
pub fn make_pki(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[
        &["req", "-x509"],
        &ec[..],
        &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=updraft-test-ca"],
    ]
    .concat());
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "gw")] {
        run(&[
            &["req"],
            &ec[..],
            &["-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr"), "-subj", &format!("/CN={cn}")],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}
