//! The API client used by the CLI: HTTP/1.1 (hyper) over the daemon's Unix socket, or over TLS
//! to a remote daemon (`--host`) whose certificate is pinned (`client/pin.rs`; connections in
//! `client/conn.rs`). Blocking methods for the CLI, NDJSON and line streams, and upgrades.

mod conn;
mod pin;
mod upload;

use conn::{Connector, Remote, Target, connect, unreachable};

use crate::api::{ErrorBody, ErrorKind, Event};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::http::{Request, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// How long an idle kept-alive connection stays open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the daemon.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The daemon's socket is not reachable.
    #[error(
        "cannot reach the sistemo daemon at {socket}: {reason} (start it with `sudo sistemo up`, or pass --socket / SISTEMO_SOCKET)"
    )]
    Unreachable {
        /// Socket path.
        socket: String,
        /// Why the connection failed.
        reason: String,
    },
    /// A remote daemon is not reachable.
    #[error("cannot reach the sistemo daemon at {url}: {reason}")]
    RemoteUnreachable {
        /// `https://HOST:PORT`.
        url: String,
        /// Why the connection failed.
        reason: String,
    },
    /// The remote daemon's certificate is not the one pinned.
    #[error(
        "the certificate of the sistemo daemon at {authority} changed: it is now {seen}, but {expected} is pinned {source_of_pin}; nothing was sent (if it was replaced on purpose, compare the new one with `sistemo config` on that host, then pass --fingerprint with it or delete the host's line from your known_hosts)"
    )]
    CertificateChanged {
        /// `HOST:PORT`.
        authority: String,
        /// The pinned fingerprint.
        expected: String,
        /// The fingerprint presented.
        seen: String,
        /// Where the pin came from.
        source_of_pin: String,
    },
    /// The remote daemon's certificate is not known, and nobody could be asked.
    #[error(
        "the certificate of the sistemo daemon at {authority} is not known (SHA-256 {seen}) and there is no terminal to ask: compare it with `sistemo config` on that host, then pass --fingerprint {seen} (or SISTEMO_FINGERPRINT)"
    )]
    UnknownCertificate {
        /// `HOST:PORT`.
        authority: String,
        /// The fingerprint presented.
        seen: String,
    },
    /// The user did not trust the certificate.
    #[error("the certificate of {authority} was not trusted; nothing was sent")]
    NotTrusted {
        /// `HOST:PORT`.
        authority: String,
    },
    /// The daemon answered with an error.
    #[error("{}", .0.error)]
    Api(ErrorBody),
    /// The answer could not be read.
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
    /// The daemon went away in the middle of its answer.
    #[error("the daemon closed the connection mid-answer (it stopped or crashed; see `sistemo doctor`)")]
    Closed,
}

type Result<T> = std::result::Result<T, ClientError>;

impl ClientError {
    /// The exit code the CLI ends with: by the error's kind, 1 when the daemon was not reached.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Api(b) => b.kind.exit_code(),
            _ => 1,
        }
    }
}

/// A bad `--host` or `--fingerprint`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRemote(String);

/// A client of one daemon.
#[derive(Clone)]
pub struct Client {
    target: Arc<Target>,
    http: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.target.fmt(f)
    }
}

/// The client's own runtime (one thread): the CLI's calls block on it, and the streams it
/// hands out (upgrades) are driven by it whatever runtime reads them.
fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sistemo-client")
            .enable_all()
            .build()
            .expect("the client's runtime")
    })
}

/// Block this thread on `f`. Outside tokio's budget: called from inside a task of the CLI's
/// runtime, a budget used up by earlier reads would make every later poll "yield" forever.
fn block_on<F: Future>(f: F) -> F::Output {
    futures::executor::block_on(tokio::task::unconstrained(f))
}

/// Run `f` on the client's runtime and wait for it (from any thread, in a runtime or not).
fn wait<T: Send + 'static>(f: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    block_on(rt().spawn(f)).map_err(|e| ClientError::Protocol(format!("the client's task failed: {e}")))?
}

/// The error of a response with `status` and `body` (a daemon too old to send `kind` is
/// classified by the status).
fn api_error(status: u16, body: &str) -> ClientError {
    #[derive(serde::Deserialize)]
    struct Loose {
        error: String,
        kind: Option<ErrorKind>,
    }
    ClientError::Api(match serde_json::from_str::<Loose>(body) {
        Ok(Loose { error, kind }) => ErrorBody {
            error,
            kind: kind.unwrap_or_else(|| ErrorKind::from_status(status)),
            status,
        },
        Err(_) => ErrorBody {
            error: format!("daemon answered {status}: {}", body.trim()),
            kind: ErrorKind::from_status(status),
            status,
        },
    })
}

