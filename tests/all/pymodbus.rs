//! Interop with pymodbus as an independent Modbus server: values encoded by pymodbus's own
//! `convert_to_registers` in every type and byte order must come out of Updraft unchanged, over
//! Modbus TCP, RTU over TCP and RTU on a (virtual) serial line shared by several slaves.

use std::process::Command;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::{json, Value};
use updraft_tests::{header, start_gateway, PythonPeer, SerialPair, Subscriber, TempDir};

/// A running pymodbus server and what it printed (`CONNECT`, `RX UNIT SECONDS`).
struct Peer(PythonPeer);

impl Peer {
    fn connects(&self) -> usize {
        self.0.lines().iter().filter(|l| *l == "CONNECT").count()
    }

    /// When the server received each request to `unit`, in seconds of a monotonic clock.
    fn requests(&self, unit: u8) -> Vec<f64> {
        let prefix = format!("RX {unit} ");
        self.0.lines().iter().filter_map(|l| l.strip_prefix(&prefix)?.parse().ok()).collect()
    }
}

fn start_pymodbus(spec: &Value) -> (Peer, u16) {
    start_pymodbus_framed(spec, "tcp")
}

/// A pymodbus server with `mode` "tcp" (Modbus TCP), "rtu" (RTU frames over TCP) or
/// "serial:DEVICE:BAUD" (RTU on a serial port).
fn start_pymodbus_framed(spec: &Value, mode: &str) -> (Peer, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let peer = PythonPeer::start("pymodbus_server.py", &[&port.to_string(), &spec.to_string(), mode]);
    (Peer(peer), port)
}

/// Intervals between successive times, in milliseconds: (mean, standard deviation, max).
fn interval_stats(times: &[f64]) -> (f64, f64, f64) {
    let gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]) * 1000.0).collect();
    let n = gaps.len().max(1) as f64;
    let mean = gaps.iter().sum::<f64>() / n;
    let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n).sqrt();
    (mean, sd, gaps.iter().copied().fold(0.0, f64::max))
}

