//! Operating the gateway (issue 14): readiness that means data moves, not that sockets are open.

use std::time::Duration;

use updraft_tests::{eventually, header, http_get, start_gateway, Faults, ModbusFixture};

const WAIT: Duration = Duration::from_secs(15);

/// A device that stops answering turns the gateway unready within two poll intervals (its
/// connection stays open), `/ready` names it with its last good read, and it recovers by itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_stops_answering_turns_the_gateway_unready_and_recovers() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[42]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.press-1]
driver = "modbus-tcp"
address = "{addr}"
poll = "500ms"
timeout = "200ms"
tags = [ {{ name = "force", area = "holding", address = 0 }} ]
"#,
        header("gw-ready")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let api = gw.api_addr.unwrap();
    let ready = |want: u16| updraft_tests::wait_ready(api, want, WAIT);
    // Ready from the start (a device has its stall period to deliver a first read), and then with
    // a good read on record.
    let mut ok = ready(200).await;
    while ok["devices"]["press-1"]["last_good_ms"].is_null() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        ok = ready(200).await;
    }
    assert_eq!(ok["devices"]["press-1"]["state"], "ok", "{ok}");
    let last_good = ok["devices"]["press-1"]["last_good_ms"].as_i64().unwrap();

    // The device keeps its connection but answers too late: every read times out.
    fixture.set_faults(Faults { delay: Some(Duration::from_secs(5)), ..Default::default() });
    let stopped = std::time::Instant::now();
    let stalled = ready(503).await;
    let took = stopped.elapsed();
    println!("stalled after {took:?}");
    let d = &stalled["devices"]["press-1"];
    // Two polls of 500 ms (longer than one poll and the 200 ms timeout): the rule, not a timing.
    assert_eq!(d["stall_after_ms"], 1000, "{stalled}");
    assert_eq!(d["state"], "stalled", "{stalled}");
    assert!(d["last_good_ms"].as_i64().unwrap() >= last_good, "{stalled}");
    assert_eq!(stalled["ready"], false);
    // Liveness is another matter: the process is fine.
    assert_eq!(http_get(api, "/health").await.0, 200);

    fixture.set_faults(Faults::default());
    let again = ready(200).await;
    assert_eq!(again["devices"]["press-1"]["state"], "ok", "{again}");
    eventually(WAIT, || (gw.metrics.device("press-1").points_good.get() > 0).then_some(())).await.unwrap();
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Runs a command and returns its stdout, failing the test with its stderr.
fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The .deb (packaging/build-deb.sh) unpacked into a scratch root: the binary, the hardened unit,
/// the config as a conffile that `updraft check` accepts, the example plugins, the docs and the
/// maintainer scripts; the unit passes `systemd-analyze verify` without a warning.
#[test]
fn the_deb_installs_into_a_scratch_root_with_the_right_layout() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let work = updraft_tests::TempDir::new("deb");
    let out = work.path().join("out");
    let bin = updraft_tests::cloud::updraft_bin();
    let deb = run(std::process::Command::new("bash")
        .arg(repo.join("packaging/build-deb.sh"))
        .args(["--fast", "--binary"])
        .arg(&bin)
        .arg("--out")
        .arg(&out));
    let deb = std::path::PathBuf::from(deb.trim());
    let root = work.path().join("root");
    run(std::process::Command::new("dpkg").arg("-x").arg(&deb).arg(&root));

    let mode = |rel: &str| {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(root.join(rel)).unwrap_or_else(|e| panic!("{rel} is installed: {e}"));
        m.permissions().mode() & 0o777
    };
    assert_eq!(mode("usr/bin/updraft"), 0o755);
    assert_eq!(mode("lib/systemd/system/updraft.service"), 0o644);
    assert_eq!(mode("etc/updraft/updraft.toml"), 0o644, "postinst narrows it to root:updraft 0640");
    for p in ["scale", "window_avg", "threshold_alarm", "deadband", "thingsboard", "energy_shift"] {
        assert_eq!(mode(&format!("usr/share/updraft/plugins/{p}.wasm")), 0o644);
    }
    for doc in ["README.md", "gateway.toml.example", "copyright"] {
        mode(&format!("usr/share/doc/updraft/{doc}"));
    }
    assert!(!root.join("usr/share/updraft/plugins/misbehave.wasm").exists(), "test fixtures stay out");

    let info = |field: &str| run(std::process::Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg(field));
    assert_eq!(info("Package").trim(), "updraft");
    assert!(!info("Version").trim().is_empty());
    let control = work.path().join("control");
    run(std::process::Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(std::fs::read_to_string(control.join("conffiles")).unwrap().trim(), "/etc/updraft/updraft.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group"), "a dedicated user: {postinst}");

    // The packaged binary accepts the packaged config.
    let checked = run(std::process::Command::new(root.join("usr/bin/updraft"))
        .args(["check", "-c"])
        .arg(root.join("etc/updraft/updraft.toml")));
    assert!(checked.contains(": ok"), "{checked}");

    // The unit as installed: hardened, notify with a watchdog, and clean for systemd-analyze.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/updraft.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "User=updraft",
        "ProtectSystem=strict",
        "StateDirectory=updraft",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "the unit has {line}");
    }
    let analyze = std::process::Command::new("systemd-analyze").arg("--version").output();
    if analyze.is_ok_and(|o| o.status.success()) {
        // verify needs the ExecStart binary to exist: point it at the scratch root's.
        let copy = work.path().join("updraft.service");
        std::fs::write(&copy, unit.replace("/usr/bin/updraft", &root.join("usr/bin/updraft").display().to_string()))
            .unwrap();
        let out =
            std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    } else {
        println!("systemd-analyze is not installed; the unit was not verified");
    }
}

