//! The API edge's translations: requests parsed into the services' typed inputs, and the
//! services' rows turned into the wire types of [`crate::api`].

use crate::api::{
    DeployRequest, GuestInfo, ImageRow, InfoResponse, MachineInfo, MachineLimits, NetworkInfo, PortInfo,
    PortRow, SessionJob, SessionRequest,
};
use crate::domain::{ByteSize, MachineState};
use crate::error::{Error, Result};
use crate::host::Facts;
use crate::machine::{Deploy, MachineView};
use crate::spec::ExposeSpec;
use crate::store::Network;
use sistemo_vmm::image::ImageInfo;

/// Parse expose specs; the first bad one names itself.
pub fn specs(ports: &[String]) -> Result<Vec<ExposeSpec>> {
    ports
        .iter()
        .map(|s| s.parse::<ExposeSpec>().map_err(|e| Error::Invalid(e.to_string())))
        .collect()
}

/// The image reference with a request's URL options folded in as the fragment the image store
/// reads (`URL#sha256=HEX&insecure_http`); they are refused on anything but a URL.
pub fn image_reference(image: &str, sha256: Option<&str>, insecure_http: bool) -> Result<String> {
    use sistemo_vmm::image::{is_sha256, is_url};
    if sha256.is_none() && !insecure_http {
        return Ok(image.to_string());
    }
    if !is_url(image) {
        return Err(Error::Invalid(format!(
            "sha256 and insecure_http apply to URL images, not {image:?} (allowed: an http(s) URL)"
        )));
    }
    let mut opts = Vec::new();
    if let Some(h) = sha256 {
        if !is_sha256(h) {
            return Err(Error::Invalid(format!(
                "sha256 {h:?} is not a digest (allowed: 64 hex characters)"
            )));
        }
        opts.push(format!("sha256={}", h.to_ascii_lowercase()));
    }
    if insecure_http {
        opts.push("insecure_http".into());
    }
    let sep = if image.contains('#') { '&' } else { '#' };
    Ok(format!("{image}{sep}{}", opts.join("&")))
}

/// Parse a deploy request.
pub fn deploy(req: DeployRequest) -> Result<Deploy> {
    let size = |what: &str, v: Option<String>| v.map(|s| ByteSize::parse(what, &s)).transpose();
    let image = image_reference(&req.image, req.sha256.as_deref(), req.insecure_http)?;
    if let Some(v) = &req.volume
        && !image.trim().is_empty()
    {
        return Err(Error::Invalid(format!(
            "image {image:?} and volume {v:?} were both given (allowed: an image, or --volume to boot from a volume)"
        )));
    }
    Ok(Deploy {
        name: req.name.map(|n| n.parse()).transpose()?,
        vcpus: req.vcpus,
        cpu_limit: req.cpu_limit.map(|c| c.parse()).transpose()?,
        memory: size("memory", req.memory)?,
        storage: size("storage", req.storage)?,
        expose: specs(&req.expose)?,
        network: req.network.map(|n| n.parse()).transpose()?,
        restart: req.restart.map(|r| r.parse()).transpose()?.unwrap_or_default(),
        wait: req
            .wait
            .as_deref()
            .map(str::parse)
            .transpose()?
            .unwrap_or_default(),
        wait_timeout: req.wait_timeout_s.map(std::time::Duration::from_secs),
        attach: req
            .attach
            .iter()
            .flat_map(|a| a.split(','))
            .filter(|a| !a.is_empty())
            .map(crate::machine::AttachSpec::parse)
            .collect::<Result<_>>()?,
        root_volume: req.volume.map(|v| v.parse()).transpose()?,
        clone_of: None,
        cold: req.cold,
        io: crate::machine::IoLimits {
            download_mbps: req.bandwidth_mbps.unwrap_or(0),
            upload_mbps: req.upload_mbps.unwrap_or(0),
            iops: req.disk_iops.unwrap_or(0),
            disk_bw_mbps: req.disk_bw_mbps.unwrap_or(0),
        },
        workload: crate::machine::Overrides::parse(
            req.env,
            req.entrypoint,
            req.workdir,
            req.user,
            req.command,
        )?,
        image,
    })
}

fn port_info(s: &ExposeSpec) -> PortInfo {
    PortInfo {
        bind: s.host.bind.map(|b| b.to_string()),
        host_port: s.host.ports.to_string(),
        machine_port: s.machine.to_string(),
        protocol: s.host.proto.to_string(),
        spec: s.to_string(),
        display: s.status_line(),
    }
}

