//! The agent's end of the channel: reads the host's frames, runs each session (a process, or a
//! tar stream for `cp`) in a task of its own, and writes their output back under the host's
//! credit. A new connection (the host's resync marker, or the end of the stream on a
//! virtio-serial port) kills every session of the previous one.

use crate::proto::{
    CHANNEL, CHUNK, Codec, Frame, GuestMsg, HEADER, HostMsg, Job, Kind, RESYNC, Start, VERSION, WINDOW,
    data_header,
};
use crate::{facts, runner};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::codec::{Decoder, Encoder};

/// After its process has exited, how long a session waits for output still on its way; a
/// background child that keeps the pipe open does not hold the session past this.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// What to do when the stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEof {
    /// A virtio-serial port reads as ended while no host is connected: wait for the next one.
    Wait,
    /// A socket: return.
    Return,
}

enum Input {
    Stdin(Bytes),
    CloseStdin,
    Resize(crate::proto::WinSize),
    Signal(i32),
}

struct Handle {
    input: mpsc::UnboundedSender<Input>,
    credit: Arc<Semaphore>,
}

/// Frames on their way out, tagged with the connection they belong to.
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<(u64, Bytes)>,
    epoch: u64,
}

impl Out {
    async fn frame(&self, f: Frame) {
        let mut b = BytesMut::new();
        if Codec.encode(f, &mut b).is_ok() {
            let _ = self.tx.send((self.epoch, b.freeze())).await;
        }
    }
    async fn msg(&self, session: u32, m: GuestMsg) {
        self.frame(Frame::control(session, &m)).await
    }
    /// A frame already encoded.
    async fn encoded(&self, b: Bytes) {
        let _ = self.tx.send((self.epoch, b)).await;
    }
}

type Sessions = Arc<Mutex<HashMap<u32, Handle>>>;

