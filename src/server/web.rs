//! What the dashboard needs beyond the API: the event stream (`GET /v1/events`, server-sent
//! events), a machine's console as it grows (`GET /v1/machines/{name}/logs/stream`), host
//! figures (`GET /v1/system`) and the dashboard's own files, embedded in the binary.

use super::{AppState, convert};
use crate::api::{DaemonEvent, SystemInfo};
use crate::error::Error;
use crate::events::HostEvent;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt as _;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// How often a followed console is looked at for new output when it had none.
const LOG_FOLLOW: Duration = Duration::from_millis(250);

/// How often a quiet event stream sends a comment (keeps proxies and clients from timing out).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The wire event of a host event (a machine's whole view for a machine change).
fn wire(h: &AppState, ev: HostEvent) -> Option<DaemonEvent> {
    Some(match ev {
        HostEvent::Machine { name } => match h.machines.get(&name) {
            Ok(v) => DaemonEvent::Machine {
                machine: Box::new(convert::machine_info(&v)),
            },
            // Deleted since: its removal event follows.
            Err(_) => return None,
        },
        HostEvent::MachineRemoved { name } => DaemonEvent::MachineRemoved { name },
        HostEvent::Progress {
            action,
            target,
            message,
        } => DaemonEvent::Progress {
            action,
            target,
            message,
        },
        HostEvent::Change(row) => DaemonEvent::Change {
            entry: super::convert::history_entry(row),
        },
        HostEvent::Firewall { detail } => DaemonEvent::Firewall { detail },
    })
}

/// `GET /v1/events`: every event from now on, as server-sent events (`event:` the type,
/// `data:` its JSON); a reader that falls behind gets `resync`.
async fn events(State(h): State<AppState>) -> Response {
    let rx = h.events.subscribe();
    let closed = h.events.closed();
    let stream = futures::stream::unfold((rx, h), |(mut rx, h)| async move {
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => match wire(&h, ev) {
                    Some(w) => w,
                    None => continue,
                },
                Err(RecvError::Lagged(_)) => DaemonEvent::Resync,
                Err(RecvError::Closed) => return None,
            };
            let sse = Sse::default()
                .event(ev.name())
                .data(serde_json::to_string(&ev).unwrap_or_default());
            return Some((Ok::<_, std::convert::Infallible>(sse), (rx, h)));
        }
    })
    .take_until(closed);
    sse_response(stream)
}

/// `GET /v1/machines/{name}/logs/stream`: the console's tail, then its new output as it comes,
/// as server-sent `log` events (`{"offset": N, "text": "…"}`, terminal control sequences
/// removed); ends when the machine is deleted, the client goes or the daemon stops. The
/// daemon follows the file (as `tail -f` does): the browser never polls.
async fn logs_stream(State(h): State<AppState>, Path(name): Path<String>) -> Result<Response, Error> {
    let first = h.machines.logs(&name, None)?;
    let closed = h.events.closed();
    let stream = futures::stream::unfold(
        (h, name, first.0, Some(first)),
        |(h, name, mut next, mut pending)| async move {
            loop {
                let (at, bytes) = match pending.take() {
                    Some(chunk) => chunk,
                    // Gone (deleted): the stream ends.
                    None => h.machines.logs(&name, Some(next)).ok()?,
                };
                if bytes.is_empty() {
                    tokio::time::sleep(LOG_FOLLOW).await;
                    continue;
                }
                next = at + bytes.len() as u64;
                let data = serde_json::json!({
                    "offset": at,
                    "text": sistemo_vmm::qemu::printable(&String::from_utf8_lossy(&bytes)),
                });
                let sse = Sse::default().event("log").data(data.to_string());
                return Some((Ok::<_, std::convert::Infallible>(sse), (h, name, next, None)));
            }
        },
    )
    .take_until(closed);
    Ok(sse_response(stream))
}

/// A stream of server-sent events as a response: kept alive while quiet, never cached.
fn sse_response(
    stream: impl futures::Stream<Item = Result<Sse, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut r = axum::response::sse::Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// `GET /v1/system`.
async fn system(State(h): State<AppState>) -> Result<Json<SystemInfo>, Error> {
    let (mem_total, mem_available) = meminfo();
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let (disk_total, disk_free) = nix::sys::statvfs::statvfs(&h.config().data_dir)
        .map(|s| {
            let f = s.fragment_size();
            (s.blocks() * f, s.blocks_available() * f)
        })
        .unwrap_or((0, 0));
    let (listeners, tls_fingerprint) = h.listeners.get().cloned().unwrap_or_default();
    Ok(Json(SystemInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        hypervisor: h.machines.hypervisor(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        load1,
        mem_total,
        mem_available,
        disk_total,
        disk_free,
        firewall: h.firewall_health(),
        listeners,
        tls_fingerprint,
    }))
}

/// API routes of this module.
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/v1/events", get(events))
        .route("/v1/machines/{name}/logs/stream", get(logs_stream))
        .route("/v1/system", get(system))
}

/// The dashboard's files, in the binary.
const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const PAGES_JS: &str = include_str!("dashboard/pages.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const VOLUMES_JS: &str = include_str!("dashboard/volumes.js");

/// Only our own files run; nothing frames the dashboard; no referrer leaves it. Inline styles
/// are allowed (not scripts): xterm.js styles its terminal with `<style>` elements it makes.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub(super) fn asset(ctype: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The dashboard: `/` and its assets; no credentials needed (it logs in through the API).
pub fn dashboard() -> axum::Router {
    axum::Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/pages.js",
            get(|| async { asset("text/javascript; charset=utf-8", PAGES_JS) }),
        )
        .route(
            "/assets/volumes.js",
            get(|| async { asset("text/javascript; charset=utf-8", VOLUMES_JS) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .merge(super::terminal::assets())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboard_first_load_is_small_and_has_no_third_party_code() {
        let total = INDEX.len() + APP_JS.len() + PAGES_JS.len() + APP_CSS.len() + VOLUMES_JS.len();
        println!("RESULT dashboard_first_load_bytes={total}");
        assert!(total <= 300 * 1024, "{total} bytes uncompressed");
        for f in [INDEX, APP_JS, PAGES_JS, VOLUMES_JS] {
            assert!(
                !f.contains("http://") && !f.contains("https://"),
                "nothing loaded from elsewhere"
            );
            assert!(!f.contains("innerHTML"), "text only, never markup from data");
        }
    }
}
