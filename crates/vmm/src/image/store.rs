//! The local image store (`data_dir/images`): ext4 root filesystems named by sha256 with a tag
//! index, built with debootstrap + `mkfs.ext4 -d` (no mount), and per-machine disk clones.

use crate::VmmError;
use crate::image::boot::write_atomic;
use crate::proc::{run, run_with_progress};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::process::Command;

/// Packages every built Debian image has, besides the ones asked for.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "openssh-server",
    "iproute2",
    "ca-certificates",
];

/// Units masked in built images: not needed in a microVM and slow under emulation.
pub const MASKED_UNITS: &[&str] = &[
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "console-getty.service",
    "systemd-pstore.service",
    "remote-fs.target",
    "systemd-networkd-wait-online.service",
    // The initramfs configures the network before systemd starts (see `INIT_SCRIPT`).
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-network-generator.service",
    // sshd runs per connection from `sistemo-sshd.socket`, listening from the first second.
    "ssh.service",
    "ssh.socket",
    // No dbus: this would start gettys on tty2-6.
    "getty-static.service",
    // The guest has no modules for its kernel.
    "systemd-modules-load.service",
    "modprobe@loop.service",
    "modprobe@fuse.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@configfs.service",
    // The root is mounted rw by the initramfs and fstab is empty: nothing to remount.
    "systemd-remount-fs.service",
    // No udev: /dev is the kernel's devtmpfs, nothing waits for device units, and udev's
    // coldplug costs several seconds of emulated CPU at boot.
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-random-seed.service",
    // Users and groups come with the image's packages (their maintainer scripts create them);
    // re-checking sysusers.d at every boot only competes with the first SSH session for the CPU.
    "systemd-sysusers.service",
    // Static device nodes for kernel modules: the guest has no modules beyond the initramfs's.
    "systemd-tmpfiles-setup-dev.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
    "ldconfig.service",
    "man-db.timer",
    "logrotate.timer",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
];

/// sshd on demand, listening before `sysinit.target` so exec works as soon as the network does.
const SSHD_SOCKET: &str = "[Unit]
Description=sistemo: SSH on demand
DefaultDependencies=no
Before=sockets.target shutdown.target
Conflicts=shutdown.target

[Socket]
ListenStream=22
Accept=yes
MaxConnections=64

[Install]
WantedBy=sockets.target
";

/// One sshd per connection. `KillMode=process` keeps what a session started in the background.
const SSHD_SERVICE: &str = "[Unit]
Description=sistemo: SSH session
DefaultDependencies=no
Before=shutdown.target
Conflicts=shutdown.target

[Service]
# sshd's privilege-separation directory, made by systemd itself (no extra process).
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
ExecStart=-/usr/sbin/sshd -i
StandardInput=socket
StandardError=journal
KillMode=process
# Sessions win the CPU over the rest of the boot: exec works earlier.
Nice=-10
";

/// systemd generators switched off in built images (each is a process run at every boot and
/// daemon-reload). `sysv` and `rc-local` stay for packages that ship init scripts.
pub const MASKED_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-debug-generator",
    "systemd-fstab-generator",
    "systemd-getty-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-run-generator",
    "systemd-system-update-generator",
    "systemd-veritysetup-generator",
];

/// One stored image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    /// sha256 of the ext4 file (hex).
    pub sha256: String,
    /// Tags pointing at it.
    pub tags: Vec<String>,
    /// The ext4 file.
    pub path: PathBuf,
    /// Size in bytes of the file.
    pub size: u64,
    /// Where it came from (`debootstrap bookworm +pkgs`, a path, a URL).
    pub source: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    /// tag → sha256
    tags: BTreeMap<String, String>,
    /// sha256 → source
    sources: BTreeMap<String, String>,
}

