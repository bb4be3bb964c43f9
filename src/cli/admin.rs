//! `gup admin`: the admin API from the command line, printed as tables or JSON.
//!
//! Owns the admin subcommands, their arguments, and how answers are shown. It must never
//! call anything but the manager's admin API (through [`crate::admin::AdminClient`]).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use reqwest::Method;

use super::admin_print::{print_json, print_more, print_settings, show_list, text};
use super::{init_logging, non_empty, runtime, runtime_env, usage, Failure};
use crate::core::config::LogFormat;

#[derive(Args)]
pub(super) struct AdminArgs {
    /// Manager base URL.
    #[arg(long, default_value = crate::core::config::DEFAULT_UPSTREAM)]
    manager: String,
    /// Admin token.
    #[arg(long, env = "GUP_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the admin token.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The manager's data dir, on the manager's machine: without --token or --token-file the
    /// admin token is read from DIR/admin.token [default: gup-data/manager, when it has one].
    #[arg(long)]
    data_dir: Option<PathBuf>,
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
    /// Enrolment tokens: `enroll create --group G`, `enroll list`, `enroll revoke ID`.
    Enroll {
        #[command(subcommand)]
        command: EnrollCommand,
    },
    /// Site-wide settings: `site set application_learning=true`.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Events clients uploaded, oldest first, filtered, a page at a time.
    ///
    /// One request visits at most 50,000 stored events: when a filter matches few of them,
    /// a page may be shorter than --limit (even empty) while more follow; "more: --after N"
    /// then gives the cursor to continue from.
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
    /// Admin notifications raised by critical events (and overdue nodes), newest first;
    /// `notifications ack ID` or `notifications ack --all` clears them.
    #[command(args_conflicts_with_subcommands = true)]
    Notifications {
        #[command(subcommand)]
        command: Option<NotificationsCommand>,
        /// Page size (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Cursor from a previous page's `next`: older notifications.
        #[arg(long)]
        after: Option<u64>,
        /// Only those not acknowledged (a page may then be short while more follow).
        #[arg(long)]
        unacked: bool,
        #[arg(long)]
        json: bool,
    },
    /// Nodes that report to this manager (directly or through other nodes): each one's last
    /// report, the node it reports through, revisions behind, and whether it is overdue (no
    /// report for three of its sync intervals).
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// Take a backup of the running manager into FILE, which is written whole or not at all
    /// (a temp file beside it, verified, then renamed) with mode 0600: the catalog with its
    /// signatures, groups and settings, policies, clients, users, events, notifications,
    /// applications, enrolment tokens, the node table, and the catalog signing key and
    /// tokens the manager's data dir keeps. The file is a secret: keep it like the key.
    /// Restore it with `gup manager restore --data-dir DIR FILE`.
    Backup {
        /// Where to write the backup.
        #[arg(long)]
        out: PathBuf,
        /// Include the content (the blobs of every retained catalog revision); without it,
        /// items must be published again after a restore.
        #[arg(long)]
        with_content: bool,
    },
    /// Learned applications: `apps search TEXT`.
    Apps {
        #[command(subcommand)]
        command: AppsCommand,
    },
}

