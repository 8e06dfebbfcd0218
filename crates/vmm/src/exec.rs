//! Running a command's process on the host for exec: one spawn helper for every backend that
//! streams stdout and stderr byte-exact through a bounded queue, the timeout, and the exit code.

use crate::{Hypervisor, MachineSpec, VmmError};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc::{Receiver, Sender};

/// A piece of a command's output, as it comes, byte-exact. Where the output is UTF-8 a chunk
/// never ends inside a character (the rest of a split character waits for the next read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    /// Bytes the command wrote to its standard output.
    Stdout(Vec<u8>),
    /// Bytes the command wrote to its standard error.
    Stderr(Vec<u8>),
}

/// Where a command's output goes: a bounded queue, so a reader that stops reading stops the
/// command's output (the pipe fills and the command waits), and a reader that goes away kills it.
pub type OutputSink = Sender<OutputChunk>;

/// Chunks (of up to 16 KiB) that may wait in an [`OutputSink`].
pub const OUTPUT_QUEUE: usize = 16;

/// A new output queue.
pub fn output_queue() -> (OutputSink, Receiver<OutputChunk>) {
    tokio::sync::mpsc::channel(OUTPUT_QUEUE)
}

/// Everything a command run in a machine produced, collected by [`exec_collect`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecOutput {
    /// Exit code of the command (128+signal when a signal killed it).
    pub code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

/// Run `cmd` in a machine through [`Hypervisor::exec`] and collect all of its output.
pub async fn exec_collect(
    h: &dyn Hypervisor,
    spec: &MachineSpec,
    cmd: &str,
    timeout: Duration,
) -> Result<ExecOutput, VmmError> {
    let (tx, rx) = output_queue();
    let (code, out) = tokio::join!(h.exec(spec, cmd, timeout, tx), collect(rx));
    Ok(ExecOutput { code: code?, ..out })
}

