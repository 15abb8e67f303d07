//! Logging set-up: human-readable by default, one JSON object per line with `--log-format json`.

use tracing_subscriber::EnvFilter;

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
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}
