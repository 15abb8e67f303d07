//! OPC-UA: the driver against async-opcua's server (the built-in simulator, started here so the
//! test can stop and restart it) over real loopback sockets, from TOML to MQTT.

use std::time::Duration;

use opcua::types::{DateTime, Variant};
use rumqttc::QoS;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use updraft::drivers::opcua::config::OpcuaSimulator;
use updraft::drivers::opcua::simulator::{self, Started};
use updraft_tests::{header, start_gateway, Subscriber};

const WAIT: Duration = Duration::from_secs(20);

/// The simulator's variables: one of each type, some moving, one writable.
const VARIABLES: &str = r#"
listen = "127.0.0.1:0"
update = "50ms"
variables = [
  { name = "Line3.Speed", type = "f64", wave = "ramp", min = 0, max = 100, period = "2s" },
  { name = "Line3.Count", type = "i32", wave = "ramp", min = 0, max = 1000, period = "2s" },
  { name = "Line3.Running", type = "bool", value = 1 },
  { name = "Line3.Recipe", type = "string", text = "AB-7" },
  { name = "Line3.Setpoint", type = "u16", value = 40, writable = true },
  { name = "Line3.Limit", type = "f32", value = 2.5 },
]
"#;

async fn start_sim(
    listen: Option<std::net::SocketAddr>,
    secure: Option<&std::path::Path>,
) -> (Started, CancellationToken) {
    start_sim_with(listen, secure, "").await
}

async fn start_sim_with(
    listen: Option<std::net::SocketAddr>,
    secure: Option<&std::path::Path>,
    extra: &str,
) -> (Started, CancellationToken) {
    let mut cfg: OpcuaSimulator = toml::from_str(&format!("{extra}\n{VARIABLES}")).unwrap();
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if let Some(pki) = secure {
        cfg.secure = true;
        cfg.pki_dir = Some(pki.to_owned());
    }
    let cancel = CancellationToken::new();
    let started = simulator::start("line3", &cfg, cancel.clone()).await.expect("simulator starts");
    (started, cancel)
}

fn device(endpoint: &str, extra: &str) -> String {
    format!(
        r#"[devices.press]
driver = "opcua"
endpoint = "{endpoint}"
publishing_interval = "100ms"
timeout = "2s"
{extra}
tags = [
  {{ name = "speed", node = "ns=2;s=Line3.Speed" }},
  {{ name = "count", node = "ns=2;s=Line3.Count" }},
  {{ name = "running", node = "ns=2;s=Line3.Running" }},
  {{ name = "recipe", node = "ns=2;s=Line3.Recipe" }},
  {{ name = "setpoint", node = "ns=2;s=Line3.Setpoint", access = "rw" }},
  {{ name = "limit", node = "ns=2;s=Line3.Limit", access = "rw" }},
  {{ name = "ghost", node = "ns=2;s=No.Such.Node" }},
]
"#
    )
}

