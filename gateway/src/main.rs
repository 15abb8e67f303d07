//! The `updraft` command line: run the gateway, check a config, run simulators, print the version.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use updraft::telemetry::{self, LogFormat};
use updraft::{config, runtime};

/// Grace period for draining the pipeline after SIGINT or SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

#[derive(Parser)]
#[command(name = "updraft", about = "Edge gateway for smart industrial parks", version)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log level (trace, debug, info, warn, error); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and report every problem as FILE:LINE:COLUMN.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Also print what a reload to this file would change in the running gateway (the config
        /// it last applied is kept in DATA_DIR/running-config.json).
        #[arg(long)]
        diff: bool,
    },
    /// Run only the config's [simulators.*], for commissioning without the gateway.
    Simulate {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Commissioning tools: read and write a Modbus device directly.
    Modbus {
        #[command(subcommand)]
        command: ModbusCommand,
    },
    /// OPC-UA tools: browse a server's address space, trust a server's certificate.
    Opcua {
        #[command(subcommand)]
        command: OpcuaCommand,
    },
    /// Plugin tools for authors.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Print an Argon2 hash of a password read from standard input, for `[broker.users.NAME]
    /// password_hash` (`echo -n 'secret' | updraft hash-password`).
    HashPassword,
    /// Print the version.
    Version,
}

/// Where a commissioning command goes.
#[derive(clap::Args)]
struct ModbusTarget {
    /// `host:port` of a Modbus TCP device (or serial device server).
    #[arg(long, value_name = "HOST:PORT")]
    address: Option<String>,
    /// With --address: speak Modbus RTU frames over the TCP connection (a serial device server).
    #[arg(long, requires = "address")]
    rtu_over_tcp: bool,
    /// A serial port (`/dev/ttyUSB0`), for Modbus RTU.
    #[arg(long, value_name = "DEVICE", conflicts_with = "address")]
    port: Option<String>,
    /// Serial line speed.
    #[arg(long, default_value_t = 9600, requires = "port")]
    baud: u32,
    /// Serial parity: none | even | odd
    #[arg(long, default_value = "none", requires = "port")]
    parity: String,
    /// Serial data bits: 7 or 8.
    #[arg(long, default_value_t = 8, requires = "port")]
    data_bits: u8,
    /// Serial stop bits: 1 or 2.
    #[arg(long, default_value_t = 1, requires = "port")]
    stop_bits: u8,
    /// Unit identifier (slave address).
    #[arg(long, default_value_t = 1)]
    unit: u8,
    /// coil | discrete | input | holding
    #[arg(long, default_value = "holding")]
    area: String,
    /// First register (or bit), 0-based.
    #[arg(long, default_value_t = 0)]
    start: u16,
    /// How long to wait for the device.
    #[arg(long, default_value = "1s")]
    timeout: String,
}

#[derive(Subcommand)]
enum ModbusCommand {
    /// Read registers or bits and print them decoded; without --type, every interpretation side
    /// by side (u16, i16, and u32/i32/f32 in each byte order).
    Read {
        #[command(flatten)]
        target: ModbusTarget,
        /// How many values (registers or bits without --type; a string's length in registers).
        #[arg(long, default_value_t = 10)]
        count: u16,
        /// bool | u16 | i16 | u32 | i32 | f32 | u64 | i64 | f64 | string
        #[arg(long = "type", value_name = "TYPE")]
        data_type: Option<String>,
        /// ABCD | CDAB | BADC | DCBA
        #[arg(long, default_value = "ABCD")]
        order: String,
    },
    /// Write one value (a number, true/false for a coil, or text with --type string).
    Write {
        #[command(flatten)]
        target: ModbusTarget,
        #[arg(long = "type", value_name = "TYPE", default_value = "u16")]
        data_type: String,
        /// A string's field size in registers (NUL-padded); default: just enough for the text.
        #[arg(long)]
        length: Option<u16>,
        #[arg(long, default_value = "ABCD")]
        order: String,
        /// The value.
        value: String,
    },
}