/// A machine as `machine status` shows it.
pub fn machine_info(v: &MachineView) -> MachineInfo {
    let m = &v.machine;
    let exit_code = crate::machine::exit_code(m.state, m.error.as_deref());
    MachineInfo {
        id: m.id.to_string(),
        name: m.name.to_string(),
        status: m.state,
        error: m.error.clone().filter(|_| exit_code.is_none()),
        paused: v.paused.clone(),
        ip: m.ip.to_string(),
        network: m.network.to_string(),
        image: m.image.clone(),
        image_digest: v.image_digest.clone(),
        vcpus: m.vcpus,
        memory_mib: m.memory_mib,
        storage_bytes: m.storage_bytes,
        ports: v.ports.iter().map(port_info).collect(),
        restart: m.restart,
        pid: m.instance.as_ref().map(|i| i.pid),
        vmm: v.vmm.clone(),
        limits: v.limits.map(|l| MachineLimits {
            memory_mib: l.memory_bytes >> 20,
            cpus: l.cpu_quota_us as f64 / sistemo_vmm::cgroup::CPU_PERIOD_US as f64,
            pids: l.pids,
        }),
        guest: match &v.guest {
            Some(Ok(f)) => Some(GuestInfo {
                agent: f.agent.clone(),
                uptime_s: f.uptime_s,
                mem_used_kib: f.mem_total_kib.saturating_sub(f.mem_available_kib),
                mem_total_kib: f.mem_total_kib,
                disk_used: f.disk_used,
                disk_total: f.disk_total,
                addresses: f.addresses.clone(),
                init: f.init.clone(),
                init_ready: f.init_ready,
            }),
            _ => None,
        },
        degraded: match &v.guest {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        },
        io: v.io,
        created_at: m.created_at.clone(),
        volumes: v.volumes.iter().map(attachment_info).collect(),
        template: v.template.clone(),
        workload: v.workload.as_ref().map(|w| crate::api::WorkloadInfo {
            command: w.argv.clone(),
            env: w
                .env
                .iter()
                .map(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k).to_string())
                .collect(),
            workdir: w.cwd.clone(),
            user: w.user.clone(),
        }),
        exit_code,
    }
}

/// One attachment as the API shows it.
pub fn attachment_info(a: &crate::store::Attachment) -> crate::api::VolumeAttachmentInfo {
    crate::api::VolumeAttachmentInfo {
        volume: a.volume.name.to_string(),
        machine: a.machine.to_string(),
        mount: a.mount.clone(),
        readonly: a.readonly,
        root: a.root,
    }
}

/// A volume as `volume show` shows it.
pub fn volume_info(v: &crate::volumes::VolumeView) -> crate::api::VolumeInfo {
    crate::api::VolumeInfo {
        id: v.volume.id.to_string(),
        name: v.volume.name.to_string(),
        kind: v.volume.kind.to_string(),
        format: v.volume.format.to_string(),
        size_bytes: v.volume.size_bytes,
        source: v.volume.source.clone(),
        attached_to: v.attachments.iter().map(attachment_info).collect(),
        path: v.path.display().to_string(),
        created_at: v.volume.created_at.clone(),
    }
}

/// True when `cmd` is words a shell would pass through unchanged: no quoting, expansion,
/// redirection, globbing or operators, and not a shell builtin that only means something in a
/// shell (`cd`, `export`, …: those are not programs).
fn is_plain_words(cmd: &str) -> bool {
    let first = cmd.split_whitespace().next().unwrap_or("");
    !first.is_empty()
        && ![
            "cd", "export", "exit", "set", "unset", "source", ".", "exec", "eval", "ulimit", "umask",
            "alias", "trap", "wait", "read",
        ]
        .contains(&first)
        && !first.contains('=')
        && cmd
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " \t-_./:,+@%=".contains(c))
}

