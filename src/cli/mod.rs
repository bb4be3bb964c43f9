//! The `gup` binary's commands: parsing the command line, merging it over the config file,
//! and running a role, the demo, the load tester or the admin client.
//!
//! Owns the CLI of the contract (flags, `--help`, exit codes: 0 ok, 1 runtime failure, 2 bad
//! usage or bad config with one line naming the flag or key) and logging set-up. This is the
//! binary's edge, where errors become one line on stderr; it must never hold logic a role
//! needs: it only builds their configs and starts them.

/// `println!` for command output: a reader that went away (`gup admin ... | head -1`) ends
/// the command quietly with exit 0 instead of a panic; any other failure to write stdout
/// (a full disk) ends it with exit 1 and a message.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod admin;
mod admin_nodes;
mod admin_print;
mod agent;
mod node_seed;
mod reload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::core::config::{self, ConfigError, LogFormat, ManagerConfig, NodeConfig, Role};
use admin::AdminArgs;
use agent::AgentArgs;

#[derive(Parser)]
#[command(
    name = "gup",
    version,
    about = "gup, the Group Update Provider: a caching branch-office node for endpoint-security \
             content and policies, the management server it mirrors, and tools around them.",
    after_help = "Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config.\n\
                  Logs go to stderr; verbosity from RUST_LOG (default info)."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the management server (default port 8014).
    Manager(ManagerArgs),
    /// Run a branch-office node (default port 2967) mirroring an upstream list.
    Node(NodeArgs),
    /// Call a manager's admin API.
    Admin(AdminArgs),
    /// Check a config file (role inferred from its sections); exit 2 naming a bad key.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// A branch office on 127.0.0.1 in one process: manager, node and simulated clients.
    Demo(DemoArgs),
    /// A crowd of agents against a node or manager; prints a summary and histogram.
    Loadtest(LoadtestArgs),
    /// The endpoint client: heartbeats, settings, policy, content, events, applications.
    Agent(AgentArgs),
}

#[derive(Args)]
struct LoadtestArgs {
    /// Base URL of the node (or manager) under test.
    #[arg(long)]
    target: String,
    /// How many simulated clients.
    #[arg(long)]
    clients: usize,
    /// install_group the clients send.
    #[arg(long)]
    group: Option<String>,
    /// Override the settings' mode for every client (push: hold /v1/stream; pull: learn at
    /// heartbeats). Without it each client follows its group's settings.
    #[arg(long)]
    mode: Option<crate::loadtest::Mode>,
    /// Spread the clients' first heartbeats evenly over this many seconds [default: one
    /// heartbeat interval of the group's settings, divided by --time-scale].
    #[arg(long)]
    ramp_s: Option<f64>,
    /// Run time in seconds (ends earlier when every client is done).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Write the contract's JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// windows, mac or linux.
    #[arg(long, default_value = "windows")]
    os: String,
    /// Client version sent in heartbeats.
    #[arg(long, default_value = "12.1.5")]
    client_version: String,
    /// Divides the heartbeat interval (10 = ten times as often); slots are never scaled.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Prefix of client ids (default `lt-`; with --enroll-token `lt-<random>-`, since an
    /// enrolled id cannot enrol again).
    #[arg(long)]
    id_prefix: Option<String>,
    /// Events each client uploads (one critical).
    #[arg(long, default_value_t = 2)]
    events: usize,
    /// An enrolment token every client enrols with (`gup admin enroll create`).
    #[arg(long, env = "GUP_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// Every client starts holding this file (at most 1 GiB; one copy in memory for all) as
    /// the current version of its item, so that its first round wants only the newer one
    /// and rebuilds it from a delta.
    #[arg(long)]
    holding: Option<PathBuf>,
    /// The item name the --holding file is a version of [default: the file's name].
    #[arg(long, requires = "holding")]
    holding_name: Option<String>,
    /// Clients always download full blobs (to compare a run with deltas against one without).
    #[arg(long)]
    no_deltas: bool,
    /// Rebuilds from deltas running at once across all clients [default: one per core].
    #[arg(long)]
    rebuilds: Option<usize>,
}

