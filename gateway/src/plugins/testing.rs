//! The plugin author's test harness: runs a built plugin in the gateway's own host code (same
//! linker, sandbox, limits and trap handling) with a clock the test controls, feeds it fixture
//! points and compares what it emits. Used by `updraft plugin test` and by the gateway's tests.
//!
//! A fixture is JSON:
//! ```json
//! { "config": {"factor": 0.1}, "limits": {"memory": "32MiB", "call_timeout": "50ms"},
//!   "steps": [
//!     {"now": 1000, "points": [{"device": "b", "tag": "t", "value": 700}],
//!      "expect": [{"device": "b", "tag": "t", "value": 70.0}]},
//!     {"series": {"device": "b", "tag": "t", "from": 2000, "to": 61000, "every": "1s",
//!                 "values": "linear:0..59"},
//!      "expect_only": {"output": "alarms"}, "expect": []},
//!     {"ticks": {"from": 62000, "to": 122000, "every": "10s"}},
//!     {"now": 200000, "tick": true, "expect": []},
//!     {"now": 201000, "points": [{"device": "b", "tag": "t", "value": 1}], "expect_trap": "timeout"}
//!   ] }
//! ```
//! A point's `ts` defaults to the step's `now`; `value: null` makes a bad point. An expected emit
//! checks `device`, `tag` and `value` (numbers to 1e-9), and `output`, `quality` and `ts` when given.
//! A message emit is matched as `device` = its subject, `tag` = `""` and `value` = its JSON payload.
//!
//! Generators expand into one call per instant, from `from` to `to` inclusive, every `every`
//! (milliseconds, or a duration such as `"1s"`): `series` makes an `on-batch` call with one point
//! (values `"linear:A..B"` from A to B evenly, a list cycled through, or one constant), `ticks`
//! makes `on-tick` calls. A generator step's `expect` is compared with everything its calls
//! emitted, in order. `expect_only` (`{"output": …, "device": …, "tag": …}`, each optional) keeps
//! only the matching emits before comparing. `"expect_init_error": "substring"` at the top level
//! says `init` must refuse the config with a message containing it (then `steps` may be empty).
//! `"restart": true` on a step first replaces the instance with a fresh one that loads the last
//! committed state (`Plugin::save`), as after a trap or a restart of the gateway.
//!
//! Points can also come from CSV (a smoke run: no expectations): one point per line,
//! `now,device,tag,value` (an optional header line with those names; `#` starts a comment line),
//! `now` in Unix ms, `value` as JSON (`21.5`, `true`, `"text"`; anything else is a bad point);
//! consecutive lines with the same `now` make one `on-batch` call.

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value as Json;

use super::host::{
    Batch, CallFailure, DataPoint, Emit, Emits, LoadedPlugin, PluginEngine, PluginInstance, WitQuality, WitValue,
};
use crate::base::point::Registry;
use crate::config::PluginLimits;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    #[serde(default)]
    pub config: serde_json::Map<String, Json>,
    #[serde(default)]
    pub limits: Limits,
    /// `init` must refuse the config with a message containing this.
    pub expect_init_error: Option<String>,
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// The same limits as a deployment's `limits` table, with the same defaults.
pub type Limits = PluginLimits;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Gateway time of the call, Unix ms (not with a generator).
    #[serde(default)]
    pub now: i64,
    #[serde(default)]
    pub points: Vec<InPoint>,
    /// Call `on-tick` instead of `on-batch`.
    #[serde(default)]
    pub tick: bool,
    /// Before this step's calls, replace the instance with a fresh one that loads the last
    /// committed state, as after a trap or a gateway restart.
    #[serde(default)]
    pub restart: bool,
    /// One `on-batch` call with one point per instant.
    pub series: Option<Series>,
    /// One `on-tick` call per instant.
    pub ticks: Option<Span>,
    pub expect: Option<Vec<Expected>>,
    /// Compare only the emits that match.
    pub expect_only: Option<Only>,
    /// The call must trap with this kind (`timeout`, `memory`, `panic`, `abort`, …).
    pub expect_trap: Option<String>,
}

/// Instants from `from` to `to` inclusive, `every` apart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    pub from: i64,
    pub to: i64,
    pub every: Every,
}

/// Milliseconds, or a duration string (`"500ms"`, `"1s"`, `"1m"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Every {
    Ms(u64),
    Text(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    pub device: String,
    pub tag: String,
    pub from: i64,
    pub to: i64,
    pub every: Every,
    /// `"linear:A..B"`, a list (cycled through), or one constant.
    pub values: Json,
}

/// Which emits an `expect` is about.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Only {
    pub output: Option<String>,
    pub device: Option<String>,
    pub tag: Option<String>,
}

