//! `sistemo up`: builds the manager from the configuration, restores state, runs the
//! self-repair loop and serves the API until SIGINT/SIGTERM.

use crate::config::Config;
use crate::error::chain;
use crate::host::Host;
use crate::net::firewall::nftables::Nftables;
use crate::net::link::Links;
use crate::store::Store;
use anyhow::{Context, Result, bail};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Refuse to start over a live daemon; remove a stale socket file.
fn claim_socket(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another sistemo daemon is listening on {}; stop it or pass --socket",
                path.display()
            );
        }
        // Only a stale socket is ours to remove: `--socket` pointing at any other file (a typo,
        // the database) is refused, never deleted.
        let meta = std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it (allowed: a free path or a stale sistemo socket)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    share_with_group(path)?;
    Ok(l)
}

/// The group whose members may use the Unix socket without sudo (made by `service install`).
pub const SOCKET_GROUP: &str = "sistemo";

/// The socket is root's, 0660 with group [`SOCKET_GROUP`] when that group exists (its members
/// run the CLI as the `docker` group's do), else 0600.
fn share_with_group(path: &Path) -> Result<()> {
    let group = nix::unistd::Group::from_name(SOCKET_GROUP).ok().flatten();
    if let Some(g) = &group {
        std::os::unix::fs::chown(path, Some(0), Some(g.gid.as_raw()))
            .with_context(|| format!("giving {} to group {SOCKET_GROUP}", path.display()))?;
        // Members must reach the socket: its folder may be traversed by them too.
        if let Some(dir) = path.parent()
            && dir != Path::new("/")
            && let Ok(m) = std::fs::metadata(dir)
            && m.permissions().mode() & 0o011 == 0
        {
            let _ = std::os::unix::fs::chown(dir, None, Some(g.gid.as_raw()));
            let _ = std::fs::set_permissions(
                dir,
                std::fs::Permissions::from_mode(m.permissions().mode() | 0o010),
            );
        }
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Create the data dir with private modes and take its exclusive lock for the daemon's life:
/// a second daemon on the same data dir would roll back this one's in-flight deploys.
fn private_data_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let machines = dir.join("machines");
    std::fs::create_dir_all(&machines).with_context(|| format!("creating data dir {}", dir.display()))?;
    // 0711: a VMM running as its own user may traverse to its machine's directory, nothing more.
    for (p, mode) in [
        (dir.to_path_buf(), 0o711),
        (machines, 0o711),
        (dir.join("pool"), 0o700),
    ] {
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("securing {}", p.display()))?;
        }
    }
    for f in ["sistemo.db", "sistemo.db-wal", "sistemo.db-shm"] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("securing {}", p.display()))?;
        }
    }
    let lock = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(|| format!("opening {}", lock.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another sistemo daemon uses the data dir {} ({e}); stop it, or pass another --data-dir",
            dir.display()
        )
    })
}

/// How long a clean stop waits for operations in flight.
const DRAIN: Duration = Duration::from_secs(30);

