//! The `updraft` command line as an operator uses it: `check`, `version`, and `run` stopped by a
//! signal. These live in the gateway crate because only it can locate the built binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn updraft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_updraft"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("updraft-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("updraft.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn every_shipped_config_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
            assert!(out.status.success(), "{} fails check:\n{}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 2, "configs/ holds the demo and the reference config");
}

#[test]
fn check_points_at_a_misspelt_key_and_a_bad_type() {
    let text = r#"[gateway]
id = "gw"

[devices.boiler-1]
driver = "modbus-tcp"
adress = "127.0.0.1:5020"
tags = [
  { name = "temperature", area = "holding", address = 0, type = "float32" },
]
"#;
    let path = temp_file("bad", text);
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    assert!(!out.status.success(), "check must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(
        stderr.contains(&format!("{file}:6:1: unknown field `adress`")) && stderr.contains("did you mean `address`?"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{file}:8:")) && stderr.contains("unknown variant `float32`"), "{stderr}");
}

#[test]
fn check_reports_validation_problems_with_positions() {
    let text = r#"[gateway]
id = "gw"

[devices.d]
driver = "modbus-tcp"
address = "no-port-here"
poll = "1s"
tags = [
  { name = "a", area = "coil", address = 0, type = "f32" },
  { name = "b", area = "input", address = 65535, type = "u32", access = "rw" },
]
"#;
    let path = temp_file("invalid", text);
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(stderr.contains(&format!("{file}:6:11: address `no-port-here` must be host:port")), "{stderr}");
    assert!(stderr.contains(&format!("{file}:9:")) && stderr.contains("holds single bits"), "{stderr}");
    assert!(stderr.contains("runs past address 65535"), "{stderr}");
    assert!(stderr.contains("only coil and holding tags can be \"rw\""), "{stderr}");
    assert!(stderr.contains("4 problem(s)"), "{stderr}");
}

#[test]
fn version_prints_the_version() {
    let out = updraft().arg("version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("updraft {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    let text = r#"[gateway]
id = "gw-sigterm"
data_dir = "data"

[broker]
listen = "127.0.0.1:0"

[api]
listen = "127.0.0.1:0"

[simulators.sim]
kind = "modbus-tcp"
listen = "127.0.0.1:0"
registers = [{ area = "holding", address = 0, wave = "ramp" }]
"#;
    let path = temp_file("sigterm", text);
    let mut child =
        updraft().args(["run", "--log-format", "json", "-c"]).arg(&path).stderr(Stdio::piped()).spawn().unwrap();
    // Wait for the start-up line, then signal.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Gateway running.") {
                let _ = tx.send(None);
            }
            lines.push(line);
        }
        let _ = tx.send(Some(lines));
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), None, "gateway starts");
    let started = Instant::now();
    let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "updraft did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    println!("exit after SIGTERM took {:?}", started.elapsed());
    assert_eq!(exit.code(), Some(0));
    let lines = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    // JSON logs: every line is one JSON object.
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(lines.iter().any(|l| l.contains("Gateway stopped cleanly.")), "{lines:?}");
    // The data directory resolves against the config file's folder.
    assert!(path.parent().unwrap().join("data").is_dir());
}

#[test]
fn check_fails_on_a_plugin_that_is_not_a_component() {
    let dir = std::env::temp_dir().join(format!("updraft-cli-{}-badplugin", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("broken.wasm"), b"\0asm but not really").unwrap();
    let path = dir.join("updraft.toml");
    std::fs::write(
        &path,
        "[gateway]\nid = \"gw\"\n\n[plugins.broken]\nwasm = \"broken.wasm\"\nsubscribe = [\"*/*\"]\n",
    )
    .unwrap();
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugin `broken`") && stderr.contains("is not a valid Updraft plugin component"),
        "{stderr}"
    );
}

