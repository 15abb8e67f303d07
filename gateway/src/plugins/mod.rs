//! Sandboxed WASM plugins: the host (engine, cache, limits) and the runner (threads, batching,
//! restarts, outputs).

pub mod host;
mod runner;
pub mod state;
pub mod testing;

pub use runner::{config_json, output_topic, spawn, PluginStats};
