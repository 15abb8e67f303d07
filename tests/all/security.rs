//! Who can reach the gateway and what they can do: broker logins, the exposure rule of `check`,
//! the `writes` switch, and MQTT over TLS on the embedded broker.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{QoS, TlsConfiguration, Transport};
use serde_json::json;
use updraft_tests::cloud::make_pki;
use updraft_tests::{eventually, mqtt_options, start_gateway, try_connect, ModbusFixture, Subscriber, TempDir};

const WAIT: Duration = Duration::from_secs(10);

fn device(addr: std::net::SocketAddr) -> String {
    format!(
        r#"
[devices.boiler-1]
driver = "modbus-tcp"
address = "{addr}"
poll = "200ms"
tags = [
  {{ name = "setpoint", area = "holding", address = 10, access = "rw" }},
]
"#
    )
}

/// A gateway header with `[broker]` extras (users, writes, tls), free ports only.
fn header(id: &str, broker_extra: &str) -> String {
    format!("[gateway]\nid = \"{id}\"\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n[broker]\nlisten = \"127.0.0.1:0\"\n{broker_extra}\n")
}

fn problems(toml: &str) -> Vec<String> {
    match updraft::config::parse(toml, Path::new("u.toml")) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(ToString::to_string).collect(),
    }
}

/// `check` refuses a broker that other machines can reach without passwords, unless the operator
/// writes `allow_anonymous = true`; and an exposed broker does not take writes by default.
#[test]
fn an_exposed_broker_needs_users_or_an_explicit_allow_anonymous() {
    let dir = TempDir::new("exposed");
    let pw = dir.path().join("hmi.pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let base = "[gateway]\nid = \"gw\"\n[broker]\nlisten = \"0.0.0.0:1883\"\n";
    let p = problems(base);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("u.toml:4:10:") && p[0].contains("without a password"), "{p:?}");
    assert!(p[0].contains("[broker.users.NAME]") && p[0].contains("allow_anonymous = true"), "{p:?}");

    let anonymous = updraft::config::parse(&format!("{base}allow_anonymous = true\n"), Path::new("u.toml")).unwrap();
    assert!(!anonymous.broker.writes_on(), "an exposed broker takes no writes unless turned on");
    let on = format!("{base}allow_anonymous = true\nwrites = \"on\"\n");
    assert!(updraft::config::parse(&on, Path::new("u.toml")).unwrap().broker.writes_on());

    let users = format!("{base}[broker.users.hmi]\npassword_file = \"{}\"\n", pw.display());
    assert_eq!(problems(&users), Vec::<String>::new());
    let p =
        problems(&format!("{base}allow_anonymous = true\n[broker.users.hmi]\npassword_file = \"{}\"\n", pw.display()));
    assert!(p.iter().any(|p| p.contains("cannot be combined")), "{p:?}");
    let p = problems(&format!("{base}[broker.users.hmi]\npassword_hash = \"hunter2\"\n"));
    assert!(p.iter().any(|p| p.starts_with("u.toml:6:") && p.contains("updraft hash-password")), "{p:?}");
    let p = problems(&format!("{base}[broker.users.hmi]\n"));
    assert!(p.iter().any(|p| p.contains("needs a password_file or a password_hash")), "{p:?}");

    let loopback = updraft::config::parse("[gateway]\nid = \"gw\"\n", Path::new("u.toml")).unwrap();
    assert!(loopback.broker.writes_on(), "a loopback-only broker takes writes by default");
}

/// With users, every client logs in: anonymous clients and wrong passwords are refused (wrong
/// logins counted); a password file and an Argon2 hash both work.
#[tokio::test(flavor = "multi_thread")]
async fn broker_users_log_in_and_everyone_else_is_refused() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(10, &[42]);
    let addr = fixture.serve().await;
    let dir = TempDir::new("users");
    std::fs::write(dir.path().join("hmi.pw"), "s3cret\n").unwrap();
    let hash = updraft::broker::auth::hash_password("scada-pw").unwrap();
    let users = format!(
        "[broker.users.hmi]\npassword_file = \"{}\"\n[broker.users.scada]\npassword_hash = \"{hash}\"\n",
        dir.path().join("hmi.pw").display()
    );
    let (gw, _d) = start_gateway(&format!("{}{}", header("gw-users", &users), device(addr))).await;
    let broker = gw.broker_addr.unwrap();

    let anonymous = try_connect(mqtt_options(broker)).await;
    assert!(anonymous.is_err(), "a client without credentials is refused");
    let mut wrong = mqtt_options(broker);
    wrong.set_credentials("hmi", "guess");
    assert!(try_connect(wrong).await.is_err(), "a wrong password is refused");
    let mut nobody = mqtt_options(broker);
    nobody.set_credentials("nobody", "s3cret");
    assert!(try_connect(nobody).await.is_err(), "an unknown user is refused");

    for (user, password) in [("hmi", "s3cret"), ("scada", "scada-pw")] {
        let mut opts = mqtt_options(broker);
        opts.set_credentials(user, password);
        let mut sub = Subscriber::connect_with(opts, "updraft/boiler-1/setpoint", QoS::AtMostOnce).await;
        let v = sub.wait_for("updraft/boiler-1/setpoint", WAIT, |_| true).await;
        assert_eq!(v.expect("a logged-in user reads")["value"], 42, "{user}");
    }
    // A client that sends no login at all is turned away by rumqttd before the gateway's check.
    assert_eq!(gw.metrics.broker_auth_failures.get(), 2, "refused logins are counted");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// `writes = "off"`: a logged-in user's `…/set` is answered with a refusal and the register does
