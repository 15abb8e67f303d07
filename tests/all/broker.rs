//! The embedded broker as the park's local bus: late subscribers, local publishers, start-up errors.

use std::time::Duration;

use rumqttc::QoS;
use updraft_tests::{eventually, header, http_get, start_gateway, ModbusFixture, Subscriber};

/// A late subscriber to `updraft/#` gets the retained value of every tag, at QoS 0 and at QoS 1
/// (rumqttd 0.20 sent only what fitted its outgoing budget or in-flight window: 100 at QoS 1).
/// The retained values come from the gateway's current values, not from points pushed through the
/// broker: until someone subscribes, the broker is handed nothing.
#[tokio::test(flavor = "multi_thread")]
async fn late_subscribers_get_every_current_value() {
    const DEVICES: usize = 20;
    const TAGS: usize = 100;
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &(0..TAGS as u16).collect::<Vec<_>>());
    let addr = fixture.serve().await;
    let mut toml = header("gw-late-sub");
    for d in 0..DEVICES {
        toml += &format!("[devices.dev-{d}]\ndriver = \"modbus-tcp\"\naddress = \"{addr}\"\npoll = \"1s\"\ntags = [\n");
        for t in 0..TAGS {
            toml += &format!("  {{ name = \"t{t}\", area = \"holding\", address = {t} }},\n");
        }
        toml += "]\n\n";
    }
    let (gw, _dir) = start_gateway(&toml).await;
    let total = DEVICES * TAGS;
    eventually(Duration::from_secs(15), || {
        (gw.values.snapshot(None).values().map(|t| t.len()).sum::<usize>() == total).then_some(())
    })
    .await
    .expect("every tag read once");
    assert_eq!(gw.metrics.broker_published.get(), 0, "nothing is pushed through the broker while nobody subscribes");

    let mut qos0 = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let got0 = qos0.collect_retained(Duration::from_millis(1500)).await;
    let mut qos1 = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtLeastOnce).await;
    let got1 = qos1.collect_retained(Duration::from_millis(1500)).await;
    println!("late subscriber retained messages: QoS 0 {} of {total}, QoS 1 {} of {total}", got0.len(), got1.len());
    assert_eq!(got0.len(), total, "a late QoS 0 subscriber gets every retained value");
    assert_eq!(got1.len(), total, "a late QoS 1 subscriber gets every retained value");
    // Now that someone subscribes, new readings are published live.
    let live = qos0.wait_for("updraft/dev-5/t7", Duration::from_secs(5), |_| true).await;
    assert_eq!(live.expect("a live reading after the retained one")["value"], 7);
    assert!(gw.metrics.broker_published.get() > 0);

    let (status, body) = http_get(gw.api_addr.unwrap(), "/api/v1/values").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let count: usize = v["devices"].as_object().unwrap().values().map(|tags| tags.as_object().unwrap().len()).sum();
    assert_eq!(count, total, "the API returns every current value");
    assert_eq!(v["devices"]["dev-3"]["t42"]["value"], 42);
    assert_eq!(v["devices"]["dev-3"]["t42"]["quality"], "good");

    let (status, body) = http_get(gw.api_addr.unwrap(), "/api/v1/values/dev-7").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"t99\""), "{body}");
    let (status, _) = http_get(gw.api_addr.unwrap(), "/api/v1/values/nope").await;
    assert_eq!(status, 404);
    let (status, metrics) = http_get(gw.api_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("updraft_polls_total{device=\"dev-0\"}"), "{metrics}");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Local devices and applications use the embedded broker as the park's bus.
#[tokio::test(flavor = "multi_thread")]
async fn local_clients_talk_through_the_embedded_broker() {
    let (gw, _dir) = start_gateway(&header("gw-bus")).await;
    let broker = gw.broker_addr.unwrap();
    let mut hmi = Subscriber::connect(broker, "factory/+/alarm", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sensor = Subscriber::connect(broker, "unused/#", QoS::AtMostOnce).await;
    sensor.client.publish("factory/line-2/alarm", QoS::AtLeastOnce, false, r#"{"code":17}"#).await.unwrap();
    let got = hmi.wait_for("factory/line-2/alarm", Duration::from_secs(5), |_| true).await;
    assert_eq!(got.expect("message crosses the broker")["code"], 17);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_broker_port_fails_start_up_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = updraft_tests::TempDir::new("taken");
    let path = dir.path().join("u.toml");
    std::fs::write(
        &path,
        format!("[gateway]\nid = \"gw\"\n[broker]\nlisten = \"127.0.0.1:{port}\"\n[api]\nenabled = false\n"),
    )
    .unwrap();
    let config = updraft::config::load(&path).unwrap();
    let err = updraft::runtime::start(config).await.err().expect("start-up fails");
    let msg = err.to_string();
    assert!(msg.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("[broker] listen"), "{msg}");
}
