//! The QEMU backend: real VMs on `-M microvm` (virtio-mmio described by ACPI), KVM when it can
//! run the guest and TCG otherwise; guests are reached through their agent on a virtio-serial
//! port (exec, shell, copy, readiness, shutdown), and over SSH with pinned host keys for
//! `machine ssh`.

mod accel;
mod args;
mod binary;
mod console;
mod files;
mod jail;
mod launch;
mod qmp;
mod ssh;
mod template;

pub use accel::{Accel, AccelChoice, accel_reason};
pub use console::{console_tail, printable};
pub use jail::{DEFAULT_VMM_UID_BASE, DEFAULT_VMM_USER, SANDBOX, VmmUser, check_uid_base};
pub use template::DISK as TEMPLATE_DISK;

use crate::agent::Agents;
use crate::cgroup::{Cgroups, Limits, machine_limits};
use crate::exec::{collect, run_streaming};
use crate::image::{BootAssets, GuestConfig, guest_volumes, write_machine_initrd};
use crate::proc::{failed, spawn_error};
use crate::ssh::{ClientKey, SshTarget, ensure_client_key, ensure_host_key, host_alias};
use crate::{
    ExecOutput, Facts, Hypervisor, Instance, LinkKind, MachineSpec, Progress, Session, Start, VmmError,
    output_queue,
};
use accel::{detect_accel, host_tsc_khz};
use args::Boot;
use async_trait::async_trait;
use files::{agent_path, console_path, ctl_path, initrd_path, pid_path, private_file, qmp_path, vsock_path};
#[cfg(test)]
use launch::{JOIN_AND_EXEC, interface_exists};
use launch::{kill_vmm, wait_exit};
use qmp::qmp_command;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;

const QEMU: &str = "qemu-system-x86_64";

/// The host's vhost-vsock device.
const VHOST_VSOCK: &str = "/dev/vhost-vsock";

/// A machine's vsock CID is this plus its slot: unique among the host's machines, and clear of
/// the reserved CIDs (0 to 2) and of the small ones other VMMs tend to pick.
const VSOCK_CID_BASE: u32 = 0x5100_0000;

/// Host memory a QEMU process uses beyond its guest's RAM, MiB, added to the guest's RAM in the
/// machine's `memory.max`. Measured on this project's test host under TCG (QEMU 7.2, 512 MiB
/// guest, booted, after 16 concurrent execs; `real_vm_boots_debian_and_execs` prints it): RSS
/// beyond the guest RAM's resident pages was 204-213 MiB, of which about 140 MiB anonymous
/// (heap, thread stacks, the translation cache, capped at [`TCG_TB_MIB`]) and 68 MiB file-backed
/// (QEMU's binary and libraries, shared between VMMs). Not measured under KVM (no translation
/// cache there, so this is generous).
pub const VMM_OVERHEAD_MIB: u64 = 256;

/// Size of TCG's translation cache, MiB (QEMU's default is 1 GiB, which would make the VMM's
/// overhead, and so the cgroup's memory limit, depend on what the guest runs).
pub const TCG_TB_MIB: u64 = 128;

/// Tasks a machine's cgroup allows: QEMU's main loop, vCPU and RCU threads plus its block
/// thread pool (up to 64 threads), with room to spare; `spawn=deny` forbids any process.
const VMM_PIDS: u64 = 256;

/// How the QEMU backend is set up beyond its boot assets; `Default` detects the accelerator and
/// confines QEMU (user [`DEFAULT_VMM_USER`], chroot, seccomp, cgroups where the host has them).
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// KVM, TCG, or detect.
    pub accel: AccelChoice,
    /// Appended to the guest kernel's command line (e.g. `loglevel=7` when debugging a boot).
    pub cmdline_extra: Option<String>,
    /// Report every failed SSH readiness attempt through `progress` while waiting for a boot.
    pub debug_boot: bool,
    /// The unprivileged user host tools on untrusted file systems run as (created when
    /// missing). `Some` also confines every QEMU: it switches, after opening its files and inside
    /// an empty chroot, to a uid of its own, `vmm_uid_base` + the machine's slot. `None` leaves
    /// QEMU running as root (debugging only).
    pub vmm_user: Option<String>,
    /// The first of the [`crate::MACHINE_SLOTS`] + 1 uids (and gids) VMMs run as, one per
    /// machine (no account is created for them).
    pub vmm_uid_base: u32,
    /// Put each machine in its own cgroup with memory, CPU and task limits (when the host's
    /// cgroups allow; otherwise machines run unlimited and `doctor` says so).
    pub cgroups: bool,
    /// Give cold-booted machines a virtio-vsock device for the agent where the host has
    /// `/dev/vhost-vsock` (the virtio-serial port stays, and is used when vsock fails).
    pub vsock: bool,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            accel: AccelChoice::Auto,
            cmdline_extra: None,
            debug_boot: false,
            vmm_user: Some(DEFAULT_VMM_USER.into()),
            vmm_uid_base: DEFAULT_VMM_UID_BASE,
            cgroups: true,
            vsock: true,
        }
    }
}