/// Images under `data_dir/images`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// The store in `data_dir/images` (created when needed).
    pub fn new(data_dir: &Path) -> Self {
        ImageStore {
            dir: data_dir.join("images"),
        }
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn load(&self) -> Index {
        std::fs::read(self.index_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, idx: &Index) -> Result<(), VmmError> {
        self.mkdir()?;
        write_atomic(
            &self.index_path(),
            &serde_json::to_vec_pretty(idx).expect("json"),
            0o644,
        )
    }

    fn mkdir(&self) -> Result<(), VmmError> {
        std::fs::create_dir_all(&self.dir).map_err(VmmError::io(format!("creating {}", self.dir.display())))
    }

    /// Exclusive lock over index changes (several builds or processes may finish at once).
    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, VmmError> {
        self.mkdir()?;
        let p = self.dir.join(".index.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(VmmError::io(format!("opening {}", p.display())))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| VmmError::io(format!("locking {}", p.display()))(e.into()))
    }

    fn path_of(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.ext4"))
    }

    /// All stored images, with their tags.
    pub fn list(&self) -> Vec<ImageInfo> {
        let idx = self.load();
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".ext4") else {
                continue;
            };
            if sha.len() != 64 {
                continue;
            }
            let tags = idx
                .tags
                .iter()
                .filter(|(_, s)| s.as_str() == sha)
                .map(|(t, _)| t.clone())
                .collect();
            out.push(ImageInfo {
                sha256: sha.to_string(),
                tags,
                path: e.path(),
                size: e.metadata().map(|m| m.len()).unwrap_or(0),
                source: idx.sources.get(sha).cloned().unwrap_or_default(),
            });
        }
        out.sort_by(|a, b| a.tags.cmp(&b.tags).then(a.sha256.cmp(&b.sha256)));
        out
    }

    /// The image a reference names: a tag (`debian`), a sha256 (or unique prefix of ≥12), a
    /// path to a local `*.ext4` file, or an `http(s)://` URL (downloaded once, at most
    /// `max_download` bytes, stored under the URL as tag).
    pub async fn resolve(
        &self,
        reference: &str,
        max_download: u64,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<PathBuf, VmmError> {
        let not_found = || VmmError::ImageNotFound {
            reference: reference.to_string(),
        };
        if reference.starts_with("http://") || reference.starts_with("https://") {
            if let Some(sha) = self.load().tags.get(reference)
                && self.path_of(sha).exists()
            {
                return Ok(self.path_of(sha));
            }
            return self
                .download(reference, max_download, progress)
                .await
                .map(|i| i.path);
        }
        if reference.contains('/') || reference.ends_with(".ext4") {
            let p = PathBuf::from(reference);
            if p.is_file() {
                return std::fs::canonicalize(&p).map_err(VmmError::io(format!("resolving {reference}")));
            }
            return Err(not_found());
        }
        let idx = self.load();
        if let Some(sha) = idx.tags.get(reference) {
            let p = self.path_of(sha);
            return if p.exists() { Ok(p) } else { Err(not_found()) };
        }
        if reference.len() >= 12 && reference.chars().all(|c| c.is_ascii_hexdigit()) {
            let hits: Vec<ImageInfo> = self
                .list()
                .into_iter()
                .filter(|i| i.sha256.starts_with(&reference.to_ascii_lowercase()))
                .collect();
            if hits.len() == 1 {
                return Ok(hits[0].path.clone());
            }
        }
        Err(not_found())
    }

    /// Remove a tag; the file goes when no tag points at it any more. Returns whether the
    /// tag existed.
    pub fn remove(&self, tag: &str) -> Result<bool, VmmError> {
        let _lock = self.lock()?;
        let mut idx = self.load();
        let Some(sha) = idx.tags.remove(tag) else {
            return Ok(false);
        };
        if !idx.tags.values().any(|s| *s == sha) {
            idx.sources.remove(&sha);
            let p = self.path_of(&sha);
            if p.exists() {
                std::fs::remove_file(&p).map_err(VmmError::io(format!("removing {}", p.display())))?;
            }
        }
        self.save(&idx)?;
        Ok(true)
    }

    /// Move a finished ext4 file into the store under its sha256 and point `tag` at it.
    pub fn add(&self, file: &Path, tag: &str, source: &str) -> Result<ImageInfo, VmmError> {
        self.mkdir()?;
        let sha = sha256_file(file)?;
        let dest = self.path_of(&sha);
        if std::fs::rename(file, &dest).is_err() {
            std::fs::copy(file, &dest).map_err(VmmError::io(format!("storing {}", dest.display())))?;
            let _ = std::fs::remove_file(file);
        }
        let _lock = self.lock()?;
        let mut idx = self.load();
        let previous = idx.tags.insert(tag.to_string(), sha.clone());
        idx.sources.insert(sha.clone(), source.to_string());
        // The image the tag pointed at before goes when nothing else names it. Disks cloned
        // from it are independent copies, so running machines are unaffected.
        if let Some(old) = previous.filter(|o| *o != sha && !idx.tags.values().any(|s| s == o)) {
            idx.sources.remove(&old);
            let _ = std::fs::remove_file(self.path_of(&old));
        }
        self.save(&idx)?;
        let size = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
        Ok(ImageInfo {
            sha256: sha,
            tags: vec![tag.to_string()],
            path: dest,
            size,
            source: source.to_string(),
        })
    }

    fn scratch(&self, what: &str) -> Result<PathBuf, VmmError> {
        let p = self.dir.join(format!(
            ".{what}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&p).map_err(VmmError::io(format!("creating {}", p.display())))?;
        Ok(p)
    }

    /// Build a Debian bookworm image with debootstrap (signature-checked against
    /// debian-archive-keyring) plus [`BASE_PACKAGES`] and `include`, configure it for sistemo,
    /// and store it as `tag`. Takes about a minute; progress reports each step.
    pub async fn build_debian(
        &self,
        tag: &str,
        include: &[String],
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ImageInfo, VmmError> {
        let mirror =
            std::env::var("SISTEMO_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into());
        self.build_debian_from(tag, include, &mirror, progress).await
    }

    async fn build_debian_from(
        &self,
        tag: &str,
        include: &[String],
        mirror: &str,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ImageInfo, VmmError> {
        for p in include {
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c)) {
                return Err(VmmError::Command {
                    what: "building an image".into(),
                    reason: format!("not a package name: {p:?}"),
                });
            }
        }
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        if !keyring.exists() {
            return Err(VmmError::Missing {
                program: "debian-archive-keyring".into(),
                hint: "apt-get install debian-archive-keyring".into(),
            });
        }
        let scratch = self.scratch("build")?;
        let res = async {
            let root = scratch.join("root");
            let mut pkgs: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
            pkgs.extend(include.iter().cloned());
            let t0 = Instant::now();
            // Optional cache of the raw debootstrap tree (CI, repeated builds): a tar keyed by
            // suite, mirror and package list in $SISTEMO_DEBOOTSTRAP_CACHE.
            let cache = std::env::var_os("SISTEMO_DEBOOTSTRAP_CACHE").map(|d| {
                let mut key = pkgs.clone();
                key.sort();
                let h = Sha256::digest(format!("bookworm {mirror} {}", key.join(",")).as_bytes());
                let h: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
                PathBuf::from(d).join(format!("debootstrap-bookworm-{h}.tar"))
            });
            if let Some(tar) = cache.as_ref().filter(|t| t.exists()) {
                progress(&format!("using the cached debootstrap tree {}", tar.display()));
                std::fs::create_dir_all(&root).map_err(VmmError::io("creating the build root"))?;
                run(
                    Command::new("tar").arg("-xpf").arg(tar).arg("-C").arg(&root),
                    "unpacking the debootstrap cache",
                )
                .await?;
            } else {
                progress(&format!("debootstrap bookworm (+{})", pkgs.join(",")));
                run_with_progress(
                    Command::new("debootstrap")
                        .arg("--variant=minbase")
                        .arg(format!("--keyring={}", keyring.display()))
                        .arg(format!("--include={}", pkgs.join(",")))
                        .arg("bookworm")
                        .arg(&root)
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
                            .arg(&root)
                            .arg("."),
                        "caching the debootstrap tree",
                    )
                    .await?;
                    std::fs::rename(&tmp, tar).map_err(VmmError::io("caching the debootstrap tree"))?;
                }
            }
            progress(&format!(
                "debootstrap done in {:.0}s; configuring",
                t0.elapsed().as_secs_f64()
            ));
            configure_tree(&root, mirror).await?;
            let img = scratch.join("root.ext4");
            progress("mkfs.ext4 -d (no mount)");
            make_ext4(&root, &img, "sistemo-root").await?;
            progress("hashing and storing the image");
            self.add(&img, tag, &format!("debootstrap bookworm +{}", pkgs.join(",")))
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        res
    }

    async fn download(
        &self,
        url: &str,
        max: u64,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<ImageInfo, VmmError> {
        let scratch = self.scratch("pull")?;
        let res = async {
            let file = scratch.join("image.ext4");
            progress(&format!("downloading {url}"));
            run(
                Command::new("curl")
                    .args([
                        "-fsSL",
                        "--proto",
                        "=https,http",
                        "--max-redirs",
                        "5",
                        "--max-filesize",
                    ])
                    .arg(max.to_string())
                    .arg("-o")
                    .arg(&file)
                    .arg(url),
                &format!("downloading {url}"),
            )
            .await?;
            let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            if len > max {
                return Err(VmmError::Command {
                    what: format!("downloading {url}"),
                    reason: format!("larger than the limit of {max} bytes"),
                });
            }
            let mut magic = [0u8; 2];
            let ok = std::fs::File::open(&file)
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(1024 + 56))?;
                    f.read_exact(&mut magic)
                })
                .is_ok();
            if !ok || magic != [0x53, 0xef] {
                return Err(VmmError::Command {
                    what: format!("downloading {url}"),
                    reason: "not an ext2/3/4 filesystem image".into(),
                });
            }
            self.add(&file, url, url)
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        res
    }
}

async fn chroot(root: &Path, args: &[&str]) -> Result<(), VmmError> {
    run(
        Command::new("chroot")
            .arg(root)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("chroot {}", args.join(" ")),
    )
    .await
    .map(|_| ())
}

fn write(root: &Path, rel: &str, content: &str) -> Result<(), VmmError> {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(VmmError::io(format!("creating {}", d.display())))?;
    }
    // The tree was just built by debootstrap: remove a symlink rather than write through it.
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, content).map_err(VmmError::io(format!("writing {}", p.display())))
}

/// Turn a fresh debootstrap tree into a sistemo image: networkd + sshd on, key-only root login,
/// no shared host keys, slow or useless units masked, caches dropped.
async fn configure_tree(root: &Path, mirror: &str) -> Result<(), VmmError> {
    write(
        root,
        "etc/apt/sources.list",
        &format!(
            "deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\n\
             deb http://deb.debian.org/debian-security bookworm-security main\n"
        ),
    )?;
    write(root, "etc/systemd/system/sistemo-sshd.socket", SSHD_SOCKET)?;
    write(root, "etc/systemd/system/sistemo-sshd@.service", SSHD_SERVICE)?;
    // networkd stays installed with the machine's .network file, masked: `systemctl unmask`
    // brings it back with the same configuration.
    chroot(root, &["systemctl", "enable", "sistemo-sshd.socket"]).await?;
    let mut mask = vec!["systemctl", "mask"];
    mask.extend(MASKED_UNITS);
    chroot(root, &mask).await?;
    let gens = root.join("etc/systemd/system-generators");
    std::fs::create_dir_all(&gens).map_err(VmmError::io("creating system-generators"))?;
    for g in MASKED_GENERATORS {
        let link = gens.join(g);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link).map_err(VmmError::io(format!("masking {g}")))?;
    }
    // Host keys are per machine and arrive at boot; the build's keys must not be shared.
    for e in std::fs::read_dir(root.join("etc/ssh")).map_err(VmmError::io("reading etc/ssh"))? {
        let e = e.map_err(VmmError::io("reading etc/ssh"))?;
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    write(
        root,
        "etc/ssh/sshd_config.d/10-sistemo.conf",
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUseDNS no\nUsePAM no\nPrintMotd no\nPrintLastLog no\nMaxSessions 100\n",
    )?;
    // The root is mounted read-write by the initramfs: nothing to wait for or remount.
    write(
        root,
        "etc/fstab",
        "# / is /dev/vda, mounted by sistemo's initramfs\n",
    )?;
    write(root, "etc/hostname", "sistemo\n")?;
    write(root, "etc/machine-id", "")?;
    write(
        root,
        "etc/systemd/journald.conf.d/10-sistemo.conf",
        "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n",
    )?;
    // Quiet, fast boots; a bounded stop.
    write(
        root,
        "etc/systemd/system.conf.d/10-sistemo.conf",
        "[Manager]\nDefaultTimeoutStopSec=10s\nShowStatus=no\n",
    )?;
    write(
        root,
        "usr/share/sistemo/README",
        "Built by sistemo: debootstrap bookworm minbase.\n",
    )?;
    chroot(root, &["apt-get", "clean"]).await?;
    let lists = root.join("var/lib/apt/lists");
    if let Ok(rd) = std::fs::read_dir(&lists) {
        for e in rd.flatten() {
            if e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

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

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> Result<String, VmmError> {
    let mut f = std::fs::File::open(p).map_err(VmmError::io(format!("opening {}", p.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(VmmError::io(format!("reading {}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Clone `src` into a new file with the `FICLONE` ioctl (shared extents, instant).
/// The one `unsafe` block in this crate: `ioctl(dest_fd, FICLONE, src_fd)` on two open files
/// we own; the kernel validates both descriptors and fails with EOPNOTSUPP/EXDEV when the
/// filesystem cannot share extents.
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

/// Make `dest` a private copy of `image` (reflink when the filesystem can, else a sparse copy),
/// grown to `size_bytes` with its ext4 resized to fill it. Never mounts anything.
pub async fn clone_disk(image: &Path, dest: &Path, size_bytes: u64) -> Result<(), VmmError> {
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
    {
        let mut src = std::fs::File::open(image).map_err(VmmError::io(ctx("opening")))?;
        let mut out = std::fs::File::create(&tmp).map_err(VmmError::io(ctx("creating")))?;
        if reflink(&src, &out).is_err() {
            sparse_copy(&mut src, &mut out).map_err(VmmError::io(ctx("copying")))?;
        }
        // No fsync: a disk half-written by a crash belongs to a deploy that start-up rolls back.
    }
    if let Err(e) = grow_disk(&tmp, size_bytes).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(VmmError::io(ctx("placing")))
}

/// Grow a raw ext4 disk file to `size_bytes` and its file system to fill it (no-op when it is
/// that size already). Never mounts anything.
pub async fn grow_disk(disk: &Path, size_bytes: u64) -> Result<(), VmmError> {
    let len = std::fs::metadata(disk)
        .map_err(VmmError::io(format!("reading {}", disk.display())))?
        .len();
    if size_bytes <= len {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|f| f.set_len(size_bytes))
        .map_err(VmmError::io(format!("growing {}", disk.display())))?;
    let first = Command::new("resize2fs").arg(disk).output().await;
    if !matches!(&first, Ok(o) if o.status.success()) {
        // Images that were mounted before want a check first.
        let _ = Command::new("e2fsck").arg("-fp").arg(disk).output().await;
        run(Command::new("resize2fs").arg(disk), "resize2fs").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
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

    #[tokio::test]
    async fn store_tags_and_clone_grow() {
        if Command::new("mkfs.ext4").arg("-V").output().await.is_err() {
            return;
        }
        let d = tmpdir("store");
        let tree = d.join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hello"), "hi").unwrap();
        let img = d.join("x.ext4");
        make_ext4(&tree, &img, "t").await.unwrap();
        let store = ImageStore::new(&d);
        let info = store.add(&img, "t1", "test").unwrap();
        assert_eq!(store.resolve("t1", 0, &|_| {}).await.unwrap(), info.path);
        assert_eq!(
            store.resolve(&info.sha256[..12], 0, &|_| {}).await.unwrap(),
            info.path
        );
        assert!(store.resolve("nope", 0, &|_| {}).await.is_err());
        assert_eq!(store.list().len(), 1);
        let disk = d.join("disk.img");
        clone_disk(&info.path, &disk, 512 << 20).await.unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 512 << 20);
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(&disk)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(store.remove("t1").unwrap());
        assert!(!info.path.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
