//! The command line: flags defined once (clap derive), help with examples, table or JSON
//! output, one-line errors, exit codes 0 (ok), 1 (error), 2 (usage). Only an API client.

use crate::api::*;
use crate::client::Client;
use crate::config::{Config, DEFAULT_SOCKET};
use anyhow::{Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use std::io::IsTerminal;
use std::path::PathBuf;

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
    after_help = "\
Examples:
  sudo sistemo up
  sistemo machine deploy debian --name web --expose 80
  sistemo machine exec web \"systemctl start nginx\"
  curl http://localhost:80
  sistemo machine status web"
)]
pub struct Cli {
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Assume yes for confirmations.
    #[arg(short = 'y', long, global = true)]
    pub yes: bool,
    /// The daemon's API socket.
    #[arg(long, global = true, env = "SISTEMO_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
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
    /// Manage images.
    Image {
        /// What to do.
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// List every exposed port on the host.
    Ports,
    /// Show the audit log.
    History {
        /// Most entries to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
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
    /// Manage the systemd unit that runs the daemon.
    Service {
        /// What to do.
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
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

/// `machine` subcommands.
#[derive(Debug, Subcommand)]
pub enum MachineCmd {
    /// Create and boot a machine.
    #[command(
        after_help = "Examples:\n  sistemo machine deploy debian --name web --expose 80\n  sistemo machine deploy debian --expose 8080:3000 --expose 53/udp --memory 1G"
    )]
    Deploy {
        /// Image: a name (debian), a *.ext4 file or an http(s) URL.
        image: String,
        /// Machine name (a-z, 0-9, '-').
        #[arg(long)]
        name: Option<String>,
        /// Virtual CPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory, e.g. 512M or 2G.
        #[arg(long)]
        memory: Option<String>,
        /// Disk size, e.g. 4G.
        #[arg(long)]
        storage: Option<String>,
        /// Expose a port: [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp]. Repeatable.
        #[arg(long)]
        expose: Vec<String>,
        /// Network (default: default).
        #[arg(long)]
        network: Option<String>,
    },
    /// List machines.
    #[command(visible_alias = "ls")]
    List,
    /// Show a machine: ID, name, status, IP and ports.
    #[command(visible_alias = "show")]
    Status {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
    },
    /// Start a stopped machine (its port rules come back).
    Start {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
    },
    /// Stop a machine gracefully (port rules leave nftables, stay stored).
    Stop {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
    },
    /// Restart a machine (keeps IP and ports).
    Restart {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
    },
    /// Delete a machine with its rules, IP and files.
    #[command(visible_alias = "rm")]
    Delete {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
    },
    /// Run a command in a machine; exits with its exit code.
    #[command(
        after_help = "Examples:\n  sistemo machine exec web uname -a\n  sistemo machine exec web \"apt-get update && apt-get install -y nginx\"\n  sistemo machine exec api \"node server.js &\""
    )]
    Exec {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
        /// Command; a single quoted string runs through the guest's shell.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Interactive shell in a machine.
    Ssh {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
    },
    /// The machine's console output.
    Logs {
        /// Keep printing new output as it arrives.
        #[arg(short, long)]
        follow: bool,
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
    },
    /// Expose ports of a machine (running or stopped).
    #[command(
        after_help = "Examples:\n  sistemo machine expose web --port 80\n  sistemo machine expose web --port 8080:80 --port 127.0.0.1:9000:9000/udp"
    )]
    Expose {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
        /// [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp]. Repeatable.
        #[arg(long, required = true)]
        port: Vec<String>,
    },
    /// Remove an exposed port: `--port 8080` (tcp) or `--port 8080/udp`.
    Unexpose {
        /// Name or UUID.
        #[arg(add = ArgValueCandidates::new(machine_names))]
        name: String,
        /// [HOST_IP:]HOST_PORT[-END][/tcp|/udp].
        #[arg(long)]
        port: String,
    },
}

/// `service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Write /etc/systemd/system/sistemo.service, enable and start it.
    Install,
    /// Stop, disable and remove the unit (machines keep running).
    Uninstall,
    /// Show the unit's status.
    Status,
}

/// `image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List local images.
    #[command(visible_alias = "ls")]
    List,
    /// Build an image from Debian's archive with debootstrap.
    #[command(
        after_help = "Examples:\n  sistemo image build debian\n  sistemo image build debian --name web-image --include nginx,nodejs"
    )]
    Build {
        /// Base (debian).
        base: String,
        /// Tag of the new image (default: the base's name).
        #[arg(long)]
        name: Option<String>,
        /// Extra packages, comma-separated.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
    },
    /// Prepare kernel, initramfs and the `debian` image in a data dir without a daemon (root;
    /// fetches from Debian's archive, changes nothing in the host's network).
    Prepare {
        /// Data dir to fill (the daemon's `data_dir`).
        #[arg(long, default_value = "/var/lib/sistemo")]
        data_dir: PathBuf,
        /// Extra packages baked into the `debian` image, comma-separated.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
    },
    /// Remove an image tag (refused while a machine uses it).
    #[command(visible_alias = "rm")]
    Remove {
        /// Tag.
        tag: String,
    },
}