#[tokio::test(flavor = "multi_thread")]
async fn values_from_a_pymodbus_server_decode_exactly() {
    // (tag, type, order, value); each gets its own slot of 4 registers.
    let cases: Vec<(&str, &str, &str, Value)> = vec![
        ("u16", "u16", "ABCD", json!(65535)),
        ("i16", "i16", "ABCD", json!(-32768)),
        ("u32-abcd", "u32", "ABCD", json!(4000000000u64)),
        ("u32-cdab", "u32", "CDAB", json!(4000000000u64)),
        ("i32-badc", "i32", "BADC", json!(-123456789)),
        ("i32-dcba", "i32", "DCBA", json!(-123456789)),
        ("f32-abcd", "f32", "ABCD", json!(-273.15)),
        ("f32-cdab", "f32", "CDAB", json!(3.25)),
        ("f32-badc", "f32", "BADC", json!(1013.25)),
        ("f32-dcba", "f32", "DCBA", json!(0.1)),
        ("u64-abcd", "u64", "ABCDEFGH", json!(18446744073709551000u64)),
        ("u64-cdab", "u64", "GHEFCDAB", json!(1234567890123456789u64)),
        ("i64-badc", "i64", "BADCFEHG", json!(-9876543210i64)),
        ("i64-dcba", "i64", "HGFEDCBA", json!(-1i64)),
        ("f64-abcd", "f64", "ABCD", json!(std::f64::consts::PI)),
        ("f64-cdab", "f64", "CDAB", json!(-2.5e-10)),
        ("f64-badc", "f64", "BADC", json!(6.02214076e23)),
        ("f64-dcba", "f64", "DCBA", json!(1e300)),
    ];
    let registers: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, ty, order, value))| json!({"area": "holding", "address": i * 4, "type": ty, "order": order, "value": value}))
        .chain([json!({"area": "input", "address": 10, "type": "i16", "order": "ABCD", "value": -5})])
        .chain([json!({"area": "holding", "address": 100, "type": "string", "order": "ABCD", "value": "PUMP-A7"})])
        .collect();
    let spec = json!({
        "registers": registers,
        "bits": [{"area": "coil", "address": 3, "value": true}, {"area": "discrete", "address": 9, "value": true}],
    });
    let (_peer, port) = start_pymodbus(&spec);

    let mut tags = String::new();
    for (i, (name, ty, order, _)) in cases.iter().enumerate() {
        tags += &format!(
            "  {{ name = \"{name}\", area = \"holding\", address = {}, type = \"{ty}\", order = \"{order}\" }},\n",
            i * 4
        );
    }
    tags += "  { name = \"in-i16\", area = \"input\", address = 10, type = \"i16\" },\n";
    tags += "  { name = \"text\", area = \"holding\", address = 100, type = \"string\", length = 4 },\n";
    tags += "  { name = \"coil-3\", area = \"coil\", address = 3 },\n";
    tags += "  { name = \"coil-2\", area = \"coil\", address = 2 },\n";
    tags += "  { name = \"di-9\", area = \"discrete\", address = 9 },\n";
    let toml = format!(
        "{}[devices.py]\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:{port}\"\nunit_id = 1\npoll = \"200ms\"\ntimeout = \"1s\"\ntags = [\n{tags}]\n",
        header("gw-pymodbus")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/py/#", QoS::AtMostOnce).await;

    let mut expected: Vec<(String, Value)> = cases.into_iter().map(|(n, _, _, v)| (n.to_owned(), v)).collect();
    expected.extend([
        ("in-i16".to_owned(), json!(-5)),
        ("text".to_owned(), json!("PUMP-A7")),
        ("coil-3".to_owned(), json!(true)),
        ("coil-2".to_owned(), json!(false)),
        ("di-9".to_owned(), json!(true)),
    ]);
    for (tag, value) in expected {
        let topic = format!("updraft/py/{tag}");
        let got = sub.wait_for(&topic, Duration::from_secs(15), |v| v["quality"] == "good").await;
        let got = got.unwrap_or_else(|| panic!("no good value on {topic}"));
        assert_eq!(got["value"], value, "{topic}");
    }
    gw.shutdown(Duration::from_secs(2)).await;
}