/// Everything that arrives on `rx` until all its senders are gone.
pub(crate) async fn collect(mut rx: Receiver<OutputChunk>) -> ExecOutput {
    let mut out = ExecOutput::default();
    while let Some(c) = rx.recv().await {
        match c {
            OutputChunk::Stdout(b) => out.stdout.extend_from_slice(&b),
            OutputChunk::Stderr(b) => out.stderr.extend_from_slice(&b),
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

/// What [`run_streaming`] returns besides the output it sent.
#[derive(Debug)]
pub(crate) struct Finished {
    /// Exit code (128+signal when killed).
    pub code: i32,
}

/// Run `argv` (stdin closed, stdout and stderr piped), sending its output to `out` as it comes,
/// for at most `timeout` (then the process is killed and the error names machine `name`).
/// `spawn_err` maps a failure to start the program.
pub(crate) async fn run_streaming(
    name: &str,
    argv: &[String],
    timeout: Duration,
    out: &OutputSink,
    spawn_err: impl FnOnce(std::io::Error) -> VmmError,
) -> Result<Finished, VmmError> {
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    // Until the command ends by itself, its whole process group dies with this call (a
    // timeout, a reader gone, the caller dropping us): a shell's children included.
    let mut group = Group(child.id());
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let run = async {
        let (out_ok, err_ok) = tokio::join!(
            pump(stdout, out, OutputChunk::Stdout),
            pump(stderr, out, OutputChunk::Stderr),
        );
        out_ok && err_ok
    };
    let gone = |child: &mut tokio::process::Child| {
        let _ = child.start_kill();
        VmmError::Exec {
            name: name.to_string(),
            reason: "its output's reader went away; the command was killed".into(),
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    match tokio::time::timeout_at(deadline, run).await {
        Ok(false) => Err(gone(&mut child)),
        Ok(true) => {
            let status = tokio::time::timeout_at(deadline, child.wait())
                .await
                .map_err(|_| VmmError::Exec {
                    name: name.to_string(),
                    reason: format!("command did not finish within {}s", timeout.as_secs()),
                })?
                .map_err(VmmError::io(format!("waiting for {}", argv[0])))?;
            // It ended by itself: what it left running on purpose (`cmd &`) stays.
            group.0 = None;
            Ok(Finished {
                code: exit_code(status),
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

/// A process group killed when dropped, unless disarmed (`.0 = None`).
struct Group(Option<u32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Read `r` to its end, sending its bytes wrapped by `wrap` as they come (never ending a chunk
/// inside a UTF-8 character); returns whether the reader was there to the end.
async fn pump(mut r: impl AsyncRead + Unpin, out: &OutputSink, wrap: fn(Vec<u8>) -> OutputChunk) -> bool {
    let mut buf = vec![0u8; 16 << 10];
    let mut pending: Vec<u8> = Vec::new();
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        let valid = utf8_prefix_len(&pending);
        if valid > 0 && out.send(wrap(pending.drain(..valid).collect())).await.is_err() {
            return false;
        }
    }
    if !pending.is_empty() && out.send(wrap(pending)).await.is_err() {
        return false;
    }
    true
}

/// How much of `b` can be sent now: all of it, except a UTF-8 character cut short at the end
/// (kept for the next read). Invalid bytes elsewhere are sent (and replaced).
pub(crate) fn utf8_prefix_len(b: &[u8]) -> usize {
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
        let (tx, rx) = output_queue();
        let run =
            async move { run_streaming("m", &sh(script), timeout, &tx, VmmError::io("spawning")).await };
        tokio::join!(run, collect(rx))
    }

    #[tokio::test]
    async fn binary_output_is_byte_exact() {
        let (r, o) = run("printf 'a\\377\\000b\\303'", Duration::from_secs(10)).await;
        r.unwrap();
        assert_eq!(o.stdout, b"a\xff\x00b\xc3");
    }

    #[tokio::test]
    async fn a_dropped_exec_kills_the_command_and_its_children() {
        let (tx, _rx) = output_queue();
        let marker = format!("sleep 9{}", std::process::id() % 1000);
        let script = format!("{marker}1; echo never");
        let alive = |m: &str| {
            std::process::Command::new("pgrep")
                .args(["-f", m])
                .status()
                .unwrap()
                .success()
        };
        let argv = sh(&script);
        let run = run_streaming("m", &argv, Duration::from_secs(60), &tx, VmmError::io("spawning"));
        // The caller gives up (the client went away) while the shell's child runs.
        let dropped = tokio::time::timeout(Duration::from_millis(500), run).await;
        assert!(dropped.is_err(), "the command cannot have ended");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(&marker) {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell's child outlived the exec"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_kills_the_command() {
        let (tx, rx) = output_queue();
        drop(rx);
        let t = std::time::Instant::now();
        let r = run_streaming(
            "m",
            &sh("yes"),
            Duration::from_secs(30),
            &tx,
            VmmError::io("spawning"),
        )
        .await;
        assert!(
            matches!(&r, Err(VmmError::Exec { reason, .. }) if reason.contains("went away")),
            "{r:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_holds_the_output_bounded() {
        // Nobody reads: the queue fills, the pipe fills, and the command waits instead of the
        // daemon buffering its output.
        let (tx, rx) = output_queue();
        let cmd = tokio::spawn(async move {
            run_streaming(
                "m",
                &sh("yes | head -c 100000000"),
                Duration::from_secs(60),
                &tx,
                VmmError::io("spawning"),
            )
            .await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rx.len() < OUTPUT_QUEUE {
            assert!(std::time::Instant::now() < deadline, "the queue never filled");
            tokio::task::yield_now().await;
        }
        assert!(
            !cmd.is_finished(),
            "the command could not have written 100 MB into a bounded queue"
        );
        drop(rx);
        assert!(cmd.await.unwrap().is_err());
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
    async fn a_missing_program_is_a_spawn_error() {
        let (tx, _rx) = output_queue();
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
