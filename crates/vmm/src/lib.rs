//! Hypervisor backends for sistemo behind one trait, [`Hypervisor`].
//!
//! Modules:
//! - [`netns`]: a "machine" that is a network namespace with a veth on the bridge. No kernel of
//!   its own; used to test the network engine quickly and on hosts without any hypervisor.
//! - [`qemu`]: real VMs with QEMU `-M microvm`, KVM when it can run the guest, else TCG.
//! - [`image`]: kernel + initramfs for guests, the ext4 image store, disk clones.
//! - [`ssh`]: keys and pinned `ssh` command lines used to reach guests.
//!
//! The machine manager only sees this trait: no QEMU flag leaks out of this crate.
#![deny(missing_docs)]

pub mod cpio;
pub mod image;
pub mod netns;
mod proc;
pub mod qemu;
pub mod ssh;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

/// Errors of a hypervisor backend.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A host program the backend needs is missing.
    #[error("{program} is not installed: {hint}")]
    Missing {
        /// The program.
        program: String,
        /// How to install it.
        hint: String,
    },
    /// The VMM failed to start or to become ready.
    #[error("machine {name} failed to boot: {reason}")]
    Boot {
        /// Machine name.
        name: String,
        /// What happened (last console lines where useful).
        reason: String,
    },
    /// Running a command in the machine failed (not the command's own non-zero exit).
    #[error("exec in {name} failed: {reason}")]
    Exec {
        /// Machine name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A host command (debootstrap, mkfs, apt, ...) failed.
    #[error("{what} failed: {reason}")]
    Command {
        /// What was being done.
        what: String,
        /// Exit status and the end of its error output.
        reason: String,
    },
    /// No image matches a reference.
    #[error(
        "image {reference:?} not found (build it with `sistemo image build`, or give a *.ext4 path or URL)"
    )]
    ImageNotFound {
        /// The tag, hash, path or URL asked for.
        reference: String,
    },
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl VmmError {
    /// Wrap an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
        let context = context.into();
        move |source| VmmError::Io { context, source }
    }
}

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
    /// Prefix length of the network.
    pub prefix: u8,
    /// Default gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// DNS servers for the guest.
    pub dns: Vec<Ipv4Addr>,
}

/// Everything a backend needs to run one machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// Stable machine ID.
    pub id: Uuid,
    /// Machine name (also the guest hostname).
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// The machine's own folder: disk, console log, sockets, keys.
    pub dir: PathBuf,
    /// Root disk (VM backends); `None` for backends without a disk.
    pub disk: Option<PathBuf>,
    /// Network.
    pub net: NetAttachment,
    /// SSH public key the daemon uses to reach the guest (authorized for root).
    pub ssh_pubkey: Option<String>,
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
    /// The instance for a pid that was just spawned.
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
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The exit code of a finished process, 128 + signal number when a signal killed it.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Run `argv` (stdin closed, stdout and stderr piped), wait up to `timeout` and collect what
/// it produced. `spawn_err` maps a failure to start the program.
pub async fn run_exec(
    name: &str,
    argv: &[String],
    timeout: Duration,
    spawn_err: impl FnOnce(std::io::Error) -> VmmError,
) -> Result<ExecOutput, VmmError> {
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| VmmError::Exec {
            name: name.to_string(),
            reason: format!("command did not finish within {}s", timeout.as_secs()),
        })?
        .map_err(VmmError::io(format!("waiting for {}", argv[0])))?;
    Ok(ExecOutput {
        code: exit_code(out.status),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// What a command run in a machine produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code of the command (128+signal when killed).
    pub code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

/// One hypervisor driver. Implementations must be cheap to share (`Arc<dyn Hypervisor>`).
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short name for `doctor` and logs, e.g. `qemu-tcg`, `qemu-kvm`, `netns`.
    fn name(&self) -> String;

    /// Which host link the network layer prepares before [`Hypervisor::start`].
    fn link_kind(&self) -> LinkKind;

    /// Launch the machine. Returns once the VMM process runs (not when the guest is ready).
    /// The VMM must run in its own session so it survives a daemon restart.
    async fn start(&self, spec: &MachineSpec) -> Result<Instance, VmmError>;

    /// Wait until the guest accepts `exec`, calling `progress` with short status lines.
    async fn wait_ready(
        &self,
        spec: &MachineSpec,
        inst: &Instance,
        timeout: Duration,
        progress: &(dyn for<'s> Fn(&'s str) + Send + Sync),
    ) -> Result<(), VmmError>;

    /// Stop gracefully (guest power-down), killing the VMM after `timeout`.
    async fn stop(&self, spec: &MachineSpec, inst: &Instance, timeout: Duration) -> Result<(), VmmError>;

    /// Remove what `start` left on the host after the VMM is gone (sockets, namespaces).
    async fn cleanup(&self, spec: &MachineSpec) -> Result<(), VmmError>;

    /// Run `cmd` through the guest's shell (`sh -c`) and collect its output and exit code.
    /// A trailing `&` leaves the process running without hanging.
    async fn exec(&self, spec: &MachineSpec, cmd: &str, timeout: Duration) -> Result<ExecOutput, VmmError>;

    /// Argument vector of an interactive shell into the machine (run by the CLI on a terminal).
    fn shell_command(&self, spec: &MachineSpec) -> Vec<String>;

    /// Argument vector that runs `cmd` like [`Hypervisor::exec`] with its output on the child's
    /// stdout and stderr, for callers that stream it. Empty when the backend cannot.
    fn exec_argv(&self, _spec: &MachineSpec, _cmd: &str) -> Vec<String> {
        Vec::new()
    }
}
