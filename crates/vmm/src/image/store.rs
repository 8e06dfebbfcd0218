//! The content-addressed image store (`data_dir/images`): ext4 files named by their sha256, a
//! tag index under a lock, and resolving references (tag, hash prefix, path, URL download).

use super::oci::OciMeta;
use super::source::{ImagePolicy, UrlRef, check_ext4, check_path, is_url};
use super::write_atomic;
use crate::{Progress, VmmError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One stored image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    /// sha256 of the ext4 file (hex).
    pub sha256: String,
    /// Tags pointing at it.
    pub tags: Vec<String>,
    /// The ext4 file.
    pub path: PathBuf,
    /// Size in bytes of the file.
    pub size: u64,
    /// Where it came from (`debootstrap bookworm +pkgs`, a path, a URL, an OCI reference).
    pub source: String,
    /// For an OCI image: its reference, manifest digest, creation time and config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciMeta>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// tag → sha256
    tags: BTreeMap<String, String>,
    /// sha256 → source
    sources: BTreeMap<String, String>,
    /// URL → sha256 of the bytes as downloaded (compressed or not), for `#sha256=` pins.
    #[serde(default)]
    fetched: BTreeMap<String, String>,
    /// sha256 of an ext4 converted from an OCI image → that image's metadata.
    #[serde(default)]
    oci: BTreeMap<String, OciMeta>,
}

