//! MQTT conformance of the embedded broker for what ordinary plant clients do (issue 10): keep
//! alive 0, delivery at min(publish, subscription) QoS, which publishes delete a retained message,
//! the CONNACK a refused login gets, and per-user topic rights. Raw packets where a client library
//! would hide the bytes.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use updraft_tests::{header, mqtt_options, start_gateway, ModbusFixture, TempDir};

const WAIT: Duration = Duration::from_secs(5);

/// An MQTT 3.1.1 CONNECT with a clean session, the given keep alive and optional login.
fn connect_packet(client_id: &str, keep_alive: u16, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    let flags = 0x02 | login.map_or(0, |_| 0x80 | 0x40);
    body.push(flags);
    body.extend(keep_alive.to_be_bytes());
    let mut string = |s: &str| {
        body.extend((s.len() as u16).to_be_bytes());
        body.extend(s.as_bytes());
    };
    string(client_id);
    if let Some((user, password)) = login {
        string(user);
        string(password);
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// Sends a raw CONNECT and returns the CONNACK's return code, or None if the broker closed the
/// socket without one.
async fn raw_connect(addr: SocketAddr, packet: &[u8]) -> (TcpStream, Option<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(packet).await.unwrap();
    let mut ack = [0u8; 4];
    let code = match tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await {
        Ok(Ok(_)) => {
            assert_eq!(&ack[..2], &[0x20, 0x02], "a CONNACK");
            Some(ack[3])
        }
        _ => None,
    };
    (s, code)
}

/// Item 1: keep alive 0 is "no keep alive": the client is accepted and is not timed out.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_keep_alive_zero_is_accepted_and_kept() {
    let (gw, _dir) = start_gateway(&header("gw-ka0")).await;
    let (mut s, code) = raw_connect(gw.broker_addr.unwrap(), &connect_packet("meter-7", 0, None)).await;
    assert_eq!(code, Some(0), "CONNACK accepted");
    // Idle for longer than any timeout a zero would have produced, then prove the link is alive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut pong)).await.expect("PINGRESP in time").unwrap();
    assert_eq!(pong, [0xD0, 0x00], "PINGRESP");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Item 5: a refused login gets CONNACK 0x05 (not authorized) before the socket closes, whether
/// the password is wrong, the user unknown or no login given.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_login_gets_connack_not_authorized() {
    let dir = TempDir::new("connack");
    std::fs::write(dir.path().join("hmi.pw"), "s3cret\n").unwrap();
    let users = format!("[broker.users.hmi]\npassword_file = \"{}\"\n", dir.path().join("hmi.pw").display());
    let (gw, _d) = start_gateway(&format!("{}{users}", header("gw-connack"))).await;
    let broker = gw.broker_addr.unwrap();
    for (what, login) in
        [("wrong password", Some(("hmi", "guess"))), ("unknown user", Some(("nobody", "s3cret"))), ("no login", None)]
    {
        let (mut s, code) = raw_connect(broker, &connect_packet("hmi-1", 30, login)).await;
        assert_eq!(code, Some(0x05), "{what}: CONNACK 0x05");
        let mut rest = [0u8; 1];
        let closed = tokio::time::timeout(WAIT, s.read(&mut rest)).await.expect("closed in time");
        assert!(matches!(closed, Ok(0) | Err(_)), "{what}: the socket is closed after the CONNACK");
    }
    let (_s, code) = raw_connect(broker, &connect_packet("hmi-2", 30, Some(("hmi", "s3cret")))).await;
    assert_eq!(code, Some(0), "the right password is accepted");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Collects (topic, qos, retain, payload) of publishes for `within`.
async fn subscribe_and_collect(
    addr: SocketAddr,
    filter: &str,
    qos: QoS,
    within: Duration,
) -> Vec<(String, QoS, bool, Vec<u8>)> {
    collect_until(addr, filter, qos, within, usize::MAX).await
}

/// As [`subscribe_and_collect`], returning early once `enough` publishes arrived (and a little
/// after, so that a duplicate would be seen).
async fn collect_until(
    addr: SocketAddr,
    filter: &str,
    qos: QoS,
    within: Duration,
    enough: usize,
) -> Vec<(String, QoS, bool, Vec<u8>)> {
    let (client, mut el) = AsyncClient::new(mqtt_options(addr), 100);
    client.subscribe(filter, qos).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(r) = tokio::time::timeout_at(deadline, el.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = r {
            got.push((p.topic.clone(), p.qos, p.retain, p.payload.to_vec()));
            if got.len() == enough {
                let grace = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(r) = tokio::time::timeout_at(grace.min(deadline), el.poll()).await {
                    if let Ok(Event::Incoming(Packet::Publish(p))) = r {
                        got.push((p.topic.clone(), p.qos, p.retain, p.payload.to_vec()));
                    }
                }
                break;
            }
        }
    }
    got
}

/// Item 3: a QoS 1 subscriber gets a QoS 0 message at QoS 0 (no acknowledgement round) and a QoS 1
/// message at QoS 1; a QoS 0 subscriber gets both at QoS 0.
#[tokio::test(flavor = "multi_thread")]
async fn messages_are_delivered_at_the_lower_of_publish_and_subscription_qos() {
    let (gw, _dir) = start_gateway(&header("gw-qos")).await;
    let broker = gw.broker_addr.unwrap();
    let sub1 = tokio::spawn(subscribe_and_collect(broker, "plant/#", QoS::AtLeastOnce, Duration::from_secs(3)));
    let sub0 = tokio::spawn(subscribe_and_collect(broker, "plant/#", QoS::AtMostOnce, Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (client, mut el) = AsyncClient::new(mqtt_options(broker), 10);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client.publish("plant/q0", QoS::AtMostOnce, false, "zero").await.unwrap();
    client.publish("plant/q1", QoS::AtLeastOnce, false, "one").await.unwrap();
    let qos_of = |got: &[(String, QoS, bool, Vec<u8>)], topic: &str| {
        got.iter().find(|m| m.0 == topic).map(|m| m.1).unwrap_or_else(|| panic!("{topic} delivered: {got:?}"))
    };
    let got1 = sub1.await.unwrap();
    assert_eq!(qos_of(&got1, "plant/q0"), QoS::AtMostOnce, "QoS 0 publish on a QoS 1 subscription");
    assert_eq!(qos_of(&got1, "plant/q1"), QoS::AtLeastOnce, "QoS 1 publish on a QoS 1 subscription");
    let got0 = sub0.await.unwrap();
    assert_eq!(qos_of(&got0, "plant/q0"), QoS::AtMostOnce);
    assert_eq!(qos_of(&got0, "plant/q1"), QoS::AtMostOnce, "QoS 1 publish on a QoS 0 subscription");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Item 4: an empty publish that is not retained is an ordinary message and leaves the retained
/// value alone; a retained empty publish deletes it.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_retained_empty_publish_deletes_the_retained_message() {
    let (gw, _dir) = start_gateway(&header("gw-retain")).await;
    let broker = gw.broker_addr.unwrap();
    let (client, mut el) = AsyncClient::new(mqtt_options(broker), 10);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client.publish("plant/line-1/mode", QoS::AtLeastOnce, true, "auto").await.unwrap();
    client.publish("plant/line-1/mode", QoS::AtLeastOnce, false, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = subscribe_and_collect(broker, "plant/line-1/mode", QoS::AtLeastOnce, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].2 && got[0].3 == b"auto", "the retained value survives a plain empty publish: {got:?}");

    client.publish("plant/line-1/mode", QoS::AtLeastOnce, true, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = subscribe_and_collect(broker, "plant/line-1/mode", QoS::AtLeastOnce, Duration::from_secs(1)).await;
    assert!(got.is_empty(), "a retained empty publish deleted it: {got:?}");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A client that logs in as `user` and reports the SUBACK return code of each filter.
async fn suback_codes(addr: SocketAddr, user: &str, filters: &[&str]) -> Vec<rumqttc::SubscribeReasonCode> {
    let mut opts = mqtt_options(addr);
    opts.set_credentials(user, format!("pw-{user}"));
    let (client, mut el) = AsyncClient::new(opts, 10);
    let mut codes = Vec::new();
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        loop {
            match tokio::time::timeout(WAIT, el.poll()).await.expect("SUBACK in time").unwrap() {
                Event::Incoming(Packet::SubAck(ack)) => {
                    codes.extend(ack.return_codes);
                    break;
                }
                _ => continue,
            }
        }
    }
    codes
}

/// A gateway with three broker users and a writable Modbus register; returns it with the
/// fixture, the users' password folder and the config's temp folder.
async fn gateway_with_rights() -> (updraft::runtime::Gateway, ModbusFixture, TempDir, TempDir) {
    let fixture = ModbusFixture::default();
    fixture.set_holding(10, &[750]);
    let modbus = fixture.serve().await;
    let dir = TempDir::new("rights");
    let mut users = String::new();
    for (user, rights) in [
        ("hmi", "publish = [\"hmi/#\"]\nsubscribe = [\"updraft/#\", \"hmi/#\"]"),
        ("operator", "publish = [\"updraft/+/setpoint/set\"]\nsubscribe = [\"updraft/+/+/set/reply\"]"),
        ("admin", ""),
    ] {
        let pw = dir.path().join(format!("{user}.pw"));
        std::fs::write(&pw, format!("pw-{user}")).unwrap();
        users += &format!("[broker.users.{user}]\npassword_file = \"{}\"\n{rights}\n\n", pw.display());
    }
    let toml = format!(
        r#"{}{users}[devices.boiler-1]
driver = "modbus-tcp"
address = "{modbus}"
poll = "200ms"
tags = [ {{ name = "setpoint", area = "holding", address = 10, type = "u16", access = "rw" }} ]
"#,
        header("gw-rights")
    );
    let (gw, conf) = start_gateway(&toml).await;
    (gw, fixture, dir, conf)
}

/// Item 7: per-user topic rights. A publish outside a user's rights is acknowledged (MQTT 3.1.1)
/// and dropped, a filter outside them gets SUBACK 0x80, both are counted on /metrics, and writing
/// to equipment through `…/set` is a publish right like any other.
#[tokio::test(flavor = "multi_thread")]
async fn topic_rights_decide_who_may_publish_subscribe_and_write_to_equipment() {
    use rumqttc::SubscribeReasonCode::{Failure, Success};
    let (gw, fixture, _pw, _conf) = gateway_with_rights().await;
    let broker = gw.broker_addr.unwrap();

    assert_eq!(suback_codes(broker, "hmi", &["#", "updraft/#"]).await, vec![Failure, Success(QoS::AtLeastOnce)]);
    assert_eq!(
        suback_codes(broker, "operator", &["updraft/#", "updraft/boiler-1/setpoint/set/reply"]).await,
        vec![Failure, Success(QoS::AtLeastOnce)],
        "a filter wider than the right is refused, a narrower one granted"
    );

    let mut admin = {
        let mut o = mqtt_options(broker);
        o.set_credentials("admin", "pw-admin");
        updraft_tests::Subscriber::connect_with(o, "#", QoS::AtLeastOnce).await
    };
    let mut hmi_opts = mqtt_options(broker);
    hmi_opts.set_credentials("hmi", "pw-hmi");
    let (hmi, mut el) = AsyncClient::new(hmi_opts, 10);
    let (acked_tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = el.poll().await {
            if let Event::Incoming(Packet::PubAck(a)) = e {
                let _ = acked_tx.send(a.pkid);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // In order: two publishes outside the rights (one a write), then one inside them.
    hmi.publish("plant/line-1/mode", QoS::AtLeastOnce, false, "\"manual\"").await.unwrap();
    hmi.publish("updraft/boiler-1/setpoint/set", QoS::AtLeastOnce, false, "80").await.unwrap();
    hmi.publish("hmi/heartbeat", QoS::AtLeastOnce, false, "1").await.unwrap();
    for _ in 0..3 {
        tokio::time::timeout(WAIT, acked.recv()).await.expect("every publish is acknowledged").unwrap();
    }
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.iter().any(|t: &String| t == "hmi/heartbeat") {
        let (topic, _, _) =
            tokio::time::timeout_at(deadline, admin.next()).await.expect("hmi/heartbeat arrives").unwrap();
        seen.push(topic);
    }
    assert!(
        !seen.iter().any(|t| t == "plant/line-1/mode" || t.ends_with("/set")),
        "publishes outside the rights reach nobody: {seen:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fixture.holding(10), Some(750), "the HMI may not write to the boiler");

    // The operator may write the setpoint, and only that.
    let mut op_opts = mqtt_options(broker);
    op_opts.set_credentials("operator", "pw-operator");
    let mut op = updraft_tests::Subscriber::connect_with(op_opts, "updraft/+/+/set/reply", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    op.client.publish("updraft/boiler-1/setpoint/set", QoS::AtLeastOnce, false, "90").await.unwrap();
    let reply = op.wait_for("updraft/boiler-1/setpoint/set/reply", WAIT, |_| true).await.expect("reply");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(fixture.holding(10), Some(90));

    let (status, metrics) = updraft_tests::http_get(gw.api_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("\nupdraft_broker_publish_denied_total 2\n"), "{metrics}");
    assert!(metrics.contains("\nupdraft_broker_subscribe_denied_total 2\n"), "{metrics}");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Item 7 with QoS 2 in raw MQTT 3.1.1: a refused publish completes its PUBREC / PUBREL / PUBCOMP
/// exchange and the connection stays up.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_qos2_publish_completes_its_handshake_and_the_client_stays() {
    let (gw, _fixture, _pw, _conf) = gateway_with_rights().await;
    let (mut s, code) =
        raw_connect(gw.broker_addr.unwrap(), &connect_packet("hmi-raw", 30, Some(("hmi", "pw-hmi")))).await;
    assert_eq!(code, Some(0));
    let topic = b"plant/forbidden";
    let mut publish = vec![0x34, (2 + topic.len() + 2 + 1) as u8, 0, topic.len() as u8];
    publish.extend(topic);
    publish.extend([0x00, 0x07, b'x']);
    s.write_all(&publish).await.unwrap();
    let mut pubrec = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut pubrec)).await.expect("PUBREC in time").unwrap();
    assert_eq!(pubrec, [0x50, 0x02, 0x00, 0x07], "PUBREC for packet 7");
    s.write_all(&[0x62, 0x02, 0x00, 0x07]).await.unwrap();
    let mut pubcomp = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut pubcomp)).await.expect("PUBCOMP in time").unwrap();
    assert_eq!(pubcomp, [0x70, 0x02, 0x00, 0x07], "PUBCOMP for packet 7");
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    let mut pong = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut pong)).await.expect("PINGRESP in time").unwrap();
    assert_eq!(pong, [0xD0, 0x00], "still connected");
    assert_eq!(gw.metrics.broker_denied_publish.get(), 1);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Item 7 for clients without a login, where the broker takes them: `[broker.anonymous]`.
#[tokio::test(flavor = "multi_thread")]
async fn anonymous_clients_keep_to_the_anonymous_rights() {
    let toml = format!("{}[broker.anonymous]\npublish = []\nsubscribe = [\"updraft/#\"]\n", header("gw-anon"));
    let (gw, _dir) = start_gateway(&toml).await;
    let broker = gw.broker_addr.unwrap();
    let (client, mut el) = AsyncClient::new(mqtt_options(broker), 10);
    client.subscribe("#", QoS::AtMostOnce).await.unwrap();
    client.subscribe("updraft/#", QoS::AtMostOnce).await.unwrap();
    client.publish("plant/x", QoS::AtLeastOnce, false, "1").await.unwrap();
    let mut codes = Vec::new();
    let mut acked = false;
    while codes.len() < 2 || !acked {
        match tokio::time::timeout(WAIT, el.poll()).await.expect("acks in time").unwrap() {
            Event::Incoming(Packet::SubAck(a)) => codes.extend(a.return_codes),
            Event::Incoming(Packet::PubAck(_)) => acked = true,
            _ => {}
        }
    }
    use rumqttc::SubscribeReasonCode::{Failure, Success};
    assert_eq!(codes, vec![Failure, Success(QoS::AtMostOnce)]);
    assert_eq!(gw.metrics.broker_denied_publish.get(), 1, "an empty publish list allows nothing");
    assert_eq!(gw.metrics.broker_denied_subscribe.get(), 1);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Item 2: a new subscriber receives every matching retained message, 10,000 of them, each at the
/// lower of its stored QoS and the subscription's.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_subscriber_gets_all_of_10000_retained_messages_at_the_lower_qos() {
    const EACH: usize = 5_000;
    let (gw, _dir) = start_gateway(&header("gw-retained-10k")).await;
    let broker = gw.broker_addr.unwrap();
    let (client, mut el) = AsyncClient::new(mqtt_options(broker), 1_000);
    let (acked_tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = el.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = e {
                let _ = acked_tx.send(());
            }
        }
    });
    for i in 0..EACH {
        client.publish(format!("plant/q0/{i}"), QoS::AtMostOnce, true, format!("{i}")).await.unwrap();
        client.publish(format!("plant/q1/{i}"), QoS::AtLeastOnce, true, format!("{i}")).await.unwrap();
    }
    for _ in 0..EACH {
        tokio::time::timeout(Duration::from_secs(30), acked.recv()).await.expect("every QoS 1 publish acked").unwrap();
    }
    // The QoS 0 ones were sent before the last QoS 1 was acknowledged, on the same connection.
    tokio::time::sleep(Duration::from_millis(200)).await;

    for sub_qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let got = collect_until(broker, "plant/#", sub_qos, Duration::from_secs(30), 2 * EACH).await;
        let mut seen = std::collections::HashSet::new();
        for (topic, qos, retain, _) in &got {
            assert!(retain, "{topic} is delivered as retained");
            let stored = if topic.starts_with("plant/q1/") { QoS::AtLeastOnce } else { QoS::AtMostOnce };
            let lower = if stored < sub_qos { stored } else { sub_qos };
            assert_eq!(*qos, lower, "{topic} on a {sub_qos:?} subscription");
            seen.insert(topic.clone());
        }
        assert_eq!(seen.len(), 2 * EACH, "every retained message on a {sub_qos:?} subscription");
        assert_eq!(got.len(), 2 * EACH, "each once on a {sub_qos:?} subscription");
    }
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Item 9: the gateway's retained values survive a restart. Before its device answers again, a
/// client connecting to the restarted gateway gets each tag's last value (and a plugin's last
/// output) as retained, with the timestamp of the read that made it; the next read replaces it.
#[tokio::test(flavor = "multi_thread")]
async fn retained_values_survive_a_restart_and_are_served_before_the_first_new_read() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(0, &[700]);
    let modbus = fixture.serve().await;
    let data = TempDir::new("last-values");
    let toml = format!(
        r#"[gateway]
id = "gw-last-values"
data_dir = "{data}"

[broker]
listen = "127.0.0.1:0"

[api]
enabled = false

[devices.boiler-1]
driver = "modbus-tcp"
address = "{modbus}"
poll = "100ms"
timeout = "10s"
tags = [ {{ name = "temperature", area = "holding", address = 0 }} ]

[plugins.to-celsius]
wasm = "{wasm}"
subscribe = ["boiler-1/temperature"]
config = {{ factor = 0.1, offset = -40.0 }}
"#,
        data = data.path().display(),
        wasm = updraft_tests::plugin_wasm("scale").display()
    );
    let (gw, _conf) = start_gateway(&toml).await;
    let read = updraft_tests::eventually(Duration::from_secs(15), || {
        let raw = gw.values.get("boiler-1", "temperature")?;
        raw.value.is_some().then_some(raw)
    })
    .await
    .expect("a first read");
    let mut sub =
        updraft_tests::Subscriber::connect(gw.broker_addr.unwrap(), "updraft/derived/#", QoS::AtMostOnce).await;
    sub.wait_for("updraft/derived/boiler-1/temperature", Duration::from_secs(15), |v| v["value"] == 30.0)
        .await
        .expect("the plugin's output");
    drop(sub);
    gw.shutdown(Duration::from_secs(5)).await;
    let last = gw_last_temperature(&data);
    assert_eq!(last.0, 700);
    assert!(last.1 >= read.ts, "the file holds the last read");

    // The device now answers only after 3 s, with a new value: until then the bus has only what
    // was saved.
    fixture.set_holding(0, &[800]);
    fixture.set_faults(updraft_tests::Faults { delay: Some(Duration::from_secs(3)), ..Default::default() });
    let (gw, _conf2) = start_gateway(&toml).await;
    let mut sub = updraft_tests::Subscriber::connect(gw.broker_addr.unwrap(), "updraft/#", QoS::AtMostOnce).await;
    let mut retained = std::collections::HashMap::new();
    while retained.len() < 2 {
        let (topic, payload, retain) = tokio::time::timeout(WAIT, sub.next()).await.expect("retained values").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert!(retain, "{topic} {v} arrives as a retained message before any new read");
        retained.insert(topic, v);
    }
    let raw = &retained["updraft/boiler-1/temperature"];
    assert_eq!(
        (raw["value"].as_i64(), raw["ts"].as_i64(), raw["quality"].as_str()),
        (Some(700), Some(last.1), Some("good"))
    );
    assert_eq!(retained["updraft/derived/boiler-1/temperature"]["value"], 30.0);
    sub.wait_for("updraft/boiler-1/temperature", Duration::from_secs(15), |v| v["value"] == 800)
        .await
        .expect("the next read replaces the restored value");
    gw.shutdown(Duration::from_secs(5)).await;
}

/// The saved value and timestamp of `boiler-1/temperature` in the data folder's file.
fn gw_last_temperature(data: &TempDir) -> (i64, i64) {
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("last-values.json")).expect("saved at shutdown"))
            .unwrap();
    let p = file["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["device"] == "boiler-1" && p["tag"] == "temperature" && p.get("topic").is_none())
        .expect("the device tag is saved");
    (p["value"]["uint"].as_i64().or(p["value"]["int"].as_i64()).unwrap(), p["ts"].as_i64().unwrap())
}

/// Opens `n` connections at once, each sending CONNECT with its own client id; returns the open
/// sockets of those that got CONNACK 0x00 and how long the whole storm took.
async fn storm(addr: SocketAddr, n: usize, prefix: &str) -> (Vec<TcpStream>, Duration) {
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let packet = connect_packet(&format!("{prefix}-{i}"), 60, None);
        tasks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(&packet).await.ok()?;
            let mut ack = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut ack)).await.ok()?.ok()?;
            (ack == [0x20, 0x02, 0x00, 0x00]).then_some(s)
        });
    }
    let mut open = Vec::new();
    while let Some(r) = tasks.join_next().await {
        open.extend(r.unwrap());
    }
    (open, started.elapsed())
}