/// `network` subcommands.
#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create an isolated network with its own bridge.
    Create {
        /// Name (a-z, 0-9, '-'; at most 12).
        name: String,
        /// Subnet, e.g. 10.201.0.0/24 (default: a free 10.x.0.0/24).
        #[arg(long)]
        subnet: Option<String>,
    },
    /// List networks.
    #[command(visible_alias = "ls")]
    List,
    /// Delete a network (refused while machines use it).
    #[command(visible_alias = "rm")]
    Delete {
        /// Name.
        name: String,
    },
}

/// Machine names for shell completion, asked from the daemon (nothing when it is not running).
fn machine_names() -> Vec<CompletionCandidate> {
    let socket = std::env::var_os("SISTEMO_SOCKET").unwrap_or_else(|| DEFAULT_SOCKET.into());
    Client::new(PathBuf::from(socket))
        .get::<Vec<MachineInfo>>("/v1/machines")
        .map(|ms| {
            ms.into_iter()
                .map(|m| CompletionCandidate::new(m.name).help(Some(m.status.into())))
                .collect()
        })
        .unwrap_or_default()
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Progress of a long operation on stderr: a spinner with elapsed time on a terminal, plain
/// lines otherwise. The spinner is cleared when dropped.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b
        });
        Progress { bar }
    }

    fn line(&self, p: &str) {
        match &self.bar {
            Some(b) => {
                b.println(format!("… {p}"));
                b.set_message(p.to_string());
            }
            None => eprintln!("… {p}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn progress_printer() -> impl FnMut(&str) {
    let p = Progress::new();
    move |line: &str| p.line(line)
}

/// The page's status block.
pub fn format_status(m: &MachineInfo) -> String {
    let mut s = format!(
        "ID:       {}\nName:     {}\nStatus:   {}\nIP:       {}\n",
        m.id, m.name, m.status, m.ip
    );
    if m.ports.is_empty() {
        s.push_str("Ports:    none\n");
    } else {
        s.push_str("Ports:\n");
        for p in &m.ports {
            s.push_str(&format!("  {}\n", p.display));
        }
    }
    s
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// Quote one word for a POSIX shell when it needs it.
pub fn shell_quote(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

fn confirm(yes: bool, what: &str) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing to {what} without confirmation: no terminal to ask on; pass -y to confirm");
    }
    eprint!("{what}? [y/N] ");
    let mut a = String::new();
    std::io::stdin().read_line(&mut a)?;
    if matches!(a.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("not confirmed; nothing was changed")
    }
}

/// Run a parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    let socket = cli.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    let c = Client::new(&socket);
    let json = cli.output == Output::Json;
    match cli.cmd {
        Cmd::Up(a) => {
            let mut cfg = Config::load(a.config.as_deref())?;
            if let Some(s) = &cli.socket {
                cfg.socket = s.clone();
            }
            if let Some(v) = a.data_dir {
                cfg.data_dir = v;
            }
            if let Some(v) = a.bridge {
                cfg.bridge = v;
            }
            if let Some(v) = a.subnet {
                cfg.bridge_subnet = v
                    .parse()
                    .map_err(|_| anyhow!("--subnet {v:?} is not a CIDR (allowed: like 10.200.0.0/16)"))?;
            }
            if let Some(v) = a.nft_table {
                cfg.nft_table = v;
            }
            if let Some(v) = a.hypervisor {
                cfg.hypervisor = v;
            }
            crate::daemon::run(cfg).await?;
        }
        Cmd::Machine { cmd } => return machine(&c, cmd, json, cli.yes),
        Cmd::Network { cmd } => match cmd {
            NetworkCmd::Create { name, subnet } => {
                let n: NetworkInfo = c.call(
                    "POST",
                    "/v1/networks",
                    Some(&NetworkCreateRequest { name, subnet }),
                )?;
                if json {
                    print_json(&n)?;
                } else {
                    println!("network {} created: {} on bridge {}", n.name, n.subnet, n.bridge);
                }
            }
            NetworkCmd::List => {
                let ns: Vec<NetworkInfo> = c.get("/v1/networks")?;
                if json {
                    print_json(&ns)?;
                } else {
                    table(
                        &["NAME", "SUBNET", "GATEWAY", "BRIDGE", "MACHINES"],
                        ns.into_iter()
                            .map(|n| vec![n.name, n.subnet, n.gateway, n.bridge, n.machines.to_string()])
                            .collect(),
                    );
                }
            }
            NetworkCmd::Delete { name } => {
                confirm(cli.yes, &format!("delete network {name}"))?;
                let v: serde_json::Value = c.call("DELETE", &format!("/v1/networks/{name}"), None::<&()>)?;
                if json {
                    print_json(&v)?;
                } else {
                    println!("network {name} deleted");
                }
            }
        },
        Cmd::Image { cmd } => match cmd {
            ImageCmd::List => {
                let is: Vec<ImageRow> = c.get("/v1/images")?;
                if json {
                    print_json(&is)?;
                } else {
                    table(
                        &["TAGS", "SHA256", "SIZE", "SOURCE"],
                        is.into_iter()
                            .map(|i| {
                                vec![
                                    i.tags.join(","),
                                    i.sha256[..12.min(i.sha256.len())].to_string(),
                                    format!("{}M", i.size >> 20),
                                    i.source,
                                ]
                            })
                            .collect(),
                    );
                }
            }
            ImageCmd::Build { base, name, include } => {
                let r: ImageRow = c.stream(
                    "POST",
                    "/v1/images/build",
                    Some(&ImageBuildRequest { base, name, include }),
                    progress_printer(),
                )?;
                if json {
                    print_json(&r)?;
                } else {
                    println!(
                        "image {} built: sha256 {}, {}M",
                        r.tags.join(","),
                        r.sha256,
                        r.size >> 20
                    );
                }
            }
            ImageCmd::Prepare { data_dir, include } => crate::vm::prepare(&data_dir, &include).await?,
            ImageCmd::Remove { tag } => {
                confirm(cli.yes, &format!("remove image {tag}"))?;
                let v: serde_json::Value =
                    c.call("DELETE", &format!("/v1/images/{}", urlencode(&tag)), None::<&()>)?;
                if json {
                    print_json(&v)?;
                } else {
                    println!("image {tag} removed");
                }
            }
        },
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
            action,
            target,
        } => {
            let mut q = format!("/v1/history?limit={limit}");
            if let Some(a) = action {
                q.push_str(&format!("&action={}", urlencode(&a)));
            }
            if let Some(t) = target {
                q.push_str(&format!("&target={}", urlencode(&t)));
            }
            let h: Vec<crate::store::HistoryEntry> = c.get(&q)?;
            if json {
                print_json(&h)?;
            } else {
                table(
                    &["TIME", "UID", "ACTION", "TARGET", "RESULT"],
                    h.into_iter()
                        .map(|e| {
                            vec![
                                e.at,
                                e.uid.map(|u| u.to_string()).unwrap_or_else(|| "-".into()),
                                e.action,
                                e.target,
                                e.result,
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Doctor => return crate::doctor::run(&c, json),
        Cmd::Config { config } => {
            // The daemon's effective configuration when it runs, else what `up` would use.
            let v = match c.get::<InfoResponse>("/v1/info") {
                Ok(i) => i.config,
                Err(_) => {
                    let mut cfg = Config::load(config.as_deref())?;
                    cfg.validate()?;
                    if let Some(s) = &cli.socket {
                        cfg.socket = s.clone();
                    }
                    if cfg.token.is_some() {
                        cfg.token = Some("<redacted>".into());
                    }
                    serde_json::to_value(cfg)?
                }
            };
            if json {
                print_json(&v)?;
            } else {
                print!("{}", serde_yaml::to_string(&v)?);
            }
        }
        Cmd::Service { cmd } => match cmd {
            ServiceCmd::Install => crate::service::install()?,
            ServiceCmd::Uninstall => crate::service::uninstall()?,
            ServiceCmd::Status => return crate::service::status(),
        },
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

/// `start`, `stop` or `restart`, with progress.
fn lifecycle(c: &Client, machine_path: &str, op: &str) -> Result<MachineInfo> {
    Ok(c.stream(
        "POST",
        &format!("{machine_path}/{op}"),
        None::<&()>,
        progress_printer(),
    )?)
}

fn machine(c: &Client, cmd: MachineCmd, json: bool, yes: bool) -> Result<i32> {
    let show = |m: &MachineInfo| -> Result<()> {
        if json {
            print_json(m)
        } else {
            print!("{}", format_status(m));
            Ok(())
        }
    };
    let path = |n: &str| format!("/v1/machines/{}", urlencode(n));
    match cmd {
        MachineCmd::Deploy {
            image,
            name,
            vcpus,
            memory,
            storage,
            expose,
            network,
        } => {
            // Parse at the edge: a bad spec fails here with the same message the daemon gives.
            let specs = expose
                .iter()
                .map(|s| s.parse::<crate::spec::ExposeSpec>())
                .collect::<Result<Vec<_>, _>>()?;
            crate::spec::check_no_duplicates(&specs)?;
            let req = DeployRequest {
                image,
                name,
                vcpus,
                memory,
                storage,
                expose,
                network,
            };
            let m: MachineInfo = c.stream("POST", "/v1/machines", Some(&req), progress_printer())?;
            show(&m)?;
        }
        MachineCmd::List => {
            let ms: Vec<MachineInfo> = c.get("/v1/machines")?;
            if json {
                print_json(&ms)?;
            } else {
                table(
                    &["ID", "NAME", "STATUS", "IP", "PORTS"],
                    ms.into_iter()
                        .map(|m| {
                            let ports = m
                                .ports
                                .iter()
                                .map(|p| p.spec.clone())
                                .collect::<Vec<_>>()
                                .join(",");
                            vec![m.id[..8].to_string(), m.name, m.status, m.ip, ports]
                        })
                        .collect(),
                );
            }
        }
        MachineCmd::Status { name } => show(&c.get(&path(&name))?)?,
        MachineCmd::Start { name } => show(&lifecycle(c, &path(&name), "start")?)?,
        MachineCmd::Stop { name } => show(&lifecycle(c, &path(&name), "stop")?)?,
        MachineCmd::Restart { name } => show(&lifecycle(c, &path(&name), "restart")?)?,
        MachineCmd::Delete { name } => {
            // Fail on an unknown machine before asking.
            let _: MachineInfo = c.get(&path(&name))?;
            confirm(
                yes,
                &format!("delete machine {name} with its disk, IP and port rules"),
            )?;
            let v: serde_json::Value = c.stream("DELETE", &path(&name), None::<&()>, progress_printer())?;
            if json {
                print_json(&v)?;
            } else {
                println!("machine {name} deleted");
            }
        }
        MachineCmd::Exec { name, cmd } => {
            let line = if cmd.len() == 1 {
                cmd[0].clone()
            } else {
                cmd.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ")
            };
            use std::io::Write;
            let (mut code, mut error) = (None, None);
            let mut collected = ExecResponse {
                code: 0,
                stdout: String::new(),
                stderr: String::new(),
            };
            c.exec(
                &format!("{}/exec", path(&name)),
                &ExecRequest {
                    cmd: line,
                    timeout_s: None,
                },
                |ev| match ev {
                    ExecEvent::Stdout(s) if json => collected.stdout.push_str(&s),
                    ExecEvent::Stderr(s) if json => collected.stderr.push_str(&s),
                    ExecEvent::Stdout(s) => {
                        let mut o = std::io::stdout();
                        let _ = o.write_all(s.as_bytes()).and_then(|_| o.flush());
                    }
                    ExecEvent::Stderr(s) => {
                        let _ = std::io::stderr().write_all(s.as_bytes());
                    }
                    ExecEvent::Exit(c) => code = Some(c),
                    ExecEvent::Error(e) => error = Some(e),
                },
            )?;
            if let Some(e) = error {
                bail!("{e}");
            }
            let Some(code) = code else {
                bail!("the daemon closed the exec stream without an exit code");
            };
            collected.code = code;
            if json {
                print_json(&collected)?;
            }
            return Ok(code);
        }
        MachineCmd::Ssh { name } => {
            let s: ShellResponse = c.get(&format!("{}/shell", path(&name)))?;
            let st = std::process::Command::new(&s.argv[0])
                .args(&s.argv[1..])
                .status()?;
            return Ok(st.code().unwrap_or(1));
        }
        MachineCmd::Logs { name, follow } => {
            use std::io::Write;
            let mut offset = 0usize;
            loop {
                let chunk = c.text(&format!("{}/logs?offset={offset}", path(&name)))?;
                offset += chunk.len();
                std::io::stdout().write_all(chunk.as_bytes())?;
                std::io::stdout().flush()?;
                if !follow {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        MachineCmd::Expose { name, port } => {
            let specs = port
                .iter()
                .map(|s| s.parse::<crate::spec::ExposeSpec>())
                .collect::<Result<Vec<_>, _>>()?;
            crate::spec::check_no_duplicates(&specs)?;
            show(&c.call(
                "POST",
                &format!("{}/expose", path(&name)),
                Some(&ExposeRequest { ports: port }),
            )?)?
        }
        MachineCmd::Unexpose { name, port } => {
            port.parse::<crate::spec::HostPortSpec>()?;
            show(&c.call(
                "POST",
                &format!("{}/unexpose", path(&name)),
                Some(&UnexposeRequest { port }),
            )?)?
        }
    }
    Ok(0)
}
