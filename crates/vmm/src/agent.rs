//! Reaching a guest's `sistemo-agent`: the static binary packed into every initramfs, the cache
//! of open channels (one per machine, reopened when it breaks), and exec over a session.
//!
//! The channel is QEMU's virtio-serial port on a Unix socket (`agent.sock` in the machine's
//! folder), or virtio-vsock where the machine has a vsock device: then the serial port serves
//! until the agent is up, the next use moves to vsock, and a vsock that fails once leaves the
//! machine on its serial port. The `netns` backend runs the same agent on a socket pair inside
//! the namespace.

use crate::exec::utf8_prefix_len;
use crate::{MachineSpec, OutputChunk, OutputSink, VmmError};
use sistemo_agent::client::{Client, Event, Session, connect};
use sistemo_agent::proto::{Job, Start};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use uuid::Uuid;

/// The agent binary (static, stripped), built by this crate's build script.
pub static AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sistemo-agent"));

/// How long one attempt to greet an agent may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// How long connecting to a guest's vsock port may take (the guest's reply is immediate once
/// its transport is up; until then nothing answers at all).
const VSOCK_CONNECT: Duration = Duration::from_millis(300);

/// Where a machine's agent is reached.
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    /// The virtio-serial port's socket.
    pub(crate) serial: std::path::PathBuf,
    /// The guest's vsock CID, when the machine has a vsock device.
    pub(crate) vsock: Option<u32>,
}

/// A machine's open channel.
struct Open {
    client: Client,
    over_vsock: bool,
    /// Vsock was tried once the agent was up, and failed: serial from now on.
    vsock_failed: bool,
}

/// Open agent channels by machine.
#[derive(Default)]
pub(crate) struct Agents {
    open: Mutex<HashMap<Uuid, Open>>,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Agents")
    }
}

impl Agents {
    /// The machine's channel, opened if there is none or it broke (see the module's notes on
    /// vsock).
    pub(crate) async fn get(&self, spec: &MachineSpec, ch: &Channel) -> Result<Client, VmmError> {
        let (cached, vsock_failed) = match self.open.lock().expect("agents").get(&spec.id) {
            Some(o) if o.client.is_open() => (Some((o.client.clone(), o.over_vsock)), o.vsock_failed),
            Some(o) => (None, o.vsock_failed),
            None => (None, false),
        };
        let vsock = ch.vsock.filter(|_| !vsock_failed);
        match (cached, vsock) {
            (Some((c, true)), _) | (Some((c, false)), None) => return Ok(c),
            // The agent answers on its serial port: move to vsock, once.
            (Some((c, false)), Some(cid)) => {
                let (client, over_vsock) = match vsock_connect(cid).await {
                    Ok(v) => (v, true),
                    Err(e) => {
                        tracing::debug!(machine = %spec.name, "the agent's vsock failed, staying on its serial port: {e}");
                        (c, false)
                    }
                };
                self.keep(spec, &client, over_vsock, !over_vsock);
                return Ok(client);
            }
            (None, Some(cid)) => {
                if let Ok(v) = vsock_connect(cid).await {
                    self.keep(spec, &v, true, false);
                    return Ok(v);
                }
            }
            (None, None) => {}
        }
        let unreachable = |reason: String| VmmError::Exec {
            name: spec.name.clone(),
            reason: format!("the guest agent does not answer ({reason})"),
        };
        let stream = tokio::net::UnixStream::connect(&ch.serial)
            .await
            .map_err(|e| unreachable(format!("{}: {e}", ch.serial.display())))?;
        let c = connect(stream, HELLO_TIMEOUT)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        self.keep(spec, &c, false, vsock_failed);
        Ok(c)
    }

    fn keep(&self, spec: &MachineSpec, client: &Client, over_vsock: bool, vsock_failed: bool) {
        self.open.lock().expect("agents").insert(
            spec.id,
            Open {
                client: client.clone(),
                over_vsock,
                vsock_failed,
            },
        );
    }

    /// Forget a machine's channel (it stopped).
    pub(crate) fn forget(&self, spec: &MachineSpec) {
        self.open.lock().expect("agents").remove(&spec.id);
    }
}

/// A channel to the agent on the guest with vsock CID `cid`.
async fn vsock_connect(cid: u32) -> Result<Client, String> {
    let addr = tokio_vsock::VsockAddr::new(cid, sistemo_agent::proto::VSOCK_PORT);
    let stream = tokio::time::timeout(VSOCK_CONNECT, tokio_vsock::VsockStream::connect(addr))
        .await
        .map_err(|_| format!("vsock {cid}: no answer within {VSOCK_CONNECT:?}"))?
        .map_err(|e| format!("vsock {cid}: {e}"))?;
    connect(stream, HELLO_TIMEOUT)
        .await
        .map_err(|e| format!("vsock {cid}: {e}"))
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
