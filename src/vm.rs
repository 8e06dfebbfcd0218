//! Glue between the daemon and the QEMU backend of `sistemo_vmm`: prepares boot assets, builds
//! the hypervisor, and provides images and machine disks to the manager.

use crate::api::ImageRow;
use crate::config::{Config, vmm_env_overrides};
use crate::machine::{DiskProvider, Progress};
use anyhow::{Context, Result};
use sistemo_vmm::Hypervisor;
use sistemo_vmm::image::{ImageInfo, ImageStore, PackageName, clone_disk, ensure_boot_assets, grow_disk};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest image a URL may download (bytes).
pub const MAX_DOWNLOAD: u64 = 16 << 30;
/// Default disk size when `--storage` is not given.
pub const DEFAULT_STORAGE: u64 = 2 << 30;

/// Images and disks from the content-addressed image store.
///
/// Without reflink a disk is a sparse copy of the image (hundreds of ms for a few hundred MB).
/// To keep that off the deploy path, one spare clone per image, at the default size, waits in
/// `data_dir/pool`: a deploy takes it with a rename and a new spare is made in the background.
pub struct Disks {
    images: ImageStore,
    pool: PathBuf,
    refilling: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Disks {
    /// Disks for the image store in `data_dir`.
    pub fn new(data_dir: &Path) -> Arc<Disks> {
        Arc::new(Disks {
            images: ImageStore::new(data_dir),
            pool: data_dir.join("pool"),
            refilling: Default::default(),
        })
    }

    fn spare(&self, src: &Path) -> PathBuf {
        let stem = src
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.pool.join(format!("{stem}.raw"))
    }

    /// Take the image's spare disk if there is one (atomic rename: two deploys never share it).
    fn take_spare(&self, src: &Path, dest: &Path) -> bool {
        std::fs::rename(self.spare(src), dest).is_ok()
    }

    /// Make a new spare for `src` in the background, unless one exists or is being made.
    fn refill(self: &Arc<Self>, src: PathBuf) {
        let spare = self.spare(&src);
        if spare.exists()
            || !self
                .refilling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(src.display().to_string())
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let tmp = spare.with_extension("filling");
            let size = std::fs::metadata(&src)
                .map(|m| m.len().max(DEFAULT_STORAGE))
                .unwrap_or(DEFAULT_STORAGE);
            let r = async {
                std::fs::create_dir_all(&me.pool).map_err(|e| e.to_string())?;
                clone_disk(&src, &tmp, size).await.map_err(|e| e.to_string())?;
                std::fs::rename(&tmp, &spare).map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = r {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(error = %e, "making a spare disk failed");
            }
            me.refilling
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&src.display().to_string());
        });
    }

    /// Remove spares whose image is gone.
    fn prune(&self) {
        let live: Vec<PathBuf> = self.images.list().iter().map(|i| self.spare(&i.path)).collect();
        if let Ok(rd) = std::fs::read_dir(&self.pool) {
            for e in rd.flatten() {
                if !live.contains(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

fn row(i: &ImageInfo) -> ImageRow {
    ImageRow {
        sha256: i.sha256.clone(),
        tags: i.tags.clone(),
        size: i.size,
        source: i.source.clone(),
    }
}

/// The provider is shared (`Arc`) so that it can refill its pool in the background.
pub struct SharedDisks(pub Arc<Disks>);

#[async_trait::async_trait]
impl DiskProvider for SharedDisks {
    async fn create_disk(
        &self,
        image: &str,
        dir: &Path,
        storage: Option<u64>,
        progress: Progress<'_>,
    ) -> std::result::Result<(PathBuf, u64), String> {
        let src = self
            .0
            .images
            .resolve(image, MAX_DOWNLOAD, progress)
            .await
            .map_err(|e| e.to_string())?;
        let len = std::fs::metadata(&src).map_err(|e| e.to_string())?.len();
        let size = match storage {
            Some(s) if s < len => {
                return Err(format!(
                    "storage {}M is smaller than image {image} ({}M); allowed: at least {}M",
                    s >> 20,
                    len.div_ceil(1 << 20),
                    len.div_ceil(1 << 20)
                ));
            }
            Some(s) => s,
            None => len.max(DEFAULT_STORAGE),
        };
        let dest = dir.join("disk.raw");
        let disks = &self.0;
        if size >= len.max(DEFAULT_STORAGE) && disks.take_spare(&src, &dest) {
            grow_disk(&dest, size).await.map_err(|e| e.to_string())?;
        } else {
            progress("cloning the image into the machine's disk");
            clone_disk(&src, &dest, size).await.map_err(|e| e.to_string())?;
        }
        disks.refill(src);
        Ok((dest, size))
    }

    fn images(&self) -> Vec<ImageRow> {
        self.0.images.list().iter().map(row).collect()
    }

    async fn build(
        &self,
        tag: &str,
        include: &[String],
        progress: Progress<'_>,
    ) -> std::result::Result<ImageRow, String> {
        self.0
            .images
            .build_debian(tag, &packages(include)?, &vmm_env_overrides().build, progress)
            .await
            .map(|i| row(&i))
            .map_err(|e| e.to_string())
    }

    fn remove(&self, tag: &str) -> std::result::Result<bool, String> {
        let r = self.0.images.remove(tag).map_err(|e| e.to_string());
        self.0.prune();
        r
    }
}

/// `include` as package names (the manager has checked them already).
fn packages(include: &[String]) -> std::result::Result<Vec<PackageName>, String> {
    include
        .iter()
        .map(|p| p.parse().map_err(|e: sistemo_vmm::VmmError| e.to_string()))
        .collect()
}

/// The QEMU hypervisor and its disk provider; fetches the kernel and builds the initramfs on
/// first use (cached in the data dir).
pub async fn qemu_backend(cfg: &Config) -> Result<(Arc<dyn Hypervisor>, Option<Arc<dyn DiskProvider>>)> {
    let progress = |s: &str| tracing::info!("{s}");
    let env = vmm_env_overrides();
    let assets = ensure_boot_assets(&cfg.data_dir, env.kernel_deb.as_deref(), &progress)
        .await
        .context("preparing the guest kernel and initramfs")?;
    let q = sistemo_vmm::qemu::Qemu::new(&cfg.data_dir, assets, env.qemu).await?;
    tracing::info!(accel = ?q.accel(), "QEMU backend ready");
    Ok((
        Arc::new(q),
        Some(Arc::new(SharedDisks(Disks::new(&cfg.data_dir)))),
    ))
}

/// Fill `data_dir` with the kernel, the base initramfs and the `debian` image (with `include`),
/// reusing what is already there. Runs without a daemon and touches no network configuration.
pub async fn prepare(data_dir: &Path, include: &[String]) -> Result<()> {
    let progress = |s: &str| eprintln!("… {s}");
    let t = std::time::Instant::now();
    let env = vmm_env_overrides();
    let assets = ensure_boot_assets(data_dir, env.kernel_deb.as_deref(), &progress).await?;
    eprintln!(
        "kernel {} and initramfs ready in {:.1}s",
        assets.kernel_version,
        t.elapsed().as_secs_f64()
    );
    let store = ImageStore::new(data_dir);
    if store.resolve("debian", 0, &progress).await.is_err() {
        let t = std::time::Instant::now();
        let info = store
            .build_debian(
                "debian",
                &packages(include).map_err(anyhow::Error::msg)?,
                &env.build,
                &progress,
            )
            .await?;
        eprintln!(
            "image debian built in {:.1}s: sha256 {}",
            t.elapsed().as_secs_f64(),
            info.sha256
        );
    }
    for i in store.list() {
        println!(
            "{} {} {}M {}",
            i.tags.join(","),
            &i.sha256[..12],
            i.size >> 20,
            i.source
        );
    }
    Ok(())
}
