//! Layers built in memory with the `tar` crate (raw headers, so that hostile paths the crate's
//! builder would refuse can be written too) and applied to a temporary tree.

use super::*;
use std::os::unix::fs::MetadataExt;
use tar::{EntryType, Header};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sistemo-layer-{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts() -> ApplyOptions {
    ApplyOptions {
        privileged: nix::unistd::geteuid().is_root(),
        max_bytes: 1 << 30,
    }
}

/// A layer under construction.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn raw(&mut self, path: &str, kind: EntryType, mode: u32, link: &str, data: &[u8]) -> &mut Self {
        let mut h = Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn file(&mut self, path: &str, mode: u32, data: &str) -> &mut Self {
        self.raw(path, EntryType::Regular, mode, "", data.as_bytes())
    }
    fn dir(&mut self, path: &str) -> &mut Self {
        self.raw(path, EntryType::Directory, 0o755, "", b"")
    }
    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(path, EntryType::Symlink, 0o777, target, b"")
    }
    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(path, EntryType::Link, 0o644, target, b"")
    }
    /// A device node (or FIFO) `major:minor`.
    fn device(&mut self, path: &str, kind: EntryType, mode: u32, major: u32, minor: u32) -> &mut Self {
        let mut h = Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(0);
        h.set_uid(1234);
        h.set_gid(5678);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.0.append(&h, &b""[..]).unwrap();
        self
    }
    /// A PAX header carrying `key=value` for the next entry.
    fn pax(&mut self, key: &str, value: &[u8]) -> &mut Self {
        let body_len = key.len() + value.len() + 3;
        let mut len = body_len + body_len.to_string().len();
        if len.to_string().len() != body_len.to_string().len() {
            len += 1;
        }
        let mut rec = format!("{len} {key}=").into_bytes();
        rec.extend_from_slice(value);
        rec.push(b'\n');
        assert_eq!(rec.len(), len);
        self.raw("pax", EntryType::XHeader, 0o644, "", &rec)
    }
    fn bytes(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
    fn apply(&mut self, root: &Path) -> Result<(), VmmError> {
        apply_layer(root, &self.bytes()[..], "test", opts())
    }
}

