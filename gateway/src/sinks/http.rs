//! The HTTP transport of a sink: each message is POSTed to the rendered URL; a 2xx answer
//! acknowledges it.
//!
//! Up to `max_inflight` requests at once, each for a different destination: one device's messages
//! go one at a time, so they arrive in order even across retries. Transient
//! failures (connection errors, timeouts, 502/503/504, 401/403 while a secret is being rotated,
//! 408, 429) are retried with backoff for as long as they last and the data stays buffered; any
//! other 4xx means the cloud will never take that message, so its points are counted as rejected
//! and logged rather than blocking the queue forever. Another server error (500, …) is retried
//! too, but the same one `poison_attempts` times in a row quarantines the message.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tokio::task::JoinSet;

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
    /// A server error that is not "unavailable": the status, and the text.
    Server(u16, String),
    Reject(String),
}

enum Outcome {
    Delivered,
    Rejected,
    /// The same server error `poison_attempts` times in a row: the cloud cannot digest it.
    Poison(String),
    Cancelled,
}

impl HttpSink {
    pub fn new(name: &str, cfg: &HttpNorth, stats: Arc<SinkStats>) -> Result<Self, String> {
        tls::install_default_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0.min(std::time::Duration::from_secs(10)))
            .user_agent(concat!("updraft/", env!("CARGO_PKG_VERSION")));
        if cfg.url.source().starts_with("https://") {
            let tls = tls::client_config(cfg.ca_file.as_deref(), cfg.cert_file.as_deref(), cfg.key_file.as_deref())
                .map_err(|e| format!("sink `{name}`: {e}"))?;
            builder = builder.use_preconfigured_tls(tls);
        }
        let client = builder.build().map_err(|e| format!("sink `{name}`: cannot build the HTTP client: {e}"))?;
        Ok(HttpSink { name: name.to_owned(), cfg: cfg.clone(), client, stats })
    }

    pub async fn run(self, mut outbox: Outbox, cancel: CancellationToken) {
        let this = Arc::new(self);
        let max = usize::from(this.cfg.max_inflight.max(1));
        let mut inflight: JoinSet<(Message, Outcome)> = JoinSet::new();
        // Destinations with a request in flight, and messages waiting for theirs to finish (in
        // order, so a device's messages never overtake each other).
        let mut busy: HashSet<String> = HashSet::new();
        let mut waiting: VecDeque<Message> = VecDeque::new();
        loop {
            while inflight.len() < max {
                // The oldest waiting message whose destination is free is the oldest of its
                // destination, since waiting messages keep their order.
                let msg = match waiting.iter().position(|m| !busy.contains(&m.target)) {
                    Some(i) => waiting.remove(i),
                    // Bounded read-ahead: while every destination is stuck, stop pulling.
                    None if waiting.len() < 4 * max => match outbox.next_message() {
                        Some(m) if busy.contains(&m.target) => {
                            waiting.push_back(m);
                            continue;
                        }
                        m => m,
                    },
                    None => None,
                };
                let Some(msg) = msg else { break };
                busy.insert(msg.target.clone());
                inflight.spawn(this.clone().deliver(msg, cancel.clone()));
            }
            tokio::select! {
                done = inflight.join_next(), if !inflight.is_empty() => {
                    let Some(Ok((msg, outcome))) = done else { continue };
                    busy.remove(&msg.target);
                    match outcome {
                        Outcome::Delivered => outbox.done(msg.token),
                        Outcome::Rejected => outbox.rejected(msg.token),
                        Outcome::Poison(why) => outbox.quarantine(msg, &why),
                        Outcome::Cancelled => {}
                    }
                }
                _ = outbox.wait(), if inflight.len() < max => {}
                _ = cancel.cancelled() => {
                    inflight.abort_all();
                    return;
                }
            }
        }
    }

    /// Sends one message until the cloud takes it or refuses it for good.
    async fn deliver(self: Arc<Self>, msg: Message, cancel: CancellationToken) -> (Message, Outcome) {
        let mut failures = 0u32;
        // The same server error, how many times in a row.
        let mut same: Option<(u16, u32)> = None;
        loop {
            self.stats.messages_sent.inc();
            match self.post(&msg).await {
                Ok(()) => {
                    if self.stats.connected.get() == 0 {
                        info!(sink = %self.name, url = %self.cfg.url, "Cloud endpoint reachable.");
                        self.stats.connects.inc();
                    }
                    self.stats.connected.set(1);
                    return (msg, Outcome::Delivered);
                }
                Err(Failure::Reject(e)) => {
                    error!(sink = %self.name, url = %msg.target, points = msg.points, error = %e,
                        "The cloud refused a message for good; its points are dropped (counted as rejected).");
                    return (msg, Outcome::Rejected);
                }
                Err(Failure::Server(status, e)) => {
                    let n = match same {
                        Some((s, n)) if s == status => n + 1,
                        _ => 1,
                    };
                    if n >= self.cfg.poison_attempts {
                        return (msg, Outcome::Poison(format!("answered {e} {n} times in a row")));
                    }
                    same = Some((status, n));
                    if !self.retry_later(&msg, &e, &mut failures, &cancel).await {
                        return (msg, Outcome::Cancelled);
                    }
                }
                Err(Failure::Retry(e)) => {
                    same = None;
                    if !self.retry_later(&msg, &e, &mut failures, &cancel).await {
                        return (msg, Outcome::Cancelled);
                    }
                }
            }
        }
    }

    /// Counts a failed attempt and waits out the backoff; false if cancelled meanwhile.
    async fn retry_later(&self, msg: &Message, e: &str, failures: &mut u32, cancel: &CancellationToken) -> bool {
        self.stats.connected.set(0);
        self.stats.connect_failures.inc();
        *failures += 1;
        let delay = backoff(*failures);
        warn!(sink = %self.name, url = %msg.target, error = %e, retry_in = ?delay, "Cloud request failed; points stay buffered.");
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = cancel.cancelled() => false,
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
        // 502, 503 and 504 mean the service (or what is in front of it) is down: an outage, retried
        // for as long as it lasts. Other server errors may be this message's fault.
        Err(match status.as_u16() {
            502..=504 | 401 | 403 | 408 | 429 => Failure::Retry(text),
            500..=599 => Failure::Server(status.as_u16(), text),
            _ => Failure::Reject(text),
        })
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
