//! Machines and volumes: attach and detach (stopped machines only: hot-plug is not
//! implemented), the disks a machine boots with, deploy `--attach`/`--volume`, delete
//! `--preserve-storage`, and machine snapshots and clones.

use super::{Deploy, MachineView, Machines, workload};
use crate::Progress;
use crate::domain::{MachineName, MachineState, VolumeName};
use crate::error::{Error, Result};
use crate::store::{Attachment, Machine, NewAttachment, VolumeFormat, VolumeKind};
use crate::volumes::VolumeView;
use sistemo_vmm::VolumeAttachment;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// A volume to attach: `NAME[:/MOUNT][:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    /// The volume.
    pub volume: VolumeName,
    /// Where the guest's init mounts it (ext4 volumes only).
    pub mount: Option<String>,
    /// Read-only (may be shared by several machines).
    pub readonly: bool,
}

/// Check a mount point: absolute, normalised, of `[A-Za-z0-9._/-]`, not `/`.
pub fn check_mount(m: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::Invalid(format!(
            "mount point {m:?} {why} (allowed: an absolute path of a-z, A-Z, 0-9, '.', '_', '-', '/', like /data)"
        )))
    };
    if !m.starts_with('/') || m.len() < 2 || m.len() > 200 {
        return bad("is not an absolute path below /");
    }
    if !m
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
    {
        return bad("has characters that are not allowed");
    }
    if m.split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("is not normalised");
    }
    Ok(m.to_string())
}

impl AttachSpec {
    /// Parse `NAME[:/MOUNT][:ro|:rw]`.
    pub fn parse(s: &str) -> Result<AttachSpec> {
        let mut parts: Vec<&str> = s.split(':').collect();
        let mut readonly = false;
        if parts.len() > 1 && matches!(parts.last(), Some(&"ro") | Some(&"rw")) {
            readonly = parts.pop() == Some("ro");
        }
        if parts.len() > 2 {
            return Err(Error::Invalid(format!(
                "attach {s:?} has too many parts (allowed: VOLUME[:/MOUNT][:ro])"
            )));
        }
        Ok(AttachSpec {
            volume: parts[0].parse()?,
            mount: parts.get(1).map(|m| check_mount(m)).transpose()?,
            readonly,
        })
    }
}

/// The file in a machine's directory recording the sha256 of the image it was deployed from.
const IMAGE_DIGEST: &str = "image.sha256";

/// The sha256 of the image the machine in `dir` was deployed from, when recorded.
pub(super) fn image_digest(dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(dir.join(IMAGE_DIGEST)).ok()?;
    let s = s.trim();
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_string())
}

/// Record `digest` in the machine directory `dir`.
fn record_image_digest(dir: &Path, digest: &str) -> Result<()> {
    let p = dir.join(IMAGE_DIGEST);
    std::fs::write(&p, format!("{digest}\n")).map_err(Error::io(format!("writing {}", p.display())))
}

/// The disk serial of a volume: `sv` and 18 hex digits of its ID (virtio-blk keeps 20).
fn serial(id: Uuid) -> String {
    format!("sv{}", &id.simple().to_string()[..18])
}

fn refuse_unless_stopped(m: &Machine, what: &str) -> Result<()> {
    match m.state {
        MachineState::Stopped | MachineState::Error => Ok(()),
        MachineState::Running => Err(Error::Conflict(format!(
            "machine {} is running: {what} needs it stopped (hot-plug is not implemented); stop it first: sistemo machine stop {}",
            m.name, m.name
        ))),
        s => Err(Error::Conflict(format!(
            "machine {} is {s}: {what} needs it stopped",
            m.name
        ))),
    }
}

impl Machines {
    /// The root disk and the volumes a machine boots with.
    pub(super) fn disks_of(
        &self,
        dir: &Path,
        attached: &[Attachment],
    ) -> (Option<PathBuf>, Vec<VolumeAttachment>) {
        let own = dir.join("disk.raw");
        let root = attached
            .iter()
            .find(|a| a.root)
            .map(|a| self.volumes.path(a.volume.id))
            .or_else(|| own.exists().then_some(own));
        let vols = attached
            .iter()
            .filter(|a| !a.root)
            .map(|a| VolumeAttachment {
                path: self.volumes.path(a.volume.id),
                read_only: a.readonly,
                serial: serial(a.volume.id),
                mount: a.mount.clone(),
            })
            .collect();
        (root, vols)
    }

