//! The command line: flags defined once (clap derive), help with examples, table or JSON
//! output, one-line errors, exit codes 0 (ok), 1 (error), 2 (usage or bad value). An API
//! client, except `up` (runs the daemon) and `image prepare` (fills a data dir, no daemon).

mod accounts;
mod docker_config;
mod doctor;
mod guest;
mod image;
mod install;
mod machine;
mod network;
mod output;
mod registry;
mod session;
mod systemd;
mod upload;
mod volume;
mod workload;

pub use accounts::{TokenCmd, UserCmd};
pub use image::ImageCmd;
pub use machine::{MachineArg, MachineCmd};
pub use network::NetworkCmd;
pub use output::format_status;
pub use registry::RegistryCmd;
pub use volume::{MachineVolumeCmd, VolumeCmd};

use crate::api::*;
use crate::client::{Client, ClientError};
use crate::config::{Config, DEFAULT_SOCKET, Overrides};
use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use output::{print_json, table};
use std::path::PathBuf;

/// A value the CLI rejected before asking the daemon; exits 2 like a usage error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Usage(Box<dyn std::error::Error + Send + Sync>);

impl Usage {
    /// Mark `e` as a usage error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Usage {
        Usage(Box::new(e))
    }
}

/// The exit code of a failed command: by the daemon's error kind, 2 for values the CLI
/// rejected itself, else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if let Some(c) = e.downcast_ref::<ClientError>() {
        c.exit_code()
    } else if e.downcast_ref::<Usage>().is_some() {
        2
    } else {
        1
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON on stdout (stable schema, see README).
    Json,
}