/// Variables of several types arrive through subscriptions with their source timestamps; a
/// NodeId the server does not know marks only its own tag bad.
#[tokio::test]
async fn variables_arrive_through_subscriptions_with_their_source_timestamps() {
    let (sim, _stop) = start_sim(None, None).await;
    let toml = format!("{}{}", header("gw-opc"), device(&format!("opc.tcp://{}/", sim.addr), ""));
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/+", QoS::AtMostOnce).await;

    let good = |v: &serde_json::Value| v["quality"] == "good";
    let tags = ["running", "recipe", "setpoint", "limit", "speed"];
    let topics = tags.map(|t| format!("updraft/press/{t}"));
    let values = sub.latest_good(&topics.each_ref().map(String::as_str), WAIT).await;
    assert_eq!(values["updraft/press/running"]["value"], true, "Boolean");
    assert_eq!(values["updraft/press/recipe"]["value"], "AB-7", "String");
    assert_eq!(values["updraft/press/setpoint"]["value"], 40, "UInt16");
    assert_eq!(values["updraft/press/limit"]["value"], 2.5, "Float");
    let speed = &values["updraft/press/speed"];
    assert!(speed["value"].as_f64().is_some_and(|v| (0.0..=100.0).contains(&v)), "Double: {speed}");
    // A moving integer keeps arriving: two different values.
    let first = sub.wait_for("updraft/press/count", WAIT, good).await.expect("i32")["value"].clone();
    let next = sub.wait_for("updraft/press/count", WAIT, |v| good(v) && v["value"] != first).await;
    assert!(next.is_some(), "changes keep coming through the subscription");
    let mut late = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/ghost", QoS::AtMostOnce).await;
    let ghost = late.wait_for("updraft/press/ghost", WAIT, |_| true).await.expect("bad point for the unknown node");
    assert_eq!(ghost["quality"], "bad");
    assert!(ghost["error"].as_str().unwrap_or_default().contains("BadNodeIdUnknown"), "{ghost}");

    // The source timestamp is the device's, not the gateway's clock; this device's clock runs
    // years ahead. (Not behind: async-opcua's server moves a source timestamp that goes backwards
    // up to its sampling grid.)
    let at = DateTime::ymd_hms(2031, 1, 2, 3, 4, 5);
    sim.set("Line3.Limit", Variant::Float(7.5), at).unwrap();
    let v = sub.wait_for("updraft/press/limit", WAIT, |v| v["value"] == 7.5).await.expect("changed value");
    assert_eq!(v["ts"], json!(at.as_chrono().timestamp_millis()), "{v}");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The server stops and comes back on the same port: data resumes by itself, and the server never
/// holds more than one session of the gateway's.
#[tokio::test]
async fn data_resumes_after_a_server_restart_with_one_session_at_a_time() {
    let (sim, stop) = start_sim(None, None).await;
    let addr = sim.addr;
    let toml = format!("{}{}", header("gw-opc-restart"), device(&format!("opc.tcp://{addr}/"), ""));
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/+", QoS::AtMostOnce).await;
    assert!(sub.wait_for("updraft/press/speed", WAIT, |v| v["quality"] == "good").await.is_some());
    assert_eq!(sim.sessions(), (1, 1), "one session");

    stop.cancel();
    drop(sim);
    let lost = sub.wait_for("updraft/press/speed", WAIT, |v| v["quality"] == "bad").await;
    assert!(lost.is_some(), "points turn bad when the server goes away");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (sim, _stop) = start_sim(Some(addr), None).await;
    let back = sub.wait_for("updraft/press/speed", Duration::from_secs(60), |v| v["quality"] == "good").await;
    assert!(back.is_some(), "data resumes without any action");
    let count = sub.wait_for("updraft/press/count", WAIT, |v| v["quality"] == "good").await;
    assert!(count.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sim.sessions(), (1, 1), "the restarted server saw exactly one session");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The gateway starts while the server is down; data arrives once it is up.
#[tokio::test]
async fn a_server_that_is_down_at_start_is_picked_up_when_it_comes() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let toml = format!("{}{}", header("gw-opc-late"), device(&format!("opc.tcp://{addr}/"), ""));
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/+", QoS::AtMostOnce).await;
    let down = sub.wait_for("updraft/press/speed", WAIT, |_| true).await.expect("a bad point while down");
    assert!(down["error"].as_str().unwrap_or_default().contains("not reachable"), "{down}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (sim, _stop) = start_sim(Some(addr), None).await;
    let up = sub.wait_for("updraft/press/speed", Duration::from_secs(60), |v| v["quality"] == "good").await;
    assert!(up.is_some(), "data arrives once the server is up");
    // The server's diagnostics summary is refreshed on its own schedule, not at once.
    updraft_tests::eventually(WAIT, || (sim.sessions().0 >= 1).then_some(())).await;
    assert_eq!(sim.sessions().0, 1, "one session, not one per retry");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Writes go through `…/set` like Modbus: typed by the node's data type, refused for read-only
/// tags, and a value that does not fit the node's type is refused with a clear reply.
#[tokio::test]
async fn writes_land_typed_by_the_node_and_read_only_tags_refuse() {
    let (sim, _stop) = start_sim(None, None).await;
    let toml = format!("{}{}", header("gw-opc-write"), device(&format!("opc.tcp://{}/", sim.addr), ""));
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/#", QoS::AtMostOnce).await;
    assert!(sub.wait_for("updraft/press/setpoint", WAIT, |v| v["quality"] == "good").await.is_some());

    sub.client.publish("updraft/press/setpoint/set", QoS::AtLeastOnce, false, "55").await.unwrap();
    let r = sub.wait_for("updraft/press/setpoint/set/reply", WAIT, |_| true).await.expect("reply");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(sim.get("Line3.Setpoint"), Some(Variant::UInt16(55)), "written as the node's UInt16");
    assert!(sub.wait_for("updraft/press/setpoint", WAIT, |v| v["value"] == 55).await.is_some());

    for (tag, value, why) in [
        ("setpoint", "70000", "out of range"),
        ("setpoint", "\"fast\"", "write a number"),
        ("speed", "1", "read-only"),
        ("limit", "1.5", "the server refused the write: Bad"),
    ] {
        sub.client.publish(format!("updraft/press/{tag}/set"), QoS::AtLeastOnce, false, value).await.unwrap();
        let r = sub.wait_for(&format!("updraft/press/{tag}/set/reply"), WAIT, |_| true).await.expect("reply");
        assert_eq!(r["ok"], false, "{tag} = {value}: {r}");
        assert!(r["error"].as_str().unwrap_or_default().contains(why), "{tag} = {value}: {r}");
    }
    assert_eq!(sim.get("Line3.Setpoint"), Some(Variant::UInt16(55)), "refused writes changed nothing");
    assert_eq!(sim.get("Line3.Limit"), Some(Variant::Float(2.5)));
    gw.shutdown(Duration::from_secs(2)).await;
}

/// `mode = "poll"` reads every tag each `poll`, for servers that limit subscriptions.
#[tokio::test]
async fn poll_mode_reads_every_tag() {
    let (sim, _stop) = start_sim(None, None).await;
    let toml = format!(
        "{}{}",
        header("gw-opc-poll"),
        device(&format!("opc.tcp://{}/", sim.addr), "mode = \"poll\"\npoll = \"200ms\"")
    );
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/+", QoS::AtMostOnce).await;
    assert_eq!(sub.wait_for("updraft/press/recipe", WAIT, |v| v["quality"] == "good").await.unwrap()["value"], "AB-7");
    let first = sub.wait_for("updraft/press/count", WAIT, |v| v["quality"] == "good").await.unwrap()["value"].clone();
    assert!(sub.wait_for("updraft/press/count", WAIT, |v| v["value"] != first).await.is_some());
    // The unknown node is read once and then left alone for a while; its bad point is retained.
    let mut late = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/ghost", QoS::AtMostOnce).await;
    let ghost = late.wait_for("updraft/press/ghost", WAIT, |_| true).await.unwrap();
    assert_eq!(ghost["quality"], "bad");
    assert!(ghost["error"].as_str().unwrap_or_default().contains("BadNodeIdUnknown"), "{ghost}");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A SignAndEncrypt endpoint: refused while the server's certificate is unknown (it waits in
/// `pki/rejected`, and the error says how to trust it), working once it is trusted.
#[tokio::test]
async fn sign_and_encrypt_works_once_the_server_certificate_is_trusted() {
    let sim_pki = updraft_tests::TempDir::new("sim-pki");
    let (sim, _stop) = start_sim(None, Some(sim_pki.path())).await;
    let extra = "security_policy = \"Basic256Sha256\"\nsecurity_mode = \"SignAndEncrypt\"";
    let toml = format!("{}{}", header("gw-opc-secure"), device(&format!("opc.tcp://{}/", sim.addr), extra));
    let (gw, dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/+", QoS::AtMostOnce).await;
    let refused = sub.wait_for("updraft/press/speed", WAIT, |_| true).await.expect("a bad point");
    assert_eq!(refused["quality"], "bad");
    assert!(refused["error"].as_str().unwrap_or_default().contains("updraft opcua trust"), "{refused}");
    let pki = dir.path().join("data/pki");
    let (rejected, trusted) = updraft::drivers::opcua::pki::list(&pki);
    assert_eq!((rejected.len(), trusted.len()), (1, 0), "the server's certificate waits in pki/rejected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sub.wait_for("updraft/press/speed", Duration::from_secs(1), |v| v["quality"] == "good").await.is_none());

    // The operator's way: list what waits, then trust it by a part of its name.
    let config = dir.path().join("updraft.toml");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(updraft_tests::cloud::updraft_bin())
            .args(["opcua", "trust"])
            .args(args)
            .arg("-c")
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let listed = cli(&[]);
    assert!(listed.contains(&format!("rejected (1): {}", rejected[0])), "{listed}");
    let thumbprint = rejected[0].rsplit_once('[').map_or(rejected[0].as_str(), |(_, t)| t.trim_end_matches("].der"));
    let trusted = cli(&[thumbprint]);
    assert!(trusted.contains("trusted: ") && trusted.contains("pki/trusted/"), "{trusted}");
    let ok = sub.wait_for("updraft/press/speed", Duration::from_secs(60), |v| v["quality"] == "good").await;
    assert!(ok.is_some(), "connected once trusted");
    let own = std::fs::read(pki.join("own/cert.der")).expect("the gateway made its own application certificate");
    let own = opcua::crypto::X509::from_der(&own).unwrap();
    assert!(own.is_application_uri_valid("urn:updraft:gw-opc-secure").is_ok(), "its URI names the gateway");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// `updraft opcua browse` prints the address space; its `--toml` output pasted into a device
/// passes `updraft check` and runs.
#[tokio::test]
async fn browse_toml_pasted_into_a_config_passes_check_and_runs() {
    let (sim, _stop) = start_sim(None, None).await;
    let endpoint = format!("opc.tcp://{}/", sim.addr);
    let browse = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(updraft_tests::cloud::updraft_bin()).args(args).output().unwrap()
        })
    };
    let base = vec!["opcua".to_owned(), "browse".to_owned(), endpoint.clone()];
    let tree = browse(base.clone()).await.unwrap();
    let tree_text = String::from_utf8_lossy(&tree.stdout);
    assert!(tree.status.success(), "{}", String::from_utf8_lossy(&tree.stderr));
    assert!(tree_text.contains("line3  ns=2;s=line3"), "the simulator's folder under Objects:\n{tree_text}");
    assert!(tree_text.contains("Line3.Setpoint  ns=2;s=Line3.Setpoint  UInt16 rw"), "{tree_text}");
    assert!(tree_text.contains("Line3.Speed  ns=2;s=Line3.Speed  Double ro"), "{tree_text}");

    let mut args = base;
    args.extend(["--node".to_owned(), "ns=2;s=line3".to_owned(), "--toml".to_owned()]);
    let out = browse(args).await.unwrap();
    let tags = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tags.contains(r#"{ name = "Line3.Setpoint", node = "ns=2;s=Line3.Setpoint", access = "rw" },"#), "{tags}");

    let toml = format!(
        "{}[devices.press]\ndriver = \"opcua\"\nendpoint = \"{endpoint}\"\npublishing_interval = \"100ms\"\n{tags}",
        header("gw-browse")
    );
    let dir = updraft_tests::TempDir::new("browse");
    let path = dir.path().join("updraft.toml");
    std::fs::write(&path, &toml).unwrap();
    let check = std::process::Command::new(updraft_tests::cloud::updraft_bin())
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check refuses the pasted tags:\n{}\n{toml}",
        String::from_utf8_lossy(&check.stderr)
    );

    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/press/+", QoS::AtMostOnce).await;
    let v = sub.latest_good(&["updraft/press/Line3.Recipe", "updraft/press/Line3.Speed"], WAIT).await;
    assert_eq!(v["updraft/press/Line3.Recipe"]["value"], "AB-7");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A user name and a password from a file, over SignAndEncrypt channels, with the server's certificate
/// trusted on first use (opt-in): the right password reads, a wrong one is refused with the
/// server's reason and only that device's points are bad.
#[tokio::test]
async fn a_user_logs_in_with_a_password_file_and_a_wrong_password_is_refused() {
    let sim_pki = updraft_tests::TempDir::new("sim-pki-user");
    let users = r#"users = [{ name = "operator", password = "s3cret" }]"#;
    let (sim, _stop) = start_sim_with(None, Some(sim_pki.path()), users).await;
    let dir = updraft_tests::TempDir::new("passwords");
    std::fs::write(dir.path().join("good"), "s3cret\n").unwrap();
    std::fs::write(dir.path().join("bad"), "guess\n").unwrap();
    let endpoint = format!("opc.tcp://{}/", sim.addr);
    // Two policies: the right password over Aes256_Sha256_RsaPss, the wrong one over Basic256Sha256.
    let device = |name: &str, file: &str| {
        let policy = if name == "good" { "Aes256_Sha256_RsaPss" } else { "Basic256Sha256" };
        format!(
            r#"[devices.{name}]
driver = "opcua"
endpoint = "{endpoint}"
security_policy = "{policy}"
security_mode = "SignAndEncrypt"
trust_on_first_use = true
username = "operator"
password_file = "{}"
tags = [{{ name = "recipe", node = "ns=2;s=Line3.Recipe" }}]
"#,
            dir.path().join(file).display()
        )
    };
    let toml = format!("{}{}{}", header("gw-opc-user"), device("good", "good"), device("bad", "bad"));
    let (gw, gw_dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/+/recipe", QoS::AtMostOnce).await;
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let ok = sub
        .wait_for("updraft/good/recipe", Duration::from_secs(60), |v| {
            *last.borrow_mut() = v.clone();
            v["quality"] == "good"
        })
        .await;
    assert_eq!(ok.unwrap_or_else(|| panic!("the right password reads; last: {}", last.borrow()))["value"], "AB-7");
    let mut late = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/bad/recipe", QoS::AtMostOnce).await;
    let refused = late.wait_for("updraft/bad/recipe", WAIT, |v| v["quality"] == "bad").await.expect("refused");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("refused the session: Bad"), "the server's reason: {refused}");
    println!("wrong password: {error}");
    let (rejected, trusted) = updraft::drivers::opcua::pki::list(&gw_dir.path().join("data/pki"));
    assert_eq!((rejected.len(), trusted.len()), (0, 1), "trusted on first use");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// An X.509 user identity: the gateway signs with the user's key; a certificate the server does
/// not know is refused.
#[tokio::test]
async fn an_x509_user_certificate_logs_in() {
    let keys = updraft_tests::TempDir::new("x509-user");
    for name in ["operator", "stranger"] {
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN={name}"))
            .args(["-keyout", &format!("{name}.key"), "-outform", "DER", "-out", &format!("{name}.der")])
            .current_dir(keys.path())
            .output()
            .expect("openssl is installed");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let sim_pki = updraft_tests::TempDir::new("sim-pki-x509");
    let users =
        format!(r#"users = [{{ name = "operator", certificate = "{}" }}]"#, keys.path().join("operator.der").display());
    let (sim, _stop) = start_sim_with(None, Some(sim_pki.path()), &users).await;
    let endpoint = format!("opc.tcp://{}/", sim.addr);
    let device = |name: &str| {
        format!(
            r#"[devices.{name}]
driver = "opcua"
endpoint = "{endpoint}"
security_policy = "Aes128_Sha256_RsaOaep"
security_mode = "SignAndEncrypt"
trust_on_first_use = true
user_certificate = "{}"
user_private_key = "{}"
tags = [{{ name = "recipe", node = "ns=2;s=Line3.Recipe" }}]
"#,
            keys.path().join(format!("{name}.der")).display(),
            keys.path().join(format!("{name}.key")).display()
        )
    };
    let toml = format!("{}{}{}", header("gw-opc-x509"), device("operator"), device("stranger"));
    let (gw, _dir) = start_gateway(&toml).await;
    let mut sub = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/operator/recipe", QoS::AtMostOnce).await;
    let ok = sub.wait_for("updraft/operator/recipe", Duration::from_secs(60), |v| v["quality"] == "good").await;
    assert_eq!(ok.expect("the known certificate reads")["value"], "AB-7");
    let mut late = Subscriber::connect(gw.broker_addr.unwrap(), "updraft/stranger/recipe", QoS::AtMostOnce).await;
    let refused = late.wait_for("updraft/stranger/recipe", WAIT, |v| v["quality"] == "bad").await.expect("refused");
    assert!(refused["error"].as_str().unwrap_or_default().contains("refused the session: Bad"), "{refused}");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// The simulator serves its own small core namespace (ns=0) instead of async-opcua's generated
/// one. An independent client (Python asyncua) finds what a generic client reads first: the
/// namespace array, the server's status and state, `Objects` with `Server` and the simulator's
/// folder, and the operation limits the driver batches by.
#[tokio::test]
async fn an_independent_client_finds_the_standard_nodes_of_the_simulator() {
    let (sim, _stop) = start_sim(None, None).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/asyncua_probe.py");
    let url = format!("opc.tcp://{}/", sim.addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(updraft_tests::python()).arg(script).arg(url).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "asyncua probe failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let namespaces = v["namespaces"].as_array().unwrap();
    assert_eq!(namespaces[0], "http://opcfoundation.org/UA/", "{v}");
    assert_eq!(namespaces[1], "urn:updraft:simulator:line3", "index 1 is the server's own: {v}");
    assert_eq!(usize::from(sim.namespace), 2);
    assert_eq!(namespaces[2], "urn:updraft:simulator", "the variables' namespace: {v}");
    assert_eq!(v["state"], 0, "Running: {v}");
    assert_eq!(v["status_state"], 0, "the whole ServerStatus structure decodes: {v}");
    assert_eq!(v["product"], "urn:updraft:simulator");
    assert!(v["current_time_age_s"].as_f64().unwrap().abs() < 60.0, "CurrentTime is now: {v}");
    let objects: Vec<&str> = v["objects"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(objects.contains(&"Server") && objects.contains(&"line3"), "{v}");
    let server: Vec<&str> = v["server_children"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for child in ["NamespaceArray", "ServerArray", "ServerCapabilities", "ServerStatus"] {
        assert!(server.contains(&child), "Server has {child}: {v}");
    }
    assert!(v["max_monitored_items_per_call"].as_u64().unwrap() > 0, "{v}");
}
