//! Write commands to equipment, from local MQTT clients (`updraft/{device}/{tag}/set`) and from the
//! cloud (`{topic}/set`): the one place that guards, executes and answers them.
//!
//! Writes are the one path that can hurt people, so every command passes the same guards whatever
//! its origin: a retained command is never executed (it would run again at every reconnect or
//! restart of whoever holds it), and a command whose `id` was seen in the last ten minutes is
//! answered with the first one's result but not executed again (a cloud that resends after a lost
//! PUBACK must not move a valve twice).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::drivers::WriteTx;
use crate::metrics::Counter;

/// How long a command id is remembered.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(600);
/// Most ids remembered at once; the oldest are forgotten first past it.
const DEDUP_MAX: usize = 10_000;

/// One write: `value` to `device`'s `tag`, with the sender's optional correlation `id`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub device: String,
    pub tag: String,
    pub value: serde_json::Value,
    #[serde(default)]
    pub id: Option<serde_json::Value>,
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: Result<(), String>,
    /// The id was seen before: this is the first execution's result, nothing was written now.
    pub duplicate: bool,
}

/// Counters of `updraft_commands_total{result}`.
#[derive(Debug, Default)]
pub struct CommandStats {
    pub ok: Counter,
    pub failed: Counter,
    pub retained: Counter,
    pub duplicate: Counter,
}

type Key = (String, String, String);
type Done = watch::Receiver<Option<Result<(), String>>>;

#[derive(Default)]
struct Recent {
    by_key: HashMap<Key, Done>,
    order: VecDeque<(Instant, Key)>,
}

/// The devices' write queues and the guards in front of them.
#[derive(Default)]
pub struct Commands {
    /// Replaced per device on reload.
    devices: std::sync::RwLock<HashMap<String, WriteTx>>,
    recent: Mutex<Recent>,
    pub stats: Arc<CommandStats>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands").field("devices", &self.devices.read().map(|d| d.len()).unwrap_or(0)).finish()
    }
}

impl Commands {
    pub fn new(devices: HashMap<String, WriteTx>, stats: Arc<CommandStats>) -> Arc<Self> {
        Arc::new(Commands { devices: std::sync::RwLock::new(devices), recent: Mutex::default(), stats })
    }

    /// Points `device`'s commands at a new driver's queue, or (None) refuses them as unknown:
    /// a reload that restarts or removes the device.
    pub fn set_device(&self, device: &str, tx: Option<WriteTx>) {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        match tx {
            Some(tx) => devices.insert(device.to_owned(), tx),
            None => devices.remove(device),
        };
    }

    /// Refuses a retained command without executing it; `origin` names the path in the log.
    pub fn refuse_retained(&self, origin: &str, topic: &str) -> Outcome {
        self.stats.retained.inc();
        warn!(%origin, %topic, "Retained write command ignored: commands must be published with retain = false.");
        Outcome {
            result: Err("retained commands are never executed; publish commands with retain = false".into()),
            duplicate: false,
        }
    }

    /// Executes a command once per id (within `DEDUP_WINDOW`) and waits for the device's answer.
    pub async fn execute(&self, origin: &str, cmd: Command) -> Outcome {
        let key = cmd.id.as_ref().map(|id| (cmd.device.clone(), cmd.tag.clone(), id.to_string()));
        let publish = match key.map(|k| self.claim(k)) {
            Some(Err((done, id))) => {
                self.stats.duplicate.inc();
                info!(%origin, device = %cmd.device, tag = %cmd.tag, %id, "Write command seen before; answered, not executed again.");
                return Outcome { result: wait_done(done).await, duplicate: true };
            }
            Some(Ok(tx)) => Some(tx),
            None => None,
        };
        let submitted = {
            let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
            crate::drivers::submit(&devices, &cmd.device, &cmd.tag, cmd.value)
        };
        let result = match submitted {
            Ok(wait) => wait.await.unwrap_or_else(|_| Err("the device's driver has stopped".into())),
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) => {
                self.stats.ok.inc();
                info!(%origin, device = %cmd.device, tag = %cmd.tag, "Write done.");
            }
            Err(e) => {
                self.stats.failed.inc();
                warn!(%origin, device = %cmd.device, tag = %cmd.tag, error = %e, "Write refused or failed.");
            }
        }
        if let Some(tx) = publish {
            tx.send_replace(Some(result.clone()));
        }
        Outcome { result, duplicate: false }
    }
}

impl Commands {
    /// Remembers a new id (and returns where to post its result), or returns the earlier
    /// command's result channel if the id was seen within the window.
    #[allow(clippy::type_complexity)]
    fn claim(&self, key: Key) -> Result<watch::Sender<Option<Result<(), String>>>, (Done, String)> {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.expire();
        if let Some(done) = recent.by_key.get(&key) {
            return Err((done.clone(), key.2));
        }
        let (tx, rx) = watch::channel(None);
        recent.insert(key, rx);
        Ok(tx)
    }
}

async fn wait_done(mut done: Done) -> Result<(), String> {
    match done.wait_for(Option::is_some).await {
        Ok(r) => r.clone().unwrap_or_else(|| Err("no result".into())),
        Err(_) => Err("the first command with this id did not finish".into()),
    }
}

impl Recent {
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < DEDUP_WINDOW && self.order.len() <= DEDUP_MAX {
                break;
            }
            let (_, key) = self.order.pop_front().expect("checked");
            self.by_key.remove(&key);
        }
    }

    fn insert(&mut self, key: Key, done: Done) {
        self.order.push_back((Instant::now(), key.clone()));
        self.by_key.insert(key, done);
    }
}