/// Under systemd (`Type=notify`, `WatchdogSec=`), the gateway says READY=1 once it is up and then
/// pings the watchdog, and says STOPPING=1 on SIGTERM. systemd's side is a datagram socket here.
#[test]
fn the_gateway_tells_systemd_it_is_ready_and_pings_the_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = updraft_tests::TempDir::new("notify");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let config = dir.path().join("updraft.toml");
    std::fs::write(&config, header("gw-notify")).unwrap();
    // systemd names the watched process in WATCHDOG_PID: the shell's own pid, which `exec` keeps.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run -c \"$1\""])
        .arg(updraft_tests::cloud::updraft_bin())
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        // 2 s: the gateway pings every second.
        .env("WATCHDOG_USEC", "2000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut said = Vec::new();
    let mut buf = [0u8; 256];
    while said.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 2 {
        let n = socket.recv(&mut buf).expect("the gateway keeps talking to systemd");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(said.iter().any(|m| m.contains("READY=1")), "READY=1 was sent: {said:?}");
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM: {said:?}");
    assert!(child.wait().unwrap().success());
}

/// `/metrics` is read by the Prometheus project's own parser (Python `prometheus_client`): every
/// family parses with its type, and the latency histograms agree with the counters beside them.
#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_page_parses_with_prometheus_own_parser() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[42]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.press-1]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [ {{ name = "force", area = "holding", address = 0 }} ]

[plugins.double]
wasm = "{wasm}"
subscribe = ["press-1/force"]
config = {{ factor = 2.0, offset = 0.0, suffix = "_x" }}

[north.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{cloud}"
topic = "plant/{{gateway}}/{{device}}"
"#,
        header("gw-metrics"),
        wasm = updraft_tests::plugin_wasm("scale").display(),
        cloud = updraft_tests::cloud::free_port(),
    );
    let (gw, _dir) = start_gateway(&toml).await;
    eventually(WAIT, || (gw.metrics.plugin("double").calls.get() >= 3).then_some(())).await.expect("the plugin runs");
    let (code, page) = http_get(gw.api_addr.unwrap(), "/metrics").await;
    assert_eq!(code, 200);
    gw.shutdown(Duration::from_secs(2)).await;

    let mut child = std::process::Command::new(updraft_tests::python())
        .arg(updraft_tests::test_file("peers/prom_parse.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused the page: {}\n{page}", String::from_utf8_lossy(&out.stderr));
    let families: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sample = |family: &str, name: &str, label: (&str, &str)| -> f64 {
        families[family]["samples"]
            .as_array()
            .unwrap_or_else(|| panic!("family {family} in {families}"))
            .iter()
            .find(|s| s[0] == name && s[1][label.0] == label.1)
            .unwrap_or_else(|| panic!("{name}{{{}={}}} in {}", label.0, label.1, families[family]))[2]
            .as_f64()
            .unwrap()
    };
    assert_eq!(families["updraft_polls"]["type"], "counter");
    assert_eq!(families["updraft_north_pending_points"]["type"], "gauge");
    assert_eq!(families["updraft_request_duration_seconds"]["type"], "histogram");
    assert_eq!(families["updraft_plugin_call_duration_seconds"]["type"], "histogram");
    let device = ("device", "press-1");
    let requests = sample("updraft_requests", "updraft_requests_total", device);
    assert!(requests > 0.0);
    assert_eq!(
        sample("updraft_request_duration_seconds", "updraft_request_duration_seconds_count", device),
        requests,
        "one latency per request"
    );
    let plugin = ("plugin", "double");
    assert_eq!(
        sample("updraft_plugin_call_duration_seconds", "updraft_plugin_call_duration_seconds_count", plugin),
        sample("updraft_plugin_calls", "updraft_plugin_calls_total", plugin),
        "one latency per plugin call"
    );
    let reasons = families["updraft_north_dropped_points"]["samples"].as_array().unwrap();
    assert_eq!(reasons.len(), 7, "every drop reason of the sink is listed: {reasons:?}");
}
