//! `sistemo up`: builds the manager from the configuration, restores state, runs the
//! self-repair loop and serves the API until SIGINT/SIGTERM.

use crate::config::Config;
use crate::error::chain;
use crate::host::Host;
use crate::net::firewall::nftables::Nftables;
use crate::net::link::Links;
use crate::store::Store;
use anyhow::{Context, Result, bail};
use std::os::unix::fs::PermissionsExt;
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
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Run the daemon in the foreground.
pub async fn run(cfg: Config) -> Result<()> {
    cfg.validate()?;
    if !nix::unistd::Uid::effective().is_root() {
        bail!("sistemo up must run as root (it manages bridges, nftables and VMs); try: sudo sistemo up");
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(cfg.data_dir.join("machines"))
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let listener = claim_socket(&cfg.socket)?;
    // Both listeners are bound before start-up: connections wait in the backlog until served.
    let tcp = match cfg.port {
        Some(port) => Some((
            port,
            tokio::net::TcpListener::bind((cfg.listen_addr, port))
                .await
                .with_context(|| format!("binding the TCP API on {}:{port}", cfg.listen_addr))?,
        )),
        None => None,
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

    // Self-repair: if anyone flushes the ruleset or deletes the table, restore it from the store;
    // a machine whose VMM died shows state `error` and its rules leave the firewall.
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
            if let Err(e) = rm.machines.reap_dead().await {
                tracing::error!(error = %chain(&e), "checking machines' VMMs failed");
            }
            match tokio::task::spawn_blocking(move || rm.repair_once(deep)).await {
                Ok(Err(e)) => tracing::error!(error = %chain(&e), "self-repair failed"),
                Err(e) => tracing::error!(error = %e, "self-repair task failed"),
                Ok(Ok(_)) => {}
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
    if let Some((port, tcp)) = tcp {
        let token = cfg.token.clone().unwrap_or_default();
        tracing::info!(addr = %cfg.listen_addr, port, "TCP API listening (bearer token required)");
        let (m2, s2) = (m.clone(), stopped());
        tokio::spawn(async move {
            if let Err(e) = crate::server::serve_tcp(tcp, m2, token, s2).await {
                tracing::error!(error = %e, "TCP API failed");
            }
        });
    }
    let host = m.clone();
    crate::server::serve(listener, m, stopped()).await?;
    host.shutdown();
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}
