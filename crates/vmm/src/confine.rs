//! Host tools that parse untrusted file systems (`e2fsck` and `resize2fs` on a guest's disk, a
//! volume, a downloaded image): run unprivileged, without capabilities, in fresh namespaces.
//!
//! A disk image is attacker-controlled input and e2fsprogs parses it in C. Once the daemon has
//! named a tool user ([`confine_tools_as`]), every run hands the tool only the image, as its
//! standard input (`/dev/stdin`): the file is lent to the tool user (`fchown`) for the run and
//! given back to its owner afterwards, whatever happened. The tool runs under `setpriv` as that
//! user with no capability, `no_new_privs`, no supplementary group, and `unshare`'s fresh
//! network, IPC and UTS namespaces, so it reaches no path of the data dir (every folder there is
//! root's and private) and no network. Without a tool user (unit tests, `vmm_user: null`) the
//! tool runs as the daemon, on the path.

use crate::VmmError;
use crate::image::Priority;
use crate::proc::spawn_error;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::OnceLock;

/// The unprivileged identity tools run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ToolUser {
    uid: u32,
    gid: u32,
}

static TOOL_USER: OnceLock<ToolUser> = OnceLock::new();

/// From now on, run file system tools as `uid:gid` (never root; the first call wins: the
/// daemon calls it once at start, like its umask).
pub fn confine_tools_as(uid: u32, gid: u32) -> Result<(), VmmError> {
    if uid == 0 || gid == 0 {
        return Err(VmmError::Command {
            what: "confining file system tools".into(),
            reason: format!("the tool user {uid}:{gid} is root; choose an unprivileged user"),
        });
    }
    let _ = TOOL_USER.set(ToolUser { uid, gid });
    Ok(())
}

/// Who file system tools run as: `Some((uid, gid))` once confined.
pub fn tool_user() -> Option<(u32, u32)> {
    TOOL_USER.get().map(|u| (u.uid, u.gid))
}

/// Run `prog args... IMAGE` on the file system image `image` at `prio`, confined as the module
/// explains. Returns the tool's output whatever its exit status (e2fsck's 1 and 2 are
/// successes); a tool that cannot start is an error.
pub async fn on_image(prog: &str, args: &[&str], image: &Path, prio: Priority) -> Result<Output, VmmError> {
    let Some(user) = TOOL_USER.get().copied() else {
        let mut cmd = crate::image::command(prog, prio);
        cmd.args(args).arg(image).stdin(Stdio::null());
        return cmd.output().await.map_err(|e| spawn_error(e, prog));
    };
    let io = |what: &str| VmmError::io(format!("{what} {} for {prog}", image.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io("opening"))?;
    let meta = file.metadata().map_err(io("reading"))?;
    if !meta.is_file() {
        return Err(io("checking")(std::io::Error::other("not a regular file")));
    }
    std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid)).map_err(io("lending"))?;
    let run = async {
        let stdin = file.try_clone().map_err(io("opening"))?;
        let mut cmd = crate::image::command("unshare", prio);
        cmd.args(["--net", "--ipc", "--uts", "--", "setpriv"])
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .args([
                "--clear-groups",
                "--no-new-privs",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg("--")
            .arg(prog)
            .args(args)
            .arg("/dev/stdin")
            .stdin(Stdio::from(stdin));
        cmd.output().await.map_err(|e| spawn_error(e, "unshare"))
    };
    let out = run.await;
    // Given back before anything else happens, also when the tool failed.
    let back =
        std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())).map_err(io("taking back"));
    let out = out?;
    back?;
    // setpriv's own failure to run the tool (exit 127, "failed to execute").
    if out.status.code() == Some(127) && String::from_utf8_lossy(&out.stderr).contains("failed to execute") {
        return Err(spawn_error(std::io::ErrorKind::NotFound.into(), prog));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_as_the_tool_user() {
        let e = confine_tools_as(0, 1000).unwrap_err().to_string();
        assert!(e.contains("is root"), "{e}");
        assert!(tool_user().is_none_or(|(u, _)| u != 0));
    }
}
