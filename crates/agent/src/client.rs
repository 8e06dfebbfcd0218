//! The host's end of the agent channel: the handshake (with resynchronisation), then many
//! sessions multiplexed over one stream, each with credit-based backpressure both ways.
//!
//! A [`Client`] owns a reader task that routes the agent's frames to their [`Session`]s and a
//! writer task that serialises frames onto the stream. When the stream ends every session sees
//! [`Session::next`] return `None` (the agent kills their processes on its side).

use crate::proto::{
    self, CHUNK, Codec, Facts, Frame, GuestMsg, HostMsg, Kind, ProtoError, RESYNC, Start, VERSION, WINDOW,
    WinSize,
};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{Decoder, Encoder};

/// What a session reports, in order; [`Event::Exited`] or [`Event::Failed`] comes last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The process runs as this pid in the guest.
    Started(u32),
    /// Output (or terminal output, or archive bytes).
    Stdout(Bytes),
    /// Error output.
    Stderr(Bytes),
    /// The process ended.
    Exited {
        /// Exit code, when it exited.
        code: Option<i32>,
        /// The signal that killed it.
        signal: Option<i32>,
        /// Killed by the agent at its timeout.
        timed_out: bool,
    },
    /// It could not run, or failed.
    Failed(String),
    /// The guest's facts.
    Facts(Facts),
    /// An identity was applied: the steps done.
    Applied(Vec<String>),
}

struct Route {
    events: mpsc::UnboundedSender<Event>,
    stdin_credit: Arc<Semaphore>,
}

struct Inner {
    out: mpsc::Sender<Frame>,
    routes: Mutex<HashMap<u32, Route>>,
    next: AtomicU32,
    closed: AtomicBool,
    agent: String,
    /// When the agent last answered a ping (or its hello).
    last_pong: Mutex<std::time::Instant>,
    /// The reader and writer tasks, ended by [`Inner::close`].
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Inner {
    /// End the connection: every session sees its end, the stream is dropped.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.routes.lock().expect("routes").clear();
        for t in self.tasks.lock().expect("tasks").drain(..) {
            t.abort();
        }
    }
}

/// How often a connection is checked.
const PING_EVERY: Duration = Duration::from_secs(2);
/// Silence after which the agent is taken for gone (any frame from it counts as an answer).
const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A connected agent. Cheap to clone; the channel closes when the stream does.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("agent", &self.inner.agent)
            .finish()
    }
}

/// Greet the agent on `stream` and, once it answers, serve sessions over it.
pub async fn connect<S>(stream: S, timeout: Duration) -> Result<Client, ProtoError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let nonce = format!("{:x}", nonce());
    // The marker first: the agent may be lost in the tail of an earlier connection's frame.
    let mut buf = BytesMut::from(RESYNC);
    Codec.encode(
        Frame::control(
            proto::CHANNEL,
            &HostMsg::Hello {
                version: VERSION,
                nonce: nonce.clone(),
            },
        ),
        &mut buf,
    )?;
    let hello = async {
        wr.write_all(&buf).await?;
        wr.flush().await?;
        let mut acc = BytesMut::with_capacity(64 << 10);
        // Skip whatever precedes the marker (the rest of a frame meant for an earlier connection).
        loop {
            if let Some(i) = find(&acc, RESYNC) {
                let _ = acc.split_to(i + RESYNC.len());
                match Codec.decode(&mut acc)? {
                    Some(f) => match f.message::<GuestMsg>() {
                        Ok(GuestMsg::Hello {
                            version,
                            agent,
                            nonce: n,
                        }) if n == nonce => {
                            if version != VERSION {
                                return Err(ProtoError::BadMessage(format!(
                                    "the agent speaks protocol {version}, sistemo speaks {VERSION}"
                                )));
                            }
                            return Ok((agent, acc));
                        }
                        // A stale marker: keep looking.
                        _ => continue,
                    },
                    None => {
                        // The hello frame is not complete yet: put the marker back and read on.
                        let mut again = BytesMut::from(RESYNC);
                        again.extend_from_slice(&acc);
                        acc = again;
                    }
                }
            } else if acc.len() > RESYNC.len() {
                // Keep only a possible prefix of the marker.
                let _ = acc.split_to(acc.len() - RESYNC.len());
            }
            if rd.read_buf(&mut acc).await? == 0 {
                return Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    };
    let (agent, rest) = tokio::time::timeout(timeout, hello)
        .await
        .map_err(|_| ProtoError::Io(std::io::ErrorKind::TimedOut.into()))??;
    let (out, out_rx) = mpsc::channel::<Frame>(64);
    let inner = Arc::new(Inner {
        out,
        routes: Mutex::new(HashMap::new()),
        next: AtomicU32::new(1),
        closed: AtomicBool::new(false),
        agent,
        last_pong: Mutex::new(std::time::Instant::now()),
        tasks: Mutex::new(Vec::new()),
    });
    let w = tokio::spawn(write_loop(wr, out_rx)).abort_handle();
    let r = tokio::spawn(read_loop(rd, rest, Arc::downgrade(&inner))).abort_handle();
    inner.tasks.lock().expect("tasks").extend([w, r]);
    tokio::spawn(keepalive(Arc::downgrade(&inner)));
    Ok(Client { inner })
}

/// Ping the agent; close the connection when it stays silent for [`PING_TIMEOUT`].
async fn keepalive(inner: std::sync::Weak<Inner>) {
    let mut n = 0u64;
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(i) = inner.upgrade() else {
            return;
        };
        if i.closed.load(Ordering::SeqCst) {
            return;
        }
        if i.last_pong.lock().expect("pong").elapsed() > PING_TIMEOUT {
            i.close();
            return;
        }
        n += 1;
        let _ = i
            .out
            .try_send(Frame::control(proto::CHANNEL, &HostMsg::Ping { n }));
    }
}