/// Item 8: after an outage every client reconnects at once. 5,000 of them are all accepted (the
/// time it took is printed; CI does not time it), and once they leave, nothing of their clean
/// sessions is kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_storm_of_5000_clients_is_accepted_and_leaves_nothing_behind() {
    let (gw, _dir) =
        start_gateway(&header("gw-storm").replace("[broker]\n", "[broker]\nmax_connections = 5100\n")).await;
    let (open, took) = storm(gw.broker_addr.unwrap(), 5_000, "storm").await;
    println!("5,000 clients connected in {took:?}");
    assert_eq!(open.len(), 5_000, "every client got its CONNACK");
    drop(open);
    // The router has seen every disconnect once a new client gets through after them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_s, code) = raw_connect(gw.broker_addr.unwrap(), &connect_packet("after", 60, None)).await;
    assert_eq!(code, Some(0));
    assert_eq!(gw.metrics.broker_router.saved_sessions.load(std::sync::atomic::Ordering::Relaxed), 0);
    gw.shutdown(Duration::from_secs(5)).await;
}

/// CONNECT with clean session off: the broker keeps the session while the client is away.
fn persistent_connect(client_id: &str) -> Vec<u8> {
    let mut p = connect_packet(client_id, 60, None);
    p[9] &= !0x02;
    p
}

