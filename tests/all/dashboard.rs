//! The web dashboard (issue 14) in a real browser: Debian's headless Chromium, driven over the
//! DevTools protocol by `tests/peers/browser.py`, against the demo config run by the real binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use updraft_tests::cloud::{free_port, updraft_bin, GatewayProcess};
use updraft_tests::{http_get, PythonPeer, TempDir};

/// Where screenshots are kept for people to look at: `target/artifacts/`.
fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/all-… → target/
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The shipped demo config on free ports, with its data in `dir` and its plugins found from here.
fn demo_on_free_ports(dir: &Path) -> (String, u16) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut toml = std::fs::read_to_string(repo.join("configs/demo.toml")).unwrap();
    let api = free_port();
    for (fixed, port) in [
        ("127.0.0.1:5020", free_port()),
        ("127.0.0.1:5021", free_port()),
        ("127.0.0.1:4841", free_port()),
        ("127.0.0.1:1883", free_port()),
        ("127.0.0.1:8080", api),
    ] {
        assert!(toml.contains(fixed), "the demo config uses {fixed}");
        toml = toml.replace(fixed, &format!("127.0.0.1:{port}"));
    }
    toml = toml.replace("data_dir = \"./data\"", &format!("data_dir = {:?}", dir.join("data").display().to_string()));
    toml = toml.replace("\"../plugins/", &format!("\"{}/plugins/", repo.display()));
    (toml, api)
}

/// Sends one command to the browser and returns what it printed for it.
async fn ask(browser: &mut PythonPeer, command: &str, within: Duration) -> String {
    let before = browser.lines().len();
    browser.send(command);
    let line = updraft_tests::eventually(within + Duration::from_secs(10), || browser.lines().get(before).cloned())
        .await
        .unwrap_or_else(|| panic!("the browser answers `{command}`"));
    line
}

/// The value a JS expression has in the page, waiting until it is truthy.
async fn wait_for(browser: &mut PythonPeer, seconds: u64, js: &str) -> serde_json::Value {
    let said = ask(browser, &format!("wait {seconds} {js}"), Duration::from_secs(seconds)).await;
    let (status, json) = said.split_once(' ').unwrap();
    assert_eq!(status, "ok", "`{js}` never became true in the page (last value {json})");
    serde_json::from_str(json).unwrap()
}

