//! MQTT conformance of the embedded broker for what ordinary plant clients do (issue 10): keep
//! alive 0, delivery at min(publish, subscription) QoS, which publishes delete a retained message,
//! and the CONNACK a refused login gets. Raw packets where a client library would hide the bytes.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use updraft_tests::{header, mqtt_options, start_gateway, TempDir};

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
    let (client, mut el) = AsyncClient::new(mqtt_options(addr), 100);
    client.subscribe(filter, qos).await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(r) = tokio::time::timeout_at(deadline, el.poll()).await {
        if let Ok(Event::Incoming(Packet::Publish(p))) = r {
            got.push((p.topic.clone(), p.qos, p.retain, p.payload.to_vec()));
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
