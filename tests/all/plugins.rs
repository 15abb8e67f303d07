//! WASM plugins end to end: a device point goes through a plugin to the embedded broker, and
//! misbehaving plugins (endless loop, memory bomb, panic, file and socket access) are contained
//! while device data keeps flowing, then recover when the plugin behaves again.

use std::time::Duration;

use rumqttc::QoS;
use updraft_tests::{eventually, header, plugin_wasm, start_gateway, ModbusFixture, Subscriber};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread")]
async fn scale_plugin_publishes_converted_points() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[700]);
    fixture.set_holding(1, &[50]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{h}[devices.boiler-1]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [
  {{ name = "temperature", area = "holding", address = 0 }},
  {{ name = "level", area = "holding", address = 1 }},
]

[devices.other]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [{{ name = "temperature", area = "holding", address = 0 }}]

[plugins.to-celsius]
wasm = "{wasm}"
subscribe = ["boiler-1/temperature"]
config = {{ factor = 0.1, offset = -40.0 }}
limits = {{ memory = "32MiB", call_timeout = "50ms" }}
[plugins.to-celsius.outputs]
default = "updraft/derived/{{device}}/{{tag}}"
"#,
        h = header("gw-scale"),
        wasm = plugin_wasm("scale").display()
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let v = sub.wait_for("updraft/derived/boiler-1/temperature", WAIT, |_| true).await.expect("derived point");
    assert_eq!(v["value"], 30.0, "700 × 0.1 − 40");
    assert_eq!(v["quality"], "good");
    // The raw point is still published, and unsubscribed tags are not transformed.
    assert_eq!(sub.wait_for("updraft/boiler-1/temperature", WAIT, |_| true).await.unwrap()["value"], 700);
    let stats = gw.metrics.plugin("to-celsius");
    eventually(WAIT, || (stats.points_out.get() >= 3).then_some(())).await.unwrap();
    assert_eq!(stats.points_in.get(), stats.points_out.get() + stats.points_dropped.get());
    assert_eq!(stats.traps.get(), 0);
    let all = sub.collect(Duration::from_millis(500), Duration::from_secs(2)).await;
    assert!(!all.contains_key("updraft/derived/boiler-1/level"), "level is not subscribed");
    assert!(!all.contains_key("updraft/derived/other/temperature"), "other device is not subscribed");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Sets the fixture's `mode` register and waits until the plugin has trapped once more with the
/// expected kind, checking that device data kept flowing meanwhile.
async fn provoke(gw: &updraft::runtime::Gateway, fixture: &ModbusFixture, mode: u16, kind: &str) {
    let stats = gw.metrics.plugin("chaos");
    let before = stats.traps.get();
    let device_before = gw.metrics.device("d").points_good.get();
    fixture.set_holding(0, &[mode]);
    eventually(WAIT, || (stats.traps.get() > before).then_some(()))
        .await
        .unwrap_or_else(|| panic!("mode {mode} did not trap"));
    assert_eq!(stats.last_trap_kind().as_deref(), Some(kind), "reason: {:?}", stats.last_trap_reason());
    fixture.set_holding(0, &[0]);
    let device_after = gw.metrics.device("d").points_good.get();
    assert!(device_after > device_before, "device data kept flowing while the plugin misbehaved");
}

#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_plugins_are_contained_and_recover() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[0]);
    let addr = fixture.serve().await;
    // A loopback port the socket attempt would reach if the sandbox let it.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bait_addr = bait.local_addr().unwrap();
    let toml = format!(
        r#"{h}[devices.d]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [{{ name = "mode", area = "holding", address = 0 }}]

[plugins.chaos]
wasm = "{wasm}"
subscribe = ["d/*"]
config = {{ connect_to = "{bait_addr}" }}
limits = {{ memory = "16MiB", call_timeout = "50ms" }}

[plugins.bystander]
wasm = "{scale}"
subscribe = ["d/*"]
config = {{ factor = 2.0 }}
# Generous, so a CPU-starved test machine cannot make the bystander's own calls overrun.
limits = {{ call_timeout = "1s" }}
[plugins.bystander.outputs]
default = "updraft/doubled/{{device}}/{{tag}}"
"#,
        h = header("gw-chaos"),
        wasm = plugin_wasm("misbehave").display(),
        scale = plugin_wasm("scale").display(),
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    sub.wait_for("updraft/derived/d/mode", WAIT, |v| v["value"] == 0).await.expect("healthy at first");

    let started = std::time::Instant::now();
    provoke(&gw, &fixture, 1, "timeout").await;
    println!("endless loop contained after {:?}", started.elapsed());
    sub.wait_for("updraft/derived/d/mode", WAIT, |v| v["value"] == 0).await.expect("recovers after the loop");

    provoke(&gw, &fixture, 2, "memory").await;
    sub.wait_for("updraft/derived/d/mode", WAIT, |v| v["value"] == 0).await.expect("recovers after the bomb");

    provoke(&gw, &fixture, 3, "panic").await;
    let reason = gw.metrics.plugin("chaos").last_trap_reason().unwrap();
    assert!(reason.contains("misbehave fixture panicked on purpose"), "panic message is logged: {reason}");
    sub.wait_for("updraft/derived/d/mode", WAIT, |v| v["value"] == 0).await.expect("recovers after the panic");

    // A sleeping plugin is stopped at once: a host-side wait is out of reach of the call deadline.
    provoke(&gw, &fixture, 6, "wait").await;
    sub.wait_for("updraft/derived/d/mode", WAIT, |v| v["value"] == 0).await.expect("recovers after the sleep");
    // Leaking WASI handles (pollables) hits the per-instance cap long before host memory.
    provoke(&gw, &fixture, 11, "resources").await;
    sub.wait_for("updraft/derived/d/mode", WAIT, |v| v["value"] == 0).await.expect("recovers after the leak");

    // File and socket access are refused by the sandbox: the plugin reports it could not escape.
    fixture.set_holding(0, &[4]);
    let v = sub.wait_for("updraft/derived/d/escape", WAIT, |_| true).await.expect("file attempt reported");
    assert_eq!(v["value"], 0, "no file is reachable");
    fixture.set_holding(0, &[5]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = sub.wait_for("updraft/derived/d/escape", WAIT, |_| true).await.expect("socket attempt reported");
    assert_eq!(v["value"], 0, "no socket can be opened");
    bait.set_nonblocking(true).unwrap();
    assert!(bait.accept().is_err(), "nothing connected to the bait port");

    // The other plugin was never disturbed.
    let bystander = gw.metrics.plugin("bystander");
    assert_eq!(bystander.traps.get(), 0);
    assert!(bystander.points_out.get() > 10);
    fixture.set_holding(0, &[0]);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Every example plugin's fixtures pass in the author's harness (`updraft plugin test`), which runs
/// the gateway's own host code.
#[test]
fn example_plugin_fixtures_pass_in_the_harness() {
    let root = updraft_tests::test_file("../plugins");
    let mut ran = 0;
    for dir in
        ["scale", "deadband", "window-avg", "threshold-alarm", "thingsboard", "energy-shift", "testing/misbehave"]
    {
        let name = dir.rsplit('/').next().unwrap().replace('-', "_");
        let wasm = plugin_wasm(&name);
        for f in std::fs::read_dir(root.join(dir).join("tests")).unwrap() {
            let f = f.unwrap().path();
            let failures = updraft::plugins::testing::run_fixture(&wasm, &f).unwrap();
            assert!(failures.is_empty(), "{failures:#?}");
            ran += 1;
        }
    }
    assert!(ran >= 9);
}

/// The harness fails a fixture whose expectation the plugin does not meet.
#[test]
fn the_harness_reports_a_wrong_expectation() {
    let dir = updraft_tests::TempDir::new("fixture");
    let f = dir.path().join("wrong.json");
    std::fs::write(
        &f,
        r#"{"config": {"factor": 2.0}, "steps": [{"now": 5, "points": [{"device": "d", "tag": "t", "value": 3}],
            "expect": [{"device": "d", "tag": "t", "value": 7}]}]}"#,
    )
    .unwrap();
    let failures = updraft::plugins::testing::run_fixture(&plugin_wasm("scale"), &f).unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("step 1"), "{failures:?}");

    // A generator whose filtered emits differ, and an init that was expected to refuse.
    let f = dir.path().join("series.json");
    std::fs::write(
        &f,
        r#"{"config": {"factor": 2.0}, "steps": [{"series": {"device": "d", "tag": "t", "from": 0, "to": 2000,
            "every": "1s", "values": "linear:0..1"}, "expect_only": {"tag": "t"},
            "expect": [{"device": "d", "tag": "t", "value": 0}, {"device": "d", "tag": "t", "value": 1.0},
                       {"device": "d", "tag": "t", "value": 3.0}]}]}"#,
    )
    .unwrap();
    let failures = updraft::plugins::testing::run_fixture(&plugin_wasm("scale"), &f).unwrap();
    assert_eq!(failures.len(), 1, "linear:0..1 over three instants, doubled, ends at 2, not 3: {failures:?}");
    assert!(failures[0].contains("value: Number(3.0)") && failures[0].contains("value: Number(2.0)"), "{failures:?}");
    let f = dir.path().join("init.json");
    std::fs::write(&f, r#"{"config": {"factor": 2.0}, "expect_init_error": "must be finite"}"#).unwrap();
    let failures = updraft::plugins::testing::run_fixture(&plugin_wasm("scale"), &f).unwrap();
    assert!(failures.len() == 1 && failures[0].contains("it accepted it"), "{failures:?}");
}