/// A session request, checked: environment entries are `NAME=value`, guest paths absolute.
pub fn session_start(r: &SessionRequest) -> Result<sistemo_vmm::Start> {
    use sistemo_vmm::{Job, Start, WinSize};
    let abs = |what: &str, p: &str| {
        if p.starts_with('/') && !p.contains('\0') {
            Ok(p.to_string())
        } else {
            Err(Error::Invalid(format!(
                "{what} {p:?} is not an absolute guest path"
            )))
        }
    };
    let job = match &r.job {
        SessionJob::Exec { argv } if argv.is_empty() => {
            return Err(Error::Invalid(
                "empty command (give a program, or use `machine shell`)".into(),
            ));
        }
        SessionJob::Exec { argv } => Job::Exec { argv: argv.clone() },
        // Words with nothing a shell would interpret run as they are (one process less to
        // start in the guest); anything else goes through `sh -c`, where a trailing `&` leaves
        // the command running without holding the session's pipes.
        SessionJob::Shell { cmd } if is_plain_words(cmd) => Job::Exec {
            argv: cmd.split_whitespace().map(String::from).collect(),
        },
        SessionJob::Shell { cmd } => Job::Exec {
            argv: vec!["sh".into(), "-c".into(), sistemo_vmm::detach_background(cmd)],
        },
        SessionJob::Login => Job::Exec { argv: Vec::new() },
        SessionJob::CopyFrom { path } => Job::ReadArchive {
            path: abs("source", path)?,
        },
        SessionJob::CopyTo { path } => Job::WriteArchive {
            path: abs("destination", path)?,
        },
    };
    let env = r
        .env
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                Ok((k.to_string(), v.to_string()))
            }
            _ => Err(Error::Invalid(format!(
                "environment entry {e:?} is not NAME=value (NAME: letters, digits, _)"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(w) = &r.workdir {
        abs("working directory", w)?;
    }
    if r.user
        .as_deref()
        .is_some_and(|u| u.is_empty() || u.contains(':') || u.contains('\n'))
    {
        return Err(Error::Invalid(format!(
            "user {:?} is not a user name or uid",
            r.user.as_deref().unwrap_or("")
        )));
    }
    Ok(Start {
        job,
        env,
        cwd: r.workdir.clone(),
        user: r.user.clone(),
        tty: r.tty.map(|t| WinSize {
            rows: t.rows,
            cols: t.cols,
        }),
        stdin: r.stdin,
        timeout_ms: r.timeout_s.map(|s| s.saturating_mul(1000)),
    })
}

/// One row of `sistemo ports`.
pub fn port_row((machine, state, spec): &(crate::domain::MachineName, MachineState, ExposeSpec)) -> PortRow {
    PortRow {
        machine: machine.to_string(),
        state: if *state == MachineState::Running {
            "active"
        } else {
            "inactive"
        }
        .into(),
        port: port_info(spec),
    }
}

/// A network with the number of machines on it.
pub fn network_info((n, machines): &(Network, usize)) -> NetworkInfo {
    NetworkInfo {
        name: n.name.to_string(),
        bridge: n.bridge.to_string(),
        subnet: n.subnet.to_string(),
        gateway: n.gateway().to_string(),
        machines: *machines,
    }
}

/// An image of the store and the machines deployed from it.
pub fn image_row((i, used_by): &(ImageInfo, Vec<String>)) -> ImageRow {
    ImageRow {
        sha256: i.sha256.clone(),
        tags: i.tags.clone(),
        size: i.size,
        source: i.source.clone(),
        used_by: used_by.clone(),
        templates: Vec::new(),
        oci: i.oci.as_ref().map(|m| crate::api::OciImageRow {
            reference: m.reference.clone(),
            digest: m.digest.clone(),
            created: m.created.clone(),
            exposed_ports: m.config.exposed_ports.clone(),
            command: m.config.workload().map(|w| w.argv).unwrap_or_default(),
        }),
    }
}

/// Daemon facts with the configuration (token redacted).
pub fn info(f: Facts, cfg: &crate::config::Config) -> InfoResponse {
    let mut config = serde_json::to_value(cfg).unwrap_or_default();
    if config["token"].is_string() {
        config["token"] = "<redacted>".into();
    }
    InfoResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        hypervisor: f.hypervisor,
        config,
        firewall: f.firewall,
        database: f.database,
        machines: f.machines,
        bridges: f.bridges,
        paused: f.paused,
        volume_copy: f.volume_copy,
    }
}

/// A template as the API shows it.
pub fn template_row(t: &crate::machine::TemplateInfo) -> crate::api::TemplateRow {
    crate::api::TemplateRow {
        key: t.key.clone(),
        image_sha256: t.image_sha256.clone(),
        image: t.image.clone(),
        vcpus: t.vcpus,
        memory_mib: t.memory_mib,
        storage_bytes: t.storage_bytes,
        created_at: t.created_at.clone(),
        bytes: t.bytes,
    }
}

/// An audit-log entry as the API and the event stream show it.
pub(super) fn history_entry(r: crate::store::HistoryRow) -> crate::api::HistoryEntry {
    crate::api::HistoryEntry {
        at: r.at,
        uid: r.uid,
        remote: r.remote,
        actor: r.actor,
        action: r.action,
        target: r.target,
        result: r.result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_fold_into_the_reference() {
        let hex = "AB".repeat(32);
        assert_eq!(image_reference("debian", None, false).unwrap(), "debian");
        assert_eq!(
            image_reference("https://h/i.gz", Some(&hex), false).unwrap(),
            format!("https://h/i.gz#sha256={}", "ab".repeat(32))
        );
        assert_eq!(
            image_reference("http://h/i", None, true).unwrap(),
            "http://h/i#insecure_http"
        );
        let e = image_reference("debian", Some(&hex), false).unwrap_err();
        assert_eq!(e.kind(), crate::api::ErrorKind::Invalid);
        assert!(image_reference("/srv/i.ext4", None, true).is_err());
        let e = image_reference("https://h/i", Some("abc"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"abc\"") && e.contains("64 hex"), "{e}");
    }
}

#[cfg(test)]
mod session_tests {
    use super::is_plain_words;

    #[test]
    fn only_words_a_shell_would_not_touch_skip_the_shell() {
        for plain in [
            "true",
            "uname -a",
            "ls /var/log",
            "node --max-old-space-size=512 app.js",
        ] {
            assert!(is_plain_words(plain), "{plain}");
        }
        for shell in [
            "echo $HOME",
            "a && b",
            "ls *.txt",
            "echo 'x'",
            "cd /tmp",
            "FOO=1 env",
            "exit 3",
            "sleep 1 &",
            "cat < f",
            "",
        ] {
            assert!(!is_plain_words(shell), "{shell}");
        }
    }
}
