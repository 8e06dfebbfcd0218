//! `sistemo machine …`: deploy, list, status, lifecycle, exec, ssh, logs, expose, unexpose —
//! each a call to the daemon's API, shown as a table, the page's status block or JSON.

use super::output::{confirm, format_status, print_json, progress_printer, table};
use super::{Usage, urlencode};
use crate::api::*;
use crate::client::Client;
use crate::config::DEFAULT_SOCKET;
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use std::path::PathBuf;

/// The machine a command acts on.
#[derive(Debug, Args)]
pub struct MachineArg {
    /// Name or UUID.
    #[arg(add = ArgValueCandidates::new(machine_names))]
    pub name: String,
}

/// A deploy's rate limits (Sistemo's API fields); each absent one is the daemon's default.
#[derive(Debug, Args)]
pub struct IoFlags {
    /// Download (what the machine receives) in megabits per second.
    #[arg(long, value_name = "MBIT")]
    pub bandwidth_mbps: Option<u32>,
    /// Upload (what the machine sends) in megabits per second.
    #[arg(long, value_name = "MBIT")]
    pub upload_mbps: Option<u32>,
    /// Disk operations per second.
    #[arg(long, value_name = "N")]
    pub disk_iops: Option<u32>,
    /// Disk bandwidth in MiB per second.
    #[arg(long, value_name = "MIB")]
    pub disk_bw_mbps: Option<u32>,
}

