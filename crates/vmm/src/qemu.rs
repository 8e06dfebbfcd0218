//! The QEMU backend: real VMs on `-M microvm` (virtio-mmio described by ACPI), KVM when it can
//! run the guest and TCG otherwise; guests are reached over SSH with pinned host keys.

use crate::image::{BootAssets, GuestConfig, format_mac, write_machine_initrd};
use crate::proc::{failed, spawn_error};
use crate::ssh::{
    ClientKey, SshTarget, ensure_client_key, ensure_host_key, host_alias, is_ssh_failure, remote_command,
};
use crate::{ExecOutput, Hypervisor, Instance, LinkKind, MachineSpec, VmmError};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const QEMU: &str = "qemu-system-x86_64";

/// How guest instructions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation (about 5x slower to boot; always works).
    Tcg,
}

/// Choose the accelerator: `SISTEMO_ACCEL=kvm|tcg` wins; else KVM when `/dev/kvm` opens and
/// the host's KVM is not `kvm_pvm` (which only runs PVM-patched guest kernels), else TCG.
pub fn detect_accel() -> Accel {
    match std::env::var("SISTEMO_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm_opens && !Path::new("/sys/module/kvm_pvm").exists() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Why [`detect_accel`] chooses what it chooses, in one line for `doctor`.
pub fn accel_reason() -> String {
    if let Ok(v) = std::env::var("SISTEMO_ACCEL")
        && (v == "kvm" || v == "tcg")
    {
        return format!("forced by SISTEMO_ACCEL={v}");
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(e) => format!("TCG (software emulation): /dev/kvm unusable: {e}"),
        Ok(_) if Path::new("/sys/module/kvm_pvm").exists() => {
            "TCG (software emulation): the host's KVM is kvm_pvm, which runs only PVM guest kernels".into()
        }
        Ok(_) => "KVM (hardware virtualisation)".into(),
    }
}

/// The host TSC frequency in kHz, from `/proc/cpuinfo` (`cpu MHz`).
pub fn host_tsc_khz() -> Option<u64> {
    parse_cpu_mhz_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// `cpu MHz : 2100.000` → 2100000.
pub fn parse_cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
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
}

/// Files of a machine in its folder.
fn qmp_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("qmp.sock")
}
fn pid_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("qemu.pid")
}
fn console_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("console.log")
}
fn ctl_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("ssh.ctl")
}
fn initrd_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("initrd.img")
}

