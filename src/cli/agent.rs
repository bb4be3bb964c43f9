//! `gup agent`: run the endpoint client on a data dir, show its status, spool an event.
//!
//! Owns the agent's flags and turning them into `crate::agent::Options`, and the `status`
//! and `event` subcommands' output. It must never hold what an agent does: that is
//! `crate::agent`'s.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{init_logging, runtime, runtime_env, usage, Failure};
use crate::core::config::LogFormat;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(super) struct AgentArgs {
    #[command(subcommand)]
    sub: Option<AgentSub>,
    #[command(flatten)]
    run: AgentRunArgs,
}

#[derive(Args)]
struct AgentRunArgs {
    /// Where the agent keeps its id, state, policy, content and event spool.
    #[arg(long, required = true)]
    data_dir: Option<PathBuf>,
    /// A server to start from (node or manager); repeat for more. Once the agent has
    /// settings, their management_servers list is used, with these as the fallback.
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// The group the client is installed in (with an enrolment token or a credential, the
    /// token's group is: this is then ignored by the servers).
    #[arg(long, required_unless_present_any = ["enroll_token", "enroll_token_file"])]
    install_group: Option<String>,
    /// The location the client reports (e.g. office, remote).
    #[arg(long)]
    location: Option<String>,
    /// windows, mac or linux.
    #[arg(long, default_value = "windows")]
    os: String,
    /// The client version sent in heartbeats.
    #[arg(long, default_value = "12.1.5")]
    client_version: String,
    /// computer or user (user needs --user).
    #[arg(long, default_value = "computer")]
    login_mode: String,
    /// The logged-in user, in user login mode.
    #[arg(long)]
    user: Option<String>,
    /// The client id (made at first start when not given; kept in DIR/client_id).
    #[arg(long)]
    client_id: Option<String>,
    /// A directory whose executables are reported when application learning is on; repeat
    /// for more.
    #[arg(long = "apps-dir")]
    apps_dirs: Vec<PathBuf>,
    /// Previous versions of each content item kept beside the current one.
    #[arg(long, default_value_t = crate::agent::DEFAULT_KEEP_VERSIONS)]
    keep_versions: usize,
    /// An enrolment token (`gup admin enroll create`): the first heartbeat sends it and the
    /// credential it brings is kept in DIR/credential. The token's group is the install
    /// group.
    #[arg(long, env = "GUP_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// The enrolment token read from a file (not visible in `ps`).
    #[arg(long, conflicts_with = "enroll_token")]
    enroll_token_file: Option<PathBuf>,
    /// Always download the full blob of a new version [default: deltas on: a new version of
    /// an item the agent holds an older version of is rebuilt from a delta, listed in the
    /// catalog or asked of the server, and checked; any failure takes the full blob].
    #[arg(long)]
    no_deltas: bool,
}

#[derive(Subcommand)]
enum AgentSub {
    /// Print what the agent of a data dir knows: group, serials, revision, slot, server in
    /// use and why, events waiting.
    Status {
        #[arg(long)]
        data_dir: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Spool one event for the agent of a data dir to upload (critical ones go at once).
    Event {
        #[arg(long)]
        data_dir: PathBuf,
        /// Event kind, e.g. risk, intrusion, system_change.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        subkind: Option<String>,
        /// The event's data, as JSON.
        #[arg(long)]
        data: Option<String>,
    },
}

fn agent_failure(e: crate::agent::AgentError) -> Failure {
    match e {
        crate::agent::AgentError::Usage { .. } => usage(e.to_string()),
        other => runtime(other),
    }
}

pub(super) fn run(args: AgentArgs, log_format: LogFormat) -> Result<(), Failure> {
    match args.sub {
        Some(AgentSub::Status { data_dir, json }) => {
            let status = crate::agent::status(&data_dir).map_err(agent_failure)?;
            if json {
                let text = serde_json::to_string_pretty(&status).map_err(runtime)?;
                outln!("{text}");
            } else {
                out!("{}", status.text());
            }
            Ok(())
        }
        Some(AgentSub::Event {
            data_dir,
            kind,
            subkind,
            data,
        }) => {
            let id = crate::agent::add_event(&data_dir, &kind, subkind.as_deref(), data.as_deref())
                .map_err(agent_failure)?;
            outln!("event {id} spooled");
            Ok(())
        }
        None => {
            let a = args.run;
            let enroll_token = match (&a.enroll_token, &a.enroll_token_file) {
                (Some(t), _) => Some(t.trim().to_string()),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| usage(format!("--enroll-token-file {}: {e}", f.display())))?
                        .trim()
                        .to_string(),
                ),
                (None, None) => None,
            };
            // With a token, the group comes from the token: --install-group may be left out.
            let install_group = a.install_group.or_else(|| {
                enroll_token
                    .as_ref()
                    .map(|_| crate::core::settings::DEFAULT_GROUP.to_string())
            });
            let (Some(data_dir), Some(install_group)) = (a.data_dir, install_group) else {
                return Err(usage(
                    "--data-dir and --install-group (or --enroll-token) are required",
                ));
            };
            let opts = crate::agent::Options {
                data_dir,
                servers: a.servers,
                install_group,
                location: a.location,
                os: a.os,
                client_version: a.client_version,
                login_mode: a.login_mode,
                user: a.user,
                client_id: a.client_id,
                apps_dirs: a.apps_dirs,
                keep_versions: a.keep_versions,
                enroll_token,
                use_deltas: !a.no_deltas,
            };
            opts.check().map_err(agent_failure)?;
            init_logging(log_format);
            let rt = runtime_env()?;
            rt.block_on(async move {
                let stop = tokio_util::sync::CancellationToken::new();
                let trigger = stop.clone();
                tokio::spawn(async move {
                    crate::http::shutdown::signal().await;
                    trigger.cancel();
                });
                crate::agent::run(opts, stop).await
            })
            .map_err(agent_failure)
        }
    }
}