/// `machine` subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run: its size costs nothing
pub enum MachineCmd {
    /// Create and boot a machine.
    #[command(
        after_help = "Examples:\n  sistemo machine deploy debian --name web --expose 80\n  sistemo machine deploy debian --expose 8080:3000 --expose 53/udp --memory 1G\n  sistemo machine deploy nginx --env MODE=dev --workdir /srv -- nginx -g 'daemon off;'"
    )]
    Deploy {
        /// Image: a name (debian), a *.ext4 file under the daemon's image_dirs (a relative path
        /// is taken from this directory; with --host the local file is uploaded), or an https
        /// URL (.gz and .zst are decompressed).
        #[arg(required_unless_present = "volume")]
        image: Option<String>,
        /// For a URL: the sha256 the downloaded file must have (nothing is stored otherwise).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// For a URL: accept plain http:// (its content can be changed on the way; pin it with
        /// --sha256).
        #[arg(long)]
        insecure_http: bool,
        /// Machine name (a-z, 0-9, '-'; default: after the image, debian, then debian-2, ...).
        #[arg(long)]
        name: Option<String>,
        /// Virtual CPUs (default: 1; at most the daemon's max_vcpus).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Cap the machine's CPU time, in CPUs: above 0, up to its vCPUs (e.g. 0.5: half a core).
        #[arg(long)]
        cpu_limit: Option<String>,
        /// Memory, e.g. 512M or 2G (default: 512M).
        #[arg(long)]
        memory: Option<String>,
        /// Disk size, e.g. 4G (default: the image's size, at least 2G).
        #[arg(long)]
        storage: Option<String>,
        /// Expose a port: [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp]. Repeatable.
        #[arg(long)]
        expose: Vec<String>,
        /// Network (default: default).
        #[arg(long)]
        network: Option<String>,
        /// Restart when its VMM ends by itself: no, on-failure or always (with back-off).
        #[arg(long, value_parser = ["no", "on-failure", "always"])]
        restart: Option<String>,
        /// Ready when: agent (the guest agent answers: exec, shell and cp work), init (the
        /// image's init takes commands too: systemctl works), or ssh (its sshd answers too).
        #[arg(long, value_parser = ["agent", "init", "ssh"], default_value = "agent")]
        wait: String,
        /// Seconds the wait may take.
        #[arg(long, value_name = "SECONDS")]
        wait_timeout: Option<u64>,
        /// Attach a volume: NAME[:/MOUNT][:ro]. Repeatable, or comma-separated.
        #[arg(long, value_delimiter = ',')]
        attach: Vec<String>,
        /// Boot from an existing root volume instead of an image.
        #[arg(long, conflicts_with_all = ["image", "storage"])]
        volume: Option<String>,
        /// Rate limits (default: the daemon's default_* settings).
        #[command(flatten)]
        io: IoFlags,
        /// Boot the kernel even when a template of this image and shape exists (`image warm`).
        #[arg(long)]
        cold: bool,
        /// OCI image overrides (Docker's flags).
        #[command(flatten)]
        oci: Box<super::workload::WorkloadFlags>,
    },
    /// List machines.
    #[command(visible_alias = "ls")]
    List,
    /// Show a machine: ID, name, status, IP and ports.
    #[command(visible_aliases = ["show", "info"])]
    Status {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
    /// Start a stopped machine (its port rules come back).
    Start {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
    /// Stop a machine gracefully (port rules leave nftables, stay stored).
    Stop {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
    /// Restart a machine (keeps IP and ports).
    Restart {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
    /// Delete a machine with its rules, IP and files (attached volumes are only detached).
    #[command(visible_aliases = ["rm", "remove", "destroy"])]
    Delete {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// Keep the root disk as volume NAME-root.
        #[arg(long)]
        preserve_storage: bool,
    },
    /// Attach, detach or list a machine's volumes.
    Volume {
        /// What to do.
        #[command(subcommand)]
        cmd: super::MachineVolumeCmd,
    },
    /// Snapshot a stopped machine's disks (root disk as SNAP, volumes as SNAP-VOLUME).
    Snapshot {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// The snapshot's name (default NAME-snap-N).
        snapshot: Option<String>,
    },
    /// Clone a stopped machine into a new one (new ID, MAC and IP; no exposes) and boot it.
    Clone {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// The new machine's name.
        new: String,
    },
    /// Run a command in a machine (through its guest agent); exits with its exit code.
    #[command(
        after_help = "Examples:\n  sistemo machine exec web uname -a\n  sistemo machine exec web \"apt-get update && apt-get install -y nginx\"\n  sistemo machine exec api \"node server.js &\"\n  tar c src | sistemo machine exec -i web tar x -C /srv\n  sistemo machine exec -it -u www-data -w /var/www web bash"
    )]
    Exec {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// Stream this command's stdin to it.
        #[arg(short, long)]
        interactive: bool,
        /// Run it on a terminal (needs one here).
        #[arg(short, long)]
        tty: bool,
        /// Set an environment variable, NAME=value (repeatable).
        #[arg(short, long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(short, long)]
        workdir: Option<String>,
        /// Guest user name or uid (default root).
        #[arg(short, long)]
        user: Option<String>,
        /// Kill the command after this many seconds (default 600 without -i/-t, else none).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Command; a single quoted string runs through the guest's shell.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Interactive shell in a machine through its guest agent (no sshd needed).
    Shell {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// Guest user name or uid (default root).
        #[arg(short, long)]
        user: Option<String>,
    },
    /// Copy files or directories between a machine and this host (modes kept).
    #[command(
        after_help = "Examples:\n  sistemo machine cp ./site web:/var/www/html\n  sistemo machine cp web:/etc/nginx/nginx.conf ."
    )]
    Cp {
        /// Source: a local path, or NAME:/guest/path.
        src: String,
        /// Destination: a local path, or NAME:/guest/path (into it when it is a directory).
        dst: String,
    },
    /// Interactive shell in a machine over SSH (images that run sshd).
    Ssh {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
    /// The machine's console output.
    Logs {
        /// Keep printing new output as it arrives.
        #[arg(short, long)]
        follow: bool,
        /// Pass the guest's terminal control sequences through (by default they are removed:
        /// a guest must not drive your terminal).
        #[arg(long)]
        raw: bool,
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
    /// Expose ports of a machine (running or stopped).
    #[command(
        after_help = "Examples:\n  sistemo machine expose web --port 80\n  sistemo machine expose web --port 8080:80 --port 127.0.0.1:9000:9000/udp"
    )]
    Expose {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp]. Repeatable.
        #[arg(long, required = true)]
        port: Vec<String>,
    },
    /// Remove an exposed port: `--port 8080` (tcp) or `--port 8080/udp`.
    Unexpose {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// [HOST_IP:]HOST_PORT[-END][/tcp|/udp].
        #[arg(long)]
        port: String,
    },
}