/// The JSON reply: `{"ok": true}` or `{"ok": false, "error": "…"}`, plus `duplicate` when the
/// command was answered from memory and the `extra` fields (device, tag, id) that are present.
pub fn reply(outcome: &Outcome, extra: &[(&str, Option<serde_json::Value>)]) -> String {
    let mut body = serde_json::Map::new();
    body.insert("ok".into(), outcome.result.is_ok().into());
    if let Err(e) = &outcome.result {
        body.insert("error".into(), e.clone().into());
    }
    if outcome.duplicate {
        body.insert("duplicate".into(), true.into());
    }
    for (k, v) in extra {
        if let Some(v) = v {
            body.insert((*k).into(), v.clone());
        }
    }
    serde_json::Value::Object(body).to_string()
}

/// Where a cloud command topic carries the device and tag: the command filter with `+` for
/// `{device}` and `{tag}`, and which of its levels they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub filter: String,
    device_at: Option<usize>,
    tag_at: Option<usize>,
}

impl Route {
    /// `template` has `{gateway}` filled in already; `{device}`, `{tag}` and `{topic}` are levels.
    pub fn new(template: &str) -> Route {
        let levels: Vec<&str> = template.split('/').collect();
        let pos = |p: &str| levels.iter().position(|l| *l == p);
        let filter = levels
            .iter()
            .map(|l| if matches!(*l, "{device}" | "{tag}" | "{topic}") { "+" } else { l })
            .collect::<Vec<_>>()
            .join("/");
        Route { filter, device_at: pos("{device}"), tag_at: pos("{tag}") }
    }

    /// Parses a cloud command that arrived on `topic`: its `device` (and `tag`) must be the ones the
    /// topic names, so an ACL on the cloud broker that grants one device's topic grants only that
    /// device.
    /// A refusal carries the command's `id` when it had one, for the reply.
    pub fn parse(&self, topic: &str, payload: &[u8]) -> Result<Command, (String, Option<serde_json::Value>)> {
        let cmd: Command = serde_json::from_slice(payload).map_err(|e| {
            (format!("command must be JSON {{\"device\": \"...\", \"tag\": \"...\", \"value\": ...}}: {e}"), None)
        })?;
        let levels: Vec<&str> = topic.split('/').collect();
        for (at, what, want) in [(self.device_at, "device", &cmd.device), (self.tag_at, "tag", &cmd.tag)] {
            if let Some(i) = at {
                let got = levels.get(i).copied().unwrap_or_default();
                if got != want {
                    let e = format!("the command's {what} `{want}` is not the one its topic names (`{got}`)");
                    return Err((e, cmd.id));
                }
            }
        }
        Ok(cmd)
    }
}

/// Parses a local command: `updraft/{device}/{tag}/set` with the value (`42`, `true`) or an object
/// `{"value": 42, "id": …}` as payload.
pub fn parse_local(topic: &str, payload: &[u8]) -> Result<Command, String> {
    let parts: Vec<&str> = topic.split('/').collect();
    let [_, device, tag, _] = parts.as_slice() else { return Err(format!("bad command topic `{topic}`")) };
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("payload is not JSON ({e}); send e.g. 42 or {{\"value\": 42}}"))?;
    let (value, id) = match value {
        serde_json::Value::Object(mut m) => {
            let value = m.remove("value").ok_or("object payload needs a `value` key")?;
            (value, m.remove("id"))
        }
        v => (v, None),
    };
    Ok(Command { device: (*device).to_owned(), tag: (*tag).to_owned(), value, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_check_the_device_the_topic_names() {
        let r = Route::new("parks/gw/{device}/set");
        assert_eq!(r.filter, "parks/gw/+/set");
        let ok = br#"{"device":"press","tag":"setpoint","value":1}"#;
        assert_eq!(r.parse("parks/gw/press/set", ok).unwrap().device, "press");
        let (e, _) = r.parse("parks/gw/boiler/set", ok).unwrap_err();
        assert!(e.contains("`press` is not the one its topic names (`boiler`)"), "{e}");
        let fixed = Route::new("cmd/gw");
        assert!(fixed.parse("cmd/gw", ok).is_ok(), "a topic without {{device}} names no device");
        let tagged = Route::new("parks/gw/{device}/{tag}/set");
        assert!(tagged.parse("parks/gw/press/other/set", ok).is_err());
    }

    #[tokio::test]
    async fn a_repeated_id_is_answered_but_not_executed_twice() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let commands = Commands::new(HashMap::from([("press".to_owned(), tx)]), Arc::default());
        let device = tokio::spawn(async move {
            let mut writes = 0;
            while let Some(w) = rx.recv().await {
                writes += 1;
                let _ = w.reply.send(Ok(()));
            }
            writes
        });
        let cmd = |id: i64| Command { device: "press".into(), tag: "t".into(), value: 1.into(), id: Some(id.into()) };
        assert_eq!(commands.execute("test", cmd(7)).await, Outcome { result: Ok(()), duplicate: false });
        assert_eq!(commands.execute("test", cmd(7)).await, Outcome { result: Ok(()), duplicate: true });
        assert!(!commands.execute("test", cmd(8)).await.duplicate);
        drop(commands);
        assert_eq!(device.await.unwrap(), 2, "ids 7 and 8 were written once each");
    }
}