#[derive(Args, Clone)]
struct ManagerArgs {
    /// TOML config file (see config/manager.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:8014].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory [default: gup-data/manager].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin API bearer token.
    #[arg(long, env = "GUP_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the admin token.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Token nodes must present on /v1/sync.
    #[arg(long, env = "GUP_NODE_TOKEN", hide_env_values = true)]
    node_token: Option<String>,
    /// File holding the node token.
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// PEM certificate chain: with --tls-key, this port speaks only TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Print the admin token (made at first start if needed) and exit.
    #[arg(long)]
    print_admin_token: bool,
    /// Print the catalog signing public key (made at first start if needed) and exit.
    #[arg(long)]
    print_public_key: bool,
    /// Print the node token (made at first start if needed) and exit.
    #[arg(long)]
    print_node_token: bool,
    #[command(subcommand)]
    action: Option<ManagerCommand>,
}

#[derive(Subcommand, Clone)]
enum ManagerCommand {
    /// Build a new manager data dir from a backup file (`gup admin backup`); afterwards,
    /// start `gup manager --data-dir DIR` on it. The whole file is verified against its
    /// manifest before anything is written; DIR must be new or empty (exit 2 otherwise).
    Restore {
        /// The data dir to build (absent or empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup file.
        file: PathBuf,
    },
}

#[derive(Args, Clone)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Each upstream presents --upstream-token (or --upstream-token-file) unless \
                  --upstream-token-for / --upstream-token-file-for give it its own, e.g. a node \
                  listing another node first and the manager second:\n  \
                  gup node --upstream http://branch-a:2967 --upstream https://manager:8014 \\\n    \
                  --upstream-token-file a.token --upstream-token-file-for https://manager:8014=manager.token\n\
                  In the config file an entry of upstream.servers may be a table \
                  { url = \"...\", token_file = \"...\" }.\n\
                  Upstream calls go through --upstream-proxy (upstream.proxy) when set, else \
                  through HTTPS_PROXY / HTTP_PROXY / ALL_PROXY from the environment, loopback \
                  included; NO_PROXY lists hosts reached directly either way."
)]
struct NodeArgs {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    /// TOML config file (see config/node.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:2967].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory [default: gup-data/node].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Upstream URL, repeatable, highest priority first [default: http://127.0.0.1:8014].
    #[arg(long = "upstream")]
    upstream: Vec<String>,
    /// Node token presented to the upstream.
    #[arg(long, env = "GUP_UPSTREAM_TOKEN", hide_env_values = true)]
    upstream_token: Option<String>,
    /// File holding the upstream token.
    #[arg(long)]
    upstream_token_file: Option<PathBuf>,
    /// One upstream's own node token, as URL=TOKEN (repeatable); the URL must be in the
    /// upstream list. Others present --upstream-token. A command line is visible to `ps`:
    /// prefer --upstream-token-file-for.
    #[arg(long, value_name = "URL=TOKEN")]
    upstream_token_for: Vec<String>,
    /// One upstream's own node token from a file, as URL=FILE (repeatable).
    #[arg(long, value_name = "URL=FILE")]
    upstream_token_file_for: Vec<String>,
    /// Outbound proxy for every call to an upstream (the push stream too): an http or https
    /// URL, credentials allowed (http://user:pass@host:3128; prefer upstream.proxy in the
    /// config file, which `ps` does not show). Wins over HTTPS_PROXY/HTTP_PROXY.
    #[arg(long, value_name = "URL")]
    upstream_proxy: Option<String>,
    /// Token downstream nodes must present (when this node is an upstream).
    #[arg(long, env = "GUP_NODE_TOKEN", hide_env_values = true)]
    node_token: Option<String>,
    /// File holding the node token.
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// PEM certificate chain: with --tls-key, this port speaks only TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates trusted for https upstreams (besides the system roots).
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// The manager's catalog public key: refuse unsigned or wrongly signed catalogs.
    #[arg(long)]
    catalog_public_key: Option<String>,
    /// Print this node's node token (made at first start if needed) and exit.
    #[arg(long)]
    print_node_token: bool,
}

#[derive(Subcommand, Clone)]
enum NodeCommand {
    /// Import content from a directory (a disk carried to the branch) into a stopped node's
    /// store: files whose SHA-256 is in the node's mirrored catalog are verified and stored,
    /// others listed and skipped.
    Seed(node_seed::SeedArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo keeps its data.
    #[arg(long, default_value = "gup-demo")]
    data_dir: PathBuf,
    /// Simulated clients behind the node.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Randomization window in seconds over which the release spreads.
    #[arg(long, default_value_t = 30)]
    window: u64,
}

/// Writes command output to stdout; see [`outln!`].
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "gup: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// One line on stderr, never a panic when stderr is closed.
fn write_err(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{args}");
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

/// Any other error is a runtime failure (exit 1). `Failure` itself is not `Display`, so
/// this does not overlap the identity conversion.
impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        runtime(e)
    }
}