/// Item 8: the sessions of persistent clients that went away are forgotten after
/// `session_expiry`, and at most `max_connections` of them are kept (the oldest go first).
#[tokio::test(flavor = "multi_thread")]
async fn sessions_of_clients_that_went_away_expire_and_are_bounded() {
    use std::sync::atomic::Ordering::Relaxed;
    let toml = header("gw-sessions").replace("[broker]\n", "[broker]\nmax_connections = 20\nsession_expiry = \"2s\"\n");
    let (gw, _dir) = start_gateway(&toml).await;
    let addr = gw.broker_addr.unwrap();
    let counters = gw.metrics.broker_router.clone();

    // 100 distinct persistent clients come and go: only the last 20 sessions are kept.
    for i in 0..100 {
        let (s, code) = raw_connect(addr, &persistent_connect(&format!("random-{i}"))).await;
        assert_eq!(code, Some(0));
        drop(s);
        // One at a time, so that the limit of 20 connections is never the reason for a refusal.
        let n = i + 1;
        updraft_tests::eventually(WAIT, || {
            (counters.saved_sessions.load(Relaxed) + counters.expired_sessions.load(Relaxed) >= n).then_some(())
        })
        .await
        .expect("the session is saved");
    }
    assert_eq!(counters.saved_sessions.load(Relaxed), 20);
    assert_eq!(counters.expired_sessions.load(Relaxed), 80);
    let metrics = gw.metrics.render();
    assert!(metrics.contains("updraft_broker_saved_sessions 20\n"), "{metrics}");
    assert!(metrics.contains("updraft_broker_sessions_expired_total 80\n"), "{metrics}");

    // A kept session is resumed (CONNACK session present = 1); a forgotten one is not.
    let session_present = |ack: &[u8; 4]| ack[2] & 1 == 1;
    for (id, kept) in [("random-99", true), ("random-0", false)] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&persistent_connect(id)).await.unwrap();
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await.unwrap();
        assert_eq!(session_present(&ack), kept, "{id}");
    }
    // After session_expiry, even the newest session is gone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&persistent_connect("random-98")).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert!(!session_present(&ack), "an expired session is not resumed");
    gw.shutdown(Duration::from_secs(5)).await;
}

