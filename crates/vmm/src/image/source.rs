//! Images are untrusted input. What a reference may name ([`ImagePolicy`]): host paths only under
//! configured folders, URLs over https unless plain http is allowed, a content pin
//! (`#sha256=HEX`), a size cap; and the ext4 check every image passes before a host tool
//! (e2fsck, resize2fs) reads it.

use crate::VmmError;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest image a URL may download, by default (bytes, after decompression).
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 16 << 30;

/// What image references may name and how downloads are bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePolicy {
    /// Folders whose regular files may be images (`image_dirs`); empty: no host path at all,
    /// only the store's own images and URLs.
    pub image_dirs: Vec<PathBuf>,
    /// Accept `http://` URLs without a per-request opt-in (`allow_http_images`).
    pub allow_http: bool,
    /// Largest download, counted both as received and after decompression (`max_image_size`).
    pub max_size: u64,
    /// Time to connect to the server, per attempt.
    pub connect_timeout: Duration,
    /// Time a whole download may take, retries included.
    pub total_timeout: Duration,
    /// Attempts after the first one, on transient failures (connection refused or reset,
    /// timeouts, HTTP 408, 429 and 5xx).
    pub retries: u32,
    /// Wait before the first retry; doubled for each next one.
    pub backoff: Duration,
    /// OCI registries (`host` or `host:port`) that may be reached over plain http
    /// (`insecure_registries`); loopback registries always may.
    pub insecure_registries: Vec<String>,
}

impl Default for ImagePolicy {
    fn default() -> Self {
        ImagePolicy {
            image_dirs: Vec::new(),
            allow_http: false,
            max_size: DEFAULT_MAX_IMAGE_SIZE,
            connect_timeout: Duration::from_secs(20),
            total_timeout: Duration::from_secs(3600),
            retries: 3,
            backoff: Duration::from_secs(1),
            insecure_registries: Vec::new(),
        }
    }
}

/// A URL reference split into the URL sent to the server and its options, written as a
/// fragment (never sent): `https://host/img.ext4.gz#sha256=HEX&insecure_http`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlRef {
    /// The URL without the fragment (also the image's tag in the store).
    pub url: String,
    /// The sha256 the downloaded bytes must have (lowercase hex), as served: of the `.gz` or
    /// `.zst` file for a compressed image.
    pub sha256: Option<String>,
    /// This request accepts plain http.
    pub insecure_http: bool,
}

/// Whether a reference is a URL (`http://` or `https://`, any case).
pub fn is_url(reference: &str) -> bool {
    let l = reference.get(..8).unwrap_or(reference).to_ascii_lowercase();
    l.starts_with("http://") || l.starts_with("https://")
}

/// Whether `s` is a sha256 digest in hex (64 characters).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

impl UrlRef {
    /// Split a URL reference; an unknown option or a malformed digest is refused.
    pub fn parse(reference: &str) -> Result<UrlRef, VmmError> {
        let refused = |reason: String| VmmError::ImageRefused {
            reference: reference.to_string(),
            reason,
        };
        let (url, frag) = match reference.split_once('#') {
            Some((u, f)) => (u, Some(f)),
            None => (reference, None),
        };
        let mut r = UrlRef {
            url: url.to_string(),
            sha256: None,
            insecure_http: false,
        };
        for opt in frag
            .into_iter()
            .flat_map(|f| f.split('&'))
            .filter(|o| !o.is_empty())
        {
            match opt.split_once('=') {
                Some(("sha256", v)) if is_sha256(v) => r.sha256 = Some(v.to_ascii_lowercase()),
                Some(("sha256", v)) => {
                    return Err(refused(format!(
                        "sha256 {v:?} is not a digest (allowed: 64 hex characters)"
                    )));
                }
                None if opt == "insecure_http" => r.insecure_http = true,
                Some(("insecure_http", "true" | "1")) => r.insecure_http = true,
                _ => {
                    return Err(refused(format!(
                        "unknown option {opt:?} after '#' (allowed: sha256=HEX, insecure_http)"
                    )));
                }
            }
        }
        Ok(r)
    }

    /// The URL is plain http.
    pub fn is_http(&self) -> bool {
        self.url
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
    }

    /// Refuse plain http unless the request or the policy allows it.
    pub fn check_scheme(&self, policy: &ImagePolicy) -> Result<(), VmmError> {
        if self.is_http() && !self.insecure_http && !policy.allow_http {
            return Err(VmmError::ImageRefused {
                reference: self.url.clone(),
                reason: "plain http can be tampered with on the way (allowed: https, or http with \
                         --insecure-http or allow_http_images: true; pin it with --sha256)"
                    .into(),
            });
        }
        Ok(())
    }
}

/// The ext2/3/4 superblock magic, little-endian 0xEF53, at byte 1080 (superblock at 1024,
/// `s_magic` at 56).
const EXT4_MAGIC_OFFSET: u64 = 1024 + 56;