/// Serve the host on `rd`/`wr` until the stream ends (or forever, with [`OnEof::Wait`]).
pub async fn serve<R, W>(mut rd: R, wr: W, on_eof: OnEof) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let current = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<(u64, Bytes)>(64);
    let writer = tokio::spawn(write_loop(wr, rx, current.clone()));
    let sessions: Sessions = Arc::new(Mutex::new(HashMap::new()));
    let mut acc = BytesMut::with_capacity(CHUNK * 2);
    let mut out = Out { tx, epoch: 0 };
    let mut synced = false;
    loop {
        // At a frame boundary (or lost): a resync marker starts a new connection.
        if acc.starts_with(RESYNC) {
            acc.advance(RESYNC.len());
            synced = true;
            continue;
        }
        let need_more = acc.len() < RESYNC.len() && RESYNC.starts_with(&acc);
        if !need_more && synced {
            match Codec.decode(&mut acc) {
                Ok(Some(f)) => {
                    handle(f, &mut out, &sessions, &current).await;
                    continue;
                }
                Ok(None) => {}
                Err(_) => synced = false,
            }
        }
        if !synced && !need_more {
            // Lost: skip to the next marker.
            match acc.windows(RESYNC.len()).position(|w| w == RESYNC) {
                Some(i) => {
                    acc.advance(i);
                    continue;
                }
                None => {
                    let keep = acc.len().min(RESYNC.len() - 1);
                    acc.advance(acc.len() - keep);
                }
            }
        }
        if rd.read_buf(&mut acc).await? == 0 {
            // The host went away: nothing it started may go on.
            sessions.lock().expect("sessions").clear();
            acc.clear();
            synced = false;
            match on_eof {
                OnEof::Return => break,
                OnEof::Wait => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    drop(out);
    let _ = writer.await;
    Ok(())
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<(u64, Bytes)>,
    current: Arc<AtomicU64>,
) {
    // Small frames (control messages, short output) are gathered into one write; a large one
    // goes out as it is, without a copy.
    let mut small = Vec::with_capacity(64 << 10);
    let mut next = rx.recv().await;
    while let Some((epoch, b)) = next.take() {
        if epoch != current.load(Ordering::SeqCst) {
            next = rx.recv().await;
            continue;
        }
        let mut large = None;
        if b.len() >= 16 << 10 {
            large = Some(b);
        } else {
            small.extend_from_slice(&b);
            while small.len() < 64 << 10 {
                match rx.try_recv() {
                    Ok((e, b)) if e != current.load(Ordering::SeqCst) => drop(b),
                    Ok((_, b)) if b.len() >= 16 << 10 => {
                        large = Some(b);
                        break;
                    }
                    Ok((_, b)) => small.extend_from_slice(&b),
                    Err(_) => break,
                }
            }
        }
        // A virtio-serial write fails only while no host is connected; the next connection
        // resynchronises.
        if !small.is_empty() {
            let _ = wr.write_all(&small).await;
            small.clear();
        }
        if let Some(b) = large {
            let _ = wr.write_all(&b).await;
        }
        let _ = wr.flush().await;
        next = rx.recv().await;
    }
}

async fn handle(f: Frame, out: &mut Out, sessions: &Sessions, current: &Arc<AtomicU64>) {
    let id = f.session;
    match f.kind {
        Kind::Stdin => {
            if let Some(h) = sessions.lock().expect("sessions").get(&id) {
                let _ = h.input.send(Input::Stdin(f.payload));
            }
        }
        Kind::Stdout | Kind::Stderr => {}
        Kind::Control => {
            let Ok(m) = f.message::<HostMsg>() else {
                return;
            };
            match m {
                HostMsg::Hello { version: _, nonce } => {
                    // A new connection: the previous one's sessions end, its queued output is
                    // dropped, and the host hears from us after the marker.
                    sessions.lock().expect("sessions").clear();
                    let epoch = current.fetch_add(1, Ordering::SeqCst) + 1;
                    out.epoch = epoch;
                    let _ = out.tx.send((epoch, Bytes::from_static(RESYNC))).await;
                    out.msg(
                        CHANNEL,
                        GuestMsg::Hello {
                            version: VERSION,
                            agent: env!("CARGO_PKG_VERSION").into(),
                            nonce,
                        },
                    )
                    .await;
                }
                HostMsg::Shutdown if id == CHANNEL => crate::sys::power_off(),
                HostMsg::Ping { n } => {
                    let o = out.clone();
                    tokio::spawn(async move { o.msg(CHANNEL, GuestMsg::Pong { n }).await });
                }
                HostMsg::Start(start) => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let credit = Arc::new(Semaphore::new(WINDOW as usize));
                    {
                        let mut s = sessions.lock().expect("sessions");
                        if id == CHANNEL || s.contains_key(&id) {
                            drop(s);
                            let o = out.clone();
                            tokio::spawn(async move {
                                o.msg(
                                    id,
                                    GuestMsg::Failed {
                                        error: format!("session {id} is in use"),
                                    },
                                )
                                .await
                            });
                            return;
                        }
                        s.insert(
                            id,
                            Handle {
                                input: tx,
                                credit: credit.clone(),
                            },
                        );
                    }
                    let (o, s) = (out.clone(), sessions.clone());
                    tokio::spawn(async move {
                        let last = run(id, start, &o, rx, credit.clone()).await;
                        // Output tasks still waiting for credit the host will never grant end.
                        credit.close();
                        // Output first, then the end; an ended connection's session says nothing.
                        if s.lock().expect("sessions").remove(&id).is_some() {
                            o.msg(id, last).await;
                        }
                    });
                }
                HostMsg::Facts => {
                    let o = out.clone();
                    tokio::spawn(async move {
                        let f = tokio::task::spawn_blocking(facts::collect)
                            .await
                            .unwrap_or_default();
                        o.msg(id, GuestMsg::Facts(f)).await
                    });
                }
                HostMsg::Identity(identity) => {
                    let o = out.clone();
                    tokio::spawn(async move {
                        let m = match crate::identity::apply(*identity).await {
                            Ok(steps) => GuestMsg::Applied { steps },
                            Err(error) => GuestMsg::Failed { error },
                        };
                        o.msg(id, m).await
                    });
                }
                HostMsg::Credit { bytes } => {
                    if let Some(h) = sessions.lock().expect("sessions").get(&id) {
                        h.credit.add_permits(bytes as usize);
                    }
                }
                HostMsg::CloseStdin | HostMsg::Resize(_) | HostMsg::Signal { .. } => {
                    let input = match m {
                        HostMsg::CloseStdin => Input::CloseStdin,
                        HostMsg::Resize(s) => Input::Resize(s),
                        HostMsg::Signal { signal } => Input::Signal(signal),
                        _ => unreachable!("matched above"),
                    };
                    if let Some(h) = sessions.lock().expect("sessions").get(&id) {
                        let _ = h.input.send(input);
                    }
                }
                HostMsg::Shutdown => {}
            }
        }
    }
}

/// Copy `r` to the host as `kind` frames under `credit`, until it ends or, once `exited` is
/// set, stays quiet for [`DRAIN_AFTER_EXIT`].
async fn pump(
    mut r: runner::Reader,
    kind: Kind,
    id: u32,
    out: Out,
    credit: Arc<Semaphore>,
    mut exited: watch::Receiver<bool>,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        // The payload is read right behind the frame's header: the frame leaves as it is.
        let mut buf = vec![0u8; HEADER + CHUNK];
        let n = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_AFTER_EXIT, r.read(&mut buf[HEADER..])).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = r.read(&mut buf[HEADER..]) => r,
                _ = exited.changed() => continue,
            }
        };
        let n = match n {
            Ok(0) => break,
            // A PTY master reads EIO once the terminal's last user is gone.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => return Err(e),
            Ok(n) => n,
        };
        match credit.acquire_many(n as u32).await {
            Ok(p) => p.forget(),
            Err(_) => break,
        }
        data_header(&mut buf[..HEADER], kind, id, n);
        buf.truncate(HEADER + n);
        out.encoded(Bytes::from(buf)).await;
        total += n as u64;
    }
    Ok(total)
}

