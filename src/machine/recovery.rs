//! Recovery: re-adoption of machines at daemon start (their VMM survived, or a deploy or delete
//! was interrupted), noticing a VMM that died, and killing VMMs no machine owns.

use super::Machines;
use super::lifecycle::{CONSOLE_TAIL, POWER_DOWN};
use crate::domain::{MachineState, RestartPolicy};
use crate::error::{Result, chain};
use crate::store::Machine;
use sistemo_vmm::Instance;
use uuid::Uuid;

impl Machines {
    /// Daemon start: re-adopt machines whose VMM survived, roll back interrupted deploys, mark
    /// machines whose VMM is gone as `error` with the reason, and sweep machine directories no
    /// row owns (a crash between a row's delete and its directory's).
    pub async fn readopt(&self) -> Result<()> {
        let machines = self.store.lock().machines()?;
        let owned: std::collections::HashSet<String> = machines.iter().map(|m| m.id.to_string()).collect();
        self.kill_orphan_vmms(&machines);
        self.sweep_templates().await;
        if let Ok(rd) = std::fs::read_dir(&self.settings.machines_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !owned.contains(&name) && uuid::Uuid::try_parse(&name).is_ok() {
                    tracing::warn!(dir = %e.path().display(), "removing a machine directory no machine owns");
                    if let Err(err) = std::fs::remove_dir_all(e.path()) {
                        tracing::warn!(dir = %e.path().display(), error = %err, "could not remove it");
                    }
                }
            }
        }
        for m in machines {
            let alive = m.instance.as_ref().is_some_and(Instance::is_alive);
            match m.state {
                MachineState::Running if alive => {
                    tracing::info!(machine = %m.name, "re-adopted running machine");
                    // The bridge may have been re-created (deleted while the daemon was down):
                    // its ports, TAP or veth, are attached again.
                    let spec = self.spec_of(&m)?;
                    if let Err(e) = self.links.attach(&spec.net.host_ifname, &spec.net.bridge).await {
                        tracing::warn!(machine = %m.name, error = %chain(&e), "re-attaching its link failed");
                    }
                    if let Err(e) = self.links.shape(&spec.net.host_ifname, &spec.io).await {
                        tracing::warn!(machine = %m.name, error = %chain(&e), "re-applying its rate limits failed");
                    }
                }
                MachineState::Creating => {
                    tracing::warn!(machine = %m.name, "deploy was interrupted; rolling it back");
                    self.teardown(&m, m.instance.as_ref()).await;
                    let _ = std::fs::remove_dir_all(self.machine_dir(m.id));
                    self.store.lock().delete_machine(m.id)?;
                    crate::net::conntrack::forget_machine(m.ip).await; // its address is released
                }
                MachineState::Running => {
                    self.mark_dead(&m, "its VMM exited while the daemon was not running")
                        .await?;
                }
                MachineState::Starting => {
                    self.mark_dead(&m, "the daemon stopped while the machine was starting")
                        .await?;
                }
                MachineState::Stopping => {
                    tracing::warn!(machine = %m.name, "stop was interrupted; finishing it");
                    self.shutdown(&m, &|_| {}).await?;
                }
                MachineState::Deleting => {
                    tracing::warn!(machine = %m.name, "delete was interrupted; finishing it");
                    self.finish_delete(&m).await?;
                }
                MachineState::Stopped | MachineState::Error => {}
            }
        }
        // Links and scratch folders that no row owns now (each logged).
        self.sweep_leftovers().await;
        Ok(())
    }

    /// Notice running machines whose VMM died (killed, crashed, out of memory): their rules
    /// leave the firewall and they show state `error` with the reason. Machines busy with
    /// another operation are left for the next pass. Returns how many were found dead.
    pub async fn reap_dead(&self) -> Result<usize> {
        let running: Vec<Machine> = self
            .store
            .lock()
            .machines()?
            .into_iter()
            .filter(|m| m.state == MachineState::Running)
            .collect();
        let mut n = 0;
        for m in running {
            if m.instance.as_ref().is_some_and(Instance::is_alive) {
                continue;
            }
            let lock = self.lock_for(m.id);
            let Ok(_g) = lock.try_lock() else { continue };
            // Re-read under the lock: a stop may have finished meanwhile.
            let m = self.store.lock().machine_by_id(m.id)?;
            if m.state != MachineState::Running || m.instance.as_ref().is_some_and(Instance::is_alive) {
                continue;
            }
            let pid = m.instance.as_ref().map_or(0, |i| i.pid);
            // A guest that powered itself off ends like a stop; anything else is an error
            // with what the console said last.
            let tail = self.console_tail(m.id);
            let clean = tail.contains(POWER_DOWN);
            if clean {
                tracing::info!(machine = %m.name, "the guest powered off");
                self.shutdown(&m, &|_| {}).await?;
                if let Some(code) = self.workload_exit_of(m.id) {
                    self.stopped_by_workload(&m, code, &|_| {})?;
                    n += 1;
                    continue;
                }
            } else {
                let last = tail
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim();
                let why = if last.is_empty() {
                    format!("its VMM (pid {pid}) exited unexpectedly")
                } else {
                    format!("its VMM (pid {pid}) exited unexpectedly; the console's last line: {last}")
                };
                self.mark_dead(&m, &why).await?;
            }
            if m.restart == RestartPolicy::Always || (m.restart == RestartPolicy::OnFailure && !clean) {
                self.schedule_restart(&m);
            }
            n += 1;
        }
        // Restarts that fall due run on their own task (the daemon's `restart_due` loop): a
        // restart's boot must not delay noticing other machines.
        self.disk_full_pass().await;
        Ok(n)
    }

    /// Kill VMM processes a crash left behind: any QEMU whose command line names a file in a
    /// machine directory of ours, unless it is the recorded, live VMM of that machine and start-up
    /// keeps or stops it (`running`: re-adopted; `creating`, `stopping`, `deleting`: stopped by
    /// the rollback or the finished operation). An interrupted start's VMM is killed: the machine
    /// goes to `error`, which stops no VMM.
    fn kill_orphan_vmms(&self, machines: &[Machine]) {
        for (pid, id) in vmm_processes(&self.settings.machines_dir) {
            let id = id.as_str();
            let owner = machines.iter().find(|m| m.id.to_string() == id);
            let adopted = owner.is_some_and(|m| {
                matches!(
                    m.state,
                    MachineState::Running
                        | MachineState::Creating
                        | MachineState::Stopping
                        | MachineState::Deleting
                ) && m.instance.as_ref().is_some_and(|i| i.pid == pid && i.is_alive())
            });
            if uuid::Uuid::try_parse(id).is_ok() && !adopted && pid != std::process::id() as i32 {
                let state = owner.map_or("none", |m| m.state.as_str());
                tracing::warn!(
                    pid,
                    machine = id,
                    state,
                    "killing a VMM process no live machine owns"
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// The last few KiB of the machine's console, without terminal escapes.
    pub(super) fn console_tail(&self, id: Uuid) -> String {
        // This boot's own bytes, across the log's two parts (a rotation may just have emptied
        // the live file), never the previous boot's power-off.
        let buf =
            sistemo_vmm::logring::tail_since_boot(&self.machine_dir(id).join("console.log"), CONSOLE_TAIL);
        sistemo_vmm::qemu::printable(&String::from_utf8_lossy(&buf))
    }

    async fn mark_dead(&self, m: &Machine, why: &str) -> Result<()> {
        tracing::warn!(machine = %m.name, reason = why, "machine is down");
        let ports = self.store.lock().exposes_of(m.id)?;
        // Out of `running` first, so the rebuild after a failed removal leaves it out.
        self.store
            .lock()
            .set_state(m.id, MachineState::Error, Some(why))?;
        let ip = m.ip;
        let _ = self.firewall(move |fw| fw.remove(ip, &ports)).await;
        self.teardown(m, None).await;
        crate::net::conntrack::forget_machine(m.ip).await;
        self.store.lock().set_instance(m.id, None)?;
        Ok(())
    }
}

/// QEMU processes whose command line names a file under `root`, with the first path component
/// below `root` (a machine's ID, a template's folder).
pub(super) fn vmm_processes(root: &std::path::Path) -> Vec<(i32, String)> {
    use std::os::unix::ffi::OsStrExt;
    let root = root.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let is_vmm = cmd
            .split(|b| *b == 0)
            .next()
            .and_then(|a| std::path::Path::new(std::ffi::OsStr::from_bytes(a)).file_name())
            .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system"));
        if !is_vmm {
            continue;
        }
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if let Some(rest) = cmd.split(&format!("{root}/")).nth(1) {
            found.push((pid, rest.split('/').next().unwrap_or("").to_string()));
        }
    }
    found
}
