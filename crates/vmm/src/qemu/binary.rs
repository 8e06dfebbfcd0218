//! Which QEMU a template was made by: the binary's content hash and `--version`, and its
//! firmware, looked up again whenever the files change (an upgrade while the daemon runs).
//!
//! A template restored by another QEMU may come back broken without failing, so the template
//! key must follow the exact binary. Hashing 18 MB on every deploy would cost ~40 ms: the hash
//! and the version are kept per file fingerprint (path, size, inode, change time) and computed
//! again only when that changes.

use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The microvm machine's firmware (qboot), which lives in the saved RAM of a template.
const FIRMWARE: &str = "/usr/share/qemu/bios-microvm.bin";

/// A file's fingerprint: its path, size, inode and change time (`missing` when it is absent).
pub(super) fn fingerprint(p: &Path) -> String {
    std::fs::metadata(p).map_or_else(
        |_| format!("{} missing", p.display()),
        |m| {
            format!(
                "{} {} {} {}.{}",
                p.display(),
                m.len(),
                m.ino(),
                m.ctime(),
                m.ctime_nsec()
            )
        },
    )
}

/// What one look at the binary found.
#[derive(Debug, Clone)]
struct Found {
    /// The fingerprints of the binary and the firmware when it was looked at.
    key: String,
    /// The sha256 of the binary.
    content: String,
    /// Its `--version` line (empty when it could not run).
    version: String,
}

/// The QEMU binary `name` (a path, or looked up in `PATH`), identified by content and version.
#[derive(Debug)]
pub(super) struct QemuBinary {
    name: PathBuf,
    /// The fingerprints the identity was computed for, and what was found then.
    cache: Mutex<Option<Found>>,
}

impl QemuBinary {
    pub(super) fn new(name: impl Into<PathBuf>) -> QemuBinary {
        QemuBinary {
            name: name.into(),
            cache: Mutex::new(None),
        }
    }

    /// The binary's path: `name` itself when it has a slash, else the first match in `PATH`.
    fn path(&self) -> PathBuf {
        if self.name.components().count() > 1 {
            return self.name.clone();
        }
        std::env::var_os("PATH")
            .and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(&self.name))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| self.name.clone())
    }

    /// One line naming this exact QEMU: the sha256 of the binary, its `--version` line and the
    /// firmware's fingerprint. Blocking (it may hash the binary and run it): call it where
    /// blocking is allowed; after the first call it only stats two files until they change.
    pub(super) fn identity(&self) -> String {
        let f = self.look();
        format!("{} {} {}", f.content, f.version, f.key)
    }

    /// The binary as it is now: from the cache while the fingerprints are unchanged.
    fn look(&self) -> Found {
        let path = self.path();
        let key = format!("{} {}", fingerprint(&path), fingerprint(Path::new(FIRMWARE)));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = cache.as_ref()
            && found.key == key
        {
            return found.clone();
        }
        let content = std::fs::read(&path).map_or_else(
            |e| format!("unreadable: {e}"),
            |bytes| format!("{:x}", Sha256::digest(bytes)),
        );
        let version = std::process::Command::new(&path)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let found = Found {
            key,
            content,
            version,
        };
        *cache = Some(found.clone());
        found
    }

    /// The `--version` line QEMU printed (empty when it could not run).
    #[cfg(test)]
    fn version(&self) -> String {
        self.look().version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sistemo-qemu-bin-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A stand-in QEMU at `path`, written aside and renamed into place as a package upgrade
    /// does (and so that no other test's fork holds it open for writing when it runs).
    fn script(path: &Path, body: &str) {
        let new = path.with_extension("new");
        std::fs::write(&new, format!("#!/bin/sh\n{body}\n")).unwrap();
        let mut perm = std::fs::metadata(&new).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&new, perm).unwrap();
        std::fs::rename(&new, path).unwrap();
    }

    #[test]
    fn a_binary_replaced_while_running_gets_a_new_identity() {
        let dir = scratch();
        let bin = dir.join("qemu-system-x86_64");
        script(&bin, "echo 'QEMU emulator version 7.2.0'");
        let q = QemuBinary::new(&bin);
        let first = q.identity();
        assert_eq!(q.version(), "QEMU emulator version 7.2.0");
        assert_eq!(first, q.identity(), "an unchanged binary keeps its identity");
        script(&bin, "echo 'QEMU emulator version 8.2.0'");
        assert_ne!(first, q.identity());
        assert_eq!(q.version(), "QEMU emulator version 8.2.0");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn same_version_other_content_is_another_qemu() {
        let dir = scratch();
        let bin = dir.join("qemu");
        script(&bin, "echo 'QEMU emulator version 7.2.0'");
        let q = QemuBinary::new(&bin);
        let first = q.identity();
        script(&bin, "# rebuilt\necho 'QEMU emulator version 7.2.0'");
        assert_eq!(q.version(), "QEMU emulator version 7.2.0");
        assert_ne!(
            first,
            q.identity(),
            "a rebuilt binary with the same version string"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
