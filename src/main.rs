//! The `gup` binary: parses the command line, merges it over the config file, and runs a role.
//! This is the binary's edge: errors become one line on stderr and an exit code
//! (0 ok, 1 runtime failure, 2 bad usage or bad config).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gup::config::{self, ConfigError, LogFormat, ManagerConfig, NodeConfig, Role};
use reqwest::Method;

/// mimalloc instead of glibc's malloc: a node with thousands of idle push streams allocates
/// small, long-lived state between the transient buffers of other requests, and glibc's arenas
/// keep the freed holes resident (about 4.6 KiB per stream at 10,000 streams, measured with
/// `malloc_trim`); mimalloc returns freed pages to the system by itself. Built with `no_thp`:
/// where transparent huge pages are `always`, mimalloc's eagerly committed arenas would
/// otherwise make an idle node 48 MiB resident instead of 3 MiB. `benches/push.sh` measured
/// 10,000 idle streams at 12.2-12.9 KiB each with glibc, 5.7-5.8 KiB with this (an A/B of the
/// allocator alone, before serving threads handed connections over).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Simulated clients against a node or manager; prints a summary and histogram.
    Loadtest(LoadtestArgs),
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
    /// push: hold /v1/stream; pull: learn at heartbeats.
    #[arg(long, default_value = "pull")]
    mode: gup::loadtest::Mode,
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
    /// Prefix of client ids.
    #[arg(long, default_value = "lt-")]
    id_prefix: String,
    /// Events each client uploads (one critical).
    #[arg(long, default_value_t = 2)]
    events: usize,
}

#[derive(Args)]
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
}