fn nonce() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    t ^ ((std::process::id() as u128) << 64)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Frame>) {
    let mut buf = BytesMut::new();
    while let Some(f) = rx.recv().await {
        buf.clear();
        if Codec.encode(f, &mut buf).is_err() {
            continue;
        }
        // More frames already queued go out in the same write.
        while let Ok(f) = rx.try_recv() {
            let _ = Codec.encode(f, &mut buf);
            if buf.len() >= 256 << 10 {
                break;
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            break;
        }
    }
    // Every client and session is gone: the agent sees the end of the stream and ends what
    // still runs.
    let _ = wr.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(mut rd: R, mut acc: BytesMut, inner: std::sync::Weak<Inner>) {
    'outer: loop {
        loop {
            match Codec.decode(&mut acc) {
                Ok(Some(f)) => match inner.upgrade() {
                    Some(i) => {
                        // Whatever the agent sends shows it alive: a busy channel needs no pong.
                        *i.last_pong.lock().expect("pong") = std::time::Instant::now();
                        route(&i, f)
                    }
                    None => break 'outer,
                },
                Ok(None) => break,
                // A corrupt stream cannot be resynchronised mid-connection: end it (the host
                // reconnects, and the agent resynchronises on the new hello).
                Err(_) => break 'outer,
            }
        }
        match rd.read_buf(&mut acc).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.closed.store(true, Ordering::SeqCst);
        // Every session's event channel closes: their readers see the end of the connection.
        inner.routes.lock().expect("routes").clear();
    }
}

fn route(inner: &Inner, f: Frame) {
    if f.session == proto::CHANNEL {
        // Pongs (and any other channel message) only refresh `last_pong`, done by the caller.
        return;
    }
    let mut routes = inner.routes.lock().expect("routes");
    let Some(r) = routes.get(&f.session) else {
        return;
    };
    let (ev, last) = match f.kind {
        Kind::Stdout => (Event::Stdout(f.payload), false),
        Kind::Stderr => (Event::Stderr(f.payload), false),
        Kind::Stdin => return,
        Kind::Control => match f.message::<GuestMsg>() {
            Ok(GuestMsg::Started { pid }) => (Event::Started(pid), false),
            Ok(GuestMsg::Exited {
                code,
                signal,
                timed_out,
            }) => (
                Event::Exited {
                    code,
                    signal,
                    timed_out,
                },
                true,
            ),
            Ok(GuestMsg::Failed { error }) => (Event::Failed(error), true),
            Ok(GuestMsg::Facts(facts)) => (Event::Facts(facts), true),
            Ok(GuestMsg::Applied { steps }) => (Event::Applied(steps), true),
            Ok(GuestMsg::Credit { bytes }) => {
                r.stdin_credit.add_permits(bytes as usize);
                return;
            }
            Ok(GuestMsg::Hello { .. } | GuestMsg::Pong { .. }) | Err(_) => return,
        },
    };
    let _ = r.events.send(ev);
    if last {
        routes.remove(&f.session);
    }
}

impl Client {
    /// The agent's version, from its hello.
    pub fn agent_version(&self) -> &str {
        &self.inner.agent
    }

    /// False once the stream has ended.
    pub fn is_open(&self) -> bool {
        !self.inner.closed.load(Ordering::SeqCst) && !self.inner.out.is_closed()
    }

    fn open(&self) -> (u32, mpsc::UnboundedReceiver<Event>, Arc<Semaphore>) {
        let id = self.inner.next.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(WINDOW as usize));
        self.inner.routes.lock().expect("routes").insert(
            id,
            Route {
                events: tx,
                stdin_credit: credit.clone(),
            },
        );
        (id, rx, credit)
    }

    async fn send(&self, f: Frame) -> Result<(), ProtoError> {
        self.inner
            .out
            .send(f)
            .await
            .map_err(|_| ProtoError::Io(std::io::ErrorKind::BrokenPipe.into()))
    }

    /// Start a session.
    pub async fn start(&self, start: Start) -> Result<Session, ProtoError> {
        let (id, events, stdin_credit) = self.open();
        let s = Session {
            id,
            client: self.clone(),
            events,
            stdin_credit,
            owed: 0,
            done: false,
        };
        self.send(Frame::control(id, &HostMsg::Start(start))).await?;
        Ok(s)
    }

    /// The guest's facts.
    pub async fn facts(&self) -> Result<Facts, ProtoError> {
        let (id, mut events, _) = self.open();
        self.send(Frame::control(id, &HostMsg::Facts)).await?;
        match events.recv().await {
            Some(Event::Facts(f)) => Ok(f),
            Some(Event::Failed(e)) => Err(ProtoError::BadMessage(e)),
            _ => Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    /// Give the guest a new identity (a machine restored from a template); returns the steps
    /// the agent took.
    pub async fn identity(&self, identity: proto::Identity) -> Result<Vec<String>, ProtoError> {
        let (id, mut events, _) = self.open();
        self.send(Frame::control(id, &HostMsg::Identity(Box::new(identity))))
            .await?;
        match events.recv().await {
            Some(Event::Applied(steps)) => Ok(steps),
            Some(Event::Failed(e)) => Err(ProtoError::BadMessage(e)),
            _ => Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        }
    }

    /// Ask the guest to power off.
    pub async fn shutdown(&self) -> Result<(), ProtoError> {
        self.send(Frame::control(proto::CHANNEL, &HostMsg::Shutdown))
            .await
    }
}

/// One running session. Dropping it before its end kills its process group in the guest.
pub struct Session {
    id: u32,
    client: Client,
    events: mpsc::UnboundedReceiver<Event>,
    stdin_credit: Arc<Semaphore>,
    owed: u32,
    done: bool,
}

impl Session {
    /// The next event; `None` when the connection to the agent ended first. Taking output
    /// grants the agent credit for more, so a caller that stops calling stops the process.
    pub async fn next(&mut self) -> Option<Event> {
        if self.owed >= WINDOW / 4 {
            let bytes = std::mem::take(&mut self.owed);
            let _ = self
                .client
                .send(Frame::control(self.id, &HostMsg::Credit { bytes }))
                .await;
        }
        let ev = self.events.recv().await;
        match &ev {
            Some(Event::Stdout(b) | Event::Stderr(b)) => self.owed += b.len() as u32,
            Some(Event::Exited { .. } | Event::Failed(_) | Event::Facts(_) | Event::Applied(_)) => {
                self.done = true
            }
            _ => {}
        }
        ev
    }

    /// The session's input half, usable while another task reads its events.
    pub fn input(&self) -> SessionInput {
        SessionInput {
            id: self.id,
            client: self.client.clone(),
            stdin_credit: self.stdin_credit.clone(),
        }
    }

    /// Send bytes to the process's stdin, waiting for the agent's credit.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ProtoError> {
        self.input().write_stdin(data).await
    }

    /// No more stdin.
    pub async fn close_stdin(&self) -> Result<(), ProtoError> {
        self.input().close_stdin().await
    }

    /// Resize the session's terminal.
    pub async fn resize(&self, size: WinSize) -> Result<(), ProtoError> {
        self.input().resize(size).await
    }
}

/// What a session's caller sends: stdin, its end, terminal sizes, signals.
#[derive(Clone)]
pub struct SessionInput {
    id: u32,
    client: Client,
    stdin_credit: Arc<Semaphore>,
}

impl SessionInput {
    /// Send bytes to the process's stdin, waiting for the agent's credit.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ProtoError> {
        for c in data.chunks(CHUNK) {
            let permit = self
                .stdin_credit
                .acquire_many(c.len() as u32)
                .await
                .map_err(|_| ProtoError::Io(std::io::ErrorKind::BrokenPipe.into()))?;
            permit.forget();
            self.client
                .send(Frame::data(Kind::Stdin, self.id, c.to_vec()))
                .await?;
        }
        Ok(())
    }

    /// No more stdin.
    pub async fn close_stdin(&self) -> Result<(), ProtoError> {
        self.client
            .send(Frame::control(self.id, &HostMsg::CloseStdin))
            .await
    }

    /// Resize the session's terminal.
    pub async fn resize(&self, size: WinSize) -> Result<(), ProtoError> {
        self.client
            .send(Frame::control(self.id, &HostMsg::Resize(size)))
            .await
    }

    /// Signal the session's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ProtoError> {
        self.client
            .send(Frame::control(self.id, &HostMsg::Signal { signal }))
            .await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.client.inner.routes.lock().expect("routes").remove(&self.id);
        let kill = Frame::control(
            self.id,
            &HostMsg::Signal {
                signal: libc::SIGKILL,
            },
        );
        if let Err(mpsc::error::TrySendError::Full(kill)) = self.client.inner.out.try_send(kill)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let out = self.client.inner.out.clone();
            rt.spawn(async move { out.send(kill).await });
        }
    }
}
