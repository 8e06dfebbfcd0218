//! `sistemo install [--upgrade]`: what `scripts/quickstart` does on a host before deploying —
//! prerequisites from apt, the binary in /usr/local/bin, kernel and initramfs, the VMM's user
//! and group, the systemd unit — and, with `--upgrade`, the binary swapped by an atomic rename
//! and the service restarted (machines keep running: the daemon re-adopts them). `--root DIR`
//! does the file part under DIR and leaves the host alone (no apt, user or systemctl).

use super::systemd;
use crate::config::Config;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Debian packages the daemon needs at run time (`scripts/deps` adds the tests' own).
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "nftables",
    "iproute2",
    "busybox-static",
    "debootstrap",
    "debian-archive-keyring",
    "e2fsprogs",
    "openssh-client",
    "zstd",
    "cpio",
    "kmod",
    "ca-certificates",
    "util-linux",
    "procps",
    "passwd",
];

/// Where the binary is installed (under the root).
pub const BIN_PATH: &str = "usr/local/bin/sistemo";

/// What `install` was asked to do.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// Swap the binary and restart the service.
    pub upgrade: bool,
    /// Install under this folder instead of `/`, touching nothing else on the host.
    pub root: Option<PathBuf>,
    /// Say what would be done, do nothing.
    pub dry_run: bool,
}

/// Packages of `PACKAGES` that dpkg does not list as installed.
fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !std::process::Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let st = std::process::Command::new(cmd)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !st.success() {
        bail!("{cmd} {} failed with {st}", args.join(" "));
    }
    Ok(())
}

/// Copy `from` over `to` so that `to` is always whole: a temporary file beside it, synced, then
/// renamed over it (a running process keeps the old file's inode).
pub fn replace_atomically(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().context("the install path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".sistemo.new.{}", std::process::id()));
    let res = (|| -> Result<()> {
        std::fs::copy(from, &tmp)
            .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, to)
            .with_context(|| format!("renaming {} over {}", tmp.display(), to.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Run `sistemo install`.
pub async fn install(o: InstallOptions, config: Option<&Path>) -> Result<()> {
    let root = o.root.clone().unwrap_or_else(|| "/".into());
    let host = o.root.is_none();
    if host && !o.dry_run && !nix::unistd::Uid::effective().is_root() {
        bail!(
            "sistemo install changes the host and must run as root; try: sudo sistemo install (or --root DIR, --dry-run)"
        );
    }
    let under = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let say = |s: &str| println!("{}{s}", if o.dry_run { "would: " } else { "" });
    let exe = std::env::current_exe().context("finding this binary")?;
    let bin = root.join(BIN_PATH);
    // With --root, that root's config file when it has one.
    let rooted = o
        .root
        .as_ref()
        .map(|r| r.join("etc/sistemo/config.yml"))
        .filter(|p| p.exists());
    let mut cfg = Config::load(config.or(rooted.as_deref()))?;
    cfg.data_dir = under(&cfg.data_dir);

    if o.upgrade {
        if !bin.exists() {
            bail!("{} is not installed: run sistemo install first", bin.display());
        }
        if std::fs::canonicalize(&exe)? == std::fs::canonicalize(&bin)? {
            bail!(
                "{} is the installed binary itself; run the new one: ./sistemo install --upgrade",
                exe.display()
            );
        }
    }

    // 1. Prerequisites.
    let missing = missing_packages();
    if missing.is_empty() {
        println!("prerequisites: all installed");
    } else if !host {
        println!(
            "prerequisites missing (not installed with --root): {}",
            missing.join(" ")
        );
    } else {
        say(&format!("apt-get install {}", missing.join(" ")));
        if !o.dry_run {
            run("apt-get", &["update", "-qq"])?;
            let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
            args.extend(&missing);
            run("apt-get", &args)?;
        }
    }

    // 2. The binary.
    say(&format!("install {} as {}", exe.display(), bin.display()));
    if !o.dry_run && std::fs::canonicalize(&exe).ok() != std::fs::canonicalize(&bin).ok() {
        replace_atomically(&exe, &bin)?;
    }

    // 3. Kernel and initramfs (the debian image is built by `image build debian` when wanted).
    if !o.upgrade {
        say(&format!(
            "prepare kernel and initramfs in {}",
            cfg.data_dir.display()
        ));
        if !o.dry_run {
            let progress = |s: &str| eprintln!("… {s}");
            let a =
                sistemo_vmm::image::ensure_boot_assets(&cfg.data_dir, cfg.kernel_deb.as_deref(), &progress)
                    .await?;
            println!("kernel {} and initramfs ready", a.kernel_version);
        }
    }

    // 4. The VMM's unprivileged user and group.
    if let Some(user) = cfg.vmm_user.as_deref() {
        if !host {
            println!("user and group {user}: left to the daemon's first start (--root)");
        } else {
            say(&format!("create the system user and group {user}"));
            if !o.dry_run {
                sistemo_vmm::qemu::VmmUser::ensure(user).context("creating the VMM's user")?;
            }
        }
    }

    // 4b. The group whose members use the API socket without sudo (as `service install`).
    let group = crate::daemon::SOCKET_GROUP;
    if !host {
        println!("group {group}: not created (--root)");
    } else {
        say(&format!(
            "create the group {group} (its members use sistemo without sudo)"
        ));
        if !o.dry_run {
            systemd::ensure_socket_group()?;
        }
    }

    // 5. The systemd unit, (re)started.
    let unit = under(Path::new(systemd::UNIT_PATH));
    say(&format!("write {}", unit.display()));
    if !o.dry_run {
        if let Some(d) = unit.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&unit, systemd::unit(&Path::new("/").join(BIN_PATH)))
            .with_context(|| format!("writing {}", unit.display()))?;
    }
    if !host {
        println!("systemctl: not run (--root)");
    } else if o.upgrade {
        say("systemctl daemon-reload; systemctl try-restart sistemo.service (machines keep running)");
        if !o.dry_run {
            run("systemctl", &["daemon-reload"])?;
            run("systemctl", &["try-restart", "sistemo.service"])?;
        }
    } else {
        say("systemctl daemon-reload; systemctl enable --now sistemo.service");
        if !o.dry_run {
            run("systemctl", &["daemon-reload"])?;
            run("systemctl", &["enable", "--now", "sistemo.service"])?;
        }
    }
    if !o.dry_run {
        println!(
            "{}: next, sudo sistemo image build debian && sudo sistemo machine deploy debian",
            if o.upgrade { "upgraded" } else { "installed" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_is_a_rename_and_leaves_no_temporary() {
        let d = std::env::temp_dir().join(format!("sistemo-install-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        let (new, old) = (d.join("new"), d.join("bin/sistemo"));
        std::fs::write(&new, b"new").unwrap();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::write(&old, b"old").unwrap();
        let held = std::fs::File::open(&old).unwrap();
        replace_atomically(&new, &old).unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"new");
        // The old file lives on for whoever has it open: a rename, not a write in place.
        let mut s = String::new();
        std::io::Read::read_to_string(&mut &held, &mut s).unwrap();
        assert_eq!(s, "old");
        let names: Vec<_> = std::fs::read_dir(d.join("bin"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["sistemo"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