/// A role that could not open its data dir: exit 2 when the operator must act on the dir
/// (in use, made by a newer gup, an unfinished restore), else 1.
fn open_failure(e: impl std::fmt::Display, refusal: bool) -> Failure {
    Failure {
        code: if refusal { 2 } else { 1 },
        message: e.to_string(),
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn runtime(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        message: e.to_string(),
    }
}

fn config_failure(e: ConfigError) -> Failure {
    usage(format!("config: {e}"))
}

/// Runs the command line of this process; the exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            write_err(format_args!("gup: {}", f.message));
            ExitCode::from(f.code)
        }
    }
}

/// The log filter of the demo and the load test without `RUST_LOG`: their agents log
/// warnings only (hundreds of agents each logging its start would drown the rest).
const CROWD_LOG: &str = "info,gup::agent=warn";

fn init_logging(format: LogFormat) {
    init_logging_with(format, "info");
}

/// Logging with `default` as the filter when `RUST_LOG` is not set; a reload may change
/// that filter later ([`reload::set_log_level`]).
fn init_logging_with(format: LogFormat, default: &str) {
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env();
    let env_set = from_env.is_ok();
    let filter = from_env.unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            reload::keep_log_handle(env_set, move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            });
            builder.try_init()
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            reload::keep_log_handle(env_set, move |f| {
                handle.reload(f).map_err(|e| e.to_string())
            });
            builder.try_init()
        }
    };
}

/// Logging into `file` (no colours), with `default` as the filter when `RUST_LOG` is not set.
fn init_logging_to(format: LogFormat, default: &str, file: std::fs::File) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn runtime_env() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(runtime)
}

/// Runs `fut` on a new runtime with SIGTERM/SIGINT wired to a shutdown signal.
fn with_shutdown<F, Fut, E>(f: F) -> Result<(), Failure>
where
    F: FnOnce(crate::http::shutdown::Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<Failure>,
{
    let rt = runtime_env()?;
    let result = rt.block_on(async move {
        let (trigger, shutdown) = crate::http::shutdown::shutdown_pair();
        let signals = crate::http::shutdown::signals();
        tokio::spawn(async move {
            signals.await;
            crate::sys::notify::stopping();
            trigger.trigger();
        });
        f(shutdown).await.map_err(Into::into)
    });
    // The role has stopped and flushed its store. Dropping the runtime would wait for every
    // blocking task without end: seen, the two stages of a blob write whose fetch was cut by
    // the stop kept `gup demo` from exiting (1 Ctrl-C in ~150); a temp file left behind is
    // removed at the next start.
    rt.shutdown_timeout(LEFTOVER_BLOCKING_WAIT);
    result
}

/// Tells systemd (`Type=notify`) that a server is up: its port is bound and listening (since
/// `bind`) and its data dir is open, so a connection made now is served. A no-op outside
/// systemd.
fn notify_ready(role: &str, listener: &tokio::net::TcpListener) {
    let status = match listener.local_addr() {
        Ok(addr) => format!("{role} serving on {addr}"),
        Err(_) => format!("{role} serving"),
    };
    crate::sys::notify::ready(&status);
}

/// How long a stopping process waits for blocking tasks that outlived its role.
const LEFTOVER_BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// Binds `addr` (non-blocking, for tokio), with a message that says why it failed and which
/// setting chose the address (`key`, or `--listen`).
fn bind(addr: SocketAddr, key: &str) -> Result<std::net::TcpListener, Failure> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the port is in use by another process (is one already running?)".to_string()
            }
            std::io::ErrorKind::AddrNotAvailable => "no interface of this machine has it".into(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need privileges)".into()
            }
            _ => e.to_string(),
        };
        runtime(format!(
            "cannot listen on {addr} (--listen or {key}): {why}"
        ))
    })?;
    listener.set_nonblocking(true).map_err(runtime)?;
    Ok(listener)
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn path_string(p: Option<PathBuf>) -> Option<String> {
    p.map(|p| p.display().to_string())
}

