//! Images and machine disks: the [`ImageBackend`] trait the services use, its typed error, and
//! [`Images`], the service behind `image list|build|pull|import|rm|prune` (refusing to remove
//! what machines use) and `registry login`.

mod disks;
mod oci;

pub use disks::{DEFAULT_STORAGE, Disks};

use crate::Progress;
use crate::domain::{ByteSize, ImageTag};
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::store::SharedStore;
use sistemo_vmm::VmmError;
use sistemo_vmm::image::oci::reference::ImageRef;
use sistemo_vmm::image::{ImageInfo, PackageName};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Errors of an image backend.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `--storage` is smaller than the image it would hold.
    #[error("storage {storage} is smaller than image {image} ({need}); allowed: at least {need}")]
    TooSmall {
        /// What was asked for.
        storage: ByteSize,
        /// The image reference.
        image: String,
        /// The image's size, rounded up to MiB.
        need: ByteSize,
    },
    /// The image store or the disk copy failed (a missing image, a full disk, a bad download).
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The backend has no such operation (its hypervisor has no images, or no registry).
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// The kind where the variant decides it (else the chain decides: disk full or internal).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ImageError::TooSmall { .. } => Some(ErrorKind::Invalid),
            ImageError::Vmm(VmmError::ImageNotFound { .. } | VmmError::NotInRegistry { .. }) => {
                Some(ErrorKind::NotFound)
            }
            ImageError::Vmm(VmmError::ImageRefused { .. }) => Some(ErrorKind::Invalid),
            ImageError::Vmm(VmmError::Invalid { .. }) => Some(ErrorKind::Invalid),
            ImageError::Unsupported(_) => Some(ErrorKind::Invalid),
            _ => None,
        }
    }
}

/// Where images live and how a machine's disk is made from one. Backends without disks (the
/// `netns` hypervisor) have none.
#[async_trait::async_trait]
pub trait ImageBackend: Send + Sync {
    /// Resolve `image` (a tag, a `*.ext4` path under `image_dirs`, an http(s) URL with
    /// optional `#sha256=HEX&insecure_http`) and create the machine's disk
    /// in `dir`, `storage` large (default: the image's size, at least 2G). Returns its path
    /// and size.
    async fn create_disk(
        &self,
        image: &str,
        dir: &Path,
        storage: Option<ByteSize>,
        progress: Progress<'_>,
    ) -> std::result::Result<(PathBuf, ByteSize), ImageError>;

    /// Images in the store.
    fn list(&self) -> Vec<ImageInfo>;

    /// Build the `debian` base image with extra packages under `tag`.
    async fn build(
        &self,
        tag: &ImageTag,
        include: &[PackageName],
        progress: Progress<'_>,
    ) -> std::result::Result<ImageInfo, ImageError>;

    /// Remove a tag (and the image when no tag is left); false when unknown.
    fn remove(&self, tag: &ImageTag) -> std::result::Result<bool, ImageError>;

    /// The stored image `reference` names (a tag, a digest prefix, an OCI reference already
    /// pulled), without fetching anything.
    fn lookup(&self, _reference: &str) -> Option<ImageInfo> {
        None
    }

    /// Pull OCI image `reference` (pulled once per manifest digest) and point `tags` at it;
    /// `login` (user, password) is for this pull only.
    async fn pull(
        &self,
        _reference: &ImageRef,
        _tags: &[String],
        _login: Option<(&str, &str)>,
        _progress: Progress<'_>,
    ) -> std::result::Result<ImageInfo, ImageError> {
        Err(ImageError::Unsupported("pulling OCI images"))
    }

    /// Import a `docker save` archive or an OCI layout (directory or tar) at `path`; tagged
    /// `tags`, or the archive's own names when empty.
    async fn import(
        &self,
        _path: &Path,
        _tags: &[String],
        _progress: Progress<'_>,
    ) -> std::result::Result<ImageInfo, ImageError> {
        Err(ImageError::Unsupported("importing OCI images"))
    }

    /// Remove a stored tag that is not an [`ImageTag`] (an OCI reference); false when unknown.
    fn remove_tag(&self, _tag: &str) -> std::result::Result<bool, ImageError> {
        Err(ImageError::Unsupported("removing OCI images"))
    }

    /// Remember credentials for an OCI registry.
    fn login(&self, _registry: &str, _user: &str, _password: &str) -> std::result::Result<(), ImageError> {
        Err(ImageError::Unsupported("registry credentials"))
    }

    /// A machine disk `dir/disk.raw` copied from `src` (a template's frozen disk), taken from
    /// the spare pool when one is ready; returns its size.
    async fn disk_from(
        &self,
        _src: &Path,
        _dir: &Path,
        _progress: Progress<'_>,
    ) -> std::result::Result<ByteSize, ImageError> {
        Err(ImageError::Unsupported("disks from templates"))
    }

    /// A deploy has ended (its guest ready, or rolled back): make the spare disks the deploys
    /// since the last call took, now that no copy competes with their boots.
    fn deployed(&self) {}

    /// Keep a spare copy of `src` (a template's frozen disk) ready for its next clone.
    fn prepare_spare(&self, _src: &Path) {}