    /// Check a deploy's volumes before anything is made: they exist, are volumes, and a mount
    /// point goes with an ext4 one. A machine clone's deploy attaches the pending volumes the
    /// clone made; no other deploy sees them.
    pub(super) fn check_deploy_volumes(&self, d: &Deploy) -> Result<()> {
        let st = self.store.lock();
        let find = |n: &str| {
            if d.clone_of.is_some() {
                st.volume_or_pending(n)
            } else {
                st.volume(n)
            }
        };
        for a in &d.attach {
            let v = find(a.volume.as_str())?;
            if a.mount.is_some() && v.format != VolumeFormat::Ext4 {
                return Err(Error::Invalid(format!(
                    "volume {} is raw and cannot be mounted at {} (allowed: a mount point for ext4 volumes; attach it without one)",
                    v.name,
                    a.mount.as_deref().unwrap_or("")
                )));
            }
        }
        if let Some(r) = &d.root_volume {
            find(r.as_str())?;
            if d.storage.is_some() {
                return Err(Error::Invalid(
                    "--storage does not apply when booting from a volume (allowed: resize the volume)".into(),
                ));
            }
        }
        Ok(())
    }

    /// A new machine's disks: its volumes attached, then its root disk (a root volume, a copy
    /// of the machine it clones, or a disk from its image).
    pub(super) async fn make_disks(
        &self,
        m: &Machine,
        d: &Deploy,
        dir: &Path,
        progress: Progress<'_>,
    ) -> Result<()> {
        let mut new: Vec<NewAttachment> = d
            .attach
            .iter()
            .map(|a| NewAttachment {
                volume: a.volume.to_string(),
                mount: a.mount.clone(),
                readonly: a.readonly,
                root: false,
                pending_ok: d.clone_of.is_some(),
            })
            .collect();
        if let Some(r) = &d.root_volume {
            new.insert(
                0,
                NewAttachment {
                    volume: r.to_string(),
                    mount: None,
                    readonly: false,
                    root: true,
                    pending_ok: d.clone_of.is_some(),
                },
            );
        }
        self.store.lock().attach_volumes(m.id, &new)?;
        if let Some(r) = &d.root_volume {
            let v = self.store.lock().volume_or_pending(r.as_str())?;
            self.store.lock().set_storage(m.id, v.size_bytes)?;
            return Ok(());
        }
        let Some(images) = &self.images else {
            return Ok(());
        };
        if let Some(src) = d.clone_of {
            let from = self.machine_dir(src).join("disk.raw");
            progress("copying the machine's disk");
            self.volumes
                .copy_file(&from, &dir.join("disk.raw"), progress)
                .await?;
            let size = std::fs::metadata(&from).map(|m| m.len()).unwrap_or(0);
            self.store.lock().set_storage(m.id, size)?;
            // An OCI machine's copy runs the same workload.
            if let Some(w) = workload::read(&self.machine_dir(src)) {
                sistemo_vmm::image::oci::write_workload(dir, &w)?;
            }
            if let Some(digest) = image_digest(&self.machine_dir(src)) {
                record_image_digest(dir, &digest)?;
            }
            return Ok(());
        }
        let (_, size) = images.create_disk(&d.image, dir, d.storage, progress).await?;
        // What the name pointed at when the disk was made (a tag may move later).
        if let Some(info) = images.lookup(&d.image) {
            record_image_digest(dir, &info.sha256)?;
        }
        self.apply_workload(d, dir)?;
        self.store.lock().set_storage(m.id, size.as_bytes())?;
        Ok(())
    }

