//! `POST /v1/machines/{name}/session`: an HTTP upgrade to the guest agent's framing, bridged
//! to one agent session (stdin, terminal, file copy), with backpressure both ways.
//!
//! The session opens before the `101` answer, so a stopped machine or a silent agent is an
//! ordinary HTTP error. After it, a client that goes away kills the session.

use super::{AppState, Peer, convert};
use crate::api::{SessionJob, SessionRequest};
use crate::error::Error;
use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::BytesMut;
use hyper_util::rt::TokioIo;
use sistemo_agent::proto::{Codec, Frame, GuestMsg, HostMsg, Kind};
use sistemo_vmm::{Session, SessionEvent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

/// The `Upgrade` token of the session protocol.
pub const UPGRADE: &str = "sistemo-session";

/// Largest session request body.
const REQUEST_LIMIT: usize = 1 << 20;

pub(super) async fn session(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    mut req: Request,
) -> Result<Response, Error> {
    let wants = req
        .headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE));
    let upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let Some(upgrade) = upgrade.filter(|_| wants) else {
        return Err(Error::Invalid(format!(
            "this route needs `Connection: upgrade` and `Upgrade: {UPGRADE}`"
        )));
    };
    let body = axum::body::to_bytes(req.into_body(), REQUEST_LIMIT)
        .await
        .map_err(|e| Error::Invalid(format!("reading the session request: {e}")))?;
    let sreq: SessionRequest =
        serde_json::from_slice(&body).map_err(|e| Error::Invalid(format!("bad session request: {e}")))?;
    let start = convert::session_start(&sreq)?;
    let (action, what) = match &sreq.job {
        SessionJob::Exec { argv } => ("machine.exec", argv.join(" ")),
        SessionJob::Shell { cmd } => ("machine.exec", cmd.clone()),
        SessionJob::Login => ("machine.shell", String::new()),
        SessionJob::CopyFrom { path } => ("machine.cp", format!("from {path}")),
        SessionJob::CopyTo { path } => ("machine.cp", format!("to {path}")),
    };
    let opened = h.machines.session(&name, start).await;
    let session = super::audited(&h, &p, action, format!("{name} {what}").trim_end(), opened)?;
    // Not an in-flight operation that a daemon stop waits for: an interactive session may last
    // for hours, and the daemon's departure ends it (the agent kills its process).
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => bridge(TokioIo::new(io), session).await,
            Err(e) => tracing::debug!("session upgrade failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", UPGRADE)
        .body(Body::empty())
        .expect("valid response"))
}

/// Carry frames between the client on `io` and the agent session until the session ends or
/// the client goes away (which drops, and so kills, the session).
async fn bridge<S: AsyncRead + AsyncWrite>(io: S, mut session: Session) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let input = session.input();
    let feed = async move {
        let mut acc = BytesMut::new();
        loop {
            while let Ok(Some(f)) = Codec.decode(&mut acc) {
                let sent = match f.kind {
                    Kind::Stdin => input.write_stdin(&f.payload).await,
                    Kind::Control => match f.message::<HostMsg>() {
                        Ok(HostMsg::CloseStdin) => input.close_stdin().await,
                        Ok(HostMsg::Resize(s)) => input.resize(s).await,
                        Ok(HostMsg::Signal { signal }) => input.signal(signal).await,
                        _ => Ok(()),
                    },
                    Kind::Stdout | Kind::Stderr => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
            match rd.read_buf(&mut acc).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let drain = async {
        let mut buf = BytesMut::new();
        loop {
            let (frame, last) = match session.next().await {
                Some(SessionEvent::Stdout(b)) => (Frame::data(Kind::Stdout, 1, b), false),
                Some(SessionEvent::Stderr(b)) => (Frame::data(Kind::Stderr, 1, b), false),
                Some(SessionEvent::Started(pid)) => (Frame::control(1, &GuestMsg::Started { pid }), false),
                Some(SessionEvent::Exited {
                    code,
                    signal,
                    timed_out,
                }) => (
                    Frame::control(
                        1,
                        &GuestMsg::Exited {
                            code,
                            signal,
                            timed_out,
                        },
                    ),
                    true,
                ),
                Some(SessionEvent::Failed(error)) => (Frame::control(1, &GuestMsg::Failed { error }), true),
                Some(SessionEvent::Facts(_) | SessionEvent::Applied(_)) => continue,
                None => (
                    Frame::control(
                        1,
                        &GuestMsg::Failed {
                            error: "the connection to the guest agent broke".into(),
                        },
                    ),
                    true,
                ),
            };
            buf.clear();
            if Codec.encode(frame, &mut buf).is_err()
                || wr.write_all(&buf).await.is_err()
                || wr.flush().await.is_err()
            {
                return;
            }
            if last {
                let _ = wr.shutdown().await;
                return;
            }
        }
    };
    tokio::select! {
        () = drain => {}
        () = feed => {}
    }
}
