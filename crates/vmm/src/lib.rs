//! Hypervisor backends for sistemo behind one trait, [`Hypervisor`], and the types it speaks:
//! what a machine is ([`MachineSpec`]), its running VMM ([`Instance`]), errors ([`VmmError`]).
//!
//! Modules:
//! - [`netns`]: a "machine" that is a network namespace with a veth on the bridge. No kernel of
//!   its own; used to test the network engine quickly and on hosts without any hypervisor.
//! - [`qemu`]: real VMs with QEMU `-M microvm`, KVM when it can run the guest, else TCG.
//! - [`confine`]: host tools on untrusted file systems, run unprivileged in fresh namespaces.
//! - [`image`]: kernel + initramfs for guests, the ext4 image store, Debian builds, disk clones.
//! - `agent` (private): reaching a guest's `sistemo-agent` (exec, shell, copy, facts); the
//!   agent binary itself ([`AGENT_BINARY`]) is packed into every guest's initramfs.
//! - `ssh` (private): keys and pinned `ssh` command lines for `machine ssh` and `--wait ssh`.
//! - `exec` (re-exported here): streaming a command's output; [`exec_collect`].
//! - [`shell_quote`]: quoting for a POSIX shell, shared with the CLI.
//!
//! Nothing here reads environment variables: every knob is an options struct with a `Default`
//! ([`qemu::QemuOptions`], [`image::BuildOptions`], the `kernel_deb` of
//! [`image::ensure_boot_assets`]). The machine manager only sees the trait: no QEMU flag leaks
//! out of this crate.

mod agent;
pub mod cgroup;
pub mod confine;
mod cpio;
mod error;
mod exec;
pub mod image;
pub mod logring;
pub mod netns;
mod proc;
pub mod qemu;
mod shell;
mod ssh;

pub use agent::AGENT_BINARY;
pub use error::VmmError;
pub use exec::{ExecOutput, OUTPUT_QUEUE, OutputChunk, OutputSink, exec_collect, output_queue};
pub use shell::{detach_background, shell_quote};
pub use sistemo_agent::client::{Event as SessionEvent, Session};
pub use sistemo_agent::proto::{Facts, Job, Start, WinSize};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// A callback for short progress lines ("downloading linux-image-…", "ready after 4.2s").
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Which host-side link the network layer must create for a machine before `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A persistent TAP device named [`NetAttachment::host_ifname`], enslaved to the bridge.
    Tap,
    /// The backend creates a veth pair itself; the network layer enslaves the host end
    /// ([`NetAttachment::host_ifname`]) after `start`.
    Veth,
}

/// The machine's network as the network layer prepared it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetAttachment {
    /// Host-side interface name (the TAP, or the host end of the veth).
    pub host_ifname: String,
    /// Bridge the host side is (or will be) enslaved to.
    pub bridge: String,
    /// The machine's MAC, stable, derived from its ID.
    pub mac: [u8; 6],
    /// The machine's IPv4 address.
    pub ip: Ipv4Addr,
    /// Prefix length of the network, e.g. 24.
    pub prefix: u8,
    /// Default gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// DNS servers written into the guest's resolv.conf.
    pub dns: Vec<Ipv4Addr>,
}

/// Everything a backend needs to run one machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// Stable machine ID (also the guest's machine-id and the SSH host-key alias).
    pub id: Uuid,
    /// Machine name (also the guest hostname).
    pub name: String,
    /// Virtual CPUs (at least 1 is used).
    pub vcpus: u32,
    /// Memory in MiB (at least 128 is used).
    pub memory_mib: u64,
    /// The machine's own folder: disk, console log, sockets, keys.
    pub dir: PathBuf,
    /// Root disk (VM backends); `None` for backends without a disk.
    pub disk: Option<PathBuf>,
    /// The network attachment the network layer prepared.
    pub net: NetAttachment,
    /// SSH public key the daemon uses to reach the guest (authorized for root).
    pub ssh_pubkey: Option<String>,
    /// Extra disks (volumes), in the order the guest sees them after the root disk.
    pub volumes: Vec<VolumeAttachment>,
    /// Rate limits of its disk and network (the backend applies the disk's).
    pub io: IoLimits,
    /// A number no other machine has while this one exists (below [`MACHINE_SLOTS`]; template
    /// boots use [`TEMPLATE_SLOT`]): backends derive per-machine identities from it, such as the
    /// uid its VMM runs as, so that one VMM cannot signal or trace another.
    pub slot: u32,
    /// A CPU cap below its vCPUs, in thousandths of a CPU (`--cpu-limit`); 0: one CPU per vCPU.
    pub cpu_limit_milli: u32,
}

/// How many machines a host can hold at once: the number of per-machine slots.
pub const MACHINE_SLOTS: u32 = 65535;

/// The slot of a template's boot (see [`MachineSpec::slot`]); no machine has it.
pub const TEMPLATE_SLOT: u32 = MACHINE_SLOTS;

/// A volume given to a machine as an extra virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttachment {
    /// Its file on the host.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
    /// The disk's serial (at most 20 of `[a-z0-9-]`): the guest finds it in
    /// `/sys/block/vdX/serial`, whatever its position.
    pub serial: String,
    /// Where the guest's init mounts it (ext4), if anywhere.
    pub mount: Option<String>,
}

/// A machine's I/O rate limits; 0 is no limit. Units are Sistemo's: network rates in megabits
/// per second, disk bandwidth in MiB per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    /// What the machine receives (its download), Mbit/s.
    pub download_mbps: u32,
    /// What the machine sends (its upload), Mbit/s.
    pub upload_mbps: u32,
    /// Disk operations per second, reads and writes together.
    pub iops: u32,
    /// Disk bandwidth, reads and writes together, MiB/s.
    pub disk_bw_mbps: u32,
}

impl IoLimits {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == IoLimits::default()
    }
}

/// A running VMM process, identified so that a recycled pid is never mistaken for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Process ID of the VMM (or of the namespace's holder process).
    pub pid: i32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

impl Instance {
    /// The instance for a pid that was just spawned; `None` when it is already gone.
    pub fn of_pid(pid: i32) -> Option<Instance> {
        Some(Instance {
            pid,
            start_time: proc_start_time(pid)?,
        })
    }

    /// True when the same process (pid and start time) is still alive and not a zombie.
    pub fn is_alive(&self) -> bool {
        proc_start_time(self.pid) == Some(self.start_time)
    }
}

/// Start time of a live (non-zombie) process, from `/proc/PID/stat`.
fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A MAC as `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC a template boots with; each clone's agent changes it to the clone's own.
pub const TEMPLATE_MAC: [u8; 6] = [0x02, 0x5e, 0x00, 0x00, 0x00, 0x01];

