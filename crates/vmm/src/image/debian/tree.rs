//! Turning a fresh debootstrap tree into a sistemo image: sshd per connection on a socket,
//! per-machine host keys, the units and generators a microVM does not need masked.

use super::{BuildOptions, SUITE};
use crate::VmmError;
use crate::proc::run;
use std::path::{Path, PathBuf};
use tokio::process::Command;

/// Units masked in built images: not needed in a microVM and slow under emulation.
const MASKED_UNITS: &[&str] = &[
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
/// daemon-reload). `sysv` and `rc-local` are masked too when they would find nothing to do in
/// the image (see [`idle_compat_generators`]).
const MASKED_GENERATORS: &[&str] = &[
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

/// The folder `rel` names in the tree at `root`, symlinked folders on the way resolved inside
/// `root` (an absolute link is taken from `root`, `..` stops at it: as the OCI layer code does),
/// so nothing is written or removed through a link outside the tree; missing ones are created.
fn dir_in(root: &Path, rel: &str) -> Result<PathBuf, VmmError> {
    let parts: Vec<std::ffi::OsString> = rel.split('/').map(Into::into).collect();
    crate::image::oci::layer::resolve_dir(root, &parts)
        .map_err(VmmError::io(format!("resolving {rel} inside {}", root.display())))
}

fn write(root: &Path, rel: &str, content: &str) -> Result<(), VmmError> {
    let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let p = dir_in(root, dir)?.join(name);
    // Remove a symlink (or any file) rather than write through it.
    if std::fs::symlink_metadata(&p).is_ok_and(|m| !m.is_dir()) {
        std::fs::remove_file(&p).map_err(VmmError::io(format!("replacing {}", p.display())))?;
    }
    std::fs::write(&p, content).map_err(VmmError::io(format!("writing {}", p.display())))
}

/// The compatibility generators that would generate nothing in the tree at `root`, to mask:
/// `systemd-sysv-generator` when every `/etc/init.d` script has a native unit of its name (the
/// generator skips those; its unit name drops a `.sh` suffix), `systemd-rc-local-generator`
/// when there is no `/etc/rc.local`. Each costs a process start at every boot before systemd
/// takes commands (about 0.2 s under TCG), which is readiness. A package with a script only
/// (rare: bookworm's services ship units, systemd 258 dropped SysV scripts) keeps the generator.
fn idle_compat_generators(root: &Path) -> Vec<&'static str> {
    let unit_dirs = [
        "etc/systemd/system",
        "lib/systemd/system",
        "usr/lib/systemd/system",
    ];
    let has_unit = |name: &str| {
        unit_dirs
            .iter()
            .any(|d| std::fs::symlink_metadata(root.join(d).join(format!("{name}.service"))).is_ok())
    };
    let scripts: Vec<String> = std::fs::read_dir(root.join("etc/init.d"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && n != "README" && n != "skeleton")
                .collect()
        })
        .unwrap_or_default();
    let mut idle = Vec::new();
    if scripts
        .iter()
        .all(|n| has_unit(n.strip_suffix(".sh").unwrap_or(n)))
    {
        idle.push("systemd-sysv-generator");
    }
    if std::fs::symlink_metadata(root.join("etc/rc.local")).is_err() {
        idle.push("systemd-rc-local-generator");
    }
    idle
}

/// Turn a fresh debootstrap tree into a sistemo image: apt sources from `options`, networkd +
/// sshd on, key-only root login, no shared host keys, slow or useless units masked, caches
/// dropped.
pub(super) async fn configure_tree(root: &Path, options: &BuildOptions) -> Result<(), VmmError> {
    let (mirror, security) = (&options.mirror, &options.security_mirror);
    write(
        root,
        "etc/apt/sources.list",
        &format!(
            "deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n\
             deb {security} {SUITE}-security main\n"
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
    let gens = dir_in(root, "etc/systemd/system-generators")?;
    for g in MASKED_GENERATORS
        .iter()
        .copied()
        .chain(idle_compat_generators(root))
    {
        let link = gens.join(g);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link).map_err(VmmError::io(format!("masking {g}")))?;
    }
    // Host keys are per machine and arrive at boot; the build's keys must not be shared.
    for e in std::fs::read_dir(dir_in(root, "etc/ssh")?).map_err(VmmError::io("reading etc/ssh"))? {
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
    let lists = dir_in(root, "var/lib/apt/lists")?;
    if let Ok(rd) = std::fs::read_dir(&lists) {
        for e in rd.flatten() {
            if e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{idle_compat_generators, write};

    #[test]
    fn writes_never_follow_a_symlinked_folder_out_of_the_tree() {
        let base = std::env::temp_dir().join(format!("sistemo-tree-{}", uuid::Uuid::new_v4().simple()));
        let (root, outside) = (base.join("root"), base.join("host-etc"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // A tree whose etc is a link to a host folder, absolute and relative, and a file link.
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../host-etc", root.join("usr")).unwrap();
        write(&root, "etc/hostname", "sistemo\n").unwrap();
        write(&root, "usr/share/sistemo/README", "x").unwrap();
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside"
        );
        let inside = root.join(outside.strip_prefix("/").unwrap()).join("hostname");
        assert_eq!(
            std::fs::read_to_string(inside).unwrap(),
            "sistemo\n",
            "the link taken from the root"
        );
        assert!(
            root.join("host-etc/share/sistemo/README").exists(),
            "`..` stops at the root"
        );
        // A symlinked file is replaced, not written through.
        let victim = base.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::create_dir_all(root.join("srv")).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("srv/file")).unwrap();
        write(&root, "srv/file", "new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(root.join("srv/file")).unwrap(), "new");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn compat_generators_are_masked_only_when_idle() {
        let root = std::env::temp_dir().join(format!("sistemo-gen-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["etc/init.d", "lib/systemd/system", "etc/systemd/system"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let put = |p: &str| std::fs::write(root.join(p), "").unwrap();
        put("etc/init.d/nginx");
        put("etc/init.d/hwclock.sh");
        put("etc/init.d/README");
        put("lib/systemd/system/nginx.service");
        std::os::unix::fs::symlink("/dev/null", root.join("etc/systemd/system/hwclock.service")).unwrap();
        let both = vec!["systemd-sysv-generator", "systemd-rc-local-generator"];
        assert_eq!(idle_compat_generators(&root), both);
        // A script without a unit keeps the SysV generator; an rc.local keeps its generator.
        put("etc/init.d/legacy");
        put("etc/rc.local");
        assert!(idle_compat_generators(&root).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