/// The manager's config: the file (when given), the flags over it, validated. A reload
/// builds it again the same way.
fn manager_config(
    args: &ManagerArgs,
    log_format: Option<LogFormat>,
) -> Result<ManagerConfig, Failure> {
    let mut cfg: ManagerConfig = match &args.config {
        Some(p) => config::load(p).map_err(config_failure)?,
        None => ManagerConfig::default(),
    };
    let m = &mut cfg.manager;
    if let Some(v) = args.listen {
        m.listen = v;
    }
    if let Some(v) = args.data_dir.clone() {
        m.data_dir = v;
    }
    if let Some(v) = non_empty(args.admin_token.clone()) {
        m.admin_token = v;
    }
    if let Some(v) = path_string(args.admin_token_file.clone()) {
        m.admin_token_file = v;
    }
    if let Some(v) = non_empty(args.node_token.clone()) {
        m.node_token = v;
    }
    if let Some(v) = path_string(args.node_token_file.clone()) {
        m.node_token_file = v;
    }
    if let Some(v) = path_string(args.tls_cert.clone()) {
        m.tls_cert = v;
    }
    if let Some(v) = path_string(args.tls_key.clone()) {
        m.tls_key = v;
    }
    if let Some(f) = log_format {
        cfg.log.format = f;
    }
    cfg.validate().map_err(config_failure)?;
    Ok(cfg)
}

