//! `GET /v1/machines/{name}/terminal`: the browser terminal, a WebSocket bridged to a login
//! shell on a terminal in the machine (through its guest agent). Admins only; same origin only.
//!
//! Binary messages carry bytes both ways (keystrokes in, the terminal's output out). Text
//! messages are JSON control: the browser sends `{"resize":{"rows":R,"cols":C}}`; the daemon
//! sends `{"exited":{"code":C,"signal":S}}` or `{"error":"…"}` last, then closes. The shell
//! opens before the upgrade, so a stopped machine is an ordinary HTTP error; closing the
//! socket kills the shell; a reconnect is a new shell.

use super::{AppState, Peer, convert};
use crate::api::{ErrorBody, ErrorKind, SessionJob, SessionRequest, TermSize};
use crate::auth::Principal;
use crate::store::Role;
use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt as _, StreamExt as _};
use sistemo_vmm::{Session, SessionEvent, WinSize};

/// Largest message a browser may send (a paste).
const MAX_MESSAGE: usize = 1 << 20;

/// The terminal's size when the browser gives none.
const DEFAULT_SIZE: TermSize = TermSize { rows: 24, cols: 80 };

/// `?rows=R&cols=C`: the terminal's size at the start.
#[derive(serde::Deserialize)]
pub(super) struct SizeQuery {
    rows: Option<u16>,
    cols: Option<u16>,
}

/// What the browser sends as text.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    resize: TermSize,
}

fn refuse(kind: ErrorKind, msg: impl Into<String>) -> Response {
    let body = ErrorBody::new(kind, msg);
    let code = StatusCode::from_u16(body.status).unwrap_or(StatusCode::FORBIDDEN);
    (code, Json(body)).into_response()
}

/// Whether a request's `Origin` is its own `Host` (a WebSocket is not bound by the same-origin
/// policy: without this check any page the user visits could open a shell with their cookie).
/// A missing `Origin` is accepted only for callers with a bearer token (not a browser).
fn same_origin(headers: &HeaderMap, cookie_auth: bool) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return if cookie_auth {
            Err("a browser terminal needs an Origin header".into())
        } else {
            Ok(())
        };
    };
    let origin = origin.to_str().unwrap_or_default();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or_default();
    if !host.is_empty() && authority.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(format!(
            "origin {origin:?} is not this dashboard's ({host:?}): the terminal opens only from its own pages"
        ))
    }
}

fn size(q: &SizeQuery) -> Result<TermSize, String> {
    let s = TermSize {
        rows: q.rows.unwrap_or(DEFAULT_SIZE.rows),
        cols: q.cols.unwrap_or(DEFAULT_SIZE.cols),
    };
    if s.rows == 0 || s.cols == 0 || s.rows > 1000 || s.cols > 1000 {
        return Err(format!(
            "terminal size {}x{} (allowed: rows and cols from 1 to 1000)",
            s.rows, s.cols
        ));
    }
    Ok(s)
}

pub(super) async fn terminal(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Query(q): Query<SizeQuery>,
    principal: Option<axum::Extension<Principal>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let principal = principal.map(|e| e.0);
    if let Some(pr) = &principal
        && pr.role() != Role::Admin
    {
        return refuse(
            ErrorKind::Forbidden,
            format!(
                "{} is a viewer: the terminal is a root shell, for admins only",
                pr.actor()
            ),
        );
    }
    let cookie_auth = matches!(principal, Some(Principal::User { .. }));
    if let Err(e) = same_origin(&headers, cookie_auth) {
        return refuse(ErrorKind::Forbidden, e);
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => return r.into_response(),
    };
    let tty = match size(&q) {
        Ok(s) => s,
        Err(e) => return refuse(ErrorKind::Invalid, e),
    };
    let req = SessionRequest {
        job: SessionJob::Login,
        env: vec!["TERM=xterm-256color".into()],
        workdir: None,
        user: None,
        tty: Some(tty),
        stdin: true,
        timeout_s: None,
    };
    let opened = async {
        let start = convert::session_start(&req)?;
        h.machines.session(&name, start).await
    }
    .await;
    let session = match super::audited(&h, &p, "machine.terminal", &name, opened) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    ws.max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| bridge(socket, session))
}

