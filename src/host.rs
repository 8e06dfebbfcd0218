//! [`Host`]: the services of one daemon wired together (machines, networks, images, the
//! firewall), plus what spans them: start-up, self-repair, the audit log, accounts, the event bus
//! and daemon facts.

use crate::auth::Auth;
use crate::backend::Backend;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::{Events, HostEvent};
use crate::images::Images;
use crate::machine::{Machines, Settings, desired_firewall, host_memory};
use crate::net::firewall::{Firewall, FirewallDriver};
use crate::net::link::HostLinks;
use crate::networks::Networks;
use crate::store::{Caller, SharedStore, Store};
use crate::volumes::{VolumeSettings, Volumes};
use std::sync::Arc;

/// Daemon facts for `doctor` and `config`.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Hypervisor backend in use, e.g. `qemu-tcg`.
    pub hypervisor: String,
    /// Firewall health: `in sync` or what drifted.
    pub firewall: String,
    /// `PRAGMA integrity_check`'s answer.
    pub database: String,
    /// Number of machines.
    pub machines: usize,
    /// sistemo's bridges and whether each exists.
    pub bridges: Vec<(String, bool)>,
    /// Running machines paused because the host's disk is full.
    pub paused: Vec<String>,
    /// How volume snapshots and clones are made on the data dir's file system.
    pub volume_copy: String,
}

/// Operations in flight (deploys, lifecycle changes, image builds, execs), so a clean stop
/// can let them finish or roll back instead of cutting them half-way.
#[derive(Default)]
pub struct InFlight {
    n: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One operation in flight; done when dropped.
pub struct Op(Arc<InFlight>);

impl Drop for Op {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Every service of one daemon.
pub struct Host {
    /// Machines: lifecycle, exposes, exec.
    pub machines: Machines,
    /// Networks and their bridges.
    pub networks: Networks,
    /// Images and their builds.
    pub images: Images,
    /// Volumes, snapshots and clones.
    pub volumes: Arc<Volumes>,
    /// Users, API tokens and sessions.
    pub auth: Auth,
    /// The event bus.
    pub events: Arc<Events>,
    /// The TCP listeners (`https://0.0.0.0:7777`) and the TLS certificate's fingerprint, once
    /// bound.
    pub listeners: std::sync::OnceLock<(Vec<String>, Option<String>)>,
    store: Arc<SharedStore>,
    fw: Arc<Firewall>,
    cfg: Config,
    in_flight: Arc<InFlight>,
}

impl Host {
    /// Wire the services over an opened store, the host's links, a firewall driver and a
    /// hypervisor backend. Call [`Host::startup`] next.
    pub fn new(
        cfg: Config,
        store: Store,
        links: Arc<dyn HostLinks>,
        fw: Box<dyn FirewallDriver>,
        backend: Backend,
    ) -> Host {
        let store = Arc::new(SharedStore::new(store));
        let source = store.clone();
        let fw = Arc::new(Firewall::new(
            fw,
            Box::new(move || desired_firewall(&source.lock()).map_err(|e| e.into())),
            cfg.forward_compat,
        ));
        let settings = Settings {
            machines_dir: cfg.data_dir.join("machines"),
            max_vcpus: cfg.max_vcpus.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            }),
            host_memory: cfg.max_memory.map_or_else(host_memory, |m| m.min(host_memory())),
            dns: cfg.dns.clone(),
            api_ports: cfg
                .listeners()
                .map(|ls| ls.iter().map(|l| l.addr.port()).collect())
                .unwrap_or_default(),
            max_storage: cfg.max_storage,
            min_disk_free: cfg.min_disk_free,
            ready_timeout: std::time::Duration::from_secs(cfg.ready_timeout_sec),
            io: crate::machine::IoLimits {
                download_mbps: cfg.default_bandwidth_mbps,
                upload_mbps: cfg.default_upload_mbps,
                iops: cfg.default_iops,
                disk_bw_mbps: cfg.default_disk_bw_mbps,
            },
            templates_dir: cfg.data_dir.join("templates"),
            log_max_bytes: cfg.log_max_bytes,
        };
        let hypervisor = backend.vmm.name();
        let volumes = Arc::new(Volumes::new(
            store.clone(),
            VolumeSettings {
                dir: cfg.data_dir.join("volumes"),
                max_storage: cfg.max_storage,
                min_disk_free: cfg.min_disk_free,
                test_pause: cfg.test_volume_pause_ms.map(std::time::Duration::from_millis),
            },
        ));
        let events = Arc::new(Events::default());
        let dirty = events.dirty();
        store.lock().on_change(move |table| {
            if table == "machines" || table == "exposes" {
                dirty.notify_one();
            }
        });
        let auth = Auth::new(
            store.clone(),
            std::time::Duration::from_secs(u64::from(cfg.session_hours) * 3600),
            cfg.token.clone(),
        );
        Host {
            machines: Machines::new(
                store.clone(),
                links.clone(),
                fw.clone(),
                backend.vmm,
                backend.images.clone(),
                volumes.clone(),
                settings,
            ),
            networks: Networks::new(store.clone(), links, fw.clone()),
            images: Images::new(store.clone(), backend.images, hypervisor),
            volumes,
            auth,
            events,
            listeners: std::sync::OnceLock::new(),
            store,
            fw,
            cfg,
            in_flight: Arc::default(),
        }
    }