impl Qemu {
    /// A backend booting `assets`, with the daemon's SSH client key in `data_dir/ssh`
    /// (created if missing). Fails with [`VmmError::Missing`] when QEMU is not installed.
    pub async fn new(data_dir: &Path, assets: BootAssets) -> Result<Qemu, VmmError> {
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
        Ok(Qemu {
            binary: PathBuf::from(QEMU),
            assets,
            client,
            accel: detect_accel(),
            tsc_khz: host_tsc_khz(),
            netns: None,
        })
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

    /// The daemon's SSH client key (its public line is always authorized in guests).
    pub fn client_key(&self) -> &ClientKey {
        &self.client
    }

    /// How this backend reaches a machine over SSH.
    pub fn ssh_target(&self, spec: &MachineSpec) -> SshTarget {
        SshTarget {
            ip: spec.net.ip,
            alias: host_alias(&spec.id),
            identity: self.client.private.clone(),
            known_hosts: spec.dir.join("known_hosts"),
            netns: self.netns.clone(),
            control_path: Some(ctl_path(spec)),
        }
    }

    /// The non-interactive `ssh` argv running `cmd` like [`Hypervisor::exec`] does, for callers
    /// that stream the output themselves. Exit status 255 with an `ssh:` message on stderr is a
    /// connection failure, not the command's.
    pub fn exec_argv(&self, spec: &MachineSpec, cmd: &str) -> Vec<String> {
        self.ssh_target(spec).argv(false, 5, &[remote_command(cmd)])
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut c = String::from("console=ttyS0 quiet panic=-1 pci=off i8042.noaux i8042.nokbd");
        // Trust the CPU's RDRAND (see `qemu_args`) to seed the RNG, and skip the crypto
        // self-tests (about 0.3 s of a TCG boot).
        c.push_str(" random.trust_cpu=on cryptomgr.notests");
        if self.accel == Accel::Tcg
            && let Some(khz) = self.tsc_khz
        {
            // Without HPET/PM timer, TSC calibration against the PIT fails at random under TCG
            // and the boot hangs; give the kernel the frequency.
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if self.accel == Accel::Tcg {
            // Under TCG the emulated TSC follows the host clock, while jiffies lag whenever the
            // host is busy: the clocksource watchdog then condemns the TSC and the guest falls
            // back to 4 ms jiffies timekeeping. Trust the TSC.
            c.push_str(" tsc=reliable");
            // The emulated CPU advertises no hardware fixes, so the guest would enable page-table
            // isolation and friends; under TCG the guest cannot speculate across its own
            // privilege levels, and PTI's address-space switches are costly for the soft MMU.
            c.push_str(" mitigations=off");
        }
        if let Ok(extra) = std::env::var("SISTEMO_GUEST_CMDLINE_EXTRA") {
            c.push(' ');
            c.push_str(extra.trim());
        }
        c
    }

    /// QEMU's argument vector for `spec` (without the program).
    pub fn qemu_args(&self, spec: &MachineSpec, disk: &Path) -> Vec<String> {
        let p = |x: PathBuf| x.display().to_string();
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("sistemo-{}", spec.name),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-M".into(),
            "microvm,acpi=on".into(),
            // Modern (virtio 1.x) devices on virtio-mmio, as QEMU's microvm docs recommend.
            "-global".into(),
            "virtio-mmio.force-legacy=false".into(),
        ];
        match self.accel {
            Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
            // QEMU's default TCG CPU plus RDRAND (backed by the host's getrandom): the guest's
            // RNG is ready at once instead of after seconds of jitter entropy, and sshd no
            // longer blocks on getrandom() during the first connection.
            Accel::Tcg => a.extend(["-accel", "tcg", "-cpu", "qemu64,+rdrand"].map(String::from)),
        }
        a.extend([
            "-smp".into(),
            spec.vcpus.max(1).to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib.max(128)),
            "-kernel".into(),
            p(self.assets.kernel.clone()),
            "-initrd".into(),
            p(initrd_path(spec)),
            "-append".into(),
            self.kernel_cmdline(),
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=d0,cache=writeback",
                escape_opt(&disk.display().to_string())
            ),
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
            "-netdev".into(),
            format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                spec.net.host_ifname
            ),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={}", format_mac(&spec.net.mac)),
            "-chardev".into(),
            format!("file,id=con0,path={}", escape_opt(&p(console_path(spec)))),
            "-serial".into(),
            "chardev:con0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", escape_opt(&p(qmp_path(spec)))),
            // With a log file QEMU keeps its stderr there after daemonizing (else /dev/null):
            // its own errors and the guest's invalid device accesses.
            "-D".into(),
            p(spec.dir.join("qemu.log")),
            "-d".into(),
            "guest_errors".into(),
            "-pidfile".into(),
            p(pid_path(spec)),
            "-daemonize".into(),
        ]);
        a
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    async fn guest_config(&self, spec: &MachineSpec) -> Result<GuestConfig, VmmError> {
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
        })
    }

    /// Close the shared SSH connection to a machine (the next exec opens a new one).
    pub async fn disconnect(&self, spec: &MachineSpec) {
        self.close_master(spec).await
    }

    /// End a connection-sharing master left from an earlier boot (its TCP session is dead).
    async fn close_master(&self, spec: &MachineSpec) {
        let ctl = ctl_path(spec);
        if !ctl.exists() {
            return;
        }
        let mut argv = self.ssh_target(spec).argv(false, 1, &[]);
        let host = argv.pop().expect("destination");
        argv.extend(["-O".to_string(), "exit".to_string(), host]);
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status(),
        )
        .await;
        let _ = std::fs::remove_file(&ctl);
    }

    fn boot_error(&self, spec: &MachineSpec, reason: &str) -> VmmError {
        let mut tail = console_diagnosis(spec);
        let qlog = std::fs::read(spec.dir.join("qemu.log")).unwrap_or_default();
        let qlog = String::from_utf8_lossy(&qlog);
        let qlines: Vec<&str> = qlog.lines().filter(|l| !l.trim().is_empty()).collect();
        if !qlines.is_empty() {
            tail.push_str("\nqemu.log:\n");
            tail.push_str(&qlines[qlines.len().saturating_sub(5)..].join("\n"));
        }
        VmmError::Boot {
            name: spec.name.clone(),
            reason: if tail.is_empty() {
                reason.to_string()
            } else {
                format!("{reason}; console:\n{tail}")
            },
        }
    }

    async fn ssh_run(
        &self,
        spec: &MachineSpec,
        remote: &str,
        connect_s: u32,
        timeout: Duration,
    ) -> Result<ExecOutput, VmmError> {
        let argv = self
            .ssh_target(spec)
            .argv(false, connect_s, &[remote.to_string()]);
        crate::run_exec(&spec.name, &argv, timeout, |e| spawn_error(e, &argv[0])).await
    }
}

