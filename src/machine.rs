//! The machine manager: owns machine lifecycles and exposes. Every transition is a
//! compare-and-set in the store, operations on one machine are serialised, and every step that
//! touches the host has its undo, so a failure half-way leaves nothing behind.

use crate::api::{MachineInfo, NetworkInfo, PortInfo, PortRow};
use crate::config::Config;
use crate::net::firewall::{BridgeNet, Desired, FirewallDriver, Health, PortMapping};
use crate::net::link::Links;
use crate::spec::{ExposeSpec, HostPortSpec, Protocol, check_no_duplicates};
use crate::store::{ActiveExpose, Machine, Network, Store, StoreError};
use sistemo_vmm::{Hypervisor, Instance, LinkKind, MachineSpec, NetAttachment};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Name of the built-in network.
pub const DEFAULT_NETWORK: &str = "default";

/// What went wrong, classified for the API's status codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the value and what is allowed.
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Taken, in use, or in the wrong state.
    #[error("{0}")]
    Conflict(String),
    /// The host failed us.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => Error::NotFound(m),
            StoreError::Conflict(m) => Error::Conflict(m),
            e @ StoreError::WrongState { .. } => Error::Conflict(e.to_string()),
            e @ StoreError::Exhausted { .. } => Error::Conflict(e.to_string()),
            e => Error::Internal(e.to_string()),
        }
    }
}

macro_rules! internal {
    ($e:expr) => {
        $e.map_err(|e| Error::Internal(e.to_string()))
    };
}

type Result<T> = std::result::Result<T, Error>;

/// A progress callback for long operations.
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Provides root disks for hypervisors that need one (the QEMU backend).
#[async_trait::async_trait]
pub trait DiskProvider: Send + Sync {
    /// Resolve `image` and create the machine's disk in `dir`, `storage` bytes (None: default).
    /// Returns the disk path and its final size.
    async fn create_disk(
        &self,
        image: &str,
        dir: &std::path::Path,
        storage: Option<u64>,
        progress: Progress<'_>,
    ) -> std::result::Result<(PathBuf, u64), String>;

    /// Images in the store.
    fn images(&self) -> Vec<crate::api::ImageRow>;

    /// Build the `debian` base image (with extra packages) under `tag`.
    async fn build(
        &self,
        tag: &str,
        include: &[String],
        progress: Progress<'_>,
    ) -> std::result::Result<crate::api::ImageRow, String>;

    /// Remove a tag (and the image when no tag is left); false when unknown.
    fn remove(&self, tag: &str) -> std::result::Result<bool, String>;
}

/// The manager; shared as `Arc<Manager>` by the API server and the reconciler.
pub struct Manager {
    store: Mutex<Store>,
    links: Links,
    fw: Box<dyn FirewallDriver>,
    fw_lock: Mutex<()>,
    vmm: Arc<dyn Hypervisor>,
    disks: Option<Arc<dyn DiskProvider>>,
    cfg: Config,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Parse a size like `512M`, `2G`, `1024K` or bytes; names the value when bad.
pub fn parse_size(what: &str, s: &str) -> Result<u64> {
    let t = s.trim();
    let bad = || {
        Error::Invalid(format!(
            "{what} {s:?} is not a size (allowed: a positive number with K, M, G or T, like 512M or 2G)"
        ))
    };
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1 << 20),
    };
    let n: u64 = num.trim_end_matches(['i', 'B']).parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(Error::Invalid(format!("{what} {s:?} must be greater than zero")));
    }
    n.checked_mul(mult).ok_or_else(bad)
}

/// Machine names: 1-63 characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn check_name(what: &str, n: &str) -> Result<()> {
    if n.is_empty() || n.len() > 63 {
        return Err(Error::Invalid(format!(
            "{what} {n:?} must be 1-63 characters long (allowed: a-z, 0-9, '-')"
        )));
    }
    if !n
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || n.starts_with('-')
        || n.ends_with('-')
    {
        return Err(Error::Invalid(format!(
            "{what} {n:?} has characters outside [a-z0-9-] (allowed: lower-case letters, digits and '-', not at either end)"
        )));
    }
    Ok(())
}

