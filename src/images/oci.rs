//! The OCI side of the image service: `image pull|import|prune`, `registry login`, and removing
//! an image named by its reference (refused while any machine runs from it, by any name).

use super::{ImageBackend, Images};
use crate::Progress;
use crate::domain::ImageTag;
use crate::error::{Error, Result};
use sistemo_vmm::image::ImageInfo;
use sistemo_vmm::image::oci::reference::ImageRef;
use std::path::Path;

/// The store's tag `reference` means: itself when the store has it, else its normalized OCI
/// form (`nginx` → `docker.io/library/nginx:latest`) when the store has that.
pub(super) fn stored_tag(b: &dyn ImageBackend, reference: &str) -> Option<String> {
    let has = |t: &str| b.list().iter().any(|i| i.tags.iter().any(|x| x == t));
    if has(reference) {
        return Some(reference.to_string());
    }
    let n = ImageRef::parse(reference).ok()?.normalized();
    has(&n).then_some(n)
}

/// Tags of a pulled or imported image: `name` when given, else the reference's normalized form.
fn tags_for(r: &ImageRef, name: Option<&str>) -> Result<Vec<String>> {
    let mut tags = vec![r.normalized()];
    if let Some(n) = name {
        let t: ImageTag = n.parse()?;
        tags.push(t.as_str().to_string());
    }
    Ok(tags)
}

impl Images {
    /// Pull an OCI image (`nginx`, `ghcr.io/o/r:tag`, `…@sha256:…`), tagged with its normalized
    /// reference and `name`; `login` (user, password, e.g. from the caller's Docker
    /// `config.json`) is used for this pull only, never stored.
    pub async fn pull(
        &self,
        reference: &str,
        name: Option<&str>,
        login: Option<(&str, &str)>,
        progress: Progress<'_>,
    ) -> Result<ImageInfo> {
        let r = ImageRef::parse(reference).map_err(|e| Error::Invalid(e.to_string()))?;
        let tags = tags_for(&r, name)?;
        if login.is_some_and(|(u, p)| u.is_empty() || p.is_empty()) {
            return Err(Error::Invalid(format!(
                "the credentials for {} have an empty username or password (allowed: both set)",
                r.registry()
            )));
        }
        Ok(self.backend()?.pull(&r, &tags, login, progress).await?)
    }

    /// Import an archive at `path` (absolute, read by the daemon) as `name` (default: the
    /// names the archive carries).
    pub async fn import(&self, path: &str, name: Option<&str>, progress: Progress<'_>) -> Result<ImageInfo> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(Error::Invalid(format!(
                "import path {path:?} is relative (allowed: an absolute path; the CLI resolves relative ones)"
            )));
        }
        let tags = match name {
            Some(n) => vec![n.parse::<ImageTag>()?.as_str().to_string()],
            None => Vec::new(),
        };
        Ok(self.backend()?.import(p, &tags, progress).await?)
    }

    /// Remember credentials for `registry` (`host[:port]`, as written in references).
    pub fn login(&self, registry: &str, user: &str, password: &str) -> Result<()> {
        let probe = format!("{registry}/x");
        if registry.contains('/')
            || ImageRef::parse(&probe)
                .map(|r| r.registry().to_string())
                .ok()
                .as_deref()
                != Some(registry)
        {
            return Err(Error::Invalid(format!(
                "registry {registry:?} is not valid (allowed: HOST or HOST:PORT, e.g. ghcr.io or 127.0.0.1:5000)"
            )));
        }
        if user.is_empty() || password.is_empty() {
            return Err(Error::Invalid(
                "registry username and password must not be empty".into(),
            ));
        }
        Ok(self.backend()?.login(registry, user, password)?)
    }

    /// Remove layer blobs no image uses; the bytes freed.
    pub fn prune(&self) -> Result<u64> {
        Ok(self.backend()?.prune()?)
    }

    /// Remove stored tag `tag` (an OCI reference), refused while a machine uses its image.
    pub(super) fn remove_oci(&self, tag: &str) -> Result<()> {
        let b = self.backend()?;
        let sha = b.lookup(tag).map(|i| i.sha256);
        let users: Vec<String> = self
            .store
            .lock()
            .machines()?
            .into_iter()
            .filter(|m| m.image == tag || (sha.is_some() && b.lookup(&m.image).map(|i| i.sha256) == sha))
            .map(|m| m.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "image {tag:?} is used by machine(s) {}; delete them first",
                users.join(", ")
            )));
        }
        b.remove_tag(tag)?;
        Ok(())
    }
}