/// Warm starts: a guest booted once as a template (with no identity), saved, and restored for
/// each new machine of the same image and shape, which then takes its own identity.
#[async_trait]
pub trait Templates: Send + Sync {
    /// The key of a template of `image_digest` with this shape: it also covers everything of the
    /// backend a restore depends on (VMM binary and version, kernel, initramfs, agent,
    /// accelerator), so any change gives a different key and a cold boot, never a broken restore.
    fn template_key(&self, image_digest: &str, vcpus: u32, memory_mib: u64) -> String;

    /// The files a complete template in `dir` consists of (all must exist to use it).
    fn template_files(&self, dir: &Path) -> Vec<PathBuf>;

    /// Boot `spec` (its folder is the template's, its link on no bridge, its MAC
    /// [`TEMPLATE_MAC`]) as a template, wait until it is ready and settled, save it into its
    /// folder and end its VMM.
    async fn make_template(
        &self,
        spec: &MachineSpec,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), VmmError>;

    /// Start `spec` from the template in `template` (its disk must be a copy of the template's
    /// frozen disk): the guest runs with the template's identity; its link must stay off the
    /// bridge until [`Templates::set_identity`] succeeded.
    async fn restore(&self, spec: &MachineSpec, template: &Path) -> Result<Instance, VmmError>;

    /// Give a restored guest its own identity (clock, RNG, MAC, address, hostname,
    /// machine-id, SSH keys); returns the steps taken.
    async fn set_identity(&self, spec: &MachineSpec, timeout: Duration) -> Result<Vec<String>, VmmError>;
}