/// A plugin that reshapes data for a cloud format publishes whole messages: here ThingsBoard's
/// gateway telemetry JSON on the topic the operator chose.
#[tokio::test(flavor = "multi_thread")]
async fn thingsboard_plugin_publishes_gateway_telemetry() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[215]);
    fixture.set_coil(0, true);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{h}[devices.boiler-1]
driver = "modbus-tcp"
address = "{addr}"
poll = "200ms"
tags = [
  {{ name = "temperature", area = "holding", address = 0, scale = 0.1 }},
  {{ name = "running", area = "coil", address = 0 }},
]

[plugins.to-thingsboard]
wasm = "{wasm}"
subscribe = ["*/*"]
batch = {{ max_points = 100, max_wait = "50ms" }}
[plugins.to-thingsboard.outputs]
default = "v1/gateway/{{subject}}"
"#,
        h = header("gw-tb"),
        wasm = plugin_wasm("thingsboard").display()
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "v1/gateway/#", QoS::AtMostOnce).await;
    let v = sub
        .wait_for("v1/gateway/telemetry", WAIT, |v| {
            v["boiler-1"][0]["values"].as_object().is_some_and(|m| m.len() == 2)
        })
        .await
        .expect("telemetry message");
    let row = &v["boiler-1"][0];
    assert_eq!(row["values"]["temperature"], 21.5);
    assert_eq!(row["values"]["running"], true);
    assert!(row["ts"].as_i64().unwrap() > 1_700_000_000_000);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A plugin output outside `updraft/` plus a sink that forwards every local topic: the output is
