//! The local HTTP API: the dependable way to the current values, plus health and metrics.
//!
//! rumqttd hands a late MQTT subscriber only part of a large retained set (at QoS 1 at most 100
//! messages), so `GET /api/v1/values` is the documented way for an HMI or script to read every
//! current value at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::hub::Snapshot;
use crate::runtime::ReloadRequest;
use crate::status::{PointView, Sources};

/// What the API serves from.
#[derive(Clone)]
pub struct Ctx {
    sources: Arc<Sources>,
    reload: Option<Reload>,
}

/// How `POST /api/v1/reload` reaches the loop that owns the gateway, and who may ask.
#[derive(Clone)]
struct Reload {
    tx: mpsc::Sender<ReloadRequest>,
    token: Option<Arc<str>>,
}

impl Ctx {
    pub fn new(sources: Arc<Sources>) -> Self {
        Ctx { sources, reload: None }
    }

    /// Takes reload requests on `tx`, from callers presenting `token` if there is one.
    pub fn with_reload(mut self, tx: mpsc::Sender<ReloadRequest>, token: Option<String>) -> Self {
        self.reload = Some(Reload { tx, token: token.map(Arc::from) });
        self
    }
}

type Tags<'a> = BTreeMap<&'a str, BTreeMap<&'a str, PointView<'a>>>;

fn view(snapshot: &Snapshot) -> Tags<'_> {
    snapshot.iter().map(|(d, tags)| (&**d, tags.iter().map(|(t, p)| (&**t, PointView::from(p))).collect())).collect()
}

/// Device values, and (for the whole gateway) what plugins derived, as a separate section so a
/// plugin's output never shadows a device's tag of the same name.
fn values_json(ctx: &Ctx, device: Option<&str>) -> serde_json::Value {
    let s = &ctx.sources;
    let snapshot = s.values.snapshot(device);
    let mut out = serde_json::json!({ "gateway": &*s.gateway, "devices": view(&snapshot) });
    if device.is_none() {
        out["derived"] = serde_json::json!(view(&s.values.snapshot_derived()));
    }
    out
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ctx.sources.metrics.render()).into_response()
}

/// Everything the dashboard shows, once.
async fn status(State(ctx): State<Ctx>) -> Json<serde_json::Value> {
    Json(ctx.sources.status())
}

/// The status document every second as server-sent events (`event: status`), for the dashboard.
/// A stream per viewer costs one JSON rendering per second; the browser reconnects by itself.
async fn events(State(ctx): State<Ctx>) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures::stream::unfold((ctx, tick), |(ctx, mut tick)| async move {
        tick.tick().await;
        let event = Event::default().event("status").json_data(ctx.sources.status()).unwrap_or_default();
        Some((Ok(event), (ctx, tick)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Liveness: answered by the runtime, so it fails only when the process is stuck.
async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: 200 when every device delivers good reads and every sink moves its backlog, 503
/// otherwise; the body says which ones, with their last good read and last acknowledgement.
async fn ready(State(ctx): State<Ctx>) -> Response {
    let report = ctx.sources.health.report();
    let code = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(report)).into_response()
}

/// Reloads the config file: 200 with what changed, 422 with why it was refused (the running
/// config stays). With `[api] token_file`, only for `Authorization: Bearer TOKEN`; without one,
/// only when the API listens on loopback (anyone who can reach a network port could otherwise
/// make the gateway restart its devices at will).
async fn reload(State(ctx): State<Ctx>, ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap) -> Response {
    let Some(r) = ctx.reload.clone() else {
        return (StatusCode::NOT_FOUND, "reload is not available here\n").into_response();
    };
    match &r.token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes())) {
                warn!(%peer, "Reload refused: missing or wrong token.");
                return (StatusCode::UNAUTHORIZED, "a reload needs `Authorization: Bearer TOKEN` ([api] token_file)\n")
                    .into_response();
            }
        }
        None if !peer.ip().is_loopback() => {
            return (StatusCode::FORBIDDEN, "reloads over the network need [api] token_file\n").into_response();
        }
        None => {}
    }
    let (reply, answer) = oneshot::channel();
    if r.tx.send(ReloadRequest { reply }).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response();
    }
    match answer.await {
        Ok(Ok(diff)) => Json(serde_json::json!({ "applied": true, "changes": diff })).into_response(),
        Ok(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({ "applied": false, "error": e })))
            .into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response(),
    }
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
        .route("/api/v1/status", get(status))
        .route("/api/v1/events", get(events))
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/values/:device", get(device_values))
        .merge(crate::dashboard::routes())
        .with_state(ctx);
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let r = axum::serve(listener, app).with_graceful_shutdown(async move { cancel.cancelled().await }).await;
        if let Err(e) = r {
            warn!(error = %e, "HTTP API stopped.");
        }
    });
    info!(%addr, "HTTP API listening.");
    Ok(addr)
}
