//! File copy as tar streams, the same on both ends of `machine cp`: [`pack`] a file or directory
//! (modes, symlinks and mtimes kept), [`unpack`] it into a directory or as a new name.
//!
//! Unpacking goes through a private temporary directory next to the destination (the tar crate
//! refuses entries escaping it through `..` or symlinks), then renames into place: a failed or
//! cut-off copy leaves nothing half-written under the destination's name.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Write a tar archive of `src` to `out`; its single top entry is `src`'s file name.
pub fn pack<W: Write>(src: &Path, out: W) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let name = src.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot copy / itself: name a directory below it",
        )
    })?;
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    if meta.is_dir() {
        b.append_dir_all(name, src)?;
    } else {
        b.append_path_with_name(src, name)?;
    }
    b.into_inner()?.flush()
}

/// Unpack the archive on `input` to `dst`: into it when it is an existing directory, else as
/// `dst` itself (the archive's top entry renamed). Returns the path written.
pub fn unpack<R: Read>(input: R, dst: &Path) -> io::Result<PathBuf> {
    let (dir, rename_to) = if dst.is_dir() {
        (dst.to_path_buf(), None)
    } else {
        let parent = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", parent.display()),
            ));
        }
        (parent, dst.file_name().map(|n| n.to_os_string()))
    };
    let tmp = dir.join(format!(".sistemo-cp-{}-{}", std::process::id(), nanos()));
    fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    let res = (|| {
        let mut a = tar::Archive::new(input);
        a.set_preserve_permissions(true);
        a.set_preserve_mtime(true);
        a.set_preserve_ownerships(false);
        a.set_overwrite(true);
        a.unpack(&tmp)?;
        let mut tops = fs::read_dir(&tmp)?.collect::<io::Result<Vec<_>>>()?;
        if tops.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the archive has {} top entries, expected 1", tops.len()),
            ));
        }
        let top = tops.remove(0);
        let target = dir.join(rename_to.unwrap_or_else(|| top.file_name()));
        merge(&top.path(), &target)?;
        Ok(target)
    })();
    let _ = fs::remove_dir_all(&tmp);
    res
}

/// Move `src` to `dst`; directories are merged entry by entry into an existing one.
fn merge(src: &Path, dst: &Path) -> io::Result<()> {
    let s = fs::symlink_metadata(src)?;
    match fs::symlink_metadata(dst) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(src, dst),
        Err(e) => Err(e),
        Ok(d) if d.is_dir() && s.is_dir() => {
            for e in fs::read_dir(src)? {
                let e = e?;
                merge(&e.path(), &dst.join(e.file_name()))?;
            }
            fs::set_permissions(dst, s.permissions())
        }
        Ok(d) if d.is_dir() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("cannot overwrite directory {} with a file", dst.display()),
        )),
        Ok(_) if s.is_dir() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("cannot overwrite file {} with a directory", dst.display()),
        )),
        Ok(_) => fs::rename(src, dst),
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "sistemo-archive-{tag}-{}-{}",
            std::process::id(),
            nanos()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn round_trip(src: &Path, dst: &Path) -> PathBuf {
        let mut buf = Vec::new();
        pack(src, &mut buf).unwrap();
        unpack(&buf[..], dst).unwrap()
    }

    #[test]
    fn a_directory_keeps_modes_and_symlinks_and_lands_under_a_new_name_or_inside() {
        let t = tmpdir("dir");
        let src = t.join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("sub/run.sh"), fs::Permissions::from_mode(0o751)).unwrap();
        std::os::unix::fs::symlink("sub/run.sh", src.join("link")).unwrap();
        // Destination does not exist: the copy is named after it.
        let out = round_trip(&src, &t.join("copy"));
        assert_eq!(out, t.join("copy"));
        let m = fs::metadata(out.join("sub/run.sh")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o751);
        assert_eq!(fs::read_link(out.join("link")).unwrap(), Path::new("sub/run.sh"));
        // Destination is a directory: the copy goes inside it.
        let into = t.join("into");
        fs::create_dir(&into).unwrap();
        assert_eq!(round_trip(&src, &into), into.join("src"));
        assert!(into.join("src/sub/run.sh").is_file());
        // Nothing temporary is left next to the destination.
        assert!(fs::read_dir(&t).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".sistemo-cp")
        }));
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn a_file_replaces_a_file_but_never_a_directory() {
        let t = tmpdir("file");
        fs::write(t.join("a"), b"new").unwrap();
        fs::write(t.join("b"), b"old").unwrap();
        round_trip(&t.join("a"), &t.join("b"));
        assert_eq!(fs::read(t.join("b")).unwrap(), b"new");
        let mut buf = Vec::new();
        pack(&t.join("a"), &mut buf).unwrap();
        fs::create_dir_all(t.join("d/a")).unwrap();
        let e = unpack(&buf[..], &t.join("d")).unwrap_err();
        assert!(e.to_string().contains("cannot overwrite directory"), "{e}");
        assert!(pack(Path::new("/"), Vec::new()).is_err());
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn an_archive_escaping_its_directory_is_refused() {
        let t = tmpdir("evil");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`: write the raw name the way a hostile guest would.
        h.as_old_mut().name[..10].copy_from_slice(b"../escaped");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let dst = t.join("in");
        fs::create_dir(&dst).unwrap();
        let _ = unpack(&bytes[..], &dst);
        assert!(!t.join("escaped").exists());
        fs::remove_dir_all(&t).unwrap();
    }
}