    /// Count an operation in flight until the returned guard is dropped.
    pub fn begin(&self) -> Op {
        self.in_flight.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Op(self.in_flight.clone())
    }

    /// Wait until no operation is in flight, at most `limit`; false when some still run.
    pub async fn drained(&self, limit: std::time::Duration) -> bool {
        let f = &self.in_flight;
        tokio::time::timeout(limit, async {
            loop {
                let idle = f.idle.notified();
                if f.n.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok()
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Daemon start: networks and bridges as configured, machines re-adopted or cleaned up,
    /// then the whole firewall table rebuilt from the store in one transaction.
    pub async fn startup(&self) -> Result<()> {
        self.networks
            .ensure(&self.cfg.bridge, self.cfg.bridge_subnet)
            .await?;
        self.check_api_port()?;
        self.volumes.startup()?;
        self.machines.readopt().await?;
        let t = std::time::Instant::now();
        self.fw.rebuild()?;
        tracing::info!(
            restore_ms = t.elapsed().as_secs_f64() * 1000.0,
            "firewall rebuilt from the database in one transaction"
        );
        Ok(())
    }

    /// Refuse to start when a stored expose claims the TCP API's port: DNAT would hand the
    /// API's requests, bearer token included, to that machine.
    fn check_api_port(&self) -> Result<()> {
        let listeners = self.cfg.listeners().map_err(|e| Error::Invalid(e.to_string()))?;
        for l in listeners {
            let (port, api) = (l.addr.port(), l.addr.ip());
            let taken = self.machines.ports()?.into_iter().find(|(_, _, s)| {
                s.host.proto == crate::spec::Protocol::Tcp
                    && s.host.ports.ports().any(|p| p == port)
                    && s.host
                        .bind
                        .is_none_or(|b| std::net::IpAddr::V4(b) == api || api.is_unspecified())
            });
            if let Some((m, _, s)) = taken {
                return Err(Error::Conflict(format!(
                    "the TCP API's port {port} ({l}) is exposed by machine {m} ({s}); unexpose it or choose another `port`/`listen`"
                )));
            }
        }
        Ok(())
    }

    /// Until the process ends: publish machine changes the store reports (see [`Events`]).
    pub async fn watch_machines(&self) {
        self.events
            .watch_machines(|| {
                let ms = self.machines.list().ok()?;
                Some(
                    ms.into_iter()
                        .map(|v| {
                            let ports: Vec<String> = v.ports.iter().map(|p| p.to_string()).collect();
                            let fp = format!("{} {:?} {ports:?}", v.machine.state, v.machine.error);
                            (v.machine.name.to_string(), fp)
                        })
                        .collect(),
                )
            })
            .await;
    }

    /// One self-repair pass: restore the firewall if it drifted (`deep` also verifies rules).
    pub fn repair_once(&self, deep: bool) -> Result<bool> {
        let repaired = self.fw.repair_once(deep)?;
        if repaired {
            self.events.publish(HostEvent::Firewall {
                detail: format!("the firewall drifted and was restored; now {}", self.fw.health()),
            });
        }
        Ok(repaired)
    }

    /// Firewall health: `in sync` or what drifted.
    pub fn firewall_health(&self) -> String {
        self.fw.health()
    }

    /// The firewall tables as they should be, as text.
    pub fn firewall_render(&self) -> Result<String> {
        Ok(self.fw.render()?)
    }

    /// Clean daemon stop: take sistemo's rules out of foreign chains (its own tables stay, so
    /// machines and their exposes keep working).
    pub fn shutdown(&self) {
        self.fw.remove_forward_compat();
    }

    /// Append to the audit log.
    pub fn record(&self, caller: &Caller, action: &str, target: &str, result: &str) {
        let r = {
            let st = self.store.lock();
            st.record(caller, action, target, result, self.cfg.history_limit)
                .and_then(|()| st.history(1, 0, None, None))
        };
        match r {
            Ok(mut e) => {
                if let Some(e) = e.pop() {
                    self.events.publish(HostEvent::Change(e));
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), action, target, "writing the audit log failed")
            }
        }
    }

    /// The audit log, newest first.
    pub fn history(
        &self,
        limit: u32,
        offset: u32,
        action: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<crate::store::HistoryRow>> {
        Ok(self.store.lock().history(limit, offset, action, target)?)
    }

    /// The public key machines trust for the daemon's SSH (`sistemo ssh-key`).
    pub fn ssh_public_key(&self) -> Result<String> {
        let p = self.cfg.data_dir.join("ssh/id_ed25519.pub");
        match std::fs::read_to_string(&p) {
            Ok(k) => Ok(k),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(format!(
                "no SSH key in {} (the {} backend reaches machines without SSH, or none booted yet)",
                p.display(),
                self.machines.hypervisor()
            ))),
            Err(e) => Err(Error::io(format!("reading {}", p.display()))(e)),
        }
    }

    /// Facts for `doctor` and `config`.
    pub async fn facts(&self) -> Result<Facts> {
        let (database, machines) = {
            let st = self.store.lock();
            (
                st.integrity().unwrap_or_else(|e| crate::error::chain(&e)),
                st.machines()?.len(),
            )
        };
        Ok(Facts {
            hypervisor: self.machines.hypervisor(),
            firewall: self.fw.health(),
            database,
            machines,
            bridges: self.networks.bridges().await?,
            paused: self.machines.disk_paused_machines()?,
            volume_copy: self.volumes.copy_method().describe().to_string(),
        })
    }
}