/// A connection handed over by an upgrade (a session's frames).
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// A response: its status and its body's chunks as they arrive.
struct Resp {
    status: u16,
    /// The `x-log-offset` header, where a response has it.
    log_offset: Option<u64>,
    chunks: mpsc::Receiver<Result<Bytes>>,
}

/// What a request got.
enum Answer {
    Body(Resp),
    Upgraded(hyper::upgrade::Upgraded),
}

impl Resp {
    /// Read the body, calling `on_line` for each complete line as it arrives, until it ends
    /// or `on_line` says stop (false): the connection is then dropped, which tells the daemon.
    /// The whole body is returned when `whole` or for an error status (a stream is never held
    /// whole).
    fn read_lines(&mut self, whole: bool, mut on_line: impl FnMut(&str) -> bool) -> Result<Vec<u8>> {
        let keep = whole || self.status >= 400;
        let mut all = Vec::new();
        let mut pending = Vec::new();
        let mut go = true;
        while let Some(chunk) = block_on(self.chunks.recv()) {
            let bytes = chunk?;
            if keep {
                all.extend_from_slice(&bytes);
            }
            pending.extend_from_slice(&bytes);
            while go && let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                go = on_line(String::from_utf8_lossy(&line).trim_end());
            }
            if !go {
                return Ok(Vec::new());
            }
        }
        if !pending.is_empty() {
            on_line(String::from_utf8_lossy(&pending).trim_end());
        }
        Ok(all)
    }
}

/// Forward a body's chunks until it ends or nobody reads them any more (then the body is
/// dropped, and with it the connection).
async fn pump(mut body: Incoming, tx: mpsc::Sender<Result<Bytes>>) {
    loop {
        let item = match body.frame().await {
            None => return,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => Ok(d),
                Err(_) => continue,
            },
            Some(Err(e)) if e.is_incomplete_message() => Err(ClientError::Closed),
            Some(Err(e)) => Err(ClientError::Protocol(e.to_string())),
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// The error of a failed request: ours when the connector made it, else its cause.
fn request_error(target: &Target, e: hyper_util::client::legacy::Error) -> ClientError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(ours) = c.downcast_ref::<ClientError>() {
            return ours.clone();
        }
        cause = c.source();
    }
    if e.is_connect() {
        return unreachable(target, crate::error::chain(&e));
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if c.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message())
        {
            return ClientError::Closed;
        }
        cause = c.source();
    }
    ClientError::Protocol(crate::error::chain(&e))
}

impl Client {
    fn with_target(target: Target) -> Client {
        let target = Arc::new(target);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(Connector(target.clone()));
        Client { target, http }
    }