/// Whether a host process already serves `proto` on `bind:port` (bind probe; std sets SO_REUSEADDR
/// on TCP listeners, so only a live listener, not TIME_WAIT, makes this fail).
fn probe_host_port(bind: Option<Ipv4Addr>, proto: Protocol, port: u16) -> Result<()> {
    let addr = (bind.unwrap_or(Ipv4Addr::UNSPECIFIED), port);
    let r = match proto {
        Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::Conflict(format!(
            "host port {}{port}/{proto} is already in use by a process on this host; choose another host port",
            bind.map(|b| format!("{b}:")).unwrap_or_default()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => Err(Error::Invalid(format!(
            "bind address {} is not an address of this host (allowed: an address of this host, or none for all)",
            addr.0
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(Error::Invalid(format!(
            "host port {port} is privileged (below 1024): the daemon must run as root to expose it"
        ))),
        Err(_) => Ok(()),
    }
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

impl Manager {
    /// A manager over an opened store; call [`Manager::startup`] next.
    pub fn new(
        store: Store,
        links: Links,
        fw: Box<dyn FirewallDriver>,
        vmm: Arc<dyn Hypervisor>,
        disks: Option<Arc<dyn DiskProvider>>,
        cfg: Config,
    ) -> Manager {
        Manager {
            store: Mutex::new(store),
            links,
            fw,
            fw_lock: Mutex::new(()),
            vmm,
            disks,
            cfg,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The store, locked.
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hypervisor's name.
    pub fn hypervisor(&self) -> String {
        self.vmm.name()
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn machine_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("machines").join(id)
    }

    fn spec_of(&self, m: &Machine) -> Result<MachineSpec> {
        let net = self.store().network(&m.network)?;
        let id = internal!(m.id.parse::<uuid::Uuid>())?;
        let dir = self.machine_dir(&m.id);
        let disk = dir.join("disk.raw");
        Ok(MachineSpec {
            id,
            name: m.name.clone(),
            vcpus: m.vcpus,
            memory_mib: m.memory_mib,
            disk: disk.exists().then_some(disk),
            dir,
            net: NetAttachment {
                host_ifname: crate::net::host_ifname(&id),
                bridge: net.bridge.clone(),
                mac: crate::net::mac_for(&id),
                ip: m.ip,
                prefix: net.subnet.prefix_len(),
                gateway: net.gateway(),
                dns: self.cfg.dns.clone(),
            },
            ssh_pubkey: None,
        })
    }

    /// The desired firewall state, from the store.
    pub fn desired(&self) -> Result<Desired> {
        let st = self.store();
        let bridges = st
            .networks()?
            .into_iter()
            .map(|n| BridgeNet {
                bridge: n.bridge,
                subnet: n.subnet,
            })
            .collect();
        Ok(Desired {
            bridges,
            mappings: PortMapping::expand(&st.active_exposes()?),
        })
    }

    /// Rebuild sistemo's whole table from the store in one transaction.
    pub fn rebuild_firewall(&self) -> Result<()> {
        let d = self.desired()?;
        let _g = self.fw_lock.lock().unwrap_or_else(|p| p.into_inner());
        internal!(self.fw.rebuild(&d))?;
        if self.cfg.forward_compat {
            for c in internal!(self.fw.ensure_forward_compat(&d.bridges))? {
                tracing::info!(chain = %c, "foreign forward chain has policy drop: inserted sistemo's accept rules");
            }
        }
        Ok(())
    }

    /// One self-repair pass: if the table drifted (flush, firewall reload), rebuild it.
    /// `deep` also verifies the rules (slower with many exposes).
    pub fn repair_once(&self, deep: bool) -> Result<bool> {
        // Checked without the lock: exposes are never delayed by a check; a rebuild takes it.
        let health = internal!(self.fw.check(deep))?;
        let repaired = match health {
            Health::InSync => false,
            Health::Drifted(why) => {
                tracing::warn!(reason = %why, "nftables drifted from the database; restoring");
                self.rebuild_firewall()?;
                tracing::info!("nftables restored from the database");
                true
            }
        };
        if !repaired && self.cfg.forward_compat {
            let bridges = self.desired()?.bridges;
            let _g = self.fw_lock.lock().unwrap_or_else(|p| p.into_inner());
            for c in internal!(self.fw.ensure_forward_compat(&bridges))? {
                tracing::info!(chain = %c, "foreign forward chain has policy drop: inserted sistemo's accept rules");
            }
        }
        Ok(repaired)
    }

    /// Daemon start: ensure the default network and bridges, re-adopt or clean up machines,
    /// and rebuild the firewall from the store in one transaction.
    pub async fn startup(&self) -> Result<()> {
        let cfg = &self.cfg;
        {
            let st = self.store();
            match st.network(DEFAULT_NETWORK) {
                Ok(n) if n.subnet == cfg.bridge_subnet && n.bridge == cfg.bridge => {}
                Ok(_) => st.set_network_subnet(DEFAULT_NETWORK, &cfg.bridge, cfg.bridge_subnet)?,
                Err(_) => st.create_network(&Network {
                    name: DEFAULT_NETWORK.into(),
                    bridge: cfg.bridge.clone(),
                    subnet: cfg.bridge_subnet,
                })?,
            }
        }
        let networks = self.store().networks()?;
        for n in &networks {
            internal!(self.links.ensure_bridge(&n.bridge, n.subnet, n.gateway()).await)?;
        }
        let machines = self.store().machines()?;
        for m in machines {
            let inst: Option<Instance> = m.instance.as_deref().and_then(|s| serde_json::from_str(s).ok());
            let alive = inst.as_ref().is_some_and(Instance::is_alive);
            match m.state.as_str() {
                "running" if alive => {
                    tracing::info!(machine = %m.name, "re-adopted running machine");
                    // The link may have been lost with the bridge; re-attach it.
                    let spec = self.spec_of(&m)?;
                    if self.vmm.link_kind() == LinkKind::Veth {
                        let _ = self.links.attach(&spec.net.host_ifname, &spec.net.bridge).await;
                    }
                }
                "creating" => {
                    tracing::warn!(machine = %m.name, "deploy was interrupted; rolling it back");
                    self.teardown(&m, inst.as_ref()).await;
                    let _ = std::fs::remove_dir_all(self.machine_dir(&m.id));
                    self.store().delete_machine(&m.id)?;
                }
                "running" | "stopping" | "starting" => {
                    tracing::warn!(machine = %m.name, "machine's VMM is gone; marking it stopped");
                    self.teardown(&m, inst.as_ref()).await;
                    let st = self.store();
                    st.set_instance(&m.id, None)?;
                    st.set_state(&m.id, "stopped")?;
                }
                _ => {}
            }
        }
        let t = std::time::Instant::now();
        self.rebuild_firewall()?;
        tracing::info!(
            restore_ms = t.elapsed().as_secs_f64() * 1000.0,
            "firewall rebuilt from the database in one transaction"
        );
        Ok(())
    }

    /// Stop the VMM if given, and remove the machine's link and backend leftovers.
    async fn teardown(&self, m: &Machine, inst: Option<&Instance>) {
        let Ok(spec) = self.spec_of(m) else { return };
        if let Some(i) = inst {
            let _ = self.vmm.stop(&spec, i, Duration::from_secs(20)).await;
        }
        let _ = self.vmm.cleanup(&spec).await;
        let _ = self.links.delete(&spec.net.host_ifname).await;
    }

    /// Check exposes against each other and against host processes (no state change).
    fn precheck_exposes(&self, specs: &[ExposeSpec]) -> Result<()> {
        check_no_duplicates(specs).map_err(|e| Error::Invalid(e.to_string()))?;
        for s in specs {
            for p in s.host.ports.ports() {
                if self.cfg.port == Some(p) && s.host.proto == Protocol::Tcp {
                    return Err(Error::Conflict(format!(
                        "host port {p}/tcp is the sistemo API's own TCP port; choose another host port"
                    )));
                }
                probe_host_port(s.host.bind, s.host.proto, p)?;
            }
        }
        Ok(())
    }

    fn info(&self, m: &Machine) -> Result<MachineInfo> {
        let ports = self
            .store()
            .exposes_of(&m.id)?
            .iter()
            .map(|e| port_info(&e.spec))
            .collect();
        Ok(MachineInfo {
            id: m.id.clone(),
            name: m.name.clone(),
            status: m.state.clone(),
            ip: m.ip.to_string(),
            network: m.network.clone(),
            image: m.image.clone(),
            vcpus: m.vcpus,
            memory_mib: m.memory_mib,
            storage_bytes: m.storage_bytes,
            ports,
            created_at: m.created_at.clone(),
        })
    }

    /// All machines.
    pub fn list(&self) -> Result<Vec<MachineInfo>> {
        let ms = self.store().machines()?;
        ms.iter().map(|m| self.info(m)).collect()
    }

    /// One machine by name or UUID.
    pub fn status(&self, name: &str) -> Result<MachineInfo> {
        let m = self.store().machine(name)?;
        self.info(&m)
    }

    /// Deploy: validate everything first, then create and boot, undoing on failure.
    pub async fn deploy(
        &self,
        req: &crate::api::DeployRequest,
        progress: Progress<'_>,
    ) -> Result<MachineInfo> {
        if req.image.trim().is_empty() {
            return Err(Error::Invalid(
                "image is empty (allowed: an image name like debian, a *.ext4 file, or an http(s) URL)"
                    .into(),
            ));
        }
        let name = match &req.name {
            Some(n) => n.clone(),
            None => format!("m-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        };
        check_name("name", &name)?;
        let vcpus = req.vcpus.unwrap_or(1);
        let max = self.cfg.max_vcpus.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        });
        if vcpus == 0 || vcpus > max {
            return Err(Error::Invalid(format!(
                "vcpus {vcpus} is out of range (allowed: 1-{max})"
            )));
        }
        let mem = parse_size("memory", req.memory.as_deref().unwrap_or("512M"))?;
        let host_mem = host_memory_bytes();
        if mem < 64 << 20 || mem > host_mem {
            return Err(Error::Invalid(format!(
                "memory {} is out of range (allowed: 64M to the host's {}M)",
                req.memory.as_deref().unwrap_or("512M"),
                host_mem >> 20
            )));
        }
        let storage = req
            .storage
            .as_deref()
            .map(|s| parse_size("storage", s))
            .transpose()?;
        let specs = req
            .expose
            .iter()
            .map(|s| s.parse::<ExposeSpec>().map_err(|e| Error::Invalid(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        self.precheck_exposes(&specs)?;
        let network = req.network.clone().unwrap_or_else(|| DEFAULT_NETWORK.into());
        let id = uuid::Uuid::new_v4();
        let row = Machine {
            id: id.to_string(),
            name: name.clone(),
            image: req.image.clone(),
            state: "creating".into(),
            network,
            ip: Ipv4Addr::UNSPECIFIED,
            vcpus,
            memory_mib: mem >> 20,
            storage_bytes: storage.unwrap_or(0),
            instance: None,
            created_at: String::new(),
        };
        let m = self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .create_machine(&row, &specs)?;
        let lock = self.lock_for(&m.id);
        let _g = lock.lock().await;
        let dir = self.machine_dir(&m.id);
        let res: Result<()> = async {
            internal!(std::fs::create_dir_all(&dir))?;
            if let Some(d) = &self.disks {
                let (_, size) = d
                    .create_disk(&req.image, &dir, storage, progress)
                    .await
                    .map_err(Error::Invalid)?;
                self.store().set_storage(&m.id, size)?;
            }
            self.boot(&m, progress).await
        }
        .await;
        if let Err(e) = res {
            progress("deploy failed; cleaning up");
            self.teardown(&m, None).await;
            let _ = std::fs::remove_dir_all(&dir);
            let _ = self.store().delete_machine(&m.id);
            return Err(e);
        }
        self.status(&m.id)
    }

    /// Bring a machine's link, VMM and rules up; on failure undo them. The caller holds its lock.
    async fn boot(&self, m: &Machine, progress: Progress<'_>) -> Result<()> {
        let spec = self.spec_of(m)?;
        let res: Result<Instance> = async {
            // A reused address may have a stale neighbour entry pointing at the old MAC.
            internal!(self.links.flush_neighbour(m.ip).await)?;
            if self.vmm.link_kind() == LinkKind::Tap {
                internal!(
                    self.links
                        .create_tap(&spec.net.host_ifname, &spec.net.bridge)
                        .await
                )?;
            }
            progress(&format!("starting {} on {}", m.name, self.vmm.name()));
            let inst = self
                .vmm
                .start(&spec)
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            {
                let st = self.store();
                st.set_instance(&m.id, Some(&internal!(serde_json::to_string(&inst))?))?;
            }
            if self.vmm.link_kind() == LinkKind::Veth {
                internal!(self.links.attach(&spec.net.host_ifname, &spec.net.bridge).await)?;
            }
            self.vmm
                .wait_ready(&spec, &inst, Duration::from_secs(180), progress)
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            Ok(inst)
        }
        .await;
        let inst = match res {
            Ok(i) => i,
            Err(e) => {
                let inst = self
                    .store()
                    .machine(&m.id)
                    .ok()
                    .and_then(|m| m.instance)
                    .and_then(|s| serde_json::from_str(&s).ok());
                self.teardown(m, inst.as_ref()).await;
                let _ = self.store().set_instance(&m.id, None);
                return Err(e);
            }
        };
        // Rules go in last: the machine is up, so the state flip and the rules come together.
        self.store().set_state(&m.id, "running")?;
        let mappings = self.mappings_of(&m.id)?;
        let r = {
            let _g = self.fw_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.fw.add(&mappings)
        };
        if let Err(e) = r {
            self.store().set_state(&m.id, "stopped")?;
            self.teardown(m, Some(&inst)).await;
            return Err(Error::Internal(e.to_string()));
        }
        progress(&format!("{} is running at {}", m.name, m.ip));
        Ok(())
    }

    fn mappings_of(&self, id: &str) -> Result<Vec<PortMapping>> {
        let st = self.store();
        let m = st.machine(id)?;
        let active: Vec<ActiveExpose> = st
            .exposes_of(id)?
            .into_iter()
            .map(|e| ActiveExpose {
                spec: e.spec,
                ip: m.ip,
            })
            .collect();
        Ok(PortMapping::expand(&active))
    }

    /// Start a stopped machine: link, VMM, then its rules return.
    pub async fn start(&self, name: &str, progress: Progress<'_>) -> Result<MachineInfo> {
        let m = self.store().machine(name)?;
        let lock = self.lock_for(&m.id);
        let _g = lock.lock().await;
        if m.state != "running" {
            // A host process may have taken a reserved port while the machine was stopped;
            // DNAT would silently shadow it.
            let specs: Vec<ExposeSpec> = self
                .store()
                .exposes_of(&m.id)?
                .into_iter()
                .map(|e| e.spec)
                .collect();
            self.precheck_exposes(&specs)
                .map_err(|e| Error::Conflict(format!("cannot start {}: {e}", m.name)))?;
        }
        self.store()
            .transition(&m.id, &["stopped", "error"], "starting")
            .map_err(|e| match e {
                StoreError::WrongState { name, actual, .. } => {
                    Error::Conflict(format!("machine {name} is already {actual}"))
                }
                e => e.into(),
            })?;
        if let Err(e) = self.boot(&m, progress).await {
            let _ = self.store().set_state(&m.id, "stopped");
            return Err(e);
        }
        self.status(&m.id)
    }

    /// Stop a running machine: its rules leave nftables (rows stay), then the VMM stops gracefully.
    pub async fn stop(&self, name: &str, progress: Progress<'_>) -> Result<MachineInfo> {
        let m = self.store().machine(name)?;
        let lock = self.lock_for(&m.id);
        let _g = lock.lock().await;
        self.store()
            .transition(&m.id, &["running"], "stopping")
            .map_err(|e| match e {
                StoreError::WrongState { name, actual, .. } => {
                    Error::Conflict(format!("machine {name} is {actual}, not running"))
                }
                e => e.into(),
            })?;
        self.shutdown(&m, progress).await?;
        self.status(&m.id)
    }

    async fn shutdown(&self, m: &Machine, progress: Progress<'_>) -> Result<()> {
        let mappings = self.mappings_of(&m.id)?;
        {
            let _g = self.fw_lock.lock().unwrap_or_else(|p| p.into_inner());
            // Absent elements (e.g. after a flush) are fine: the next rebuild reflects the store.
            let _ = self.fw.remove(&mappings);
        }
        progress(&format!("stopping {}", m.name));
        let inst: Option<Instance> = self
            .store()
            .machine(&m.id)?
            .instance
            .and_then(|s| serde_json::from_str(&s).ok());
        self.teardown(m, inst.as_ref()).await;
        let st = self.store();
        st.set_instance(&m.id, None)?;
        st.set_state(&m.id, "stopped")?;
        Ok(())
    }

    /// Restart: stop then start; IP and ports are kept.
    pub async fn restart(&self, name: &str, progress: Progress<'_>) -> Result<MachineInfo> {
        let m = self.store().machine(name)?;
        if m.state == "running" {
            self.stop(&m.id, progress).await?;
        }
        self.start(&m.id, progress).await
    }

    /// Delete: stop if running, then remove rules, link, files, IP lease and rows.
    pub async fn delete(&self, name: &str, progress: Progress<'_>) -> Result<()> {
        let m = self.store().machine(name)?;
        let lock = self.lock_for(&m.id);
        let _g = lock.lock().await;
        let m = self.store().machine(&m.id)?;
        if m.state == "running" {
            self.shutdown(&m, progress).await?;
        } else {
            self.teardown(&m, None).await;
        }
        let _ = std::fs::remove_dir_all(self.machine_dir(&m.id));
        self.store().delete_machine(&m.id)?;
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(&m.id);
        Ok(())
    }

    /// Expose ports (all or none). On a stopped machine only the rows change.
    pub async fn expose(&self, name: &str, ports: &[String]) -> Result<MachineInfo> {
        let specs = ports
            .iter()
            .map(|s| s.parse::<ExposeSpec>().map_err(|e| Error::Invalid(e.to_string())))
            .collect::<Result<Vec<_>>>()?;
        if specs.is_empty() {
            return Err(Error::Invalid(
                "no --port given (allowed: [HOST_IP:]HOST_PORT[-END][:MACHINE_PORT[-END]][/tcp|/udp])".into(),
            ));
        }
        let m = self.store().machine(name)?;
        self.precheck_exposes(&specs)?;
        let lock = self.lock_for(&m.id);
        let _g = lock.lock().await;
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_exposes(&m.id, &specs)?;
        let m = self.store().machine(&m.id)?;
        if m.state == "running" {
            let active: Vec<ActiveExpose> = specs
                .iter()
                .map(|s| ActiveExpose { spec: *s, ip: m.ip })
                .collect();
            let r = {
                let _g = self.fw_lock.lock().unwrap_or_else(|p| p.into_inner());
                self.fw.add(&PortMapping::expand(&active))
            };
            if let Err(e) = r {
                let mut st = self.store.lock().unwrap_or_else(|p| p.into_inner());
                for s in &specs {
                    let _ = st.remove_exposes(&m.id, &s.host);
                }
                return Err(Error::Internal(e.to_string()));
            }
        }
        self.info(&m)
    }

    /// Remove an expose by its host side (`8080` = tcp 8080; `8080/udp`; `127.0.0.1:8080`).
    pub async fn unexpose(&self, name: &str, port: &str) -> Result<MachineInfo> {
        let h: HostPortSpec = port
            .parse()
            .map_err(|e: crate::spec::SpecError| Error::Invalid(e.to_string()))?;
        let m = self.store().machine(name)?;
        let lock = self.lock_for(&m.id);
        let _g = lock.lock().await;
        let removed = self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove_exposes(&m.id, &h)?;
        if removed.is_empty() {
            let have: Vec<String> = self
                .store()
                .exposes_of(&m.id)?
                .iter()
                .map(|e| e.spec.host.to_string())
                .collect();
            return Err(Error::NotFound(format!(
                "port {h} is not exposed on machine {} (exposed: {})",
                m.name,
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        }
        let m = self.store().machine(&m.id)?;
        if m.state == "running" {
            let active: Vec<ActiveExpose> = removed
                .iter()
                .map(|s| ActiveExpose { spec: *s, ip: m.ip })
                .collect();
            let _g = self.fw_lock.lock().unwrap_or_else(|p| p.into_inner());
            internal!(self.fw.remove(&PortMapping::expand(&active)))?;
        }
        self.info(&m)
    }

    /// Every exposed port on the host.
    pub fn ports(&self) -> Result<Vec<PortRow>> {
        Ok(self
            .store()
            .all_exposes()?
            .iter()
            .map(|(machine, state, spec)| PortRow {
                machine: machine.clone(),
                state: if state == "running" { "active" } else { "inactive" }.into(),
                port: port_info(spec),
            })
            .collect())
    }

    async fn running_spec(&self, name: &str) -> Result<MachineSpec> {
        let m = self.store().machine(name)?;
        if m.state != "running" {
            return Err(Error::Conflict(format!(
                "machine {} is {}; start it with `sistemo machine start {}`",
                m.name, m.state, m.name
            )));
        }
        self.spec_of(&m)
    }

    /// Run a command in a running machine.
    pub async fn exec(&self, name: &str, cmd: &str, timeout: Duration) -> Result<sistemo_vmm::ExecOutput> {
        let spec = self.running_spec(name).await?;
        sistemo_vmm::exec_collect(&*self.vmm, &spec, cmd, timeout)
            .await
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Run a command in a running machine, sending its output as it comes; returns the exit code.
    pub async fn exec_stream(
        &self,
        name: &str,
        cmd: &str,
        timeout: Duration,
        out: tokio::sync::mpsc::UnboundedSender<crate::api::ExecEvent>,
    ) -> Result<i32> {
        use crate::api::ExecEvent;
        use sistemo_vmm::OutputChunk;
        let spec = self.running_spec(name).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let forward = tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                let _ = out.send(match c {
                    OutputChunk::Stdout(s) => ExecEvent::Stdout(s),
                    OutputChunk::Stderr(s) => ExecEvent::Stderr(s),
                });
            }
        });
        let code = self.vmm.exec(&spec, cmd, timeout, tx).await;
        let _ = forward.await;
        code.map_err(|e| Error::Internal(e.to_string()))
    }

    /// The argv of an interactive shell.
    pub async fn shell(&self, name: &str) -> Result<Vec<String>> {
        let spec = self.running_spec(name).await?;
        Ok(self.vmm.shell_command(&spec))
    }

    /// The machine's console log.
    /// The machine's console log from byte `offset` on (for `logs -f`).
    pub fn logs(&self, name: &str, offset: u64) -> Result<String> {
        use std::io::{Read, Seek};
        let m = self.store().machine(name)?;
        let p = self.machine_dir(&m.id).join("console.log");
        let Ok(mut f) = std::fs::File::open(p) else {
            return Ok(String::new());
        };
        let mut buf = Vec::new();
        internal!(f.seek(std::io::SeekFrom::Start(offset)))?;
        internal!(f.take(4 << 20).read_to_end(&mut buf))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    // ---- images ----

    fn disks(&self) -> Result<&Arc<dyn DiskProvider>> {
        self.disks.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "the {} backend has no images (use --hypervisor qemu)",
                self.vmm.name()
            ))
        })
    }

    /// Images in the store.
    pub fn images(&self) -> Result<Vec<crate::api::ImageRow>> {
        Ok(self.disks()?.images())
    }

    /// Build an image from Debian with extra packages.
    pub async fn image_build(
        &self,
        req: &crate::api::ImageBuildRequest,
        progress: Progress<'_>,
    ) -> Result<crate::api::ImageRow> {
        if req.base != "debian" {
            return Err(Error::Invalid(format!(
                "base image {:?} cannot be built (allowed: debian)",
                req.base
            )));
        }
        let tag = req.name.clone().unwrap_or_else(|| req.base.clone());
        check_name("image name", &tag)?;
        for p in &req.include {
            if p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.:".contains(&b))
            {
                return Err(Error::Invalid(format!(
                    "package name {p:?} is not valid (allowed: Debian package names)"
                )));
            }
        }
        self.disks()?
            .build(&tag, &req.include, progress)
            .await
            .map_err(Error::Internal)
    }

    /// Remove an image tag; refused while a machine uses it.
    pub fn image_remove(&self, tag: &str) -> Result<()> {
        let users: Vec<String> = self
            .store()
            .machines()?
            .into_iter()
            .filter(|m| m.image == tag)
            .map(|m| m.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "image {tag:?} is used by machine(s) {}; delete them first",
                users.join(", ")
            )));
        }
        match self.disks()?.remove(tag) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::NotFound(format!(
                "image {tag:?} does not exist (see `sistemo image list`)"
            ))),
            Err(e) => Err(Error::Internal(e)),
        }
    }

    // ---- networks ----

    /// All networks.
    pub fn networks(&self) -> Result<Vec<NetworkInfo>> {
        let st = self.store();
        let ms = st.machines()?;
        Ok(st
            .networks()?
            .into_iter()
            .map(|n| NetworkInfo {
                machines: ms.iter().filter(|m| m.network == n.name).count(),
                gateway: n.gateway().to_string(),
                subnet: n.subnet.to_string(),
                bridge: n.bridge,
                name: n.name,
            })
            .collect())
    }

    /// Create a network with its own bridge; its subnet must overlap no other network or host route.
    pub async fn network_create(&self, name: &str, subnet: Option<&str>) -> Result<NetworkInfo> {
        if name.is_empty()
            || name.len() > 12
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::Invalid(format!(
                "network name {name:?} is not allowed (allowed: 1-12 characters of a-z, 0-9, '-')"
            )));
        }
        let existing = self.store().networks()?;
        if existing.iter().any(|n| n.name == name) {
            return Err(Error::Conflict(format!("network {name:?} already exists")));
        }
        let routes = internal!(self.links.routed_v4().await)?;
        let overlaps = |s: &ipnet::Ipv4Net| -> Option<String> {
            for n in &existing {
                if n.subnet.contains(&s.network()) || s.contains(&n.subnet.network()) {
                    return Some(format!("network {} ({})", n.name, n.subnet));
                }
            }
            for (r, _) in &routes {
                if r.contains(&s.network()) || s.contains(&r.network()) {
                    return Some(format!("host route {r}"));
                }
            }
            None
        };
        let subnet: ipnet::Ipv4Net = match subnet {
            Some(s) => {
                let n: ipnet::Ipv4Net = s.parse().map_err(|_| {
                    Error::Invalid(format!(
                        "subnet {s:?} is not a CIDR (allowed: like 10.201.0.0/24)"
                    ))
                })?;
                if n.trunc() != n || n.prefix_len() > 29 || n.prefix_len() < 8 {
                    return Err(Error::Invalid(format!(
                        "subnet {s:?} is not allowed (allowed: a network address with prefix /8 to /29, like 10.201.0.0/24)"
                    )));
                }
                if let Some(o) = overlaps(&n) {
                    return Err(Error::Conflict(format!(
                        "subnet {n} overlaps {o}; choose a subnet that does not"
                    )));
                }
                n
            }
            None => (1..=254u8)
                .map(|i| {
                    ipnet::Ipv4Net::new(Ipv4Addr::new(10, 200u8.wrapping_add(i), 0, 0), 24).expect("valid")
                })
                .find(|n| overlaps(n).is_none())
                .ok_or_else(|| Error::Conflict("no free 10.x.0.0/24 subnet left; pass --subnet".into()))?,
        };
        let net = Network {
            name: name.to_string(),
            bridge: format!("sis-{name}"),
            subnet,
        };
        if internal!(self.links.lookup(&net.bridge).await)?.is_some() {
            return Err(Error::Conflict(format!(
                "a link named {} already exists on this host and sistemo does not own it",
                net.bridge
            )));
        }
        self.store().create_network(&net)?;
        let r = async {
            internal!(
                self.links
                    .ensure_bridge(&net.bridge, net.subnet, net.gateway())
                    .await
            )?;
            self.rebuild_firewall()
        }
        .await;
        if let Err(e) = r {
            let _ = self.links.delete(&net.bridge).await;
            let _ = self.store().delete_network(name);
            let _ = self.rebuild_firewall();
            return Err(e);
        }
        Ok(self
            .networks()?
            .into_iter()
            .find(|n| n.name == name)
            .expect("just created"))
    }

    /// Delete a network; refused while machines use it, and for the default network.
    pub async fn network_delete(&self, name: &str) -> Result<()> {
        if name == DEFAULT_NETWORK {
            return Err(Error::Invalid("the default network cannot be deleted".into()));
        }
        let n = self.store().network(name)?;
        self.store().delete_network(name)?;
        self.rebuild_firewall()?;
        internal!(self.links.delete(&n.bridge).await)?;
        Ok(())
    }

    /// Remove what the daemon put outside its own table (daemon shutdown).
    pub fn shutdown_firewall_compat(&self) {
        let _g = self.fw_lock.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.fw.remove_forward_compat();
    }

    /// sistemo's bridges and whether each exists.
    pub async fn bridges(&self) -> Result<Vec<(String, bool)>> {
        let nets = self.store().networks()?;
        let mut out = vec![];
        for n in nets {
            let ok = matches!(self.links.lookup(&n.bridge).await, Ok(Some(_)));
            out.push((n.bridge, ok));
        }
        Ok(out)
    }

    /// Firewall health as text.
    pub fn firewall_health(&self) -> String {
        match self.fw.check(true) {
            Ok(Health::InSync) => "in sync".into(),
            Ok(Health::Drifted(w)) => w,
            Err(e) => e.to_string(),
        }
    }

    /// The table as text.
    pub fn firewall_render(&self) -> Result<String> {
        Ok(self.fw.render(&self.desired()?))
    }
}

fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("memory", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("memory", "2G").unwrap(), 2 << 30);
        assert!(
            parse_size("memory", "12X")
                .unwrap_err()
                .to_string()
                .contains("\"12X\"")
        );
        assert!(
            parse_size("memory", "0")
                .unwrap_err()
                .to_string()
                .contains("greater than zero")
        );
    }

    #[test]
    fn names() {
        check_name("name", "web-1").unwrap();
        for bad in ["", "Web", "a b", "-x", &"a".repeat(64), "x;rm"] {
            assert!(check_name("name", bad).is_err(), "{bad}");
        }
    }
}