/// The node's config: the file (when given), the flags over it, validated. A reload builds
/// it again the same way.
fn node_config(args: &NodeArgs, log_format: Option<LogFormat>) -> Result<NodeConfig, Failure> {
    let mut cfg: NodeConfig = match &args.config {
        Some(p) => config::load(p).map_err(config_failure)?,
        None => NodeConfig::default(),
    };
    if let Some(v) = args.listen {
        cfg.node.listen = v;
    }
    if let Some(v) = args.data_dir.clone() {
        cfg.node.data_dir = v;
    }
    if !args.upstream.is_empty() {
        for (i, u) in args.upstream.iter().enumerate() {
            config::validate_url(u).map_err(|m| usage(format!("--upstream #{}: {m}", i + 1)))?;
        }
        cfg.upstream.servers = args.upstream.iter().cloned().map(Into::into).collect();
    }
    if let Some(v) = non_empty(args.upstream_token.clone()) {
        cfg.upstream.token = v;
    }
    if let Some(v) = path_string(args.upstream_token_file.clone()) {
        cfg.upstream.token_file = v;
    }
    upstream_tokens_for(&mut cfg, &args.upstream_token_for, false)?;
    upstream_tokens_for(&mut cfg, &args.upstream_token_file_for, true)?;
    if let Some(v) = args.upstream_proxy.clone() {
        cfg.upstream.proxy = v;
    }
    if let Some(v) = non_empty(args.node_token.clone()) {
        cfg.node.node_token = v;
    }
    if let Some(v) = path_string(args.node_token_file.clone()) {
        cfg.node.node_token_file = v;
    }
    if let Some(v) = path_string(args.tls_cert.clone()) {
        cfg.node.tls_cert = v;
    }
    if let Some(v) = path_string(args.tls_key.clone()) {
        cfg.node.tls_key = v;
    }
    if let Some(v) = path_string(args.upstream_ca.clone()) {
        cfg.upstream.ca_file = v;
    }
    if let Some(v) = non_empty(args.catalog_public_key.clone()) {
        cfg.upstream.catalog_public_key = v;
    }
    if let Some(f) = log_format {
        cfg.log.format = f;
    }
    cfg.validate().map_err(config_failure)?;
    Ok(cfg)
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Manager(ManagerArgs {
            action: Some(ManagerCommand::Restore { data_dir, file }),
            config,
            listen,
            data_dir: outer_dir,
            ..
        }) => {
            if config.is_some() || listen.is_some() || outer_dir.is_some() {
                return Err(usage(
                    "restore takes only its own flags: gup manager restore --data-dir DIR FILE",
                ));
            }
            restore(&file, &data_dir, cli.log_format.unwrap_or_default())
        }
        Command::Manager(args) => {
            let cfg = manager_config(&args, cli.log_format)?;
            if args.print_public_key {
                let key = crate::core::signing::CatalogKey::load_or_create(&cfg.manager.data_dir)
                    .map_err(runtime)?;
                outln!("{}", key.public_hex());
                return Ok(());
            }
            if args.print_admin_token || args.print_node_token {
                let (admin, node) = crate::manager::tokens(&cfg).map_err(runtime)?;
                if args.print_admin_token {
                    outln!("{}", admin.secret());
                }
                if args.print_node_token {
                    outln!("{}", node.secret());
                }
                return Ok(());
            }
            init_logging_with(cfg.log.format, &cfg.log.level);
            crate::sys::raise_open_file_limit();
            // The port first: a busy one must fail before anything is written to the data dir.
            let listener = bind(cfg.manager.listen, "manager.listen")?;
            let log_format = cli.log_format;
            with_shutdown(|shutdown| async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| runtime(format!("listening: {e}")))?;
                let manager = crate::manager::Manager::open(&cfg, shutdown)
                    .map_err(|e| open_failure(&e, e.is_refusal()))?;
                let role = manager.clone();
                let hangup = reload::on_hangup(
                    move || manager_config(&args, log_format).map_err(|f| f.message),
                    move |c| role.reload(c),
                    |c| c.log.level.clone(),
                )
                .map_err(|e| runtime(format!("listening for SIGHUP: {e}")))?;
                notify_ready("manager", &listener);
                let result = manager.run(listener).await.map_err(runtime);
                hangup.abort();
                result
            })
        }
        Command::Node(args) => {
            if let Some(NodeCommand::Seed(seed)) = args.command {
                return node_seed::run(seed, cli.log_format.unwrap_or_default());
            }
            let cfg = node_config(&args, cli.log_format)?;
            if args.print_node_token {
                let n = &cfg.node;
                let token = crate::http::auth::resolve(
                    &n.node_token,
                    &n.node_token_file,
                    &n.data_dir,
                    "node",
                )
                .map_err(runtime)?;
                outln!("{}", token.secret());
                return Ok(());
            }
            init_logging_with(cfg.log.format, &cfg.log.level);
            crate::sys::raise_open_file_limit();
            // The port first: a busy one must fail before anything is written to the data dir.
            let listener = bind(cfg.node.listen, "node.listen")?;
            let log_format = cli.log_format;
            with_shutdown(|shutdown| async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| runtime(format!("listening: {e}")))?;
                let node = crate::node::Node::open(&cfg, shutdown)
                    .map_err(|e| open_failure(&e, e.is_refusal()))?;
                let role = node.clone();
                let hangup = reload::on_hangup(
                    move || node_config(&args, log_format).map_err(|f| f.message),
                    move |c| role.reload(c),
                    |c| c.log.level.clone(),
                )
                .map_err(|e| runtime(format!("listening for SIGHUP: {e}")))?;
                notify_ready("node", &listener);
                let result = node.run(listener).await.map_err(runtime);
                hangup.abort();
                result
            })
        }
        Command::Admin(args) => admin::run(args, cli.log_format.unwrap_or_default()),
        Command::Demo(args) => {
            if args.clients == 0 || args.clients > 20_000 {
                return Err(usage("--clients must be 1 to 20000"));
            }
            if args.window > 3600 {
                return Err(usage("--window must be 0 to 3600 seconds"));
            }
            // The screen is for the story: the servers and agents log to a file (a crowd of
            // agents, warnings only).
            std::fs::create_dir_all(&args.data_dir).map_err(|e| {
                runtime(format!(
                    "creating --data-dir {}: {e}",
                    args.data_dir.display()
                ))
            })?;
            let log = crate::demo::log_path(&args.data_dir);
            let file = std::fs::File::create(&log)
                .map_err(|e| runtime(format!("creating {}: {e}", log.display())))?;
            init_logging_to(cli.log_format.unwrap_or_default(), CROWD_LOG, file);
            crate::sys::raise_open_file_limit();
            let opts = crate::demo::DemoOptions {
                data_dir: args.data_dir,
                clients: args.clients,
                window_s: args.window,
            };
            with_shutdown(|shutdown| async move { crate::demo::run(&opts, shutdown).await })
        }
        Command::Loadtest(args) => loadtest(args, cli.log_format.unwrap_or_default()),
        Command::Agent(args) => agent::run(args, cli.log_format.unwrap_or_default()),
    }
}

/// Applies `--upstream-token-for URL=TOKEN` (or, with `file`, `--upstream-token-file-for
/// URL=FILE`) to the upstream list. A bad value is named by its URL, never by its token.
fn upstream_tokens_for(cfg: &mut NodeConfig, specs: &[String], file: bool) -> Result<(), Failure> {
    let flag = match file {
        true => "--upstream-token-file-for",
        false => "--upstream-token-for",
    };
    for spec in specs {
        // A token may end in `=` (base64), a base URL holds none: split at the first.
        let Some((url, value)) = spec.split_once('=') else {
            return Err(usage(format!(
                "{flag}: expected URL={}",
                if file { "FILE" } else { "TOKEN" }
            )));
        };
        if value.trim().is_empty() {
            return Err(usage(format!(
                "{flag} {url}: the {} is empty",
                if file { "file name" } else { "token" }
            )));
        }
        let (token, token_file) = match file {
            true => (None, Some(value.to_string())),
            false => (Some(value.to_string()), None),
        };
        cfg.set_upstream_token(url, token, token_file)
            .map_err(|m| usage(format!("{flag} {url}: {m}")))?;
    }
    Ok(())
}

