//! The local HTTP API: the dependable way to the current values, plus health and metrics.
//!
//! rumqttd hands a late MQTT subscriber only part of a large retained set (at QoS 1 at most 100
//! messages), so `GET /api/v1/values` is the documented way for an HMI or script to read every
//! current value at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::base::point::{Point, Quality, Value};
use crate::health::Health;
use crate::hub::CurrentValues;
use crate::metrics::Metrics;

/// What the API serves from.
#[derive(Clone)]
pub struct Ctx {
    gateway: Arc<str>,
    values: Arc<CurrentValues>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Ctx {
    pub fn new(gateway: &str, values: Arc<CurrentValues>, metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Ctx { gateway: Arc::from(gateway), values, metrics, health }
    }
}

#[derive(Serialize)]
struct PointView<'a> {
    value: Option<&'a Value>,
    ts: i64,
    quality: Quality,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl<'a> From<&'a Point> for PointView<'a> {
    fn from(p: &'a Point) -> Self {
        PointView { value: p.value.as_ref(), ts: p.ts, quality: p.quality, error: p.error.as_deref() }
    }
}

fn values_json(ctx: &Ctx, device: Option<&str>) -> serde_json::Value {
    let snapshot = ctx.values.snapshot(device);
    let devices: BTreeMap<&str, BTreeMap<&str, PointView<'_>>> = snapshot
        .iter()
        .map(|(d, tags)| (&**d, tags.iter().map(|(t, p)| (&**t, PointView::from(p))).collect()))
        .collect();
    serde_json::json!({ "gateway": &*ctx.gateway, "devices": devices })
}

async fn all_values(State(ctx): State<Ctx>) -> Json<serde_json::Value> {
    Json(values_json(&ctx, None))
}

async fn device_values(State(ctx): State<Ctx>, Path(device): Path<String>) -> Response {
    let v = values_json(&ctx, Some(&device));
    if v["devices"].as_object().is_some_and(|m| m.is_empty()) {
        return (StatusCode::NOT_FOUND, format!("no values for device `{device}`\n")).into_response();
    }
    Json(v).into_response()
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ctx.metrics.render()).into_response()
}

/// Liveness: answered by the runtime, so it fails only when the process is stuck.
async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: 200 when every device delivers good reads and every sink moves its backlog, 503
/// otherwise; the body says which ones, with their last good read and last acknowledgement.
async fn ready(State(ctx): State<Ctx>) -> Response {
    let report = ctx.health.report();
    let code = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(report)).into_response()
}

/// Binds the API listener (failing loudly if the port is taken) and serves until `cancel`.
pub async fn start(listen: SocketAddr, ctx: Ctx, cancel: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("the HTTP API cannot listen on {listen}: {e}; change [api] listen"))
    })?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/values", get(all_values))
        .route("/api/v1/values/:device", get(device_values))
        .with_state(ctx);
    tokio::spawn(async move {
        let r = axum::serve(listener, app).with_graceful_shutdown(async move { cancel.cancelled().await }).await;
        if let Err(e) = r {
            warn!(error = %e, "HTTP API stopped.");
        }
    });
    info!(%addr, "HTTP API listening.");
    Ok(addr)
}
