//! Machines paused because the host's disk is full: disks are sparse, and when the host's file
//! system runs out anyway QEMU pauses the guest on its failed write (`werror=enospc`, status
//! `io-error`). The liveness pass finds them, reports them and resumes them once `min_disk_free`
//! is free again; they keep state `running` throughout.

use super::Machines;
use crate::domain::{ByteSize, MachineState};
use crate::error::{Result, chain};
use crate::store::Machine;
use std::time::Duration;
use uuid::Uuid;

/// Every this many liveness passes, running machines' VMMs are asked whether they are paused
/// on a full disk (about every 2 s at the default 500 ms interval).
const DISK_CHECK_EVERY: u64 = 4;
/// A paused machine is resumed only with at least this much free, even with a smaller
/// `min_disk_free`, so a resume does not just pause it again at once.
const RESUME_FLOOR: ByteSize = ByteSize::mib(64);

/// Machines found paused on a full disk (in memory only: after a daemon restart the next
/// check finds them again), and the passes so far, to space the checks.
#[derive(Default)]
pub(super) struct DiskPauses {
    paused: std::sync::Mutex<std::collections::BTreeMap<Uuid, String>>,
    passes: std::sync::atomic::AtomicU64,
}

impl DiskPauses {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<Uuid, String>> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why machine `id` is paused, if it is.
    pub(super) fn reason(&self, id: Uuid) -> Option<String> {
        self.map().get(&id).cloned()
    }
}

impl Machines {
    /// Names of the running machines paused because the host's disk is full.
    pub fn disk_paused_machines(&self) -> Result<Vec<String>> {
        let paused = self.disk_pauses.map().clone();
        if paused.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .lock()
            .machines()?
            .into_iter()
            .filter(|m| m.state == MachineState::Running && paused.contains_key(&m.id))
            .map(|m| m.name.to_string())
            .collect())
    }

    /// The free space threshold for a resume, and the free space of the machines' file system.
    fn disk_free(&self) -> Option<(ByteSize, u64)> {
        let keep = self.settings.min_disk_free.max(RESUME_FLOOR);
        let free = nix::sys::statvfs::statvfs(&self.settings.machines_dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .ok()?;
        Some((keep, free))
    }

    /// One liveness pass's share: every [`DISK_CHECK_EVERY`] passes, ask running machines'
    /// VMMs whether a full disk paused them; resume the paused ones once the machines' file
    /// system has `min_disk_free` free again.
    pub(super) async fn disk_full_pass(&self) {
        let n = self
            .disk_pauses
            .passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !n.is_multiple_of(DISK_CHECK_EVERY) {
            return;
        }
        let Ok(machines) = self.store.lock().machines() else {
            return;
        };
        let running: Vec<Machine> = machines
            .into_iter()
            .filter(|m| m.state == MachineState::Running && m.instance.is_some())
            .collect();
        // Asked all at once, each bounded: a stuck VMM must not hold up the liveness pass.
        let asks = running.iter().map(|m| async move {
            let spec = self.spec_of(m).ok()?;
            let r = tokio::time::timeout(Duration::from_secs(2), self.vmm.disk_paused(&spec)).await;
            Some((m, spec, r.ok()?.ok()?))
        });
        let answers: Vec<_> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let (keep, free) = self.disk_free().unwrap_or((RESUME_FLOOR, 0));
        let dir = self.settings.machines_dir.display();
        let mut paused = Vec::new();
        {
            let mut map = self.disk_pauses.map();
            // Machines gone, stopped or dead are forgotten.
            map.retain(|id, _| running.iter().any(|m| m.id == *id));
            for (m, spec, is_paused) in &answers {
                if !*is_paused {
                    map.remove(&m.id);
                    continue;
                }
                if let std::collections::btree_map::Entry::Vacant(e) = map.entry(m.id) {
                    tracing::warn!(
                        machine = %m.name,
                        free_mib = free >> 20,
                        "machine paused: the host's disk is full (its VMM stopped it on a failed write); \
                         it resumes when {keep} is free in {dir}"
                    );
                    e.insert(format!(
                        "the host's disk is full (io-error); resumed when {keep} is free in {dir}"
                    ));
                }
                paused.push(((*m).clone(), spec.clone()));
            }
        }
        if paused.is_empty() || free < keep.as_bytes() {
            return;
        }
        for (m, spec) in paused {
            let lock = self.lock_for(m.id);
            let Ok(_g) = lock.try_lock() else { continue };
            match self.vmm.resume(&spec).await {
                Ok(()) => {
                    tracing::info!(
                        machine = %m.name,
                        free_mib = free >> 20,
                        "machine resumed: the host's disk has space again"
                    );
                    self.disk_pauses.map().remove(&m.id);
                }
                Err(e) => {
                    tracing::warn!(machine = %m.name, error = %chain(&e), "resuming the machine failed")
                }
            }
        }
    }
}
