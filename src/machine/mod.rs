//! Machines: [`Machines`] owns their lifecycle ([`lifecycle`]), exposes ([`expose`]) and guest
//! access ([`exec`]). Operations on one machine are serialised by its lock, every transition is
//! a compare-and-set in the store, and every host-touching step has its undo.

mod disk_full;
mod exec;
mod expose;
mod lifecycle;
mod recovery;
mod restart;
mod sweep;
mod volumes;
mod warm;
mod watch;
pub use watch::VmmWatch;
mod workload;

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;

pub use expose::{desired_firewall, machine_port};
pub use sistemo_vmm::IoLimits;
pub use volumes::{AttachSpec, check_mount};
pub use warm::TemplateInfo;
pub use workload::{Overrides, exit_code};

use crate::domain::{ByteSize, MachineName, NetworkName, RestartPolicy};
use crate::error::Result;
use crate::images::ImageBackend;
use crate::net::firewall::Firewall;
use crate::net::link::HostLinks;
use crate::spec::ExposeSpec;
use crate::store::{Machine, SharedStore};
use crate::volumes::Volumes;
use sistemo_vmm::{Hypervisor, MachineSpec, NetAttachment};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// A machine with its exposes: what `machine status` shows.
#[derive(Debug, Clone)]
pub struct MachineView {
    /// The machine.
    pub machine: Machine,
    /// Its exposes, in the order they were added.
    pub ports: Vec<ExposeSpec>,
    /// Why its VMM paused it, when the host's disk is full (it stays `running`).
    pub paused: Option<String>,
    /// The limits its VMM runs under, when the host enforces them.
    pub limits: Option<sistemo_vmm::cgroup::Limits>,
    /// The hypervisor running it, e.g. `qemu-tcg`.
    pub vmm: String,
    /// What its guest agent says (asked by [`Machines::status`] of a running machine): its
    /// facts, or why it does not answer.
    pub guest: Option<std::result::Result<sistemo_vmm::Facts, String>>,
    /// Its volumes, the root one first.
    pub volumes: Vec<crate::store::Attachment>,
    /// Its disk and network rate limits.
    pub io: IoLimits,
    /// The template it was restored from, if it was.
    pub template: Option<String>,
    /// The one program it runs (an OCI image's workload, with the deploy's overrides).
    pub workload: Option<sistemo_vmm::image::oci::Workload>,
    /// The sha256 of the image it was deployed from.
    pub image_digest: Option<String>,
}

/// A deploy request, parsed: every value here has its type's shape; ranges that depend on the
/// host (vCPUs, memory) are checked by [`Machines::deploy`].
#[derive(Debug, Clone)]
pub struct Deploy {
    /// Image reference: a tag, a `*.ext4` path or an http(s) URL.
    pub image: String,
    /// Name (default: after the image, `debian`, then `debian-2`, …).
    pub name: Option<MachineName>,
    /// vCPUs (default 1).
    pub vcpus: Option<u32>,
    /// A CPU cap below its vCPUs (`--cpu-limit 0.5`: half a core).
    pub cpu_limit: Option<crate::domain::CpuLimit>,
    /// Memory (default 512M).
    pub memory: Option<ByteSize>,
    /// Disk size (default: the image's size, at least 2G).
    pub storage: Option<ByteSize>,
    /// Exposes, claimed with the machine.
    pub expose: Vec<ExposeSpec>,
    /// Network (default `default`).
    pub network: Option<NetworkName>,
    /// What happens when its VMM ends by itself (default: nothing).
    pub restart: RestartPolicy,
    /// How far to wait for the guest beyond its agent (`--wait`), at most `wait_timeout`.
    pub wait: crate::domain::WaitFor,
    /// How long `wait` may take beyond the agent's answer (default: the daemon's
    /// `ready_timeout`).
    pub wait_timeout: Option<std::time::Duration>,
    /// Volumes to attach (`--attach`).
    pub attach: Vec<AttachSpec>,
    /// Boot from this existing volume instead of an image (`--volume`).
    pub root_volume: Option<crate::domain::VolumeName>,
    /// A copy of this (stopped) machine's disk instead of an image (`machine clone`).
    pub clone_of: Option<Uuid>,
    /// Rate limits; a 0 takes the host's default (`default_bandwidth_mbps` and friends).
    pub io: IoLimits,
    /// Boot cold even when a template fits (`--cold`).
    pub cold: bool,
    /// Overrides of an OCI image's config (`--env`, `--entrypoint`, `-- CMD`, …).
    pub workload: Overrides,
}

/// The host's limits and settings that machines are checked against and configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where machine directories live (`data_dir/machines/ID`).
    pub machines_dir: PathBuf,
    /// Most vCPUs a machine may have.
    pub max_vcpus: u32,
    /// The host's memory: no machine may have more.
    pub host_memory: ByteSize,
    /// DNS servers given to machines.
    pub dns: Vec<Ipv4Addr>,
    /// The API's own TCP ports, which no expose may take.
    pub api_ports: Vec<u16>,
    /// Largest disk a machine may have.
    pub max_storage: ByteSize,
    /// Free space the machines' file system keeps after a new disk is counted in full.
    pub min_disk_free: ByteSize,
    /// How long a guest may take to answer after its VMM started.
    pub ready_timeout: std::time::Duration,
    /// Rate limits of machines deployed without their own.
    pub io: IoLimits,
    /// Where templates live (`data_dir/templates/KEY`).
    pub templates_dir: PathBuf,
    /// Most bytes each of a machine's logs (console, QEMU's) keeps (`log_max_bytes`).
    pub log_max_bytes: ByteSize,
}

