//! Reaching a guest's `sistemo-agent`: the static binary packed into every initramfs, the cache
//! of open channels (one per machine, reopened when it breaks), and exec over a session.
//!
//! The channel is QEMU's virtio-serial port on a Unix socket (`agent.sock` in the machine's
//! folder); the `netns` backend runs the same agent on a socket pair inside the namespace.

use crate::exec::utf8_prefix_len;
use crate::{MachineSpec, OutputChunk, OutputSink, VmmError};
use sistemo_agent::client::{Client, Event, Session, connect};
use sistemo_agent::proto::{Job, Start};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

/// The agent binary (static, stripped), built by this crate's build script.
pub static AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sistemo-agent"));

/// How long one attempt to greet an agent may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Open agent channels by machine.
#[derive(Default)]
pub(crate) struct Agents {
    open: Mutex<HashMap<Uuid, Client>>,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agents")
    }
}

impl Agents {
    /// The machine's channel, opened on `socket` if there is none or it broke.
    pub(crate) async fn get(&self, spec: &MachineSpec, socket: &Path) -> Result<Client, VmmError> {
        if let Some(c) = self.open.lock().expect("agents").get(&spec.id)
            && c.is_open()
        {
            return Ok(c.clone());
        }
        let unreachable = |reason: String| VmmError::Exec {
            name: spec.name.clone(),
            reason: format!("the guest agent does not answer ({reason})"),
        };
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| unreachable(format!("{}: {e}", socket.display())))?;
        let c = connect(stream, HELLO_TIMEOUT)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        self.open.lock().expect("agents").insert(spec.id, c.clone());
        Ok(c)
    }

    /// Forget a machine's channel (it stopped).
    pub(crate) fn forget(&self, spec: &MachineSpec) {
        self.open.lock().expect("agents").remove(&spec.id);
    }
}

/// The session of a shell command line (`sh -c`, a trailing `&` detached) with a timeout.
pub(crate) fn shell_start(cmd: &str, timeout: Duration) -> Start {
    Start {
        job: Job::Exec {
            argv: vec!["sh".into(), "-c".into(), crate::shell::detach_background(cmd)],
        },
        env: Vec::new(),
        cwd: None,
        user: None,
        tty: None,
        stdin: false,
        timeout_ms: Some(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
    }
}

/// Run a session to its end, sending its output to `out` (chunks never end inside a UTF-8
/// character); its exit code, 128+signal when a signal killed it.
pub(crate) async fn run_to_end(name: &str, mut s: Session, out: &OutputSink) -> Result<i32, VmmError> {
    let err = |reason: String| VmmError::Exec {
        name: name.to_string(),
        reason,
    };
    let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    loop {
        match s.next().await {
            Some(Event::Stdout(b)) | Some(Event::Stderr(b)) if b.is_empty() => {}
            Some(ev @ (Event::Stdout(_) | Event::Stderr(_))) => {
                let (i, b) = match ev {
                    Event::Stdout(b) => (0, b),
                    Event::Stderr(b) => (1, b),
                    _ => unreachable!("matched above"),
                };
                let p = &mut pending[i];
                p.extend_from_slice(&b);
                let n = utf8_prefix_len(p);
                if n > 0 {
                    let chunk: Vec<u8> = p.drain(..n).collect();
                    let c = if i == 0 {
                        OutputChunk::Stdout(chunk)
                    } else {
                        OutputChunk::Stderr(chunk)
                    };
                    if out.send(c).await.is_err() {
                        // Dropping the session kills the command.
                        return Err(err("its output's reader went away; the command was killed".into()));
                    }
                }
            }
            Some(Event::Started(_)) | Some(Event::Facts(_)) | Some(Event::Applied(_)) => {}
            Some(Event::Exited {
                code,
                signal,
                timed_out,
            }) => {
                for (i, p) in pending.into_iter().enumerate() {
                    if !p.is_empty() {
                        let c = if i == 0 {
                            OutputChunk::Stdout(p)
                        } else {
                            OutputChunk::Stderr(p)
                        };
                        let _ = out.send(c).await;
                    }
                }
                if timed_out {
                    return Err(err(
                        "command did not finish within its timeout; it was killed".into()
                    ));
                }
                return Ok(code.unwrap_or_else(|| 128 + signal.unwrap_or(0)));
            }
            Some(Event::Failed(e)) => return Err(err(e)),
            None => return Err(err("the connection to the guest agent broke".into())),
        }
    }
}
