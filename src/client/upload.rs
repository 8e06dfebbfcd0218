//! Uploads: a local file streamed as a request's body (never held whole in memory), with its
//! length announced and progress reported as it is sent, to the daemon's upload routes.

use super::conn::{Connector, Target};
use super::{Client, ClientError, Resp, Result, api_error, pump, request_error, wait};
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use hyper::http::{Request, header};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use std::io::Read as _;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Bytes read from the file per chunk of the body.
const CHUNK: usize = 256 << 10;

/// A file's bytes as they are read, with its exact length (sent as `Content-Length`).
struct FileBody {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    len: u64,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::io::Result<Frame<Bytes>>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

/// Read `file` in chunks on a thread of its own into a body; `progress(sent, total)` after each
/// chunk the body took.
fn file_body(file: &Path, mut progress: impl FnMut(u64, u64) + Send + 'static) -> Result<FileBody> {
    let open = |e: std::io::Error| ClientError::Protocol(format!("reading {}: {e}", file.display()));
    let mut f = std::fs::File::open(file).map_err(open)?;
    let len = f.metadata().map_err(open)?.len();
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let item = match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    sent += n as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let last = item.is_err();
            if tx.blocking_send(item).is_err() || last {
                return;
            }
            progress(sent, len);
        }
    });
    Ok(FileBody { rx, len })
}

impl Client {
    /// POST the file at `file` as the body of `path`; its answer.
    fn post_file(
        &self,
        path: &str,
        file: &Path,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<Resp> {
        self.pinned()?;
        let (base, token) = match &*self.target {
            Target::Unix(_) => ("http://sistemo", None),
            Target::Remote(r) => (r.base.as_str(), r.token.as_deref()),
        };
        let body = file_body(file, progress)?;
        let mut req = Request::builder()
            .method("POST")
            .uri(format!("{base}{path}"))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, body.len);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(body)
            .map_err(|e| ClientError::Protocol(format!("request POST {path}: {e}")))?;
        let target = self.target.clone();
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build::<_, FileBody>(Connector(target.clone()));
        wait(async move {
            let resp = http.request(req).await.map_err(|e| request_error(&target, e))?;
            let status = resp.status().as_u16();
            let (tx, chunks) = mpsc::channel(16);
            tokio::spawn(pump(resp.into_body(), tx));
            Ok(Resp {
                status,
                log_offset: None,
                chunks,
            })
        })
    }

    /// Upload `file` to `path` and read its JSON answer.
    pub fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &Path,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<T> {
        let mut r = self.post_file(path, file, progress)?;
        let body = r.read_lines(true, |_| true)?;
        let text = String::from_utf8_lossy(&body);
        if r.status >= 400 {
            return Err(api_error(r.status, &text));
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Protocol(format!("{e}: {text}")))
    }

    /// Upload `file` to `path`, whose answer is a streamed operation: its progress lines go
    /// to `lines`, the result is returned.
    pub fn upload_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &Path,
        progress: impl FnMut(u64, u64) + Send + 'static,
        lines: impl FnMut(&str),
    ) -> Result<T> {
        let r = self.post_file(path, file, progress)?;
        super::read_stream(r, lines)
    }
}
