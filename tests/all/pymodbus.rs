//! Interop with pymodbus as an independent Modbus TCP server: values encoded by pymodbus's own
//! `convert_to_registers` in every type and byte order must come out of Updraft unchanged.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::QoS;
use serde_json::{json, Value};
use updraft_tests::{header, python, start_gateway, test_file, Subscriber};

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_pymodbus(spec: &Value) -> (Peer, u16) {
    start_pymodbus_framed(spec, "tcp")
}

/// A pymodbus server with `framer` "tcp" (Modbus TCP) or "rtu" (RTU frames over TCP).
fn start_pymodbus_framed(spec: &Value, framer: &str) -> (Peer, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(python())
        .arg(test_file("peers/pymodbus_server.py"))
        .arg(port.to_string())
        .arg(spec.to_string())
        .arg(framer)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim() == "READY" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("pymodbus server is ready");
    (Peer(child), port)
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