/// published by the gateway, seen by the sink's local-topic tap, and must not be taken in again
/// (it would go back to the publisher and round for ever). Messages are counted over 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_outputs_do_not_loop_through_a_sink_that_forwards_every_local_topic() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[700]);
    let addr = fixture.serve().await;
    for sources in [r##"["#"]"##, r##"["alarms/#"]"##] {
        let toml = format!(
            r#"{h}[devices.boiler-1]
driver = "modbus-tcp"
address = "{addr}"
poll = "200ms"
tags = [{{ name = "temperature", area = "holding", address = 0 }}]

[plugins.alarm]
wasm = "{wasm}"
subscribe = ["boiler-1/*"]
[plugins.alarm.outputs]
default = "alarms/{{device}}/{{tag}}"

[north.cloud]
type = "http"
url = "http://127.0.0.1:9/{{device}}"
sources = {sources}
"#,
            h = header("gw-loop"),
            wasm = plugin_wasm("scale").display()
        );
        let (gw, _dir) = start_gateway(&toml).await;
        let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "alarms/#", QoS::AtMostOnce).await;
        let polls_before = gw.metrics.device("boiler-1").polls.get();
        let seen = sub.drain(Duration::from_secs(5), Duration::from_secs(5)).await;
        let polls = gw.metrics.device("boiler-1").polls.get() - polls_before;
        println!("sources = {sources}: {} messages on alarms/# over 5 s, {polls} polls", seen.len());
        assert!(!seen.is_empty(), "the plugin's output is published");
        assert!(seen.len() as u64 <= polls + 2, "one message per poll, not a loop: {} for {polls} polls", seen.len());
        let accepted = gw.metrics.sink("cloud").accepted.get();
        assert!(accepted <= 2 * (polls + 10), "the sink took each output once: {accepted} points");
        gw.shutdown(Duration::from_secs(2)).await;
    }
}

