//! Pending volumes: the copies a machine clone or snapshot makes stay unlisted until the whole
//! operation is done, so a crash or a failure half-way leaves none listed; start-up settles them.

use super::Volumes;
use crate::error::Result;
use uuid::Uuid;

impl Volumes {
    /// Make the pending volumes `ids` (made by one operation) ordinary ones, all at once.
    pub fn commit(&self, ids: &[Uuid]) -> Result<()> {
        Ok(self.store.lock().commit_volumes(ids)?)
    }

    /// Remove the pending volumes `ids` a failed operation made, rows and files. One a
    /// deployed machine uses (the operation failed after its deploy) is left pending, for
    /// start-up to commit.
    pub async fn discard(&self, ids: &[Uuid]) {
        let _g = self.op.lock().await;
        for &id in ids {
            match self.store.lock().delete_pending_volume(id) {
                Ok(true) => {
                    let _ = std::fs::remove_file(self.path(id));
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(volume = %id, error = %e, "removing a failed operation's volume"),
            }
        }
    }

    /// Daemon start: a pending volume a machine past its deploy uses is committed (the clone
    /// finished but for that); any other is removed (a fresh copy, never anyone's data).
    pub(super) fn settle_pending(&self) -> Result<()> {
        let pending = self.store.lock().pending_volumes()?;
        for v in pending {
            if self.store.lock().delete_pending_volume(v.id)? {
                tracing::warn!(volume = %v.name, "removing a volume a crash left half-made (a machine clone or snapshot)");
                let _ = std::fs::remove_file(self.path(v.id));
            } else {
                tracing::warn!(volume = %v.name, "a machine clone finished without its volume committed; committing it");
                self.store.lock().commit_volumes(&[v.id])?;
            }
        }
        Ok(())
    }
}
