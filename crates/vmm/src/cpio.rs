//! A minimal writer of `newc` cpio archives, the format the Linux kernel unpacks as initramfs.
//! Pure and in memory: the boot assets and every machine's config archive are built with it.

/// An in-memory `newc` archive under construction.
#[derive(Debug, Default)]
pub(crate) struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    /// An empty archive.
    pub(crate) fn new() -> Self {
        CpioWriter {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry_rdev(name, mode, data, (0, 0));
    }

    fn entry_rdev(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.header(name, mode, data.len(), rdev);
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// An entry's header and name, padded: its `size` bytes of data come next.
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so archives are reproducible
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            namesize,
            0, // check
        );
        self.ino += 1;
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Add a directory (parents must be added first).
    pub(crate) fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, 0o040000 | (perm & 0o7777), &[]);
    }

    /// Add a regular file.
    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | (perm & 0o7777), data);
    }

    /// Add a symbolic link pointing at `target`.
    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    /// Add a character device node (e.g. `dev/console`, 5:1).
    pub(crate) fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry_rdev(name, 0o020000 | (perm & 0o7777), &[], (major, minor));
    }

    /// Add the header of a regular file of `size` bytes and return the archive so far, open:
    /// the caller writes the file's data after it, pads it to 4 bytes and closes the archive
    /// (an empty archive's [`finish`](Self::finish) is its trailer). For data streamed from a
    /// file rather than held in memory.
    pub(crate) fn file_header(&mut self, name: &str, perm: u32, size: usize) -> &mut Self {
        self.header(name, 0o100000 | (perm & 0o7777), size, (0, 0));
        self
    }

    /// The archive's bytes so far, without a trailer (see [`file_header`](Self::file_header)).
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Close the archive (the `TRAILER!!!` entry) and return its bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::CpioWriter;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut w = CpioWriter::new();
        w.dir("/etc", 0o755);
        w.file("/etc/hostname", 0o644, b"web\n");
        w.symlink("bin/sh", "busybox");
        let out = w.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // Header of the first entry: mode field (second) is a directory.
        assert_eq!(&out[14..22], b"000041ed");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("etc/hostname\0"));
        assert!(text.contains("web\n"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file entry's size field says 4 bytes.
        let pos = text.find("etc/hostname").unwrap();
        let hdr = &text[pos - 110..pos];
        assert_eq!(&hdr[54..62], "00000004");
    }

    #[test]
    fn a_streamed_file_is_the_same_archive() {
        let data = b"hello, agent";
        let mut a = CpioWriter::new();
        a.dir("d", 0o700);
        a.file("d/f", 0o700, data);
        let whole = a.finish();
        let mut b = CpioWriter::new();
        b.dir("d", 0o700);
        b.file_header("d/f", 0o700, data.len());
        let mut streamed = b.into_bytes();
        streamed.extend_from_slice(data);
        streamed.resize(streamed.len().next_multiple_of(4), 0);
        // A trailer of its own: the inode numbers differ from `whole`'s from here on.
        streamed.extend_from_slice(&CpioWriter::new().finish());
        assert_eq!(streamed.len(), whole.len());
        let trailer = CpioWriter::new().finish();
        let cut = whole.len() - trailer.len();
        assert_eq!(streamed[..cut], whole[..cut]);
    }

    #[test]
    fn cpio_tool_accepts_the_archive() {
        // Cross-check with GNU cpio when it is installed.
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            return;
        }
        let mut w = CpioWriter::new();
        w.dir("d", 0o755);
        w.file("d/f", 0o600, b"hello");
        let out = w.finish();
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let res = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&res.stdout), "d\nd/f\n");
    }
}