/// What a plugin emits is bounded: at most 10,000 distinct output topics per plugin, names of at
/// most 128 bytes, nothing on a `…/set` topic; and `tags.describe` names only subscribed tags.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_outputs_are_bounded_and_cannot_reach_reserved_topics() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[0]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{h}[devices.d]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [{{ name = "mode", area = "holding", address = 0 }}]

[devices.other]
driver = "modbus-tcp"
address = "{addr}"
poll = "1s"
tags = [{{ name = "secret", area = "holding", address = 1 }}]

[plugins.chaos]
wasm = "{wasm}"
subscribe = ["d/*"]
limits = {{ call_timeout = "1s" }}
"#,
        h = header("gw-bounds"),
        wasm = plugin_wasm("misbehave").display(),
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let stats = gw.metrics.plugin("chaos");
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/derived/d/+", QoS::AtMostOnce).await;
    sub.wait_for("updraft/derived/d/mode", WAIT, |v| v["value"] == 0).await.expect("healthy at first");

    fixture.set_holding(0, &[10]);
    let v = sub.wait_for("updraft/derived/d/visible", WAIT, |_| true).await.expect("describe probe reported");
    assert_eq!(v["value"], 1, "only the subscribed tag d/mode is described, not other/secret nor outputs");

    for mode in [8, 9] {
        let dropped = stats.points_dropped.get();
        fixture.set_holding(0, &[mode]);
        eventually(WAIT, || (stats.points_dropped.get() > dropped).then_some(()))
            .await
            .unwrap_or_else(|| panic!("mode {mode}: the emit was dropped and counted"));
    }
    let (out, dropped) = (stats.points_out.get(), stats.points_dropped.get());
    fixture.set_holding(0, &[7]);
    eventually(Duration::from_secs(30), || (stats.points_dropped.get() >= dropped + 5_000).then_some(()))
        .await
        .expect("made-up tag names past the cap are dropped");
    fixture.set_holding(0, &[0]);
    let made = stats.points_out.get() - out;
    assert!(made <= 10_000 + 50, "at most 10,000 distinct topics were created ({made} points out)");
    assert_eq!(stats.traps.get(), 0, "refused emits are not traps");
    let seen = sub.drain(Duration::from_millis(500), Duration::from_secs(3)).await;
    assert!(!seen.iter().any(|(t, _)| t.ends_with("/set")), "nothing was published on a /set topic");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The compiled-plugin cache holds native code the gateway runs: it is private to the gateway's
