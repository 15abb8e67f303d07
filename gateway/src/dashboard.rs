//! The web dashboard: one page, its script and its style sheet, compiled into the binary and
//! served by the HTTP API at `/`. No CDN, no build step, no framework: the page reads
//! `/api/v1/events` (server-sent events, the status document every second) and redraws.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::api::Ctx;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// Only the page's own files may run or load, so a value a device or plugin reports (a string
/// tag, an error message) can never become markup or script, even if the page had a bug.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The assets change with the binary; a browser must not keep an old script after an
            // upgrade.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}
