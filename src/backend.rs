//! The hypervisor backend the configuration asks for, with its image backend, and
//! `image prepare`: boot assets and the `debian` image made without a daemon.

use crate::config::Config;
use crate::domain::HypervisorKind;
use crate::images::{Disks, ImageBackend};
use anyhow::{Context, Result};
use sistemo_vmm::Hypervisor;
use sistemo_vmm::image::{ImageStore, PackageName, ensure_boot_assets};
use std::path::Path;
use std::sync::Arc;

/// A hypervisor and, when its machines have disks, the images they are made from.
pub struct Backend {
    /// The hypervisor.
    pub vmm: Arc<dyn Hypervisor>,
    /// Images and disks (`None` for `netns`).
    pub images: Option<Arc<dyn ImageBackend>>,
}

/// Build the configured backend. QEMU fetches the kernel and builds the initramfs on first use
/// (cached in the data dir).
pub async fn build(cfg: &Config) -> Result<Backend> {
    match cfg.hypervisor {
        HypervisorKind::Netns => Ok(Backend {
            vmm: Arc::new(sistemo_vmm::netns::NetnsBackend::new(cfg.netns_prefix.clone())),
            images: None,
        }),
        HypervisorKind::Qemu => {
            let progress = |s: &str| tracing::info!("{s}");
            let assets = ensure_boot_assets(&cfg.data_dir, cfg.kernel_deb.as_deref(), &progress)
                .await
                .context("preparing the guest kernel and initramfs")?;
            let q = sistemo_vmm::qemu::Qemu::new(&cfg.data_dir, assets, cfg.qemu_options()).await?;
            tracing::info!(accel = ?q.accel(), "QEMU backend ready");
            let disks = Arc::new(Disks::new(&cfg.data_dir, cfg.build_options(), cfg.image_policy()));
            disks.refill_all();
            Ok(Backend {
                vmm: Arc::new(q),
                images: Some(disks),
            })
        }
    }
}

/// Fill `data_dir` with the kernel, the base initramfs and the `debian` image (with `include`),
/// reusing what is already there. Runs without a daemon and touches no network configuration;
/// the kernel package and build options come from `cfg`.
pub async fn prepare(cfg: &Config, data_dir: &Path, include: &[String]) -> Result<()> {
    let include = include
        .iter()
        .map(|p| p.parse::<PackageName>())
        .collect::<Result<Vec<_>, _>>()?;
    let progress = |s: &str| eprintln!("… {s}");
    let t = std::time::Instant::now();
    let assets = ensure_boot_assets(data_dir, cfg.kernel_deb.as_deref(), &progress).await?;
    eprintln!(
        "kernel {} and initramfs ready in {:.1}s",
        assets.kernel_version,
        t.elapsed().as_secs_f64()
    );
    let store = ImageStore::new(data_dir);
    // A `debian` image built by an older recipe is built again (the tag moves to the new one
    // and the old file goes): prepared caches follow changes to how images boot.
    let stale = store
        .list()
        .into_iter()
        .find(|i| i.tags.iter().any(|t| t == "debian"))
        .filter(|i| sistemo_vmm::image::is_stale_build(&i.source));
    if let Some(i) = &stale {
        eprintln!(
            "… the debian image {} predates image recipe {}: building it again",
            &i.sha256[..12],
            sistemo_vmm::image::RECIPE
        );
    }
    if stale.is_some()
        || store
            .resolve("debian", &Default::default(), &progress)
            .await
            .is_err()
    {
        let t = std::time::Instant::now();
        let info = store
            .build_debian("debian", &include, &cfg.build_options(), &progress)
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
