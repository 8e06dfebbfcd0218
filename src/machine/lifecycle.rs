//! A machine's life: deploy, boot, start, stop, restart and delete (re-adoption and dead VMMs:
//! `recovery.rs`). Each host-touching step has its undo on the failure path.

use super::{Deploy, MachineView, Machines, machine_port};
use crate::Progress;
use crate::domain::{ByteSize, MachineName, MachineState, NetworkName, WaitFor};
use crate::error::{Error, Result, chain};
use crate::store::{Machine, NewMachine, StoreError};
use sistemo_vmm::{Instance, LinkKind};
use std::time::Duration;
use uuid::Uuid;

/// How long a guest may take to power down before its VMM is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// What Linux prints last when the guest powers itself off (`poweroff`, `shutdown -h`).
pub(super) const POWER_DOWN: &str = "reboot: Power down";
/// How much of the console's end is read to tell a power-off from a crash.
pub(super) const CONSOLE_TAIL: u64 = 4096;

impl Machines {
    /// Deploy: check everything first, then create and boot, undoing every step on failure.
    pub async fn deploy(&self, d: Deploy, progress: Progress<'_>) -> Result<MachineView> {
        if d.image.trim().is_empty() && d.root_volume.is_none() {
            return Err(Error::Invalid(
                "image is empty (allowed: an image name like debian, a *.ext4 file, or an http(s) URL)"
                    .into(),
            ));
        }
        let (vcpus, memory_mib) = self.check_shape(d.vcpus, d.memory)?;
        if let Some(c) = d.cpu_limit
            && c.milli() > vcpus * 1000
        {
            return Err(Error::Invalid(format!(
                "cpu limit {c} is over the machine's {vcpus} vCPU(s) (allowed: above 0, up to {vcpus})"
            )));
        }
        if d.root_volume.is_none() {
            self.check_storage(d.storage)?;
        }
        self.check_deploy_volumes(&d)?;
        self.precheck_exposes(&d.expose)?;
        self.check_workload(&d)?;
        let new = NewMachine {
            id: Uuid::new_v4(),
            name: match d.name.clone() {
                Some(n) => n,
                None => self.name_after(d.root_volume.as_ref().map_or(&d.image, |v| v.as_str()))?,
            },
            image: match &d.root_volume {
                Some(v) => format!("volume:{v}"),
                None => d.image.clone(),
            },
            network: d.network.clone().unwrap_or_else(NetworkName::default_network),
            vcpus,
            memory_mib,
            storage_bytes: d.storage.map_or(0, ByteSize::as_bytes),
            restart: d.restart,
        };
        // The machine's lock is held before its row exists: nothing can act on a half-made
        // machine between the insert and the lock.
        let lock = self.lock_for(new.id);
        let _g = lock.lock().await;
        let m = match self.store.lock().create_machine(&new, &d.expose) {
            Ok(m) => m,
            Err(e) => {
                self.forget(new.id);
                return Err(e.into());
            }
        };
        // Its CPU cap is stored with its rate limits below; its boot sees it now.
        let m = Machine {
            cpu_limit: d.cpu_limit,
            ..m
        };
        let dir = self.machine_dir(m.id);
        let port = machine_port(&m);
        let res: Result<()> = async {
            // The port is bound to the machine's MAC and IP before its link exists.
            let p = port.clone();
            self.firewall(move |fw| fw.bind(&p)).await?;
            std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
            self.store.lock().set_io(m.id, &self.io_for(&d.io))?;
            self.store.lock().set_cpu_limit(m.id, d.cpu_limit)?;
            let mut warm = false;
            if let Some((tdir, t)) = self.template_for(&d, vcpus, memory_mib) {
                progress(&format!("starting from template {} (warm)", &t.key[..12]));
                let r = async {
                    self.disk_from_template(&m, &tdir, &dir, progress).await?;
                    self.store.lock().set_template(m.id, Some(&t.key))?;
                    self.boot_from(&m, Some(&tdir), progress).await
                }
                .await;
                match r {
                    Ok(()) => warm = true,
                    Err(e) => {
                        self.warm_failed(&m, &e, progress);
                        self.store.lock().set_template(m.id, None)?;
                        let _ = std::fs::remove_file(dir.join("disk.raw"));
                    }
                }
            }
            if !warm {
                self.make_disks(&m, &d, &dir, progress).await?;
                self.boot(&m, progress).await?;
            }
            let timeout = d.wait_timeout.unwrap_or(self.settings.ready_timeout);
            match d.wait {
                WaitFor::Agent => {}
                WaitFor::Init => {
                    let spec = self.spec_of(&m)?;
                    self.vmm.wait_init(&spec, timeout, progress).await?;
                }
                WaitFor::Ssh => {
                    progress("waiting for the guest's sshd (--wait ssh)");
                    let spec = self.spec_of(&m)?;
                    self.vmm.wait_ssh(&spec, timeout, progress).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Some(images) = &self.images {
            images.deployed();
        }
        if let Err(e) = res {
            progress("deploy failed; cleaning up");
            // A failure after boot (e.g. `--wait init`) leaves a running VMM and live rules:
            // both go, through the instance the store now holds.
            let now = self.store.lock().machine_by_id(m.id).ok();
            let inst = now.as_ref().and_then(|n| n.instance.clone());
            if now.is_some_and(|n| n.state == MachineState::Running) {
                let _ = self.store.lock().set_state(m.id, MachineState::Creating, None);
                let (ip, ports) = (m.ip, self.store.lock().exposes_of(m.id).unwrap_or_default());
                let _ = self.firewall(move |fw| fw.remove(ip, &ports)).await;
            }
            self.teardown(&m, inst.as_ref()).await;
            let _ = self.firewall(move |fw| fw.unbind(&port)).await;
            let _ = std::fs::remove_dir_all(&dir);
            let _ = self.store.lock().delete_machine(m.id);
            crate::net::conntrack::forget_machine(m.ip).await; // its address is released
            self.forget(m.id);
            return Err(e);
        }
        self.get(&m.id.to_string())
    }

    /// A deploy's rate limits: each one it sets, else the host's default (as Sistemo's).
    fn io_for(&self, asked: &super::IoLimits) -> super::IoLimits {
        let or = |a: u32, d: u32| if a > 0 { a } else { d };
        let d = &self.settings.io;
        super::IoLimits {
            download_mbps: or(asked.download_mbps, d.download_mbps),
            upload_mbps: or(asked.upload_mbps, d.upload_mbps),
            iops: or(asked.iops, d.iops),
            disk_bw_mbps: or(asked.disk_bw_mbps, d.disk_bw_mbps),
        }
    }

    /// A name for a machine deployed without one, after its image as Sistemo does: `debian`,
    /// then `debian-2`, `debian-3`…; an image path or URL gives its file name's stem.
    fn name_after(&self, image: &str) -> Result<MachineName> {
        let file = image.rsplit('/').next().unwrap_or(image);
        // An OCI reference's tag or digest is not part of the name (`web:1` → `web`).
        let file = file.split(['@', ':']).next().unwrap_or(file);
        let stem = file.split('.').next().unwrap_or(file).to_ascii_lowercase();
        let mut base: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        base.truncate(50);
        let base = base.trim_matches('-').to_string();
        let st = self.store.lock();
        (1..1000)
            .map(|i| {
                if i == 1 {
                    base.clone()
                } else {
                    format!("{base}-{i}")
                }
            })
            .filter_map(|n| n.parse::<MachineName>().ok())
            .find(|n| st.machine(n.as_str()).is_err())
            .map_or_else(|| Ok(MachineName::generate()), Ok)
    }

    /// Forget what is kept in memory about machine `id` (its lock, a restart it waits for):
    /// it is gone.
    fn forget(&self, id: Uuid) {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// A machine's vCPUs and memory (MiB), defaults applied, checked against the host.
    pub(super) fn check_shape(&self, vcpus: Option<u32>, memory: Option<ByteSize>) -> Result<(u32, u64)> {
        let vcpus = vcpus.unwrap_or(1);
        let max = self.settings.max_vcpus;
        if vcpus == 0 || vcpus > max {
            return Err(Error::Invalid(format!(
                "vcpus {vcpus} is out of range (allowed: 1-{max})"
            )));
        }
        let mem = memory.unwrap_or(ByteSize::mib(512));
        let host = self.settings.host_memory;
        if mem < ByteSize::mib(64) || mem > host {
            return Err(Error::Invalid(format!(
                "memory {mem} is out of range (allowed: 64M to {}M, the host's memory or max_memory)",
                host.as_mib()
            )));
        }
        Ok((vcpus, mem.as_mib()))
    }

    /// Disks are sparse, so a guest can fill what it was given: refuse a size over
    /// `max_storage`, or one that, written in full, would leave the host less than
    /// `min_disk_free`.
    fn check_storage(&self, storage: Option<ByteSize>) -> Result<()> {
        if self.images.is_none() {
            return Ok(());
        }
        let want = storage.unwrap_or(crate::images::DEFAULT_STORAGE);
        let max = self.settings.max_storage;
        if want > max {
            return Err(Error::Invalid(format!(
                "storage {want} is over the host's limit (allowed: up to {max}, the max_storage setting)"
            )));
        }
        let dir = &self.settings.machines_dir;
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .map_err(|e| Error::io(format!("reading the free space of {}", dir.display()))(e.into()))?;
        let keep = self.settings.min_disk_free.as_bytes();
        if free < want.as_bytes().saturating_add(keep) {
            return Err(Error::NoSpace(format!(
                "storage {want} does not fit: {} free in {}, and {} must stay free (min_disk_free); allowed: at most {}",
                ByteSize::bytes(free / (1 << 20) * (1 << 20)),
                dir.display(),
                self.settings.min_disk_free,
                ByteSize::mib(free.saturating_sub(keep) >> 20)
            )));
        }
        Ok(())
    }

    /// Bring a machine's link, VMM and rules up, or undo what was done. The caller holds its
    /// lock; on success the machine is `running`, on failure it has no VMM, link or rules.
    async fn boot(&self, m: &Machine, progress: Progress<'_>) -> Result<()> {
        self.boot_from(m, None, progress).await
    }

    /// [`Machines::boot`], cold, or restored from the template in `template`: then its TAP
    /// joins the bridge only once the guest has taken its own identity.
    pub(super) async fn boot_from(
        &self,
        m: &Machine,
        template: Option<&std::path::Path>,
        progress: Progress<'_>,
    ) -> Result<()> {
        let spec = self.spec_of(m)?;
        let res: Result<Instance> = async {
            // A reused address may have a stale neighbour entry pointing at the old MAC.
            self.links.flush_neighbour(m.ip).await?;
            let warm = match template {
                Some(t) => Some((
                    t,
                    self.vmm.templates().ok_or_else(|| {
                        Error::Invalid(format!("the {} backend has no templates", self.vmm.name()))
                    })?,
                )),
                None => None,
            };
            match (self.vmm.link_kind(), warm) {
                (LinkKind::Tap, Some(_)) => {
                    self.links
                        .create_detached_tap(&spec.net.host_ifname, self.vmm.link_owner(&spec))
                        .await?
                }
                (LinkKind::Tap, None) => {
                    self.links
                        .create_tap_owned(
                            &spec.net.host_ifname,
                            &spec.net.bridge,
                            self.vmm.link_owner(&spec),
                        )
                        .await?
                }
                (LinkKind::Veth, _) => {}
            }
            progress(&format!("starting {} on {}", m.name, self.vmm.name()));
            // Volume files are not replaced (resize) while the VMM opens them.
            let t0 = std::time::Instant::now();
            let inst = {
                let vl = self.volumes.op_lock();
                let _v = vl.lock().await;
                match warm {
                    Some((t, w)) => w.restore(&spec, t).await?,
                    None => self.vmm.start(&spec).await?,
                }
            };
            self.store.lock().set_instance(m.id, Some(&inst))?;
            if let Some((_, w)) = warm {
                let restored = t0.elapsed();
                let steps = w.set_identity(&spec, self.settings.ready_timeout).await?;
                progress(&format!(
                    "restored in {} ms, own identity in {} ms ({})",
                    restored.as_millis(),
                    (t0.elapsed() - restored).as_millis(),
                    steps.join(", ")
                ));
            }
            if self.vmm.link_kind() == LinkKind::Veth || warm.is_some() {
                self.links.attach(&spec.net.host_ifname, &spec.net.bridge).await?;
            }
            self.links.shape(&spec.net.host_ifname, &spec.io).await?;
            if warm.is_none() {
                self.vmm
                    .wait_ready(&spec, &inst, self.settings.ready_timeout, progress)
                    .await?;
            }
            Ok(inst)
        }
        .await;
        let inst = match res {
            Ok(i) => i,
            Err(e) => {
                let exited = self.workload_exit_of(m.id);
                let inst = self
                    .store
                    .lock()
                    .machine_by_id(m.id)
                    .ok()
                    .and_then(|m| m.instance);
                self.teardown(m, inst.as_ref()).await;
                let _ = self.store.lock().set_instance(m.id, None);
                if let Some(code) = exited {
                    return self.stopped_by_workload(m, code, progress);
                }
                return Err(e);
            }
        };
        // Rules go in last: the machine is up, so the state flip and the rules come together.
        let ports = {
            let st = self.store.lock();
            st.set_state(m.id, MachineState::Running, None)?;
            st.exposes_of(m.id)?
        };
        let ip = m.ip;
        if let Err(e) = self.firewall(move |fw| fw.add(ip, &ports)).await {
            let _ = self.store.lock().set_state(m.id, MachineState::Stopped, None);
            self.teardown(m, Some(&inst)).await;
            let _ = self.store.lock().set_instance(m.id, None);
            return Err(e.into());
        }
        progress(&format!("{} is running at {}", m.name, m.ip));
        Ok(())
    }

    /// Start a stopped (or failed) machine: link, VMM, then its rules return. A boot failure
    /// leaves it in state `error` with the reason.
    pub async fn start(&self, name: &str, progress: Progress<'_>) -> Result<MachineView> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        self.start_locked(id, progress).await?;
        self.get(&id.to_string())
    }

    async fn start_locked(&self, id: Uuid, progress: Progress<'_>) -> Result<()> {
        let m = self.store.lock().machine_by_id(id)?;
        if m.state != MachineState::Running {
            // A host process may have taken a reserved port while the machine was stopped;
            // DNAT would silently shadow it.
            let ports = self.store.lock().exposes_of(id)?;
            self.precheck_exposes(&ports)
                .map_err(|e| Error::Conflict(format!("cannot start {}: {e}", m.name)))?;
        }
        self.store
            .lock()
            .transition(
                id,
                &[MachineState::Stopped, MachineState::Error],
                MachineState::Starting,
            )
            .map_err(|e| match e {
                StoreError::WrongState { name, actual, .. } => {
                    Error::Conflict(format!("machine {name} is already {actual}"))
                }
                e => e.into(),
            })?;
        if let Err(e) = self.boot(&m, progress).await {
            let _ = self
                .store
                .lock()
                .set_state(id, MachineState::Error, Some(&chain(&e)));
            return Err(e);
        }
        Ok(())
    }

    /// Stop a running machine: its rules leave the firewall (rows stay), then the VMM stops
    /// gracefully.
    pub async fn stop(&self, name: &str, progress: Progress<'_>) -> Result<MachineView> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        self.stop_locked(id, progress).await?;
        self.get(&id.to_string())
    }

    pub(super) async fn stop_locked(&self, id: Uuid, progress: Progress<'_>) -> Result<()> {
        self.store
            .lock()
            .transition(id, &[MachineState::Running], MachineState::Stopping)
            .map_err(|e| match e {
                StoreError::WrongState { name, actual, .. } => {
                    Error::Conflict(format!("machine {name} is {actual}, not running"))
                }
                e => e.into(),
            })?;
        let m = self.store.lock().machine_by_id(id)?;
        self.shutdown(&m, progress).await
    }

    /// Take a running machine's rules out, stop its VMM and mark it stopped.
    pub(super) async fn shutdown(&self, m: &Machine, progress: Progress<'_>) -> Result<()> {
        let ports = self.store.lock().exposes_of(m.id)?;
        // Absent elements (e.g. after a flush) are fine: the next rebuild reflects the store.
        let ip = m.ip;
        let _ = self.firewall(move |fw| fw.remove(ip, &ports)).await;
        progress(&format!("stopping {}", m.name));
        self.teardown(m, m.instance.as_ref()).await;
        crate::net::conntrack::forget_machine(m.ip).await;
        let st = self.store.lock();
        st.set_instance(m.id, None)?;
        st.set_state(m.id, MachineState::Stopped, None)?;
        Ok(())
    }

    /// Restart: stop (when running) then start, under one lock so nothing slips in between;
    /// IP and ports are kept.
    pub async fn restart(&self, name: &str, progress: Progress<'_>) -> Result<MachineView> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        if self.store.lock().machine_by_id(id)?.state == MachineState::Running {
            self.stop_locked(id, progress).await?;
        }
        self.start_locked(id, progress).await?;
        self.get(&id.to_string())
    }

    /// Delete: the machine leaves `running` first (state `deleting`, so no rebuild brings its
    /// rules back), then its rules, VMM, link, port binding, files, IP lease and rows go.
    pub async fn delete(&self, name: &str, progress: Progress<'_>) -> Result<()> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        self.delete_locked(id, progress).await
    }

    /// Delete machine `id`, whose lock the caller holds. Its volumes are only detached.
    pub(super) async fn delete_locked(&self, id: Uuid, progress: Progress<'_>) -> Result<()> {
        let m = self.store.lock().machine_by_id(id)?;
        self.store.lock().set_state(id, MachineState::Deleting, None)?;
        if m.state == MachineState::Running {
            let ports = self.store.lock().exposes_of(id)?;
            let ip = m.ip;
            self.firewall(move |fw| fw.remove(ip, &ports)).await?;
            progress(&format!("stopping {}", m.name));
        }
        self.finish_delete(&m).await?;
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        Ok(())
    }

    /// The rest of a delete once the machine is `deleting` and its rules are out.
    pub(super) async fn finish_delete(&self, m: &Machine) -> Result<()> {
        self.teardown(m, m.instance.as_ref()).await;
        let port = machine_port(m);
        self.firewall(move |fw| fw.unbind(&port)).await?;
        let dir = self.machine_dir(m.id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(Error::io(format!("removing {}", dir.display()))(e));
        }
        self.store.lock().delete_machine(m.id)?;
        crate::net::conntrack::forget_machine(m.ip).await; // its address is released
        Ok(())
    }

    /// Stop the VMM if given, and remove the machine's link and backend leftovers.
    pub(super) async fn teardown(&self, m: &Machine, inst: Option<&Instance>) {
        let Ok(spec) = self.spec_of(m) else { return };
        if let Some(i) = inst
            && let Err(e) = self.vmm.stop(&spec, i, STOP_TIMEOUT).await
        {
            tracing::warn!(machine = %m.name, error = %chain(&e), "stopping the VMM failed");
        }
        if let Err(e) = self.vmm.cleanup(&spec).await {
            tracing::warn!(machine = %m.name, error = %chain(&e), "cleaning up after the VMM failed");
        }
        if let Err(e) = self.links.delete(&spec.net.host_ifname).await {
            tracing::warn!(machine = %m.name, error = %chain(&e), "deleting the machine's link failed");
        }
        if let Err(e) = self.links.unshape(&spec.net.host_ifname).await {
            tracing::warn!(machine = %m.name, error = %chain(&e), "deleting its upload shaper failed");
        }
    }
}