/// One hypervisor driver. Implementations must be cheap to share (`Arc<dyn Hypervisor>`).
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name for `doctor` and logs, e.g. `qemu-tcg`, `qemu-kvm`, `netns`.
    fn name(&self) -> String;

    /// Which host link the network layer prepares before [`Hypervisor::start`].
    fn link_kind(&self) -> LinkKind;

    /// The (uid, gid) the network layer gives the TAP it creates for `spec`'s VMM
    /// (`TUNSETOWNER`); `None`: root's.
    fn link_owner(&self, _spec: &MachineSpec) -> Option<(u32, u32)> {
        None
    }

    /// Launch the machine. Returns once the VMM process runs (not when the guest is ready).
    /// The VMM must run in its own session so it survives a daemon restart.
    async fn start(&self, spec: &MachineSpec) -> Result<Instance, VmmError>;

    /// Wait until the guest accepts `exec`, calling `progress` with short status lines.
    async fn wait_ready(
        &self,
        spec: &MachineSpec,
        inst: &Instance,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), VmmError>;

    /// Stop gracefully (guest power-down), killing the VMM after `timeout`.
    async fn stop(&self, spec: &MachineSpec, inst: &Instance, timeout: Duration) -> Result<(), VmmError>;

    /// Remove what `start` left on the host after the VMM is gone (sockets, namespaces).
    async fn cleanup(&self, spec: &MachineSpec) -> Result<(), VmmError>;

    /// Open a session in the guest through its agent: a command with its stdin, a terminal, or
    /// a file copy. The session's process dies when the [`Session`] is dropped before its end.
    async fn session(&self, spec: &MachineSpec, start: Start) -> Result<Session, VmmError>;

    /// What the guest's agent reports about it (uptime, memory, disk, addresses); an error when
    /// the agent does not answer.
    async fn facts(&self, spec: &MachineSpec) -> Result<Facts, VmmError>;

    /// False for backends whose machines have no kernel of their own (their "guest" is the
    /// host): `machine status` then asks no facts.
    fn has_guest(&self) -> bool {
        true
    }

    /// Wait until the image's init takes commands (`deploy --wait init`: systemd has opened
    /// its control socket); backends without a guest init return at once.
    async fn wait_init(
        &self,
        _spec: &MachineSpec,
        _timeout: Duration,
        _progress: Progress<'_>,
    ) -> Result<(), VmmError> {
        Ok(())
    }

    /// Wait until the guest's own sshd answers (`deploy --wait ssh`); backends without SSH
    /// return at once.
    async fn wait_ssh(
        &self,
        _spec: &MachineSpec,
        _timeout: Duration,
        _progress: Progress<'_>,
    ) -> Result<(), VmmError> {
        Ok(())
    }

    /// Run `cmd` through the guest's shell (`sh -c`), sending its output to `out` as it comes,
    /// and return its exit code (128+signal when a signal killed it). A trailing `&` leaves the
    /// process running without hanging. Not finishing within `timeout`, or failing to reach
    /// the guest at all, is a [`VmmError::Exec`]; the command's own failure is its exit code.
    /// See [`exec_collect`] to get the whole output at the end.
    async fn exec(
        &self,
        spec: &MachineSpec,
        cmd: &str,
        timeout: Duration,
        out: OutputSink,
    ) -> Result<i32, VmmError> {
        let s = self.session(spec, agent::shell_start(cmd, timeout)).await?;
        // The agent enforces the timeout; this one covers an agent that stops answering.
        tokio::time::timeout(
            timeout + Duration::from_secs(5),
            agent::run_to_end(&spec.name, s, &out),
        )
        .await
        .unwrap_or_else(|_| {
            Err(VmmError::Exec {
                name: spec.name.clone(),
                reason: format!("command did not finish within {}s", timeout.as_secs()),
            })
        })
    }

    /// Warm starts from templates, for backends that have them.
    fn templates(&self) -> Option<&dyn Templates> {
        None
    }

    /// Argument vector of an interactive shell into the machine (run by the CLI on a terminal).
    fn shell_command(&self, spec: &MachineSpec) -> Vec<String>;

    /// The limits the machine's VMM runs under (its cgroup), when the host enforces them.
    fn limits(&self, _spec: &MachineSpec) -> Option<cgroup::Limits> {
        None
    }

    /// True when the VMM paused the guest because a write to its disk failed for lack of space
    /// on the host (QEMU's `werror=enospc`: status `io-error`). Backends without a disk never
    /// pause: the default says no without asking anything.
    async fn disk_paused(&self, _spec: &MachineSpec) -> Result<bool, VmmError> {
        Ok(false)
    }

    /// Resume a guest paused by [`Hypervisor::disk_paused`]; the failed writes are retried (and
    /// pause it again if the host is still full). The default has nothing to resume.
    async fn resume(&self, _spec: &MachineSpec) -> Result<(), VmmError> {
        Ok(())
    }
}