impl Only {
    fn keeps(&self, e: &Emitted) -> bool {
        self.output.as_ref().is_none_or(|o| *o == e.output)
            && self.device.as_ref().is_none_or(|d| *d == e.device)
            && self.tag.as_ref().is_none_or(|t| *t == e.tag)
    }
}

impl Span {
    fn instants(&self) -> Result<Vec<i64>, String> {
        let every = match &self.every {
            Every::Ms(ms) => *ms,
            Every::Text(t) => humantime::parse_duration(t).map_err(|e| format!("every `{t}`: {e}"))?.as_millis() as u64,
        };
        if every == 0 {
            return Err("every must be more than 0".into());
        }
        if self.to < self.from {
            return Err(format!("to ({}) is before from ({})", self.to, self.from));
        }
        let n = (self.to - self.from) as u64 / every + 1;
        if n > 1_000_000 {
            return Err(format!("{n} instants: at most 1,000,000 per generator"));
        }
        Ok((0..n).map(|i| self.from + (i * every) as i64).collect())
    }
}

impl Series {
    /// The calls it makes: (now, point).
    fn points(&self) -> Result<Vec<(i64, InPoint)>, String> {
        let at = Span { from: self.from, to: self.to, every: self.every.clone() }.instants()?;
        let n = at.len();
        let value = |i: usize| -> Result<Json, String> {
            match &self.values {
                Json::String(s) if s.starts_with("linear:") => {
                    let (a, b) = s["linear:".len()..]
                        .split_once("..")
                        .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)))
                        .ok_or_else(|| format!("values `{s}`: write linear:FROM..TO, e.g. linear:0..10"))?;
                    let x = if n > 1 { a + (b - a) * i as f64 / (n - 1) as f64 } else { a };
                    Ok(serde_json::Number::from_f64(x).map_or(Json::Null, Json::Number))
                }
                Json::Array(list) if list.is_empty() => Err("values: an empty list".into()),
                Json::Array(list) => Ok(list[i % list.len()].clone()),
                v => Ok(v.clone()),
            }
        };
        at.iter()
            .enumerate()
            .map(|(i, &now)| {
                Ok((
                    now,
                    InPoint { device: self.device.clone(), tag: self.tag.clone(), value: value(i)?, ts: Some(now) },
                ))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InPoint {
    pub device: String,
    pub tag: String,
    pub value: Json,
    pub ts: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    pub device: String,
    pub tag: String,
    pub value: Json,
    pub output: Option<String>,
    pub quality: Option<String>,
    pub ts: Option<i64>,
}

/// One emitted point in plain form.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub output: String,
    pub device: String,
    pub tag: String,
    pub value: Json,
    pub quality: &'static str,
    pub ts: i64,
}

impl Emitted {
    /// One line of `--print`: the emit as an `expect` entry, with the step it came from.
    pub fn to_json(&self, step: usize) -> Json {
        serde_json::json!({
            "step": step, "output": self.output, "device": self.device, "tag": self.tag,
            "value": self.value, "quality": self.quality, "ts": self.ts,
        })
    }
}

/// A plugin instance under test.
pub struct TestHost {
    registry: Arc<Registry>,
    loaded: LoadedPlugin,
    config_json: String,
    memory: u64,
    call_timeout: std::time::Duration,
    instance: PluginInstance,
    seq: u64,
    /// The last committed state, kept as the gateway keeps it.
    state: Option<Arc<[u8]>>,
    _cache: tempdir::TempCache,
}

mod tempdir {
    /// A compile cache that is removed when the harness ends.
    pub struct TempCache(pub std::path::PathBuf);
    impl Drop for TempCache {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl TestHost {
    pub fn load(wasm: &Path, config: &serde_json::Map<String, Json>, limits: &Limits) -> Result<Self, String> {
        let dir =
            std::env::temp_dir().join(format!("updraft-plugin-test-{}-{}", std::process::id(), fastrand::u64(..)));
        let cache = tempdir::TempCache(dir.clone());
        let engine = PluginEngine::new(&dir).map_err(|e| format!("{e:#}"))?;
        let loaded = engine.load(wasm).map_err(|e| e.to_string())?;
        let registry = Arc::new(Registry::default());
        let config_json = serde_json::to_string(config).map_err(|e| e.to_string())?;
        let instance = loaded
            .instantiate("under-test", &config_json, limits.memory.0, limits.call_timeout.0, all_tags(&registry), None)
            .map_err(init_failure)?;
        Ok(TestHost {
            registry,
            loaded,
            config_json,
            memory: limits.memory.0,
            call_timeout: limits.call_timeout.0,
            instance,
            seq: 0,
            state: None,
            _cache: cache,
        })
    }

    /// Commits what a successful call staged, as the gateway does.
    fn commit(&mut self) {
        if let Some(blob) = self.instance.take_staged() {
            let blob: Arc<[u8]> = Arc::from(blob);
            self.instance.committed(blob.clone());
            self.state = Some(blob);
        }
    }

    /// Replaces the instance with a fresh one that loads the last committed state, as the
    /// gateway does after a trap or a restart.
    pub fn restart(&mut self) -> Result<(), String> {
        self.instance = self
            .loaded
            .instantiate(
                "under-test",
                &self.config_json,
                self.memory,
                self.call_timeout,
                all_tags(&self.registry),
                self.state.clone(),
            )
            .map_err(init_failure)?;
        Ok(())
    }

    /// Calls `on-batch` with the points at gateway time `now`.
    pub fn batch(&mut self, now: i64, points: &[InPoint]) -> Result<Vec<Emitted>, CallFailure> {
        let points = points
            .iter()
            .map(|p| {
                let key = self.registry.intern(&p.device, &p.tag);
                let value = to_wit(&p.value);
                DataPoint {
                    tag: key.id,
                    quality: if value.is_some() { WitQuality::Good } else { WitQuality::Bad },
                    value,
                    ts: p.ts.unwrap_or(now),
                }
            })
            .collect();
        self.seq += 1;
        let emits = self.instance.on_batch(&Batch { seq: self.seq, points }, now)?;
        self.commit();
        Ok(flatten(emits))
    }

    /// Calls `on-tick` at gateway time `now`.
    pub fn tick(&mut self, now: i64) -> Result<Vec<Emitted>, CallFailure> {
        let emits = self.instance.on_tick(now)?;
        self.commit();
        Ok(flatten(emits))
    }
}

fn init_failure(f: CallFailure) -> String {
    match f {
        CallFailure::Error(m) => format!("init refused the config: {m}"),
        CallFailure::Trap { kind, reason } => format!("init trapped ({kind}): {reason}"),
    }
}

/// Points first, then messages (as `Emitted` with the subject as device, an empty tag, and the
/// payload parsed as JSON, or as a string if it is not JSON).
fn flatten(e: Emits) -> Vec<Emitted> {
    let mut out: Vec<Emitted> = e.points.into_iter().map(plain).collect();
    out.extend(e.messages.into_iter().map(|m| {
        Emitted {
            output: if m.output.is_empty() { "default".into() } else { m.output },
            device: m.subject,
            tag: String::new(),
            value: serde_json::from_slice(&m.payload)
                .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&m.payload).into_owned())),
            quality: "good",
            ts: 0,
        }
    }));
    out
}