/// The demo's live values reach a real browser through the dashboard, and a simulator that stops
/// shows its device as stalled (screenshots of both in `target/artifacts/`).
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_live_values_and_a_stalled_device_in_a_real_browser() {
    let dir = TempDir::new("dashboard");
    let (demo, api_port) = demo_on_free_ports(dir.path());
    // The boiler's simulator runs as its own process, to be stopped like a machine that is
    // switched off; its serial number is markup, which must show as text.
    let mut full: toml::Table = demo.parse().unwrap();
    let simulators = full["simulators"].as_table_mut().unwrap();
    let mut boiler_sim = simulators.remove("boiler-sim").unwrap();
    for r in boiler_sim["registers"].as_array_mut().unwrap() {
        if r.get("text").is_some() {
            r["text"] = toml::Value::String("<i>A7</i>".into());
        }
    }
    let mut sim_only = toml::Table::new();
    sim_only.insert("gateway".into(), full["gateway"].clone());
    let mut sims = toml::Table::new();
    sims.insert("boiler-sim".into(), boiler_sim);
    sim_only.insert("simulators".into(), toml::Value::Table(sims));
    let sim_path = dir.path().join("boiler-sim.toml");
    std::fs::write(&sim_path, toml::to_string(&sim_only).unwrap()).unwrap();
    let gw_path = dir.path().join("updraft.toml");
    std::fs::write(&gw_path, toml::to_string(&full).unwrap()).unwrap();

    let mut sim = std::process::Command::new(updraft_bin())
        .args(["simulate", "-c"])
        .arg(&sim_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _gw = GatewayProcess::start(&gw_path);
    let api: std::net::SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    updraft_tests::eventually(Duration::from_secs(30), || std::net::TcpStream::connect(api).ok().map(|_| ()))
        .await
        .expect("the gateway's API listens");
    let (code, page) = http_get(api, "/").await;
    assert_eq!(code, 200);
    assert!(page.contains("/dashboard.js"), "{page}");

    let url = format!("http://{api}/");
    let mut browser = PythonPeer::start("browser.py", &[&url, "1400x1000"]);
    // Live: the event stream is open and every demo device is on the page with values.
    wait_for(&mut browser, 20, r#"document.getElementById("live").dataset.live === "true""#).await;
    for device in ["boiler-1", "compressor-1", "press-1"] {
        wait_for(
            &mut browser,
            20,
            &format!(r#"document.querySelector('[data-device="{device}"][data-state="ok"] [data-tag] td.v')"#),
        )
        .await;
    }
    let serial = wait_for(
        &mut browser,
        20,
        r#"(document.querySelector('[data-device="boiler-1"] [data-tag="serial"] td.v') || {}).textContent"#,
    )
    .await;
    assert_eq!(serial, "<i>A7</i>", "a string value shows as text");
    let markup = ask(&mut browser, r#"eval document.querySelectorAll('#devices i').length"#, Duration::ZERO).await;
    assert_eq!(markup, "= 0", "a device's value never becomes markup");
    // Values move: the compressor's outlet pressure (a sine) shows a new reading within seconds.
    let first = wait_for(
        &mut browser,
        10,
        r#"document.querySelector('[data-device="compressor-1"] [data-tag="outlet-pressure"] td.v').textContent"#,
    )
    .await;
    wait_for(
        &mut browser,
        10,
        &format!(
            r#"document.querySelector('[data-device="compressor-1"] [data-tag="outlet-pressure"] td.v').textContent !== {first}"#
        ),
    )
    .await;
    // Plugins, their derived values, and the demo's sink.
    wait_for(&mut browser, 20, r#"document.querySelector('[data-derived="boiler-1"] [data-tag="temperature_f"]')"#)
        .await;
    wait_for(&mut browser, 20, r#"document.querySelectorAll('#plugins [data-plugin]').length === 3"#).await;
    wait_for(&mut browser, 20, r#"document.querySelector('#sinks [data-sink="cloud"][data-state="ok"]')"#).await;
    let shot = artifacts().join("dashboard.png");
    assert_eq!(
        ask(&mut browser, &format!("shot {}", shot.display()), Duration::ZERO).await,
        format!("shot {}", shot.display())
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a real screenshot");

    // The boiler is switched off. Its device polls every second: stalled after two polls without
    // a good read, which the page shows (it redraws every second).
    sim.kill().unwrap();
    sim.wait().unwrap();
    let stopped = Instant::now();
    wait_for(&mut browser, 20, r#"document.querySelector('[data-device="boiler-1"][data-state="stalled"]')"#).await;
    println!("the dashboard showed boiler-1 stalled {:?} after its simulator stopped", stopped.elapsed());
    let meta =
        wait_for(&mut browser, 5, r#"document.querySelector('[data-device="boiler-1"] .meta').textContent"#).await;
    assert!(meta.as_str().unwrap().contains("allowed 2.0 s"), "the stall rule is two polls of 1 s: {meta}");
    wait_for(&mut browser, 5, r#"document.getElementById("ready").dataset.ready === "false""#).await;
    // The other devices carry on, and the stall is among the recent warnings.
    wait_for(&mut browser, 5, r#"document.querySelector('[data-device="compressor-1"][data-state="ok"]')"#).await;
    wait_for(
        &mut browser,
        10,
        r#"[...document.querySelectorAll('#errors li')].some(li => li.textContent.includes("boiler-1") && li.textContent.includes("stalled"))"#,
    )
    .await;
    let shot = artifacts().join("dashboard-stalled.png");
    ask(&mut browser, &format!("shot {}", shot.display()), Duration::ZERO).await;
}
