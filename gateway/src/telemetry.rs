//! Logging set-up: human-readable by default, one JSON object per line with `--log-format json`;
//! and the last warnings and errors kept in memory for the dashboard.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides `level`. rumqttd logs every ordinary client
/// disconnect at error level, which would bury the gateway's own messages and alarm operators, so
/// it is silenced by default (`RUST_LOG=rumqttd=info` brings it back); the failures that matter,
/// such as a listener that cannot bind, are detected and reported by the gateway itself.
/// async-opcua narrates sessions at info level and warns that the client config lists no endpoints
/// (the driver picks them itself); its warnings and errors stay.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},rumqttd=off,tokio_modbus=warn,opcua_client=warn,opcua_server=warn,opcua_core=warn,opcua_client::config=error"
        ))
    });
    // Colours only for a terminal: in a file or the journal the escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.finish().with(RecentLayer).try_init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).finish().with(RecentLayer).try_init()
        }
    };
}

/// How many warnings and errors the dashboard can show.
const RECENT: usize = 50;

/// One warning or error, as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub ts_ms: i64,
    pub level: &'static str,
    /// The spans it happened in (`device{device=boiler-1}`), outermost first.
    pub scope: String,
    pub message: String,
}

fn recent_log() -> &'static Mutex<VecDeque<LogEntry>> {
    static LOG: OnceLock<Mutex<VecDeque<LogEntry>>> = OnceLock::new();
    LOG.get_or_init(|| Mutex::new(VecDeque::with_capacity(RECENT)))
}

/// The latest warnings and errors, newest first (empty where `init` was not called, as in tests
/// that start a gateway inside their own process).
pub fn recent() -> Vec<LogEntry> {
    recent_log().lock().unwrap_or_else(|e| e.into_inner()).iter().rev().cloned().collect()
}

/// Keeps the last [`RECENT`] warnings and errors that passed the log filter.
struct RecentLayer;

/// A span's fields, rendered once when it opens.
struct SpanFields(String);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RecentLayer {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.rest));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        // More verbose levels compare greater.
        if level > Level::WARN {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut scope = String::new();
        if let Some(spans) = ctx.event_scope(event) {
            for span in spans.from_root() {
                if !scope.is_empty() {
                    scope.push(' ');
                }
                scope.push_str(span.name());
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    if !f.0.is_empty() {
                        scope.push('{');
                        scope.push_str(&f.0);
                        scope.push('}');
                    }
                }
            }
        }
        let mut message = fields.message;
        if !fields.rest.is_empty() {
            message.push(' ');
            message.push_str(&fields.rest);
        }
        let entry = LogEntry {
            ts_ms: crate::base::point::now_ms(),
            level: if level == Level::ERROR { "error" } else { "warn" },
            scope,
            message,
        };
        let mut log = recent_log().lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == RECENT {
            log.pop_front();
        }
        log.push_back(entry);
    }
}

/// Collects an event's message and its other fields as `key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.push(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            use std::fmt::Write as _;
            let _ = write!(self.message, "{value:?}");
        } else {
            self.push(field, value);
        }
    }
}

impl Fields {
    fn push(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if !self.rest.is_empty() {
            self.rest.push(' ');
        }
        let _ = write!(self.rest, "{}={value:?}", field.name());
    }
}