/// Run one session to its end; returns its last message.
async fn run(
    id: u32,
    start: Start,
    out: &Out,
    mut input: mpsc::UnboundedReceiver<Input>,
    credit: Arc<Semaphore>,
) -> GuestMsg {
    match start.job.clone() {
        Job::Exec { argv } => {
            let mut sp = match runner::spawn(&argv, &start) {
                Ok(sp) => sp,
                // As a shell does: a program that is missing exits 127, one that cannot be run 126.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                    ) =>
                {
                    let prog = argv.first().map(String::as_str).unwrap_or("");
                    let msg = format!("sistemo-agent: {prog}: {e}\n");
                    out.frame(Frame::data(Kind::Stderr, id, msg.into_bytes())).await;
                    let code = if e.kind() == std::io::ErrorKind::NotFound {
                        127
                    } else {
                        126
                    };
                    return GuestMsg::Exited {
                        code: Some(code),
                        signal: None,
                        timed_out: false,
                    };
                }
                Err(e) => {
                    return GuestMsg::Failed {
                        error: format!(
                            "cannot run {:?}: {e}",
                            argv.first().map(String::as_str).unwrap_or("")
                        ),
                    };
                }
            };
            let pid = sp.pid;
            out.msg(id, GuestMsg::Started { pid }).await;
            let (exited_tx, exited_rx) = watch::channel(false);
            let mut pumps = vec![tokio::spawn(pump(
                sp.stdout,
                Kind::Stdout,
                id,
                out.clone(),
                credit.clone(),
                exited_rx.clone(),
            ))];
            if let Some(e) = sp.stderr.take() {
                pumps.push(tokio::spawn(pump(
                    e,
                    Kind::Stderr,
                    id,
                    out.clone(),
                    credit.clone(),
                    exited_rx,
                )));
            }
            let (stdin_tx, stdin_task) = stdin_feeder(id, sp.stdin.take(), start.tty.is_some(), out.clone());
            let deadline = start
                .timeout_ms
                .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
            let mut timed_out = false;
            let status = loop {
                let timeout = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    st = sp.child.wait() => break st,
                    _ = timeout, if !timed_out => {
                        timed_out = true;
                        runner::signal_group(pid, libc::SIGKILL);
                    }
                    i = input.recv() => match i {
                        Some(Input::Stdin(b)) => { let _ = stdin_tx.send(Some(b)); }
                        Some(Input::CloseStdin) => { let _ = stdin_tx.send(None); }
                        Some(Input::Resize(s)) => {
                            if let Some(p) = &sp.pty { let _ = runner::resize(p, s); }
                        }
                        Some(Input::Signal(s)) => {
                            if let Some(p) = &sp.pty { runner::signal_foreground(p, pid, s); }
                            runner::signal_group(pid, s);
                        }
                        // The host is gone or gave up on this session.
                        None => {
                            if let Some(p) = &sp.pty { runner::signal_foreground(p, pid, libc::SIGKILL); }
                            runner::signal_group(pid, libc::SIGKILL);
                            let _ = sp.child.wait().await;
                            return GuestMsg::Failed { error: "the host went away".into() };
                        }
                    },
                }
            };
            let _ = exited_tx.send(true);
            for p in pumps {
                let _ = p.await;
            }
            stdin_task.abort();
            // What it started in the background on purpose (`cmd &`) keeps running, as after
            // `docker exec`; only a timeout or a departed host kill the whole group.
            match status {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    GuestMsg::Exited {
                        code: st.code(),
                        signal: st.signal(),
                        timed_out,
                    }
                }
                Err(e) => GuestMsg::Failed {
                    error: format!("waiting for the process: {e}"),
                },
            }
        }
        Job::ReadArchive { path } => {
            let (r, w) = match std::io::pipe() {
                Ok(p) => p,
                Err(e) => return GuestMsg::Failed { error: e.to_string() },
            };
            let packer = tokio::task::spawn_blocking(move || {
                crate::archive::pack(std::path::Path::new(&path), w).map_err(|e| format!("{path}: {e}"))
            });
            let (_never, rx) = watch::channel(false);
            let sent = pump(
                Box::new(pipe_reader(r)),
                Kind::Stdout,
                id,
                out.clone(),
                credit,
                rx,
            )
            .await;
            match (packer.await, sent) {
                (_, Err(e)) => GuestMsg::Failed {
                    error: format!("reading the archive: {e}"),
                },
                (Ok(Ok(())), Ok(0)) => GuestMsg::Failed {
                    error: "the archive came out empty".into(),
                },
                (Ok(Ok(())), Ok(_)) => GuestMsg::Exited {
                    code: Some(0),
                    signal: None,
                    timed_out: false,
                },
                (Ok(Err(e)), _) => GuestMsg::Failed { error: e },
                (Err(e), _) => GuestMsg::Failed { error: e.to_string() },
            }
        }
        Job::WriteArchive { path } => {
            let (r, w) = match std::io::pipe() {
                Ok(p) => p,
                Err(e) => return GuestMsg::Failed { error: e.to_string() },
            };
            let dst = path.clone();
            let unpacker = tokio::task::spawn_blocking(move || {
                crate::archive::unpack(r, std::path::Path::new(&dst)).map_err(|e| format!("{dst}: {e}"))
            });
            let (stdin_tx, stdin_task) = stdin_feeder(id, Some(Box::new(pipe_writer(w))), false, out.clone());
            let mut unpacker = std::pin::pin!(unpacker);
            loop {
                tokio::select! {
                    r = &mut unpacker => {
                        stdin_task.abort();
                        return match r {
                            Ok(Ok(_)) => GuestMsg::Exited { code: Some(0), signal: None, timed_out: false },
                            Ok(Err(e)) => GuestMsg::Failed { error: e },
                            Err(e) => GuestMsg::Failed { error: e.to_string() },
                        };
                    }
                    i = input.recv() => match i {
                        Some(Input::Stdin(b)) => { let _ = stdin_tx.send(Some(b)); }
                        Some(Input::CloseStdin) => { let _ = stdin_tx.send(None); }
                        Some(_) => {}
                        None => {
                            // The host went away: the unpacker sees the pipe end and fails; the
                            // half-written copy is in its temporary directory, which it removes.
                            stdin_task.abort();
                            return GuestMsg::Failed { error: "the host went away".into() };
                        }
                    },
                }
            }
        }
    }
}