/// Item 8: a subscriber that falls further behind than `buffer_per_subscription` loses the oldest
/// messages, and every message it lost is counted: what it received plus what was counted lost
/// is exactly what was published, in order, without duplicates.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_subscriber_loses_only_the_oldest_messages_and_every_loss_is_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    const N: usize = 3_000;
    let toml = header("gw-slow").replace("[broker]\n", "[broker]\nbuffer_per_subscription = \"64KiB\"\n");
    let (gw, _dir) = start_gateway(&toml).await;
    let addr = gw.broker_addr.unwrap();

    // The slow subscriber acknowledges nothing until the flood is over, so the broker stops at its
    // in-flight window and the rest waits in the filter's log.
    let mut opts = mqtt_options(addr);
    opts.set_manual_acks(true);
    let (slow, mut slow_el) = AsyncClient::new(opts, 100);
    slow.subscribe("flood/#", QoS::AtLeastOnce).await.unwrap();
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = slow_el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let _ = got_tx.send(p);
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (publisher, mut pub_el) = AsyncClient::new(mqtt_options(addr), 100);
    let (acked_tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = pub_el.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = e {
                let _ = acked_tx.send(());
            }
        }
    });
    let body = "x".repeat(100);
    for i in 0..N {
        publisher.publish("flood/a", QoS::AtLeastOnce, false, format!("{i:05} {body}")).await.unwrap();
    }
    for _ in 0..N {
        tokio::time::timeout(WAIT, acked.recv()).await.expect("every publish acked").unwrap();
    }

    // Now the subscriber catches up, acknowledging as it goes.
    let mut received = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(2), got.recv()).await {
        received.push(std::str::from_utf8(&p.payload[..5]).unwrap().parse::<usize>().unwrap());
        slow.ack(&p).await.unwrap();
    }
    let lost = gw.metrics.broker_router.lost_messages.load(Relaxed) as usize;
    println!("received {}, lost {lost}", received.len());
    assert!(lost > 0, "64 KiB cannot hold {N} messages of 106 bytes");
    assert_eq!(received.len() + lost, N, "what arrived plus what was counted lost is all");
    assert!(received.windows(2).all(|w| w[0] < w[1]), "in order, no duplicates");
    assert_eq!(*received.last().unwrap(), N - 1, "the newest messages are kept");
    let metrics = gw.metrics.render();
    assert!(metrics.contains(&format!("updraft_broker_messages_lost_total {lost}\n")), "{metrics}");
    gw.shutdown(Duration::from_secs(5)).await;
}

