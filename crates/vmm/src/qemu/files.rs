//! Where a machine's QEMU files live in its folder (QMP and agent sockets, pidfile, console,
//! SSH control socket, initrd), and how they are created: private to root.

use crate::{MachineSpec, VmmError};
use std::path::{Path, PathBuf};

/// Files of a machine in its folder.
pub(super) fn qmp_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("qmp.sock")
}
pub(super) fn pid_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("qemu.pid")
}
pub(super) fn console_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("console.log")
}
pub(super) fn agent_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("agent.sock")
}
pub(super) fn ctl_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("ssh.ctl")
}
pub(super) fn initrd_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("initrd.img")
}
/// Present while the running VMM has a vsock device: the guest's CID.
pub(super) fn vsock_path(spec: &MachineSpec) -> PathBuf {
    spec.dir.join("vsock.cid")
}

/// Create `path` if missing and make it 0600 (root's, like its folder); the open file.
pub(super) fn private_file(path: &Path) -> Result<std::fs::File, VmmError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(VmmError::io(format!("opening {}", path.display())))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(VmmError::io(format!("setting the mode of {}", path.display())))?;
    Ok(f)
}