/// Check that `file` holds an ext2/3/4 file system (its superblock magic) before any host tool
/// parses it; `reference` names it in the error.
pub fn check_ext4(file: &Path, reference: &str) -> Result<(), VmmError> {
    let mut magic = [0u8; 2];
    let ok = std::fs::File::open(file)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(EXT4_MAGIC_OFFSET))?;
            f.read_exact(&mut magic)
        })
        .is_ok();
    if ok && magic == [0x53, 0xef] {
        Ok(())
    } else {
        Err(VmmError::ImageRefused {
            reference: reference.to_string(),
            reason: "not an ext2/3/4 file system (no superblock magic 0xEF53 at byte 1080; \
                     allowed: a raw ext4 image, optionally .gz or .zst compressed)"
                .into(),
        })
    }
}

/// File systems whose "regular files" are not data: kernel memory, device state.
fn pseudo_fs(p: &Path) -> Option<&'static str> {
    use nix::sys::statfs::{
        DEBUGFS_MAGIC, PROC_SUPER_MAGIC, SECURITYFS_MAGIC, SYSFS_MAGIC, TRACEFS_MAGIC, statfs,
    };
    let t = statfs(p).ok()?.filesystem_type();
    [
        (PROC_SUPER_MAGIC, "procfs"),
        (SYSFS_MAGIC, "sysfs"),
        (DEBUGFS_MAGIC, "debugfs"),
        (TRACEFS_MAGIC, "tracefs"),
        (SECURITYFS_MAGIC, "securityfs"),
    ]
    .into_iter()
    .find(|(m, _)| *m == t)
    .map(|(_, n)| n)
}