#[derive(Subcommand)]
enum OpcuaCommand {
    /// Print a server's address space as a tree (NodeIds, data types, access), or with --toml as
    /// tag lines to paste into a device.
    Browse {
        /// The server, `opc.tcp://host:port`.
        endpoint: String,
        /// Start here instead of the Objects folder (`ns=2;s=Line3`).
        #[arg(long)]
        node: Option<String>,
        /// Levels below the start node.
        #[arg(long, default_value_t = 4)]
        depth: u32,
        /// Print `tags = [...]` lines for the variables found.
        #[arg(long)]
        toml: bool,
        /// Use this config's certificate folders (`DATA_DIR/pki`) instead of a temporary one.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Trust a server certificate the gateway refused: moves it from `pki/rejected` to
    /// `pki/trusted`. Without NAME, lists both folders.
    Trust {
        /// The certificate's file name in `pki/rejected`, or a unique part of it.
        name: Option<String>,
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a built plugin against fixture files (JSON steps with expectations, or CSV points) in the
    /// gateway's own sandbox with a controlled clock.
    Test {
        /// The plugin component (`.wasm`).
        #[arg(short, long, value_name = "FILE")]
        wasm: PathBuf,
        /// Fixture files.
        #[arg(required = true, value_name = "FIXTURE")]
        fixtures: Vec<PathBuf>,
        /// Print every emit, one JSON object per line with its step, to write expectations from.
        #[arg(long)]
        print: bool,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match cli.command {
        Command::HashPassword => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("error: cannot read the password from standard input: {e}");
                return ExitCode::FAILURE;
            }
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                eprintln!("error: empty password; pipe it in, e.g. `echo -n 'secret' | updraft hash-password`");
                return ExitCode::FAILURE;
            }
            match updraft::broker::auth::hash_password(password) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Version => {
            println!("updraft {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config, diff } => match config::load(&config) {
            Ok(c) => {
                let plugin_problems = runtime::check_plugins(&c, &config);
                if !plugin_problems.is_empty() {
                    for p in &plugin_problems {
                        eprintln!("{p}");
                    }
                    eprintln!("{} problem(s) found in {}", plugin_problems.len(), config.display());
                    return ExitCode::from(2);
                }
                println!(
                    "{}: ok ({} devices, {} simulators, {} plugins, {} northbound sinks)",
                    config.display(),
                    c.devices.len(),
                    c.simulators.len(),
                    c.plugins.len(),
                    c.north.len()
                );
                if diff {
                    print_diff(&c);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} problem(s) found in {}", e.problems.len(), config.display());
                ExitCode::from(2)
            }
        },
        Command::Modbus { command } => print_result(modbus(command)),
        Command::Opcua { command } => print_result(opcua(command, &cli.log_level)),
        Command::Plugin { command: PluginCommand::Test { wasm, fixtures, print } } => {
            let mut failed = 0;
            for f in &fixtures {
                let mut show = |step: usize, emits: &[updraft::plugins::testing::Emitted]| {
                    if print {
                        for e in emits {
                            println!("{}", e.to_json(step));
                        }
                    }
                };
                match updraft::plugins::testing::run_fixture_with(&wasm, f, &mut show) {
                    Ok(problems) if problems.is_empty() => println!("ok   {}", f.display()),
                    Ok(problems) => {
                        failed += 1;
                        println!("FAIL {}", f.display());
                        problems.iter().for_each(|p| println!("     {p}"));
                    }
                    Err(e) => {
                        failed += 1;
                        println!("FAIL {}: {e}", f.display());
                    }
                }
            }
            println!("{} passed, {failed} failed", fixtures.len() - failed);
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Run { config } => {
            telemetry::init(cli.log_format, &cli.log_level);
            report(run(config, false))
        }
        Command::Simulate { config } => {
            telemetry::init(cli.log_format, &cli.log_level);
            report(run(config, true))
        }
    }
}

/// A tool's output on stdout, or its error on stderr with a failing exit code.
fn print_result(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a TOML-style enum value from the command line with the config's own names.
fn from_name<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| format!("--{what} {s}: {e}"))
}

fn modbus(command: ModbusCommand) -> Result<String, String> {
    use updraft::drivers::modbus::commission;
    use updraft::drivers::modbus::config::{Framing, SerialLine};
    let target = |t: ModbusTarget| -> Result<commission::Target, String> {
        let link = match (t.address, t.port) {
            (Some(address), None) if t.rtu_over_tcp => Framing::RtuOverTcp { address },
            (Some(address), None) => Framing::Tcp { address },
            (None, Some(port)) => {
                if !matches!(t.data_bits, 7 | 8) || !matches!(t.stop_bits, 1 | 2) {
                    return Err("--data-bits takes 7 or 8, --stop-bits 1 or 2".into());
                }
                let parity = from_name("parity", &t.parity)?;
                Framing::Serial(SerialLine {
                    port,
                    baud: t.baud,
                    parity,
                    data_bits: t.data_bits,
                    stop_bits: t.stop_bits,
                })
            }
            _ => return Err("name the device with --address HOST:PORT or --port DEVICE".into()),
        };
        let timeout = humantime::parse_duration(&t.timeout).map_err(|e| format!("--timeout {}: {e}", t.timeout))?;
        Ok(commission::Target { link, unit: t.unit, area: from_name("area", &t.area)?, start: t.start, timeout })
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    match command {
        ModbusCommand::Read { target: t, count, data_type, order } => {
            let t = target(t)?;
            let ty = data_type.map(|d| from_name("type", &d)).transpose()?;
            let order = from_name("order", &order)?;
            rt.block_on(commission::read(&t, count, ty, order))
        }
        ModbusCommand::Write { target: t, data_type, length, order, value } => {
            let t = target(t)?;
            let (ty, order) = (from_name("type", &data_type)?, from_name("order", &order)?);
            rt.block_on(commission::write(&t, ty, order, length, &value)).map(|s| s + "\n")
        }
    }
}

fn opcua(command: OpcuaCommand, log_level: &str) -> Result<String, String> {
    use updraft::drivers::opcua::{browse, pki};
    let pki_of = |config: &std::path::Path| -> Result<PathBuf, String> {
        let c = config::load(config).map_err(|e| e.to_string())?;
        Ok(c.gateway.data_dir.join("pki"))
    };
    match command {
        OpcuaCommand::Browse { endpoint, node, depth, toml, config } => {
            // async-opcua reports connection trouble through its log; show warnings by default.
            telemetry::init(LogFormat::Human, log_level);
            let pki = match config {
                Some(c) => pki_of(&c)?,
                None => std::env::temp_dir().join("updraft-browse-pki"),
            };
            let opts =
                browse::Options { endpoint, node, depth, toml, pki, timeout: std::time::Duration::from_secs(10) };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(browse::run(&opts))
        }
        OpcuaCommand::Trust { name: None, config } => {
            let dir = pki_of(&config)?;
            let (rejected, trusted) = pki::list(&dir);
            let mut out = format!("{}\n", dir.display());
            out += &format!("rejected ({}): {}\n", rejected.len(), rejected.join(", "));
            out += &format!("trusted ({}): {}\n", trusted.len(), trusted.join(", "));
            Ok(out)
        }
        OpcuaCommand::Trust { name: Some(name), config } => {
            let to = pki::trust(&pki_of(&config)?, &name)?;
            Ok(format!("trusted: {}\nThe gateway connects at its next try (within a minute).\n", to.display()))
        }
    }
}

/// glibc gives each allocating thread its own malloc arena, and memory freed into one arena is not
/// reused by another. The broker's router, the publisher thread and the async workers pass buffers
/// between them, so at 10,000 tags the default arenas held 50 MB resident against 35 MB with one
/// (measured with `tests/bench/poll.sh`; ARCHITECTURE.md has the figures). The arena count can only
/// be set before the first allocation, so the process re-executes itself once with
/// `MALLOC_ARENA_MAX=1`, unless the variable is already set (the operator's choice wins).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let Ok(exe) = std::env::current_exe() else { return };
        let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("MALLOC_ARENA_MAX", "1").exec();
        // `exec` only returns on failure; carry on with the default arenas.
        eprintln!("note: could not re-execute with MALLOC_ARENA_MAX=1 ({err}); continuing");
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = chain(&e);
            error!("{text}");
            eprintln!("error: {text}");
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: most of our messages already quote their cause
/// (`cannot read plugin p: No such file`), so a cause already in the text is not repeated.
fn chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

fn run(path: PathBuf, simulate_only: bool) -> anyhow::Result<()> {
    let cfg = config::load(&path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("updraft-worker")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let stop = shutdown_signal().context("cannot install signal handlers")?;
        if simulate_only {
            let cancel = CancellationToken::new();
            if cfg.simulators.is_empty() {
                anyhow::bail!("{} has no [simulators.*] section", path.display());
            }
            runtime::start_simulators(&cfg, &cancel).await?;
            stop.await;
            cancel.cancel();
            return Ok(());
        }
        // Before start-up, like SIGTERM's: SIGHUP's default action ends the process, and a reload
        // asked while the gateway starts must wait, not kill it.
        let mut hangups = hangup_signal().context("cannot install the SIGHUP handler")?;
        let mut gateway = runtime::start(cfg).await?;
        gateway.keep_config(&path);
        updraft::health::notify_ready();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("{}", where_to_look(&gateway));
        }
        let mut requests = gateway.reload_requests();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(()) = hangups.recv() => {
                    info!(path = %path.display(), "SIGHUP: reloading the config.");
                    // The outcome is logged, counted and shown on the dashboard by `reload_from`.
                    let _ = reload(&mut gateway, &path).await;
                }
                Some(req) = async { match requests.as_mut() { Some(r) => r.recv().await, None => None } } => {
                    info!(path = %path.display(), "Reload asked over the API.");
                    let _ = req.reply.send(reload(&mut gateway, &path).await);
                }
            }
        }
        info!("Shutting down.");
        updraft::health::notify_stopping();
        gateway.shutdown(SHUTDOWN_GRACE).await;
        Ok(())
    })?;
    // rumqttd's threads have no stop API; leaving main ends them with the process.
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}