/// The image as the daemon must see it: a path (with a `/`, or ending in `.ext4`) made
/// absolute against this process's working directory, since the daemon never uses its own;
/// names and URLs unchanged. Symlinks are left for the daemon to judge.
fn image_arg(image: &str) -> Result<String> {
    // A path: absolute, `./`/`../`, `*.ext4`, or an existing file; anything else with a `/`
    // is an OCI reference (`127.0.0.1:5000/web:1`, `ghcr.io/o/r`).
    let is_path = image.starts_with('/')
        || image.starts_with("./")
        || image.starts_with("../")
        || image.ends_with(".ext4")
        || (image.contains('/') && std::path::Path::new(image).exists());
    if sistemo_vmm::image::is_url(image) || !is_path {
        return Ok(image.to_string());
    }
    let abs =
        std::path::absolute(image).map_err(|e| anyhow::anyhow!("resolving the image path {image}: {e}"))?;
    abs.into_os_string()
        .into_string()
        .map_err(|p| anyhow::anyhow!("image path {} is not UTF-8", p.display()))
}

/// The machine and guest path of a `machine cp` operand `NAME:/path`; `None` for a local path
/// (one with a `/` before any `:`, or no `:` at all).
fn guest_path(arg: &str) -> Result<Option<(String, String)>> {
    match arg.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            if !path.starts_with('/') {
                bail!(Usage::new(std::io::Error::other(format!(
                    "{arg:?}: the guest path must be absolute, as in {name}:/{path}"
                ))));
            }
            Ok(Some((name.to_string(), path.to_string())))
        }
        _ => Ok(None),
    }
}

