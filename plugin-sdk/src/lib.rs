#![doc = include_str!("../README.md")]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use serde::de::DeserializeOwned;

pub mod helpers;

/// Generated bindings of the `updraft:plugin@0.3.0` world. Plugin authors do not need them; the
/// [`export!`] macro wires a [`Plugin`] to them.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "updraft-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_updraft_plugin",
        default_bindings_module: "updraft_plugin_sdk::bindings",
    });
}

use bindings::exports::updraft::plugin::plugin as wit;
use bindings::updraft::plugin::types as wt;

/// Unix time in milliseconds.
pub type Timestamp = i64;

/// A reading's value. Later worlds may add kinds, so a `match` needs a `_` arm.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Text: a serial number, a recipe name, a status message.
    String(String),
}

impl Value {
    /// The value as a number (`true` is 1); `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        Some(match self {
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::Int(i) => *i as f64,
            Value::UInt(u) => *u as f64,
            Value::Float(f) => *f,
            Value::String(_) => return None,
        })
    }

    /// The value as text, if it is text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    Good,
    Bad,
}

/// The names of a tag, resolved once and shared by every point of that tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagInfo {
    pub id: u32,
    pub device: String,
    pub tag: String,
    pub unit: Option<String>,
}

/// One reading handed to [`Plugin::on_batch`].
#[derive(Debug, Clone)]
pub struct Point {
    pub info: Rc<TagInfo>,
    /// `None` exactly when the read failed (`quality` is `Bad`).
    pub value: Option<Value>,
    pub quality: Quality,
    pub ts: Timestamp,
}

impl Point {
    pub fn device(&self) -> &str {
        &self.info.device
    }
    pub fn tag(&self) -> &str {
        &self.info.tag
    }
    /// The value as a number, if the point is good and numeric.
    pub fn number(&self) -> Option<f64> {
        self.value.as_ref().and_then(Value::as_f64)
    }
}

/// Collects what a call emits.
#[derive(Debug, Default)]
pub struct Emitter {
    out: Vec<wt::Emit>,
    messages: Vec<wt::Message>,
}

impl Emitter {
    /// Emits a good point to the `default` output.
    pub fn point(&mut self, device: &str, tag: &str, value: Value, ts: Timestamp) {
        self.emit("default", device, tag, Some(value), Quality::Good, ts);
    }

    /// Emits a good point to a named output: a value and good quality go together.
    pub fn good(&mut self, output: &str, device: &str, tag: &str, value: Value, ts: Timestamp) {
        self.emit(output, device, tag, Some(value), Quality::Good, ts);
    }

    /// Emits a bad point (no value) to a named output, for "could not compute" (an input was bad,
    /// a window was empty): it travels with the point's error-free `quality: "bad"`.
    pub fn bad(&mut self, output: &str, device: &str, tag: &str, ts: Timestamp) {
        self.emit(output, device, tag, None, Quality::Bad, ts);
    }

    /// Emits a point to a named output of the deployment. Prefer [`Emitter::good`] and
    /// [`Emitter::bad`], which cannot pair a value with the wrong quality.
    pub fn emit(
        &mut self,
        output: &str,
        device: &str,
        tag: &str,
        value: Option<Value>,
        quality: Quality,
        ts: Timestamp,
    ) {
        self.out.push(wt::Emit {
            output: output.to_owned(),
            device: device.to_owned(),
            tag: tag.to_owned(),
            value: value.map(to_wit_value),
            quality: match quality {
                Quality::Good => wt::Quality::Good,
                Quality::Bad => wt::Quality::Bad,
            },
            ts,
        });
    }

    /// Emits a message published as is (for example a cloud's batch JSON) to a named output; its
    /// topic is the output's template with `{subject}` replaced by `subject`.
    pub fn message(&mut self, output: &str, subject: &str, payload: Vec<u8>) {
        self.messages.push(wt::Message { output: output.to_owned(), subject: subject.to_owned(), payload });
    }

    /// Passes a point through unchanged (to the `default` output).
    pub fn forward(&mut self, p: &Point) {
        self.emit("default", p.device(), p.tag(), p.value.clone(), p.quality, p.ts);
    }

    /// Points and messages emitted so far.
    pub fn len(&self) -> usize {
        self.out.len() + self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn finish(self) -> wt::Emits {
        wt::Emits { points: self.out, messages: self.messages }
    }
}

/// A plugin's failure. The gateway logs it and drops the call's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The deployment's `config` is unusable (from `init`): the plugin does not run; `updraft
    /// check` shows the message at the key it names first. Name the key in the message.
    InvalidConfig(String),
    Internal(String),
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::InvalidConfig(msg.into())
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
}

