//! Running host programs for this crate: one place that turns "not installed" into
//! [`VmmError::Missing`] with an install hint, and failures into errors carrying stderr.

use crate::{Progress, VmmError};
use std::process::{Output, Stdio};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The apt hint for a program this crate runs.
pub(crate) fn hint(program: &str) -> &'static str {
    match program {
        "qemu-system-x86_64" => "apt-get install qemu-system-x86",
        "debootstrap" => "apt-get install debootstrap debian-archive-keyring",
        "mkfs.ext4" | "resize2fs" | "e2fsck" => "apt-get install e2fsprogs",
        "ssh" | "ssh-keygen" => "apt-get install openssh-client",
        "lz4" => "apt-get install lz4",
        "zstd" => "apt-get install zstd",
        "xz" => "apt-get install xz-utils",
        "apt-get" | "apt-cache" => "run on Debian/Ubuntu, or give a kernel .deb (`kernel_deb`)",
        "dpkg-deb" => "apt-get install dpkg",
        "busybox" => "apt-get install busybox-static",
        "curl" => "apt-get install curl",
        "ip" => "apt-get install iproute2",
        _ => "install it with your package manager",
    }
}

/// Map a spawn error to [`VmmError::Missing`] when the program does not exist.
pub(crate) fn spawn_error(e: std::io::Error, program: &str) -> VmmError {
    if e.kind() == std::io::ErrorKind::NotFound {
        VmmError::Missing {
            program: program.into(),
            hint: hint(program).into(),
        }
    } else {
        VmmError::Io {
            context: format!("running {program}"),
            source: e,
        }
    }
}

fn program_of(cmd: &Command) -> String {
    cmd.as_std().get_program().to_string_lossy().into_owned()
}

/// Run to completion; a non-zero exit is an error carrying the program's stderr.
pub(crate) async fn run(cmd: &mut Command, what: &str) -> Result<Output, VmmError> {
    let program = program_of(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| spawn_error(e, &program))?;
    if !out.status.success() {
        return Err(failed(what, &out.status, &out.stderr));
    }
    Ok(out)
}

/// The error for a program that exited unsuccessfully: a [`VmmError::Command`] with the end of
/// its stderr, or, when it ran out of disk space, a [`VmmError::Io`] whose source is ENOSPC (so
/// callers can tell "disk full" apart).
pub(crate) fn failed(what: &str, status: &std::process::ExitStatus, stderr: &[u8]) -> VmmError {
    let err = String::from_utf8_lossy(stderr);
    let tail: Vec<&str> = err.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let reason = format!("{status}: {}", tail.join(" | "));
    if err.contains("No space left on device") {
        return VmmError::Io {
            context: format!("{what} failed ({reason})"),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
    }
    VmmError::Command {
        what: what.into(),
        reason,
    }
}

/// Run to completion, handing every output line that `keep` accepts to `progress`.
pub(crate) async fn run_with_progress(
    cmd: &mut Command,
    what: &str,
    keep: fn(&str) -> bool,
    progress: Progress<'_>,
) -> Result<(), VmmError> {
    let program = program_of(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| spawn_error(e, &program))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let err_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut all = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push(l);
        }
        all
    });
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        if keep(&l) {
            progress(l.trim());
        }
    }
    let status = child
        .wait()
        .await
        .map_err(VmmError::io(format!("waiting for {program}")))?;
    let err_lines = err_task.await.unwrap_or_default();
    if !status.success() {
        return Err(failed(what, &status, err_lines.join("\n").as_bytes()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn out_of_space_keeps_enospc_as_the_source() {
        let st = std::process::ExitStatus::from_raw(1 << 8);
        let e = failed(
            "mkfs.ext4",
            &st,
            b"mkfs.ext4: No space left on device while writing",
        );
        let src = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("io source");
        assert_eq!(src.raw_os_error(), Some(libc::ENOSPC));
        assert!(e.to_string().contains("mkfs.ext4"), "{e}");
        assert!(matches!(
            failed("x", &st, b"some other error"),
            VmmError::Command { .. }
        ));
    }
}
