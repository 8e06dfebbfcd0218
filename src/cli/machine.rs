//! `sistemo machine …`: deploy, list, status, lifecycle, expose, unexpose (exec, shell, cp, ssh
//! and logs: `guest.rs`) — each a call to the daemon's API, shown as a table, a status block or JSON.

use super::output::{confirm, format_status, print_json, progress_printer, table};
use super::{Usage, urlencode};
use crate::api::*;
use crate::client::Client;
use crate::config::DEFAULT_SOCKET;
use anyhow::Result;
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
    /// exec, shell, cp, ssh and logs (see `guest.rs`).
    #[command(flatten)]
    Guest(super::guest::GuestCmd),
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
        MachineCmd::Guest(cmd) => return super::guest::run(c, cmd, json).await,
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
