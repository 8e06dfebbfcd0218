//! QEMU's machine protocol (QMP) over the machine's `qmp.sock`: one command per connection,
//! after the capabilities handshake; used for the ACPI power button, and to find (and resume) a
//! guest QEMU paused because the host's disk is full.

use crate::VmmError;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Send one QMP command (after the capabilities handshake) and wait for its reply (5 s at most).
pub(crate) async fn qmp_command(socket: &Path, command: &str) -> Result<serde_json::Value, VmmError> {
    let ctx = || format!("QMP {command} on {}", socket.display());
    let fut = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(VmmError::io(ctx()))?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let reply = async |lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>| {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .map_err(VmmError::io(ctx()))?
                    .ok_or_else(|| VmmError::io(ctx())(std::io::Error::other("QMP closed")))?;
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v.get("return").is_some() || v.get("QMP").is_some() {
                    return Ok(v);
                }
                if let Some(e) = v.get("error") {
                    return Err(VmmError::io(ctx())(std::io::Error::other(e.to_string())));
                }
            }
        };
        reply(&mut lines).await?; // greeting
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(VmmError::io(ctx()))?;
        reply(&mut lines).await?;
        w.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .await
            .map_err(VmmError::io(ctx()))?;
        reply(&mut lines).await
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| VmmError::io(ctx())(std::io::Error::other("timed out")))?
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