/// MQTT 5 on the same listener, checked by an independent client (Eclipse Paho for Python): a
/// refused login gets CONNACK 0x86 (wrong password) or 0x87 (none), keep alive 0 is accepted, a
/// filter outside the user's rights gets SUBACK 0x87 and a publish outside them PUBACK 0x87,
/// messages arrive at min(publish, subscription) QoS, and a late subscriber gets the retained one.
#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_clients_are_served_on_the_same_listener() {
    let (gw, _fixture, _pw, _conf) = gateway_with_rights().await;
    let broker = gw.broker_addr.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/mqtt5_probe.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(updraft_tests::python())
            .args([script, &broker.ip().to_string(), &broker.port().to_string(), "hmi", "pw-hmi"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "MQTT 5 probe failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["connack_wrong_password"], 0x86, "{v}");
    assert_eq!(v["connack_no_login"], 0x87, "{v}");
    assert_eq!(v["connack"], 0, "keep alive 0 accepted: {v}");
    assert_eq!(v["suback_denied"], serde_json::json!([0x87]), "{v}");
    assert_eq!(v["suback_hmi"], serde_json::json!([1]), "{v}");
    assert_eq!(v["suback_plant"], serde_json::json!([0]), "{v}");
    assert_eq!(v["puback_denied"], 0x87, "{v}");
    assert_eq!(v["puback_allowed"], 0, "{v}");
    let messages = v["messages"].as_array().unwrap();
    let qos_of = |topic: &str| messages.iter().find(|m| m["topic"] == topic).map(|m| m["qos"].as_u64().unwrap());
    assert_eq!(qos_of("hmi/q1"), Some(1), "{v}");
    assert_eq!(qos_of("hmi/q0"), Some(0), "a QoS 0 publish on a QoS 1 subscription: {v}");
    assert_eq!(qos_of("plant/x"), None, "the refused publish reached nobody: {v}");
    assert!(
        messages.iter().any(|m| m["topic"] == "updraft/boiler-1/setpoint" && m["retain"] == true),
        "the gateway's retained values reach MQTT 5 clients: {v}"
    );
    let late = v["late"].as_array().unwrap();
    assert_eq!(late.len(), 1, "{v}");
    assert_eq!((late[0]["payload"].as_str(), late[0]["retain"].as_bool()), (Some("kept"), Some(true)), "{v}");
    assert_eq!(gw.metrics.broker_denied_publish.get(), 1);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Item 8: a client over `max_connections` is told the server is unavailable (CONNACK 0x03)
/// rather than seeing its socket close, and the ones within the limit stay connected.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_max_connections_gets_connack_server_unavailable() {
    let (gw, _dir) = start_gateway(&header("gw-limit").replace("[broker]\n", "[broker]\nmax_connections = 3\n")).await;
    let addr = gw.broker_addr.unwrap();
    let mut open = Vec::new();
    for i in 0..3 {
        let (s, code) = raw_connect(addr, &connect_packet(&format!("within-{i}"), 60, None)).await;
        assert_eq!(code, Some(0), "client {i} is within the limit");
        open.push(s);
    }
    let (_s, code) = raw_connect(addr, &connect_packet("over", 60, None)).await;
    assert_eq!(code, Some(0x03), "the fourth client is told the server is unavailable");
    drop(open);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The listener picks MQTT 3.1.1 or 5 from the CONNECT's first bytes (rumqttd patch 9): a client
/// whose CONNECT arrives a byte at a time is still read whole and accepted.
#[tokio::test(flavor = "multi_thread")]
async fn a_connect_that_trickles_in_a_byte_at_a_time_is_accepted() {
    let (gw, _dir) = start_gateway(&header("gw-trickle")).await;
    let mut s = TcpStream::connect(gw.broker_addr.unwrap()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in connect_packet("trickle", 60, None) {
        s.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await.expect("a CONNACK").unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    gw.shutdown(Duration::from_secs(2)).await;
}
