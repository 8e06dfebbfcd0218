//! [`Disks`]: the QEMU backend's images and machine disks, from `sistemo_vmm`'s content-addressed
//! image store, with a pool of one spare disk per image to keep the copy off the deploy path.

use super::{ImageBackend, ImageError};
use crate::Progress;
use crate::domain::{ByteSize, ImageTag};
use sistemo_vmm::image::oci::{self, reference::ImageRef};
use sistemo_vmm::image::{
    BuildOptions, ImageInfo, ImagePolicy, ImageStore, PackageName, Priority, clone_disk, clone_disk_at,
    grow_disk,
};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How long a deploy waits for the spare disk being made for its image before copying the
/// image itself.
const SPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Default disk size when `--storage` is not given.
pub const DEFAULT_STORAGE: ByteSize = ByteSize::bytes(2 << 30);

/// Images and disks from the content-addressed image store.
///
/// Without reflink a disk is a sparse copy of the image (hundreds of ms for a few hundred MB).
/// To keep that off the deploy path, one spare clone per image, at the default size, waits in
/// `data_dir/pool`: a deploy takes it with a rename and a new spare is made in the background.
pub struct Disks {
    images: ImageStore,
    build: BuildOptions,
    /// What image references may name (`image_dirs`, http, size cap).
    policy: ImagePolicy,
    pool: PathBuf,
    /// Images whose spare is being made, each with what wakes the deploys waiting for it
    /// (shared with the background task making it).
    refilling: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Notify>>>>,
    /// Templates' frozen disks, whose spares are kept as well as the images'.
    extra: Mutex<HashSet<PathBuf>>,
    /// Images whose spare a deploy took, made again once it has booted ([`ImageBackend::deployed`]).
    taken: Mutex<HashSet<PathBuf>>,
}