/// A missing plugin file is reported once (no repeated cause chain) with how to build it.
#[test]
fn a_missing_plugin_is_reported_once_with_how_to_build_it() {
    let path = temp_file(
        "noplugin",
        "[gateway]\nid = \"gw\"\n[broker]\nlisten = \"127.0.0.1:0\"\n[api]\nenabled = false\n[plugins.p]\nwasm = \"missing.wasm\"\nsubscribe = [\"*/*\"]\n",
    );
    let out = updraft().arg("run").arg("-c").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(line.matches("No such file").count(), 1, "the cause is said once: {line}");
    assert!(line.contains("bash configs/demo.sh"), "{line}");
}

/// `updraft hash-password` prints an Argon2 hash that `check` accepts for a broker user.
#[test]
fn hash_password_makes_a_hash_check_accepts() {
    use std::io::Write as _;
    let mut child = updraft().arg("hash-password").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let path = temp_file(
        "hashed",
        &format!("[gateway]\nid = \"gw\"\n[broker]\nlisten = \"0.0.0.0:1883\"\n[broker.users.hmi]\npassword_hash = \"{hash}\"\n"),
    );
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `check` runs each plugin's `init` with its deployment's config: a refusal is reported at the
/// key the plugin's message names first, in the operator's TOML, with the plugin's own words.
#[test]
fn check_runs_plugin_init_and_points_at_the_refused_key() {
    let wasm = repo().join("plugins/target/wasm32-wasip2/release/threshold_alarm.wasm");
    let text = format!(
        "[gateway]\nid = \"gw\"\n\n[plugins.alarm]\nwasm = {:?}\nsubscribe = [\"*/*\"]\n[plugins.alarm.config]\nhigh = 80.0\nlow = 90.0\n",
        wasm.display().to_string()
    );
    let path = temp_file("initrefused", &text);
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:9:7: plugin `alarm` refused its config: low must not exceed high", path.display());
    assert!(stderr.contains(&want), "want `{want}` in:\n{stderr}");

    // A misspelt key: serde's message, without the position in the JSON the gateway built.
    let path = temp_file("initunknown", &text.replace("low = 90.0", "lwo = 70.0"));
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:9:7: plugin `alarm` refused its config: unknown field `lwo`", path.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("at line 1 column"), "{stderr}");

    // Accepted, but the plugin declares an `alarms` output the deployment does not map: its
    // alarms would be dropped at run time.
    let accepted = text.replace("low = 90.0", "low = 70.0");
    let path = temp_file("initunmapped", &accepted);
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugin `alarm` emits to output `alarms`, which [plugins.alarm.outputs] does not map"),
        "{stderr}"
    );
    // A mapped output the plugin never emits to is a typo.
    let typo = format!(
        "{accepted}[plugins.alarm.outputs]\ndefault = \"updraft/derived/{{device}}/{{tag}}\"\nalarm = \"updraft/alarms/{{device}}/{{tag}}\"\n"
    );
    let path = temp_file("inittypo", &typo);
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:12:9: plugin `alarm` never emits to an output `alarm` (it emits to: alarms)",
            path.display()
        )),
        "{stderr}"
    );

    // As written and mapped: check passes.
    let path = temp_file("initok", &typo.replace("\nalarm = ", "\nalarms = "));
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A plugin without `subscribe` takes its own default (world 0.3.0 `describe`); one that suggests
/// none is refused by `check` with what to write.
#[test]
fn a_plugin_without_subscribe_needs_a_default_of_its_own() {
    let release = repo().join("plugins/target/wasm32-wasip2/release");
    let config = |wasm: &str| {
        format!(
            "[gateway]\nid = \"gw\"\n\n[plugins.p]\nwasm = {:?}\n[plugins.p.outputs]\ndefault = \"updraft/derived/{{device}}/{{tag}}\"\nshifts = \"updraft/shifts/{{device}}/{{tag}}\"\n",
            release.join(wasm).display().to_string()
        )
    };
    let path = temp_file("subscribe-default", &config("energy_shift.wasm"));
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    assert!(out.status.success(), "energy-shift suggests */power: {}", String::from_utf8_lossy(&out.stderr));

    let path =
        temp_file("subscribe-none", &config("scale.wasm").replace("shifts = \"updraft/shifts/{device}/{tag}\"\n", ""));
    let out = updraft().arg("check").arg("-c").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plugin `p` needs a subscribe list"), "{stderr}");
}
