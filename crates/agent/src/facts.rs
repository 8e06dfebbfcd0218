//! What the guest reports about itself (`machine status`): uptime, memory, root file system
//! use and addresses, read from /proc and the kernel without running any program.

use crate::proto::Facts;

/// The guest's facts now; what cannot be read stays zero or empty.
pub fn collect() -> Facts {
    let uptime_s = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    let (disk_total, disk_used) = nix::sys::statvfs::statvfs("/")
        .map(|s| {
            let f = s.fragment_size();
            let total = s.blocks() * f;
            (total, total - s.blocks_free() * f)
        })
        .unwrap_or((0, 0));
    let uname = nix::sys::utsname::uname().ok();
    let InitState {
        name: init,
        started: init_started,
        ready: init_ready,
    } = init_state();
    Facts {
        agent: env!("CARGO_PKG_VERSION").into(),
        hostname: uname
            .as_ref()
            .map(|u| u.nodename().to_string_lossy().into_owned())
            .unwrap_or_default(),
        kernel: uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        uptime_s,
        mem_total_kib: mem("MemTotal:"),
        mem_available_kib: mem("MemAvailable:"),
        disk_total,
        disk_used,
        addresses: addresses(),
        init,
        init_started,
        init_ready,
    }
}

/// The guest's PID 1 as [`Facts`] reports it.
pub(crate) struct InitState {
    pub name: String,
    pub started: bool,
    pub ready: bool,
}

/// PID 1's name, whether it is the image's, and whether it takes commands. Until the image's
/// init runs, PID 1 is sistemo's own `/init` in the initramfs: its root is not ours.
pub(crate) fn init_state() -> InitState {
    use std::os::unix::fs::MetadataExt;
    // By its program, not its name: `/sbin/init` exec'd as `init` is systemd all the same.
    let comm = std::fs::read_link("/proc/1/exe")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let same_root = match (std::fs::metadata("/proc/1/root/"), std::fs::metadata("/")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    };
    // sistemo's own init running an image's single program: ready once the program runs.
    if same_root && comm == "agent" {
        let running = std::path::Path::new(crate::init::WORKLOAD_PID).exists();
        return InitState {
            name: "sistemo-agent".into(),
            started: running,
            ready: running,
        };
    }
    // PID 1's program must come from the image: between switch_root's chroot and its exec,
    // PID 1 is still the initramfs's busybox (not always shown as deleted yet).
    let exe_in_image = match (std::fs::metadata("/proc/1/exe"), std::fs::metadata("/")) {
        (Ok(e), Ok(r)) => e.dev() == r.dev(),
        _ => false,
    };
    // switch_root between its chroot and its exec: its program was in the initramfs.
    let started = same_root && exe_in_image && !comm.is_empty() && !comm.ends_with(" (deleted)");
    let ready = started && (comm != "systemd" || systemd_listens());
    InitState {
        name: comm,
        started,
        ready,
    }
}

/// Block until the image's init takes commands, at most `limit`; `slow` runs once if that
/// takes more than a second. Whether it does.
pub(crate) fn wait_init_ready(limit: std::time::Duration, slow: impl FnOnce()) -> bool {
    let t0 = std::time::Instant::now();
    let mut slow = Some(slow);
    loop {
        if init_state().ready {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        if t0.elapsed() > std::time::Duration::from_secs(1)
            && let Some(f) = slow.take()
        {
            f();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether systemd as PID 1 has opened its private control socket: `systemctl` works, and
/// it acts on the signals that ask it to power off.
fn systemd_listens() -> bool {
    std::fs::metadata("/run/systemd/private").is_ok()
}

fn addresses() -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|a| a.interface_name != "lo")
        .filter_map(|a| {
            let ip = a.address?;
            let v4 = ip.as_sockaddr_in()?;
            let prefix = a
                .netmask
                .and_then(|m| m.as_sockaddr_in().map(|m| u32::from(m.ip()).count_ones()))
                .unwrap_or(32);
            Some(format!("{} {}/{prefix}", a.interface_name, v4.ip()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn facts_of_this_host_are_plausible() {
        let f = super::collect();
        assert!(f.mem_total_kib > 0 && f.mem_available_kib <= f.mem_total_kib);
        assert!(f.disk_total >= f.disk_used && f.disk_total > 0);
        assert!(!f.kernel.is_empty());
    }
}
