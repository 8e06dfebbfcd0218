//! Volumes: [`Volumes`] owns the volume and snapshot files in `data_dir/volumes` (create,
//! resize, snapshot, clone, delete) and their rows. Crash-safe: a file is made under a `.part`
//! name, renamed into place, and only then given its row (a pending one while a machine clone or
//! snapshot is not done); start-up removes what a crash left.

mod files;
mod pending;

pub use files::CopyMethod;

use crate::Progress;
use crate::domain::{ByteSize, VolumeName};
use crate::error::{Error, Result};
use crate::store::{Attachment, SharedStore, Volume, VolumeFormat, VolumeKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Smallest ext4 volume (mkfs.ext4 needs room for its metadata and journal).
const MIN_EXT4: ByteSize = ByteSize::mib(16);

/// A volume with the machines it is attached to.
#[derive(Debug, Clone)]
pub struct VolumeView {
    /// The volume.
    pub volume: Volume,
    /// Its attachments.
    pub attachments: Vec<Attachment>,
    /// Its file.
    pub path: PathBuf,
}

/// Where volumes live and the host's storage limits they are checked against.
#[derive(Debug, Clone)]
pub struct VolumeSettings {
    /// `data_dir/volumes`.
    pub dir: PathBuf,
    /// Largest volume.
    pub max_storage: ByteSize,
    /// Free space the data dir keeps after a new volume is counted in full.
    pub min_disk_free: ByteSize,
    /// Tests only: pause this long at each crash-relevant point of an operation.
    pub test_pause: Option<Duration>,
}

/// The volume service.
pub struct Volumes {
    store: Arc<SharedStore>,
    settings: VolumeSettings,
    /// Serialises changes to volume files, and a VMM's start against them (it opens the files).
    op: Arc<tokio::sync::Mutex<()>>,
    copy: std::sync::OnceLock<CopyMethod>,
}

impl Volumes {
    /// The service over `store`.
    pub fn new(store: Arc<SharedStore>, settings: VolumeSettings) -> Volumes {
        Volumes {
            store,
            settings,
            op: Arc::default(),
            copy: std::sync::OnceLock::new(),
        }
    }

    /// The lock a VMM's start takes while it opens volume files.
    pub fn op_lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.op.clone()
    }

    /// A volume's file.
    pub fn path(&self, id: Uuid) -> PathBuf {
        self.settings.dir.join(format!("{id}.raw"))
    }

    fn part(&self, id: Uuid) -> PathBuf {
        self.settings.dir.join(format!("{id}.part"))
    }

    /// How copies are made in the volumes' directory (probed once).
    pub fn copy_method(&self) -> CopyMethod {
        *self.copy.get_or_init(|| {
            let _ = self.ensure_dir();
            files::probe(&self.settings.dir)
        })
    }

    fn ensure_dir(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let d = &self.settings.dir;
        std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("setting the mode of {}", d.display())))
    }

    /// Daemon start: the directory exists (0700); pending volumes are committed when the
    /// machine deploy that made them finished, and removed otherwise; files a crash left
    /// half-made (`.part`, or a file whose row was never written) are removed; a size a crash
    /// left unrecorded is taken from the file.
    pub fn startup(&self) -> Result<()> {
        self.ensure_dir()?;
        self.settle_pending()?;
        let vols = self.store.lock().volumes()?;
        let rd = std::fs::read_dir(&self.settings.dir)
            .map_err(Error::io(format!("listing {}", self.settings.dir.display())))?;
        for e in rd.flatten() {
            let p = e.path();
            let (Some(stem), Some(ext)) = (
                p.file_stem().and_then(|s| s.to_str()),
                p.extension().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            let Ok(id) = Uuid::try_parse(stem) else { continue };
            let owned = vols.iter().any(|v| v.id == id);
            if ext == "part" || (ext == "raw" && !owned) {
                tracing::warn!(file = %p.display(), "removing a volume file a crash left half-made");
                let _ = std::fs::remove_file(&p);
            }
        }
        for v in vols {
            match std::fs::metadata(self.path(v.id)) {
                Ok(md) if md.len() != v.size_bytes => {
                    tracing::warn!(volume = %v.name, "a resize finished without its size recorded; recording it");
                    self.store.lock().set_volume_size(v.id, md.len())?;
                }
                Ok(_) => {}
                Err(e) => tracing::error!(volume = %v.name, error = %e, "the volume's file is missing"),
            }
        }
        Ok(())
    }

    /// Tests only: pause at a crash-relevant point, saying so in the log.
    pub(crate) async fn test_pause(&self, stage: &str) {
        if let Some(d) = self.settings.test_pause {
            tracing::warn!(stage, "volume operation paused for a test");
            tokio::time::sleep(d).await;
        }
    }

    fn view(&self, volume: Volume) -> Result<VolumeView> {
        let attachments = self.store.lock().attachments_of_volume(volume.id)?;
        Ok(VolumeView {
            path: self.path(volume.id),
            volume,
            attachments,
        })
    }

    /// Every volume and snapshot, oldest first.
    pub fn list(&self) -> Result<Vec<VolumeView>> {
        let vols = self.store.lock().volumes()?;
        vols.into_iter().map(|v| self.view(v)).collect()
    }

    /// A volume or snapshot by name or ID.
    pub fn get(&self, name: &str) -> Result<VolumeView> {
        let v = self.store.lock().volume(name)?;
        self.view(v)
    }

    /// Refuse a size over `max_storage`, or an operation that, writing `need` bytes (a new
    /// volume counted in full), would leave the data dir less than `min_disk_free`.
    fn check_room(&self, what: &str, size: ByteSize, need: u64) -> Result<()> {
        let max = self.settings.max_storage;
        if size > max {
            return Err(Error::Invalid(format!(
                "{what} {size} is over the host's limit (allowed: up to {max}, the max_storage setting)"
            )));
        }
        self.ensure_dir()?;
        let dir = &self.settings.dir;
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| s.blocks_available() * s.fragment_size())
            .map_err(|e| Error::io(format!("reading the free space of {}", dir.display()))(e.into()))?;
        let keep = self.settings.min_disk_free.as_bytes();
        if free < need.saturating_add(keep) {
            return Err(Error::NoSpace(format!(
                "{what} {size} does not fit: it writes up to {}, {} is free in {}, and {} must stay free (min_disk_free); allowed: at most {} written",
                ByteSize::mib(need.div_ceil(1 << 20)),
                ByteSize::bytes(free / (1 << 20) * (1 << 20)),
                dir.display(),
                self.settings.min_disk_free,
                ByteSize::mib(free.saturating_sub(keep) >> 20)
            )));
        }
        Ok(())
    }

    fn free_name(&self, name: &VolumeName) -> Result<()> {
        match self.store.lock().volume_or_pending(name.as_str()) {
            Ok(_) => Err(Error::Conflict(format!(
                "volume name {:?} is already taken",
                name.as_str()
            ))),
            Err(_) => Ok(()),
        }
    }

    /// Put a finished `.part` file in place and give it its row (`pending`: hidden until
    /// [`Volumes::commit`]); the file goes if the row cannot be written.
    async fn place(&self, v: Volume, pending: bool) -> Result<VolumeView> {
        let (part, path) = (self.part(v.id), self.path(v.id));
        self.test_pause("file made").await;
        std::fs::rename(&part, &path).map_err(Error::io(format!("placing {}", path.display())))?;
        self.test_pause("file placed").await;
        let inserted = self.store.lock().insert_volume_as(&v, pending);
        match inserted {
            Ok(v) => self.view(v),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e.into())
            }
        }
    }

    /// Create a sparse volume of `size` (rounded up to MiB), ext4 (made without a mount) or raw.
    pub async fn create(
        &self,
        name: Option<VolumeName>,
        size: ByteSize,
        format: VolumeFormat,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        let size = ByteSize::mib(size.as_bytes().div_ceil(1 << 20));
        if format == VolumeFormat::Ext4 && size < MIN_EXT4 {
            return Err(Error::Invalid(format!(
                "size {size} is too small for ext4 (allowed: {MIN_EXT4} to {}, or --format raw)",
                self.settings.max_storage
            )));
        }
        self.check_room("size", size, size.as_bytes())?;
        let _g = self.op.lock().await;
        let name = name.unwrap_or_else(VolumeName::generate);
        self.free_name(&name)?;
        let id = Uuid::new_v4();
        let part = self.part(id);
        let made = async {
            files::create_sparse(&part, size.as_bytes())?;
            if format == VolumeFormat::Ext4 {
                progress(&format!("making an ext4 file system on {name} ({size})"));
                files::mkfs_ext4(&part, name.as_str()).await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        self.place(
            Volume {
                id,
                name,
                kind: VolumeKind::Volume,
                format,
                size_bytes: size.as_bytes(),
                source: None,
                created_at: String::new(),
            },
            false,
        )
        .await
    }

    /// Grow a volume (and its ext4) to `size`; refused while a machine it is attached to
    /// runs. The grown copy replaces the file in one rename: a crash leaves the old one.
    pub async fn resize(&self, name: &str, size: ByteSize, progress: Progress<'_>) -> Result<VolumeView> {
        let _g = self.op.lock().await;
        let v = self.store.lock().volume(name)?;
        let size = ByteSize::mib(size.as_bytes().div_ceil(1 << 20));
        if v.kind == VolumeKind::Snapshot {
            return Err(Error::Invalid(format!(
                "{} is a snapshot, which does not change (allowed: resize a volume; clone the snapshot first)",
                v.name
            )));
        }
        if size.as_bytes() <= v.size_bytes {
            return Err(Error::Invalid(format!(
                "size {size} is not larger than volume {}'s {} (allowed: a larger size; volumes only grow)",
                v.name,
                ByteSize::bytes(v.size_bytes)
            )));
        }
        // The grown file is a copy (the old one stays until the rename): without reflinks the
        // copy's data is written too, on top of the growth.
        let copy = match self.copy_method() {
            CopyMethod::Reflink => 0,
            CopyMethod::Copy => std::fs::metadata(self.path(v.id))
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .map_err(Error::io(format!("reading {}", self.path(v.id).display())))?,
        };
        self.check_room("size", size, size.as_bytes() - v.size_bytes + copy)?;
        self.refuse_if_running(&v, "resized")?;
        let part = self.part(v.id);
        let r = async {
            progress(&format!("copying {} to grow it", v.name));
            self.copy_file(&self.path(v.id), &part, progress).await?;
            progress(&format!("growing {} to {size}", v.name));
            files::grow(&part, size.as_bytes(), v.format == VolumeFormat::Ext4).await?;
            self.test_pause("file made").await;
            let path = self.path(v.id);
            std::fs::rename(&part, &path).map_err(Error::io(format!("placing {}", path.display())))?;
            self.test_pause("file placed").await;
            self.store.lock().set_volume_size(v.id, size.as_bytes())?;
            Ok(())
        }
        .await;
        if let Err(e) = r {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        self.get(&v.id.to_string())
    }

    fn refuse_if_running(&self, v: &Volume, what: &str) -> Result<()> {
        let busy: Vec<String> = self
            .store
            .lock()
            .attachments_of_volume(v.id)?
            .into_iter()
            .filter(|a| {
                a.machine_state != crate::domain::MachineState::Stopped
                    && a.machine_state != crate::domain::MachineState::Error
            })
            .map(|a| format!("{} ({})", a.machine, a.machine_state))
            .collect();
        if !busy.is_empty() {
            return Err(Error::Conflict(format!(
                "volume {} cannot be {what} while machine(s) using it run: {}; stop them first",
                v.name,
                busy.join(", ")
            )));
        }
        Ok(())
    }

    /// Copy a file with the copy method of the volumes' directory, on the blocking pool,
    /// with progress in whole percent for a sparse copy.
    pub async fn copy_file(&self, src: &Path, dest: &Path, progress: Progress<'_>) -> Result<CopyMethod> {
        let (src, dest) = (src.to_path_buf(), dest.to_path_buf());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let job = tokio::task::spawn_blocking(move || {
            let last = std::sync::atomic::AtomicU64::new(u64::MAX);
            files::copy(&src, &dest, &|done, total| {
                let pct = done * 100 / total.max(1);
                if last.swap(pct, std::sync::atomic::Ordering::Relaxed) != pct {
                    let _ = tx.send(pct);
                }
            })
        });
        while let Some(pct) = rx.recv().await {
            progress(&format!("copying: {pct}%"));
        }
        job.await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Refuse while a machine that may write to `v` (a read-write attachment) is not stopped:
    /// a copy of a file that changes under it is torn (a reflink is not, but a sparse copy is).
    /// Called under the op lock, which a VMM's start takes too.
    fn refuse_if_written(&self, v: &Volume, what: &str) -> Result<()> {
        let writer = self
            .store
            .lock()
            .attachments_of_volume(v.id)?
            .into_iter()
            .find(|a| {
                !a.readonly
                    && a.machine_state != crate::domain::MachineState::Stopped
                    && a.machine_state != crate::domain::MachineState::Error
            });
        match writer {
            Some(a) => Err(Error::Conflict(format!(
                "volume {} cannot be {what} while machine {} ({}) may write to it; stop it first (sistemo machine stop {})",
                v.name, a.machine, a.machine_state, a.machine
            ))),
            None => Ok(()),
        }
    }

    /// Make a new pending volume (or snapshot) `name` from file `src`: a reflink or sparse
    /// copy. For an operation of several copies: see [`Volumes::commit`].
    pub async fn copy_in_pending(
        &self,
        src: &Path,
        name: VolumeName,
        kind: VolumeKind,
        format: VolumeFormat,
        source: String,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        self.copy_from(src, None, name, kind, format, source, true, progress)
            .await
    }

    /// [`Volumes::copy_in_pending`], pending or not; when the file is volume `of`'s, refused (under the op lock) while
    /// a machine may write to it.
    #[allow(clippy::too_many_arguments)]
    async fn copy_from(
        &self,
        src: &Path,
        of: Option<(&Volume, &str)>,
        name: VolumeName,
        kind: VolumeKind,
        format: VolumeFormat,
        source: String,
        pending: bool,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        let size = std::fs::metadata(src)
            .map_err(Error::io(format!("reading {}", src.display())))?
            .len();
        self.check_room("size", ByteSize::bytes(size), size)?;
        let _g = self.op.lock().await;
        if let Some((v, what)) = of {
            self.refuse_if_written(v, what)?;
        }
        self.free_name(&name)?;
        let id = Uuid::new_v4();
        let part = self.part(id);
        if let Err(e) = self.copy_file(src, &part, progress).await {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        self.place(
            Volume {
                id,
                name,
                kind,
                format,
                size_bytes: size,
                source: Some(source),
                created_at: String::new(),
            },
            pending,
        )
        .await
    }

    /// Snapshot a volume: a frozen copy (a reflink where possible) that clones start from.
    pub async fn snapshot(
        &self,
        volume: &str,
        snap: VolumeName,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        self.snapshot_as(volume, snap, false, progress).await
    }

    /// [`Volumes::snapshot`], pending (see [`Volumes::commit`]).
    pub async fn snapshot_pending(
        &self,
        volume: &str,
        snap: VolumeName,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        self.snapshot_as(volume, snap, true, progress).await
    }

    async fn snapshot_as(
        &self,
        volume: &str,
        snap: VolumeName,
        pending: bool,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        let v = self.store.lock().volume(volume)?;
        if v.kind == VolumeKind::Snapshot {
            return Err(Error::Invalid(format!(
                "{} is a snapshot already (allowed: a volume; `volume clone` copies a snapshot)",
                v.name
            )));
        }
        let src = format!("volume {}", v.name);
        self.copy_from(
            &self.path(v.id),
            Some((&v, "snapshotted")),
            snap,
            VolumeKind::Snapshot,
            v.format,
            src,
            pending,
            progress,
        )
        .await
    }

    /// Clone a volume or snapshot into a new volume.
    pub async fn clone_volume(
        &self,
        from: &str,
        new: VolumeName,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        self.clone_as(from, new, false, progress).await
    }

    /// [`Volumes::clone_volume`], pending (see [`Volumes::commit`]).
    pub async fn clone_pending(
        &self,
        from: &str,
        new: VolumeName,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        self.clone_as(from, new, true, progress).await
    }

    async fn clone_as(
        &self,
        from: &str,
        new: VolumeName,
        pending: bool,
        progress: Progress<'_>,
    ) -> Result<VolumeView> {
        let v = self.store.lock().volume(from)?;
        let src = format!("{} {}", v.kind, v.name);
        self.copy_from(
            &self.path(v.id),
            Some((&v, "cloned")),
            new,
            VolumeKind::Volume,
            v.format,
            src,
            pending,
            progress,
        )
        .await
    }

    /// Give an existing file (a deleted machine's root disk) a volume's row: it is hard-linked
    /// into the volumes' directory first, so a crash before the row leaves the original.
    pub async fn adopt(&self, file: &Path, name: VolumeName, source: String) -> Result<VolumeView> {
        let _g = self.op.lock().await;
        self.free_name(&name)?;
        let size = std::fs::metadata(file)
            .map_err(Error::io(format!("reading {}", file.display())))?
            .len();
        let id = Uuid::new_v4();
        std::fs::hard_link(file, self.part(id)).map_err(Error::io(format!(
            "linking {} into {}",
            file.display(),
            self.settings.dir.display()
        )))?;
        self.place(
            Volume {
                id,
                name,
                kind: VolumeKind::Volume,
                format: VolumeFormat::Ext4,
                size_bytes: size,
                source: Some(source),
                created_at: String::new(),
            },
            false,
        )
        .await
    }

    /// Delete a volume or snapshot and its file; refused while it is attached. The only code
    /// that removes a volume (besides those of an operation that failed or never finished,
    /// still pending: fresh copies, never anyone's data).
    pub async fn delete(&self, name: &str) -> Result<()> {
        let _g = self.op.lock().await;
        let v = self.store.lock().volume(name)?;
        self.store.lock().delete_volume(v.id)?;
        let p = self.path(v.id);
        if let Err(e) = std::fs::remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            // The row is gone: start-up removes the file.
            tracing::warn!(file = %p.display(), error = %e, "removing a deleted volume's file failed");
        }
        Ok(())
    }
}
