//! Applying one image layer (a tar, plain, gzip or zstd) onto a directory tree, as the OCI image
//! spec says: whiteouts and opaque directories, hard links, symlinks, devices, ownership, modes
//! and xattrs. Layers are untrusted: no entry is ever written outside the tree.
//!
//! Paths are resolved inside the tree the way the guest's kernel will resolve them: a symlink
//! met on the way (`lib -> usr/lib`, or `/etc/x -> /usr/x`) is followed *within* the tree, an
//! absolute target starting again at the tree's root and `..` stopping there, so a crafted
//! symlink cannot lead a later entry out of it. An entry's own last component is never
//! followed: it is replaced. An entry path containing `..` is refused.

use crate::VmmError;
use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Symlinks followed while resolving one path before giving up (the kernel's limit).
const MAX_LINKS: usize = 40;
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// How layers are applied.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// Set owners (uid/gid) and create device nodes: needs root. Without it (tests as a user)
    /// files belong to the caller and device entries are skipped.
    pub privileged: bool,
    /// Most bytes the regular files of one layer may hold (a decompression bomb stops here).
    pub max_bytes: u64,
}

/// Open a layer blob, undoing its compression (recognised by its magic bytes: gzip, zstd, or
/// none).
pub fn open_layer(path: &Path) -> Result<Box<dyn Read>, VmmError> {
    let f = std::fs::File::open(path).map_err(VmmError::io(format!("opening layer {}", path.display())))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let head = r
        .fill_buf()
        .map_err(VmmError::io(format!("reading layer {}", path.display())))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(r)
                .map_err(VmmError::io(format!("reading layer {}", path.display())))?,
        )
    } else {
        Box::new(r)
    })
}

/// Apply the tar stream `layer` (named `name` in errors) onto `root`.
pub fn apply_layer(root: &Path, layer: impl Read, name: &str, opts: ApplyOptions) -> Result<(), VmmError> {
    let refused = |reason: String| VmmError::ImageRefused {
        reference: format!("layer {name}"),
        reason,
    };
    let mut ar = tar::Archive::new(layer);
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut bytes = 0u64;
    let entries = ar
        .entries()
        .map_err(|e| refused(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| refused(format!("not a valid tar archive: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = clean(&raw).map_err(|why| refused(format!("entry {shown:?} {why}")))?;
        let io = |what: &str| VmmError::io(format!("{what} {shown:?} of layer {name}"));
        let Some((last, dirs)) = parts.split_last() else {
            // The root itself: only its metadata.
            if entry.header().entry_type().is_dir() {
                set_meta(root, &mut entry, opts).map_err(io("setting the metadata of"))?;
            }
            continue;
        };
        let parent = resolve_dir(root, dirs).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotADirectory => refused(format!("entry {shown:?} is under a non-directory")),
            _ => io("resolving")(e),
        })?;
        let last_s = last.to_string_lossy();
        if last_s == OPAQUE {
            // Everything lower layers put in this directory goes; what this layer wrote stays.
            for child in std::fs::read_dir(&parent).map_err(io("reading the directory of"))? {
                let p = child.map_err(io("reading the directory of"))?.path();
                if !written.contains(&p) {
                    remove(&p).map_err(io("applying the opaque marker"))?;
                }
            }
            continue;
        }
        if let Some(hidden) = last_s.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(refused(format!("entry {shown:?} is not a valid whiteout")));
            }
            let p = parent.join(hidden);
            if !written.contains(&p) {
                remove(&p).map_err(io("applying the whiteout"))?;
            }
            continue;
        }
        let dest = parent.join(last);
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match std::fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove(&dest).map_err(io("replacing"))?;
                        std::fs::create_dir(&dest).map_err(io("creating"))?;
                    }
                    Err(_) => std::fs::create_dir(&dest).map_err(io("creating"))?,
                }
                set_meta(&dest, &mut entry, opts).map_err(io("setting the metadata of"))?;
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                remove(&dest).map_err(io("replacing"))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .map_err(io("creating"))?;
                let size = entry.size();
                bytes += size;
                if bytes > opts.max_bytes {
                    return Err(refused(format!(
                        "its files hold more than {} MiB (the image size limit)",
                        opts.max_bytes >> 20
                    )));
                }
                std::io::copy(&mut entry, &mut f).map_err(io("writing"))?;
                drop(f);
                set_meta(&dest, &mut entry, opts).map_err(io("setting the metadata of"))?;
            }
            T::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(format!("symlink {shown:?} has no target")))?
                    .into_owned();
                remove(&dest).map_err(io("replacing"))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dest).map_err(io("creating"))?;
                set_meta(&dest, &mut entry, opts).map_err(io("setting the metadata of"))?;
            }
            T::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(format!("hard link {shown:?} has no target")))?
                    .into_owned();
                let tparts = clean(&target).map_err(|why| {
                    refused(format!(
                        "hard link {shown:?} to {:?} {why}",
                        String::from_utf8_lossy(&target)
                    ))
                })?;
                let Some((tlast, tdirs)) = tparts.split_last() else {
                    return Err(refused(format!("hard link {shown:?} points at the root")));
                };
                let src = resolve_dir(root, tdirs)
                    .map_err(io("resolving the target of"))?
                    .join(tlast);
                match std::fs::symlink_metadata(&src) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(refused(format!(
                            "hard link {shown:?} points at {:?}, which is not a file of the image",
                            String::from_utf8_lossy(&target)
                        )));
                    }
                }
                if src != dest {
                    remove(&dest).map_err(io("replacing"))?;
                    std::fs::hard_link(&src, &dest).map_err(io("linking"))?;
                }
            }
            T::Char | T::Block | T::Fifo => {
                if kind != T::Fifo && !opts.privileged {
                    tracing::debug!(entry = %shown, "skipping a device node (not root)");
                    continue;
                }
                remove(&dest).map_err(io("replacing"))?;
                let h = entry.header();
                let (major, minor) = (
                    h.device_major().ok().flatten().unwrap_or(0),
                    h.device_minor().ok().flatten().unwrap_or(0),
                );
                use nix::sys::stat::{Mode, SFlag, makedev, mknod};
                let sflag = match kind {
                    T::Char => SFlag::S_IFCHR,
                    T::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                mknod(
                    &dest,
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    makedev(major.into(), minor.into()),
                )
                .map_err(|e| io("creating the device")(e.into()))?;
                set_meta(&dest, &mut entry, opts).map_err(io("setting the metadata of"))?;
            }
            // PAX and GNU long-name headers are folded into the next entry by the tar reader.
            other => {
                tracing::debug!(entry = %shown, kind = ?other, "skipping a tar entry of an unsupported type");
                continue;
            }
        }
        // The entry and the directories leading to it belong to this layer now: an opaque
        // marker later in the same layer keeps them.
        let mut p = dest.as_path();
        while p != root && written.insert(p.to_path_buf()) {
            p = p.parent().unwrap_or(root);
        }
    }
    Ok(())
}