#[derive(Args)]
struct NodeArgs {
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

#[derive(Args)]
struct AdminArgs {
    /// Manager base URL, e.g. http://127.0.0.1:8014.
    #[arg(long)]
    manager: String,
    /// Admin token.
    #[arg(long, env = "GUP_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the admin token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Publish a file as content (streamed; any size).
    Publish {
        file: PathBuf,
        /// Package name.
        #[arg(long)]
        name: String,
        /// Version [default: the first 12 hex digits of the SHA-256].
        #[arg(long)]
        version: Option<String>,
        /// Skip download randomization for this item.
        #[arg(long)]
        urgent: bool,
    },
    /// Communications settings of a group (or of one of its locations).
    Settings {
        #[command(subcommand)]
        command: SettingsCommand,
    },
    /// Policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Clients.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// Map a user to a group (user mode): `user set USER GROUP`.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Site-wide settings: `site set application_learning=true`.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Events clients uploaded, newest last, filtered and paginated.
    Events {
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        client: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// RFC 3339 time: events whose time is at or after it.
        #[arg(long)]
        since: Option<String>,
        /// Page size (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Cursor from a previous page's `next`.
        #[arg(long)]
        after: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Admin notifications raised by critical events.
    Notifications {
        #[arg(long)]
        json: bool,
    },
    /// Learned applications: `apps search TEXT`.
    Apps {
        #[command(subcommand)]
        command: AppsCommand,
    },
}

#[derive(Subcommand)]
enum AppsCommand {
    /// Applications whose name or path contains TEXT (case-insensitive).
    Search {
        text: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SettingsCommand {
    /// Show a group's own keys and its effective settings.
    Get {
        group: String,
        #[arg(long)]
        location: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set keys: KEY=VALUE (dotted paths, e.g. randomization.window_s=600; VALUE null inherits).
    Set {
        group: String,
        #[arg(long)]
        location: Option<String>,
        #[arg(required = true)]
        assignments: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Set a group's policy from a JSON file (a new serial).
    Set { group: String, file: PathBuf },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a group or change its parent.
    Set {
        group: String,
        #[arg(long, default_value = "default")]
        parent: String,
    },
    /// List groups.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a group (refused while it has children or clients).
    Delete { group: String },
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Move a client to a group.
    Move { id: String, group: String },
    /// List clients with group, last seen and whether overdue.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a client (its history is kept for a reconnect).
    Delete { id: String },
}

#[derive(Subcommand)]
enum UserCommand {
    /// The group USER's clients belong to in user mode.
    Set { user: String, group: String },
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Set site keys: application_learning=true, notification_damper_s=3600.
    Set {
        #[arg(required = true)]
        assignments: Vec<String>,
    },
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

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("gup: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
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
    F: FnOnce(gup::server::Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let rt = runtime_env()?;
    rt.block_on(async move {
        let (trigger, shutdown) = gup::server::shutdown_pair();
        tokio::spawn(async move {
            gup::server::signal().await;
            trigger.trigger();
        });
        f(shutdown).await.map_err(runtime)
    })
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

fn path_string(p: Option<PathBuf>) -> Option<String> {
    p.map(|p| p.display().to_string())
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Manager(args) => {
            let mut cfg: ManagerConfig = match &args.config {
                Some(p) => config::load(p).map_err(config_failure)?,
                None => ManagerConfig::default(),
            };
            let m = &mut cfg.manager;
            if let Some(v) = args.listen {
                m.listen = v;
            }
            if let Some(v) = args.data_dir {
                m.data_dir = v;
            }
            if let Some(v) = non_empty(args.admin_token) {
                m.admin_token = v;
            }
            if let Some(v) = path_string(args.admin_token_file) {
                m.admin_token_file = v;
            }
            if let Some(v) = non_empty(args.node_token) {
                m.node_token = v;
            }
            if let Some(v) = path_string(args.node_token_file) {
                m.node_token_file = v;
            }
            if let Some(v) = path_string(args.tls_cert) {
                m.tls_cert = v;
            }
            if let Some(v) = path_string(args.tls_key) {
                m.tls_key = v;
            }
            if let Some(f) = cli.log_format {
                cfg.log.format = f;
            }
            cfg.validate().map_err(config_failure)?;
            if args.print_public_key {
                let key = gup::signing::CatalogKey::load_or_create(&cfg.manager.data_dir)
                    .map_err(runtime)?;
                println!("{}", key.public_hex());
                return Ok(());
            }
            if args.print_admin_token || args.print_node_token {
                let (admin, node) = gup::manager::tokens(&cfg).map_err(runtime)?;
                if args.print_admin_token {
                    println!("{}", admin.secret());
                }
                if args.print_node_token {
                    println!("{}", node.secret());
                }
                return Ok(());
            }
            init_logging(cfg.log.format);
            gup::server::raise_open_file_limit();
            let listen = cfg.manager.listen;
            with_shutdown(|shutdown| async move {
                let manager =
                    gup::manager::Manager::open(&cfg, shutdown).map_err(|e| e.to_string())?;
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| format!("binding {listen}: {e}"))?;
                manager.run(listener).await.map_err(|e| e.to_string())
            })
        }
        Command::Node(args) => {
            let mut cfg: NodeConfig = match &args.config {
                Some(p) => config::load(p).map_err(config_failure)?,
                None => NodeConfig::default(),
            };
            if let Some(v) = args.listen {
                cfg.node.listen = v;
            }
            if let Some(v) = args.data_dir {
                cfg.node.data_dir = v;
            }
            if !args.upstream.is_empty() {
                for (i, u) in args.upstream.iter().enumerate() {
                    config::validate_url(u)
                        .map_err(|m| usage(format!("--upstream #{}: {m}", i + 1)))?;
                }
                cfg.upstream.servers = args.upstream;
            }
            if let Some(v) = non_empty(args.upstream_token) {
                cfg.upstream.token = v;
            }
            if let Some(v) = path_string(args.upstream_token_file) {
                cfg.upstream.token_file = v;
            }
            if let Some(v) = non_empty(args.node_token) {
                cfg.node.node_token = v;
            }
            if let Some(v) = path_string(args.node_token_file) {
                cfg.node.node_token_file = v;
            }
            if let Some(v) = path_string(args.tls_cert) {
                cfg.node.tls_cert = v;
            }
            if let Some(v) = path_string(args.tls_key) {
                cfg.node.tls_key = v;
            }
            if let Some(v) = path_string(args.upstream_ca) {
                cfg.upstream.ca_file = v;
            }
            if let Some(v) = non_empty(args.catalog_public_key) {
                cfg.upstream.catalog_public_key = v;
            }
            if let Some(f) = cli.log_format {
                cfg.log.format = f;
            }
            cfg.validate().map_err(config_failure)?;
            if args.print_node_token {
                let token = gup::auth::resolve(
                    Some(&cfg.node.node_token),
                    (!cfg.node.node_token_file.is_empty())
                        .then(|| Path::new(&cfg.node.node_token_file)),
                    &cfg.node.data_dir,
                    "node",
                )
                .map_err(runtime)?;
                println!("{}", token.secret());
                return Ok(());
            }
            init_logging(cfg.log.format);
            gup::server::raise_open_file_limit();
            let listen = cfg.node.listen;
            with_shutdown(|shutdown| async move {
                let node = gup::node::Node::open(&cfg, shutdown).map_err(|e| e.to_string())?;
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| format!("binding {listen}: {e}"))?;
                node.run(listener).await.map_err(|e| e.to_string())
            })
        }
        Command::Admin(args) => admin(args, cli.log_format.unwrap_or_default()),
        Command::Demo(args) => {
            if args.clients == 0 || args.clients > 20_000 {
                return Err(usage("--clients must be 1 to 20000"));
            }
            if args.window > 3600 {
                return Err(usage("--window must be 0 to 3600 seconds"));
            }
            init_logging(cli.log_format.unwrap_or_default());
            gup::server::raise_open_file_limit();
            let opts = gup::demo::DemoOptions {
                data_dir: args.data_dir,
                clients: args.clients,
                window_s: args.window,
            };
            with_shutdown(|shutdown| async move { gup::demo::run(&opts, shutdown).await })
        }
        Command::Loadtest(args) => loadtest(args, cli.log_format.unwrap_or_default()),
    }
}

fn loadtest(args: LoadtestArgs, log_format: LogFormat) -> Result<(), Failure> {
    init_logging(log_format);
    let limit = gup::server::raise_open_file_limit();
    if (limit as usize) < args.clients + 256 {
        eprintln!(
            "gup: warning: the open-file limit is {limit}; {} clients may run out of sockets",
            args.clients
        );
    }
    let mut opts = gup::loadtest::Options::new(args.target, args.clients);
    opts.group = args.group;
    opts.mode = args.mode;
    opts.duration = std::time::Duration::from_secs(args.duration);
    opts.os = args.os;
    opts.client_version = args.client_version;
    opts.time_scale = args.time_scale;
    opts.id_prefix = args.id_prefix;
    opts.events_per_client = args.events;
    opts.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let rt = runtime_env()?;
    let report = rt.block_on(gup::loadtest::run(opts)).map_err(|e| match e {
        gup::loadtest::LoadtestError::BadOption { .. }
        | gup::loadtest::LoadtestError::BadTarget { .. } => usage(e.to_string()),
        other => runtime(other),
    })?;
    println!("{}", report.summary());
    println!("{}", report.histogram_text());
    if let Some(path) = args.report {
        let json = serde_json::to_vec_pretty(&report).map_err(runtime)?;
        std::fs::write(&path, json).map_err(|e| runtime(format!("{}: {e}", path.display())))?;
        println!("report written to {}", path.display());
    }
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
    println!("{}: valid {role} config", file.display());
    Ok(())
}

fn admin(args: AdminArgs, log_format: LogFormat) -> Result<(), Failure> {
    init_logging(log_format);
    let token = match (non_empty(args.token), args.token_file) {
        (Some(t), _) => gup::auth::Token::new(t),
        (None, Some(f)) => gup::auth::read_token_file(&f).map_err(|e| usage(e.to_string()))?,
        (None, None) => {
            return Err(usage(
                "admin needs a token: --token, --token-file or GUP_ADMIN_TOKEN",
            ))
        }
    };
    let client =
        gup::admin::AdminClient::new(&args.manager, token).map_err(|e| usage(e.to_string()))?;
    let rt = runtime_env()?;
    match args.command {
        AdminCommand::Publish {
            file,
            name,
            version,
            urgent,
        } => {
            let (status, r) = rt
                .block_on(client.publish(&file, &name, version.as_deref(), urgent))
                .map_err(runtime)?;
            let what = if status == 201 {
                "published"
            } else {
                "already published"
            };
            println!(
                "{what}: {} {} sha256={} size={} revision={}",
                r.name, r.version, r.sha256, r.size, r.revision
            );
            Ok(())
        }
        AdminCommand::Settings { command } => match command {
            SettingsCommand::Get {
                group,
                location,
                json,
            } => {
                let q: Vec<(&str, &str)> =
                    location.iter().map(|l| ("location", l.as_str())).collect();
                let v = rt
                    .block_on(client.call(
                        Method::GET,
                        &format!("/v1/admin/groups/{group}/settings"),
                        &q,
                        None,
                    ))
                    .map_err(runtime)?;
                if json {
                    print_json(&v);
                } else {
                    print_settings(&v["effective"], &v["own"], &v["location_override"]);
                }
                Ok(())
            }
            SettingsCommand::Set {
                group,
                location,
                assignments,
                json,
            } => {
                let body = gup::admin::parse_assignments(&assignments).map_err(usage)?;
                let q: Vec<(&str, &str)> =
                    location.iter().map(|l| ("location", l.as_str())).collect();
                let v = rt
                    .block_on(client.call(
                        Method::PUT,
                        &format!("/v1/admin/groups/{group}/settings"),
                        &q,
                        Some(&body),
                    ))
                    .map_err(runtime)?;
                if json {
                    print_json(&v);
                } else {
                    print_settings(&v, &body, &serde_json::Value::Null);
                }
                Ok(())
            }
        },
        AdminCommand::Policy {
            command: PolicyCommand::Set { group, file },
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?;
            let doc: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| usage(format!("{}: not JSON: {e}", file.display())))?;
            let v = rt
                .block_on(client.call(
                    Method::PUT,
                    &format!("/v1/admin/groups/{group}/policy"),
                    &[],
                    Some(&doc),
                ))
                .map_err(runtime)?;
            println!("policy of {group} set: serial {}", v["serial"]);
            Ok(())
        }
        AdminCommand::Group { command } => match command {
            GroupCommand::Set { group, parent } => {
                let body = serde_json::json!({ "parent": parent });
                rt.block_on(client.call(
                    Method::PUT,
                    &format!("/v1/admin/groups/{group}"),
                    &[],
                    Some(&body),
                ))
                .map_err(runtime)?;
                println!("group {group} (parent {parent})");
                Ok(())
            }
            GroupCommand::List { json } => {
                let v = rt
                    .block_on(client.call(Method::GET, "/v1/admin/groups", &[], None))
                    .map_err(runtime)?;
                show_list(
                    &v,
                    json,
                    "groups",
                    &["GROUP", "PARENT", "CHILDREN", "OWN SETTINGS", "POLICY"],
                    |g| {
                        vec![
                            text(&g["name"]),
                            text(&g["parent"]),
                            text(&g["children"]),
                            g["settings"].to_string(),
                            text(&g["policy_serial"]),
                        ]
                    },
                );
                Ok(())
            }
            GroupCommand::Delete { group } => {
                rt.block_on(client.call(
                    Method::DELETE,
                    &format!("/v1/admin/groups/{group}"),
                    &[],
                    None,
                ))
                .map_err(runtime)?;
                println!("group {group} deleted");
                Ok(())
            }
        },
        AdminCommand::Client { command } => match command {
            ClientCommand::Move { id, group } => {
                let body = serde_json::json!({ "group": group });
                rt.block_on(client.call(
                    Method::POST,
                    &format!("/v1/admin/clients/{id}/move"),
                    &[],
                    Some(&body),
                ))
                .map_err(runtime)?;
                println!("client {id} moved to {group}");
                Ok(())
            }
            ClientCommand::Delete { id } => {
                rt.block_on(client.call(
                    Method::DELETE,
                    &format!("/v1/admin/clients/{id}"),
                    &[],
                    None,
                ))
                .map_err(runtime)?;
                println!("client {id} deleted");
                Ok(())
            }
            ClientCommand::List { json } => {
                let v = rt
                    .block_on(client.call(Method::GET, "/v1/admin/clients", &[], None))
                    .map_err(runtime)?;
                show_list(
                    &v,
                    json,
                    "clients",
                    &[
                        "CLIENT",
                        "GROUP",
                        "INSTALL GROUP",
                        "OS",
                        "LAST SEEN",
                        "OVERDUE",
                    ],
                    |c| {
                        vec![
                            text(&c["client_id"]),
                            text(&c["group"]),
                            text(&c["install_group"]),
                            text(&c["os"]),
                            text(&c["last_seen"]),
                            if c["overdue"] == true {
                                "yes".into()
                            } else {
                                "no".into()
                            },
                        ]
                    },
                );
                Ok(())
            }
        },
        AdminCommand::User {
            command: UserCommand::Set { user, group },
        } => {
            let body = serde_json::json!({ "group": group });
            rt.block_on(client.call(
                Method::PUT,
                &format!("/v1/admin/users/{user}"),
                &[],
                Some(&body),
            ))
            .map_err(runtime)?;
            println!("user {user} -> group {group}");
            Ok(())
        }
        AdminCommand::Events {
            kind,
            client: who,
            group,
            since,
            limit,
            after,
            json,
        } => {
            let limit_s = limit.to_string();
            let after_s = after.map(|a| a.to_string());
            let mut q: Vec<(&str, &str)> = vec![("limit", &limit_s)];
            for (k, v) in [
                ("kind", &kind),
                ("client", &who),
                ("group", &group),
                ("since", &since),
                ("after", &after_s),
            ] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            let v = rt
                .block_on(client.call(Method::GET, "/v1/admin/events", &q, None))
                .map_err(runtime)?;
            show_list(
                &v,
                json,
                "events",
                &["TIME", "CLIENT", "GROUP", "KIND", "SUBKIND", "ID"],
                |e| {
                    vec![
                        text(&e["time"]),
                        text(&e["client_id"]),
                        text(&e["group"]),
                        text(&e["kind"]),
                        text(&e["subkind"]),
                        text(&e["id"]),
                    ]
                },
            );
            if !json && !v["next"].is_null() {
                println!("more: --after {}", v["next"]);
            }
            Ok(())
        }
        AdminCommand::Notifications { json } => {
            let v = rt
                .block_on(client.call(Method::GET, "/v1/admin/notifications", &[], None))
                .map_err(runtime)?;
            show_list(
                &v,
                json,
                "notifications",
                &["FIRST", "GROUP", "KIND", "COUNT", "LAST"],
                |n| {
                    vec![
                        text(&n["first_at"]),
                        text(&n["group"]),
                        text(&n["kind"]),
                        text(&n["count"]),
                        text(&n["last_at"]),
                    ]
                },
            );
            Ok(())
        }
        AdminCommand::Apps {
            command: AppsCommand::Search { text: q, json },
        } => {
            let v = rt
                .block_on(client.call(Method::GET, "/v1/admin/applications", &[("q", &q)], None))
                .map_err(runtime)?;
            show_list(
                &v,
                json,
                "applications",
                &[
                    "NAME",
                    "VERSION",
                    "PATH",
                    "CLIENTS",
                    "FIRST SEEN",
                    "LAST SEEN",
                ],
                |a| {
                    vec![
                        text(&a["name"]),
                        text(&a["version"]),
                        text(&a["path"]),
                        a["clients"].as_object().map_or(0, |c| c.len()).to_string(),
                        text(&a["first_seen"]),
                        text(&a["last_seen"]),
                    ]
                },
            );
            Ok(())
        }
        AdminCommand::Site {
            command: SiteCommand::Set { assignments },
        } => {
            let body = gup::admin::parse_assignments(&assignments).map_err(usage)?;
            let v = rt
                .block_on(client.call(Method::PUT, "/v1/admin/site", &[], Some(&body)))
                .map_err(runtime)?;
            print_json(&v);
            Ok(())
        }
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A JSON value as a table cell: strings bare, null as "-".
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Prints `v` as JSON, or its array `key` as a table.
fn show_list(
    v: &serde_json::Value,
    json: bool,
    key: &str,
    headers: &[&str],
    row: impl Fn(&serde_json::Value) -> Vec<String>,
) {
    if json {
        print_json(v);
    } else {
        print_table(headers, &table_rows(&v[key], row));
    }
}

/// One table row per element of a JSON array (none when it is not an array).
fn table_rows(
    list: &serde_json::Value,
    row: impl Fn(&serde_json::Value) -> Vec<String>,
) -> Vec<Vec<String>> {
    list.as_array()
        .map(|items| items.iter().map(row).collect())
        .unwrap_or_default()
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Effective settings as KEY / VALUE / WHERE rows ("own" when the group or location sets it).
fn print_settings(
    effective: &serde_json::Value,
    own: &serde_json::Value,
    location: &serde_json::Value,
) {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        match v {
            serde_json::Value::Object(m) if prefix.is_empty() || !m.contains_key("url") => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut eff = Vec::new();
    flatten("", effective, &mut eff);
    let mut own_keys = Vec::new();
    flatten("", own, &mut own_keys);
    let mut loc_keys = Vec::new();
    flatten("", location, &mut loc_keys);
    let rows: Vec<Vec<String>> = eff
        .into_iter()
        .map(|(k, v)| {
            let source = if loc_keys.iter().any(|(lk, _)| *lk == k) {
                "location"
            } else if own_keys.iter().any(|(ok, _)| *ok == k) {
                "group"
            } else if k == "serial" {
                ""
            } else {
                "inherited"
            };
            vec![k, text(&v), source.to_string()]
        })
        .collect();
    print_table(&["KEY", "VALUE", "SET BY"], &rows);
}
