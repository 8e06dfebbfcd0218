//! The API client used by the CLI: blocking HTTP/1.1 over the daemon's Unix socket, small and
//! fast (no runtime), with NDJSON streaming for long operations.

use crate::api::{ErrorBody, ErrorKind, Event};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error(
        "cannot reach the sistemo daemon at {socket}: {reason} (start it with `sudo sistemo up`, or pass --socket / SISTEMO_SOCKET)"
    )]
    Unreachable {
        /// Socket path.
        socket: String,
        /// Why the connection failed.
        reason: String,
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

/// A client of one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

struct Resp {
    status: u16,
    reader: BufReader<UnixStream>,
    chunked: bool,
    length: Option<usize>,
}

impl Resp {
    /// Read the body, calling `on_line` for each complete line as it arrives, until it ends
    /// or `on_line` says stop (false): the connection is then dropped, which tells the daemon.
    /// The whole body is returned when `whole` or for an error status (a stream is never held
    /// whole).
    fn read_lines(&mut self, whole: bool, mut on_line: impl FnMut(&str) -> bool) -> Result<Vec<u8>> {
        let proto = |e: std::io::Error| ClientError::Protocol(e.to_string());
        let keep = whole || self.status >= 400;
        let mut all = Vec::new();
        let mut pending = Vec::new();
        let mut go = true;
        let mut feed = |bytes: &[u8], all: &mut Vec<u8>, pending: &mut Vec<u8>| {
            if keep {
                all.extend_from_slice(bytes);
            }
            pending.extend_from_slice(bytes);
            while go && let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                go = on_line(String::from_utf8_lossy(&line).trim_end());
            }
            go
        };
        if self.chunked {
            loop {
                let mut size = String::new();
                if self.reader.read_line(&mut size).map_err(proto)? == 0 {
                    return Err(ClientError::Closed);
                }
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| ClientError::Protocol(format!("bad chunk size {size:?}")))?;
                if n == 0 {
                    break;
                }
                let mut buf = vec![0; n + 2];
                self.reader.read_exact(&mut buf).map_err(proto)?;
                if !feed(&buf[..n], &mut all, &mut pending) {
                    return Ok(Vec::new());
                }
            }
        } else if let Some(n) = self.length {
            let mut buf = vec![0; n];
            self.reader.read_exact(&mut buf).map_err(proto)?;
            feed(&buf, &mut all, &mut pending);
        } else {
            let mut buf = Vec::new();
            self.reader.read_to_end(&mut buf).map_err(proto)?;
            feed(&buf, &mut all, &mut pending);
        }
        if go && !pending.is_empty() {
            on_line(String::from_utf8_lossy(&pending).trim_end());
        }
        Ok(all)
    }
}

impl ClientError {
    /// The exit code the CLI ends with: by the error's kind, 1 when the daemon was not reached.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Api(b) => b.kind.exit_code(),
            _ => 1,
        }
    }
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

impl Client {
    /// A client for `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    fn send(&self, method: &str, path: &str, body: Option<String>) -> Result<Resp> {
        self.send_as(method, path, body, "Connection: close")
    }

    /// Send a request whose connection header is `connection`; read the status and headers.
    fn send_as(&self, method: &str, path: &str, body: Option<String>, connection: &str) -> Result<Resp> {
        let unreachable = |e: std::io::Error| ClientError::Unreachable {
            socket: self.socket.display().to_string(),
            reason: e.to_string(),
        };
        let mut s = UnixStream::connect(&self.socket).map_err(unreachable)?;
        let body = body.unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: sistemo\r\n{connection}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(unreachable)?;
        let mut reader = BufReader::new(s);
        let proto = |e: std::io::Error| ClientError::Protocol(e.to_string());
        let mut line = String::new();
        reader.read_line(&mut line).map_err(proto)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(format!("bad status line {line:?}")))?;
        let (mut chunked, mut length) = (false, None);
        loop {
            line.clear();
            reader.read_line(&mut line).map_err(proto)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else if k == "content-length" {
                    length = v.parse().ok();
                }
            }
        }
        Ok(Resp {
            status,
            reader,
            chunked,
            length,
        })
    }

    /// A plain request: JSON in, JSON out.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body.map(|b| serde_json::to_string(b).expect("serialisable"));
        let mut r = self.send(method, path, body)?;
        let body = r.read_lines(true, |_| true)?;
        let text = String::from_utf8_lossy(&body);
        if r.status >= 400 {
            return Err(api_error(r.status, &text));
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Protocol(format!("{e}: {text}")))
    }

    /// A GET of raw bytes.
    pub fn bytes(&self, path: &str) -> Result<Vec<u8>> {
        let mut r = self.send("GET", path, None)?;
        let body = r.read_lines(true, |_| true)?;
        if r.status >= 400 {
            return Err(api_error(r.status, &String::from_utf8_lossy(&body)));
        }
        Ok(body)
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
        let mut r = self.send(
            "POST",
            path,
            Some(serde_json::to_string(body).expect("serialisable")),
        )?;
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

    /// Upgrade a POST of `body` to `path` to the protocol `upgrade`: the raw connection after
    /// `101 Switching Protocols`, and whatever the daemon already sent after its headers.
    pub fn upgrade(&self, path: &str, body: &impl Serialize, upgrade: &str) -> Result<(UnixStream, Vec<u8>)> {
        let body = serde_json::to_string(body).expect("serialisable");
        let mut r = self.send_as(
            "POST",
            path,
            Some(body),
            &format!("Connection: upgrade\r\nUpgrade: {upgrade}"),
        )?;
        if r.status == 101 {
            let early = r.reader.buffer().to_vec();
            return Ok((r.reader.into_inner(), early));
        }
        let body = r.read_lines(true, |_| true)?;
        Err(api_error(r.status, &String::from_utf8_lossy(&body)))
    }

    /// A streamed GET (server-sent events): each line goes to `on_line` as it arrives, until
    /// the stream ends or `on_line` returns false.
    pub fn lines(&self, path: &str, mut on_line: impl FnMut(&str) -> bool) -> Result<()> {
        let mut r = self.send("GET", path, None)?;
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
        mut progress: impl FnMut(&str),
    ) -> Result<T> {
        let body = body.map(|b| serde_json::to_string(b).expect("serialisable"));
        let mut r = self.send(method, path, body)?;
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
}