/// The file a path reference names, if the policy allows it: an absolute path (the daemon has
/// no meaningful working directory; the CLI resolves relative ones), whose canonical form
/// (every symlink followed) is a regular file, on a real file system, under one of
/// `image_dirs` (canonicalized too), and not in `forbidden` (the data dir's machine disks and
/// spares). Never opens the file, so a FIFO cannot block the caller.
pub fn check_path(reference: &str, policy: &ImagePolicy, forbidden: &[PathBuf]) -> Result<PathBuf, VmmError> {
    let allowed = || {
        if policy.image_dirs.is_empty() {
            "no host path (image_dirs is empty): use an image name, an https URL, or set image_dirs"
                .to_string()
        } else {
            let dirs: Vec<String> = policy
                .image_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            format!("a regular file under {}", dirs.join(", "))
        }
    };
    let refused = |what: &str| VmmError::ImageRefused {
        reference: reference.to_string(),
        reason: format!("{what} (allowed: {})", allowed()),
    };
    let p = Path::new(reference);
    if !p.is_absolute() {
        return Err(refused("a relative path"));
    }
    if policy.image_dirs.is_empty() {
        return Err(refused("host paths are not enabled"));
    }
    let real = match std::fs::canonicalize(p) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VmmError::ImageNotFound {
                reference: reference.to_string(),
            });
        }
        Err(e) => return Err(VmmError::io(format!("resolving {reference}"))(e)),
    };
    let roots: Vec<PathBuf> = policy
        .image_dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    if !roots.iter().any(|r| real.starts_with(r)) {
        return Err(refused(&format!(
            "it is {}, outside the image folders",
            real.display()
        )));
    }
    if forbidden
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.starts_with(d))
    {
        return Err(refused(&format!(
            "{} is a machine's disk or a spare",
            real.display()
        )));
    }
    let md = std::fs::metadata(&real).map_err(VmmError::io(format!("reading {}", real.display())))?;
    if !md.file_type().is_file() {
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_block_device() || ft.is_char_device() {
            "a device"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(refused(&format!("{} is {kind}", real.display())));
    }
    if let Some(fs) = pseudo_fs(&real) {
        return Err(refused(&format!("{} is on {fs}", real.display())));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sistemo-src-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn ext4_like(p: &Path) {
        let mut b = vec![0u8; 4096];
        b[1080] = 0x53;
        b[1081] = 0xef;
        std::fs::write(p, b).unwrap();
    }

    fn policy(dirs: &[&Path]) -> ImagePolicy {
        ImagePolicy {
            image_dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
            ..ImagePolicy::default()
        }
    }

    fn reason(e: VmmError) -> String {
        match e {
            VmmError::ImageRefused { reason, .. } => reason,
            other => panic!("expected a refusal, got {other}"),
        }
    }

    #[test]
    fn ext4_magic_is_checked_at_byte_1080() {
        let d = tmpdir("magic");
        let good = d.join("good");
        ext4_like(&good);
        check_ext4(&good, "good").unwrap();
        let zeros = d.join("zeros");
        std::fs::write(&zeros, vec![0u8; 4096]).unwrap();
        let e = check_ext4(&zeros, "zeros").unwrap_err().to_string();
        assert!(e.contains("zeros") && e.contains("0xEF53"), "{e}");
        // Big-endian bytes, a magic one byte off, and a file too short are all refused.
        let mut b = vec![0u8; 4096];
        b[1080] = 0xef;
        b[1081] = 0x53;
        std::fs::write(&zeros, &b).unwrap();
        assert!(check_ext4(&zeros, "x").is_err());
        std::fs::write(&zeros, &b[..1081]).unwrap();
        assert!(check_ext4(&zeros, "x").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn paths_only_under_image_dirs_and_only_regular_files() {
        let d = tmpdir("paths");
        let root = d.join("root");
        let outside = d.join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        ext4_like(&root.join("ok.ext4"));
        ext4_like(&outside.join("secret.ext4"));
        let p = policy(&[&root]);
        let s = |p: &Path| p.display().to_string();

        // A file under the root, directly and through a symlink that stays inside.
        let ok = check_path(&s(&root.join("ok.ext4")), &p, &[]).unwrap();
        assert_eq!(ok, std::fs::canonicalize(root.join("ok.ext4")).unwrap());
        std::os::unix::fs::symlink(root.join("ok.ext4"), root.join("sub/link.ext4")).unwrap();
        assert_eq!(check_path(&s(&root.join("sub/link.ext4")), &p, &[]).unwrap(), ok);

        // Relative paths are never resolved against the daemon's cwd.
        assert!(reason(check_path("root/ok.ext4", &p, &[]).unwrap_err()).contains("relative"));
        assert!(reason(check_path("ok.ext4", &p, &[]).unwrap_err()).contains("relative"));

        // A symlink escaping the root, and `..`, are judged by where they lead.
        std::os::unix::fs::symlink(outside.join("secret.ext4"), root.join("escape.ext4")).unwrap();
        let e = reason(check_path(&s(&root.join("escape.ext4")), &p, &[]).unwrap_err());
        assert!(
            e.contains("outside the image folders") && e.contains(&s(&root)),
            "{e}"
        );
        let e = reason(check_path(&format!("{}/../outside/secret.ext4", s(&root)), &p, &[]).unwrap_err());
        assert!(e.contains("outside the image folders"), "{e}");
        let e = reason(check_path(&s(&outside.join("secret.ext4")), &p, &[]).unwrap_err());
        assert!(e.contains("outside"), "{e}");

        // A symlink to a device, a directory, a FIFO.
        std::os::unix::fs::symlink("/dev/null", root.join("null.ext4")).unwrap();
        assert!(reason(check_path(&s(&root.join("null.ext4")), &p, &[]).unwrap_err()).contains("outside"));
        let pd = policy(&[Path::new("/dev")]);
        assert!(reason(check_path("/dev/null", &pd, &[]).unwrap_err()).contains("a device"));
        assert!(reason(check_path(&s(&root.join("sub")), &p, &[]).unwrap_err()).contains("a directory"));
        nix::unistd::mkfifo(&root.join("fifo.ext4"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(reason(check_path(&s(&root.join("fifo.ext4")), &p, &[]).unwrap_err()).contains("a FIFO"));

        // procfs files look regular: refused anyway.
        let pp = policy(&[Path::new("/proc")]);
        assert!(reason(check_path("/proc/self/status", &pp, &[]).unwrap_err()).contains("procfs"));

        // Machine disks are refused even under a root.
        let e = reason(check_path(&s(&ok), &p, std::slice::from_ref(&root)).unwrap_err());
        assert!(e.contains("machine's disk"), "{e}");

        // No roots: no paths at all, and the message says how to allow them.
        let e = reason(check_path(&s(&ok), &ImagePolicy::default(), &[]).unwrap_err());
        assert!(e.contains("image_dirs"), "{e}");
        // A missing file is "not found", without saying more.
        assert!(matches!(
            check_path(&s(&root.join("nope.ext4")), &p, &[]),
            Err(VmmError::ImageNotFound { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn url_options_and_scheme() {
        let r = UrlRef::parse("https://h/i.ext4.gz").unwrap();
        assert_eq!(
            (r.url.as_str(), r.sha256, r.insecure_http),
            ("https://h/i.ext4.gz", None, false)
        );
        let hex = "AB".repeat(32);
        let r = UrlRef::parse(&format!("http://h/i#sha256={hex}&insecure_http")).unwrap();
        assert_eq!(r.url, "http://h/i");
        assert_eq!(r.sha256.as_deref(), Some("ab".repeat(32).as_str()));
        assert!(r.insecure_http && r.is_http());
        r.check_scheme(&ImagePolicy::default()).unwrap();
        assert!(UrlRef::parse("https://h/i#sha256=12").is_err());
        assert!(UrlRef::parse("https://h/i#foo").is_err());
        let plain = UrlRef::parse("HTTP://h/i").unwrap();
        let e = reason(plain.check_scheme(&ImagePolicy::default()).unwrap_err());
        assert!(
            e.contains("--insecure-http") && e.contains("allow_http_images"),
            "{e}"
        );
        let open = ImagePolicy {
            allow_http: true,
            ..ImagePolicy::default()
        };
        plain.check_scheme(&open).unwrap();
        assert!(is_url("HTTPS://x") && !is_url("/srv/x.ext4") && !is_url("debian"));
    }
}