/// What machines are made with: the store, the host's links, the firewall, the hypervisor and
/// (for backends with disks) the images.
pub struct Machines {
    store: Arc<SharedStore>,
    links: Arc<dyn HostLinks>,
    fw: Arc<Firewall>,
    vmm: Arc<dyn Hypervisor>,
    images: Option<Arc<dyn ImageBackend>>,
    volumes: Arc<Volumes>,
    settings: Settings,
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Machines waiting for an automatic restart: when, and how many came before.
    restarts: Mutex<HashMap<Uuid, restart::Backoff>>,
    /// Machines their VMM paused because the host's disk is full.
    disk_pauses: disk_full::DiskPauses,
    /// Held while a template is made (one at a time: each boots a VM).
    warming: tokio::sync::Mutex<()>,
}

impl Machines {
    /// The machine service.
    pub fn new(
        store: Arc<SharedStore>,
        links: Arc<dyn HostLinks>,
        fw: Arc<Firewall>,
        vmm: Arc<dyn Hypervisor>,
        images: Option<Arc<dyn ImageBackend>>,
        volumes: Arc<Volumes>,
        settings: Settings,
    ) -> Machines {
        Machines {
            store,
            links,
            fw,
            vmm,
            images,
            volumes,
            settings,
            locks: Mutex::new(HashMap::new()),
            restarts: Mutex::new(HashMap::new()),
            disk_pauses: Default::default(),
            warming: Default::default(),
        }
    }

    /// Run a firewall change on the blocking pool: it waits on netlink or on an `nft` process,
    /// which must not hold up the async workers serving the API.
    async fn firewall<T: Send + 'static>(&self, f: impl FnOnce(&Firewall) -> T + Send + 'static) -> T {
        let fw = self.fw.clone();
        tokio::task::spawn_blocking(move || f(&fw))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// The hypervisor's name, e.g. `qemu-tcg`.
    pub fn hypervisor(&self) -> String {
        self.vmm.name()
    }

    /// The lock that serialises operations on machine `id`.
    fn lock_for(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    fn machine_dir(&self, id: Uuid) -> PathBuf {
        self.settings.machines_dir.join(id.to_string())
    }

    /// What the hypervisor needs to know about `m`.
    fn spec_of(&self, m: &Machine) -> Result<MachineSpec> {
        let (net, attached, io) = {
            let st = self.store.lock();
            (
                st.network(m.network.as_str())?,
                st.attachments_of_machine(m.id)?,
                st.io_of(m.id)?,
            )
        };
        let dir = self.machine_dir(m.id);
        let (disk, volumes) = self.disks_of(&dir, &attached);
        Ok(MachineSpec {
            id: m.id,
            name: m.name.to_string(),
            vcpus: m.vcpus,
            memory_mib: m.memory_mib,
            disk,
            dir,
            net: NetAttachment {
                host_ifname: crate::net::host_ifname(&m.id),
                bridge: net.bridge.to_string(),
                mac: expose::machine_mac(m),
                ip: m.ip,
                prefix: net.subnet.net().prefix_len(),
                gateway: net.gateway(),
                dns: self.settings.dns.clone(),
            },
            ssh_pubkey: None,
            volumes,
            io,
            slot: m.vmm_slot,
            cpu_limit_milli: m.cpu_limit.map_or(0, |c| c.milli()),
        })
    }

    fn limits_of(&self, m: &Machine) -> Option<sistemo_vmm::cgroup::Limits> {
        self.vmm.limits(&self.spec_of(m).ok()?)
    }

    fn paused_reason(&self, m: &Machine) -> Option<String> {
        (m.state == crate::domain::MachineState::Running)
            .then(|| self.disk_pauses.reason(m.id))
            .flatten()
    }

    /// A machine and its exposes, by name or ID.
    pub fn get(&self, name_or_id: &str) -> Result<MachineView> {
        let (machine, ports) = {
            let st = self.store.lock();
            let machine = st.machine(name_or_id)?;
            let ports = st.exposes_of(machine.id)?;
            (machine, ports)
        };
        Ok(self.view(machine, ports))
    }

    /// Every machine with its exposes, oldest first.
    pub fn list(&self) -> Result<Vec<MachineView>> {
        let rows = {
            let st = self.store.lock();
            st.machines()?
                .into_iter()
                .map(|m| Ok((st.exposes_of(m.id)?, m)))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(rows.into_iter().map(|(ports, m)| self.view(m, ports)).collect())
    }

    /// A machine with what the store does not hold (taken without the store's lock: the
    /// machine's limits need its network's row).
    fn view(&self, machine: Machine, ports: Vec<ExposeSpec>) -> MachineView {
        let io = self.store.lock().io_of(machine.id).unwrap_or_default();
        let template = self.store.lock().template_of(machine.id).unwrap_or_default();
        MachineView {
            template,
            io,
            paused: self.paused_reason(&machine),
            limits: self.limits_of(&machine),
            vmm: self.vmm.name(),
            guest: None,
            workload: workload::read(&self.machine_dir(machine.id)),
            image_digest: volumes::image_digest(&self.machine_dir(machine.id)),
            volumes: self
                .store
                .lock()
                .attachments_of_machine(machine.id)
                .unwrap_or_default(),
            machine,
            ports,
        }
    }
}

/// The host's memory, from `/proc/meminfo`.
pub fn host_memory() -> ByteSize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| ByteSize::bytes(kb * 1024))
        .unwrap_or(ByteSize::bytes(u64::MAX))
}