/// True when `ifname` exists in this process's network namespace (`/proc/self/net/dev` follows
/// the namespace even where `/sys` was not remounted).
pub fn interface_exists(ifname: &str) -> bool {
    std::fs::read_to_string("/proc/self/net/dev")
        .map(|t| {
            t.lines()
                .skip(2)
                .any(|l| l.split(':').next().map(str::trim) == Some(ifname))
        })
        .unwrap_or(true)
}

/// Escape a value for a QEMU option list (commas are doubled).
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// The last `n` lines of a machine's console log.
pub fn console_tail(spec: &MachineSpec, n: usize) -> String {
    let text = std::fs::read(console_path(spec)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text).replace('\r', "");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What the console says about a failed boot: our init's messages and the kernel's panic line
/// (a stack trace would push them out of a plain tail), then the last lines.
pub fn console_diagnosis(spec: &MachineSpec) -> String {
    let text = std::fs::read(console_path(spec)).unwrap_or_default();
    let text = String::from_utf8_lossy(&text).replace('\r', "");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("sistemo-init:") || l.contains("Kernel panic") || l.contains("FATAL"))
        .copied()
        .collect();
    out.truncate(8);
    for l in &lines[lines.len().saturating_sub(6)..] {
        if !out.contains(l) {
            out.push(l);
        }
    }
    out.join("\n")
}

/// Send one QMP command (after the capabilities handshake) and wait for its reply.
pub async fn qmp_command(socket: &Path, command: &str) -> Result<serde_json::Value, VmmError> {
    let ctx = || format!("QMP {command} on {}", socket.display());
    let fut = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(VmmError::io(ctx()))?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let reply = async |lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>| {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .map_err(VmmError::io(ctx()))?
                    .ok_or_else(|| VmmError::io(ctx())(std::io::Error::other("QMP closed")))?;
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v.get("return").is_some() || v.get("QMP").is_some() {
                    return Ok(v);
                }
                if let Some(e) = v.get("error") {
                    return Err(VmmError::io(ctx())(std::io::Error::other(e.to_string())));
                }
            }
        };
        reply(&mut lines).await?; // greeting
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(VmmError::io(ctx()))?;
        reply(&mut lines).await?;
        w.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .await
            .map_err(VmmError::io(ctx()))?;
        reply(&mut lines).await
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| VmmError::io(ctx())(std::io::Error::other("timed out")))?
}