    /// A client of the daemon's Unix socket.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client::with_target(Target::Unix(socket.into()))
    }

    /// A client of a remote daemon at `url` (`https://HOST[:PORT]`, or `http://` to a loopback
    /// address), with an API `token`; its certificate must match `fingerprint` when given,
    /// else the one pinned in the user's known hosts (trusted on first use when asked on a
    /// terminal).
    pub fn remote(
        url: &str,
        fingerprint: Option<&str>,
        token: Option<String>,
    ) -> std::result::Result<Client, BadRemote> {
        let (tls, host, port) = conn::parse_host(url).map_err(BadRemote)?;
        let given = match fingerprint {
            Some(f) => Some(pin::normalize(f).ok_or_else(|| {
                BadRemote(format!(
                    "--fingerprint {f:?} is not a SHA-256 fingerprint (allowed: 32 hex pairs such as AB:CD:…, as `sistemo config` prints tls_fingerprint)"
                ))
            })?),
            None => None,
        };
        let mut remote = Remote {
            base: String::new(),
            host,
            port,
            tls,
            token,
            pin: Mutex::new(given.clone().map(|g| (g, "by --fingerprint".to_string()))),
            given: given.is_some(),
        };
        remote.base = format!("{}://{}", if tls { "https" } else { "http" }, remote.authority());
        Ok(Client::with_target(Target::Remote(remote)))
    }

    /// Whether this client talks to a remote daemon.
    pub fn is_remote(&self) -> bool {
        matches!(*self.target, Target::Remote(_))
    }

    /// Make sure a remote daemon's certificate is pinned before anything is sent: from the
    /// user's known hosts, or shown and trusted on a terminal (then remembered).
    fn pinned(&self) -> Result<()> {
        let Target::Remote(r) = &*self.target else {
            return Ok(());
        };
        if !r.tls || r.pin.lock().expect("pin").is_some() {
            return Ok(());
        }
        let authority = r.authority();
        let file = pin::known_hosts_path();
        if let Some(f) = &file
            && let Some(fp) = pin::lookup(f, &authority)
        {
            *r.pin.lock().expect("pin") = Some((fp, format!("in {}", f.display())));
            return Ok(());
        }
        // A handshake that trusts nothing: it only shows the certificate.
        let target = self.target.clone();
        let seen = match wait(async move { connect(&target).await.map(|_| ()) }) {
            Err(ClientError::UnknownCertificate { seen, .. }) => seen,
            Err(e) => return Err(e),
            Ok(()) => return Ok(()),
        };
        debug_assert!(!r.given);
        match pin::ask(&authority, &seen) {
            None => Err(ClientError::UnknownCertificate { authority, seen }),
            Some(false) => Err(ClientError::NotTrusted { authority }),
            Some(true) => {
                let source = match &file {
                    Some(f) => {
                        pin::remember(f, &authority, &seen).map_err(|e| {
                            ClientError::Protocol(format!(
                                "remembering the certificate in {}: {e}",
                                f.display()
                            ))
                        })?;
                        eprintln!("Pinned {authority} in {}.", f.display());
                        format!("in {}", f.display())
                    }
                    None => "for this command".to_string(),
                };
                *r.pin.lock().expect("pin") = Some((seen, source));
                Ok(())
            }
        }
    }

    /// Send a request (JSON body, or an upgrade to `upgrade`) and get its answer.
    fn send(&self, method: &str, path: &str, body: Option<String>, upgrade: Option<&str>) -> Result<Answer> {
        self.pinned()?;
        let (base, token) = match &*self.target {
            Target::Unix(_) => ("http://sistemo", None),
            Target::Remote(r) => (r.base.as_str(), r.token.as_deref()),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(u) = upgrade {
            req = req
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, u);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(format!("request {method} {path}: {e}")))?;
        let (http, target) = (self.http.clone(), self.target.clone());
        let wants_upgrade = upgrade.is_some();
        let answer = wait(async move {
            let resp = http.request(req).await.map_err(|e| request_error(&target, e))?;
            let status = resp.status().as_u16();
            if wants_upgrade && status == 101 {
                let up = hyper::upgrade::on(resp)
                    .await
                    .map_err(|e| ClientError::Protocol(format!("upgrading: {e}")))?;
                return Ok(Answer::Upgraded(up));
            }
            let log_offset = resp
                .headers()
                .get(crate::api::LOG_OFFSET_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let (tx, chunks) = mpsc::channel(16);
            tokio::spawn(pump(resp.into_body(), tx));
            Ok(Answer::Body(Resp {
                status,
                log_offset,
                chunks,
            }))
        })?;
        if let (Answer::Body(r), Target::Remote(rem)) = (&answer, &*self.target)
            && r.status == 401
            && rem.token.is_none()
        {
            return Err(ClientError::Api(ErrorBody::new(
                ErrorKind::Unauthorized,
                format!(
                    "{} wants an API token: set SISTEMO_TOKEN (made on that host with `sistemo token create NAME`)",
                    rem.base
                ),
            )));
        }
        Ok(answer)
    }

    fn respond(&self, method: &str, path: &str, body: Option<String>) -> Result<Resp> {
        match self.send(method, path, body, None)? {
            Answer::Body(r) => Ok(r),
            Answer::Upgraded(_) => Err(ClientError::Protocol("an unasked-for upgrade".into())),
        }
    }

    /// A plain request: JSON in, JSON out.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body.map(|b| serde_json::to_string(b).expect("serialisable"));
        let mut r = self.respond(method, path, body)?;
        let body = r.read_lines(true, |_| true)?;
        let text = String::from_utf8_lossy(&body);
        if r.status >= 400 {
            return Err(api_error(r.status, &text));
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Protocol(format!("{e}: {text}")))
    }

    /// A GET of raw bytes.
    pub fn bytes(&self, path: &str) -> Result<Vec<u8>> {
        let mut r = self.respond("GET", path, None)?;
        let body = r.read_lines(true, |_| true)?;
        if r.status >= 400 {
            return Err(api_error(r.status, &String::from_utf8_lossy(&body)));
        }
        Ok(body)
    }

    /// A GET of a machine's console log: the stream offset of its first byte (the daemon's
    /// `x-log-offset`; `offset`, or 0, from a daemon without it) and the bytes.
    pub fn log_bytes(&self, path: &str, offset: Option<u64>) -> Result<(u64, Vec<u8>)> {
        let mut r = self.respond("GET", path, None)?;
        let body = r.read_lines(true, |_| true)?;
        if r.status >= 400 {
            return Err(api_error(r.status, &String::from_utf8_lossy(&body)));
        }
        Ok((r.log_offset.or(offset).unwrap_or(0), body))
    }

    /// A plain-text GET (lossy UTF-8).
    pub fn text(&self, path: &str) -> Result<String> {
        self.bytes(path).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// GET JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None::<&()>)
    }

    /// A streamed exec: each [`crate::api::ExecEvent`] goes to `on_event` as it arrives, until
    /// the stream ends or `on_event` returns false (the connection is dropped, and the daemon
    /// kills the command).
    pub fn exec(
        &self,
        path: &str,
        body: &impl Serialize,
        mut on_event: impl FnMut(crate::api::ExecEvent) -> bool,
    ) -> Result<()> {
        let body = serde_json::to_string(body).expect("serialisable");
        let mut r = self.respond("POST", path, Some(body))?;
        let status = r.status;
        let text = r.read_lines(false, |line| {
            if status < 400
                && !line.is_empty()
                && let Ok(ev) = serde_json::from_str::<crate::api::ExecEvent>(line)
            {
                return on_event(ev);
            }
            true
        })?;
        if status >= 400 {
            return Err(api_error(status, &String::from_utf8_lossy(&text)));
        }
        Ok(())
    }

    /// Upgrade a POST of `body` to `path` to the protocol `upgrade`: the connection after
    /// `101 Switching Protocols`, and whatever the daemon already sent after its headers
    /// (always empty: the connection hands those bytes on itself).
    pub fn upgrade(
        &self,
        path: &str,
        body: &impl Serialize,
        upgrade: &str,
    ) -> Result<(Box<dyn Duplex>, Vec<u8>)> {
        let body = serde_json::to_string(body).expect("serialisable");
        match self.send("POST", path, Some(body), Some(upgrade))? {
            Answer::Upgraded(up) => Ok((Box::new(TokioIo::new(up)), Vec::new())),
            Answer::Body(mut r) => {
                let body = r.read_lines(true, |_| true)?;
                Err(api_error(r.status, &String::from_utf8_lossy(&body)))
            }
        }
    }

    /// A streamed GET (server-sent events): each line goes to `on_line` as it arrives, until
    /// the stream ends or `on_line` returns false.
    pub fn lines(&self, path: &str, mut on_line: impl FnMut(&str) -> bool) -> Result<()> {
        let mut r = self.respond("GET", path, None)?;
        let status = r.status;
        let text = r.read_lines(false, |l| status >= 400 || on_line(l))?;
        if status >= 400 {
            return Err(api_error(status, &String::from_utf8_lossy(&text)));
        }
        Ok(())
    }

    /// A streamed operation: progress lines go to `progress`, the result is returned.
    pub fn stream<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
        progress: impl FnMut(&str),
    ) -> Result<T> {
        let body = body.map(|b| serde_json::to_string(b).expect("serialisable"));
        let r = self.respond(method, path, body)?;
        read_stream(r, progress)
    }
}

/// Read a streamed operation's answer: progress lines go to `progress`, the result is returned.
fn read_stream<T: DeserializeOwned>(mut r: Resp, mut progress: impl FnMut(&str)) -> Result<T> {
    let status = r.status;
    let mut result: Option<Result<T>> = None;
    let text = r.read_lines(false, |line| {
        if status >= 400 || line.is_empty() {
            return true;
        }
        match serde_json::from_str::<Event<serde_json::Value>>(line) {
            Ok(Event::Progress(p)) => progress(&p),
            Ok(Event::Result(v)) => {
                result = Some(serde_json::from_value(v).map_err(|e| ClientError::Protocol(e.to_string())))
            }
            Ok(Event::Error(e)) => result = Some(Err(ClientError::Api(e))),
            Err(e) => result = Some(Err(ClientError::Protocol(format!("{e}: {line}")))),
        }
        true
    })?;
    if status >= 400 {
        return Err(api_error(status, &String::from_utf8_lossy(&text)));
    }
    result.unwrap_or_else(|| {
        Err(ClientError::Protocol(
            "the daemon closed the stream without a result".into(),
        ))
    })
}