/// Run the daemon in the foreground.
pub async fn run(cfg: Config) -> Result<()> {
    cfg.validate()?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("sistemo up must run as root (it manages bridges, nftables and VMs); try: sudo sistemo up");
    }
    let t0 = Instant::now();
    // Everything the daemon writes is private to root unless made otherwise on purpose.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Room for machines, netlink sockets and the TCP API's capped connections at once.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let _data_lock = private_data_dir(&cfg.data_dir)?;
    // e2fsck and resize2fs parse untrusted file systems: as the VMM user, never as root.
    if let Some(name) = &cfg.vmm_user {
        let u = sistemo_vmm::qemu::VmmUser::ensure(name)?;
        sistemo_vmm::confine::confine_tools_as(u.uid, u.gid)?;
    }
    let listener = claim_socket(&cfg.socket)?;
    // Every listener is bound before start-up: connections wait in the backlog until served.
    let mut tcp = Vec::new();
    for l in cfg.listeners()? {
        let sock = tokio::net::TcpListener::bind(l.addr)
            .await
            .with_context(|| format!("binding the TCP listener {l}"))?;
        tcp.push((sock, l));
    }
    let tls = if tcp.iter().any(|(_, l)| l.tls) {
        let mut names = vec!["localhost".to_string()];
        names.extend(tcp.iter().map(|(_, l)| l.addr.ip().to_string()));
        if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            names.push(h.trim().to_string());
        }
        let user = cfg.tls_cert.as_deref().zip(cfg.tls_key.as_deref());
        Some(crate::tls::load(&cfg.data_dir, user, names)?)
    } else {
        None
    };
    let store = Store::open(&cfg.data_dir.join("sistemo.db")).context("opening the database")?;
    let links = Arc::new(Links::new()?);
    let fw = Box::new(Nftables::new(cfg.nft_table.to_string(), cfg.policy()));
    let backend = crate::backend::build(&cfg).await?;
    let m = Arc::new(Host::new(cfg.clone(), store, links, fw, backend));
    if let Err(e) = m.startup().await {
        let _ = std::fs::remove_file(&cfg.socket);
        bail!("{}", chain(&e));
    }
    tracing::info!(
        socket = %cfg.socket.display(),
        table = %cfg.nft_table,
        bridge = %cfg.bridge,
        hypervisor = %m.machines.hypervisor(),
        ms = t0.elapsed().as_millis() as u64,
        "sistemo daemon ready"
    );

    // Self-repair: if anyone flushes the ruleset or deletes the table, restore it from the store.
    let rm = m.clone();
    let every = Duration::from_millis(cfg.repair_interval_ms.max(50));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            n += 1;
            let rm = rm.clone();
            // Every 20th pass also verifies the rules (a flush of only sistemo's chains).
            let deep = n.is_multiple_of(20);
            match tokio::task::spawn_blocking(move || {
                if deep {
                    // An idle daemon returns what its busy moments left in the heap.
                    crate::sys::trim_heap();
                }
                rm.repair_once(deep)
            })
            .await
            {
                Ok(Err(e)) => tracing::error!(error = %chain(&e), "self-repair failed"),
                Err(e) => tracing::error!(error = %e, "self-repair task failed"),
                Ok(Ok(_)) => {}
            }
        }
    });
    // Liveness, on its own timer (an automatic restart boots a VM; repair must not wait for
    // it): a machine whose VMM ended shows it, its rules leave the firewall, and its restart
    // policy applies.
    let rm = m.clone();
    let every = cfg.liveness_interval();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut restarting = None;
        // A VMM's exit (pidfd) or a machine's change wakes the pass at once; the timer is the
        // fallback.
        let mut watch = crate::machine::VmmWatch::new(rm.events.subscribe());
        loop {
            watch.next(&mut tick).await;
            if let Err(e) = rm.machines.reap_dead().await {
                tracing::error!(error = %chain(&e), "checking machines' VMMs failed");
            }
            watch.update(&rm.machines);
            // Restarts by policy boot on their own task: a slow boot must not hold up this
            // loop (at most one restart pass at a time).
            if restarting
                .as_ref()
                .is_none_or(|t: &tokio::task::JoinHandle<()>| t.is_finished())
            {
                let rs = rm.clone();
                restarting = Some(tokio::spawn(async move { rs.machines.restart_due().await }));
            }
            // Logs are capped on the same beat (a guest may write its console full fast).
            let lm = rm.clone();
            match tokio::task::spawn_blocking(move || lm.machines.cap_logs()).await {
                Ok(Err(e)) => tracing::error!(error = %chain(&e), "capping machines' logs failed"),
                Err(e) => tracing::error!(error = %e, "capping machines' logs failed"),
                Ok(Ok(())) => {}
            }
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("signal handler");
        let mut int = signal(SignalKind::interrupt()).expect("signal handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutting down; machines and their port rules stay up");
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let names: Vec<String> = tcp.iter().map(|(_, l)| l.to_string()).collect();
    let fingerprint = tls.as_ref().map(|t| t.fingerprint.clone());
    let _ = m.listeners.set((names.clone(), fingerprint.clone()));
    if !tcp.is_empty() {
        tracing::info!(
            listeners = %names.join(" "),
            "API and dashboard listening (log in with a user from `sistemo user add`, or an API token)"
        );
        if let Some(f) = &fingerprint {
            // Printed plainly too: remote CLIs and browsers compare it.
            eprintln!("TLS certificate SHA-256 fingerprint: {f}");
            tracing::info!(fingerprint = %f, "TLS certificate");
        }
        let (m2, s2) = (m.clone(), stopped());
        let tls = tls.map(|t| t.config);
        tokio::spawn(async move {
            if let Err(e) = crate::server::serve_tcp(tcp, m2, tls, s2).await {
                tracing::error!(error = %e, "TCP API failed");
            }
        });
    }
    // Machine changes become events; event streams end when the daemon stops.
    let w = m.clone();
    tokio::spawn(async move { w.watch_machines().await });
    let (e, s3) = (m.clone(), stopped());
    tokio::spawn(async move {
        s3.await;
        e.events.close();
    });
    let host = m.clone();
    crate::server::serve(listener, m, stopped()).await?;
    // Operations whose client went away still run: let them finish (or roll back) first.
    if !host.drained(DRAIN).await {
        tracing::warn!(
            seconds = DRAIN.as_secs(),
            "operations still running at exit; the next start rolls them back"
        );
    }
    host.shutdown();
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}