fn to_wit(v: &Json) -> Option<WitValue> {
    match v {
        Json::Bool(b) => Some(WitValue::Boolean(*b)),
        Json::Number(n) => Some(match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => WitValue::Int(i),
            (None, Some(u)) => WitValue::Uint(u),
            _ => WitValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        }),
        Json::String(t) => Some(WitValue::Text(t.clone())),
        _ => None,
    }
}

fn plain(e: Emit) -> Emitted {
    let value = match e.value {
        Some(WitValue::Boolean(b)) => Json::from(b),
        Some(WitValue::Int(i)) => Json::from(i),
        Some(WitValue::Uint(u)) => Json::from(u),
        Some(WitValue::Float(f)) => serde_json::Number::from_f64(f).map(Json::Number).unwrap_or(Json::Null),
        Some(WitValue::Text(t)) => Json::String(t),
        None => Json::Null,
    };
    Emitted {
        output: if e.output.is_empty() { "default".into() } else { e.output },
        device: e.device,
        tag: e.tag,
        value,
        quality: if e.quality == WitQuality::Good { "good" } else { "bad" },
        ts: e.ts,
    }
}

fn values_equal(a: &Json, b: &Json) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

/// Runs a fixture file against a plugin; returns one line per failed step (empty when all pass).
pub fn run_fixture(wasm: &Path, fixture: &Path) -> Result<Vec<String>, String> {
    run_fixture_with(wasm, fixture, &mut |_, _| {})
}