/// Images under `data_dir/images`: `<sha256>.ext4` files and `index.json` (tags → hashes).
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// The store in `data_dir/images` (created when needed).
    pub fn new(data_dir: &Path) -> Self {
        ImageStore {
            dir: data_dir.join("images"),
        }
    }

    /// The data dir the store lives in (registry credentials are kept there).
    pub fn data_dir(&self) -> &Path {
        self.dir.parent().unwrap_or(&self.dir)
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn load(&self) -> Index {
        std::fs::read(self.index_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, idx: &Index) -> Result<(), VmmError> {
        self.mkdir()?;
        write_atomic(
            &self.index_path(),
            &serde_json::to_vec_pretty(idx).expect("json"),
            0o644,
        )
    }

    fn mkdir(&self) -> Result<(), VmmError> {
        std::fs::create_dir_all(&self.dir).map_err(VmmError::io(format!("creating {}", self.dir.display())))
    }

    /// Exclusive lock over index changes (several builds or processes may finish at once).
    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, VmmError> {
        self.mkdir()?;
        let p = self.dir.join(".index.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(VmmError::io(format!("opening {}", p.display())))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| VmmError::io(format!("locking {}", p.display()))(e.into()))
    }

    fn path_of(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.ext4"))
    }

    /// All stored images, with their tags.
    pub fn list(&self) -> Vec<ImageInfo> {
        let idx = self.load();
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".ext4") else {
                continue;
            };
            if sha.len() != 64 {
                continue;
            }
            let tags = idx
                .tags
                .iter()
                .filter(|(_, s)| s.as_str() == sha)
                .map(|(t, _)| t.clone())
                .collect();
            out.push(ImageInfo {
                sha256: sha.to_string(),
                tags,
                path: e.path(),
                size: e.metadata().map(|m| m.len()).unwrap_or(0),
                source: idx.sources.get(sha).cloned().unwrap_or_default(),
                oci: idx.oci.get(sha).cloned(),
            });
        }
        out.sort_by(|a, b| a.tags.cmp(&b.tags).then(a.sha256.cmp(&b.sha256)));
        out
    }

    /// The image a reference names: a tag (`debian`), a sha256 (or unique prefix of ≥12), an
    /// absolute path to an ext4 file under one of `policy.image_dirs`, or an `http(s)://` URL
    /// (downloaded once within the policy's bounds, stored under the URL as tag), optionally
    /// with `#sha256=HEX` (the bytes as served must have that digest) and `#insecure_http`
    /// (this request accepts plain http). Paths and downloads are checked to be ext4 before
    /// anything else reads them.
    pub async fn resolve(
        &self,
        reference: &str,
        policy: &ImagePolicy,
        progress: Progress<'_>,
    ) -> Result<PathBuf, VmmError> {
        let not_found = || VmmError::ImageNotFound {
            reference: reference.to_string(),
        };
        if is_url(reference) {
            let r = UrlRef::parse(reference)?;
            r.check_scheme(policy)?;
            let idx = self.load();
            if let Some(sha) = idx.tags.get(&r.url)
                && self.path_of(sha).exists()
                && r.sha256
                    .as_ref()
                    .is_none_or(|pin| idx.fetched.get(&r.url) == Some(pin))
            {
                return Ok(self.path_of(sha));
            }
            return self.download(&r, policy, progress).await.map(|i| i.path);
        }
        if reference.starts_with('/') || reference.ends_with(".ext4") {
            let data_dir = self.dir.parent().unwrap_or(&self.dir);
            let forbidden = [data_dir.join("machines"), data_dir.join("pool")];
            let p = check_path(reference, policy, &forbidden)?;
            check_ext4(&p, reference)?;
            return Ok(p);
        }
        let idx = self.load();
        if let Some(sha) = idx.tags.get(reference) {
            let p = self.path_of(sha);
            return if p.exists() { Ok(p) } else { Err(not_found()) };
        }
        if reference.len() >= 12 && reference.chars().all(|c| c.is_ascii_hexdigit()) {
            let hits: Vec<ImageInfo> = self
                .list()
                .into_iter()
                .filter(|i| i.sha256.starts_with(&reference.to_ascii_lowercase()))
                .collect();
            if hits.len() == 1 {
                return Ok(hits[0].path.clone());
            }
        }
        // An OCI reference: pulled once, then found by its normalized form or digest.
        let Ok(r) = super::oci::reference::ImageRef::parse(reference) else {
            return Err(not_found());
        };
        if let Some(i) = self.lookup(reference) {
            return Ok(i.path);
        }
        super::oci::pull::pull(self, &r, policy, &[r.normalized()], None, progress)
            .await
            .map(|i| i.path)
    }

    /// Remove a tag; the file goes when no tag points at it any more. Returns whether the
    /// tag existed.
    pub fn remove(&self, tag: &str) -> Result<bool, VmmError> {
        let _lock = self.lock()?;
        let mut idx = self.load();
        let Some(sha) = idx.tags.remove(tag) else {
            return Ok(false);
        };
        idx.fetched.remove(tag);
        if !idx.tags.values().any(|s| *s == sha) {
            idx.sources.remove(&sha);
            idx.oci.remove(&sha);
            let p = self.path_of(&sha);
            if p.exists() {
                std::fs::remove_file(&p).map_err(VmmError::io(format!("removing {}", p.display())))?;
            }
        }
        self.save(&idx)?;
        Ok(true)
    }

    /// Move a finished ext4 file into the store under its sha256 and point `tag` at it.
    pub(crate) fn add(&self, file: &Path, tag: &str, source: &str) -> Result<ImageInfo, VmmError> {
        self.mkdir()?;
        let sha = sha256_file(file)?;
        let dest = self.path_of(&sha);
        if std::fs::rename(file, &dest).is_err() {
            std::fs::copy(file, &dest).map_err(VmmError::io(format!("storing {}", dest.display())))?;
            let _ = std::fs::remove_file(file);
        }
        let _lock = self.lock()?;
        let mut idx = self.load();
        let previous = idx.tags.insert(tag.to_string(), sha.clone());
        idx.sources.insert(sha.clone(), source.to_string());
        // The image the tag pointed at before goes when nothing else names it. Disks cloned
        // from it are independent copies, so running machines are unaffected.
        if let Some(old) = previous.filter(|o| *o != sha && !idx.tags.values().any(|s| s == o)) {
            idx.sources.remove(&old);
            idx.oci.remove(&old);
            let _ = std::fs::remove_file(self.path_of(&old));
        }
        self.save(&idx)?;
        let size = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
        Ok(ImageInfo {
            sha256: sha,
            tags: vec![tag.to_string()],
            path: dest,
            size,
            source: source.to_string(),
            oci: None,
        })
    }

    /// The image converted from OCI manifest `digest`, if the store has it.
    pub fn oci_image(&self, digest: &str) -> Option<ImageInfo> {
        let sha = self
            .load()
            .oci
            .iter()
            .find(|(_, m)| m.digest == digest)?
            .0
            .clone();
        self.list().into_iter().find(|i| i.sha256 == sha)
    }

    /// The OCI metadata of a store image file (`None` for other images and paths).
    pub fn oci_meta(&self, image: &Path) -> Option<OciMeta> {
        if image.parent() != Some(self.dir.as_path()) {
            return None;
        }
        let sha = image.file_name()?.to_str()?.strip_suffix(".ext4")?;
        self.load().oci.get(sha).cloned()
    }

    /// The store's layer blob cache.
    pub fn blobs(&self) -> super::oci::blobs::Blobs {
        super::oci::blobs::Blobs::new(&self.dir)
    }

    /// The image `reference` names without fetching anything: a tag, a sha256 prefix, or an
    /// OCI reference already pulled (by its normalized form or its pinned digest).
    pub fn lookup(&self, reference: &str) -> Option<ImageInfo> {
        let all = self.list();
        let by_tag = |t: &str| all.iter().find(|i| i.tags.iter().any(|x| x == t)).cloned();
        if let Some(i) = by_tag(reference) {
            return Some(i);
        }
        if reference.len() >= 12 && reference.chars().all(|c| c.is_ascii_hexdigit()) {
            let r = reference.to_ascii_lowercase();
            let hits: Vec<&ImageInfo> = all.iter().filter(|i| i.sha256.starts_with(&r)).collect();
            if hits.len() == 1 {
                return Some(hits[0].clone());
            }
        }
        let r = super::oci::reference::ImageRef::parse(reference).ok()?;
        if let Some(d) = r.digest() {
            return self.oci_image(d);
        }
        by_tag(&r.normalized())
    }

    /// Point each of `tags` at stored image `sha` (an image a tag pointed at before goes when
    /// nothing names it any more).
    pub(crate) fn tag(&self, sha: &str, tags: &[String]) -> Result<ImageInfo, VmmError> {
        let _lock = self.lock()?;
        let mut idx = self.load();
        for t in tags {
            let previous = idx.tags.insert(t.clone(), sha.to_string());
            if let Some(old) = previous.filter(|o| o != sha && !idx.tags.values().any(|s| s == o)) {
                idx.sources.remove(&old);
                idx.oci.remove(&old);
                let _ = std::fs::remove_file(self.path_of(&old));
            }
        }
        self.save(&idx)?;
        drop(_lock);
        self.list()
            .into_iter()
            .find(|i| i.sha256 == sha)
            .ok_or_else(|| VmmError::ImageNotFound {
                reference: sha.to_string(),
            })
    }

    /// Store a converted OCI image under `tags` (at least one) with its metadata.
    pub(crate) fn add_oci(&self, file: &Path, tags: &[String], meta: OciMeta) -> Result<ImageInfo, VmmError> {
        let first = tags
            .first()
            .map(String::as_str)
            .unwrap_or(meta.reference.as_str());
        let info = self.add(file, first, &meta.reference)?;
        {
            let _lock = self.lock()?;
            let mut idx = self.load();
            idx.oci.insert(info.sha256.clone(), meta);
            self.save(&idx)?;
        }
        self.tag(&info.sha256, tags)
    }

    /// Remove cached layer blobs no stored OCI image uses; returns the bytes freed.
    pub fn prune_blobs(&self) -> Result<u64, VmmError> {
        let Some(_alone) = self.blobs().try_hold_cache_alone()? else {
            return Err(VmmError::Invalid {
                what: "prune",
                value: "while a pull or import runs".into(),
                allowed: "prune once no pull or import runs",
            });
        };
        let _lock = self.lock();
        let keep: Vec<String> = self
            .load()
            .oci
            .values()
            .flat_map(|m| m.layers.iter().cloned())
            .collect();
        Ok(self.blobs().prune(&keep))
    }

    /// A fresh private folder in the store for a build or a download (the caller removes it).
    pub(crate) fn scratch(&self, what: &str) -> Result<PathBuf, VmmError> {
        let p = self.dir.join(format!(
            ".{what}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&p).map_err(VmmError::io(format!("creating {}", p.display())))?;
        Ok(p)
    }

    async fn download(
        &self,
        r: &UrlRef,
        policy: &ImagePolicy,
        progress: Progress<'_>,
    ) -> Result<ImageInfo, VmmError> {
        let scratch = self.scratch("pull")?;
        let res = async {
            let file = scratch.join("image.ext4");
            progress(&format!("downloading {}", r.url));
            let raw = super::download::download(r, policy, &file, progress).await?;
            // Before any host tool (e2fsck, resize2fs) parses it.
            check_ext4(&file, &r.url)?;
            let info = self.add(&file, &r.url, &r.url)?;
            let _lock = self.lock()?;
            let mut idx = self.load();
            idx.fetched.insert(r.url.clone(), raw);
            self.save(&idx)?;
            Ok(info)
        }
        .await;
        // Whatever happened, no partial file stays behind.
        let _ = std::fs::remove_dir_all(&scratch);
        res
    }
}

/// sha256 of a file, hex (also the blob cache's check).
pub(crate) fn sha256_file(p: &Path) -> Result<String, VmmError> {
    let mut f = std::fs::File::open(p).map_err(VmmError::io(format!("opening {}", p.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(VmmError::io(format!("reading {}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{clone_disk, make_ext4};
    use tokio::process::Command;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sistemo-vmm-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn store_tags_and_clone_grow() {
        if Command::new("mkfs.ext4").arg("-V").output().await.is_err() {
            return;
        }
        let d = tmpdir("store");
        let tree = d.join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hello"), "hi").unwrap();
        let img = d.join("x.ext4");
        make_ext4(&tree, &img, "t").await.unwrap();
        let store = ImageStore::new(&d);
        let info = store.add(&img, "t1", "test").unwrap();
        assert_eq!(
            store
                .resolve("t1", &ImagePolicy::default(), &|_| {})
                .await
                .unwrap(),
            info.path
        );
        assert_eq!(
            store
                .resolve(&info.sha256[..12], &ImagePolicy::default(), &|_| {})
                .await
                .unwrap(),
            info.path
        );
        assert!(
            store
                .resolve("nope", &ImagePolicy::default(), &|_| {})
                .await
                .is_err()
        );
        assert_eq!(store.list().len(), 1);
        let disk = d.join("disk.img");
        clone_disk(&info.path, &disk, 512 << 20).await.unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 512 << 20);
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(&disk)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(store.remove("t1").unwrap());
        assert!(!info.path.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
