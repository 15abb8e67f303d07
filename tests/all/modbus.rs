//! Modbus TCP end to end: a tokio-modbus server fixture → the gateway → an MQTT client on the
//! embedded broker, including faults (exceptions, timeouts, dead devices).

use std::time::Duration;

use rumqttc::QoS;
use serde_json::{json, Value};
use tokio_modbus::ExceptionCode;
use updraft_tests::{eventually, header, start_gateway, Faults, ModbusFixture, Subscriber};

const WAIT: Duration = Duration::from_secs(10);

/// Register images a device would hold for known values, written out by hand (the big-endian
/// images of 123456789, -2, 1.5, 0x0102030405060708, -3 and -1.5), independent of the gateway's
/// encoder.
/// (tag, address, type, order, registers on the wire, expected JSON value)
type Golden = (&'static str, u16, &'static str, &'static str, Vec<u16>, Value);

fn golden() -> Vec<Golden> {
    vec![
        ("u16", 0, "u16", "ABCD", vec![40000], json!(40000)),
        ("i16", 1, "i16", "ABCD", vec![0xFB2E], json!(-1234)),
        ("u32-abcd", 2, "u32", "ABCD", vec![0x075B, 0xCD15], json!(123456789)),
        ("u32-cdab", 4, "u32", "CDAB", vec![0xCD15, 0x075B], json!(123456789)),
        ("i32-badc", 6, "i32", "BADC", vec![0xFFFF, 0xFEFF], json!(-2)),
        ("i32-dcba", 8, "i32", "DCBA", vec![0xFEFF, 0xFFFF], json!(-2)),
        ("f32-abcd", 10, "f32", "ABCD", vec![0x3FC0, 0], json!(1.5)),
        ("f32-cdab", 12, "f32", "CDAB", vec![0, 0x3FC0], json!(1.5)),
        ("f32-badc", 14, "f32", "BADC", vec![0xC03F, 0], json!(1.5)),
        ("f32-dcba", 16, "f32", "DCBA", vec![0, 0xC03F], json!(1.5)),
        ("u64-abcd", 20, "u64", "ABCD", vec![0x0102, 0x0304, 0x0506, 0x0708], json!(72623859790382856u64)),
        ("u64-hgfedcba", 24, "u64", "HGFEDCBA", vec![0x0807, 0x0605, 0x0403, 0x0201], json!(72623859790382856u64)),
        ("i64-ghefcdab", 28, "i64", "GHEFCDAB", vec![0xFFFD, 0xFFFF, 0xFFFF, 0xFFFF], json!(-3)),
        ("i64-badcfehg", 32, "i64", "BADCFEHG", vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFDFF], json!(-3)),
        ("f64-abcd", 40, "f64", "ABCD", vec![0xBFF8, 0, 0, 0], json!(-1.5)),
        ("f64-dcba", 44, "f64", "DCBA", vec![0, 0, 0, 0xF8BF], json!(-1.5)),
        ("f64-cdab", 48, "f64", "CDAB", vec![0, 0, 0, 0xBFF8], json!(-1.5)),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_and_order_arrives_on_the_local_broker() {
    let fixture = ModbusFixture::default();
    let mut tags = String::new();
    for (name, address, ty, order, words, _) in golden() {
        fixture.set_holding(address, &words);
        tags += &format!("  {{ name = \"{name}\", area = \"holding\", address = {address}, type = \"{ty}\", order = \"{order}\" }},\n");
    }
    fixture.set_holding(60, &[1]);
    fixture.set_input(0, &[215, 100]);
    fixture.set_coil(0, true);
    fixture.set_discrete(5, true);
    tags += "  { name = \"reg-bool\", area = \"holding\", address = 60, type = \"bool\" },\n";
    tags +=
        "  { name = \"temperature\", area = \"input\", address = 0, type = \"u16\", scale = 0.1, unit = \"°C\" },\n";
    tags += "  { name = \"offset\", area = \"input\", address = 1, type = \"i16\", scale = 0.5, offset = -40.0 },\n";
    tags += "  { name = \"running\", area = \"coil\", address = 0, type = \"bool\" },\n";
    tags += "  { name = \"stopped\", area = \"coil\", address = 1 },\n";
    tags += "  { name = \"door\", area = \"discrete\", address = 5 },\n";
    let addr = fixture.serve().await;
    let toml = format!(
        "{}[devices.boiler-1]\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\nunit_id = 1\npoll = \"200ms\"\ntimeout = \"500ms\"\ntags = [\n{tags}]\n",
        header("gw-types")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;

    let mut expected: Vec<(String, Value)> = golden().into_iter().map(|(n, .., v)| (n.to_owned(), v)).collect();
    expected.push(("reg-bool".into(), json!(true)));
    expected.push(("temperature".into(), json!(21.5)));
    expected.push(("offset".into(), json!(10.0)));
    expected.push(("running".into(), json!(true)));
    expected.push(("stopped".into(), json!(false)));
    expected.push(("door".into(), json!(true)));
    for (tag, value) in expected {
        let topic = format!("updraft/boiler-1/{tag}");
        let got = sub.wait_for(&topic, WAIT, |_| true).await.unwrap_or_else(|| panic!("no message on {topic}"));
        assert_eq!(got["value"], value, "{topic}: {got}");
        assert_eq!(got["quality"], "good", "{topic}: {got}");
        let ts = got["ts"].as_i64().expect("ts is an integer");
        let now = updraft::base::point::now_ms();
        assert!((now - 60_000..=now).contains(&ts), "ts {ts} is Unix milliseconds of the read");
    }

    // The planner merged the whole device into four requests per poll: one per area.
    let reads = fixture.reads();
    let first_poll: Vec<_> = reads.iter().take(4).cloned().collect();
    assert_eq!(
        first_poll,
        vec![("coil", 0, 2), ("discrete", 5, 1), ("input", 0, 2), ("holding", 0, 61)],
        "all reads: {reads:?}"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exception_marks_only_its_points_bad_and_merged_reads_split() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[11, 0, 13]);
    // Address 1 lies in the gap between two tags: the merged read 0..3 draws an exception.
    fixture.set_faults(Faults {
        exception_at: [(1, ExceptionCode::IllegalDataAddress), (7, ExceptionCode::ServerDeviceFailure)].into(),
        ..Faults::default()
    });
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.press]
driver = "modbus-tcp"
address = "{addr}"
poll = "200ms"
max_read_gap = 2
tags = [
  {{ name = "a", area = "holding", address = 0 }},
  {{ name = "c", area = "holding", address = 2 }},
  {{ name = "broken", area = "holding", address = 7 }},
]
"#,
        header("gw-exc")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let a =
        sub.wait_for("updraft/press/a", WAIT, |v| v["quality"] == "good").await.expect("a recovers after the split");
    assert_eq!(a["value"], 11);
    let c = sub.wait_for("updraft/press/c", WAIT, |v| v["quality"] == "good").await.expect("c is good");
    assert_eq!(c["value"], 13);
    let broken = sub.wait_for("updraft/press/broken", WAIT, |_| true).await.expect("broken is published");
    assert_eq!(broken["quality"], "bad");
    assert_eq!(broken["value"], Value::Null);
    assert!(broken["error"].as_str().unwrap().contains("exception"), "{broken}");
    // After the split the device is read per tag: no more reads that cover the gap.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reads = fixture.reads();
    let last: Vec<_> = reads.iter().rev().take(3).collect();
    assert!(last.iter().all(|(_, _, n)| *n == 1), "reads after split: {reads:?}");
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_device_times_out_without_stalling_the_others() {
    let slow = ModbusFixture::default();
    slow.set_holding(0, &[1]);
    slow.set_faults(Faults { delay: Some(Duration::from_secs(3)), ..Faults::default() });
    let healthy = ModbusFixture::default();
    healthy.set_holding(0, &[42]);
    let (slow_addr, healthy_addr) = (slow.serve().await, healthy.serve().await);
    // A port nothing listens on: bind, note the port, close.
    let dead_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let toml = format!(
        "{h}[devices.slow]\ndriver = \"modbus-tcp\"\naddress = \"{slow_addr}\"\npoll = \"200ms\"\ntimeout = \"300ms\"\ntags = [{{ name = \"x\", area = \"holding\", address = 0 }}]\n\n\
         [devices.dead]\ndriver = \"modbus-tcp\"\naddress = \"{dead_addr}\"\npoll = \"200ms\"\ntimeout = \"300ms\"\ntags = [{{ name = \"x\", area = \"holding\", address = 0 }}]\n\n\
         [devices.healthy]\ndriver = \"modbus-tcp\"\naddress = \"{healthy_addr}\"\npoll = \"100ms\"\ntags = [{{ name = \"x\", area = \"holding\", address = 0 }}]\n",
        h = header("gw-iso")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let s = sub.wait_for("updraft/slow/x", WAIT, |v| v["quality"] == "bad").await.expect("slow goes bad");
    assert!(s["error"].as_str().unwrap().contains("timeout"), "{s}");
    let d = sub.wait_for("updraft/dead/x", WAIT, |v| v["quality"] == "bad").await.expect("dead goes bad");
    assert!(d["error"].as_str().unwrap().contains("connect failed"), "{d}");

    // Meanwhile the healthy device keeps delivering fresh readings.
    let before = gw.metrics.device("healthy").points_good.get();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = gw.metrics.device("healthy").points_good.get();
    assert!(after >= before + 5, "healthy device kept polling: {before} -> {after}");
    assert_eq!(sub.wait_for("updraft/healthy/x", WAIT, |_| true).await.unwrap()["value"], 42);

    // The slow device recovers once it answers in time again.
    slow.set_faults(Faults::default());
    let s = sub.wait_for("updraft/slow/x", Duration::from_secs(15), |v| v["quality"] == "good").await;
    assert_eq!(s.expect("slow device recovers")["value"], 1);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_comes_up_later_is_reconnected() {
    // Reserve a port, start the gateway against it while nothing listens, then start the device.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let toml = format!(
        "{}[devices.late]\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"100ms\"\ntimeout = \"200ms\"\ntags = [{{ name = \"x\", area = \"holding\", address = 3 }}]\n",
        header("gw-late")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let stats = gw.metrics.device("late");
    eventually(WAIT, || (stats.connect_failures.get() >= 1).then_some(())).await.expect("first connect fails");

    let fixture = ModbusFixture::default();
    fixture.set_holding(3, &[7]);
    // Serve on exactly that port so the gateway's configured address now answers.
    assert_eq!(fixture.serve_at(addr).await, addr);
    let p = eventually(Duration::from_secs(15), || gw.values.get("late", "x").filter(|p| p.value.is_some())).await;
    assert_eq!(p.expect("reconnected after backoff").value.unwrap().as_f64(), 7.0);
    assert!(stats.connects.get() >= 1);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_within_the_grace_period() {
    let fixture = ModbusFixture::default();
    let addr = fixture.serve().await;
    let toml = format!(
        "{}[devices.d]\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"50ms\"\ntags = [{{ name = \"x\", area = \"holding\", address = 0 }}]\n",
        header("gw-stop")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let stats = gw.metrics.device("d");
    eventually(WAIT, || (stats.polls.get() > 3).then_some(())).await.unwrap();
    let started = std::time::Instant::now();
    gw.shutdown(Duration::from_secs(2)).await;
    let polls = stats.polls.get();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.polls.get(), polls, "no polling after shutdown");
    println!("shutdown took {:?}", started.elapsed());
}

/// Local MQTT clients write to devices through `updraft/{device}/{tag}/set`; only `rw` tags accept.
#[tokio::test(flavor = "multi_thread")]
async fn local_writes_reach_the_device_and_read_only_tags_refuse() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(10, &[750]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.boiler-1]
driver = "modbus-tcp"
address = "{addr}"
poll = "200ms"
tags = [
  {{ name = "setpoint", area = "holding", address = 10, type = "u16", scale = 0.1, access = "rw" }},
  {{ name = "ratio", area = "holding", address = 20, type = "f32", order = "CDAB", access = "rw" }},
  {{ name = "pump", area = "coil", address = 0, access = "rw" }},
  {{ name = "temperature", area = "holding", address = 30 }},
]
"#,
        header("gw-write")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/+/+/set/reply", QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = sub.client.clone();
    let set = |tag: &str, payload: &str| {
        let client = client.clone();
        let topic = format!("updraft/boiler-1/{tag}/set");
        let payload = payload.to_owned();
        async move { client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap() }
    };

    set("setpoint", "80.5").await;
    let r = sub.wait_for("updraft/boiler-1/setpoint/set/reply", WAIT, |_| true).await.expect("reply");
    assert_eq!(r, json!({"ok": true}));
    assert_eq!(fixture.holding(10), Some(805), "80.5 / 0.1 written as a raw register");

    set("ratio", r#"{"value": 1.5}"#).await;
    assert_eq!(sub.wait_for("updraft/boiler-1/ratio/set/reply", WAIT, |_| true).await.unwrap()["ok"], true);
    assert_eq!((fixture.holding(20), fixture.holding(21)), (Some(0), Some(0x3FC0)), "f32 1.5 in CDAB order");

    set("pump", "true").await;
    assert_eq!(sub.wait_for("updraft/boiler-1/pump/set/reply", WAIT, |_| true).await.unwrap()["ok"], true);
    let pump = eventually(WAIT, || {
        gw.values.get("boiler-1", "pump").filter(|p| p.value == Some(updraft::base::point::Value::Bool(true)))
    })
    .await;
    assert!(pump.is_some(), "the written coil reads back as true");

    set("temperature", "20").await;
    let r = sub.wait_for("updraft/boiler-1/temperature/set/reply", WAIT, |_| true).await.unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("read-only"), "{r}");
    assert_eq!(fixture.holding(30), None, "nothing was written");

    set("setpoint", "70000").await;
    let r = sub.wait_for("updraft/boiler-1/setpoint/set/reply", WAIT, |_| true).await.unwrap();
    assert_eq!(r["ok"], false, "700000 does not fit a u16: {r}");
    assert_eq!(fixture.holding(10), Some(805));
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A burst of writes to a device that does not answer costs one timeout, not one per write: the
/// rest are refused at once (backoff, or `busy` when the queue is full), and polling goes on.
/// Integer writes keep every bit.
#[tokio::test(flavor = "multi_thread")]
async fn writes_to_an_unreachable_device_are_bounded_and_integers_exact() {
    // Accepts connections and never answers: every request times out.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let fixture = ModbusFixture::default();
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.dead]
driver = "modbus-tcp"
address = "{hole_addr}"
poll = "100ms"
timeout = "300ms"
tags = [{{ name = "sp", area = "holding", address = 0, access = "rw" }}]

[devices.live]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [
  {{ name = "big", area = "holding", address = 0, type = "u64", access = "rw" }},
  {{ name = "neg", area = "holding", address = 4, type = "i64", access = "rw" }},
  {{ name = "f", area = "holding", address = 8, type = "f32", access = "rw" }},
]
"#,
        header("gw-burst")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/+/+/set/reply", QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    const BURST: usize = 100;
    for i in 0..BURST {
        sub.client.publish("updraft/dead/sp/set", QoS::AtMostOnce, false, format!("{i}")).await.unwrap();
    }
    let mut replies = Vec::new();
    while replies.len() < BURST {
        match sub.wait_for("updraft/dead/sp/set/reply", Duration::from_secs(20), |_| true).await {
            Some(r) => replies.push(r["error"].as_str().unwrap_or_default().to_owned()),
            None => break,
        }
    }
    let tried = replies.iter().filter(|e| e.contains("timeout") || e.contains("link failed")).count();
    let busy = replies.iter().filter(|e| *e == "busy").count();
    println!("{} replies: {tried} went to the wire, {busy} busy, the rest refused during backoff", replies.len());
    assert_eq!(replies.len(), BURST, "every write was answered");
    assert!(tried <= 3, "a burst costs at most a few timeouts, not one per write ({tried})");

    let client = sub.client.clone();
    let set = |tag: &'static str, body: &'static str| {
        let client = client.clone();
        async move { client.publish(format!("updraft/live/{tag}/set"), QoS::AtLeastOnce, false, body).await.unwrap() }
    };
    set("big", "18446744073709551615").await;
    let r = sub.wait_for("updraft/live/big/set/reply", WAIT, |_| true).await.unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!((0..4).map(|a| fixture.holding(a)).collect::<Vec<_>>(), vec![Some(0xFFFF); 4], "u64::MAX exactly");
    set("big", "9007199254740993").await;
    sub.wait_for("updraft/live/big/set/reply", WAIT, |_| true).await.unwrap();
    assert_eq!(
        (0..4).map(|a| fixture.holding(a).unwrap()).collect::<Vec<_>>(),
        vec![0x0020, 0, 0, 1],
        "2^53 + 1 is not rounded by a trip through f64"
    );
    set("neg", "-9223372036854775808").await;
    assert_eq!(sub.wait_for("updraft/live/neg/set/reply", WAIT, |_| true).await.unwrap()["ok"], true);
    assert_eq!(fixture.holding(4), Some(0x8000));
    set("big", "18446744073709551616").await;
    let r = sub.wait_for("updraft/live/big/set/reply", WAIT, |_| true).await.unwrap();
    assert_eq!(r["ok"], false, "2^64 does not fit: refused, not saturated: {r}");
    set("f", "1e39").await;
    let r = sub.wait_for("updraft/live/f/set/reply", WAIT, |_| true).await.unwrap();
    assert_eq!(r["ok"], false, "no infinity is sent to a device: {r}");
    assert_eq!(fixture.holding(8), None);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Report by exception from TOML: a constant register publishes once plus heartbeats; a noisy one
/// only when it moves past its deadband; a tag left at `publish = "always"` publishes every poll.
#[tokio::test(flavor = "multi_thread")]
async fn report_by_exception_publishes_changes_and_heartbeats_only() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[7, 1000, 3]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.d]
driver = "modbus-tcp"
address = "{addr}"
poll = "50ms"
publish = "on-change"
heartbeat = "1s"
tags = [
  {{ name = "constant", area = "holding", address = 0 }},
  {{ name = "noisy", area = "holding", address = 1, scale = 0.1, deadband = 1.0 }},
  {{ name = "every", area = "holding", address = 2, publish = "always" }},
]
"#,
        header("gw-rbe")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/d/+", QoS::AtMostOnce).await;
    sub.wait_for("updraft/d/noisy", WAIT, |v| v["value"] == 100.0).await.expect("first reading");
    let polls = gw.metrics.device("d").polls.get();
    // Noise inside the deadband (100.0 → 100.5 → 100.9), then a step past it (101.5).
    for raw in [1005u16, 1009] {
        fixture.set_holding(1, &[raw]);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    fixture.set_holding(1, &[1015]);
    let msgs = sub.drain(Duration::from_millis(2500), Duration::from_millis(2500)).await;
    let polls = gw.metrics.device("d").polls.get() - polls;
    let of = |tag: &str| -> Vec<Value> {
        msgs.iter()
            .filter(|(t, _)| t == &format!("updraft/d/{tag}"))
            .map(|(_, p)| serde_json::from_slice::<Value>(p).unwrap()["value"].clone())
            .collect()
    };
    println!("{polls} polls: constant {}, noisy {:?}, every {}", of("constant").len(), of("noisy"), of("every").len());
    let constant = of("constant").len() as u64;
    assert!((1..=4).contains(&constant), "a constant value goes out only on heartbeats: {constant} in {polls} polls");
    let noisy = of("noisy");
    assert!(noisy.contains(&json!(101.5)), "the step past the deadband is published: {noisy:?}");
    assert!(!noisy.contains(&json!(100.5)) && !noisy.contains(&json!(100.9)), "noise is not: {noisy:?}");
    assert!(of("every").len() as u64 >= polls / 2, "an \"always\" tag publishes every poll");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Bits of a register as bool tags (read, and written with a masked write that leaves the other
/// bits alone), and register numbers as device manuals print them (`address_base = 1`, `40006`).
#[tokio::test(flavor = "multi_thread")]
async fn register_bits_and_one_based_addresses() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(5, &[0b1010]);
    fixture.set_holding(6, &[77]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.plc]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
address_base = 1
tags = [
  {{ name = "b1", area = "holding", address = 40006, bit = 1 }},
  {{ name = "b2", area = "holding", address = 6, bit = 2, access = "rw" }},
  {{ name = "next", area = "holding", address = 7 }},
]
"#,
        header("gw-bits")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/plc/#", QoS::AtMostOnce).await;
    let got = sub.collect(Duration::from_millis(500), Duration::from_secs(3)).await;
    assert_eq!(got["updraft/plc/b1"]["value"], true, "{got:?}");
    assert_eq!(got["updraft/plc/b2"]["value"], false, "{got:?}");
    assert_eq!(got["updraft/plc/next"]["value"], 77, "register 7 is offset 6");
    sub.client.publish("updraft/plc/b2/set", QoS::AtLeastOnce, false, "true").await.unwrap();
    let r = sub.wait_for("updraft/plc/b2/set/reply", WAIT, |_| true).await.expect("a reply");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(fixture.holding(5), Some(0b1110), "bit 2 set, bits 1 and 3 untouched");
    gw.shutdown(Duration::from_secs(2)).await;

    // 40001-style numbers without address_base = 1 are explained, not misread.
    let bad = toml.replace("address_base = 1\n", "").replace(&addr.to_string(), "127.0.0.1:502");
    let e = updraft::config::parse(&bad, std::path::Path::new("u.toml")).unwrap_err().to_string();
    assert!(e.contains("40006 looks like a register number") && e.contains("address_base = 1"), "{e}");
}

/// Device quirks from TOML: no merged reads, a pause between requests, function 16 only.
#[tokio::test(flavor = "multi_thread")]
async fn device_quirks_shape_the_requests() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[1, 2, 3]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.old]
driver = "modbus-tcp"
address = "{addr}"
poll = "1s"
single_register_reads = true
request_delay = "50ms"
connect_delay = "20ms"
write_function = "multiple"
tags = [
  {{ name = "a", area = "holding", address = 0, access = "rw" }},
  {{ name = "b", area = "holding", address = 1 }},
  {{ name = "c", area = "holding", address = 2 }},
]
"#,
        header("gw-quirks")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    eventually(WAIT, || gw.values.get("old", "c")).await.expect("read");
    let reads = fixture.reads();
    assert_eq!(&reads[..3], &[("holding", 0, 1), ("holding", 1, 1), ("holding", 2, 1)], "one request per tag");
    let t: Vec<_> = [0u16, 1, 2].iter().map(|a| fixture.read_times(*a)[0]).collect();
    assert!(t[1] - t[0] >= Duration::from_millis(50) && t[2] - t[1] >= Duration::from_millis(50), "request_delay kept");
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/old/a/set/reply", QoS::AtMostOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    sub.client.publish("updraft/old/a/set", QoS::AtLeastOnce, false, "9").await.unwrap();
    assert_eq!(sub.wait_for("updraft/old/a/set/reply", WAIT, |_| true).await.unwrap()["ok"], true);
    assert_eq!(fixture.write_functions(), ["multiple"], "one register, written with function 16");
    assert_eq!(fixture.holding(0), Some(9));
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A register map in CSV (`tags_file`, relative to the config), polled like inline tags; its
/// mistakes are reported as CSV FILE:LINE:COLUMN, including the checks that run after loading.
#[tokio::test(flavor = "multi_thread")]
async fn tags_from_a_csv_register_map() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[0x4049, 0x0FDB, 215, 0b100]);
    let addr = fixture.serve().await;
    let dir = updraft_tests::TempDir::new("csv");
    std::fs::write(
        dir.path().join("boiler.csv"),
        "# name, area, address, ...: the tag keys as columns\n\
         name,area,address,type,scale,unit,bit\n\
         pi,holding,0,f32,,,\n\
         temp,holding,2,u16,0.1,°C,\n\
         alarm,holding,3,,,,2\n",
    )
    .unwrap();
    let toml = format!(
        "{}[devices.boiler]\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"100ms\"\ntags_file = \"boiler.csv\"\n",
        header("gw-csv")
    );
    let path = dir.path().join("u.toml");
    std::fs::write(&path, &toml).unwrap();
    let gw = updraft::runtime::start(updraft::config::load(&path).unwrap()).await.unwrap();
    let got = eventually(WAIT, || {
        let v = gw.values.snapshot(Some("boiler"));
        (v.get("boiler").map_or(0, |t| t.len()) == 3).then_some(v)
    })
    .await
    .expect("three tags from the CSV");
    let tags = &got["boiler"];
    assert_eq!(tags["temp"].value, Some(updraft::base::point::Value::Float(21.5)));
    assert_eq!(tags["alarm"].value, Some(updraft::base::point::Value::Bool(true)));
    assert!(
        matches!(tags["pi"].value, Some(updraft::base::point::Value::F32(f)) if (f - std::f32::consts::PI).abs() < 1e-6)
    );
    gw.shutdown(Duration::from_secs(2)).await;

    std::fs::write(
        dir.path().join("boiler.csv"),
        "name,area,address,type\nok,holding,0,u16\nbad,holding,1,float\nok,holding,2,u16\n",
    )
    .unwrap();
    let e = updraft::config::load(&path).unwrap_err().to_string();
    let csv = dir.path().join("boiler.csv").display().to_string();
    assert!(e.contains(&format!("{csv}:3:15:")) && e.contains("float"), "the bad type at its cell:\n{e}");
    assert!(e.contains(&format!("{csv}:4:1:")) && e.contains("duplicate tag name `ok`"), "a check after loading:\n{e}");
}

/// The built-in simulator speaks RTU over TCP too (`kind = "modbus-rtu-tcp"`), so the demo and
/// tests exercise the RTU framing without hardware.
#[tokio::test(flavor = "multi_thread")]
async fn the_rtu_over_tcp_simulator_is_polled_by_the_rtu_over_tcp_driver() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let toml = format!(
        r#"{}[simulators.line]
kind = "modbus-rtu-tcp"
listen = "127.0.0.1:{port}"
registers = [{{ area = "holding", address = 4, type = "u16", wave = "constant", value = 1234 }}]

[devices.meter]
driver = "modbus-rtu-tcp"
address = "127.0.0.1:{port}"
poll = "100ms"
tags = [{{ name = "v", area = "holding", address = 4 }}]
"#,
        header("gw-rtu-sim")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let v = eventually(WAIT, || gw.values.get("meter", "v").filter(|p| p.value.is_some())).await;
    assert_eq!(v.expect("read over RTU framing").value, Some(updraft::base::point::Value::UInt(1234)));
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A string register end to end: read from the device, it reaches the local broker, the HTTP API
/// and the cloud as text; a text command writes it back, NUL-padded, in the tag's byte layout.
#[tokio::test(flavor = "multi_thread")]
async fn a_string_register_reaches_mqtt_the_api_and_the_cloud_and_is_written() {
    let cloud = updraft_tests::cloud::Mosquitto::start().await;
    let mut up = updraft_tests::cloud::CloudClient::connect(cloud.addr, "parks/#").await;
    let fixture = ModbusFixture::default();
    // "PUMP-A7 " and a NUL, high byte first, written out by hand.
    fixture.set_holding(0, &[0x5055, 0x4D50, 0x2D41, 0x3720, 0x0000]);
    let addr = fixture.serve().await;
    let toml = format!(
        r#"{}[devices.press]
driver = "modbus-tcp"
address = "{addr}"
poll = "100ms"
tags = [
  {{ name = "serial", area = "holding", address = 0, type = "string", length = 5 }},
  {{ name = "recipe", area = "holding", address = 10, type = "string", length = 4, order = "BADC", access = "rw" }},
]

[north.cloud]
type = "mqtt"
url = "mqtt://{}"
topic = "parks/{{gateway}}/{{device}}"
batch = {{ max_points = 10, max_wait = "100ms" }}
"#,
        header("gw-text"),
        cloud.addr
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let v = sub.wait_for("updraft/press/serial", WAIT, |v| v["quality"] == "good").await.expect("text on MQTT");
    assert_eq!(v["value"], "PUMP-A7", "trailing space and NUL trimmed");

    let (status, body) = updraft_tests::http_get(gw.api_addr.unwrap(), "/api/v1/values/press").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""value":"PUMP-A7""#), "the API shows the text: {body}");

    let got = up
        .wait_for("parks/gw-text/press", WAIT, |p| {
            updraft_tests::cloud::tag_values(p, "serial").contains(&json!("PUMP-A7"))
        })
        .await;
    assert!(got.is_some(), "the cloud receives the text through the disk buffer");

    sub.client.publish("updraft/press/recipe/set", QoS::AtLeastOnce, false, r#""AB-7""#).await.unwrap();
    let r = sub.wait_for("updraft/press/recipe/set/reply", WAIT, |_| true).await.expect("reply");
    assert_eq!(r["ok"], true, "{r}");
    let regs: Vec<Option<u16>> = (10..14).map(|a| fixture.holding(a)).collect();
    assert_eq!(regs, [Some(0x4241), Some(0x372D), Some(0), Some(0)], "low byte first, NUL-padded");
    assert!(sub.wait_for("updraft/press/recipe", WAIT, |v| v["value"] == "AB-7").await.is_some());

    // Text that does not fit is refused, not cut; a number is not text.
    for bad in [r#""TOO-LONG-NAME""#, "42"] {
        sub.client.publish("updraft/press/recipe/set", QoS::AtLeastOnce, false, bad).await.unwrap();
        let r = sub.wait_for("updraft/press/recipe/set/reply", WAIT, |_| true).await.expect("reply");
        assert_eq!(r["ok"], false, "{bad}: {r}");
    }
    assert_eq!(fixture.holding(10), Some(0x4241), "the refused writes changed nothing");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The built-in simulator on a serial port (`kind = "modbus-rtu"`), polled by the RTU driver over
/// a virtual serial pair: it answers as its own unit and keeps silent for another one.
#[tokio::test(flavor = "multi_thread")]
async fn the_serial_simulator_answers_its_unit_and_keeps_silent_for_others() {
    let dir = updraft_tests::TempDir::new("sim-serial");
    let line = updraft_tests::SerialPair::new(dir.path());
    let toml = format!(
        r#"{h}[simulators.plc]
kind = "modbus-rtu"
port = "{dev}"
baud = 19200
unit_id = 3
registers = [
  {{ area = "holding", address = 0, type = "i16", value = -12 }},
  {{ area = "holding", address = 4, type = "string", length = 3, text = "RTU" }},
]

[devices.plc]
driver = "modbus-rtu"
port = "{gw}"
baud = 19200
unit_id = 3
poll = "100ms"
tags = [
  {{ name = "t", area = "holding", address = 0, type = "i16", access = "rw" }},
  {{ name = "name", area = "holding", address = 4, type = "string", length = 3 }},
]

[devices.other]
driver = "modbus-rtu"
port = "{gw}"
baud = 19200
unit_id = 4
poll = "100ms"
timeout = "200ms"
tags = [{{ name = "t", area = "holding", address = 0 }}]
"#,
        h = header("gw-sim-serial"),
        dev = line.dev,
        gw = line.gw
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let v = sub.wait_for("updraft/plc/t", WAIT, |v| v["quality"] == "good").await.expect("unit 3 answers");
    assert_eq!(v["value"], -12);
    assert_eq!(sub.wait_for("updraft/plc/name", WAIT, |v| v["quality"] == "good").await.unwrap()["value"], "RTU");
    let o = sub.wait_for("updraft/other/t", WAIT, |v| v["quality"] == "bad").await.expect("unit 4 is silent");
    assert!(o["error"].as_str().unwrap().contains("timeout"), "{o}");
    sub.client.publish("updraft/plc/t/set", QoS::AtLeastOnce, false, "7").await.unwrap();
    assert_eq!(sub.wait_for("updraft/plc/t/set/reply", WAIT, |_| true).await.unwrap()["ok"], true);
    assert!(sub.wait_for("updraft/plc/t", WAIT, |v| v["value"] == 7).await.is_some(), "the write reads back");
    gw.shutdown(Duration::from_secs(2)).await;
}