/// sistemo: real microVMs on one Linux host, with their ports exposed on the host.
#[derive(Debug, Parser)]
#[command(
    name = "sistemo",
    version,
    about,
    propagate_version = true,
    disable_version_flag = true,
    after_help = "\
Examples:
  sudo sistemo up
  sistemo machine deploy debian --name web --expose 80
  sistemo machine exec web \"systemctl start nginx\"
  curl http://localhost:80
  sistemo machine status web"
)]
pub struct Cli {
    /// Print the version (`-v` as in Sistemo, `-V`, `--version`).
    #[arg(short = 'v', short_alias = 'V', long, action = clap::ArgAction::Version, global = true)]
    version: Option<bool>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Assume yes for confirmations.
    #[arg(short = 'y', long, global = true)]
    pub yes: bool,
    /// The daemon's API socket.
    #[arg(long, global = true, env = "SISTEMO_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// A remote daemon, https://HOST[:PORT] (its API token in SISTEMO_TOKEN); its certificate
    /// is pinned on first use (~/.config/sistemo/known_hosts).
    #[arg(long, global = true, env = "SISTEMO_HOST", value_name = "URL")]
    pub host: Option<String>,
    /// The remote daemon's certificate fingerprint (SHA-256, the `tls_fingerprint` of
    /// `sistemo config` on that host); needed without a terminal to confirm it on first use.
    #[arg(long, global = true, env = "SISTEMO_FINGERPRINT", value_name = "SHA256")]
    pub fingerprint: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run: its size costs nothing
pub enum Cmd {
    /// Run the daemon in the foreground (root).
    Up(UpArgs),
    /// Manage machines.
    #[command(visible_alias = "vm")]
    Machine {
        /// What to do.
        #[command(subcommand)]
        cmd: MachineCmd,
    },
    /// Manage isolated networks.
    Network {
        /// What to do.
        #[command(subcommand)]
        cmd: NetworkCmd,
    },
    /// Manage volumes, snapshots and clones.
    Volume {
        /// What to do.
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Manage images.
    Image {
        /// What to do.
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Credentials for OCI registries.
    Registry {
        /// What to do.
        #[command(subcommand)]
        cmd: RegistryCmd,
    },
    /// List every exposed port on the host.
    Ports,
    /// Show the audit log.
    History {
        /// Most entries to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Skip this many of the newest entries (the next page).
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Only this action (e.g. `machine.expose`, or `machine`).
        #[arg(long)]
        action: Option<String>,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Check the host and the daemon; say how to fix what fails.
    Doctor,
    /// Print the effective configuration.
    Config {
        /// Config file to read (default /etc/sistemo/config.yml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Set the host up: prerequisites (apt), the binary in /usr/local/bin, kernel and
    /// initramfs, the VMM's user, the systemd unit; --upgrade swaps the binary and restarts the
    /// service (machines keep running).
    Install {
        /// Replace the installed binary with this one and restart the service.
        #[arg(long)]
        upgrade: bool,
        /// Install under this folder instead of / (no apt, user or systemctl).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Say what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Config file (default /etc/sistemo/config.yml): its data_dir and kernel_deb.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage the systemd unit that runs the daemon.
    Service {
        /// What to do.
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Print the public key machines trust for SSH (to authorise it elsewhere).
    SshKey,
    /// Manage users of the dashboard and the TCP API.
    User {
        /// What to do.
        #[command(subcommand)]
        cmd: UserCmd,
    },
    /// Manage API tokens (for scripts and remote CLIs).
    Token {
        /// What to do.
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Print the daemon's events as they happen (machines, exposes, progress, changes).
    Events,
    /// Print a shell completion script.
    Completion {
        /// Shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `sistemo up` flags; each overrides the same key of the config file.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Config file (default /etc/sistemo/config.yml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// State directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Bridge of the default network.
    #[arg(long)]
    pub bridge: Option<String>,
    /// Subnet of the default network (`bridge_subnet`).
    #[arg(long)]
    pub subnet: Option<String>,
    /// Name of sistemo's nftables table.
    #[arg(long)]
    pub nft_table: Option<String>,
    /// Hypervisor backend: qemu, or netns (machines are network namespaces).
    #[arg(long)]
    pub hypervisor: Option<String>,
}

/// `service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Write /etc/systemd/system/sistemo.service, enable and start it.
    Install,
    /// Stop, disable and remove the unit (machines keep running).
    Uninstall,
    /// Show the daemon's log from the journal.
    Logs {
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
    },
    /// Show the unit's status.
    Status,
}

/// Run a parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    let socket = cli.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    let c = match &cli.host {
        Some(url) if !matches!(cli.cmd, Cmd::Up(_)) => {
            let token = std::env::var("SISTEMO_TOKEN").ok().filter(|t| !t.is_empty());
            Client::remote(url, cli.fingerprint.as_deref(), token).map_err(Usage::new)?
        }
        _ => Client::new(&socket),
    };
    let json = cli.output == Output::Json;
    match cli.cmd {
        Cmd::Up(a) => {
            let mut cfg = Config::load(a.config.as_deref())?;
            cfg.apply(Overrides {
                socket: cli.socket.clone(),
                data_dir: a.data_dir,
                bridge: a.bridge,
                subnet: a.subnet,
                nft_table: a.nft_table,
                hypervisor: a.hypervisor,
            })?;
            crate::daemon::run(cfg).await?;
        }
        Cmd::Machine { cmd } => return machine::run(&c, cmd, json, cli.yes).await,
        Cmd::Network { cmd } => network::run(&c, cmd, json, cli.yes)?,
        Cmd::Volume { cmd } => volume::run(&c, cmd, json, cli.yes)?,
        Cmd::Image { cmd } => image::run(&c, cmd, json, cli.yes).await?,
        Cmd::Registry { cmd } => registry::run(&c, cmd, json)?,
        Cmd::Ports => {
            let rows: Vec<PortRow> = c.get("/v1/ports")?;
            if json {
                print_json(&rows)?;
            } else {
                table(
                    &["MACHINE", "BIND", "HOST PORT", "MACHINE PORT", "PROTO", "STATE"],
                    rows.into_iter()
                        .map(|r| {
                            vec![
                                r.machine,
                                r.port.bind.unwrap_or_else(|| "*".into()),
                                r.port.host_port,
                                r.port.machine_port,
                                r.port.protocol,
                                r.state,
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::History {
            limit,
            offset,
            action,
            target,
        } => {
            let mut q = format!("/v1/history?limit={limit}&offset={offset}");
            if let Some(a) = action {
                q.push_str(&format!("&action={}", urlencode(&a)));
            }
            if let Some(t) = target {
                q.push_str(&format!("&target={}", urlencode(&t)));
            }
            let h: Vec<HistoryEntry> = c.get(&q)?;
            if json {
                print_json(&h)?;
            } else {
                table(
                    &["TIME", "CALLER", "ACTION", "TARGET", "DETAILS", "RESULT"],
                    h.into_iter()
                        .map(|e| {
                            let (target, details) = history_details(&e.target);
                            vec![
                                e.at,
                                // who (a local account, a user, a token), and from where
                                match (e.actor, e.remote) {
                                    (Some(a), Some(r)) => format!("{a} ({r})"),
                                    (Some(a), None) => a,
                                    (None, r) => {
                                        e.uid.map(|u| u.to_string()).or(r).unwrap_or_else(|| "-".into())
                                    }
                                },
                                e.action,
                                target.to_string(),
                                details.to_string(),
                                e.result,
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Doctor => return doctor::run(&c, json),
        Cmd::Config { config } => {
            // The daemon's effective configuration when it runs, else what `up` would use.
            let mut v = match c.get::<InfoResponse>("/v1/info") {
                // A remote daemon's configuration, or its error (never this host's file).
                Err(e) if c.is_remote() => return Err(e.into()),
                Ok(i) => {
                    let mut v = i.config;
                    if let Ok(s) = c.get::<SystemInfo>("/v1/system") {
                        v["tls_fingerprint"] = s.tls_fingerprint.into();
                    }
                    v
                }
                Err(_) => {
                    let mut cfg = Config::load(config.as_deref())?;
                    cfg.validate()?;
                    if let Some(s) = &cli.socket {
                        cfg.socket = s.clone();
                    }
                    if cfg.token.is_some() {
                        cfg.token = Some("<redacted>".into());
                    }
                    let cert = cfg
                        .tls_cert
                        .clone()
                        .unwrap_or_else(|| crate::tls::generated_paths(&cfg.data_dir).0);
                    let mut v = serde_json::to_value(&cfg)?;
                    if cfg.listeners()?.iter().any(|l| l.tls) {
                        v["tls_fingerprint"] = crate::tls::fingerprint_of_file(&cert).into();
                    }
                    v
                }
            };
            if v.get("tls_fingerprint").is_some_and(|f| f.is_null()) {
                v.as_object_mut().map(|o| o.remove("tls_fingerprint"));
            }
            if json {
                print_json(&v)?;
            } else {
                print!("{}", yaml_serde::to_string(&v)?);
            }
        }
        Cmd::Install {
            upgrade,
            root,
            dry_run,
            config,
        } => {
            install::install(
                install::InstallOptions {
                    upgrade,
                    root,
                    dry_run,
                },
                config.as_deref(),
            )
            .await?
        }
        Cmd::Service { cmd } => match cmd {
            ServiceCmd::Install => systemd::install()?,
            ServiceCmd::Uninstall => systemd::uninstall()?,
            ServiceCmd::Status => return systemd::status(),
            ServiceCmd::Logs { follow } => return systemd::logs(follow),
        },
        Cmd::SshKey => print!("{}", c.text("/v1/ssh-key")?),
        Cmd::User { cmd } => accounts::run_user(&c, cmd, json, cli.yes)?,
        Cmd::Token { cmd } => accounts::run_token(&c, cmd, json)?,
        Cmd::Events => accounts::run_events(&c, json)?,
        Cmd::Completion { shell } => {
            // Dynamic completion: the shell calls back into sistemo (machine names come from
            // the daemon), so print the registration script clap_complete generates for it.
            let out = std::process::Command::new(std::env::current_exe()?)
                .env("COMPLETE", shell.to_string())
                .output()?;
            use std::io::Write;
            std::io::stdout().write_all(&out.stdout)?;
        }
    }
    Ok(0)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A history entry's target split for the table: what was acted on (a machine, a volume, …)
/// and the details the entry holds after it (a port, a command, a volume), `-` when none.
fn history_details(target: &str) -> (&str, &str) {
    match target.split_once(' ') {
        Some((t, d)) if !d.trim().is_empty() => (t, d.trim()),
        _ => (target.trim(), "-"),
    }
}

#[cfg(test)]
mod tests {
    use super::history_details;

    #[test]
    fn history_targets_split_into_target_and_details() {
        assert_eq!(history_details("web 8080:80/tcp"), ("web", "8080:80/tcp"));
        assert_eq!(history_details("web uname -a"), ("web", "uname -a"));
        assert_eq!(history_details("web"), ("web", "-"));
        assert_eq!(history_details("web "), ("web", "-"));
    }
}