#[derive(Subcommand)]
enum NotificationsCommand {
    /// Acknowledge (clear) notification ID, or with --all every one raised so far. Again is
    /// harmless: an acknowledged notification keeps its first acknowledgement time.
    Ack {
        /// The notification's id (the ID column of `notifications`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every notification raised so far.
        #[arg(long)]
        all: bool,
        /// With --all: only those with an id up to this one (the newest you saw).
        #[arg(long, requires = "all")]
        up_to: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AppsCommand {
    /// Applications whose name or path contains TEXT (case-insensitive), each with how
    /// many clients have it (the answer lists at most 100 of them per application).
    Search {
        text: String,
        /// Page size (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Cursor from a previous page's `next`.
        #[arg(long)]
        after: Option<String>,
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
    /// List every client with group, the node it is behind, when it sent its last
    /// heartbeat and whether overdue (all pages, in client id order; --json prints them as
    /// one list).
    List {
        /// Clients asked for per request (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        page: usize,
        /// Only the clients in this group (not its subgroups).
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a client (its history is kept for a reconnect).
    Delete { id: String },
    /// Revoke a client's credential: refused by the manager at once and by each node after
    /// its next sync. It may enrol again with a token.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum EnrollCommand {
    /// Make an enrolment token for a group; it is printed this once.
    Create {
        #[arg(long)]
        group: String,
        /// When it stops working: a duration (30m, 12h, 7d) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        /// How many clients may enrol with it [default: any number].
        #[arg(long)]
        uses: Option<u64>,
    },
    /// List the tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: no client enrols with it any more.
    Revoke { id: String },
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

pub(super) fn run(args: AdminArgs, log_format: LogFormat) -> Result<(), Failure> {
    init_logging(log_format);
    let token = admin_token(non_empty(args.token), args.token_file, args.data_dir)?;
    let client =
        crate::admin::AdminClient::new(&args.manager, token).map_err(|e| usage(e.to_string()))?;
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
            outln!(
                "{what}: {} {} sha256={} size={} revision={}",
                r.name,
                r.version,
                r.sha256,
                r.size,
                r.revision
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
                let body = crate::admin::parse_assignments(&assignments).map_err(usage)?;
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
                    // Where each key is set, read back as `settings get` shows it, so the two
                    // commands label keys alike (a key set on a location says "location").
                    let set = rt
                        .block_on(client.call(
                            Method::GET,
                            &format!("/v1/admin/groups/{group}/settings"),
                            &q,
                            None,
                        ))
                        .map_err(runtime)?;
                    print_settings(&set["effective"], &set["own"], &set["location_override"]);
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
            outln!("policy of {group} set: serial {}", v["serial"]);
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
                outln!("group {group} (parent {parent})");
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
                outln!("group {group} deleted");
                Ok(())
            }
        },
        AdminCommand::Enroll { command } => match command {
            EnrollCommand::Create {
                group,
                expires,
                uses,
            } => {
                let mut body = serde_json::json!({ "group": group });
                if let Some(e) = expires {
                    body["expires"] = e.into();
                }
                if let Some(n) = uses {
                    body["uses"] = n.into();
                }
                let v = rt
                    .block_on(client.call(Method::POST, "/v1/admin/enroll", &[], Some(&body)))
                    .map_err(runtime)?;
                outln!("{}", text(&v["token"]));
                eprintln!(
                    "enrolment token {} for group {group} (expires {}, uses {}); shown only now: give it to agents with --enroll-token-file",
                    text(&v["id"]),
                    text(&v["expires_at"]),
                    text(&v["uses"]),
                );
                Ok(())
            }
            EnrollCommand::List { json } => {
                let v = rt
                    .block_on(client.call(Method::GET, "/v1/admin/enroll", &[], None))
                    .map_err(runtime)?;
                show_list(
                    &v,
                    json,
                    "tokens",
                    &["ID", "GROUP", "EXPIRES", "USES", "USED", "STATE"],
                    |t| {
                        let state = if t["revoked"] == true {
                            "revoked"
                        } else if t["usable"] == true {
                            "usable"
                        } else {
                            "spent or expired"
                        };
                        vec![
                            text(&t["id"]),
                            text(&t["group"]),
                            text(&t["expires_at"]),
                            text(&t["uses"]),
                            text(&t["used"]),
                            state.into(),
                        ]
                    },
                );
                Ok(())
            }
            EnrollCommand::Revoke { id } => {
                rt.block_on(client.call(
                    Method::DELETE,
                    &format!("/v1/admin/enroll/{id}"),
                    &[],
                    None,
                ))
                .map_err(runtime)?;
                outln!("enrolment token {id} revoked");
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
                outln!("client {id} moved to {group}");
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
                outln!("client {id} deleted");
                Ok(())
            }
            ClientCommand::Revoke { id } => {
                let v = rt
                    .block_on(client.call(
                        Method::POST,
                        &format!("/v1/admin/clients/{id}/revoke"),
                        &[],
                        None,
                    ))
                    .map_err(runtime)?;
                outln!(
                    "client {id}: credential {} revoked",
                    text(&v["revoked_serial"])
                );
                Ok(())
            }
            ClientCommand::List { page, group, json } => {
                let page_s = page.to_string();
                let mut q: Vec<(&str, &str)> = vec![("limit", &page_s)];
                if let Some(g) = &group {
                    q.push(("group", g));
                }
                let mut clients: Vec<serde_json::Value> = Vec::new();
                rt.block_on(client.pages("/v1/admin/clients", &q, |mut v| {
                    if let serde_json::Value::Array(items) = v["clients"].take() {
                        clients.extend(items);
                    }
                }))
                .map_err(runtime)?;
                let all = serde_json::json!({ "clients": clients });
                show_list(
                    &all,
                    json,
                    "clients",
                    &[
                        "CLIENT",
                        "GROUP",
                        "INSTALL GROUP",
                        "OS",
                        "VERSION",
                        "LOCATION",
                        "VIA",
                        "SENT AT",
                        "OVERDUE",
                    ],
                    |c| {
                        vec![
                            text(&c["client_id"]),
                            text(&c["group"]),
                            text(&c["install_group"]),
                            text(&c["os"]),
                            text(&c["client_version"]),
                            text(&c["location"]),
                            text(&c["via"]),
                            text(&c["sent_at"]),
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
            outln!("user {user} -> group {group}");
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
                        match e["conflict_of"].as_u64() {
                            Some(of) => format!("{} (conflict of seq {of})", text(&e["id"])),
                            None => text(&e["id"]),
                        },
                    ]
                },
            );
            print_more(&v, json);
            Ok(())
        }
        AdminCommand::Nodes { json } => super::admin_nodes::run(&client, &rt, json),
        AdminCommand::Backup { out, with_content } => {
            let written = rt
                .block_on(client.backup(&out, with_content))
                .map_err(runtime)?;
            let m = &written.manifest;
            let blobs = m.blobs().count();
            outln!(
                "backup written to {}: {} bytes, catalog revision {}, {} records, {}",
                out.display(),
                written.bytes,
                m.catalog_revision,
                m.records,
                if m.with_content {
                    format!("{blobs} blobs")
                } else {
                    "without content".to_string()
                }
            );
            eprintln!(
                "gup: {} holds the catalog signing key and the manager's tokens (mode 0600): keep it secret",
                out.display()
            );
            Ok(())
        }
        AdminCommand::Notifications {
            command: Some(command),
            ..
        } => ack_notifications(&client, &rt, command),
        AdminCommand::Notifications {
            command: None,
            limit,
            after,
            unacked,
            json,
        } => {
            let limit_s = limit.to_string();
            let after_s = after.map(|a| a.to_string());
            let mut q: Vec<(&str, &str)> = vec![("limit", &limit_s)];
            if let Some(a) = &after_s {
                q.push(("after", a));
            }
            if unacked {
                q.push(("unacked", "true"));
            }
            let v = rt
                .block_on(client.call(Method::GET, "/v1/admin/notifications", &q, None))
                .map_err(runtime)?;
            show_list(
                &v,
                json,
                "notifications",
                &["ID", "FIRST", "GROUP", "KIND", "COUNT", "LAST", "ACKED"],
                |n| {
                    vec![
                        text(&n["id"]),
                        text(&n["first_at"]),
                        text(&n["group"]),
                        text(&n["kind"]),
                        text(&n["count"]),
                        text(&n["last_at"]),
                        text(&n["acked_at"]),
                    ]
                },
            );
            print_more(&v, json);
            Ok(())
        }
        AdminCommand::Apps {
            command:
                AppsCommand::Search {
                    text: q,
                    limit,
                    after,
                    json,
                },
        } => {
            let limit_s = limit.to_string();
            let mut query: Vec<(&str, &str)> = vec![("q", &q), ("limit", &limit_s)];
            if let Some(a) = &after {
                query.push(("after", a));
            }
            let v = rt
                .block_on(client.call(Method::GET, "/v1/admin/applications", &query, None))
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
                        text(&a["client_count"]),
                        text(&a["first_seen"]),
                        text(&a["last_seen"]),
                    ]
                },
            );
            print_more(&v, json);
            Ok(())
        }
        AdminCommand::Site {
            command: SiteCommand::Set { assignments },
        } => {
            let body = crate::admin::parse_assignments(&assignments).map_err(usage)?;
            let v = rt
                .block_on(client.call(Method::PUT, "/v1/admin/site", &[], Some(&body)))
                .map_err(runtime)?;
            print_json(&v);
            Ok(())
        }
    }
}

/// `gup admin notifications ack ID | --all [--up-to ID]`.
fn ack_notifications(
    client: &crate::admin::AdminClient,
    rt: &tokio::runtime::Runtime,
    command: NotificationsCommand,
) -> Result<(), Failure> {
    let NotificationsCommand::Ack {
        id,
        all,
        up_to,
        json,
    } = command;
    if all {
        let mut body = serde_json::json!({ "all": true });
        if let Some(u) = up_to {
            body["up_to"] = u.into();
        }
        let v = rt
            .block_on(client.call(
                Method::POST,
                "/v1/admin/notifications/ack",
                &[],
                Some(&body),
            ))
            .map_err(runtime)?;
        if json {
            print_json(&v);
        } else {
            outln!(
                "{} notifications acknowledged (every one up to id {} is)",
                text(&v["acked"]),
                text(&v["through"])
            );
        }
        return Ok(());
    }
    // clap requires the id without --all.
    let Some(id) = id else {
        return Err(usage("notifications ack: an ID or --all"));
    };
    let v = rt
        .block_on(client.call(
            Method::POST,
            &format!("/v1/admin/notifications/{id}/ack"),
            &[],
            None,
        ))
        .map_err(runtime)?;
    if json {
        print_json(&v);
    } else {
        outln!(
            "notification {id} ({} in group {}, {} events) acknowledged at {}",
            text(&v["kind"]),
            text(&v["group"]),
            text(&v["count"]),
            text(&v["acked_at"])
        );
    }
    Ok(())
}

/// The admin token: given (`--token`, `GUP_ADMIN_TOKEN`), else from `--token-file`, else
/// from the manager's data dir (`--data-dir`, else the default one when it holds a token), as
/// an operator on the manager's own machine has it.
fn admin_token(
    token: Option<String>,
    token_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<crate::http::auth::Token, Failure> {
    use crate::http::auth::{read_token_file, token_path, Token};
    if let Some(t) = token {
        return Ok(Token::new(t));
    }
    if let Some(f) = token_file {
        return read_token_file(&f).map_err(|e| usage(format!("--token-file: {e}")));
    }
    if let Some(dir) = data_dir {
        let path = token_path(&dir, "admin");
        if !path.exists() {
            return Err(usage(format!(
                "--data-dir {}: no admin token there ({} does not exist; is it the manager's data dir?)",
                dir.display(),
                path.display()
            )));
        }
        return read_token_file(&path).map_err(|e| usage(format!("--data-dir: {e}")));
    }
    let default_dir = crate::core::config::ManagerConfig::default()
        .manager
        .data_dir;
    let path = token_path(&default_dir, "admin");
    if path.exists() {
        return read_token_file(&path).map_err(|e| usage(e.to_string()));
    }
    Err(usage(format!(
        "admin needs a token: --token, --token-file, GUP_ADMIN_TOKEN, or --data-dir of the manager \
         (there is no {})",
        path.display()
    )))
}