/// The QEMU hypervisor.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    assets: BootAssets,
    client: ClientKey,
    accel: Accel,
    tsc_khz: Option<u64>,
    netns: Option<String>,
    options: QemuOptions,
    user: Option<VmmUser>,
    /// Machines get a vhost-vsock device (the host has `/dev/vhost-vsock` and `vsock` is on).
    vsock: bool,
    cgroups: Cgroups,
    agents: Arc<Agents>,
    /// The QEMU binary's identity (content and version), followed across upgrades.
    qemu: Arc<binary::QemuBinary>,
}

impl Qemu {
    /// A backend booting `assets`, with the daemon's SSH client key in `data_dir/ssh`
    /// (created if missing). Fails with [`VmmError::Missing`] when QEMU is not installed.
    pub async fn new(data_dir: &Path, assets: BootAssets, options: QemuOptions) -> Result<Qemu, VmmError> {
        let out = Command::new(QEMU)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| spawn_error(e, QEMU))?;
        if !out.status.success() {
            return Err(failed(&format!("{QEMU} --version"), &out.status, &out.stderr));
        }
        Command::new("ssh")
            .arg("-V")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| spawn_error(e, "ssh"))?;
        let client = ensure_client_key(data_dir).await?;
        let user = match &options.vmm_user {
            Some(name) => Some(VmmUser::ensure(name)?),
            None => {
                tracing::warn!("vmm_user is unset: QEMU runs as root, unconfined");
                None
            }
        };
        let cgroups = if options.cgroups {
            Cgroups::detect()
        } else {
            Cgroups::Unavailable("disabled by the configuration".into())
        };
        if !cgroups.available() {
            tracing::warn!("{}", cgroups.describe());
        }
        let accel = detect_accel(options.accel);
        if accel == Accel::Tcg {
            tracing::warn!(
                "machines run under TCG (software emulation), which QEMU does not treat as a \
                 security boundary: run only trusted guests"
            );
        }
        // QEMU opens it as root when it realises the device, before it drops privileges.
        let vsock = options.vsock
            && std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(VHOST_VSOCK)
                .is_ok();
        Ok(Qemu {
            binary: PathBuf::from(QEMU),
            assets,
            client,
            accel,
            tsc_khz: host_tsc_khz(),
            netns: None,
            options,
            user,
            vsock,
            cgroups,
            agents: Default::default(),
            qemu: {
                // Hash the binary now, off the async workers, rather than in the first deploy.
                let qemu = Arc::new(binary::QemuBinary::new(QEMU));
                let q = Arc::clone(&qemu);
                let _ = tokio::task::spawn_blocking(move || q.identity()).await;
                qemu
            },
        })
    }

    /// The user host tools run as (`None`: root, and QEMU is not confined either).
    pub fn vmm_user(&self) -> Option<&VmmUser> {
        self.user.as_ref()
    }

    /// The uid and gid `spec`'s QEMU runs as after its start-up (`None`: root): its own,
    /// from its slot, so that no VMM can signal another.
    pub fn vmm_ids(&self, spec: &MachineSpec) -> Option<(u32, u32)> {
        self.user.as_ref()?;
        let id = self
            .options
            .vmm_uid_base
            .checked_add(spec.slot.min(crate::TEMPLATE_SLOT))?;
        Some((id, id))
    }

    /// `spec`'s vsock CID (whether or not it has a vsock device).
    pub(crate) fn vsock_cid(spec: &MachineSpec) -> u32 {
        VSOCK_CID_BASE + spec.slot.min(crate::TEMPLATE_SLOT)
    }

    /// Where `spec`'s agent is reached: its serial port, and its vsock when the running VMM
    /// was given one.
    fn channel(&self, spec: &MachineSpec) -> crate::agent::Channel {
        crate::agent::Channel {
            serial: agent_path(spec),
            vsock: std::fs::read_to_string(vsock_path(spec))
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }
    }

    /// The host's cgroups as this backend uses them.
    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// The name of a machine's cgroup (its ID).
    pub fn cgroup_name(spec: &MachineSpec) -> String {
        spec.id.simple().to_string()
    }

    /// The limits a machine's cgroup gets.
    pub fn limits_for(&self, spec: &MachineSpec) -> Limits {
        machine_limits(spec.memory_mib.max(128), spec.vcpus, VMM_OVERHEAD_MIB, VMM_PIDS)
            .with_cpu_limit(spec.cpu_limit_milli)
    }

    /// Run QEMU and `ssh` inside network namespace `ns` (tests: the TAP and bridge live there).
    pub fn with_netns(mut self, ns: impl Into<String>) -> Self {
        self.netns = Some(ns.into());
        self
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    async fn guest_config(&self, spec: &MachineSpec, template: bool) -> Result<GuestConfig, VmmError> {
        let hk = ensure_host_key(&spec.dir, &host_alias(&spec.id)).await?;
        let private = std::fs::read(&hk.private).map_err(VmmError::io("reading the machine's host key"))?;
        let mut keys = vec![self.client.public.clone()];
        if let Some(k) = &spec.ssh_pubkey
            && k.trim() != self.client.public.trim()
        {
            keys.push(k.trim().to_string());
        }
        Ok(GuestConfig {
            hostname: spec.name.clone(),
            machine_id: spec.id.simple().to_string(),
            mac: spec.net.mac,
            ip: spec.net.ip,
            prefix: spec.net.prefix,
            gateway: spec.net.gateway,
            dns: spec.net.dns.clone(),
            authorized_keys: keys,
            host_key_private: private,
            host_key_public: hk.public,
            volumes: guest_volumes(spec),
            workload: crate::image::oci::read_workload(&spec.dir)?,
            template,
            vsock: self.vsock && !template,
        })
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> String {
        match self.accel {
            Accel::Kvm => "qemu-kvm".into(),
            Accel::Tcg => "qemu-tcg".into(),
        }
    }

    fn link_kind(&self) -> LinkKind {
        LinkKind::Tap
    }

    fn link_owner(&self, spec: &MachineSpec) -> Option<(u32, u32)> {
        self.vmm_ids(spec)
    }

    async fn start(&self, spec: &MachineSpec) -> Result<Instance, VmmError> {
        self.spawn_vmm(spec, Boot::Cold, Stdio::null()).await
    }

    async fn wait_ready(
        &self,
        spec: &MachineSpec,
        inst: &Instance,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), VmmError> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        progress(&format!("booting ({})", self.name()));
        let mut last_why = String::new();
        loop {
            if !inst.is_alive() {
                return Err(self.boot_error(spec, "the VM stopped while booting"));
            }
            if Instant::now() >= deadline {
                return Err(self.boot_error(
                    spec,
                    &format!("the guest agent did not answer within {}s", timeout.as_secs()),
                ));
            }
            // QEMU holds the greeting until the agent opens its port: one attempt waits for
            // the whole boot, unless the VMM dies meanwhile. Ready once the agent answers and
            // the initramfs has handed over to the image's init (or its one program runs):
            // exec, shell and cp work from then on, while the init starts its services
            // (`--wait init` waits for it to take commands too).
            match self.facts(spec).await {
                Ok(f) if f.init_started => {
                    progress(&format!(
                        "ready after {:.1}s (agent {}, init {}{})",
                        t0.elapsed().as_secs_f64(),
                        f.agent,
                        f.init,
                        if f.init_ready { "" } else { " starting" }
                    ));
                    return Ok(());
                }
                Ok(_) => {
                    let why = "agent up, the initramfs hands over".to_string();
                    if why != last_why {
                        progress(&format!(
                            "agent up after {:.1}s, handing over to the image's init",
                            t0.elapsed().as_secs_f64()
                        ));
                        last_why = why;
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    if why != last_why {
                        tracing::debug!(machine = %spec.name, "agent not ready: {why}");
                        if self.options.debug_boot {
                            progress(&format!("{:.1}s agent: {why}", t0.elapsed().as_secs_f64()));
                        }
                        last_why = why;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_init(
        &self,
        spec: &MachineSpec,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), VmmError> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        progress("waiting for the image's init to take commands");
        loop {
            let f = self.facts(spec).await?;
            if f.init_ready {
                progress(&format!(
                    "{} takes commands after {:.1}s more",
                    f.init,
                    t0.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.boot_error(
                    spec,
                    &format!(
                        "the image's init ({}) did not take commands within {}s",
                        f.init,
                        timeout.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ssh(
        &self,
        spec: &MachineSpec,
        timeout: Duration,
        progress: Progress<'_>,
    ) -> Result<(), VmmError> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        let mut last_why = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.boot_error(
                    spec,
                    &format!("not reachable over SSH within {}s", timeout.as_secs()),
                ));
            }
            let attempt = self
                .ssh_run(spec, "true", 5, left.min(Duration::from_secs(15)))
                .await;
            if let Ok(o) = &attempt
                && o.code == 0
            {
                progress(&format!(
                    "sshd answers after {:.1}s more",
                    t0.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if let Ok(o) = &attempt
                && String::from_utf8_lossy(&o.stderr).contains("Host key verification failed")
            {
                return Err(self.boot_error(spec, "the guest's SSH host key does not match the pinned key"));
            }
            let why = match &attempt {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            if why != last_why {
                tracing::debug!(machine = %spec.name, "ssh not ready: {why}");
                if self.options.debug_boot {
                    progress(&format!("{:.1}s ssh: {why}", t0.elapsed().as_secs_f64()));
                }
                last_why = why;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn session(&self, spec: &MachineSpec, start: Start) -> Result<Session, VmmError> {
        let c = self.agents.get(spec, &self.channel(spec)).await?;
        c.start(start).await.map_err(|e| VmmError::Exec {
            name: spec.name.clone(),
            reason: e.to_string(),
        })
    }

    async fn facts(&self, spec: &MachineSpec) -> Result<Facts, VmmError> {
        let err = |reason: String| VmmError::Exec {
            name: spec.name.clone(),
            reason,
        };
        let c = self.agents.get(spec, &self.channel(spec)).await?;
        match tokio::time::timeout(Duration::from_secs(3), c.facts()).await {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(err(format!("the guest agent: {e}"))),
            Err(_) => Err(err("the guest agent does not answer (3s)".into())),
        }
    }

    async fn stop(&self, spec: &MachineSpec, inst: &Instance, timeout: Duration) -> Result<(), VmmError> {
        if !inst.is_alive() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        // A guest paused on a full host disk runs no code: it cannot power off, so waiting
        // for it would only delay the kill.
        if self.disk_paused(spec).await.unwrap_or(false) {
            tracing::warn!(machine = %spec.name, "guest is paused on a full host disk; killing the VMM");
        } else {
            // Ask the guest agent (the images have no logind/acpid to act on the power
            // button); the ACPI power button is the fallback for a guest whose agent is gone.
            let asked = match tokio::time::timeout(
                Duration::from_secs(3),
                self.agents.get(spec, &self.channel(spec)),
            )
            .await
            {
                Ok(Ok(c)) => c.shutdown().await.is_ok(),
                _ => false,
            };
            if !asked {
                let _ = qmp_command(&qmp_path(spec), "system_powerdown").await;
            }
            if wait_exit(inst, deadline).await {
                return Ok(());
            }
            tracing::warn!(machine = %spec.name, "guest did not power off in time; killing the VMM");
        }
        if kill_vmm(inst).await {
            Ok(())
        } else {
            Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: format!("VMM pid {} survived SIGKILL", inst.pid),
            })
        }
    }

    async fn cleanup(&self, spec: &MachineSpec) -> Result<(), VmmError> {
        self.agents.forget(spec);
        self.close_master(spec).await;
        // An exited QEMU stays in its cgroup until it is reaped (by tokio, or by init after a
        // daemon restart), which may take a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match self.cgroups.remove(&Self::cgroup_name(spec)) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::warn!(machine = %spec.name, "removing the machine's cgroup: {e}");
                    break;
                }
                Ok(()) => break,
            }
        }
        let _ = std::fs::remove_dir(jail::jail_dir(&spec.dir));
        for p in [
            qmp_path(spec),
            agent_path(spec),
            pid_path(spec),
            initrd_path(spec),
            ctl_path(spec),
            vsock_path(spec),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmmError::io(format!("removing {}", p.display()))(e)),
            }
        }
        Ok(())
    }

    fn templates(&self) -> Option<&dyn crate::Templates> {
        Some(self)
    }

    fn limits(&self, spec: &MachineSpec) -> Option<Limits> {
        self.cgroups.available().then(|| self.limits_for(spec))
    }

    fn shell_command(&self, spec: &MachineSpec) -> Vec<String> {
        self.ssh_target(spec).argv(true, 10, &[])
    }

    async fn disk_paused(&self, spec: &MachineSpec) -> Result<bool, VmmError> {
        let v = qmp_command(&qmp_path(spec), "query-status").await?;
        Ok(qmp::is_io_error(&v))
    }

    async fn resume(&self, spec: &MachineSpec) -> Result<(), VmmError> {
        qmp_command(&qmp_path(spec), "cont").await.map(|_| ())
    }
}

#[cfg(test)]
mod tests;