/// What a plugin implements. One value of the type lives for the life of the plugin instance.
pub trait Plugin: Sized + 'static {
    /// The deployment's `config` table, deserialized with serde. Use `#[serde(deny_unknown_fields)]`:
    /// `updraft check` runs `init`, so a misspelt key is refused at its line.
    type Config: DeserializeOwned;

    /// The outputs this plugin emits to. `updraft check` refuses a deployment that leaves one
    /// unmapped in `[plugins.NAME.outputs]` (`default` always has a template) or maps a name not
    /// listed here.
    const OUTPUTS: &'static [&'static str] = &["default"];

    /// The `device/tag` filters (`*` for a whole name) a deployment that sets no `subscribe` uses.
    const SUBSCRIBE: &'static [&'static str] = &[];

    fn init(config: Self::Config) -> Result<Self, Error>;

    /// Called with the subscribed points, in arrival order. `now` is the gateway clock.
    fn on_batch(&mut self, points: &[Point], now: Timestamp, out: &mut Emitter) -> Result<(), Error>;

    /// Called every `tick` of the deployment, even without data: close time windows here.
    fn on_tick(&mut self, _now: Timestamp, _out: &mut Emitter) -> Result<(), Error> {
        Ok(())
    }

    /// The state to keep across traps, reloads and gateway restarts (a running total, an open
    /// window), taken after every successful call and committed by the gateway together with that
    /// call's outputs; at most 64 KiB ([`state::encode`] serializes with serde). `None`, the
    /// default, keeps nothing.
    fn save(&self) -> Option<Vec<u8>> {
        None
    }

    /// Called right after `init` with the last committed state, if there is one: the plugin
    /// resumes from its last committed call, so nothing it emitted is repeated or lost and no
    /// input is counted twice. An error here is treated like an `init` error.
    fn restore(&mut self, _state: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

/// Helpers for [`Plugin::save`] and [`Plugin::restore`]: state as JSON through serde.
pub mod state {
    use super::Error;

    /// `value` as bytes to return from [`super::Plugin::save`].
    pub fn encode<T: serde::Serialize>(value: &T) -> Option<Vec<u8>> {
        serde_json::to_vec(value).ok()
    }

    /// Bytes from [`super::Plugin::restore`] back into a value. A state saved by an older version
    /// of the plugin that no longer fits is an error: decide in `restore` whether to start over.
    pub fn decode<T: serde::de::DeserializeOwned>(state: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(state).map_err(|e| Error::internal(format!("saved state: {e}")))
    }
}

/// Log levels for [`log`].
pub use bindings::updraft::plugin::log::Level;

/// Writes a line to the gateway's log under this plugin's name.
pub fn log(level: Level, message: &str) {
    bindings::updraft::plugin::log::log(level, message);
}

thread_local! {
    static TAGS: RefCell<HashMap<u32, Rc<TagInfo>>> = RefCell::new(HashMap::new());
}

fn tag_info(id: u32) -> Rc<TagInfo> {
    if let Some(i) = TAGS.with(|t| t.borrow().get(&id).cloned()) {
        return i;
    }
    let info = match bindings::updraft::plugin::tags::describe(id) {
        Some(i) => TagInfo { id, device: i.device, tag: i.tag, unit: i.unit },
        None => TagInfo { id, device: String::new(), tag: format!("#{id}"), unit: None },
    };
    let info = Rc::new(info);
    TAGS.with(|t| t.borrow_mut().insert(id, info.clone()));
    info
}

fn to_wit_value(v: Value) -> wt::Value {
    match v {
        Value::Bool(b) => wt::Value::Boolean(b),
        Value::Int(i) => wt::Value::Int(i),
        Value::UInt(u) => wt::Value::Uint(u),
        Value::Float(f) => wt::Value::Float(f),
        Value::String(s) => wt::Value::Text(s),
    }
}

fn from_wit_value(v: wt::Value) -> Value {
    match v {
        wt::Value::Boolean(b) => Value::Bool(b),
        wt::Value::Int(i) => Value::Int(i),
        wt::Value::Uint(u) => Value::UInt(u),
        wt::Value::Float(f) => Value::Float(f),
        wt::Value::Text(s) => Value::String(s),
    }
}

fn to_wit_error(e: Error) -> wt::PluginError {
    match e {
        Error::InvalidConfig(m) => wt::PluginError::InvalidConfig(m),
        Error::Internal(m) => wt::PluginError::Internal(m),
    }
}

/// The glue between the WIT exports and a [`Plugin`]; used by [`export!`].
#[doc(hidden)]
pub mod runtime {
    use super::*;

    pub struct Slot<P>(pub RefCell<Option<P>>);

    // Plugins run single-threaded inside their instance; the slot is only touched by the export
    // functions, never concurrently.
    unsafe impl<P> Sync for Slot<P> {}

    /// serde's message without serde_json's `at line 1 column 8`: a position in the JSON the
    /// gateway built, which the operator never sees (`updraft check` points at their TOML).
    fn config_error(e: &serde_json::Error) -> String {
        let text = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        text.strip_suffix(&suffix).unwrap_or(&text).to_owned()
    }

    pub fn describe<P: Plugin>() -> wt::Manifest {
        let owned = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect();
        wt::Manifest { outputs: owned(P::OUTPUTS), subscribe: owned(P::SUBSCRIBE) }
    }

    pub fn init<P: Plugin>(slot: &Slot<P>, config: String) -> Result<(), wt::PluginError> {
        // A panic aborts the instance; route its message to the gateway log first, so the operator
        // sees why (there is no stderr in the sandbox).
        std::panic::set_hook(Box::new(|info| {
            super::log(Level::Error, &format!("panic: {info}"));
        }));
        let text = if config.trim().is_empty() { "{}".to_owned() } else { config };
        let cfg: P::Config =
            serde_json::from_str(&text).map_err(|e| wt::PluginError::InvalidConfig(config_error(&e)))?;
        let mut p = P::init(cfg).map_err(to_wit_error)?;
        if let Some(saved) = bindings::updraft::plugin::state::load() {
            p.restore(&saved).map_err(to_wit_error)?;
        }
        *slot.0.borrow_mut() = Some(p);
        Ok(())
    }

    /// Stages the plugin's state after a successful call (the gateway commits it with the
    /// outputs).
    fn stage<P: Plugin>(p: &P) -> Result<(), wt::PluginError> {
        match p.save() {
            Some(blob) => bindings::updraft::plugin::state::save(&blob).map_err(wt::PluginError::Internal),
            None => Ok(()),
        }
    }

    pub fn on_batch<P: Plugin>(slot: &Slot<P>, batch: wt::Batch, now: Timestamp) -> Result<wt::Emits, wt::PluginError> {
        let points: Vec<Point> = batch
            .points
            .into_iter()
            .map(|p| Point {
                info: tag_info(p.tag),
                value: p.value.map(from_wit_value),
                quality: match p.quality {
                    wt::Quality::Good => Quality::Good,
                    wt::Quality::Bad => Quality::Bad,
                },
                ts: p.ts,
            })
            .collect();
        let mut out = Emitter::default();
        let mut guard = slot.0.borrow_mut();
        let p = guard.as_mut().ok_or_else(|| wt::PluginError::Internal("on-batch before init".into()))?;
        p.on_batch(&points, now, &mut out).map_err(to_wit_error)?;
        stage(p)?;
        Ok(out.finish())
    }

    pub fn on_tick<P: Plugin>(slot: &Slot<P>, now: Timestamp) -> Result<wt::Emits, wt::PluginError> {
        let mut out = Emitter::default();
        let mut guard = slot.0.borrow_mut();
        let p = guard.as_mut().ok_or_else(|| wt::PluginError::Internal("on-tick before init".into()))?;
        p.on_tick(now, &mut out).map_err(to_wit_error)?;
        stage(p)?;
        Ok(out.finish())
    }

    pub use super::wit::Guest;
    pub type WitBatch = super::wt::Batch;
    pub type WitEmits = super::wt::Emits;
    pub type WitError = super::wt::PluginError;
    pub type WitManifest = super::wt::Manifest;
}

/// Exports a [`Plugin`] type as the plugin of this WASM component.
///
/// ```ignore
/// struct Scale { factor: f64 }
/// impl updraft_plugin_sdk::Plugin for Scale { /* … */ }
/// updraft_plugin_sdk::export!(Scale);
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        static __UPDRAFT_SLOT: $crate::runtime::Slot<$plugin> =
            $crate::runtime::Slot(::std::cell::RefCell::new(None));

        struct __UpdraftExport;

        impl $crate::runtime::Guest for __UpdraftExport {
            fn describe() -> $crate::runtime::WitManifest {
                $crate::runtime::describe::<$plugin>()
            }
            fn init(config: String) -> Result<(), $crate::runtime::WitError> {
                $crate::runtime::init::<$plugin>(&__UPDRAFT_SLOT, config)
            }
            fn on_batch(
                batch: $crate::runtime::WitBatch,
                now: i64,
            ) -> Result<$crate::runtime::WitEmits, $crate::runtime::WitError> {
                $crate::runtime::on_batch::<$plugin>(&__UPDRAFT_SLOT, batch, now)
            }
            fn on_tick(now: i64) -> Result<$crate::runtime::WitEmits, $crate::runtime::WitError> {
                $crate::runtime::on_tick::<$plugin>(&__UPDRAFT_SLOT, now)
            }
        }

        $crate::bindings::__export_updraft_plugin!(__UpdraftExport with_types_in $crate::bindings);
    };
}
