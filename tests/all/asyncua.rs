//! Interop with asyncua (Python) as an independent OPC-UA server: variables of several types reach
//! the local bus and the cloud through subscriptions with the device's source timestamps, writes
//! land typed by the node, and a server restart (a new process) is survived without any action.

use std::time::Duration;

use rumqttc::QoS;
use serde_json::json;
use updraft_tests::{header, start_gateway, PythonPeer, Subscriber};

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn an_asyncua_server_reaches_the_bus_and_the_cloud_and_survives_its_restart() {
    let port = free_port();
    let mut peer = PythonPeer::start("asyncua_server.py", &[&port.to_string()]);
    let cloud = updraft_tests::cloud::Mosquitto::start().await;
    let mut up = updraft_tests::cloud::CloudClient::connect(cloud.addr, "parks/#").await;
    let toml = format!(
        r#"{}[devices.press]
driver = "opcua"
endpoint = "opc.tcp://127.0.0.1:{port}/"
publishing_interval = "200ms"
timeout = "3s"
tags = [
  {{ name = "temperature", node = "ns=2;s=Plant.Temperature", unit = "°C" }},
  {{ name = "count", node = "ns=2;s=Plant.Count" }},
  {{ name = "running", node = "ns=2;s=Plant.Running" }},
  {{ name = "name", node = "ns=2;s=Plant.Name" }},
  {{ name = "calibrated", node = "ns=2;s=Plant.Calibrated" }},
  {{ name = "setpoint", node = "ns=2;s=Plant.Setpoint", access = "rw" }},
  {{ name = "big", node = "ns=2;s=Plant.Big" }},
]

[north.cloud]
type = "mqtt"
url = "mqtt://{}"
topic = "parks/{{gateway}}/{{device}}"
batch = {{ max_points = 50, max_wait = "100ms" }}
"#,
        header("gw-asyncua"),
        cloud.addr
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/#", QoS::AtMostOnce).await;
    let topics = ["temperature", "count", "running", "name", "calibrated", "setpoint", "big"]
        .map(|t| format!("updraft/press/{t}"));
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let v = sub.latest_good(&topics, WAIT).await;
    assert!(v["updraft/press/temperature"]["value"].as_f64().is_some_and(|t| (20.0..25.0).contains(&t)), "{v:?}");
    assert!(v["updraft/press/count"]["value"].as_i64().is_some(), "{v:?}");
    assert_eq!(v["updraft/press/running"]["value"], true);
    assert_eq!(v["updraft/press/name"]["value"], "PRESS-9");
    assert_eq!(v["updraft/press/calibrated"]["value"], 7.5);
    assert_eq!(v["updraft/press/setpoint"]["value"], 40);
    assert_eq!(v["updraft/press/big"]["value"], json!(9223372036854775809u64), "a UInt64 kept exact");
    // asyncua's source timestamp, set by the "device" years ago, is the point's time.
    assert_eq!(v["updraft/press/calibrated"]["ts"], json!(1714979289000i64), "{}", v["updraft/press/calibrated"]);

    let got = up
        .wait_for("parks/gw-asyncua/press", WAIT, |p| {
            updraft_tests::cloud::tag_values(p, "name").contains(&json!("PRESS-9"))
        })
        .await;
    assert!(got.is_some(), "the cloud receives the values through the disk buffer");

    sub.client.publish("updraft/press/setpoint/set", QoS::AtLeastOnce, false, "55").await.unwrap();
    let r = sub.wait_for("updraft/press/setpoint/set/reply", WAIT, |_| true).await.expect("reply");
    assert_eq!(r["ok"], true, "{r}");
    assert!(peer.printed("WRITE Setpoint 55", WAIT).await, "asyncua saw the write: {:?}", peer.lines());

    // The server loses its subscriptions but keeps the session (OPC Publisher #2055): the data
    // flow stops while "connected", and the watchdog brings it back.
    peer.send("DROP-SUBS");
    assert!(peer.printed("DROPPED 1", WAIT).await, "the peer dropped the gateway's subscription: {:?}", peer.lines());
    let _ = sub.drain(Duration::from_millis(500), Duration::from_secs(2)).await;
    let last = sub.collect(Duration::from_millis(300), Duration::from_secs(1)).await;
    let back = sub.wait_for("updraft/press/count", Duration::from_secs(60), |v| v["quality"] == "good").await;
    assert!(back.is_some(), "the data flow resumes after the server lost the subscription (seen before: {last:?})");
    let (_, metrics) = updraft_tests::http_get(gw.api_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("updraft_resubscribes_total{device=\"press\"} 1"),
        "the watchdog recreated it:\n{metrics}"
    );
    assert!(metrics.contains("updraft_connects_total{device=\"press\"} 1"), "on the same session:\n{metrics}");

    // The server process dies and a new one starts on the same port: data resumes by itself.
    drop(peer);
    let lost = sub.wait_for("updraft/press/count", WAIT, |v| v["quality"] == "bad").await;
    assert!(lost.is_some(), "points turn bad while the server is gone");
    let _peer = PythonPeer::start("asyncua_server.py", &[&port.to_string()]);
    let back = sub.wait_for("updraft/press/count", Duration::from_secs(90), |v| v["quality"] == "good").await;
    assert!(back.is_some(), "data resumes after the restart without any action");
    let first = back.unwrap()["value"].clone();
    assert!(sub.wait_for("updraft/press/count", WAIT, |v| v["value"] != first).await.is_some(), "and keeps coming");
    gw.shutdown(Duration::from_secs(2)).await;
}