/// user (0700 folder, 0600 files), and an entry that anyone else could have written is refused
/// and recompiled rather than loaded.
#[test]
fn the_plugin_cache_is_private_and_foreign_entries_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = updraft_tests::TempDir::new("cache");
    let cache = dir.path().join("plugin-cache");
    let engine = updraft::plugins::host::PluginEngine::new(&cache).unwrap();
    let wasm = plugin_wasm("noop");
    assert!(!engine.load(&wasm).unwrap().warm, "first load compiles");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache), 0o700);
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .unwrap();
    assert_eq!(mode(&entry), 0o600);
    assert!(engine.load(&wasm).unwrap().warm, "second load comes from the cache");
    // An entry others could have written (or replaced) is not trusted.
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(!engine.load(&wasm).unwrap().warm, "a world-writable entry is refused and recompiled");
    assert_eq!(mode(&entry), 0o600, "and rewritten privately");
}

/// Plugins built for the first world (`updraft:plugin@0.1.0`, before text values existed) keep
/// loading beside current ones and are never handed a text point; a current plugin receives it.
/// The 0.1.0 and 0.2.0 builds of the `scale` example are kept in `tests/fixtures/plugins-0.1/` and
/// `tests/fixtures/plugins-0.2/`.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_built_for_0_1_and_0_2_keep_working_and_0_1_never_sees_text() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[700]);
    // "PUMP-A7", high byte first.
    fixture.set_holding(10, &[0x5055, 0x4D50, 0x2D41, 0x3700]);
    let addr = fixture.serve().await;
    let old = updraft_tests::test_file("fixtures/plugins-0.1/scale.wasm");
    let mid = updraft_tests::test_file("fixtures/plugins-0.2/scale.wasm");
    let plugin = |name: &str, wasm: &std::path::Path| {
        format!(
            "[plugins.{name}]\nwasm = \"{}\"\nsubscribe = [\"press/*\"]\nconfig = {{ factor = 0.1, offset = -40.0 }}\n\
             [plugins.{name}.outputs]\ndefault = \"updraft/{name}/{{device}}/{{tag}}\"\n\n",
            wasm.display()
        )
    };
    let toml = format!(
        "{}[devices.press]\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"100ms\"\ntags = [\n\
         {{ name = \"temperature\", area = \"holding\", address = 0 }},\n\
         {{ name = \"serial\", area = \"holding\", address = 10, type = \"string\", length = 4 }},\n]\n\n{}{}",
        header("gw-worlds"),
        plugin("old", &old),
        plugin("mid", &mid) + &plugin("new", &plugin_wasm("scale"))
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    for world in ["old", "mid", "new"] {
        let v = sub.wait_for(&format!("updraft/{world}/press/temperature"), WAIT, |_| true).await;
        assert_eq!(v.unwrap_or_else(|| panic!("{world} plugin output"))["value"], 30.0, "{world}");
    }
    for world in ["mid", "new"] {
        let text = sub.wait_for(&format!("updraft/{world}/press/serial"), WAIT, |_| true).await;
        assert_eq!(text.expect("0.2.0 and later plugins get text")["value"], "PUMP-A7", "scale passes text through");
    }
    let all = sub.collect(Duration::from_millis(500), Duration::from_secs(2)).await;
    assert!(!all.contains_key("updraft/old/press/serial"), "the 0.1.0 plugin never saw the text point");
    assert_eq!(gw.metrics.plugin("old").traps.get(), 0);
    assert_eq!(gw.metrics.plugin("mid").traps.get(), 0);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A plugin that refuses its config at run time waits between attempts like a trapped one (it is
/// not asked again at every batch), and every attempt and dropped point is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_refuses_its_config_backs_off() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[1]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{h}[devices.d]
driver = "modbus-tcp"
address = "{addr}"
poll = "50ms"
tags = [{{ name = "t", area = "holding", address = 0 }}]

[plugins.alarm]
wasm = "{wasm}"
subscribe = ["d/*"]
batch = {{ max_wait = "10ms" }}
config = {{ high = 80.0, low = 90.0 }}
"#,
        h = header("gw-initrefused"),
        wasm = plugin_wasm("threshold_alarm").display(),
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let stats = gw.metrics.plugin("alarm");
    let polls = || gw.metrics.device("d").polls.get();
    eventually(WAIT, || (polls() >= 60).then_some(())).await.expect("the device polls");
    let (attempts, polled) = (stats.init_failures.get(), polls());
    println!("{attempts} init attempts while the device was polled {polled} times");
    assert!(attempts >= 2, "it keeps trying: {attempts}");
    // Every poll hands the plugin a batch; without backoff each would be an attempt.
    assert!(attempts * 4 < polled, "{attempts} attempts for {polled} batches: no backoff");
    assert!(stats.points_dropped.get() > 0, "the points it could not take are counted");
    assert_eq!(stats.calls.get(), 0);
    let (_, page) = updraft_tests::http_get(gw.api_addr.unwrap(), "/metrics").await;
    assert!(page.contains(r#"updraft_plugin_init_failures_total{plugin="alarm"} "#), "{page}");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A stateful plugin (energy-shift: kWh from kW by the trapezoid rule) keeps an exact running
/// total across `kill -9` of the gateway in the middle of a stream: with a constant 3,600 kW (one
/// kWh per second), the total after the restart is the total before plus exactly the time between
/// the two readings; a lost state would start over, a point counted twice would add more.
#[tokio::test(flavor = "multi_thread")]
async fn a_stateful_plugin_total_is_exact_across_kill_9() {
    use updraft_tests::cloud::{free_port, GatewayProcess};
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[3600]);
    let addr = fixture.serve().await;
    let dir = updraft_tests::TempDir::new("state-kill9");
    let (api_port, broker) = (free_port(), free_port());
    let path = dir.path().join("updraft.toml");
    std::fs::write(
        &path,
        format!(
            r#"[gateway]
id = "gw-state"
data_dir = "data"

[broker]
listen = "127.0.0.1:{broker}"

[api]
listen = "127.0.0.1:{api_port}"

[devices.press]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [{{ name = "power", area = "holding", address = 0, unit = "kW" }}]

# No subscribe: the plugin's own default, every device's `power`.
[plugins.energy]
wasm = "{wasm}"
config = {{ shift = "1000h", max_gap = "5m" }}
[plugins.energy.outputs]
default = "updraft/derived/{{device}}/{{tag}}"
shifts = "updraft/shifts/{{device}}/{{tag}}"
"#,
            wasm = plugin_wasm("energy_shift").display(),
        ),
    )
    .unwrap();
    let api: std::net::SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let total = || async {
        // The API is down while the gateway restarts.
        std::net::TcpStream::connect(api).ok()?;
        let (_, body) = updraft_tests::http_get(api, "/api/v1/values").await;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let p = &v["derived"]["press"]["power_kwh"];
        Some((p["value"].as_f64()?, p["ts"].as_i64()?))
    };
    let read_after = |after_ts: i64| async move {
        for _ in 0..300 {
            if let Some((v, ts)) = total().await {
                if ts > after_ts {
                    return (v, ts);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no total stamped after {after_ts}");
    };

    let gw = GatewayProcess::start(&path);
    eventually(WAIT, || std::net::TcpStream::connect(api).ok()).await.expect("the API listens");
    let (first, t0) = read_after(0).await;
    let (before, t1) = read_after(t0 + 1500).await;
    assert!(
        (before - first - (t1 - t0) as f64 / 1000.0).abs() < 1e-6,
        "one kWh per second: {first}@{t0} → {before}@{t1}"
    );
    gw.kill9();
    // Down for a second: the gap is bridged (shorter than max_gap), as the energy really flowed.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let restarted = updraft::base::point::now_ms();
    let gw = GatewayProcess::start(&path);
    let (after, t2) = read_after(restarted).await;
    println!("{before} kWh at {t1}, killed, {after} kWh at {t2}");
    let expected = before + (t2 - t1) as f64 / 1000.0;
    assert!(
        (after - expected).abs() < 1e-6,
        "the total carried over exactly: {after} kWh at {t2}, expected {expected} ({before} kWh at {t1} plus the time between)"
    );
    gw.stop();
}