#[test]
fn files_links_modes_and_owners_are_applied() {
    let root = tmp("basic");
    Layer::new()
        .dir("usr/")
        .dir("usr/bin/")
        .file("usr/bin/tool", 0o4755, "#!/bin/sh\n")
        .symlink("bin", "usr/bin")
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .file("./etc/conf", 0o600, "x=1\n")
        .raw("run/fifo", EntryType::Fifo, 0o640, "", b"")
        .apply(&root)
        .unwrap();
    let tool = std::fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(tool.mtime(), 1_600_000_000);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        std::fs::metadata(root.join("usr/bin/tool2")).unwrap().ino(),
        tool.ino()
    );
    assert_eq!(
        std::fs::read_link(root.join("bin")).unwrap(),
        PathBuf::from("usr/bin")
    );
    assert_eq!(std::fs::read_to_string(root.join("etc/conf")).unwrap(), "x=1\n");
    assert_eq!(
        std::fs::metadata(root.join("etc/conf")).unwrap().mode() & 0o7777,
        0o600
    );
    assert!(
        std::fs::symlink_metadata(root.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    if opts().privileged {
        assert_eq!((tool.uid(), tool.gid()), (1234, 5678));
        let l = std::fs::symlink_metadata(root.join("bin")).unwrap();
        assert_eq!((l.uid(), l.gid()), (1234, 5678), "a symlink's own owner");
    }
    // A later layer writing through the `bin` symlink lands in usr/bin.
    Layer::new().file("bin/other", 0o755, "o").apply(&root).unwrap();
    assert!(root.join("usr/bin/other").is_file());
    std::fs::remove_dir_all(&root).unwrap();
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
    let root = tmp("wh");
    Layer::new()
        .file("a/old", 0o644, "1")
        .file("a/keep", 0o644, "1")
        .file("o/lower1", 0o644, "1")
        .dir("o/lowerdir/")
        .file("o/lowerdir/f", 0o644, "1")
        .file("p/lower", 0o644, "1")
        .apply(&root)
        .unwrap();
    Layer::new()
        .file("a/.wh.old", 0o644, "")
        // The marker after this layer's own entries, and before them, in two directories.
        .file("o/new", 0o644, "2")
        .file("o/sub/deep", 0o644, "2")
        .file("o/.wh..wh..opq", 0o644, "")
        .file("p/.wh..wh..opq", 0o644, "")
        .file("p/new", 0o644, "2")
        .apply(&root)
        .unwrap();
    assert!(!root.join("a/old").exists(), "whiteout removes");
    assert!(
        !root.join("a/.wh.old").exists(),
        "the marker itself is not a file"
    );
    assert!(root.join("a/keep").exists());
    let names = |d: &str| {
        let mut v: Vec<String> = std::fs::read_dir(root.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("o"), ["new", "sub"]);
    assert_eq!(std::fs::read_to_string(root.join("o/sub/deep")).unwrap(), "2");
    assert_eq!(names("p"), ["new"]);
    // A whiteout of a directory removes it with its content.
    Layer::new().file(".wh.o", 0o644, "").apply(&root).unwrap();
    assert!(!root.join("o").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_file_replaces_a_directory_and_back() {
    let root = tmp("replace");
    Layer::new().file("x/y", 0o644, "1").apply(&root).unwrap();
    Layer::new().file("x", 0o644, "file").apply(&root).unwrap();
    assert_eq!(std::fs::read_to_string(root.join("x")).unwrap(), "file");
    Layer::new().dir("x/").apply(&root).unwrap();
    assert!(root.join("x").is_dir());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn nothing_is_written_outside_the_tree() {
    let base = tmp("escape");
    let root = base.join("root");
    std::fs::create_dir(&root).unwrap();
    let outside = base.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let refused = |l: &mut Layer| {
        let e = l.apply(&root).unwrap_err().to_string();
        assert!(e.contains("refused"), "{e}");
        e
    };
    assert!(refused(Layer::new().file("../outside/x", 0o644, "evil")).contains("`..`"));
    refused(Layer::new().file("a/../../outside/x", 0o644, "evil"));
    refused(Layer::new().hardlink("h", "../outside/secret"));
    refused(Layer::new().file("../.wh.outside", 0o644, ""));
    // Symlinks pointing out are followed inside the tree only.
    Layer::new()
        .symlink("abs", &outside.display().to_string())
        .symlink("up", "../../../../..")
        .symlink("rootlink", "/")
        .apply(&root)
        .unwrap();
    Layer::new()
        .file("abs/x", 0o644, "1")
        .file("up/outside/y", 0o644, "2")
        .file("rootlink/z", 0o644, "3")
        .apply(&root)
        .unwrap();
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing escaped");
    let inside = root.join(outside.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read_to_string(inside.join("x")).unwrap(), "1");
    assert_eq!(std::fs::read_to_string(root.join("outside/y")).unwrap(), "2");
    assert_eq!(std::fs::read_to_string(root.join("z")).unwrap(), "3");
    // A hard link through a symlink to a host file finds no such file in the tree.
    std::fs::write(outside.join("secret"), "s").unwrap();
    refused(Layer::new().hardlink("h", "abs/secret"));
    // A whiteout through a symlink removes inside the tree only.
    Layer::new()
        .file("abs/.wh.secret", 0o644, "")
        .apply(&root)
        .unwrap();
    assert!(outside.join("secret").exists());
    // A symlink loop is an error, not a hang.
    Layer::new().symlink("loop", "loop").apply(&root).unwrap();
    assert!(Layer::new().file("loop/x", 0o644, "").apply(&root).is_err());
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn xattrs_and_compression() {
    let root = tmp("xattr");
    let mut l = Layer::new();
    l.pax("SCHILY.xattr.user.sistemo", b"yes")
        .file("f", 0o644, "data");
    let tar = l.bytes();
    // gzip and zstd, recognised by their magic bytes.
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (name, blob) in [("plain", tar.clone()), ("gzip", gz), ("zstd", zst)] {
        let f = root.join(format!("{name}.blob"));
        std::fs::write(&f, &blob).unwrap();
        let tree = root.join(name);
        std::fs::create_dir(&tree).unwrap();
        apply_layer(&tree, open_layer(&f).unwrap(), name, opts()).unwrap();
        assert_eq!(std::fs::read_to_string(tree.join("f")).unwrap(), "data", "{name}");
        match xattr::get(tree.join("f"), "user.sistemo") {
            Ok(v) => assert_eq!(v.as_deref(), Some(&b"yes"[..]), "{name}"),
            Err(e) => eprintln!("user xattrs unsupported here: {e}"),
        }
    }
    // Garbage is refused, naming the layer.
    let e = apply_layer(
        &root,
        &b"not a tar at all, just some bytes"[..],
        "sha256:abc",
        opts(),
    );
    assert!(e.is_err());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_layer_over_the_size_limit_is_refused() {
    let root = tmp("bomb");
    let e = apply_layer(
        &root,
        &Layer::new().file("big", 0o644, &"x".repeat(4096)).bytes()[..],
        "sha256:big",
        ApplyOptions {
            privileged: false,
            max_bytes: 1024,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("layer sha256:big") && e.contains("limit"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn device_nodes_keep_their_kind_numbers_mode_and_owner() {
    use std::os::unix::fs::FileTypeExt;
    let root = tmp("dev");
    Layer::new()
        .dir("dev")
        .file("dev/null", 0o644, "a file below")
        .apply(&root)
        .unwrap();
    Layer::new()
        .device("dev/null", EntryType::Char, 0o666, 1, 3)
        .device("dev/sda1", EntryType::Block, 0o660, 8, 1)
        .device("run/fifo", EntryType::Fifo, 0o620, 0, 0)
        .apply(&root)
        .unwrap();
    let fifo = std::fs::symlink_metadata(root.join("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);
    if !opts().privileged {
        // Not root: device nodes cannot be made, and are skipped (the lower file stays).
        assert!(
            std::fs::symlink_metadata(root.join("dev/null"))
                .unwrap()
                .is_file()
        );
        assert!(!root.join("dev/sda1").exists());
        std::fs::remove_dir_all(&root).unwrap();
        return;
    }
    for (path, char_dev, mode, major, minor) in
        [("dev/null", true, 0o666, 1, 3), ("dev/sda1", false, 0o660, 8, 1)]
    {
        let m = std::fs::symlink_metadata(root.join(path)).unwrap();
        let t = m.file_type();
        assert_eq!(
            (t.is_char_device(), t.is_block_device()),
            (char_dev, !char_dev),
            "{path}"
        );
        assert_eq!(m.mode() & 0o7777, mode, "{path}");
        assert_eq!((m.uid(), m.gid()), (1234, 5678), "{path}");
        assert_eq!(
            (nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev())),
            (major, minor),
            "{path}"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}
