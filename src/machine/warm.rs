//! Templates (warm starts): `image warm` boots an image once per shape and saves it; a deploy
//! that finds a matching template restores a clone of it, which takes its own identity.
//!
//! A template lives in `data_dir/templates/KEY/` (RAM file, device state, frozen disk,
//! `template.json`); KEY covers the image's digest, the shape and everything of the backend a
//! restore depends on, so a template that does not fit is never found, only left for `image
//! prune`. A template folder is complete or absent: it is made under `KEY.making` and renamed.
//! Nothing but `image rm` and `image prune` removes one; machines never depend on it (their
//! disk is a full copy, their RAM a private mapping of a file that unlinking does not disturb).

use super::{Deploy, Machines};
use crate::Progress;
use crate::domain::ByteSize;
use crate::error::{Error, Result, chain};
use serde::{Deserialize, Serialize};
use sistemo_vmm::{MachineSpec, NetAttachment, TEMPLATE_MAC};
use std::path::{Path, PathBuf};

/// What `template.json` records, and `image list` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// Its key (the folder's name).
    pub key: String,
    /// The image's content digest.
    pub image_sha256: String,
    /// The reference it was made from.
    pub image: String,
    /// vCPUs of its machines.
    pub vcpus: u32,
    /// Memory of its machines, MiB.
    pub memory_mib: u64,
    /// Disk size of its machines, bytes.
    pub storage_bytes: u64,
    /// When it was made (UTC, RFC 3339).
    pub created_at: String,
    /// Bytes it takes on the host's disk.
    #[serde(default)]
    pub bytes: u64,
}

const META: &str = "template.json";

/// The TAP of a template being made in folder `ID.making`.
fn template_tap(making_id: &str) -> String {
    format!("st-t{}", &making_id[..making_id.len().min(10)])
}

/// Bytes a folder's files take on disk (sparse files count what they hold).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

impl Machines {
    fn templates_dir(&self) -> PathBuf {
        self.settings.templates_dir.clone()
    }

    /// The template a deploy of `d` (with these vCPUs and memory) can start from: only plain
    /// deploys of a stored image at the default disk size, unless `--cold`.
    pub(super) fn template_for(
        &self,
        d: &Deploy,
        vcpus: u32,
        memory_mib: u64,
    ) -> Option<(PathBuf, TemplateInfo)> {
        let t = self.vmm.templates()?;
        let images = self.images.as_ref()?;
        if d.cold
            || !d.attach.is_empty()
            || d.root_volume.is_some()
            || d.clone_of.is_some()
            || d.storage.is_some()
        {
            return None;
        }
        let image = images.lookup(&d.image)?;
        let key = t.template_key(&image.sha256, vcpus, memory_mib);
        let dir = self.templates_dir().join(&key);
        let info: TemplateInfo = serde_json::from_slice(&std::fs::read(dir.join(META)).ok()?).ok()?;
        // Files removed behind the daemon's back: a cold boot, never an error.
        if let Some(missing) = t.template_files(&dir).into_iter().find(|f| !f.exists()) {
            tracing::warn!(template = %key, file = %missing.display(), "template incomplete; booting cold");
            return None;
        }
        Some((dir, info))
    }

    /// Make (or find) the template of `image` for this shape; the `image warm` command.
    pub async fn warm(
        &self,
        image: &str,
        vcpus: Option<u32>,
        memory: Option<ByteSize>,
        progress: Progress<'_>,
    ) -> Result<TemplateInfo> {
        let r = self.make_template(image, vcpus, memory, progress).await;
        // The template's boot took its image's spare disk: make it again now.
        if let Some(images) = &self.images {
            images.deployed();
        }
        r
    }

