//! Disk files: `mkfs.ext4 -d` of a tree into a sparse image, and each machine's private disk
//! cloned from an image (FICLONE reflink, else a hole-keeping copy) and grown with resize2fs.

use crate::VmmError;
use crate::confine::on_image;
use crate::proc::{failed, run};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use tokio::process::Command;

/// Bytes a tree takes on disk, in 4 KiB blocks, not following symlinks.
fn dir_size(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if md.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum::<u64>())
            .unwrap_or(0)
            + 4096
    } else {
        md.len().div_ceil(4096) * 4096
    }
}

/// `mkfs.ext4 -d tree` into a new sparse image sized for the tree plus headroom.
pub async fn make_ext4(tree: &Path, image: &Path, label: &str) -> Result<(), VmmError> {
    let used = dir_size(tree);
    let size = ((used as f64 * 1.3) as u64 + (128 << 20)).div_ceil(1 << 20) << 20;
    let f = std::fs::File::create(image).map_err(VmmError::io(format!("creating {}", image.display())))?;
    f.set_len(size).map_err(VmmError::io("sizing the image"))?;
    drop(f);
    run(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                label,
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-d",
            ])
            .arg(tree)
            .arg(image),
        "mkfs.ext4",
    )
    .await
    .map(|_| ())
}

/// Clone `src` into a new file with the `FICLONE` ioctl (shared extents, instant).
/// The one `unsafe` block in this crate: `ioctl(dest_fd, FICLONE, src_fd)` on two open files
/// we own; the kernel validates both descriptors and fails with EOPNOTSUPP/EXDEV when the
/// file system cannot share extents.
fn reflink(src: &std::fs::File, dest: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const FICLONE: libc::c_ulong = 0x4004_9409; // _IOW(0x94, 9, int)
    // SAFETY: both fds are valid for the duration of the call (borrowed `File`s); FICLONE
    // takes the source fd as an integer argument and touches no user memory.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Copy `src` to `dest` keeping holes: only the data extents (`SEEK_DATA`/`SEEK_HOLE`) are
/// copied, in the kernel (`copy_file_range` through `std::io::copy`); a file system without
/// extent seeking gets a block-by-block copy that skips blocks of zeros.
fn sparse_copy(src: &mut std::fs::File, dest: &mut std::fs::File) -> std::io::Result<()> {
    use nix::unistd::{Whence, lseek};
    let len = src.metadata()?.len();
    let mut off: i64 = 0;
    loop {
        let data = match lseek(&*src, off, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) if off == 0 => return zero_skipping_copy(src, dest),
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(&*src, data, Whence::SeekHole)?;
        src.seek(SeekFrom::Start(data as u64))?;
        dest.seek(SeekFrom::Start(data as u64))?;
        std::io::copy(&mut (&*src).take((hole - data) as u64), dest)?;
        off = hole;
    }
    dest.set_len(len)
}

/// Block-by-block copy that skips blocks of zeros with a seek.
fn zero_skipping_copy(src: &mut std::fs::File, dest: &mut std::fs::File) -> std::io::Result<()> {
    let len = src.metadata()?.len();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0u64;
    src.seek(SeekFrom::Start(0))?;
    while off < len {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            dest.seek(SeekFrom::Current(n as i64))?;
        } else {
            dest.write_all(&buf[..n])?;
        }
        off += n as u64;
    }
    dest.set_len(len)
}

/// How a disk copy runs: at the daemon's priority on a deploy's path, or at the lowest CPU and
/// I/O priority (`nice -n 19 ionice -c 3`) for a spare made in the background, so that the
/// machines starting meanwhile do not wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A deploy waits for it.
    Normal,
    /// Nothing waits for it.
    Idle,
}

/// `prog` run at `prio`.
pub(crate) fn command(prog: &str, prio: Priority) -> Command {
    match prio {
        Priority::Normal => Command::new(prog),
        Priority::Idle => {
            let mut c = Command::new("nice");
            c.args(["-n", "19", "ionice", "-c", "3", prog]);
            c
        }
    }
}

/// Make `dest` a private copy of `image` (reflink when the filesystem can, else a sparse copy),
/// grown to `size_bytes` with its ext4 resized to fill it. Never mounts anything.
pub async fn clone_disk(image: &Path, dest: &Path, size_bytes: u64) -> Result<(), VmmError> {
    clone_disk_at(image, dest, size_bytes, Priority::Normal).await
}