    /// Attach a volume to a stopped machine; it is there from its next start.
    pub async fn attach_volume(&self, name: &str, a: AttachSpec) -> Result<MachineView> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let m = self.store.lock().machine_by_id(id)?;
        let v = self.store.lock().volume(a.volume.as_str())?;
        if a.mount.is_some() && v.format != VolumeFormat::Ext4 {
            return Err(Error::Invalid(format!(
                "volume {} is raw and cannot be mounted (allowed: --mount for ext4 volumes only)",
                v.name
            )));
        }
        refuse_unless_stopped(&m, "attaching a volume")?;
        self.store.lock().attach_volumes(
            id,
            &[NewAttachment {
                volume: v.id.to_string(),
                mount: a.mount,
                readonly: a.readonly,
                root: false,
                pending_ok: false,
            }],
        )?;
        self.get(&id.to_string())
    }

    /// Detach a volume from a stopped machine (never its root volume).
    pub async fn detach_volume(&self, name: &str, volume: &str) -> Result<MachineView> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let m = self.store.lock().machine_by_id(id)?;
        let v = self.store.lock().volume(volume)?;
        let att = self.store.lock().attachments_of_machine(id)?;
        match att.iter().find(|a| a.volume.id == v.id) {
            None => {
                return Err(Error::NotFound(format!(
                    "volume {} is not attached to machine {}",
                    v.name, m.name
                )));
            }
            Some(a) if a.root => {
                return Err(Error::Conflict(format!(
                    "volume {} is machine {}'s root disk and cannot be detached (delete the machine: the volume stays)",
                    v.name, m.name
                )));
            }
            Some(_) => {}
        }
        refuse_unless_stopped(&m, "detaching a volume")?;
        self.store.lock().detach_volume(id, v.id)?;
        self.get(&id.to_string())
    }

    /// The volumes attached to a machine.
    pub fn volumes_of(&self, name: &str) -> Result<Vec<Attachment>> {
        let st = self.store.lock();
        let m = st.machine(name)?;
        Ok(st.attachments_of_machine(m.id)?)
    }

    /// Delete a machine, keeping its root disk as volume `NAME-root` (a machine booted from a
    /// volume keeps it anyway). The disk is linked into the volumes and given its row before
    /// the delete starts, so a crash leaves either the machine or the volume, never neither.
    pub async fn delete_preserving(&self, name: &str, progress: Progress<'_>) -> Result<Option<String>> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let m = self.store.lock().machine_by_id(id)?;
        let disk = self.machine_dir(id).join("disk.raw");
        let mut kept = None;
        if disk.exists() {
            let vname: VolumeName = format!("{}-root", m.name).parse().map_err(|_| {
                Error::Invalid(format!(
                    "machine name {} is too long for a volume {}-root",
                    m.name, m.name
                ))
            })?;
            if self.store.lock().volume(vname.as_str()).is_ok() {
                return Err(Error::Conflict(format!(
                    "volume {vname} already exists; delete or rename it before keeping {}'s disk",
                    m.name
                )));
            }
            if m.state == MachineState::Running {
                self.stop_locked(id, progress).await?;
            }
            progress(&format!("keeping the root disk as volume {vname}"));
            let src = format!("machine {}'s root disk (image {})", m.name, m.image);
            self.volumes.adopt(&disk, vname.clone(), src).await?;
            kept = Some(vname.to_string());
        } else if let Some(a) = self
            .store
            .lock()
            .attachments_of_machine(id)?
            .into_iter()
            .find(|a| a.root)
        {
            kept = Some(a.volume.name.to_string());
        }
        self.delete_locked(id, progress).await?;
        Ok(kept)
    }

    /// Snapshot a stopped machine: its root disk as snapshot `snap` (default `NAME-snap-N`),
    /// each read-write volume as `SNAP-VOLUME`; the snapshot's source names its configuration.
    pub async fn snapshot(
        &self,
        name: &str,
        snap: Option<VolumeName>,
        progress: Progress<'_>,
    ) -> Result<Vec<VolumeView>> {
        let id = self.store.lock().machine(name)?.id;
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        let m = self.store.lock().machine_by_id(id)?;
        refuse_unless_stopped(&m, "a snapshot")?;
        let att = self.store.lock().attachments_of_machine(id)?;
        let (root, _) = self.disks_of(&self.machine_dir(id), &att);
        let root = root.ok_or_else(|| {
            Error::Invalid(format!(
                "machine {} has no disk to snapshot (the {} backend has none)",
                m.name,
                self.vmm.name()
            ))
        })?;
        let snap = match snap {
            Some(s) => s,
            None => self.free_volume_name(&format!("{}-snap", m.name))?,
        };
        let config = format!(
            "machine {} (image {}, {} vCPU, {}M, network {})",
            m.name, m.image, m.vcpus, m.memory_mib, m.network
        );
        // Pending until every disk is copied: a crash half-way leaves none listed.
        let mut out: Vec<VolumeView> = Vec::new();
        let res: Result<()> = async {
            out.push(
                self.volumes
                    .copy_in_pending(
                        &root,
                        snap.clone(),
                        VolumeKind::Snapshot,
                        VolumeFormat::Ext4,
                        config,
                        progress,
                    )
                    .await?,
            );
            for a in att.iter().filter(|a| !a.root && !a.readonly) {
                let n: VolumeName = format!("{snap}-{}", a.volume.name)
                    .parse()
                    .map_err(|e: crate::domain::Invalid| Error::Invalid(e.0))?;
                out.push(
                    self.volumes
                        .snapshot_pending(&a.volume.id.to_string(), n, progress)
                        .await?,
                );
            }
            self.volumes.test_pause("copies made").await;
            Ok(())
        }
        .await;
        let made: Vec<Uuid> = out.iter().map(|v| v.volume.id).collect();
        match res.and_then(|()| self.volumes.commit(&made)) {
            Ok(()) => Ok(out),
            Err(e) => {
                self.volumes.discard(&made).await;
                Err(e)
            }
        }
    }

    /// `BASE-1`, `BASE-2`, … : the first name no volume has.
    fn free_volume_name(&self, base: &str) -> Result<VolumeName> {
        let st = self.store.lock();
        (1..10_000)
            .filter_map(|i| format!("{base}-{i}").parse::<VolumeName>().ok())
            .find(|n| st.volume(n.as_str()).is_err())
            .ok_or_else(|| Error::Invalid(format!("no free volume name after {base} (allowed: give one)")))
    }

    /// Clone a stopped machine into a new one that boots: its disk copied (a reflink where
    /// the file system can), its configuration, a new ID, MAC and IP, no exposes. Read-write
    /// volumes are cloned as `NEW-VOLUME`, read-only ones shared. The copies stay pending
    /// (unlisted) until the new machine is deployed: a crash before leaves none listed, and
    /// start-up removes them.
    pub async fn clone_machine(
        &self,
        name: &str,
        new: MachineName,
        progress: Progress<'_>,
    ) -> Result<MachineView> {
        let src = self.store.lock().machine(name)?;
        // Held to the end: the source cannot start while its disk is read.
        let lock = self.lock_for(src.id);
        let _g = lock.lock().await;
        let (d, made) = {
            let m = self.store.lock().machine_by_id(src.id)?;
            refuse_unless_stopped(&m, "a clone")?;
            if self.store.lock().machine(new.as_str()).is_ok() {
                return Err(Error::Conflict(format!("machine name {new:?} is already taken")));
            }
            let mut made: Vec<Uuid> = Vec::new();
            let mut d = Deploy {
                image: m.image.clone(),
                name: Some(new.clone()),
                vcpus: Some(m.vcpus),
                cpu_limit: m.cpu_limit,
                memory: Some(crate::domain::ByteSize::mib(m.memory_mib)),
                storage: None,
                expose: vec![],
                network: Some(m.network.clone()),
                restart: m.restart,
                attach: vec![],
                root_volume: None,
                clone_of: Some(m.id),
                cold: true,
                wait: Default::default(),
                wait_timeout: None,
                io: sistemo_vmm::IoLimits::default(),
                workload: Default::default(),
            };
            let res: Result<()> = async {
                let attached = self.store.lock().attachments_of_machine(m.id)?;
                for a in attached {
                    if a.readonly {
                        d.attach.push(AttachSpec {
                            volume: a.volume.name.clone(),
                            mount: a.mount.clone(),
                            readonly: true,
                        });
                        continue;
                    }
                    let n: VolumeName =
                        format!("{new}-{}", if a.root { "root" } else { a.volume.name.as_str() })
                            .parse()
                            .map_err(|e: crate::domain::Invalid| Error::Invalid(e.0))?;
                    let v = self
                        .volumes
                        .clone_pending(&a.volume.id.to_string(), n.clone(), progress)
                        .await?;
                    made.push(v.volume.id);
                    if a.root {
                        // `clone_of` stays: the deploy may attach the pending copies.
                        d.root_volume = Some(n);
                    } else {
                        d.attach.push(AttachSpec {
                            volume: n,
                            mount: a.mount.clone(),
                            readonly: false,
                        });
                    }
                }
                self.volumes.test_pause("copies made").await;
                Ok(())
            }
            .await;
            if let Err(e) = res {
                self.volumes.discard(&made).await;
                return Err(e);
            }
            (d, made)
        };
        // Only the volumes this clone made, still pending, go if it fails: never a source's.
        let r = async {
            let view = self.deploy(d, progress).await?;
            self.volumes.test_pause("machine made").await;
            self.volumes.commit(&made)?;
            Ok(view)
        }
        .await;
        if r.is_err() {
            self.volumes.discard(&made).await;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_specs() {
        let a = AttachSpec::parse("pgdata:/data").unwrap();
        assert_eq!(
            (a.volume.as_str(), a.mount.as_deref(), a.readonly),
            ("pgdata", Some("/data"), false)
        );
        let a = AttachSpec::parse("pgdata:/srv/x:ro").unwrap();
        assert_eq!((a.mount.as_deref(), a.readonly), (Some("/srv/x"), true));
        let a = AttachSpec::parse("pgdata:ro").unwrap();
        assert_eq!((a.mount, a.readonly), (None, true));
        for bad in [
            "",
            "Bad",
            "pg:data",
            "pg:/",
            "pg:/a/../b",
            "pg:/a b",
            "pg:/a:/b",
            "pg:/a//b",
        ] {
            let e = AttachSpec::parse(bad).unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::Invalid, "{bad}: {e}");
        }
        assert_eq!(serial(Uuid::nil()).len(), 20);
    }
}