/// A task writing stdin frames to the process (granting the host credit as it goes); `None`
/// closes stdin (on a terminal: sends end-of-file, ^D).
fn stdin_feeder(
    id: u32,
    w: Option<runner::Writer>,
    tty: bool,
    out: Out,
) -> (mpsc::UnboundedSender<Option<Bytes>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<Bytes>>();
    let task = tokio::spawn(async move {
        let mut w = w;
        while let Some(item) = rx.recv().await {
            match item {
                Some(b) => {
                    let n = b.len() as u32;
                    if let Some(wr) = w.as_mut()
                        && (wr.write_all(&b).await.is_err() || wr.flush().await.is_err())
                    {
                        w = None;
                    }
                    out.msg(id, GuestMsg::Credit { bytes: n }).await;
                }
                None if tty => {
                    if let Some(wr) = w.as_mut() {
                        let _ = wr.write_all(&[4]).await;
                    }
                }
                None => {
                    if let Some(mut wr) = w.take() {
                        let _ = wr.shutdown().await;
                    }
                }
            }
        }
    });
    (tx, task)
}

fn pipe_reader(r: std::io::PipeReader) -> tokio::fs::File {
    tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(r)))
}

fn pipe_writer(w: std::io::PipeWriter) -> tokio::fs::File {
    tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(w)))
}
