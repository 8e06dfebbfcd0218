//! Confining QEMU: the unprivileged user it switches to (`-runas`) once it has opened its files
//! as root, the empty directory it is chrooted into (`-chroot`), and its seccomp filter
//! (`-sandbox`).
//!
//! QEMU opens the disk, initrd, TAP, console log, QMP socket and pidfile as root and then, just
//! before the guest's first instruction, chroots into an empty root-owned directory and drops to
//! a uid and gid of its machine's own (the base + the machine's slot, like the jailer's `--uid`
//! of Firecracker). Those files stay root-owned and private (0600 in a 0700 machine folder): a
//! VMM that escapes the emulator runs as a user that owns nothing, sees no file, cannot open any
//! machine's disk, its own included, and shares its uid with no other process, so it can neither
//! signal nor trace another machine's VMM.

use crate::VmmError;
use std::path::{Path, PathBuf};

/// The default user host tools on untrusted file systems run as (see `crate::confine`).
pub const DEFAULT_VMM_USER: &str = "sistemo-vmm";

/// The default first per-machine VMM uid: 0x70000000, at the start of the range systemd leaves
/// unused (above the 0x00080000–0x6FFFFFFF range for containers), so no account or container
/// of the host has these uids.
pub const DEFAULT_VMM_UID_BASE: u32 = 0x7000_0000;

/// Whether `base` can start the per-machine uid range: not root's, and the whole range below
/// the kernel's "no uid" (-1) value.
pub fn check_uid_base(base: u32) -> Result<(), String> {
    let last = u64::from(base) + u64::from(crate::TEMPLATE_SLOT);
    if base < 1000 || last >= u64::from(u32::MAX) {
        return Err(format!(
            "vmm_uid_base {base} is out of range (allowed: 1000 to {})",
            u64::from(u32::MAX) - 1 - u64::from(crate::TEMPLATE_SLOT)
        ));
    }
    Ok(())
}

/// QEMU's seccomp filter. `elevateprivileges` stays `allow`: QEMU 7.2 installs the filter before
/// it applies `-runas`, so `deny` (and `children`) kill it with SIGSYS in its own `setgid`;
/// once it has switched users it has no capability left to elevate with, and `spawn=deny`
/// forbids executing a set-uid program. `spawn=deny` in turn rules out `-daemonize` (a fork
/// after the filter); the backend detaches QEMU itself.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/// The user QEMU switches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    /// Login name.
    pub name: String,
    /// User ID (never 0).
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
}

impl VmmUser {
    /// Look `name` up, creating it as a system user without home or shell when missing.
    pub fn ensure(name: &str) -> Result<VmmUser, VmmError> {
        let err = |reason: String| VmmError::Command {
            what: format!("setting up the VMM user {name}"),
            reason,
        };
        if let Some(u) = lookup(name)? {
            return Ok(u);
        }
        let out = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(["--shell", "/usr/sbin/nologin", "--user-group", name])
            .output()
            .map_err(|e| err(format!("running useradd: {e}")))?;
        if !out.status.success() {
            return Err(err(format!(
                "useradd {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        tracing::info!(user = name, "created the VMM user");
        lookup(name)?.ok_or_else(|| err("useradd succeeded but the user does not exist".into()))
    }
}

fn lookup(name: &str) -> Result<Option<VmmUser>, VmmError> {
    let err = |reason: String| VmmError::Command {
        what: format!("setting up the VMM user {name}"),
        reason,
    };
    let u = nix::unistd::User::from_name(name).map_err(|e| err(format!("looking it up: {e}")))?;
    match u {
        Some(u) if u.uid.is_root() || u.gid.as_raw() == 0 => {
            Err(err("it has uid or gid 0; choose an unprivileged user".into()))
        }
        Some(u) => Ok(Some(VmmUser {
            name: name.to_string(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })),
        None => Ok(None),
    }
}

/// The empty directory a machine's QEMU is chrooted into.
pub(crate) fn jail_dir(machine_dir: &Path) -> PathBuf {
    machine_dir.join("jail")
}

/// Create the jail (root-owned, empty, 0555) and make the machine's folder private.
pub(crate) fn prepare(machine_dir: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(VmmError::io(format!("setting the mode of {}", p.display())))
    };
    set(machine_dir, 0o700)?;
    let jail = jail_dir(machine_dir);
    match std::fs::create_dir(&jail) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(VmmError::io(format!("creating {}", jail.display()))(e)),
    }
    set(&jail, 0o555)?;
    // QEMU must find nothing in it; something in it means the folder was tampered with.
    let entries = std::fs::read_dir(&jail)
        .map_err(VmmError::io(format!("reading {}", jail.display())))?
        .count();
    if entries != 0 {
        return Err(VmmError::io(format!("preparing {}", jail.display()))(
            std::io::Error::other("the chroot directory is not empty"),
        ));
    }
    Ok(())
}