    async fn make_template(
        &self,
        image: &str,
        vcpus: Option<u32>,
        memory: Option<ByteSize>,
        progress: Progress<'_>,
    ) -> Result<TemplateInfo> {
        let t = self.vmm.templates().ok_or_else(|| {
            Error::Invalid(format!(
                "the {} backend cannot make templates (allowed: the qemu backend)",
                self.vmm.name()
            ))
        })?;
        let images = self
            .images
            .clone()
            .ok_or_else(|| Error::Invalid(format!("the {} backend has no images", self.vmm.name())))?;
        let (vcpus, memory_mib) = self.check_shape(vcpus, memory)?;
        let _g = self.warming.lock().await;
        let root = self.templates_dir();
        let making_id = uuid::Uuid::new_v4().simple().to_string();
        let making = root.join(format!("{making_id}.making"));
        std::fs::create_dir_all(&making).map_err(Error::io(format!("creating {}", making.display())))?;
        // The image is built or pulled on first use, as a deploy would.
        let made = async {
            let disk = images.create_disk(image, &making, None, progress).await?;
            let info = images.lookup(image).ok_or_else(|| {
                Error::Invalid(format!(
                    "image {image:?} is not a stored image (allowed: a tag or reference of an image in `image list`)"
                ))
            })?;
            if making.join("workload.json").exists() {
                return Err(Error::Invalid(format!(
                    "image {image:?} runs a single program (an OCI entrypoint); templates are made of images with an init system (allowed: images like debian)"
                )));
            }
            Ok((disk, info))
        }
        .await;
        let ((disk, size), info) = match made {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&making);
                return Err(e);
            }
        };
        let key = t.template_key(&info.sha256, vcpus, memory_mib);
        let dir = root.join(&key);
        if let Ok(b) = std::fs::read(dir.join(META))
            && let Ok(mut ti) = serde_json::from_slice::<TemplateInfo>(&b)
            && t.template_files(&dir).iter().all(|f| f.exists())
        {
            let _ = std::fs::remove_dir_all(&making);
            progress("a template of this image and shape exists already");
            ti.bytes = allocated(&dir);
            return Ok(ti);
        }
        let _ = std::fs::remove_dir_all(&dir);
        let tap = template_tap(&making_id);
        let res: Result<TemplateInfo> = async {
            let spec = MachineSpec {
                id: uuid::Uuid::new_v4(),
                name: "template".into(),
                vcpus,
                memory_mib,
                dir: making.clone(),
                disk: Some(disk),
                net: NetAttachment {
                    host_ifname: tap.clone(),
                    bridge: String::new(),
                    mac: TEMPLATE_MAC,
                    // Unused: a template has no address (documentation range).
                    ip: std::net::Ipv4Addr::new(192, 0, 2, 1),
                    prefix: 24,
                    gateway: std::net::Ipv4Addr::new(192, 0, 2, 254),
                    dns: Vec::new(),
                },
                ssh_pubkey: None,
                volumes: Vec::new(),
                io: Default::default(),
                slot: sistemo_vmm::TEMPLATE_SLOT,
                cpu_limit_milli: 0,
            };
            self.links
                .create_detached_tap(&tap, self.vmm.link_owner(&spec))
                .await?;
            progress(&format!("booting the template ({vcpus} vCPU, {memory_mib} MiB)"));
            t.make_template(&spec, self.settings.ready_timeout, progress)
                .await?;
            // Keys and logs of the template's boot are not part of it.
            for f in [
                "console.log",
                "console.log.1",
                "qemu.log",
                "known_hosts",
                "initrd.img",
            ] {
                let _ = std::fs::remove_file(making.join(f));
            }
            let _ = std::fs::remove_dir_all(making.join("ssh"));
            let _ = std::fs::remove_dir_all(making.join("jail"));
            Ok(TemplateInfo {
                key: key.clone(),
                image_sha256: info.sha256.clone(),
                image: image.to_string(),
                vcpus,
                memory_mib,
                storage_bytes: size.as_bytes(),
                created_at: time::OffsetDateTime::now_utc()
                    .replace_nanosecond(0)
                    .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                bytes: 0,
            })
        }
        .await;
        let _ = self.links.delete(&tap).await;
        let mut ti = match res {
            Ok(ti) => ti,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&making);
                return Err(e);
            }
        };
        let meta =
            serde_json::to_vec_pretty(&ti).map_err(|e| Error::io("writing template.json")(e.into()))?;
        std::fs::write(making.join(META), meta).map_err(Error::io("writing template.json"))?;
        std::fs::rename(&making, &dir).map_err(Error::io(format!("placing {}", dir.display())))?;
        // The first clone takes a ready copy of the frozen disk.
        images.prepare_spare(&dir.join(sistemo_vmm::qemu::TEMPLATE_DISK));
        ti.bytes = allocated(&dir);
        progress(&format!(
            "template {} ready ({})",
            &key[..12],
            ByteSize::bytes(ti.bytes)
        ));
        Ok(ti)
    }

    /// The templates on the host.
    pub fn templates(&self) -> Vec<TemplateInfo> {
        let Ok(rd) = std::fs::read_dir(self.templates_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<TemplateInfo> = rd
            .flatten()
            .filter_map(|e| {
                let mut t: TemplateInfo =
                    serde_json::from_slice(&std::fs::read(e.path().join(META)).ok()?).ok()?;
                t.bytes = allocated(&e.path());
                Some(t)
            })
            .collect();
        v.sort_by(|a, b| (&a.image, a.memory_mib, a.vcpus).cmp(&(&b.image, b.memory_mib, b.vcpus)));
        v
    }

    /// Remove the templates `keep` says no to; returns them. Machines made from them are not
    /// touched (see the module's header).
    pub fn remove_templates(&self, keep: impl Fn(&TemplateInfo) -> bool) -> Result<Vec<TemplateInfo>> {
        let mut gone = Vec::new();
        for t in self.templates() {
            if keep(&t) {
                continue;
            }
            let dir = self.templates_dir().join(&t.key);
            if let Some(images) = &self.images {
                images.forget_spare(&dir.join(sistemo_vmm::qemu::TEMPLATE_DISK));
            }
            std::fs::remove_dir_all(&dir).map_err(Error::io(format!("removing {}", dir.display())))?;
            gone.push(t);
        }
        Ok(gone)
    }

    /// Remove templates that can never be used again: their image is gone, the backend changed
    /// (another QEMU, kernel, initramfs or agent gives another key), or files of theirs are
    /// missing (half-made ones are the daemon start's to sweep).
    pub fn prune_templates(&self) -> Result<Vec<TemplateInfo>> {
        let (Some(t), Some(images)) = (self.vmm.templates(), self.images.as_ref()) else {
            return Ok(Vec::new());
        };
        let present: Vec<String> = images.list().into_iter().map(|i| i.sha256).collect();
        let root = self.templates_dir();
        self.remove_templates(|ti| {
            present.contains(&ti.image_sha256)
                && t.template_key(&ti.image_sha256, ti.vcpus, ti.memory_mib) == ti.key
                && t.template_files(&root.join(&ti.key)).iter().all(|f| f.exists())
        })
    }

    /// Daemon start: a template being made when the daemon stopped is abandoned: its VMM killed,
    /// its TAP and its folder removed (each logged).
    pub(super) async fn sweep_templates(&self) {
        let root = self.templates_dir();
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
        let vmms = super::recovery::vmm_processes(&root);
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".making") else {
                continue;
            };
            tracing::warn!(dir = %e.path().display(), "removing a template a crash left half-made");
            for (pid, _) in vmms.iter().filter(|(_, d)| *d == name) {
                tracing::warn!(pid, "killing the VMM of a half-made template");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if let Err(err) = self.links.delete(&template_tap(id)).await {
                tracing::warn!(error = %chain(&err), "deleting the half-made template's TAP failed");
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }

    /// A deploy's disk from a template's frozen disk, through the spare pool.
    pub(super) async fn disk_from_template(
        &self,
        m: &crate::store::Machine,
        template: &Path,
        dir: &Path,
        progress: Progress<'_>,
    ) -> Result<()> {
        let images = self
            .images
            .as_ref()
            .ok_or_else(|| Error::Invalid("this backend has no disks".into()))?;
        let t0 = std::time::Instant::now();
        let size = images
            .disk_from(&template.join(sistemo_vmm::qemu::TEMPLATE_DISK), dir, progress)
            .await?;
        progress(&format!("disk ready in {} ms", t0.elapsed().as_millis()));
        self.store.lock().set_storage(m.id, size.as_bytes())?;
        Ok(())
    }

    /// Log why a template could not be used; the deploy boots cold instead.
    pub(super) fn warm_failed(&self, m: &crate::store::Machine, e: &Error, progress: Progress<'_>) {
        tracing::warn!(machine = %m.name, error = %chain(e), "starting from the template failed; booting cold");
        progress(&format!("the template could not be used ({e}); booting cold"));
    }
}
