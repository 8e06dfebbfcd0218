//! `sistemo doctor`: checks the host and the daemon, each failure with a one-line fix.
//! Exits non-zero when any check fails.

use crate::api::InfoResponse;
use crate::client::Client;
use anyhow::Result;
use serde::Serialize;

/// One check's outcome.
#[derive(Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed?
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when ok).
    pub fix: String,
}

fn which(p: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(p))
        .find(|p| p.is_file())
}

fn check(name: &str, ok: bool, detail: impl Into<String>, fix: &str) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
        fix: if ok { String::new() } else { fix.into() },
    }
}

/// Run all checks, print them, return the exit code.
pub fn run(c: &Client, json: bool) -> Result<i32> {
    let mut checks = vec![];
    let nft = which("nft");
    let nft_version = nft.as_ref().and_then(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    checks.push(check(
        "nftables",
        nft_version.is_some(),
        nft_version
            .clone()
            .unwrap_or_else(|| "nft not found on PATH".into()),
        "apt-get install nftables",
    ));
    let qemu = which("qemu-system-x86_64");
    checks.push(check(
        "qemu",
        qemu.is_some(),
        qemu.map(|p| p.display().to_string())
            .unwrap_or_else(|| "qemu-system-x86_64 not found".into()),
        "apt-get install qemu-system-x86",
    ));
    let info = c.get::<InfoResponse>("/v1/info");
    let reason = sistemo_vmm::qemu::accel_reason(
        crate::config::Config::load(None)
            .map(|c| c.accel)
            .unwrap_or_default(),
    );
    checks.push(check(
        "kvm",
        true,
        match info.as_ref().map(|i| i.hypervisor.as_str()) {
            Ok("qemu-kvm") => "KVM runs the guest kernel".to_string(),
            _ if reason.starts_with("TCG") => format!(
                "{reason}: machines run under TCG (slow), which QEMU's security policy does not \
                 treat as an isolation boundary; run only trusted guests"
            ),
            _ => reason,
        },
        "",
    ));
    let cfg = crate::config::Config::load(None).unwrap_or_default();
    let cgroups = if cfg.vmm_cgroups {
        sistemo_vmm::cgroup::Cgroups::probe()
    } else {
        sistemo_vmm::cgroup::Cgroups::Unavailable("disabled by vmm_cgroups: false".into())
    };
    checks.push(check(
        "cgroups",
        cgroups.available(),
        cgroups.describe(),
        "run on a host with cgroup v2 (memory, cpu and pids controllers), or v1 hierarchies for them",
    ));
    // Informational: either channel works.
    let vhost = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")
        .is_ok();
    checks.push(check(
        "agent channel",
        true,
        match (cfg.vsock, vhost) {
            (true, true) => "vsock (/dev/vhost-vsock), virtio-serial as the fallback",
            (true, false) => {
                "virtio-serial (no /dev/vhost-vsock: `modprobe vhost_vsock` on a KVM host for vsock)"
            }
            (false, _) => "virtio-serial (vsock: false)",
        },
        "",
    ));
    checks.push(check(
        "vmm user",
        cfg.vmm_user.is_some(),
        match &cfg.vmm_user {
            Some(u) => format!("QEMU runs as {u}, chrooted, under seccomp (-sandbox)"),
            None => "vmm_user is null: QEMU runs as root, unconfined".into(),
        },
        "set vmm_user in config.yml (default sistemo-vmm)",
    ));
    // The daemon's data dir when it runs, else the configured one.
    let data_dir = match &info {
        Ok(i) => i.config["data_dir"].as_str().map(std::path::PathBuf::from),
        Err(_) => crate::config::Config::load(None).ok().map(|c| c.data_dir),
    };
    let needs_kernel = info
        .as_ref()
        .map(|i| i.hypervisor.starts_with("qemu"))
        .unwrap_or(true);
    if let Some(d) = data_dir.as_ref().filter(|_| needs_kernel) {
        let k = d.join("kernel").join("kernel.json");
        checks.push(check(
            "kernel",
            k.exists(),
            if k.exists() {
                format!("kernel and initramfs prepared in {}", d.join("kernel").display())
            } else {
                format!("no kernel prepared in {}", d.display())
            },
            &format!("sistemo image prepare --data-dir {}", d.display()),
        ));
    }
    match &info {
        Ok(i) => {
            checks.push(check(
                "daemon",
                true,
                format!("reachable, version {}, hypervisor {}", i.version, i.hypervisor),
                "",
            ));
            checks.push(check(
                "firewall",
                i.firewall == "in sync",
                format!(
                    "table {}: {}",
                    i.config["nft_table"].as_str().unwrap_or("?"),
                    i.firewall
                ),
                "the daemon restores it within a second; if it persists, check `journalctl -u sistemo`",
            ));
            checks.push(check(
                "database",
                i.database == "ok",
                format!("integrity: {}", i.database),
                "restore the data dir from a backup",
            ));
            for (bridge, up) in &i.bridges {
                checks.push(check(
                    "bridge",
                    *up,
                    format!("{bridge} {}", if *up { "present" } else { "missing" }),
                    "restart the daemon: sistemo up creates it",
                ));
            }
            // Informational: sistemo turns the global knob on, and says what it means.
            let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
            checks.push(check(
                "forwarding",
                true,
                if forwarding.trim() == "1" {
                    "net.ipv4.ip_forward=1 (set by sistemo): the host routes between its interfaces; \
                     sistemo's forward chain admits into machines only exposed traffic and replies"
                } else {
                    "net.ipv4.ip_forward=0: exposes reach machines only from this host"
                },
                "",
            ));
            if let Some(dir) = i.config["data_dir"].as_str() {
                let free = nix::sys::statvfs::statvfs(dir)
                    .map(|s| s.blocks_available() * s.fragment_size())
                    .unwrap_or(0);
                checks.push(check(
                    "disk",
                    free > 2 << 30,
                    format!("{} GiB free in {dir}", free >> 30),
                    "free space in the data dir (at least 2 GiB)",
                ));
            }
            if !i.volume_copy.is_empty() {
                checks.push(check("volumes", true, i.volume_copy.clone(), ""));
            }
            if !i.paused.is_empty() {
                let keep = i.config["min_disk_free"].as_str().unwrap_or("2G");
                checks.push(check(
                    "disk",
                    false,
                    format!(
                        "paused because the host's disk is full: {} (still running, their disk writes wait)",
                        i.paused.join(", ")
                    ),
                    &format!(
                        "free space in the data dir's file system: they resume by themselves once {keep} \
                         (min_disk_free) is free"
                    ),
                ));
            }
        }
        Err(e) => checks.push(check("daemon", false, e.to_string(), "start it: sudo sistemo up")),
    }
    let failed = checks.iter().any(|c| !c.ok);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": !failed, "checks": checks}))?
        );
    } else {
        for c in &checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            println!("{mark}  {:<10} {}", c.name, c.detail);
            if !c.ok {
                println!("      fix: {}", c.fix);
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}
