//! Starting a QEMU process and ending it: spawn, wait for its QMP socket (it has opened its
//! files, chrooted and dropped privileges), and kill or wait for its exit.

use super::*;

impl Qemu {
    /// Spawn QEMU with `cmd` and wait until QMP answers: QEMU has opened its files, chrooted,
    /// switched users and entered its main loop. Dropping the child afterwards is fine: tokio
    /// reaps it when it exits.
    pub(super) async fn launch(&self, spec: &MachineSpec, mut cmd: Command) -> Result<Instance, VmmError> {
        let mut child = cmd.spawn().map_err(|e| spawn_error(e, QEMU))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(self.boot_error(spec, &format!("QEMU exited with {status}")));
            }
            if qmp_command(&qmp_path(spec), "query-status").await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(self.boot_error(spec, "QEMU did not start within 30s"));
            }
            // QEMU is up within tens of milliseconds: a restored machine waits on this.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pid: i32 = std::fs::read_to_string(pid_path(spec))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| self.boot_error(spec, "QEMU wrote no pidfile"))?;
        if child.id() != u32::try_from(pid).ok() {
            tracing::warn!(machine = %spec.name, pid, child = ?child.id(), "QEMU's pidfile names another process than the one started");
        }
        Instance::of_pid(pid).ok_or_else(|| self.boot_error(spec, "QEMU exited right after starting"))
    }

    /// Spawn QEMU for `spec` as `boot` says, `stdin` its standard input (a restore's saved
    /// state), and wait until its monitor answers.
    pub(crate) async fn spawn_vmm(
        &self,
        spec: &MachineSpec,
        boot: Boot<'_>,
        stdin: Stdio,
    ) -> Result<Instance, VmmError> {
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
        // Keys, the SSH control socket, the disk and QEMU's sockets live here: 0700, root's.
        jail::prepare(&spec.dir)?;
        self.close_master(spec).await;
        if !matches!(boot, Boot::Restore { .. }) {
            let cfg = self
                .guest_config(spec, matches!(boot, Boot::Template { .. }))
                .await?;
            write_machine_initrd(&self.assets.initramfs, &cfg, &initrd_path(spec))?;
        }
        // The previous boot's console becomes the log's older part (stream offsets go on);
        // QEMU appends (`append=on`), so the daemon can cap the file while it runs.
        let console = console_path(spec);
        crate::logring::rotate_boot(&console)
            .map_err(VmmError::io(format!("rotating {}", console.display())))?;
        let _ = std::fs::remove_file(qmp_path(spec));
        let _ = std::fs::remove_file(agent_path(spec));
        let _ = std::fs::remove_file(vsock_path(spec));
        if self.vsock && matches!(boot, Boot::Cold) {
            std::fs::write(vsock_path(spec), format!("{}\n", Self::vsock_cid(spec)))
                .map_err(VmmError::io("writing the machine's vsock CID"))?;
        }
        self.agents.forget(spec);
        let _ = std::fs::remove_file(pid_path(spec));
        crate::logring::remove(&spec.dir.join("qemu.log"));
        for f in [&initrd_path(spec), &disk, &console] {
            private_file(f)?;
        }
        // QEMU's own messages (stderr, and `-d guest_errors`) go to qemu.log.
        let log = private_file(&spec.dir.join("qemu.log"))?;
        let procs = if self.cgroups.available() {
            let limits = self.limits_for(spec);
            self.cgroups
                .create(&Self::cgroup_name(spec), limits)
                .map_err(|e| self.boot_error(spec, &format!("creating the machine's cgroup: {e}")))?
        } else {
            Vec::new()
        };
        // `sh` joins the cgroup before QEMU exists (so all of QEMU's memory and threads are
        // charged to it), `setsid` gives QEMU its own session (it outlives the daemon), and all
        // of them (and `ip netns exec`) exec, so the child's pid is QEMU's. The cgroup is joined
        // before `ip netns exec`, which remounts /sys without the cgroup file systems.
        // `-daemonize` is out: `-sandbox spawn=deny` forbids its fork.
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(JOIN_AND_EXEC).arg("sh").args(&procs).arg("--");
        if let Some(ns) = &self.netns {
            cmd.args(["ip", "netns", "exec", ns]);
        }
        cmd.arg("setsid")
            .arg(&self.binary)
            .args(self.qemu_args(spec, &disk, boot))
            .stdin(stdin)
            .stdout(log.try_clone().map_err(VmmError::io("duplicating qemu.log"))?)
            .stderr(log)
            .kill_on_drop(false);
        let res = self.launch(spec, cmd).await;
        if res.is_err() {
            // Nothing runs in it (QEMU exited or was killed): no cgroup outlives a failed start.
            tokio::time::sleep(Duration::from_millis(100)).await;
            for _ in 0..20 {
                if self.cgroups.remove(&Self::cgroup_name(spec)).is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        res
    }
}

/// The shell script that writes its pid into each `cgroup.procs` file given before `--`, then
/// execs the rest.
pub(super) const JOIN_AND_EXEC: &str =
    r#"for f; do shift; [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; done; exec "$@""#;

/// True when `ifname` exists in this process's network namespace (`/proc/self/net/dev` follows
/// the namespace even where `/sys` was not remounted).
pub(super) fn interface_exists(ifname: &str) -> bool {
    std::fs::read_to_string("/proc/self/net/dev")
        .map(|t| {
            t.lines()
                .skip(2)
                .any(|l| l.split(':').next().map(str::trim) == Some(ifname))
        })
        .unwrap_or(true)
}

/// SIGKILL `inst` (if it still runs) and wait up to 5 s for it to be gone; true when it is.
pub(super) async fn kill_vmm(inst: &Instance) -> bool {
    if inst.is_alive() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(inst.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_exit(inst, Instant::now() + Duration::from_secs(5)).await
}

/// Poll until `inst` is gone or `deadline` passes; true when it is gone.
pub(super) async fn wait_exit(inst: &Instance, deadline: Instant) -> bool {
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