fn loadtest(args: LoadtestArgs, log_format: LogFormat) -> Result<(), Failure> {
    init_logging_with(log_format, CROWD_LOG);
    let limit = crate::sys::raise_open_file_limit();
    if (limit as usize) < args.clients + 256 {
        write_err(format_args!(
            "gup: warning: the open-file limit is {limit}; {} clients may run out of sockets",
            args.clients
        ));
    }
    let mut opts = crate::loadtest::Options::new(args.target, args.clients);
    opts.group = args.group;
    opts.mode = args.mode;
    if let Some(r) = args.ramp_s {
        if !(r.is_finite() && (0.0..=86_400.0).contains(&r)) {
            return Err(usage("--ramp-s must be 0 to 86400 seconds"));
        }
        opts.ramp = Some(std::time::Duration::from_secs_f64(r));
    }
    opts.duration = std::time::Duration::from_secs(args.duration);
    opts.os = args.os;
    opts.client_version = args.client_version;
    opts.time_scale = args.time_scale;
    opts.id_prefix = match (args.id_prefix, &args.enroll_token) {
        (Some(p), _) => p,
        (None, None) => "lt-".into(),
        (None, Some(_)) => format!("lt-{}-", hex::encode(rand::random::<[u8; 3]>())),
    };
    opts.enroll_token = args.enroll_token;
    opts.events_per_client = args.events;
    opts.use_deltas = !args.no_deltas;
    opts.rebuilds = args.rebuilds;
    if let Some(file) = &args.holding {
        let holding =
            crate::loadtest::holding_from_file(file, args.holding_name).map_err(|e| match e {
                crate::loadtest::LoadtestError::BadOption { reason, .. } => {
                    usage(format!("--holding {reason}"))
                }
                other => usage(other.to_string()),
            })?;
        opts.holding = Some(std::sync::Arc::new(holding));
    }
    opts.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let rt = runtime_env()?;
    let report = rt
        .block_on(crate::loadtest::run(opts))
        .map_err(|e| match e {
            crate::loadtest::LoadtestError::BadOption { .. }
            | crate::loadtest::LoadtestError::BadTarget { .. } => usage(e.to_string()),
            other => runtime(other),
        })?;
    outln!("{}", report.summary());
    outln!("{}", report.histogram_text());
    if let Some(path) = args.report {
        let json = serde_json::to_vec_pretty(&report).map_err(runtime)?;
        std::fs::write(&path, json).map_err(|e| runtime(format!("{}: {e}", path.display())))?;
        outln!("report written to {}", path.display());
    }
    Ok(())
}

/// `gup manager restore --data-dir DIR FILE`.
fn restore(file: &Path, data_dir: &Path, log_format: LogFormat) -> Result<(), Failure> {
    init_logging(log_format);
    let rt = runtime_env()?;
    let restored = rt
        .block_on(crate::manager::backup::restore(file, data_dir))
        .map_err(|e| {
            if e.is_bad_input() {
                usage(e.to_string())
            } else {
                runtime(e)
            }
        })?;
    let m = &restored.manifest;
    outln!(
        "restored {} into {}: catalog revision {}, {} records, {} blobs{} (backup made by gup {} at {}); start it with: gup manager --data-dir {}",
        file.display(),
        data_dir.display(),
        m.catalog_revision,
        restored.records,
        restored.blobs,
        if m.with_content { "" } else { ", without content: publish the items again" },
        m.gup_version,
        m.created_at.to_rfc3339(),
        data_dir.display()
    );
    Ok(())
}

fn check_config(file: &Path) -> Result<(), Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
    let role = config::infer_role(&text).map_err(config_failure)?;
    match role {
        Role::Manager => config::parse::<ManagerConfig>(&text)
            .and_then(|c| c.validate())
            .map_err(config_failure)?,
        Role::Node => config::parse::<NodeConfig>(&text)
            .and_then(|c| c.validate())
            .map_err(config_failure)?,
    }
    outln!("{}: valid {role} config", file.display());
    Ok(())
}
