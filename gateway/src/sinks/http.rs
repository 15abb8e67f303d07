//! The HTTP transport of a sink: each message is POSTed to the rendered URL; a 2xx answer
//! acknowledges it.
//!
//! One request at a time, so each device's points arrive in order even across retries. Transient
//! failures (connection errors, timeouts, 5xx, 401/403 while a secret is being rotated, 408, 429)
//! are retried with backoff and the data stays buffered; any other 4xx means the cloud will never
//! take that message, so its points are counted as rejected and logged rather than blocking the
//! queue forever.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::outbox::{Message, Outbox};
use super::{tls, SinkStats};
use crate::backoff::backoff;
use crate::config::HttpNorth;

pub struct HttpSink {
    name: String,
    cfg: HttpNorth,
    client: reqwest::Client,
    stats: Arc<SinkStats>,
}

enum Failure {
    Retry(String),
    Reject(String),
}

impl HttpSink {
    pub fn new(name: &str, _gateway: &str, cfg: &HttpNorth, stats: Arc<SinkStats>) -> Result<Self, String> {
        tls::install_default_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0.min(std::time::Duration::from_secs(10)))
            .user_agent(concat!("updraft/", env!("CARGO_PKG_VERSION")));
        if cfg.url.starts_with("https://") {
            let tls = tls::client_config(cfg.ca_file.as_deref(), cfg.cert_file.as_deref(), cfg.key_file.as_deref())
                .map_err(|e| format!("sink `{name}`: {e}"))?;
            builder = builder.use_preconfigured_tls(tls);
        }
        let client = builder.build().map_err(|e| format!("sink `{name}`: cannot build the HTTP client: {e}"))?;
        Ok(HttpSink { name: name.to_owned(), cfg: cfg.clone(), client, stats })
    }

    pub async fn run(self, mut outbox: Outbox, cancel: CancellationToken) {
        outbox.set_template(&self.cfg.url);
        let mut failures = 0u32;
        loop {
            let msg = loop {
                if let Some(m) = outbox.next_message() {
                    break m;
                }
                tokio::select! {
                    _ = outbox.wait() => {}
                    _ = cancel.cancelled() => return,
                }
            };
            loop {
                self.stats.messages_sent.inc();
                match self.post(&msg).await {
                    Ok(()) => {
                        if self.stats.connected.get() == 0 {
                            info!(sink = %self.name, url = %self.cfg.url, "Cloud endpoint reachable.");
                            self.stats.connects.inc();
                        }
                        self.stats.connected.set(1);
                        failures = 0;
                        outbox.done(msg.token);
                        break;
                    }
                    Err(Failure::Reject(e)) => {
                        error!(sink = %self.name, url = %msg.target, points = msg.points, error = %e,
                            "The cloud refused a message for good; its points are dropped (counted as rejected).");
                        outbox.rejected(msg.token);
                        break;
                    }
                    Err(Failure::Retry(e)) => {
                        self.stats.connected.set(0);
                        self.stats.connect_failures.inc();
                        failures += 1;
                        let delay = backoff(failures);
                        warn!(sink = %self.name, url = %msg.target, error = %e, retry_in = ?delay, "Cloud request failed; points stay buffered.");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = cancel.cancelled() => return,
                        }
                    }
                }
            }
        }
    }

    async fn post(&self, msg: &Message) -> Result<(), Failure> {
        let content_type = if msg.raw { "application/octet-stream" } else { "application/json" };
        let mut req =
            self.client.post(&msg.target).header(reqwest::header::CONTENT_TYPE, content_type).body(msg.payload.clone());
        // Secrets are re-read per request: a rotated token is picked up without a restart.
        if let Some(f) = &self.cfg.token_file {
            req = req.bearer_auth(tls::read_secret(f).map_err(Failure::Retry)?);
        } else if let Some(user) = &self.cfg.username {
            let password = match &self.cfg.password_file {
                Some(f) => Some(tls::read_secret(f).map_err(Failure::Retry)?),
                None => None,
            };
            req = req.basic_auth(user, password);
        }
        let resp = req.send().await.map_err(|e| Failure::Retry(error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        let text = format!("HTTP {status}: {}", body.chars().take(200).collect::<String>());
        let transient = status.is_server_error() || matches!(status.as_u16(), 401 | 403 | 408 | 429);
        Err(if transient { Failure::Retry(text) } else { Failure::Reject(text) })
    }
}

/// reqwest's top-level error says little ("error sending request"); the cause says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
