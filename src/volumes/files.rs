//! Volume files: sparse creation, `mkfs.ext4` without a mount, growth with e2fsck + resize2fs,
//! and copies that are reflinks (shared extents, instant) where the file system allows.

use crate::error::{Error, Result};
use sistemo_vmm::confine::on_image;
use sistemo_vmm::image::Priority;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tokio::process::Command;

/// How a file is copied on the data dir's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: the copy shares the source's extents (instant, no space used until written).
    Reflink,
    /// A sparse copy of the data extents (holes stay holes).
    Copy,
}

impl CopyMethod {
    /// How `doctor` says it.
    pub fn describe(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink: snapshots and clones are instant (shared extents)",
            CopyMethod::Copy => {
                "no reflink on this file system: snapshots and clones are sparse copies (use XFS or btrfs for instant ones)"
            }
        }
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(what)
}

/// Make `path` private to root (0600).
pub fn private(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("setting the mode of {}", path.display())))
}

/// Whether files in `dir` can be reflinked: two small probe files, removed again.
pub fn probe(dir: &Path) -> CopyMethod {
    let (a, b) = (dir.join(".reflink-probe-a"), dir.join(".reflink-probe-b"));
    let _ = std::fs::remove_file(&b);
    let ok = std::fs::write(&a, [1u8; 4096]).is_ok() && reflink_copy::reflink(&a, &b).is_ok();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    if ok { CopyMethod::Reflink } else { CopyMethod::Copy }
}

/// A new sparse file of `size` bytes (mode 0600); fails if it exists.
pub fn create_sparse(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    f.set_len(size)
        .map_err(io(format!("sizing {}", path.display())))?;
    private(path)
}

/// Copy `src` to a new file `dest` (mode 0600): a reflink where the file system can, else a
/// sparse copy reporting `(bytes done, bytes total)` to `progress` as it goes.
pub fn copy(src: &Path, dest: &Path, progress: &dyn Fn(u64, u64)) -> Result<CopyMethod> {
    let ctx = |what: &str| format!("{what} {} to {}", src.display(), dest.display());
    let _ = std::fs::remove_file(dest);
    let method = match reflink_copy::reflink(src, dest) {
        Ok(()) => CopyMethod::Reflink,
        Err(_) => {
            let _ = std::fs::remove_file(dest);
            let mut from = std::fs::File::open(src).map_err(io(ctx("opening")))?;
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dest)
                .map_err(io(ctx("creating")))?;
            sparse_copy(&mut from, &mut to, progress).map_err(io(ctx("copying")))?;
            CopyMethod::Copy
        }
    };
    private(dest)?;
    Ok(method)
}

/// Copy the data extents of `src` (`SEEK_DATA`/`SEEK_HOLE`) in 64 MiB pieces through the kernel
/// (`copy_file_range` by `std::io::copy`); the length is kept, holes stay holes.
fn sparse_copy(
    src: &mut std::fs::File,
    dest: &mut std::fs::File,
    progress: &dyn Fn(u64, u64),
) -> std::io::Result<()> {
    use nix::unistd::{Whence, lseek};
    use std::io::Read;
    const PIECE: u64 = 64 << 20;
    let len = src.metadata()?.len();
    let mut off: i64 = 0;
    while (off as u64) < len {
        let data = match lseek(&*src, off, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(&*src, data, Whence::SeekHole)?;
        let mut at = data as u64;
        while at < hole as u64 {
            let n = PIECE.min(hole as u64 - at);
            src.seek(SeekFrom::Start(at))?;
            dest.seek(SeekFrom::Start(at))?;
            std::io::copy(&mut (&*src).take(n), dest)?;
            at += n;
            progress(at, len);
        }
        off = hole;
    }
    dest.set_len(len)?;
    progress(len, len);
    Ok(())
}

async fn run(cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    let o = cmd
        .output()
        .await
        .map_err(io(format!("running {what} (is e2fsprogs installed?)")))?;
    Ok(o)
}

fn failed(what: &str, o: &std::process::Output) -> Error {
    Error::Io {
        what: format!("{what} failed ({})", o.status),
        source: std::io::Error::other(String::from_utf8_lossy(&o.stderr).trim().replace('\n', " ")),
    }
}

/// `mkfs.ext4` on the file itself (no mount, no loop device); inode tables are initialised
/// lazily by the guest's kernel, so a large volume is made in milliseconds.
pub async fn mkfs_ext4(path: &Path, label: &str) -> Result<()> {
    let label: String = label.chars().take(16).collect();
    let o = run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                &label,
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ])
            .arg(path),
        "mkfs.ext4",
    )
    .await?;
    if !o.status.success() {
        return Err(failed("mkfs.ext4", &o));
    }
    Ok(())
}

/// Grow the file to `size` and, for ext4, check the file system and grow it to fill the file.
pub async fn grow(path: &Path, size: u64, ext4: bool) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size))
        .map_err(io(format!("growing {}", path.display())))?;
    if !ext4 {
        return Ok(());
    }
    // e2fsck: 0 clean, 1 errors fixed, 2 fixed (reboot wanted); anything above is a failure.
    // Both parse what a guest wrote: confined (see `sistemo_vmm::confine`).
    let o = on_image("e2fsck", &["-fp"], path, Priority::Normal).await?;
    if o.status.code().is_none_or(|c| c > 2) {
        return Err(failed("e2fsck", &o));
    }
    let o = on_image("resize2fs", &[], path, Priority::Normal).await?;
    if !o.status.success() {
        return Err(failed("resize2fs", &o));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn copies_keep_content_length_and_holes() {
        let d = std::env::temp_dir().join(format!("sistemo-volfiles-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        let a = d.join("a");
        {
            let mut f = std::fs::File::create(&a).unwrap();
            f.write_all(b"head").unwrap();
            f.seek(SeekFrom::Start(100 << 20)).unwrap();
            f.write_all(b"tail").unwrap();
            f.set_len(200 << 20).unwrap();
        }
        let seen = std::sync::Mutex::new(Vec::new());
        let m = copy(&a, &d.join("b"), &|done, total| {
            seen.lock().unwrap().push((done, total))
        })
        .unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(d.join("b")).unwrap());
        let md = std::fs::metadata(d.join("b")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        if m == CopyMethod::Copy {
            use std::os::unix::fs::MetadataExt;
            assert!(md.blocks() * 512 < 4 << 20, "holes stay holes");
            assert_eq!(seen.lock().unwrap().last(), Some(&(200 << 20, 200 << 20)));
        }
        assert_eq!(probe(&d), m);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