impl Disks {
    /// Disks for the image store in `data_dir`; images are built with `build`, references are
    /// checked against `policy`. Spares a crash left half-made are removed.
    pub fn new(data_dir: &Path, build: BuildOptions, policy: ImagePolicy) -> Disks {
        let pool = data_dir.join("pool");
        if let Ok(rd) = std::fs::read_dir(&pool) {
            for e in rd
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "filling"))
            {
                tracing::warn!(file = %e.path().display(), "removing a half-made spare disk");
                let _ = std::fs::remove_file(e.path());
            }
        }
        Disks {
            images: ImageStore::new(data_dir),
            build,
            policy,
            pool,
            refilling: Default::default(),
            extra: Default::default(),
            taken: Default::default(),
        }
    }

    /// The spare of image file `src`, named after the file itself (device, inode, size and
    /// modification time), never after its name: two images called `root.ext4` in different
    /// folders, or one file rewritten in place, never share a spare.
    fn spare(&self, src: &Path) -> PathBuf {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(src)
            .map(|m| {
                format!(
                    "{:x}-{:x}-{:x}-{:x}.{:x}",
                    m.dev(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec()
                )
            })
            .unwrap_or_default();
        self.pool.join(format!("{id}.raw"))
    }

    /// Take the image's spare disk if there is one (atomic rename: two deploys never share it).
    fn take_spare(&self, src: &Path, dest: &Path) -> bool {
        std::fs::rename(self.spare(src), dest).is_ok()
    }

    /// Take the image's spare, waiting up to [`SPARE_WAIT`] for one being made: it is further
    /// along than a copy this deploy would start.
    async fn take_spare_or_wait(&self, src: &Path, dest: &Path) -> bool {
        let making = self
            .refilling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(src)
            .cloned();
        let Some(done) = making else {
            return self.take_spare(src, dest);
        };
        let woken = done.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if self.take_spare(src, dest) {
            return true;
        }
        let _ = tokio::time::timeout(SPARE_WAIT, woken).await;
        self.take_spare(src, dest)
    }

    /// Make a new spare for `src` in the background, unless one exists or is being made, at
    /// `prio`. A deploy's spare is made again once it has booted ([`ImageBackend::deployed`]),
    /// at normal priority: a direct-I/O copy at idle priority during the boot measured 0.4 s
    /// slower boots, and a deploy right after would wait for it (2.4 s for a 2 GiB image).
    fn refill(&self, src: PathBuf, prio: Priority) {
        if let Some(fill) = self.begin_refill(src) {
            tokio::spawn(fill.run(prio));
        }
    }

    /// Claim the making of `src`'s spare, unless it exists or is being made.
    fn begin_refill(&self, src: PathBuf) -> Option<Refill> {
        let spare = self.spare(&src);
        let done = Arc::new(tokio::sync::Notify::new());
        let mut r = self.refilling.lock().unwrap_or_else(|p| p.into_inner());
        if spare.exists() || r.contains_key(&src) {
            return None;
        }
        r.insert(src.clone(), done.clone());
        Some(Refill {
            src,
            spare,
            pool: self.pool.clone(),
            refilling: self.refilling.clone(),
            done,
        })
    }

    /// Make the spares the store's images lack (after a crash, or for images placed in the
    /// store by hand), one after the other: a deploy right after the daemon starts copies no
    /// disk either.
    pub fn refill_all(self: &Arc<Self>) {
        let disks = self.clone();
        tokio::spawn(async move {
            for image in disks.images.list() {
                if let Some(fill) = disks.begin_refill(image.path) {
                    fill.run(Priority::Normal).await;
                }
            }
        });
    }

    /// Keep a spare of `src` (a template's disk) from now on, made at `prio`.
    fn keep_spare(&self, src: &Path, prio: Priority) {
        self.extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(src.to_path_buf());
        self.refill(src.to_path_buf(), prio);
    }

    /// Remove spares whose image (or template) is gone.
    fn prune(&self) {
        let mut live: Vec<PathBuf> = self.images.list().iter().map(|i| self.spare(&i.path)).collect();
        live.extend(
            self.extra
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|p| self.spare(p)),
        );
        if let Ok(rd) = std::fs::read_dir(&self.pool) {
            for e in rd.flatten() {
                if !live.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The making of one spare disk, claimed in [`Disks::begin_refill`]: deploys of its image wait
/// for it meanwhile.
struct Refill {
    src: PathBuf,
    spare: PathBuf,
    pool: PathBuf,
    refilling: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Notify>>>>,
    done: Arc<tokio::sync::Notify>,
}

impl Refill {
    /// Copy the image into the pool (as `.filling`, renamed when complete), then wake the
    /// deploys waiting for it.
    async fn run(self, prio: Priority) {
        let tmp = self.spare.with_extension("filling");
        let size = std::fs::metadata(&self.src)
            .map(|m| m.len().max(DEFAULT_STORAGE.as_bytes()))
            .unwrap_or(DEFAULT_STORAGE.as_bytes());
        let r: Result<(), ImageError> = async {
            std::fs::create_dir_all(&self.pool).map_err(io("creating the disk pool"))?;
            clone_disk_at(&self.src, &tmp, size, prio).await?;
            // On disk before it gets its name: after a power loss, a spare is whole or absent
            // (a `.filling` is removed at start). This also writes it back now, while nothing
            // boots, rather than whenever the kernel gets to it.
            let t = tmp.clone();
            tokio::task::spawn_blocking(move || std::fs::File::open(&t)?.sync_all())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(io("writing a spare disk to disk"))?;
            std::fs::rename(&tmp, &self.spare).map_err(io("placing a spare disk"))
        }
        .await;
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(error = %crate::error::chain(&e), "making a spare disk failed");
        }
        self.refilling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.src);
        self.done.notify_waiters();
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        what: what.to_string(),
        source,
    }
}

#[async_trait::async_trait]
impl ImageBackend for Disks {
    async fn create_disk(
        &self,
        image: &str,
        dir: &Path,
        storage: Option<ByteSize>,
        progress: Progress<'_>,
    ) -> Result<(PathBuf, ByteSize), ImageError> {
        let src = self.images.resolve(image, &self.policy, progress).await?;
        let len = std::fs::metadata(&src)
            .map_err(io("reading the image's size"))?
            .len();
        let default = len.max(DEFAULT_STORAGE.as_bytes());
        let size = match storage {
            Some(s) if s.as_bytes() < len => {
                return Err(ImageError::TooSmall {
                    storage: s,
                    image: image.to_string(),
                    need: ByteSize::mib(len.div_ceil(1 << 20)),
                });
            }
            Some(s) => s.as_bytes(),
            None => default,
        };
        let dest = dir.join("disk.raw");
        if size >= default && self.take_spare_or_wait(&src, &dest).await {
            grow_disk(&dest, size).await?;
        } else {
            progress("cloning the image into the machine's disk");
            clone_disk(&src, &dest, size).await?;
        }
        // An image that runs one program (an OCI image's entrypoint) gives the machine its
        // workload, which every boot hands to the guest.
        if let Some(w) = self.images.oci_meta(&src).and_then(|m| m.config.workload()) {
            oci::write_workload(dir, &w)?;
        }
        // Its next spare is made once this machine has booted (see `deployed`).
        self.taken.lock().unwrap_or_else(|p| p.into_inner()).insert(src);
        Ok((dest, ByteSize::bytes(size)))
    }

    fn list(&self) -> Vec<ImageInfo> {
        self.images.list()
    }

    async fn build(
        &self,
        tag: &ImageTag,
        include: &[PackageName],
        progress: Progress<'_>,
    ) -> Result<ImageInfo, ImageError> {
        let info = self
            .images
            .build_debian(tag.as_str(), include, &self.build, progress)
            .await?;
        self.refill(info.path.clone(), Priority::Normal);
        Ok(info)
    }

    fn remove(&self, tag: &ImageTag) -> Result<bool, ImageError> {
        self.remove_tag(tag.as_str())
    }

    fn remove_tag(&self, tag: &str) -> Result<bool, ImageError> {
        let r = self.images.remove(tag);
        self.prune();
        Ok(r?)
    }

    fn lookup(&self, reference: &str) -> Option<ImageInfo> {
        self.images.lookup(reference)
    }

    async fn pull(
        &self,
        r: &ImageRef,
        tags: &[String],
        login: Option<(&str, &str)>,
        progress: Progress<'_>,
    ) -> Result<ImageInfo, ImageError> {
        let info = oci::pull::pull(&self.images, r, &self.policy, tags, login, progress).await?;
        // The first deploy of a pulled image takes a spare too (made at once: nothing boots
        // because of a pull).
        self.refill(info.path.clone(), Priority::Normal);
        Ok(info)
    }

    async fn import(
        &self,
        path: &Path,
        tags: &[String],
        progress: Progress<'_>,
    ) -> Result<ImageInfo, ImageError> {
        let info = oci::import::import(&self.images, path, tags, &self.policy, progress).await?;
        self.refill(info.path.clone(), Priority::Normal);
        Ok(info)
    }

    fn login(&self, registry: &str, user: &str, password: &str) -> Result<(), ImageError> {
        Ok(oci::pull::Credentials::store(
            self.images.data_dir(),
            registry,
            user,
            password,
        )?)
    }

    fn prune(&self) -> Result<u64, ImageError> {
        Ok(self.images.prune_blobs()?)
    }

    async fn disk_from(
        &self,
        src: &Path,
        dir: &Path,
        progress: Progress<'_>,
    ) -> Result<ByteSize, ImageError> {
        let size = std::fs::metadata(src)
            .map_err(io("reading the template disk's size"))?
            .len();
        let dest = dir.join("disk.raw");
        if !self.take_spare_or_wait(src, &dest).await {
            progress("copying the template's disk");
            clone_disk(src, &dest, size).await?;
        }
        self.keep_spare(src, Priority::Idle);
        Ok(ByteSize::bytes(size))
    }

    fn deployed(&self) {
        let taken = std::mem::take(&mut *self.taken.lock().unwrap_or_else(|p| p.into_inner()));
        for src in taken {
            self.refill(src, Priority::Normal);
        }
    }

    fn prepare_spare(&self, src: &Path) {
        self.keep_spare(src, Priority::Normal);
    }

    fn forget_spare(&self, src: &Path) {
        self.extra.lock().unwrap_or_else(|p| p.into_inner()).remove(src);
        let _ = std::fs::remove_file(self.spare(src));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_with_one_name_in_two_folders_have_two_spares() {
        let dir = std::env::temp_dir().join(format!("sistemo-spare-{}", uuid::Uuid::new_v4()));
        let (a, b) = (dir.join("a/root.ext4"), dir.join("b/root.ext4"));
        for p in [&a, &b] {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, p.display().to_string()).unwrap();
        }
        let d = Disks::new(&dir, BuildOptions::default(), ImagePolicy::default());
        assert_ne!(d.spare(&a), d.spare(&b));
        assert_eq!(d.spare(&a), d.spare(&a));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A daemon starting on a store whose image has no spare (a fresh data dir, or a crash)
    /// makes one, so its first deploy copies nothing.
    #[tokio::test]
    async fn images_without_a_spare_get_one_at_start() {
        let dir = std::env::temp_dir().join(format!("sistemo-spares-{}", uuid::Uuid::new_v4()));
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hello"), "hi").unwrap();
        // An image placed in the store by hand: its file named after a (here made up) digest.
        let sha = "ab".repeat(32);
        let img = dir.join(format!("images/{sha}.ext4"));
        std::fs::create_dir_all(img.parent().unwrap()).unwrap();
        sistemo_vmm::image::make_ext4(&tree, &img, "t").await.unwrap();
        let d = Arc::new(Disks::new(&dir, BuildOptions::default(), ImagePolicy::default()));
        assert_eq!(d.list().len(), 1);
        let spare = d.spare(&img);
        assert!(!spare.exists());
        d.refill_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !spare.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no spare of {}",
                img.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The deploy takes it: a disk at the default size, with no copy of its own.
        let m = dir.join("m");
        std::fs::create_dir_all(&m).unwrap();
        let (disk, size) = d
            .create_disk(&sha, &m, None, &|l| panic!("copied: {l}"))
            .await
            .unwrap();
        assert_eq!(size, DEFAULT_STORAGE);
        assert_eq!(
            std::fs::metadata(&disk).unwrap().len(),
            DEFAULT_STORAGE.as_bytes()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
