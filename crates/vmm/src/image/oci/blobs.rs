//! Layer blobs cached by digest (`data_dir/images/blobs/sha256/HEX`), shared between images:
//! a blob enters the cache only once its bytes hash to its name. Pulls and imports at once are
//! serialised per digest by file locks (`blobs/locks/HEX.lock`): a manifest is converted once, a
//! layer downloaded once; prune waits for no one and removes nothing while they run.

use crate::VmmError;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The blob cache.
#[derive(Debug, Clone)]
pub struct Blobs {
    dir: PathBuf,
}

/// The hex of a `sha256:HEX` digest, when it is one.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// A digest sistemo cannot verify (another algorithm, or malformed) is refused.
pub fn check_digest(digest: &str) -> Result<&str, VmmError> {
    sha256_hex(digest).ok_or_else(|| VmmError::Invalid {
        what: "digest",
        value: digest.to_string(),
        allowed: "sha256: and 64 lowercase hex digits",
    })
}

/// A file lock, released when dropped.
#[derive(Debug)]
pub struct Held(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

fn open_lock(p: &Path) -> Result<std::fs::File, VmmError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map_err(VmmError::io(format!("opening {}", p.display())))
}

/// Lock `p` with `arg`, waiting on the blocking pool.
async fn lock(p: PathBuf, arg: nix::fcntl::FlockArg) -> Result<Held, VmmError> {
    tokio::task::spawn_blocking(move || {
        let f = open_lock(&p)?;
        nix::fcntl::Flock::lock(f, arg)
            .map(Held)
            .map_err(|(_, e)| VmmError::io(format!("locking {}", p.display()))(e.into()))
    })
    .await
    .map_err(|e| VmmError::io("waiting for a lock")(std::io::Error::other(e)))?
}

impl Blobs {
    fn locks(&self) -> Result<PathBuf, VmmError> {
        let d = self.dir.with_file_name("locks");
        std::fs::create_dir_all(&d).map_err(VmmError::io(format!("creating {}", d.display())))?;
        Ok(d)
    }

    /// Held (shared) by a pull or import for its whole run: [`Blobs::prune`]'s caller takes it
    /// exclusively, so no blob an image being made needs is removed under it.
    pub async fn hold_cache(&self) -> Result<Held, VmmError> {
        lock(self.locks()?.join("cache.lock"), nix::fcntl::FlockArg::LockShared).await
    }

    /// The cache to itself (for a prune), or `None` while a pull or import runs.
    pub fn try_hold_cache_alone(&self) -> Result<Option<Held>, VmmError> {
        let p = self.locks()?.join("cache.lock");
        match nix::fcntl::Flock::lock(open_lock(&p)?, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(Held(l))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(VmmError::io(format!("locking {}", p.display()))(e.into())),
        }
    }

    /// Digest `digest` (a manifest's or a layer's) to this caller until dropped: whoever comes
    /// next finds the work done. Take it while holding [`Blobs::hold_cache`]; layers' locks
    /// through [`Blobs::hold_layers`], after the manifest's, so that no two callers wait on
    /// each other.
    pub async fn hold_digest(&self, digest: &str) -> Result<Held, VmmError> {
        let hex = check_digest(digest)?;
        lock(
            self.locks()?.join(format!("{hex}.lock")),
            nix::fcntl::FlockArg::LockExclusive,
        )
        .await
    }

    /// The locks of layer blobs `digests` (any order, repeats allowed) to this caller until the
    /// returned [`Layers`] is dropped, taken in digest order so that two callers needing some of
    /// the same layers never wait on each other. Take it after the manifest's lock. Every
    /// caller that uses a layer holds its lock, so a blob added under it is used by no one
    /// else until the image that needs it is stored, and can be removed if that fails.
    pub async fn hold_layers(&self, digests: &[String]) -> Result<Layers, VmmError> {
        let mut sorted: Vec<&String> = digests.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut held = Vec::with_capacity(sorted.len());
        for d in sorted {
            held.push(self.hold_digest(d).await?);
        }
        Ok(Layers {
            blobs: self.clone(),
            added: Vec::new(),
            _held: held,
        })
    }

    /// The cache under the image store's folder.
    pub fn new(images_dir: &Path) -> Blobs {
        Blobs {
            dir: images_dir.join("blobs").join("sha256"),
        }
    }

    /// Where blob `digest` is (or would be).
    pub fn path(&self, digest: &str) -> Result<PathBuf, VmmError> {
        Ok(self.dir.join(check_digest(digest)?))
    }