/// Carry bytes between the browser and the shell until either ends; the shell's end is sent
/// as a last text message; the browser's departure drops (kills) the session.
async fn bridge(socket: WebSocket, mut session: Session) {
    let (mut tx, mut rx) = socket.split();
    let input = session.input();
    let feed = async move {
        while let Some(Ok(m)) = rx.next().await {
            let sent = match m {
                Message::Binary(b) => input.write_stdin(&b).await,
                Message::Text(t) => match serde_json::from_str::<Control>(t.as_str()) {
                    Ok(Control { resize }) if resize.rows > 0 && resize.cols > 0 => {
                        input
                            .resize(WinSize {
                                rows: resize.rows,
                                cols: resize.cols,
                            })
                            .await
                    }
                    // Unknown control: ignored, as the CLI's session ignores one.
                    _ => Ok(()),
                },
                Message::Close(_) => return,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
    };
    let drain = async {
        loop {
            let (msg, last) = match session.next().await {
                Some(SessionEvent::Stdout(b) | SessionEvent::Stderr(b)) => (Message::Binary(b), false),
                Some(SessionEvent::Exited { code, signal, .. }) => (
                    Message::Text(
                        serde_json::json!({"exited": {"code": code, "signal": signal}})
                            .to_string()
                            .into(),
                    ),
                    true,
                ),
                Some(SessionEvent::Failed(error)) => (
                    Message::Text(serde_json::json!({ "error": error }).to_string().into()),
                    true,
                ),
                Some(SessionEvent::Started(_) | SessionEvent::Facts(_) | SessionEvent::Applied(_)) => {
                    continue;
                }
                None => (
                    Message::Text(
                        serde_json::json!({"error": "the connection to the guest agent broke"})
                            .to_string()
                            .into(),
                    ),
                    true,
                ),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            if last {
                let _ = tx.send(Message::Close(None)).await;
                return;
            }
        }
    };
    tokio::select! {
        () = drain => {}
        () = feed => {}
    }
}

/// xterm.js with its fit addon, and its stylesheet (empty when the build had no node_modules).
const XTERM_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/xterm.js"));
const XTERM_CSS: &str = include_str!(concat!(env!("OUT_DIR"), "/xterm.css"));
const TERMINAL_JS: &str = include_str!("dashboard/terminal.js");

fn library(ctype: &'static str, body: &'static str) -> Response {
    if body.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            "this sistemo was built without xterm.js: run scripts/deps, then build it again\n",
        )
            .into_response();
    }
    super::web::asset(ctype, body)
}

/// The terminal page's files, loaded only when it opens.
pub(super) fn assets() -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/assets/terminal.js",
            get(|| async { super::web::asset("text/javascript; charset=utf-8", TERMINAL_JS) }),
        )
        .route(
            "/assets/xterm.js",
            get(|| async { library("text/javascript; charset=utf-8", XTERM_JS) }),
        )
        .route(
            "/assets/xterm.css",
            get(|| async { library("text/css; charset=utf-8", XTERM_CSS) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&'static str>, host: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static(host));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_static(o));
        }
        h
    }

    #[test]
    fn only_the_dashboard_itself_may_open_a_terminal() {
        assert!(same_origin(&headers(Some("http://127.0.0.1:7777"), "127.0.0.1:7777"), true).is_ok());
        assert!(
            same_origin(
                &headers(Some("https://Host.example:7777"), "host.example:7777"),
                true
            )
            .is_ok()
        );
        let e = same_origin(&headers(Some("https://evil.example"), "127.0.0.1:7777"), true).unwrap_err();
        assert!(e.contains("evil.example"), "{e}");
        assert!(same_origin(&headers(Some("http://127.0.0.1:7778"), "127.0.0.1:7777"), true).is_err());
        assert!(same_origin(&headers(Some("null"), "127.0.0.1:7777"), true).is_err());
        assert!(
            same_origin(&headers(None, "127.0.0.1:7777"), true).is_err(),
            "a browser sends one"
        );
        assert!(
            same_origin(&headers(None, "127.0.0.1:7777"), false).is_ok(),
            "a token caller"
        );
    }

    #[test]
    fn the_terminal_loads_apart_from_the_first_load() {
        let index = include_str!("dashboard/index.html");
        assert!(
            !index.contains("xterm") && !index.contains("terminal.js"),
            "{index}"
        );
        assert!(!TERMINAL_JS.contains("innerHTML") && !TERMINAL_JS.contains("https://"));
        println!(
            "RESULT terminal_assets_bytes={}",
            TERMINAL_JS.len() + XTERM_JS.len() + XTERM_CSS.len()
        );
        if !XTERM_JS.is_empty() {
            assert!(
                XTERM_JS.contains("MIT") && XTERM_JS.contains("FitAddon"),
                "licence and fit addon"
            );
            assert!(!XTERM_JS.contains("sourceMappingURL"));
        }
    }

    #[test]
    fn the_terminal_size_is_checked() {
        let q = |rows, cols| SizeQuery { rows, cols };
        assert_eq!(size(&q(None, None)).unwrap().cols, 80);
        assert_eq!(size(&q(Some(40), Some(120))).unwrap().rows, 40);
        assert!(size(&q(Some(0), Some(80))).unwrap_err().contains("0x80"));
        assert!(size(&q(Some(24), Some(5000))).is_err());
    }
}
