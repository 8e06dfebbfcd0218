//! Building the `debian` image: debootstrap bookworm from a mirror (optionally cached as a
//! tar), configured for sistemo (`tree`), made into ext4 and stored; package-name checks.

mod apt;
mod tree;

pub use apt::{Archive, apt_mirror};

use super::{ImageInfo, ImageStore, make_ext4};
use crate::proc::{run, run_with_progress};
use crate::{Progress, VmmError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::process::Command;

/// The mirror used when none is configured and the host's apt configuration names none.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The security archive written into built images when the host's apt configuration names none.
pub const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// The Debian release images are built from.
const SUITE: &str = "bookworm";

/// Packages every built Debian image has, besides the ones asked for.
const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "openssh-server",
    "iproute2",
    "ca-certificates",
];

/// The version of what [`tree`] makes of a debootstrap tree, recorded in every built image's
/// source (`... (recipe N)`). Bumped whenever a change alters how built images boot, so that
/// prepared data dirs (the tests' and CI's cache, `image prepare`) build theirs again
/// ([`is_stale_build`]). 2: the idle SysV and rc.local generators masked.
pub const RECIPE: u32 = 2;

/// True when `source` (an [`ImageInfo`]'s) names a Debian build made by an older [`RECIPE`];
/// false for any other image (a path, a URL, an OCI reference).
pub fn is_stale_build(source: &str) -> bool {
    source.starts_with(&format!("debootstrap {SUITE} ")) && !source.ends_with(&format!(" (recipe {RECIPE})"))
}

/// How Debian images are built; `Default` uses [`DEFAULT_MIRROR`], [`DEFAULT_SECURITY_MIRROR`]
/// and no cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// The Debian archive debootstrap downloads from, e.g. `http://deb.debian.org/debian`
    /// (see [`apt_mirror`] for the host's own). Also written into the image's sources.list.
    pub mirror: String,
    /// The security archive written into the image's sources.list (`SUITE-security`).
    pub security_mirror: String,
    /// A folder keeping the raw debootstrap tree as a tar keyed by suite, mirror and package
    /// list, so that a rebuild skips debootstrap (CI, repeated builds).
    pub debootstrap_cache: Option<PathBuf>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            mirror: DEFAULT_MIRROR.into(),
            security_mirror: DEFAULT_SECURITY_MIRROR.into(),
            debootstrap_cache: None,
        }
    }
}

/// A Debian package name as `debootstrap --include` and apt accept it: letters, digits and
/// `+-.`, starting with a letter or digit, optionally with an `:arch` qualifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackageName(String);

impl PackageName {
    const ALLOWED: &str = "Debian package names: letters, digits and + - . : starting with a letter or digit";
}

impl std::str::FromStr for PackageName {
    type Err = VmmError;

    fn from_str(s: &str) -> Result<Self, VmmError> {
        let ok = s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.:".contains(&b));
        if ok {
            Ok(PackageName(s.to_string()))
        } else {
            Err(VmmError::Invalid {
                what: "package name",
                value: s.to_string(),
                allowed: Self::ALLOWED,
            })
        }
    }
}

