//! Reload (issue 14): a changed config takes effect without a restart, only what changed
//! restarts, buffered points survive, and a bad file is refused and reported.

use std::path::Path;
use std::time::Duration;

use updraft_tests::cloud::{free_port, updraft_bin, GatewayProcess, Mosquitto};
use updraft_tests::{eventually, http_get, http_post, metric, plugin_wasm, ModbusFixture, TempDir};

const WAIT: Duration = Duration::from_secs(20);

/// The test's config: device press-1, plugin `times` (scale) on it, sink `cloud` to `cloud`;
/// `v2` adds press-2, triples instead of doubling, and sends smaller batches.
fn config(api: u16, broker: u16, cloud: u16, press_1: &str, press_2: &str, v2: bool) -> String {
    let (factor, max_points) = if v2 { (3.0, 50) } else { (2.0, 100) };
    let mut toml = format!(
        r#"[gateway]
id = "gw-reload"
data_dir = "data"

[broker]
listen = "127.0.0.1:{broker}"

[api]
listen = "127.0.0.1:{api}"

[devices.press-1]
driver = "modbus-tcp"
address = "{press_1}"
poll = "200ms"
tags = [ {{ name = "force", area = "holding", address = 0 }} ]

[plugins.times]
wasm = "{wasm}"
subscribe = ["press-1/force"]
config = {{ factor = {factor:.1}, offset = 0.0, suffix = "_x" }}

[north.cloud]
type = "mqtt"
url = "mqtt://127.0.0.1:{cloud}"
topic = "plant/{{gateway}}/{{device}}"
batch = {{ max_points = {max_points} }}
"#,
        wasm = plugin_wasm("scale").display(),
    );
    if v2 {
        toml += &format!(
            r#"
[devices.press-2]
driver = "modbus-tcp"
address = "{press_2}"
poll = "200ms"
tags = [ {{ name = "force", area = "holding", address = 0 }} ]
"#
        );
    }
    toml
}

async fn metrics(api: std::net::SocketAddr) -> String {
    let (code, page) = http_get(api, "/metrics").await;
    assert_eq!(code, 200);
    page
}

async fn values(api: std::net::SocketAddr) -> serde_json::Value {
    serde_json::from_str(&http_get(api, "/api/v1/values").await.1).unwrap()
}

