//! A clone restored from a template taking its own identity: the wall clock, a reseeded kernel
//! RNG, its MAC, address and route, hostname, machine-id, SSH keys; before it joins a network.
//!
//! The order matters: the clock and the RNG come first (nothing the guest does afterwards may
//! use the template's frozen time or random state), the network last but one, and the sshd
//! listener (if the image runs one as a daemon) is told to reload its host key at the end.
//! Files are written as sistemo's init writes them at a cold boot, so the machine keeps the
//! same identity when it is later stopped and started.

use crate::proto::Identity;
use futures::TryStreamExt;
use std::net::Ipv4Addr;

/// Apply `id`; returns one short line per step done, or the first failure.
///
/// Applying again is harmless (the host resends after a broken channel), and one apply runs
/// at a time. The steps that block (file writes on a guest disk still busy with its boot,
/// reading `/proc`) run off the agent's one runtime thread, which keeps answering the host.
pub async fn apply(id: Identity) -> Result<Vec<String>, String> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let id = std::sync::Arc::new(id);
    let mut steps = {
        let id = id.clone();
        blocking(move || -> Result<Vec<String>, String> {
            set_clock(&id)?;
            crate::sys::reseed_rng(&id.entropy).map_err(|e| format!("reseeding the kernel RNG: {e}"))?;
            nix::unistd::sethostname(&id.hostname).map_err(|e| format!("setting the hostname: {e}"))?;
            write_files(&id).map_err(|e| format!("writing the machine's files: {e}"))?;
            Ok(vec!["clock".into(), "rng".into(), "files".into()])
        })
        .await??
    };
    network(&id).await?;
    steps.push("network".to_string());
    if blocking(reload_sshd).await? > 0 {
        steps.push("sshd".to_string());
    }
    Ok(steps)
}

/// `f` on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("applying the identity: {e}"))
}

fn set_clock(id: &Identity) -> Result<(), String> {
    use nix::sys::time::TimeSpec;
    use nix::time::{ClockId, clock_settime};
    let t = TimeSpec::new(id.time_s, i64::from(id.time_ns));
    clock_settime(ClockId::CLOCK_REALTIME, t).map_err(|e| format!("setting the clock: {e}"))
}

/// The files sistemo's init writes at a cold boot, with this identity.
fn write_files(id: &Identity) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let write = |path: &str, text: &str, mode: u32| -> std::io::Result<()> {
        let p = std::path::Path::new(path);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Never through a link an image put there.
        let _ = std::fs::remove_file(p);
        std::fs::write(p, text)?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
    };
    write("/etc/hostname", &format!("{}\n", id.hostname), 0o644)?;
    write(
        "/etc/hosts",
        &format!(
            "127.0.0.1 localhost\n127.0.1.1 {}\n::1 localhost ip6-localhost ip6-loopback\n",
            id.hostname
        ),
        0o644,
    )?;
    write("/etc/machine-id", &format!("{}\n", id.machine_id), 0o444)?;
    let resolv: String = id.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    write("/etc/resolv.conf", &resolv, 0o644)?;
    if std::path::Path::new("/etc/systemd").is_dir() {
        let mut net = format!(
            "[Match]\nMACAddress={}\n[Network]\nAddress={}\nGateway={}\n",
            id.mac, id.address, id.gateway
        );
        for d in &id.dns {
            net.push_str(&format!("DNS={d}\n"));
        }
        net.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\nKeepConfiguration=static\n");
        write("/etc/systemd/network/10-sistemo.network", &net, 0o644)?;
    }
    std::fs::create_dir_all("/root/.ssh")?;
    std::fs::set_permissions("/root/.ssh", std::fs::Permissions::from_mode(0o700))?;
    let keys: String = id
        .authorized_keys
        .iter()
        .map(|k| format!("{}\n", k.trim()))
        .collect();
    write("/root/.ssh/authorized_keys", &keys, 0o600)?;
    if let Ok(rd) = std::fs::read_dir("/etc/ssh") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    write("/etc/ssh/ssh_host_ed25519_key", &id.host_key_private, 0o600)?;
    write("/etc/ssh/ssh_host_ed25519_key.pub", &id.host_key_public, 0o644)?;
    Ok(())
}

/// The interface whose MAC is `mac` (a clone has the one NIC of its template).
fn interface_with_mac(mac: &str) -> Option<String> {
    std::fs::read_dir("/sys/class/net").ok()?.flatten().find_map(|e| {
        let a = std::fs::read_to_string(e.path().join("address")).ok()?;
        a.trim()
            .eq_ignore_ascii_case(mac)
            .then(|| e.file_name().to_string_lossy().into_owned())
    })
}

fn parse_mac(mac: &str) -> Result<Vec<u8>, String> {
    let b: Vec<u8> = mac
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad MAC {mac:?}"))?;
    if b.len() != 6 {
        return Err(format!("bad MAC {mac:?}"));
    }
    Ok(b)
}

/// New MAC, address and default route, over netlink (no program is run: under emulation each
/// one costs tens of milliseconds).
async fn network(id: &Identity) -> Result<(), String> {
    use rtnetlink::{LinkUnspec, RouteMessageBuilder};
    let ifname = interface_with_mac(&id.from_mac)
        .or_else(|| interface_with_mac(&id.mac))
        .ok_or_else(|| format!("no interface with MAC {}", id.from_mac))?;
    let mac = parse_mac(&id.mac)?;
    let (addr, prefix) = id
        .address
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .ok_or_else(|| format!("bad address {:?}", id.address))?;
    let gateway: Ipv4Addr = id
        .gateway
        .parse()
        .map_err(|_| format!("bad gateway {:?}", id.gateway))?;
    let nl = |what: &'static str| move |e: rtnetlink::Error| format!("{what}: {e}");
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
    let task = tokio::spawn(conn);
    let res = async {
        let index =
            nix::net::if_::if_nametoindex(ifname.as_str()).map_err(|e| format!("finding {ifname}: {e}"))?;
        // The MAC changes only while the link is down.
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl("taking the interface down"))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).address(mac).build())
            .execute()
            .await
            .map_err(nl("setting the MAC"))?;
        let old: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        for a in old {
            handle
                .address()
                .del(a)
                .execute()
                .await
                .map_err(nl("removing an old address"))?;
        }
        handle
            .address()
            .add(index, addr.into(), prefix)
            .execute()
            .await
            .map_err(nl("adding the address"))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl("bringing the interface up"))?;
        handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gateway)
                    .output_interface(index)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(nl("adding the default route"))
    }
    .await;
    task.abort();
    res
}

/// Ask a running sshd listener to re-read its configuration and host key (SIGHUP); sshd run
/// per connection (`sshd -i`, socket activation) reads the key each time. Returns how many.
fn reload_sshd() -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let inetd = cmdline.split(|b| *b == 0).any(|a| a == b"-i");
        if comm.trim() == "sshd" && ppid == Some(1) && !inetd {
            let pid = nix::unistd::Pid::from_raw(pid);
            if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).is_ok() {
                n += 1;
            }
        }
    }
    n
}