/// Poll until `inst` is gone or `deadline` passes; true when it is gone.
async fn wait_exit(inst: &Instance, deadline: Instant) -> bool {
    loop {
        if !inst.is_alive() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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

    async fn start(&self, spec: &MachineSpec) -> Result<Instance, VmmError> {
        let disk = spec.disk.clone().ok_or_else(|| VmmError::Boot {
            name: spec.name.clone(),
            reason: "a QEMU machine needs a root disk".into(),
        })?;
        if !disk.exists() {
            return Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: format!("root disk {} does not exist", disk.display()),
            });
        }
        // Without the network layer's TAP, QEMU would create a fresh one off the bridge and the
        // guest would boot unreachable.
        if self.netns.is_none() && !interface_exists(&spec.net.host_ifname) {
            return Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: format!(
                    "TAP device {} does not exist (the network layer creates it)",
                    spec.net.host_ifname
                ),
            });
        }
        std::fs::create_dir_all(&spec.dir)
            .map_err(VmmError::io(format!("creating {}", spec.dir.display())))?;
        // Never two VMMs for one machine (QEMU's image lock also refuses a second writer).
        if let Ok(pid) = std::fs::read_to_string(pid_path(spec))
            && let Ok(pid) = pid.trim().parse::<i32>()
            && let Some(inst) = Instance::of_pid(pid)
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&pid_path(spec).display().to_string()))
        {
            return Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: format!("already running as pid {}", inst.pid),
            });
        }
        {
            use std::os::unix::fs::PermissionsExt;
            // Keys and the SSH control socket live here.
            let _ = std::fs::set_permissions(&spec.dir, std::fs::Permissions::from_mode(0o700));
        }
        self.close_master(spec).await;
        let cfg = self.guest_config(spec).await?;
        write_machine_initrd(&self.assets.initramfs, &cfg, &initrd_path(spec))?;
        let console = console_path(spec);
        if console.exists() {
            let _ = std::fs::rename(&console, spec.dir.join("console.log.1"));
        }
        let _ = std::fs::remove_file(qmp_path(spec));
        let _ = std::fs::remove_file(pid_path(spec));
        let _ = std::fs::remove_file(spec.dir.join("qemu.log"));
        let out = self
            .command(&self.binary.display().to_string())
            .args(self.qemu_args(spec, &disk))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .output();
        // With -daemonize the parent returns once the VM is set up.
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .map_err(|_| self.boot_error(spec, "QEMU did not daemonize within 30s"))?
            .map_err(|e| spawn_error(e, QEMU))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(self.boot_error(spec, &format!("QEMU exited with {}: {err}", out.status)));
        }
        let pid: i32 = std::fs::read_to_string(pid_path(spec))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| self.boot_error(spec, "QEMU wrote no pidfile"))?;
        Instance::of_pid(pid).ok_or_else(|| self.boot_error(spec, "QEMU exited right after starting"))
    }

    async fn wait_ready(
        &self,
        spec: &MachineSpec,
        inst: &Instance,
        timeout: Duration,
        progress: &(dyn for<'s> Fn(&'s str) + Send + Sync),
    ) -> Result<(), VmmError> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        progress(&format!("booting ({})", self.name()));
        let mut switched = false;
        let mut last_why = String::new();
        loop {
            if !inst.is_alive() {
                return Err(self.boot_error(spec, "the VM stopped while booting"));
            }
            if !switched
                && std::fs::read(console_path(spec))
                    .is_ok_and(|c| c.windows(15).any(|w| w == b"switching to th"))
            {
                switched = true;
                progress(&format!(
                    "kernel up after {:.1}s, starting the image's init",
                    t0.elapsed().as_secs_f64()
                ));
            }
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
                progress(&format!("ready after {:.1}s", t0.elapsed().as_secs_f64()));
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
                if std::env::var_os("SISTEMO_DEBUG_BOOT").is_some() {
                    progress(&format!("{:.1}s ssh: {why}", t0.elapsed().as_secs_f64()));
                }
                last_why = why;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(&self, spec: &MachineSpec, inst: &Instance, timeout: Duration) -> Result<(), VmmError> {
        if !inst.is_alive() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        // Ask systemd over SSH (the images have no logind/acpid to act on the power button);
        // the ACPI power button is the fallback for guests SSH cannot reach.
        let asked = self
            .ssh_run(spec, "systemctl poweroff --no-block", 2, Duration::from_secs(5))
            .await
            .is_ok_and(|o| o.code == 0);
        if !asked {
            let _ = qmp_command(&qmp_path(spec), "system_powerdown").await;
        }
        if wait_exit(inst, deadline).await {
            return Ok(());
        }
        tracing::warn!(machine = %spec.name, "guest did not power off in time; killing the VMM");
        if inst.is_alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(inst.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if wait_exit(inst, Instant::now() + Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(VmmError::Boot {
                name: spec.name.clone(),
                reason: format!("VMM pid {} survived SIGKILL", inst.pid),
            })
        }
    }

    async fn cleanup(&self, spec: &MachineSpec) -> Result<(), VmmError> {
        self.close_master(spec).await;
        for p in [qmp_path(spec), pid_path(spec), initrd_path(spec), ctl_path(spec)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmmError::io(format!("removing {}", p.display()))(e)),
            }
        }
        Ok(())
    }

    async fn exec(&self, spec: &MachineSpec, cmd: &str, timeout: Duration) -> Result<ExecOutput, VmmError> {
        let out = self.ssh_run(spec, &remote_command(cmd), 5, timeout).await?;
        if is_ssh_failure(out.code, &out.stderr) {
            return Err(VmmError::Exec {
                name: spec.name.clone(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out)
    }

    fn shell_command(&self, spec: &MachineSpec) -> Vec<String> {
        self.ssh_target(spec).argv(true, 10, &[])
    }

    fn exec_argv(&self, spec: &MachineSpec, cmd: &str) -> Vec<String> {
        Qemu::exec_argv(self, spec, cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_mhz() {
        assert_eq!(
            parse_cpu_mhz_khz("processor\t: 0\ncpu MHz\t\t: 2100.000\n"),
            Some(2_100_000)
        );
        assert_eq!(parse_cpu_mhz_khz("nothing"), None);
    }

    fn dummy(accel: Accel) -> (Qemu, MachineSpec) {
        let q = Qemu {
            binary: QEMU.into(),
            assets: BootAssets {
                kernel: "/k/vmlinux".into(),
                initramfs: "/k/initramfs.img".into(),
                kernel_version: "6.1".into(),
            },
            client: ClientKey {
                private: "/d/ssh/id_ed25519".into(),
                public: "ssh-ed25519 AAAA x".into(),
            },
            accel,
            tsc_khz: Some(2_100_000),
            netns: None,
        };
        let spec = MachineSpec {
            id: uuid::Uuid::nil(),
            name: "web".into(),
            vcpus: 1,
            memory_mib: 512,
            dir: "/m/web".into(),
            disk: Some("/m/web/disk.raw".into()),
            net: crate::NetAttachment {
                host_ifname: "tap-web".into(),
                bridge: "br0".into(),
                mac: [0x52, 0x54, 0, 0, 0, 2],
                ip: "10.200.0.2".parse().unwrap(),
                prefix: 24,
                gateway: "10.200.0.1".parse().unwrap(),
                dns: vec![],
            },
            ssh_pubkey: None,
        };
        (q, spec)
    }

    #[test]
    fn tcg_gets_the_tsc_workarounds_and_kvm_does_not() {
        let (q, _) = dummy(Accel::Tcg);
        let c = q.kernel_cmdline();
        assert!(
            c.contains("tsc_early_khz=2100000") && c.contains("tsc=reliable"),
            "{c}"
        );
        let (q, _) = dummy(Accel::Kvm);
        assert!(!q.kernel_cmdline().contains("tsc"));
    }

    #[test]
    fn qemu_argv_wires_disk_tap_console_and_qmp() {
        let (q, spec) = dummy(Accel::Tcg);
        let a = q.qemu_args(&spec, Path::new("/m/web/disk.raw")).join(" ");
        for want in [
            "-M microvm,acpi=on",
            "-accel tcg -cpu qemu64,+rdrand",
            "-kernel /k/vmlinux",
            "-initrd /m/web/initrd.img",
            "file=/m/web/disk.raw,format=raw,if=none,id=d0",
            "virtio-blk-device,drive=d0",
            "tap,id=n0,ifname=tap-web,script=no,downscript=no",
            "virtio-net-device,netdev=n0,mac=52:54:00:00:00:02",
            "path=/m/web/console.log",
            "unix:/m/web/qmp.sock,server=on,wait=off",
            "-pidfile /m/web/qemu.pid -daemonize",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
    }

    #[test]
    fn loopback_exists() {
        assert!(interface_exists("lo"));
        assert!(!interface_exists("sistemo-no-such-if"));
    }

    #[test]
    fn qemu_options_escape_commas() {
        assert_eq!(escape_opt("/a,b"), "/a,,b");
    }
}