fn check_diff(path: &Path) -> String {
    let out = std::process::Command::new(updraft_bin()).args(["check", "--diff", "-c"]).arg(path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

/// While the cloud is down (points pile up in the sink's buffer), a SIGHUP applies a config that
/// adds a device, changes a plugin's config and changes the sink: the new device's values
/// appear, the plugin computes with its new config, the unchanged device is not reconnected, and
/// every point buffered before the reload reaches the cloud once it is back. A bad file and a
/// change that needs a restart are refused over the API, reported, and change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_adds_a_device_and_changes_a_plugin_without_losing_buffered_points() {
    let press_1 = ModbusFixture::default();
    press_1.set_holding(0, &[100]);
    let press_2 = ModbusFixture::default();
    press_2.set_holding(0, &[7]);
    let (a1, a2) = (press_1.serve().await, press_2.serve().await);
    let mut cloud = Mosquitto::start().await;
    cloud.stop();
    let dir = TempDir::new("reload");
    let path = dir.path().join("updraft.toml");
    let (api_port, broker) = (free_port(), free_port());
    let write = |v2: bool| {
        let text = config(api_port, broker, cloud.addr.port(), &a1.to_string(), &a2.to_string(), v2);
        std::fs::write(&path, text).unwrap();
    };
    write(false);
    let gw = GatewayProcess::start(&path);
    let api: std::net::SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    eventually(WAIT, || std::net::TcpStream::connect(api).ok()).await.expect("the API listens");

    // Running: press-1 doubled by the plugin, points piling up for the cloud.
    let mut v = values(api).await;
    for _ in 0..100 {
        if v["derived"]["press-1"]["force_x"]["value"] == 200.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        v = values(api).await;
    }
    assert_eq!(v["derived"]["press-1"]["force_x"]["value"], 200.0, "{v}");
    let pending = |page: &str| metric(page, r#"updraft_north_pending_points{sink="cloud"}"#).unwrap();
    let mut page = metrics(api).await;
    while pending(&page) < 20.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = metrics(api).await;
    }
    let connects_before = metric(&page, r#"updraft_connects_total{device="press-1"}"#).unwrap();

    // The new file, checked first as an operator would.
    write(true);
    let diff = check_diff(&path);
    assert!(diff.contains("+ device press-2 (added: starts)"), "{diff}");
    assert!(diff.contains("~ plugin times (changed: restarts)"), "{diff}");
    assert!(diff.contains("~ sink cloud (changed: restarts)"), "{diff}");
    assert!(!diff.contains("press-1"), "press-1 did not change: {diff}");

    let before = pending(&metrics(api).await);
    gw.signal("HUP");
    let mut v = values(api).await;
    for _ in 0..100 {
        if v["devices"]["press-2"]["force"]["value"] == 7 && v["derived"]["press-1"]["force_x"]["value"] == 300.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        v = values(api).await;
    }
    assert_eq!(v["devices"]["press-2"]["force"]["value"], 7, "the added device is polled: {v}");
    assert_eq!(v["derived"]["press-1"]["force_x"]["value"], 300.0, "the plugin runs with its new config: {v}");
    let page = metrics(api).await;
    assert_eq!(metric(&page, r#"updraft_reloads_total{result="applied"}"#), Some(1.0));
    assert_eq!(
        metric(&page, r#"updraft_connects_total{device="press-1"}"#),
        Some(connects_before),
        "the unchanged device kept its connection"
    );
    let after = pending(&page);
    assert!(after >= before, "the restarted sink kept its buffer: {before} pending before, {after} after");
    // The sink's other counters carried on through its restart.
    assert!(metric(&page, r#"updraft_north_accepted_points_total{sink="cloud"}"#).unwrap() >= before);
    let status: serde_json::Value = serde_json::from_str(&http_get(api, "/api/v1/status").await.1).unwrap();
    assert!(status["devices"]["press-2"].is_object(), "the dashboard lists the new device: {status}");
    assert_eq!(status["reload"]["applied"], 1);
    assert!(check_diff(&path).contains("no change"), "the running config was recorded");

    // A bad file: refused with the checker's message, and the running config stays.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("poll = \"200ms\"", "poll = \"soon\"")).unwrap();
    let (code, body) = http_post(api, "/api/v1/reload", &[], "").await;
    assert_eq!(code, 422, "{body}");
    let said: serde_json::Value = serde_json::from_str(&body).unwrap();
    let error = said["error"].as_str().unwrap();
    assert!(error.contains("updraft.toml:14:8:"), "the refusal points at the line: {error}");
    let page = metrics(api).await;
    assert_eq!(metric(&page, r#"updraft_reloads_total{result="refused"}"#), Some(1.0));
    let status: serde_json::Value = serde_json::from_str(&http_get(api, "/api/v1/status").await.1).unwrap();
    assert!(status["reload"]["last_error"].as_str().unwrap().contains("updraft.toml:14:8:"), "{status}");
    // A change only a restart applies is refused whole, even with a reloadable change beside it.
    std::fs::write(&path, good.replace("[broker]\n", "[broker]\nmax_connections = 10\n").replace("3.0", "4.0"))
        .unwrap();
    let (code, body) = http_post(api, "/api/v1/reload", &[], "").await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("[broker] changed, which only a restart applies"), "{body}");
    let v = values(api).await;
    assert_eq!(v["derived"]["press-1"]["force_x"]["value"], 300.0, "nothing was half-applied: {v}");
    assert!(v["devices"]["press-2"].is_object(), "{v}");

    // The cloud comes back: everything buffered arrives, nothing was dropped.
    std::fs::write(&path, &good).unwrap();
    cloud.restart().await;
    let mut page = metrics(api).await;
    for _ in 0..300 {
        if pending(&page) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = metrics(api).await;
    }
    assert_eq!(pending(&page), 0.0, "the backlog drains");
    let accepted = metric(&page, r#"updraft_north_accepted_points_total{sink="cloud"}"#).unwrap();
    let delivered = metric(&page, r#"updraft_north_delivered_points_total{sink="cloud"}"#).unwrap();
    println!("buffered before the reload {before}, after {after}; accepted {accepted}, delivered {delivered}");
    assert!(delivered >= accepted, "every accepted point was delivered: {accepted} accepted, {delivered} delivered");
    for line in page.lines().filter(|l| l.starts_with("updraft_north_dropped_points_total{sink=\"cloud\"")) {
        assert!(line.ends_with(" 0"), "nothing dropped: {line}");
    }
    assert_eq!(metric(&page, r#"updraft_dropped_points_total{consumer="north:cloud"}"#).unwrap_or(0.0), 0.0);
    gw.stop();
}

/// With `[api] token_file`, a reload over the API needs the token; a wrong or missing one is
/// refused before anything is read.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_over_the_api_needs_the_token_when_one_is_set() {
    let dir = TempDir::new("reload-token");
    let token = "3f9c1e7a5b2d4f608e1a9c3b7d5f2e41";
    std::fs::write(dir.path().join("api-token"), format!("{token}\n")).unwrap();
    let (api_port, broker) = (free_port(), free_port());
    let path = dir.path().join("updraft.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"gw-token\"\ndata_dir = \"data\"\n\n[broker]\nlisten = \"127.0.0.1:{broker}\"\n\n[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken_file = \"api-token\"\n"
        ),
    )
    .unwrap();
    let gw = GatewayProcess::start(&path);
    let api: std::net::SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    eventually(WAIT, || std::net::TcpStream::connect(api).ok()).await.expect("the API listens");
    assert_eq!(http_post(api, "/api/v1/reload", &[], "").await.0, 401);
    assert_eq!(http_post(api, "/api/v1/reload", &["Authorization: Bearer wrong-token-0000000000"], "").await.0, 401);
    let (code, body) = http_post(api, "/api/v1/reload", &[&format!("Authorization: Bearer {token}")], "").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["applied"], true, "{body}");
    let page = metrics(api).await;
    assert_eq!(
        metric(&page, r#"updraft_reloads_total{result="applied"}"#),
        Some(1.0),
        "only the one with the token ran"
    );
    gw.stop();
}
