//! Running a command's process on the host for exec: one spawn helper for every backend that
//! streams stdout and stderr as whole UTF-8 characters, the timeout, and the exit code.

use crate::{Hypervisor, MachineSpec, VmmError};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::UnboundedSender;

/// A piece of a command's output, as it comes. Each chunk holds whole UTF-8 characters (a
/// character split across reads waits for its remaining bytes); invalid bytes become U+FFFD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    /// Text the command wrote to its standard output.
    Stdout(String),
    /// Text the command wrote to its standard error.
    Stderr(String),
}

/// Everything a command run in a machine produced, collected by [`exec_collect`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code of the command (128+signal when a signal killed it).
    pub code: i32,
    /// Standard output, UTF-8 (invalid bytes replaced).
    pub stdout: Vec<u8>,
    /// Standard error, UTF-8 (invalid bytes replaced).
    pub stderr: Vec<u8>,
}

/// Run `cmd` in a machine through [`Hypervisor::exec`] and collect all of its output.
pub async fn exec_collect(
    h: &dyn Hypervisor,
    spec: &MachineSpec,
    cmd: &str,
    timeout: Duration,
) -> Result<ExecOutput, VmmError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let code = h.exec(spec, cmd, timeout, tx).await?;
    Ok(collect(code, &mut rx))
}

/// Drain a channel whose senders are all gone into an [`ExecOutput`].
pub(crate) fn collect(code: i32, rx: &mut tokio::sync::mpsc::UnboundedReceiver<OutputChunk>) -> ExecOutput {
    let mut out = ExecOutput {
        code,
        ..Default::default()
    };
    while let Ok(c) = rx.try_recv() {
        match c {
            OutputChunk::Stdout(s) => out.stdout.extend_from_slice(s.as_bytes()),
            OutputChunk::Stderr(s) => out.stderr.extend_from_slice(s.as_bytes()),
        }
    }
    out
}

/// The exit code of a finished process, 128 + signal number when a signal killed it.
pub(crate) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// How many bytes of the end of stderr [`run_streaming`] keeps for telling failures apart.
const STDERR_TAIL: usize = 4096;

/// What [`run_streaming`] returns besides the output it sent.
#[derive(Debug)]
pub(crate) struct Finished {
    /// Exit code (128+signal when killed).
    pub code: i32,
    /// The last few KiB of stderr (e.g. `ssh`'s connection errors).
    pub stderr_tail: Vec<u8>,
}

/// Run `argv` (stdin closed, stdout and stderr piped), sending its output to `out` as it comes,
/// for at most `timeout` (then the process is killed and the error names machine `name`).
/// `spawn_err` maps a failure to start the program.
pub(crate) async fn run_streaming(
    name: &str,
    argv: &[String],
    timeout: Duration,
    out: &UnboundedSender<OutputChunk>,
    spawn_err: impl FnOnce(std::io::Error) -> VmmError,
) -> Result<Finished, VmmError> {
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let run = async {
        let (_, tail, status) = tokio::join!(
            pump(stdout, out, OutputChunk::Stdout, 0),
            pump(stderr, out, OutputChunk::Stderr, STDERR_TAIL),
            child.wait(),
        );
        (tail, status)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((stderr_tail, status)) => {
            let status = status.map_err(VmmError::io(format!("waiting for {}", argv[0])))?;
            Ok(Finished {
                code: exit_code(status),
                stderr_tail,
            })
        }
        Err(_) => {
            let _ = child.kill().await;
            Err(VmmError::Exec {
                name: name.to_string(),
                reason: format!("command did not finish within {}s", timeout.as_secs()),
            })
        }
    }
}

/// Read `r` to its end, sending whole UTF-8 characters wrapped by `wrap` as they come; returns
/// the last `keep` bytes read.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    out: &UnboundedSender<OutputChunk>,
    wrap: fn(String) -> OutputChunk,
    keep: usize,
) -> Vec<u8> {
    let mut buf = vec![0u8; 16 << 10];
    let mut pending: Vec<u8> = Vec::new();
    let mut tail: Vec<u8> = Vec::new();
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if keep > 0 {
            tail.extend_from_slice(&buf[..n]);
            let extra = tail.len().saturating_sub(keep);
            tail.drain(..extra);
        }
        pending.extend_from_slice(&buf[..n]);
        let valid = utf8_prefix_len(&pending);
        if valid > 0 {
            let chunk: Vec<u8> = pending.drain(..valid).collect();
            let _ = out.send(wrap(String::from_utf8_lossy(&chunk).into_owned()));
        }
    }
    if !pending.is_empty() {
        let _ = out.send(wrap(String::from_utf8_lossy(&pending).into_owned()));
    }
    tail
}

/// How much of `b` can be sent now: all of it, except a UTF-8 character cut short at the end
/// (kept for the next read). Invalid bytes elsewhere are sent (and replaced).
fn utf8_prefix_len(b: &[u8]) -> usize {
    match std::str::from_utf8(b) {
        Ok(_) => b.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => b.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    async fn run(script: &str, timeout: Duration) -> (Result<Finished, VmmError>, ExecOutput) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = run_streaming("m", &sh(script), timeout, &tx, VmmError::io("spawning")).await;
        drop(tx);
        let code = r.as_ref().map(|f| f.code).unwrap_or(-1);
        (r, collect(code, &mut rx))
    }

    #[test]
    fn a_split_character_waits_for_its_end() {
        let e = "é".as_bytes();
        assert_eq!(utf8_prefix_len(&[b'a', e[0]]), 1);
        assert_eq!(utf8_prefix_len(&[b'a', e[0], e[1]]), 3);
        assert_eq!(utf8_prefix_len(b"a\xffb"), 3);
    }

    #[tokio::test]
    async fn streams_both_outputs_and_the_exit_code() {
        let (r, o) = run("echo out; echo err >&2; exit 3", Duration::from_secs(10)).await;
        let f = r.unwrap();
        assert_eq!(f.code, 3);
        assert_eq!(f.stderr_tail, b"err\n");
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
    }

    #[tokio::test]
    async fn killed_by_a_signal_is_128_plus_the_signal() {
        let (r, _) = run("kill -TERM $$", Duration::from_secs(10)).await;
        assert_eq!(r.unwrap().code, 128 + 15);
    }

    #[tokio::test]
    async fn a_timeout_is_an_exec_error() {
        let t = std::time::Instant::now();
        let (r, _) = run("sleep 30", Duration::from_millis(300)).await;
        assert!(matches!(r, Err(VmmError::Exec { .. })), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn only_the_end_of_stderr_is_kept() {
        let (r, o) = run(
            "head -c 10000 /dev/zero | tr '\\0' x >&2; echo END >&2",
            Duration::from_secs(10),
        )
        .await;
        let f = r.unwrap();
        assert_eq!(f.stderr_tail.len(), STDERR_TAIL);
        assert!(f.stderr_tail.ends_with(b"xEND\n"));
        assert_eq!(o.stderr.len(), 10004);
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let r = run_streaming(
            "m",
            &["/nonexistent/prog".into()],
            Duration::from_secs(1),
            &tx,
            VmmError::io("spawning"),
        )
        .await;
        assert!(matches!(r, Err(VmmError::Io { .. })));
    }
}