/// [`clone_disk`] at `prio`. The copy runs off the async workers: on the blocking pool, or at
/// [`Priority::Idle`] as `cp --reflink=always`, else `dd conv=sparse oflag=direct`.
pub async fn clone_disk_at(
    image: &Path,
    dest: &Path,
    size_bytes: u64,
    prio: Priority,
) -> Result<(), VmmError> {
    let ctx = |what: &str| format!("{what} {} to {}", image.display(), dest.display());
    let img_len = std::fs::metadata(image)
        .map_err(VmmError::io(ctx("cloning")))?
        .len();
    if size_bytes < img_len {
        return Err(VmmError::Command {
            what: ctx("cloning"),
            reason: format!("requested size {size_bytes} is smaller than the image ({img_len} bytes)"),
        });
    }
    let tmp = dest.with_extension("cloning");
    let copied = match prio {
        Priority::Normal => {
            let (src, out) = (image.to_path_buf(), tmp.clone());
            tokio::task::spawn_blocking(move || {
                let mut src = std::fs::File::open(&src)?;
                let mut out = std::fs::File::create(&out)?;
                if reflink(&src, &out).is_err() {
                    sparse_copy(&mut src, &mut out)?;
                }
                // No fsync: a disk half-written by a crash belongs to a deploy that start-up
                // rolls back.
                Ok(())
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(VmmError::io(ctx("copying")))
        }
        Priority::Idle => {
            let reflinked = Command::new("cp")
                .arg("--reflink=always")
                .arg(image)
                .arg(&tmp)
                .output()
                .await
                .is_ok_and(|o| o.status.success());
            if reflinked {
                Ok(())
            } else {
                // O_DIRECT: the copy leaves no dirty pages behind, which the fsyncs of a deploy
                // starting meanwhile (its initrd, its workload) would otherwise wait for.
                let mut of = std::ffi::OsString::from("of=");
                of.push(&tmp);
                let mut inf = std::ffi::OsString::from("if=");
                inf.push(image);
                let direct = run(
                    command("dd", prio).arg(inf).arg(of).args([
                        "bs=64K",
                        "conv=sparse",
                        "oflag=direct",
                        "status=none",
                    ]),
                    "dd",
                )
                .await;
                match direct {
                    Ok(_) => Ok(()),
                    // A file system without O_DIRECT: a plain sparse copy.
                    Err(_) => run(
                        command("cp", prio).arg("--sparse=always").arg(image).arg(&tmp),
                        "cp",
                    )
                    .await
                    .map(|_| ()),
                }
            }
        }
    };
    if let Err(e) = match copied {
        Ok(()) => grow_disk_at(&tmp, size_bytes, prio).await,
        Err(e) => Err(e),
    } {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(VmmError::io(ctx("placing")))
}

/// Grow a raw ext4 disk file to `size_bytes` and its file system to fill it (no-op when it is
/// that size already). Never mounts anything.
pub async fn grow_disk(disk: &Path, size_bytes: u64) -> Result<(), VmmError> {
    grow_disk_at(disk, size_bytes, Priority::Normal).await
}

async fn grow_disk_at(disk: &Path, size_bytes: u64, prio: Priority) -> Result<(), VmmError> {
    let len = std::fs::metadata(disk)
        .map_err(VmmError::io(format!("reading {}", disk.display())))?
        .len();
    if size_bytes <= len {
        return Ok(());
    }
    // resize2fs and e2fsck parse the file system: never on something that is not one.
    super::check_ext4(disk, &disk.display().to_string())?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|f| f.set_len(size_bytes))
        .map_err(VmmError::io(format!("growing {}", disk.display())))?;
    let first = on_image("resize2fs", &[], disk, prio).await?;
    if !first.status.success() {
        // Images that were mounted before want a check first.
        on_image("e2fsck", &["-fp"], disk, prio).await?;
        let again = on_image("resize2fs", &[], disk, prio).await?;
        if !again.status.success() {
            return Err(failed("resize2fs", &again.status, &again.stderr));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sistemo-vmm-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let d = tmpdir("sparse");
        let a = d.join("a");
        {
            let mut f = std::fs::File::create(&a).unwrap();
            f.write_all(b"head").unwrap();
            f.seek(SeekFrom::Start(10 << 20)).unwrap();
            f.write_all(b"tail").unwrap();
        }
        let mut src = std::fs::File::open(&a).unwrap();
        let mut dst = std::fs::File::create(d.join("b")).unwrap();
        sparse_copy(&mut src, &mut dst).unwrap();
        drop(dst);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(d.join("b")).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(d.join("b")).unwrap().blocks() * 512 < 1 << 20);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn zero_skipping_copy_keeps_content_and_length() {
        let d = tmpdir("zeros");
        let a = d.join("a");
        let mut data = vec![0u8; 200_000];
        data[70_000..70_004].copy_from_slice(b"data");
        std::fs::write(&a, &data).unwrap();
        let mut src = std::fs::File::open(&a).unwrap();
        let mut dst = std::fs::File::create(d.join("b")).unwrap();
        zero_skipping_copy(&mut src, &mut dst).unwrap();
        drop(dst);
        assert_eq!(std::fs::read(d.join("b")).unwrap(), data);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn an_idle_clone_keeps_content_and_holes() {
        let d = tmpdir("idle");
        let a = d.join("a");
        {
            let mut f = std::fs::File::create(&a).unwrap();
            f.write_all(b"head").unwrap();
            f.seek(SeekFrom::Start(10 << 20)).unwrap();
            f.write_all(b"tail").unwrap();
        }
        let len = std::fs::metadata(&a).unwrap().len();
        clone_disk_at(&a, &d.join("b"), len, Priority::Idle)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(d.join("b")).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(d.join("b")).unwrap().blocks() * 512 < 1 << 20);
        assert!(!d.join("b.cloning").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_disk_smaller_than_its_image_is_refused() {
        let d = tmpdir("small");
        let img = d.join("img");
        std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let e = clone_disk(&img, &d.join("disk"), 4096).await.unwrap_err();
        assert!(e.to_string().contains("smaller than the image"), "{e}");
        assert!(!d.join("disk").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