/// not change; the same user with writes on changes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_without_write_permission_cannot_change_a_register() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(10, &[42]);
    let addr = fixture.serve().await;
    let dir = TempDir::new("writes");
    std::fs::write(dir.path().join("hmi.pw"), "s3cret").unwrap();
    let users = format!("[broker.users.hmi]\npassword_file = \"{}\"\n", dir.path().join("hmi.pw").display());
    for writes in ["off", "on"] {
        let broker_extra = format!("writes = \"{writes}\"\n{users}");
        let (gw, _d) = start_gateway(&format!("{}{}", header("gw-writes", &broker_extra), device(addr))).await;
        let mut opts = mqtt_options(gw.broker_addr.unwrap());
        opts.set_credentials("hmi", "s3cret");
        let mut sub = Subscriber::connect_with(opts, "updraft/boiler-1/setpoint/set/reply", QoS::AtMostOnce).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        sub.client.publish("updraft/boiler-1/setpoint/set", QoS::AtLeastOnce, false, "7").await.unwrap();
        let reply = sub.wait_for("updraft/boiler-1/setpoint/set/reply", WAIT, |_| true).await.expect("a reply");
        if writes == "off" {
            assert_eq!(reply["ok"], false, "{reply}");
            assert!(reply["error"].as_str().unwrap().contains("writes = \"off\""), "{reply}");
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(fixture.holding(10), Some(42), "the register did not change");
            assert_eq!(gw.metrics.broker_writes_refused.get(), 1);
        } else {
            assert_eq!(reply, json!({"ok": true}));
            assert_eq!(fixture.holding(10), Some(7));
        }
        gw.shutdown(Duration::from_secs(2)).await;
    }
}

