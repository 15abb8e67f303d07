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
    for p in ["scale", "window_avg", "threshold_alarm", "deadband", "thingsboard"] {
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