impl std::fmt::Display for PackageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for PackageName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl ImageStore {
    /// Build a Debian bookworm image with debootstrap (signature-checked against
    /// debian-archive-keyring) plus `BASE_PACKAGES` (systemd, sshd, iproute2, ...) and `include`, configure it for sistemo,
    /// and store it as `tag`. Takes about a minute; progress reports each step.
    pub async fn build_debian(
        &self,
        tag: &str,
        include: &[PackageName],
        options: &BuildOptions,
        progress: Progress<'_>,
    ) -> Result<ImageInfo, VmmError> {
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        if !keyring.exists() {
            return Err(VmmError::Missing {
                program: "debian-archive-keyring".into(),
                hint: "apt-get install debian-archive-keyring".into(),
            });
        }
        let mut pkgs: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
        pkgs.extend(include.iter().map(|p| p.to_string()));
        let scratch = self.scratch("build")?;
        let res = async {
            let root = scratch.join("root");
            let t0 = Instant::now();
            debootstrap(&root, &pkgs, keyring, options, progress).await?;
            progress(&format!(
                "debootstrap done in {:.0}s; configuring",
                t0.elapsed().as_secs_f64()
            ));
            tree::configure_tree(&root, options).await?;
            let img = scratch.join("root.ext4");
            progress("mkfs.ext4 -d (no mount)");
            make_ext4(&root, &img, "sistemo-root").await?;
            progress("hashing and storing the image");
            let source = format!("debootstrap {SUITE} +{} (recipe {RECIPE})", pkgs.join(","));
            self.add(&img, tag, &source)
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        res
    }
}

/// The cache tar for a package list and mirror in `dir`.
fn cache_file(dir: &Path, mirror: &str, pkgs: &[String]) -> PathBuf {
    let mut key = pkgs.to_vec();
    key.sort();
    let h = Sha256::digest(format!("{SUITE} {mirror} {}", key.join(",")).as_bytes());
    let h: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    dir.join(format!("debootstrap-{SUITE}-{h}.tar"))
}

/// Fill `root` with a minbase system plus `pkgs`: from the cache when it has this tree, else by
/// running debootstrap (and caching the result when a cache folder is set).
async fn debootstrap(
    root: &Path,
    pkgs: &[String],
    keyring: &Path,
    options: &BuildOptions,
    progress: Progress<'_>,
) -> Result<(), VmmError> {
    let mirror = options.mirror.as_str();
    let cache = options
        .debootstrap_cache
        .as_deref()
        .map(|d| cache_file(d, mirror, pkgs));
    if let Some(tar) = cache.as_ref().filter(|t| t.exists()) {
        let t = tar.clone();
        if let Err(why) = tokio::task::spawn_blocking(move || verify_cache(&t))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
        {
            tracing::warn!(cache = %tar.display(), reason = %why, "the debootstrap cache does not match its checksum; rebuilding it");
            progress(&format!(
                "the cached debootstrap tree {} is not as it was made ({why}); running debootstrap again",
                tar.display()
            ));
            let _ = std::fs::remove_file(tar);
            let _ = std::fs::remove_file(sum_file(tar));
        }
    }
    if let Some(tar) = cache.as_ref().filter(|t| t.exists()) {
        progress(&format!("using the cached debootstrap tree {}", tar.display()));
        std::fs::create_dir_all(root).map_err(VmmError::io("creating the build root"))?;
        run(
            Command::new("tar").arg("-xpf").arg(tar).arg("-C").arg(root),
            "unpacking the debootstrap cache",
        )
        .await?;
        return Ok(());
    }
    progress(&format!("debootstrap {SUITE} (+{})", pkgs.join(",")));
    run_with_progress(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--keyring={}", keyring.display()))
            .arg(format!("--include={}", pkgs.join(",")))
            .arg(SUITE)
            .arg(root)
            .arg(mirror),
        "debootstrap",
        |l| {
            l.starts_with("I: Retrieving Release")
                || l.starts_with("I: Valid Release")
                || l.starts_with("I: Base system")
                || l.starts_with("I: Installing core")
                || l.starts_with("I: Configuring") && l.contains("systemd")
        },
        progress,
    )
    .await?;
    if let Some(tar) = &cache {
        if let Some(d) = tar.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let tmp = tar.with_extension("tar.tmp");
        run(
            Command::new("tar")
                .arg("-cpf")
                .arg(&tmp)
                .arg("-C")
                .arg(root)
                .arg("."),
            "caching the debootstrap tree",
        )
        .await?;
        // Its checksum beside it, written first: a tar without one is never used.
        let t = tmp.clone();
        let sum = tokio::task::spawn_blocking(move || super::store::sha256_file(&t))
            .await
            .map_err(|e| VmmError::io("hashing the debootstrap cache")(std::io::Error::other(e)))??;
        std::fs::write(sum_file(tar), format!("{sum}\n"))
            .map_err(VmmError::io("writing the debootstrap cache's checksum"))?;
        std::fs::rename(&tmp, tar).map_err(VmmError::io("caching the debootstrap tree"))?;
    }
    Ok(())
}

/// Where the cache tar `tar`'s sha256 is kept: `TAR.sha256`.
fn sum_file(tar: &Path) -> PathBuf {
    let mut p = tar.as_os_str().to_owned();
    p.push(".sha256");
    PathBuf::from(p)
}

/// Check the cache tar `tar` against the sha256 stored when it was made; the reason if not.
fn verify_cache(tar: &Path) -> Result<(), String> {
    let want = std::fs::read_to_string(sum_file(tar)).map_err(|e| format!("no checksum: {e}"))?;
    let got = super::store::sha256_file(tar).map_err(|e| e.to_string())?;
    if got != want.trim() {
        return Err(format!("sha256 {got}, made as {}", want.trim()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_follow_the_debian_rule() {
        for ok in ["nginx", "g++", "libc6:amd64", "python3.11", "0ad", "Foo"] {
            assert_eq!(ok.parse::<PackageName>().unwrap().as_ref(), ok);
        }
        for bad in ["", "-rf", ".x", "a b", "a,b", "nginx;id", "ü"] {
            let e = bad.parse::<PackageName>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("allowed: Debian package names"),
                "{e}"
            );
        }
        assert_eq!("g++".parse::<PackageName>().unwrap().to_string(), "g++");
    }

    #[test]
    fn the_cache_key_ignores_package_order() {
        let d = Path::new("/c");
        let a = cache_file(d, "http://m", &["b".into(), "a".into()]);
        assert_eq!(a, cache_file(d, "http://m", &["a".into(), "b".into()]));
        assert_ne!(a, cache_file(d, "http://other", &["a".into(), "b".into()]));
        assert!(a.starts_with(d) && a.to_string_lossy().ends_with(".tar"));
    }

    #[test]
    fn builds_of_an_older_recipe_are_stale() {
        assert!(is_stale_build("debootstrap bookworm +systemd-sysv,udev,nginx"));
        assert!(is_stale_build("debootstrap bookworm +udev (recipe 1)"));
        assert!(!is_stale_build(&format!(
            "debootstrap bookworm +udev (recipe {RECIPE})"
        )));
        assert!(!is_stale_build("/srv/images/root.ext4"));
        assert!(!is_stale_build("docker.io/library/alpine:3"));
    }

    #[test]
    fn a_cache_tar_is_used_only_as_it_was_made() {
        let dir = std::env::temp_dir().join(format!("sistemo-dbcache-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let tar = dir.join("debootstrap-bookworm-x.tar");
        std::fs::write(&tar, b"a tree").unwrap();
        assert!(
            verify_cache(&tar).unwrap_err().contains("no checksum"),
            "no checksum: not used"
        );
        let sum = super::super::store::sha256_file(&tar).unwrap();
        std::fs::write(sum_file(&tar), format!("{sum}\n")).unwrap();
        assert_eq!(verify_cache(&tar), Ok(()));
        std::fs::write(&tar, b"a tree, with a planted file").unwrap();
        assert!(
            verify_cache(&tar).unwrap_err().contains("made as"),
            "changed: not used"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_options_use_the_debian_cdn() {
        assert_eq!(BuildOptions::default().mirror, "http://deb.debian.org/debian");
    }
}
