//! QEMU's machine protocol (QMP) over the machine's `qmp.sock`: the ACPI power button, a guest
//! paused on a full host disk, and saving and restoring machines (templates).

use crate::VmmError;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send one QMP command (after the capabilities handshake) and wait for its reply (5 s at most).
pub(crate) async fn qmp_command(socket: &Path, command: &str) -> Result<serde_json::Value, VmmError> {
    let fut = async {
        let mut q = Qmp::connect(socket).await?;
        q.execute(command, None).await
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| qmp_error(socket, command, std::io::Error::other("timed out")))?
}

fn qmp_error(socket: &Path, command: &str, e: std::io::Error) -> VmmError {
    VmmError::io(format!("QMP {command} on {}", socket.display()))(e)
}

/// A QMP connection past its capabilities handshake, for several commands in a row (saving
/// and restoring a machine); commands may carry a file descriptor (`getfd`).
pub(crate) struct Qmp {
    socket: std::path::PathBuf,
    stream: tokio::net::UnixStream,
    buf: Vec<u8>,
}

impl Qmp {
    /// Connect to `socket` and negotiate capabilities.
    pub(crate) async fn connect(socket: &Path) -> Result<Qmp, VmmError> {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| qmp_error(socket, "connect", e))?;
        let mut q = Qmp {
            socket: socket.to_path_buf(),
            stream,
            buf: Vec::new(),
        };
        q.reply("greeting").await?;
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    /// Run `command` with `args`; its `return` value, or its error.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmmError> {
        let line = Self::line(command, args);
        self.stream
            .write_all(line.as_bytes())
            .await
            .map_err(|e| qmp_error(&self.socket, command, e))?;
        self.reply(command).await
    }

    /// Run `command` with `args`, passing `fd` along (SCM_RIGHTS), as `getfd` needs.
    pub(crate) async fn execute_with_fd(
        &mut self,
        command: &str,
        args: serde_json::Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<serde_json::Value, VmmError> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::{AsRawFd, RawFd};
        let line = Self::line(command, Some(args));
        let fds: [RawFd; 1] = [fd.as_raw_fd()];
        let raw = self.stream.as_raw_fd();
        let sent = loop {
            self.stream
                .writable()
                .await
                .map_err(|e| qmp_error(&self.socket, command, e))?;
            let r = self.stream.try_io(tokio::io::Interest::WRITABLE, || {
                sendmsg::<()>(
                    raw,
                    &[std::io::IoSlice::new(line.as_bytes())],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(qmp_error(&self.socket, command, e)),
            }
        };
        // The descriptor went with the first byte; the rest of a short write follows plainly.
        self.stream
            .write_all(&line.as_bytes()[sent..])
            .await
            .map_err(|e| qmp_error(&self.socket, command, e))?;
        self.reply(command).await
    }

    fn line(command: &str, args: Option<serde_json::Value>) -> String {
        let mut m = serde_json::json!({ "execute": command });
        if let Some(a) = args {
            m["arguments"] = a;
        }
        format!("{m}\n")
    }

    /// The next reply (events are skipped).
    async fn reply(&mut self, command: &str) -> Result<serde_json::Value, VmmError> {
        loop {
            while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let v: serde_json::Value = serde_json::from_slice(&line).unwrap_or_default();
                if v.get("return").is_some() || v.get("QMP").is_some() {
                    return Ok(v);
                }
                if let Some(e) = v.get("error") {
                    let desc = e["desc"].as_str().map_or_else(|| e.to_string(), str::to_string);
                    return Err(qmp_error(&self.socket, command, std::io::Error::other(desc)));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| qmp_error(&self.socket, command, e))?;
            if n == 0 {
                return Err(qmp_error(
                    &self.socket,
                    command,
                    std::io::Error::other("QMP closed"),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// True for a `query-status` reply saying the guest is paused on a disk write error: the disk's
/// default `werror=enospc` stops the VM when the host has no space left, instead of handing the
/// guest an I/O error.
pub(crate) fn is_io_error(reply: &serde_json::Value) -> bool {
    reply["return"]["status"] == "io-error"
}

#[cfg(test)]
mod tests {
    use super::is_io_error;

    #[test]
    fn only_the_io_error_status_is_a_full_disk() {
        let status = |s: &str, running: bool| serde_json::json!({"return": {"status": s, "running": running, "singlestep": false}});
        assert!(is_io_error(&status("io-error", false)));
        for s in ["running", "paused", "shutdown", "internal-error"] {
            assert!(!is_io_error(&status(s, s == "running")), "{s}");
        }
        assert!(!is_io_error(&serde_json::json!({"return": {}})));
    }
}
