//! Updraft, an edge gateway for smart industrial parks: southbound drivers poll equipment, an
//! embedded MQTT broker is the park's local data bus, and (later) plugins and northbound sinks
//! shape the data and carry it to the cloud.
//!
//! # Layout
//! - [`config`]: the TOML model, loading with `FILE:LINE:COLUMN` errors, validation.
//! - [`base`]: what everything may import: the point model (`Point`) and its JSON payload, topic
//!   templates, metric primitives.
//! - [`drivers`]: southbound protocols, dispatched in one place; [`drivers::modbus`] has the codec,
//!   planner, driver, config and simulator.
//! - [`hub`]: the bounded internal bus, current values and fan-out to consumers.
//! - [`broker`]: the embedded rumqttd broker and the thread that publishes into it.
//! - [`commands`]: write commands to equipment, local and from the cloud, with their guards.
//! - [`last_values`]: every tag's last value saved to disk and restored at start.
//! - [`health`]: stalled devices and sinks, readiness, the systemd watchdog.
//! - [`api`]: the local HTTP API (current values, health, metrics, status); [`dashboard`]: the
//!   web page it serves; [`status`]: the document the page shows.
//! - [`runtime`]: start-up order and graceful shutdown.
//! - [`telemetry`]: tracing set-up.

pub mod api;
pub mod backoff;
pub mod base;
pub mod broker;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod drivers;
pub mod health;
pub mod hub;
pub mod last_values;
pub mod metrics;
pub mod plugins;
pub mod reload;
pub mod runtime;
pub mod sinks;
pub mod status;
pub mod telemetry;
