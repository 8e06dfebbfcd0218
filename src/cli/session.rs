//! Sessions from the CLI, through the daemon, to a guest's agent: `machine exec -i/-t`,
//! `machine shell` (a raw terminal that follows the window's size) and `machine cp` (tar streams).

use crate::api::{SessionRequest, TermSize};
use crate::client::Client;
use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use sistemo_agent::proto::{Codec, Frame, GuestMsg, HostMsg, Kind, WinSize};
use std::os::fd::AsFd;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder};

/// What the local side of a session is.
pub enum Local {
    /// This terminal, in raw mode; its size follows the window.
    Terminal,
    /// Our stdin streamed to the command (`exec -i`).
    Stdin,
    /// Nothing to send (the command's stdin is empty).
    Nothing,
    /// A tar archive of this local path is sent (`cp SRC NAME:DST`).
    Upload(PathBuf),
    /// The archive that comes back is unpacked here (`cp NAME:SRC DST`).
    Download(PathBuf),
}

/// The terminal's size now.
pub fn term_size() -> Option<TermSize> {
    terminal_size::terminal_size_of(std::io::stdout().as_fd()).map(|(w, h)| TermSize { rows: h.0, cols: w.0 })
}

/// Puts the terminal in raw mode; restores it when dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).context("setting the terminal to raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin().as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

/// Open the session `req` on machine `name` and run it to its end; the command's exit code
/// (128+signal when a signal killed it).
pub async fn run(c: &Client, name: &str, req: &SessionRequest, local: Local) -> Result<i32> {
    let path = format!("/v1/machines/{}/session", super::urlencode(name));
    let (conn, early) = c.upgrade(&path, req, "sistemo-session")?;
    let (mut rd, mut wr) = tokio::io::split(conn);
    let (tx, mut rx) = mpsc::channel::<Frame>(16);
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some(f) = rx.recv().await {
            buf.clear();
            if Codec.encode(f, &mut buf).is_err() || wr.write_all(&buf).await.is_err() {
                break;
            }
        }
        // Keep the connection open until the session ends: closing it would kill the command.
        std::future::pending::<()>().await;
    });
    let _raw = match local {
        Local::Terminal => Some(RawMode::enter()?),
        _ => None,
    };
    let mut download = None;
    let mut feeder = None;
    match local {
        Local::Terminal => {
            feeder = Some(tokio::spawn(send_all(
                Box::new(tokio::io::stdin()),
                tx.clone(),
                false,
            )));
            tokio::spawn(follow_window(tx.clone()));
        }
        Local::Stdin => {
            feeder = Some(tokio::spawn(send_all(
                Box::new(tokio::io::stdin()),
                tx.clone(),
                true,
            )))
        }
        Local::Nothing => {}
        Local::Upload(src) => {
            let (r, w) = std::io::pipe()?;
            let packer = tokio::task::spawn_blocking(move || {
                sistemo_agent::archive::pack(&src, w).with_context(|| format!("reading {}", src.display()))
            });
            let reader = tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(r)));
            let tx = tx.clone();
            feeder = Some(tokio::spawn(async move {
                send_all(Box::new(reader), tx.clone(), true).await;
                if let Ok(Err(e)) = packer.await {
                    eprintln!("sistemo: {e:#}");
                }
            }));
        }
        Local::Download(dst) => {
            let (r, w) = std::io::pipe()?;
            let unpacker = tokio::task::spawn_blocking(move || {
                sistemo_agent::archive::unpack(r, &dst).with_context(|| format!("writing {}", dst.display()))
            });
            download = Some((
                tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(w))),
                unpacker,
            ));
        }
    }
    let mut acc = BytesMut::from(&early[..]);
    let mut received = 0usize;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let result = loop {
        let frame = match Codec.decode(&mut acc) {
            Ok(Some(f)) => f,
            Ok(None) => {
                if rd.read_buf(&mut acc).await? == 0 {
                    bail!("the daemon closed the session before it ended (it stopped or crashed)");
                }
                continue;
            }
            Err(e) => bail!("bad session data from the daemon: {e}"),
        };
        match frame.kind {
            Kind::Stdout => match &mut download {
                Some((w, _)) => {
                    received += frame.payload.len();
                    w.write_all(&frame.payload).await.context("unpacking the copy")?
                }
                None => {
                    if stdout
                        .write_all(&frame.payload)
                        .await
                        .and(stdout.flush().await)
                        .is_err()
                    {
                        // Our reader went away (`| head`): end quietly, which kills the command.
                        return Ok(141);
                    }
                }
            },
            Kind::Stderr => {
                let _ = stderr.write_all(&frame.payload).await;
                let _ = stderr.flush().await;
            }
            Kind::Control => match frame.message::<GuestMsg>() {
                Ok(GuestMsg::Exited {
                    code,
                    signal,
                    timed_out,
                }) => {
                    if timed_out {
                        eprintln!("sistemo: the command did not finish within its timeout; it was killed");
                    }
                    break Ok(code.unwrap_or_else(|| 128 + signal.unwrap_or(0)));
                }
                Ok(GuestMsg::Failed { error }) => break Err(anyhow::anyhow!("{error}")),
                _ => {}
            },
            Kind::Stdin => {}
        }
    };
    if let Some(f) = feeder {
        f.abort();
    }
    writer.abort();
    drop(_raw);
    if let Some((mut w, unpacker)) = download {
        // tokio writes files on its blocking pool: flush before the pipe closes.
        let flushed = w.flush().await;
        drop(w);
        let unpacked = unpacker.await?;
        // The guest's failure says more than the empty archive it left us (which the unpacker
        // removed: nothing half-copied stays).
        result.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        flushed.context("unpacking the copy")?;
        unpacked.with_context(|| format!("after {received} bytes from the guest"))?;
    }
    result
}

/// Send everything `r` yields as stdin frames; at its end, close the command's stdin (unless
/// `close` is false: a terminal sends its own ^D).
async fn send_all(mut r: Box<dyn AsyncRead + Unpin + Send>, tx: mpsc::Sender<Frame>, close: bool) {
    let mut buf = vec![0u8; sistemo_agent::proto::CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send(Frame::data(Kind::Stdin, 1, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    if close {
        let _ = tx.send(Frame::control(1, &HostMsg::CloseStdin)).await;
    }
}

/// Send the terminal's new size whenever the window changes.
async fn follow_window(tx: mpsc::Sender<Frame>) {
    let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
        return;
    };
    while winch.recv().await.is_some() {
        if let Some(s) = term_size() {
            let size = WinSize {
                rows: s.rows,
                cols: s.cols,
            };
            if tx.send(Frame::control(1, &HostMsg::Resize(size))).await.is_err() {
                return;
            }
        }
    }
}