    /// Drop the spare of `src` and stop keeping one (its template is removed).
    fn forget_spare(&self, _src: &Path) {}

    /// Remove cached layer blobs no image uses; returns the bytes freed.
    fn prune(&self) -> std::result::Result<u64, ImageError> {
        Ok(0)
    }
}

/// The image service.
pub struct Images {
    store: Arc<SharedStore>,
    backend: Option<Arc<dyn ImageBackend>>,
    hypervisor: String,
}

impl Images {
    /// The service over `backend` (`None` when the hypervisor has no images).
    pub fn new(
        store: Arc<SharedStore>,
        backend: Option<Arc<dyn ImageBackend>>,
        hypervisor: String,
    ) -> Images {
        Images {
            store,
            backend,
            hypervisor,
        }
    }

    fn backend(&self) -> Result<&Arc<dyn ImageBackend>> {
        self.backend.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "the {} backend has no images (use --hypervisor qemu)",
                self.hypervisor
            ))
        })
    }

    /// The stored image `reference` names (a tag, a digest prefix, an OCI reference), if any.
    pub fn lookup(&self, reference: &str) -> Option<ImageInfo> {
        self.backend.as_ref()?.lookup(reference)
    }

    /// Images in the store, each with the machines deployed from it (by a tag or its digest).
    pub fn list(&self) -> Result<Vec<(ImageInfo, Vec<String>)>> {
        let b = self.backend()?;
        let images = b.list();
        let machines = self.store.lock().machines()?;
        // What each machine's image reference names now (an OCI reference by its pulled form).
        let named: Vec<(String, Option<String>)> = machines
            .iter()
            .map(|m| (m.name.to_string(), b.lookup(&m.image).map(|i| i.sha256)))
            .collect();
        Ok(images
            .into_iter()
            .map(|i| {
                let users = machines
                    .iter()
                    .zip(&named)
                    .filter(|(m, (_, sha))| {
                        m.image == i.sha256 || i.tags.contains(&m.image) || sha.as_ref() == Some(&i.sha256)
                    })
                    .map(|(_, (n, _))| n.clone())
                    .collect();
                (i, users)
            })
            .collect())
    }

    /// Build an image from Debian with extra packages, tagged `name` (default: the base).
    pub async fn build(
        &self,
        base: &str,
        name: Option<&str>,
        include: &[String],
        progress: Progress<'_>,
    ) -> Result<ImageInfo> {
        if base != "debian" {
            // Sistemo's spelling: `image build node:20` pulls and tags it `node`.
            let r = ImageRef::parse(base).map_err(|_| {
                Error::Invalid(format!(
                    "base image {base:?} cannot be built (allowed: debian, or an OCI image reference like node:20)"
                ))
            })?;
            let tag: ImageTag = match name {
                Some(n) => n.parse()?,
                None => r.short_name().parse()?,
            };
            return self.pull(base, Some(tag.as_str()), None, progress).await;
        }
        let tag: ImageTag = name.unwrap_or(base).parse()?;
        let include = include
            .iter()
            .map(|p| {
                p.parse::<PackageName>()
                    .map_err(|e| Error::Invalid(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.backend()?.build(&tag, &include, progress).await?)
    }

    /// Remove an image tag; refused, naming them, while machines use it.
    pub fn remove(&self, tag: &str) -> Result<()> {
        if let Some(i) = self.untagged(tag)? {
            return self.remove_untagged(&i);
        }
        // An OCI reference (`nginx` once pulled is `docker.io/library/nginx:latest`).
        if let Some(t) = oci::stored_tag(self.backend()?.as_ref(), tag)
            && (t != tag || ImageTag::from_str(tag).is_err())
        {
            return self.remove_oci(&t);
        }
        let tag: ImageTag = tag.parse()?;
        let users = self.store.lock().machines_using_image(tag.as_str())?;
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "image {:?} is used by machine(s) {users}; delete them first",
                tag.as_str()
            )));
        }
        if self.backend()?.remove(&tag)? {
            Ok(())
        } else {
            Err(Error::NotFound(format!(
                "image {:?} does not exist (see `sistemo image list`)",
                tag.as_str()
            )))
        }
    }

    /// The untagged image (an upload, stored by its sha256) that `reference` names by a digest
    /// prefix of at least 12 hex digits, if any.
    fn untagged(&self, reference: &str) -> Result<Option<ImageInfo>> {
        if reference.len() < 12 || !reference.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(None);
        }
        Ok(self.backend()?.lookup(reference).filter(|i| i.tags.is_empty()))
    }

    /// Remove an untagged image's file; refused while machines were deployed from it.
    fn remove_untagged(&self, i: &ImageInfo) -> Result<()> {
        let users: Vec<String> = self
            .store
            .lock()
            .machines()?
            .into_iter()
            .filter(|m| m.image == i.sha256)
            .map(|m| m.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "image {} is used by machine(s) {}; delete them first",
                i.sha256,
                users.join(", ")
            )));
        }
        std::fs::remove_file(&i.path).map_err(Error::io(format!("removing {}", i.path.display())))?;
        // Its spare disk goes with it (no tag names it, so nothing else is removed).
        let _ = self.backend()?.remove_tag(&i.sha256);
        Ok(())
    }
}