/// The components of an entry path, without `.`, empty parts and a leading `/`; `..` is an
/// error (no legitimate layer needs it, and it is the classic way out of the tree).
fn clean(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.contains(&0) {
        return Err("contains a NUL byte");
    }
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("contains `..` (allowed: paths inside the image)"),
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

/// The directory `parts` names inside `root`, symlinks followed within `root`; missing
/// directories are created (0755, as container runtimes do).
pub(crate) fn resolve_dir(root: &Path, parts: &[OsString]) -> std::io::Result<PathBuf> {
    let mut todo: VecDeque<OsString> = parts.iter().cloned().collect();
    let mut cur: Vec<OsString> = Vec::new();
    let mut links = 0;
    let here = |cur: &[OsString]| {
        let mut p = root.to_path_buf();
        p.extend(cur);
        p
    };
    while let Some(c) = todo.pop_front() {
        if c.is_empty() || c == "." {
            continue;
        }
        if c == ".." {
            cur.pop();
            continue;
        }
        let p = here(&cur).join(&c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let t = std::fs::read_link(&p)?;
                let t = t.as_os_str().as_bytes();
                if t.starts_with(b"/") {
                    cur.clear();
                }
                let mut next: VecDeque<OsString> = t
                    .split(|&b| b == b'/')
                    .map(|s| OsStr::from_bytes(s).to_os_string())
                    .collect();
                next.extend(todo);
                todo = next;
            }
            Ok(m) if m.is_dir() => cur.push(c),
            Ok(_) => return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&p)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
                cur.push(c);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(here(&cur))
}

/// Remove whatever is at `p` (a directory with its content), never following a symlink.
fn remove(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Owner, mode (with setuid/setgid/sticky), xattrs and mtime, in that order: a chown clears
/// setuid bits and file capabilities, so they come after it.
fn set_meta<R: Read>(p: &Path, entry: &mut tar::Entry<'_, R>, opts: ApplyOptions) -> std::io::Result<()> {
    let h = entry.header();
    let is_link = h.entry_type().is_symlink();
    // An empty numeric field (some writers leave them blank) means 0, or the usual mode.
    if opts.privileged {
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
    }
    let default_mode = if h.entry_type().is_dir() { 0o755 } else { 0o644 };
    let mode = h.mode().unwrap_or(default_mode) & 0o7777;
    let mtime = h.mtime().unwrap_or(0);
    if !is_link {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    }
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            let name = OsStr::from_bytes(name);
            if let Err(e) = xattr::set(p, name, ext.value_bytes()) {
                // File capabilities are part of what the image means; other attributes (an
                // SELinux label the host's kernel does not know) are best effort.
                if name == "security.capability" && opts.privileged {
                    return Err(e);
                }
                tracing::debug!(file = %p.display(), xattr = ?name, error = %e, "xattr not set");
            }
        }
    }
    let t = nix::sys::time::TimeSpec::new(mtime as i64, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
#[path = "layer_tests.rs"]
mod tests;