/// Like [`run_fixture`], handing every call's emits to `seen` (step number from 1, emits), for
/// `updraft plugin test --print`.
pub fn run_fixture_with(
    wasm: &Path,
    fixture: &Path,
    seen: &mut dyn FnMut(usize, &[Emitted]),
) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(fixture).map_err(|e| format!("{}: {e}", fixture.display()))?;
    let fx: Fixture = if fixture.extension().is_some_and(|e| e == "csv") {
        csv_fixture(&text)?
    } else {
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", fixture.display()))?
    };
    let loaded = TestHost::load(wasm, &fx.config, &fx.limits);
    let mut host = match (loaded, &fx.expect_init_error) {
        (Err(e), Some(want)) if e.contains(want.as_str()) => return Ok(Vec::new()),
        (Err(e), Some(want)) => {
            return Ok(vec![format!("{}: init failed, but not with `{want}`: {e}", fixture.display())])
        }
        (Err(e), None) => return Err(e),
        (Ok(_), Some(want)) => {
            return Ok(vec![format!(
                "{}: expected init to refuse the config with `{want}`; it accepted it",
                fixture.display()
            )])
        }
        (Ok(h), None) => h,
    };
    let mut failures = Vec::new();
    for (i, step) in fx.steps.iter().enumerate() {
        let where_ = format!("{} step {} (now {})", fixture.display(), i + 1, step.now);
        let calls: Vec<Call> = match (&step.series, &step.ticks) {
            (Some(_), Some(_)) => return Err(format!("{where_}: a step has `series` or `ticks`, not both")),
            (Some(series), None) => series
                .points()
                .map_err(|e| format!("{where_}: series: {e}"))?
                .into_iter()
                .map(|(now, p)| Call::Batch(now, vec![p]))
                .collect(),
            (None, Some(span)) => {
                span.instants().map_err(|e| format!("{where_}: ticks: {e}"))?.into_iter().map(Call::Tick).collect()
            }
            (None, None) if step.tick => vec![Call::Tick(step.now)],
            (None, None) => vec![Call::Batch(step.now, step.points.clone())],
        };
        if step.restart {
            host.restart()?;
        }
        let mut got = Vec::new();
        let mut failed = None;
        for call in calls {
            let (now, result) = match call {
                Call::Tick(now) => (now, host.tick(now)),
                Call::Batch(now, points) => (now, host.batch(now, &points)),
            };
            match result {
                Ok(emits) => {
                    seen(i + 1, &emits);
                    got.extend(emits);
                }
                Err(f) => {
                    failed = Some((now, f));
                    break;
                }
            }
        }
        match (failed, &step.expect_trap) {
            (Some((_, CallFailure::Trap { kind, .. })), Some(want)) if kind == want => {
                // The gateway recreates a trapped instance; so does the harness.
                host.restart()?;
            }
            (Some((now, f)), _) => failures.push(format!("{where_}: the call at {now} failed: {f:?}")),
            (None, Some(want)) => failures.push(format!("{where_}: expected a `{want}` trap, the call succeeded")),
            (None, None) => {
                if let Some(expect) = &step.expect {
                    let only = step.expect_only.clone().unwrap_or_default();
                    got.retain(|e| only.keeps(e));
                    if let Some(problem) = compare(&got, expect) {
                        failures.push(format!("{where_}: {problem}"));
                    }
                }
            }
        }
    }
    Ok(failures)
}

/// One call a step makes.
enum Call {
    Batch(i64, Vec<InPoint>),
    Tick(i64),
}

fn compare(got: &[Emitted], expect: &[Expected]) -> Option<String> {
    if got.len() != expect.len() {
        return Some(format!("expected {} emits, got {}: {got:?}", expect.len(), got.len()));
    }
    for (g, e) in got.iter().zip(expect) {
        let ok = g.device == e.device
            && g.tag == e.tag
            && values_equal(&g.value, &e.value)
            && e.output.as_ref().is_none_or(|o| *o == g.output)
            && e.quality.as_ref().is_none_or(|q| q == g.quality)
            && e.ts.is_none_or(|t| t == g.ts);
        if !ok {
            return Some(format!("expected {e:?}, got {g:?}"));
        }
    }
    None
}

/// CSV input: `now,device,tag,value` lines, no expectations (a smoke run that must not fail).
fn csv_fixture(text: &str) -> Result<Fixture, String> {
    let mut steps: Vec<Step> = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 4 || f[0] == "now" {
            if n == 0 && f.first() == Some(&"now") {
                continue;
            }
            return Err(format!("line {}: expected now,device,tag,value", n + 1));
        }
        let now: i64 = f[0].parse().map_err(|_| format!("line {}: bad time `{}`", n + 1, f[0]))?;
        let value: Json = serde_json::from_str(f[3]).unwrap_or(Json::Null);
        let point = InPoint { device: f[1].into(), tag: f[2].into(), value, ts: Some(now) };
        match steps.last_mut() {
            Some(s) if s.now == now => s.points.push(point),
            _ => steps.push(Step {
                now,
                points: vec![point],
                tick: false,
                restart: false,
                series: None,
                ticks: None,
                expect: None,
                expect_only: None,
                expect_trap: None,
            }),
        }
    }
    Ok(Fixture { config: Default::default(), limits: Limits::default(), expect_init_error: None, steps })
}

/// The harness feeds the plugin whatever its fixture names, so it may describe every tag.
fn all_tags(registry: &Arc<Registry>) -> super::host::TagView {
    super::host::TagView { registry: registry.clone(), subscribe: Arc::from(["*/*".to_owned()]) }
}