/// Machine names for shell completion, asked from the daemon (nothing when it is not running).
fn machine_names() -> Vec<CompletionCandidate> {
    let socket = std::env::var_os("SISTEMO_SOCKET").unwrap_or_else(|| DEFAULT_SOCKET.into());
    Client::new(PathBuf::from(socket))
        .get::<Vec<MachineInfo>>("/v1/machines")
        .map(|ms| {
            ms.into_iter()
                .map(|m| CompletionCandidate::new(m.name).help(Some(m.status.to_string().into())))
                .collect()
        })
        .unwrap_or_default()
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

/// Run a `machine` subcommand; returns the exit code.
pub async fn run(c: &Client, cmd: MachineCmd, json: bool, yes: bool) -> Result<i32> {
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
            sha256,
            insecure_http,
            name,
            vcpus,
            cpu_limit,
            memory,
            storage,
            expose,
            network,
            restart,
            wait,
            wait_timeout,
            attach,
            volume,
            io,
            cold,
            oci,
        } => {
            // Parse at the edge: a bad spec fails here with the same message the daemon gives.
            check_specs(&expose)?;
            if let Some(c) = &cpu_limit {
                c.parse::<crate::domain::CpuLimit>().map_err(Usage::new)?;
            }
            // A remote daemon never reads the caller's paths: a local image file is uploaded.
            let (image, name) = match image {
                Some(i) if c.is_remote() && super::upload::is_local_path(&i) => {
                    let (sha, name) = super::upload::deploy_image(c, &i, name)?;
                    (Some(sha), name)
                }
                i => (i, name),
            };
            let req = DeployRequest {
                image: image.as_deref().map(image_arg).transpose()?.unwrap_or_default(),
                attach,
                volume,
                sha256,
                insecure_http,
                name,
                vcpus,
                cpu_limit,
                memory,
                storage,
                expose,
                network,
                restart,
                wait: Some(wait),
                wait_timeout_s: wait_timeout,
                bandwidth_mbps: io.bandwidth_mbps,
                upload_mbps: io.upload_mbps,
                disk_iops: io.disk_iops,
                disk_bw_mbps: io.disk_bw_mbps,
                cold,
                ..oci.request()?
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
                            vec![m.id[..8].to_string(), m.name, m.status.to_string(), m.ip, ports]
                        })
                        .collect(),
                );
            }
        }
        MachineCmd::Status {
            m: MachineArg { name },
        } => show(&c.get(&path(&name))?)?,
        MachineCmd::Start {
            m: MachineArg { name },
        } => show(&lifecycle(c, &path(&name), "start")?)?,
        MachineCmd::Stop {
            m: MachineArg { name },
        } => show(&lifecycle(c, &path(&name), "stop")?)?,
        MachineCmd::Restart {
            m: MachineArg { name },
        } => show(&lifecycle(c, &path(&name), "restart")?)?,
        MachineCmd::Delete {
            m: MachineArg { name },
            preserve_storage,
        } => {
            // Fail on an unknown machine before asking.
            let _: MachineInfo = c.get(&path(&name))?;
            let what = if preserve_storage {
                format!(
                    "delete machine {name} with its IP and port rules, keeping its disk as volume {name}-root"
                )
            } else {
                format!("delete machine {name} with its disk, IP and port rules")
            };
            confirm(yes, &what)?;
            let q = if preserve_storage {
                "?preserve_storage=true"
            } else {
                ""
            };
            let v: serde_json::Value = c.stream(
                "DELETE",
                &format!("{}{q}", path(&name)),
                None::<&()>,
                progress_printer(),
            )?;
            if json {
                print_json(&v)?;
            } else if let Some(k) = v["kept_volume"].as_str() {
                println!("machine {name} deleted; its root disk is volume {k}");
            } else {
                println!("machine {name} deleted");
            }
        }
        MachineCmd::Volume { cmd } => super::volume::run_machine(c, cmd, json)?,
        MachineCmd::Snapshot {
            m: MachineArg { name },
            snapshot,
        } => super::volume::machine_snapshot(c, &name, snapshot, json)?,
        MachineCmd::Clone {
            m: MachineArg { name },
            new,
        } => super::volume::machine_clone(c, &name, new, json)?,
        MachineCmd::Exec {
            m: MachineArg { name },
            interactive,
            tty,
            env,
            workdir,
            user,
            timeout,
            cmd,
        } if !json || interactive || tty || !env.is_empty() || workdir.is_some() || user.is_some() => {
            use std::io::IsTerminal;
            if tty && !std::io::stdin().is_terminal() {
                bail!("-t needs a terminal on stdin (drop -t to pipe data with -i)");
            }
            let job = if cmd.len() == 1 {
                SessionJob::Shell { cmd: cmd[0].clone() }
            } else {
                SessionJob::Exec { argv: cmd }
            };
            let req = SessionRequest {
                job,
                env,
                workdir,
                user,
                tty: if tty {
                    super::session::term_size().or(Some(TermSize { rows: 24, cols: 80 }))
                } else {
                    None
                },
                stdin: interactive || tty,
                timeout_s: timeout,
            };
            // Output goes out byte-exact as it comes; `-o json` (below) collects it instead.
            let local = match (tty, interactive) {
                (true, _) => super::session::Local::Terminal,
                (false, true) => super::session::Local::Stdin,
                (false, false) => super::session::Local::Nothing,
            };
            return super::session::run(c, &name, &req, local).await;
        }
        MachineCmd::Shell {
            m: MachineArg { name },
            user,
        } => {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                bail!(
                    "machine shell needs a terminal; run a command with `sistemo machine exec -i {name} CMD`"
                );
            }
            let req = SessionRequest {
                job: SessionJob::Login,
                env: Vec::new(),
                workdir: None,
                user,
                tty: super::session::term_size().or(Some(TermSize { rows: 24, cols: 80 })),
                stdin: true,
                timeout_s: None,
            };
            return super::session::run(c, &name, &req, super::session::Local::Terminal).await;
        }
        MachineCmd::Cp { src, dst } => {
            let (name, job, local) = match (guest_path(&src)?, guest_path(&dst)?) {
                (Some((n, p)), None) => (
                    n,
                    SessionJob::CopyFrom { path: p },
                    super::session::Local::Download(PathBuf::from(&dst)),
                ),
                (None, Some((n, p))) => {
                    if !std::path::Path::new(&src).exists() {
                        bail!("{src}: no such file or directory");
                    }
                    (
                        n,
                        SessionJob::CopyTo { path: p },
                        super::session::Local::Upload(PathBuf::from(&src)),
                    )
                }
                _ => bail!(Usage::new(std::io::Error::other(format!(
                    "copy between a machine and this host: exactly one of {src:?} and {dst:?} must be NAME:/path"
                )))),
            };
            let req = SessionRequest {
                job,
                env: Vec::new(),
                workdir: None,
                user: None,
                tty: None,
                stdin: matches!(local, super::session::Local::Upload(_)),
                timeout_s: None,
            };
            let code = super::session::run(c, &name, &req, local).await?;
            return Ok(code);
        }
        MachineCmd::Exec {
            m: MachineArg { name },
            timeout,
            cmd,
            ..
        } => {
            let line = if cmd.len() == 1 {
                cmd[0].clone()
            } else {
                cmd.iter()
                    .map(|w| sistemo_vmm::shell_quote(w))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            use std::io::Write;
            let (mut code, mut error) = (None, None);
            // -o json collects the output (lossy where it is not UTF-8); otherwise it is written
            // byte-exact as it comes.
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let mut broken = false;
            c.exec(
                &format!("{}/exec", path(&name)),
                &ExecRequest {
                    cmd: line,
                    timeout_s: timeout,
                },
                |ev| match ev {
                    ExecEvent::Exit(c) => {
                        code = Some(c);
                        true
                    }
                    ExecEvent::Error(e) => {
                        error = Some(e);
                        true
                    }
                    // A reader of ours that went away (`| head`) ends the command too.
                    ev => match (ev.bytes(), json) {
                        (Some((b, false)), true) => {
                            out.extend_from_slice(&b);
                            true
                        }
                        (Some((b, true)), true) => {
                            err.extend_from_slice(&b);
                            true
                        }
                        (Some((b, false)), false) => {
                            let mut o = std::io::stdout();
                            broken = o.write_all(&b).and_then(|_| o.flush()).is_err();
                            !broken
                        }
                        (Some((b, true)), false) => {
                            broken = std::io::stderr().write_all(&b).is_err();
                            !broken
                        }
                        (None, _) => true,
                    },
                },
            )?;
            if broken {
                // Our output closed under us: end quietly, as a shell pipeline's writer does.
                return Ok(141);
            }
            let mut collected = ExecResponse {
                code: 0,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr: String::from_utf8_lossy(&err).into_owned(),
            };
            if let Some(e) = error {
                return Err(crate::client::ClientError::Api(e).into());
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
        MachineCmd::Ssh {
            m: MachineArg { name },
        } => {
            if c.is_remote() {
                bail!(Usage::new(std::io::Error::other(
                    "machine ssh runs ssh on the daemon's host, with its key: from another host use `sistemo machine shell NAME` (through the guest agent)"
                )));
            }
            let s: ShellResponse = c.get(&format!("{}/shell", path(&name)))?;
            let st = std::process::Command::new(&s.argv[0])
                .args(&s.argv[1..])
                .status()?;
            return Ok(st.code().unwrap_or(1));
        }
        MachineCmd::Logs {
            m: MachineArg { name },
            follow,
            raw,
        } => {
            use std::io::Write;
            // The first read is the tail; then each continues where the last ended (stream
            // offsets, valid across the daemon's cap on the log).
            let mut offset: Option<u64> = None;
            loop {
                let q = offset.map_or(String::new(), |o| format!("?offset={o}"));
                let (at, chunk) = c.log_bytes(&format!("{}/logs{q}", path(&name)), offset)?;
                offset = Some(at + chunk.len() as u64);
                let shown = if raw {
                    chunk
                } else {
                    super::output::without_escapes(&chunk)
                };
                std::io::stdout().write_all(&shown)?;
                std::io::stdout().flush()?;
                if !follow {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        MachineCmd::Expose {
            m: MachineArg { name },
            port,
        } => {
            check_specs(&port)?;
            show(&c.call(
                "POST",
                &format!("{}/expose", path(&name)),
                Some(&ExposeRequest { ports: port }),
            )?)?
        }
        MachineCmd::Unexpose {
            m: MachineArg { name },
            port,
        } => {
            port.parse::<crate::spec::HostPortSpec>().map_err(Usage::new)?;
            show(&c.call(
                "POST",
                &format!("{}/unexpose", path(&name)),
                Some(&UnexposeRequest { port }),
            )?)?
        }
    }
    Ok(0)
}

/// Parse expose specs here, so a bad one fails with the daemon's message before any request.
fn check_specs(specs: &[String]) -> Result<()> {
    let parsed = specs
        .iter()
        .map(|s| s.parse::<crate::spec::ExposeSpec>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(Usage::new)?;
    crate::spec::check_no_duplicates(&parsed).map_err(Usage::new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_image_paths_are_resolved_here_not_in_the_daemon() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(image_arg("debian").unwrap(), "debian");
        assert_eq!(image_arg("https://h/a.ext4").unwrap(), "https://h/a.ext4");
        assert_eq!(image_arg("/srv/a.ext4").unwrap(), "/srv/a.ext4");
        assert_eq!(
            image_arg("a.ext4").unwrap(),
            cwd.join("a.ext4").display().to_string()
        );
        assert_eq!(image_arg("127.0.0.1:5000/web:1").unwrap(), "127.0.0.1:5000/web:1");
        assert_eq!(image_arg("ghcr.io/o/r").unwrap(), "ghcr.io/o/r");
        assert_eq!(
            image_arg("./img/a.raw").unwrap(),
            cwd.join("img/a.raw").display().to_string()
        );
    }
}