/// `updraft modbus read` against pymodbus: with `--type` the value itself; without, every
/// interpretation side by side, the right one among them. `updraft modbus write` changes it.
#[test]
fn the_commissioning_cli_reads_and_writes_a_pymodbus_device() {
    let spec = json!({"registers": [
        {"area": "holding", "address": 0, "type": "f32", "order": "CDAB", "value": 3.25},
        {"area": "holding", "address": 4, "type": "u16", "order": "ABCD", "value": 65535},
    ]});
    let (_peer, port) = start_pymodbus(&spec);
    let updraft = |args: &[&str]| {
        let out = Command::new(updraft_tests::cloud::updraft_bin())
            .args(["modbus", args[0], "--address", &format!("127.0.0.1:{port}")])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let typed = updraft(&["read", "--start", "0", "--count", "1", "--type", "f32", "--order", "CDAB"]);
    assert!(typed.trim_end().ends_with("3.25"), "{typed}");
    let table = updraft(&["read", "--start", "0", "--count", "6"]);
    println!("{table}");
    let header = table.lines().next().unwrap();
    let row0 = table.lines().nth(1).unwrap();
    assert!(header.contains("f32 CDAB") && row0.contains("3.25"), "the CDAB column of row 0 shows 3.25:\n{table}");
    assert!(table.lines().nth(5).unwrap().contains("65535"), "{table}");
    assert!(updraft(&["write", "--start", "10", "--type", "i16", "--", "-5"]).contains("wrote"));
    let back = updraft(&["read", "--start", "10", "--count", "1", "--type", "i16"]);
    assert!(back.trim_end().ends_with("-5"), "{back}");
}

/// RTU frames over TCP (a serial device server in transparent mode), against pymodbus's own RTU
/// framer: values read, and a write goes through.
#[tokio::test(flavor = "multi_thread")]
async fn rtu_over_tcp_against_pymodbus() {
    let spec = json!({"registers": [
        {"area": "holding", "address": 0, "type": "f32", "order": "CDAB", "value": 3.25},
        {"area": "holding", "address": 2, "type": "i16", "order": "ABCD", "value": -7},
    ], "bits": [{"area": "coil", "address": 1, "value": true}]});
    let (_peer, port) = start_pymodbus_framed(&spec, "rtu");
    let toml = format!(
        "{}[devices.rtu]\ndriver = \"modbus-rtu-tcp\"\naddress = \"127.0.0.1:{port}\"\npoll = \"200ms\"\ntags = [\n\
         {{ name = \"f\", area = \"holding\", address = 0, type = \"f32\", order = \"CDAB\" }},\n\
         {{ name = \"i\", area = \"holding\", address = 2, type = \"i16\", access = \"rw\" }},\n\
         {{ name = \"c\", area = \"coil\", address = 1 }},\n]\n",
        header("gw-rtu-tcp")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/rtu/#", QoS::AtMostOnce).await;
    for (tag, want) in [("f", json!(3.25)), ("i", json!(-7)), ("c", json!(true))] {
        let v = sub.wait_for(&format!("updraft/rtu/{tag}"), Duration::from_secs(15), |v| v["quality"] == "good").await;
        assert_eq!(v.unwrap_or_else(|| panic!("no good {tag}"))["value"], want, "{tag}");
    }
    sub.client.publish("updraft/rtu/i/set", QoS::AtLeastOnce, false, "12").await.unwrap();
    let r = sub.wait_for("updraft/rtu/i/set/reply", Duration::from_secs(10), |_| true).await.expect("reply");
    assert_eq!(r["ok"], true, "{r}");
    let v = sub.wait_for("updraft/rtu/i", Duration::from_secs(10), |v| v["value"] == 12).await;
    assert!(v.is_some(), "the written value reads back");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Two slaves on one RS-485 line (a socat pty pair; pymodbus's serial RTU server as the slaves),
/// one of them silent. The live slave is read and written through the gateway from TOML, and its
/// polls keep their schedule: the silent one costs the line only its own timeouts, and is polled
/// less and less while it stays silent.
#[tokio::test(flavor = "multi_thread")]
async fn a_serial_line_shared_by_a_live_and_a_silent_slave() {
    let dir = TempDir::new("rtu-line");
    let line = SerialPair::new(dir.path());
    let spec = json!({"units": {"1": {"registers": [
        {"area": "holding", "address": 0, "type": "f32", "order": "CDAB", "value": 21.5},
        {"area": "holding", "address": 2, "type": "i16", "order": "ABCD", "value": -3},
    ]}}, "silent": [2]});
    let (peer, _) = start_pymodbus_framed(&spec, &format!("serial:{}:115200", line.dev));
    let toml = format!(
        "{}[devices.live]\ndriver = \"modbus-rtu\"\nport = \"{port}\"\nbaud = 115200\nunit_id = 1\npoll = \"100ms\"\ntimeout = \"500ms\"\ntags = [\n\
         {{ name = \"temp\", area = \"holding\", address = 0, type = \"f32\", order = \"CDAB\" }},\n\
         {{ name = \"sp\", area = \"holding\", address = 2, type = \"i16\", access = \"rw\" }},\n]\n\n\
         [devices.dead]\ndriver = \"modbus-rtu\"\nport = \"{port}\"\nbaud = 115200\nunit_id = 2\npoll = \"100ms\"\ntimeout = \"300ms\"\n\
         tags = [{{ name = \"x\", area = \"holding\", address = 0 }}]\n",
        header("gw-rtu-line"),
        port = line.gw
    );
    let (gw, _cfg) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let v = sub.wait_for("updraft/live/temp", Duration::from_secs(15), |v| v["quality"] == "good").await;
    assert_eq!(v.expect("the live slave is read")["value"], 21.5);
    let d = sub.wait_for("updraft/dead/x", Duration::from_secs(15), |v| v["quality"] == "bad").await;
    assert!(d.expect("the silent slave goes bad")["error"].as_str().unwrap().contains("timeout"));

    // A write to the live slave goes through while the silent one times out beside it.
    sub.client.publish("updraft/live/sp/set", QoS::AtLeastOnce, false, "42").await.unwrap();
    let r = sub.wait_for("updraft/live/sp/set/reply", Duration::from_secs(10), |_| true).await.expect("reply");
    assert_eq!(r["ok"], true, "{r}");
    assert!(sub.wait_for("updraft/live/sp", Duration::from_secs(10), |v| v["value"] == 42).await.is_some());

    // The schedule the live slave saw, over a few seconds, from the slave's side of the line.
    let start = peer.requests(1).len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let live = peer.requests(1)[start..].to_vec();
    let silent = peer.requests(2);
    let (mean, sd, max) = interval_stats(&live);
    println!(
        "live slave: {} polls in 4 s (100 ms schedule), interval mean {mean:.1} ms, sd {sd:.1} ms, max {max:.1} ms; \
         silent slave asked {} times in all",
        live.len(),
        silent.len()
    );
    assert!(live.len() >= 16, "the live slave kept being polled: {} polls in 4 s", live.len());
    assert!(silent.len() < 20, "the silent slave is polled less while it stays silent ({} requests)", silent.len());
    gw.shutdown(Duration::from_secs(2)).await;

    // The commissioning CLI reads the same slave over the same line once the gateway let it go.
    let out = Command::new(updraft_tests::cloud::updraft_bin())
        .args(["modbus", "read", "--port", &line.gw, "--baud", "115200", "--start", "0", "--count", "1"])
        .args(["--type", "f32", "--order", "CDAB"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim_end().ends_with("21.5"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Several unit ids behind one Modbus TCP gateway, and behind one serial device server (RTU over
/// TCP), share one connection each: every slave is read, a silent one times out alone, and the
/// server sees one connection.
#[tokio::test(flavor = "multi_thread")]
async fn several_units_behind_one_address_share_one_connection() {
    for (mode, driver) in [("tcp", "modbus-tcp"), ("rtu", "modbus-rtu-tcp")] {
        let unit = |v: i64| json!({"registers": [{"area": "holding", "address": 0, "type": "i16", "order": "ABCD", "value": v}]});
        let spec = json!({"units": {"1": unit(11), "2": unit(22)}, "silent": [3]});
        let (peer, port) = start_pymodbus_framed(&spec, mode);
        let mut toml = header(&format!("gw-units-{mode}"));
        for u in 1..=3 {
            toml += &format!(
                "[devices.u{u}]\ndriver = \"{driver}\"\naddress = \"127.0.0.1:{port}\"\nunit_id = {u}\npoll = \"100ms\"\n\
                 timeout = \"300ms\"\ntags = [{{ name = \"v\", area = \"holding\", address = 0, type = \"i16\" }}]\n\n"
            );
        }
        let (gw, _dir) = start_gateway(&toml).await;
        let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
        for (u, want) in [(1, 11), (2, 22)] {
            let v = sub.wait_for(&format!("updraft/u{u}/v"), Duration::from_secs(15), |v| v["quality"] == "good").await;
            assert_eq!(v.unwrap_or_else(|| panic!("{mode}: unit {u} is read"))["value"], want, "{mode}");
        }
        let d = sub.wait_for("updraft/u3/v", Duration::from_secs(15), |v| v["quality"] == "bad").await;
        assert!(d.expect("the silent unit goes bad")["error"].as_str().unwrap().contains("timeout"), "{mode}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let good = sub.wait_for("updraft/u1/v", Duration::from_secs(5), |v| v["quality"] == "good").await;
        assert!(good.is_some(), "{mode}: unit 1 still answers after unit 3's timeouts");
        let connects: u64 = (1..=3).map(|u| gw.metrics.device(&format!("u{u}")).connects.get()).sum();
        assert_eq!(peer.connects(), 1, "{mode}: the server saw one connection");
        assert_eq!(connects, 1, "{mode}: the gateway opened one connection");
        gw.shutdown(Duration::from_secs(2)).await;
    }
}