fn tls_client(addr: std::net::SocketAddr, pki: &Path, client_cert: bool) -> rumqttc::MqttOptions {
    let (cert, key) = (pki.join("client.pem"), pki.join("client.key"));
    let config = updraft::sinks::tls::client_config(
        Some(&pki.join("ca.pem")),
        client_cert.then_some(cert.as_path()),
        client_cert.then_some(key.as_path()),
    )
    .unwrap();
    let mut opts = mqtt_options(std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
    opts
}

/// MQTT over TLS: `listen` itself serves TLS (plain MQTT only on a private loopback port), and
/// with `ca_file` a client without a certificate signed by that CA cannot connect.
#[tokio::test(flavor = "multi_thread")]
async fn the_broker_serves_tls_and_requires_client_certificates_when_asked() {
    let fixture = ModbusFixture::default();
    fixture.set_holding(10, &[42]);
    let addr = fixture.serve().await;
    let pki = TempDir::new("broker-pki");
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let tls = format!("tls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n", p("server.pem"), p("server.key"));
    let (gw, _d) = start_gateway(&format!("{}{}", header("gw-tls", &tls), device(addr))).await;
    let tls_addr = gw.broker_tls_addr.expect("a TLS listener");
    assert_ne!(Some(tls_addr), gw.broker_addr, "plain MQTT moved to a private port");
    let mut sub = Subscriber::connect_with(tls_client(tls_addr, pki.path(), false), "updraft/#", QoS::AtMostOnce).await;
    let v = sub.wait_for("updraft/boiler-1/setpoint", WAIT, |_| true).await;
    assert_eq!(v.expect("data over TLS")["value"], 42);
    assert!(try_connect(mqtt_options(tls_addr)).await.is_err(), "plain MQTT on the TLS port fails");
    gw.shutdown(Duration::from_secs(2)).await;

    let tls = format!(
        "tls = {{ cert_file = \"{}\", key_file = \"{}\", ca_file = \"{}\" }}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    );
    let (gw, _d) = start_gateway(&format!("{}{}", header("gw-mtls", &tls), device(addr))).await;
    let tls_addr = gw.broker_tls_addr.unwrap();
    let refused = try_connect(tls_client(tls_addr, pki.path(), false)).await;
    assert!(refused.is_err(), "no client certificate, no connection");
    try_connect(tls_client(tls_addr, pki.path(), true)).await.expect("a client certificate from the CA connects");
    let got = eventually(WAIT, || gw.values.get("boiler-1", "setpoint")).await;
    assert!(got.is_some());
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Plugin outputs may not be templated onto device readings or write commands; `check` says so
/// at the line.
#[test]
fn plugin_outputs_on_reserved_topics_are_refused_by_check() {
    let base = "[gateway]\nid = \"gw\"\n[devices.boiler]\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\ntags = [{ name = \"t\", area = \"holding\", address = 0 }]\n[plugins.p]\nwasm = \"p.wasm\"\nsubscribe = [\"*/*\"]\n[plugins.p.outputs]\n";
    for (template, why) in [
        ("updraft/{device}/{tag}", "device's reading"),
        ("updraft/boiler/{tag}", "device's reading"),
        ("{plugin}/{device}/{tag}", "device's reading"),
        ("alarms/{device}/set", "reserved for write commands"),
    ] {
        let toml = format!("{base}default = \"{template}\"\n");
        let toml = toml
            .replace("[plugins.p]", if template.starts_with("{plugin}") { "[plugins.updraft]" } else { "[plugins.p]" });
        let toml = toml.replace(
            "[plugins.p.outputs]",
            if template.starts_with("{plugin}") { "[plugins.updraft.outputs]" } else { "[plugins.p.outputs]" },
        );
        let p = problems(&toml);
        assert!(p.iter().any(|p| p.starts_with("u.toml:11:") && p.contains(why)), "{template}: {p:?}");
    }
    assert_eq!(problems(&format!("{base}default = \"updraft/alarms/{{tag}}\"\n")), Vec::<String>::new());
}

/// Names become topics and paths (`{data_dir}/north/{name}`): `..`, separators, control
/// characters and absurd lengths are refused at the line; so are durations that would overflow.
#[test]
fn names_and_values_that_would_escape_or_overflow_are_refused() {
    for (toml, what) in [
        ("[north.\"..\"]\ntype = \"http\"\nurl = \"http://127.0.0.1/x\"\n", "`..`"),
        ("[north.\"a..b\"]\ntype = \"http\"\nurl = \"http://127.0.0.1/x\"\n", "`..`"),
        ("[north.\"a/b\"]\ntype = \"http\"\nurl = \"http://127.0.0.1/x\"\n", "'/'"),
        ("[north.\"a\\u0007b\"]\ntype = \"http\"\nurl = \"http://127.0.0.1/x\"\n", "'\\u{7}'"),
        ("[devices.d]\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\ntags = [{ name = \"..\", area = \"coil\", address = 0 }]\n", "`..`"),
        ("[devices.d]\ndriver = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\npoll = \"999999999999d\"\ntags = [{ name = \"t\", area = \"coil\", address = 0 }]\n", "too long"),
    ] {
        let p = problems(&format!("[gateway]\nid = \"gw\"\n{toml}"));
        assert!(p.iter().any(|p| p.starts_with("u.toml:") && p.contains(what)), "{toml}: {p:?}");
    }
    let long = "x".repeat(200);
    let p = problems(&format!("[gateway]\nid = \"{long}\"\n"));
    assert!(p.iter().any(|p| p.contains("at most 128 bytes")), "{p:?}");
}

/// Issue 10 item 6: a client that connects by IP address and sends that IP as TLS SNI (as
/// OpenSSL-based tools and many field devices do) is accepted. The client is OpenSSL's own
/// `s_client`, sending an MQTT CONNECT through the tunnel and reading the CONNACK.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_client_sending_an_ip_address_as_sni_is_accepted() {
    use std::io::{Read, Write};
    let pki = TempDir::new("broker-pki-sni");
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let tls = format!("tls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n", p("server.pem"), p("server.key"));
    let (gw, _d) = start_gateway(&header("gw-sni", &tls)).await;
    let tls_addr = gw.broker_tls_addr.expect("a TLS listener");
    let ca = p("ca.pem");
    let connack = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
            .arg(tls_addr.to_string())
            .args(["-servername", "127.0.0.1", "-CAfile", &ca])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl is installed");
        // MQTT 3.1.1 CONNECT, clean session, keep alive 30, client id "sni".
        let connect = [0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 3, b's', b'n', b'i'];
        child.stdin.as_mut().unwrap().write_all(&connect).unwrap();
        let mut ack = [0u8; 4];
        let read = child.stdout.as_mut().unwrap().read_exact(&mut ack);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        read.map(|_| ack).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    });
    let ack = tokio::time::timeout(WAIT, connack).await.expect("an answer in time").unwrap();
    assert_eq!(ack.expect("the TLS handshake with IP SNI succeeds"), [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    gw.shutdown(Duration::from_secs(2)).await;
}