    /// True when the cache holds `digest`.
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// A new temporary file in the cache's folder (same file system as the blobs, so that
    /// [`Blobs::commit`] is a rename).
    pub fn temp(&self) -> Result<PathBuf, VmmError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(VmmError::io(format!("creating {}", self.dir.display())))?;
        Ok(self.dir.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple())))
    }

    /// Move `tmp` into the cache as `digest`, after checking that its bytes have that digest
    /// (the file is removed either way).
    pub fn commit(&self, tmp: &Path, digest: &str) -> Result<PathBuf, VmmError> {
        let dest = self.path(digest)?;
        let got = sha256_file(tmp);
        let res = match got {
            Ok(h) if format!("sha256:{h}") == digest => std::fs::rename(tmp, &dest)
                .map(|_| dest)
                .map_err(VmmError::io(format!("storing blob {digest}"))),
            Ok(h) => Err(VmmError::ImageRefused {
                reference: format!("blob {digest}"),
                reason: format!("its content has digest sha256:{h} (corrupt or tampered)"),
            }),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(tmp);
        res
    }

    /// Copy `r` into the cache as `digest`, verified.
    pub fn insert(&self, mut r: impl Read, digest: &str) -> Result<PathBuf, VmmError> {
        if self.has(digest) {
            return self.path(digest);
        }
        let tmp = self.temp()?;
        let res = (|| {
            let mut f = std::fs::File::create(&tmp).map_err(VmmError::io("creating a blob"))?;
            std::io::copy(&mut r, &mut f).map_err(VmmError::io(format!("writing blob {digest}")))?;
            f.flush()
                .map_err(VmmError::io(format!("writing blob {digest}")))?;
            Ok(())
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.commit(&tmp, digest)
    }

    /// Every cached digest.
    pub fn list(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                    .filter(|d| sha256_hex(d).is_some())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Remove blobs not in `keep` (and stale temporary files, and the digests' lock files);
    /// returns the bytes freed. The caller holds the cache alone
    /// ([`Blobs::try_hold_cache_alone`]).
    pub fn prune(&self, keep: &[String]) -> u64 {
        // Digest locks are taken only under the cache's shared lock: none is held or about to be.
        if let Ok(rd) = std::fs::read_dir(self.dir.with_file_name("locks")) {
            for e in rd.flatten().filter(|e| e.file_name() != "cache.lock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut freed = 0;
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        for e in rd.flatten() {
            let name = format!("sha256:{}", e.file_name().to_string_lossy());
            if !keep.contains(&name) {
                freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = std::fs::remove_file(e.path());
            }
        }
        freed
    }
}

/// The layer blobs of one pull or import, locked ([`Blobs::hold_layers`]): the blobs it adds
/// to the cache are removed again when it is dropped before [`Layers::keep`], so a pull or
/// import that fails half-way leaves the cache as it found it.
#[derive(Debug)]
pub struct Layers {
    blobs: Blobs,
    added: Vec<String>,
    _held: Vec<Held>,
}

impl Layers {
    /// Store verified file `tmp` as layer `digest`, remembered as added by this attempt.
    pub fn commit(&mut self, tmp: &Path, digest: &str) -> Result<PathBuf, VmmError> {
        let p = self.blobs.commit(tmp, digest)?;
        self.added.push(digest.to_string());
        Ok(p)
    }

    /// Copy `r` into the cache as layer `digest` (verified) unless it is there already.
    pub fn insert(&mut self, r: impl Read, digest: &str) -> Result<PathBuf, VmmError> {
        if self.blobs.has(digest) {
            return self.blobs.path(digest);
        }
        let p = self.blobs.insert(r, digest)?;
        self.added.push(digest.to_string());
        Ok(p)
    }

    /// The image is stored: the blobs added stay (and the locks go).
    pub fn keep(mut self) {
        self.added.clear();
    }
}

impl Drop for Layers {
    fn drop(&mut self) {
        // Before the locks go (fields drop after this): no one else has used these blobs.
        for d in &self.added {
            if let Ok(p) = self.blobs.path(d) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

pub(crate) use crate::image::store::sha256_file;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_before_they_enter() {
        let d = std::env::temp_dir().join(format!("sistemo-blobs-{}", uuid::Uuid::new_v4().simple()));
        let b = Blobs::new(&d);
        let good = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"; // "hello"
        b.insert(&b"hello"[..], good).unwrap();
        assert!(b.has(good));
        let bad = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        let e = b.insert(&b"hello"[..], bad).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains(bad), "{e}");
        assert!(!b.has(bad));
        assert!(b.path("sha512:abc").is_err());
        assert!(b.path("sha256:../../etc").is_err());
        assert_eq!(b.list(), [good]);
        let locks = d.join("blobs/locks");
        std::fs::create_dir_all(&locks).unwrap();
        for f in ["cache.lock", "2cf2.lock"] {
            std::fs::write(locks.join(f), "").unwrap();
        }
        assert_eq!(b.prune(&[]), 5);
        assert!(b.list().is_empty());
        let left: Vec<_> = std::fs::read_dir(&locks)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            ["cache.lock"],
            "the digests' lock files go, the cache's stays"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