/// What a reload to `new` would change, against the config the gateway last applied.
fn print_diff(new: &config::Config) {
    let dir = &new.gateway.data_dir;
    match updraft::reload::kept(dir) {
        Ok(kept) => {
            println!(
                "against the running config (from {}, applied {}):",
                kept.source.display(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(kept.applied_ms.max(0) as u64)
                )
            );
            let d = updraft::reload::Diff::between(&kept.fingerprints, &updraft::reload::Fingerprints::of(new));
            print!("{d}");
        }
        Err(e) => println!(
            "no running config recorded in {} ({e}): the gateway records it when it starts, so everything would start",
            updraft::reload::kept_path(dir).display()
        ),
    }
}

/// One reload, with systemd told while it runs (`RELOADING=1`, then `READY=1`).
async fn reload(gateway: &mut runtime::Gateway, path: &std::path::Path) -> Result<updraft::reload::Diff, String> {
    updraft::health::notify_reloading();
    let r = gateway.reload_from(path).await;
    updraft::health::notify_ready();
    r
}

/// SIGHUP, as a stream of reload requests (nothing on platforms without it).
fn hangup_signal() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // Several SIGHUPs during one reload make one more reload, not a queue of them.
                let _ = tx.try_send(());
            }
        });
    }
    #[cfg(not(unix))]
    drop(tx);
    Ok(rx)
}

/// The once-only hint for someone who just started the gateway in a terminal: where the data is
/// and how to look at it.
fn where_to_look(gw: &runtime::Gateway) -> String {
    let mut out = String::from("\n  Updraft is running.\n");
    if let Some(a) = gw.broker_addr {
        let host = if a.ip().is_unspecified() { "127.0.0.1".to_owned() } else { a.ip().to_string() };
        out += &format!("  Local MQTT bus   mqtt://{a}\n");
        out += &format!("    watch it:      mosquitto_sub -h {host} -p {} -t 'updraft/#' -v\n", a.port());
    }
    if let Some(a) = gw.broker_tls_addr {
        out += &format!("  MQTT over TLS    mqtts://{a}\n");
    }
    if let Some(a) = gw.api_addr {
        out += &format!("  Dashboard        http://{a}/\n");
        out += &format!("  HTTP API         http://{a}/api/v1/values   /ready   /metrics\n");
    }
    out += "  Stop with Ctrl-C; the pipeline drains first.\n\n";
    out
}

/// Installs the SIGINT/SIGTERM handlers now and returns a future that completes on the first of
/// them. Installing before start-up matters: a SIGTERM that arrives while the gateway starts (a
/// quick `systemctl stop`) must drain it, not kill it with the default action.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
