//! Images and machine disks: the [`ImageBackend`] trait the services use, its typed error, and
//! [`Images`], the service behind `image list|build|rm` (refusing to remove what machines use).

mod disks;

pub use disks::{DEFAULT_STORAGE, Disks};

use crate::Progress;
use crate::api::ErrorKind;
use crate::domain::{ByteSize, ImageTag};
use crate::error::{Error, Result};
use crate::store::SharedStore;
use sistemo_vmm::VmmError;
use sistemo_vmm::image::{ImageInfo, PackageName};
use std::path::{Path, PathBuf};
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
            ImageError::Vmm(VmmError::ImageNotFound { .. }) => Some(ErrorKind::NotFound),
            ImageError::Vmm(VmmError::ImageRefused { .. }) => Some(ErrorKind::Invalid),
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

    /// Images in the store, each with the machines deployed from it (by a tag or its digest).
    pub fn list(&self) -> Result<Vec<(ImageInfo, Vec<String>)>> {
        let images = self.backend()?.list();
        let machines = self.store.lock().machines()?;
        Ok(images
            .into_iter()
            .map(|i| {
                let users = machines
                    .iter()
                    .filter(|m| m.image == i.sha256 || i.tags.contains(&m.image))
                    .map(|m| m.name.to_string())
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
            return Err(Error::Invalid(format!(
                "base image {base:?} cannot be built (allowed: debian)"
            )));
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
}
