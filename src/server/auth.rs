//! The one authorisation check of the TCP listeners (a middleware): a bearer API token or a
//! session cookie with its CSRF token on every mutating request; viewers only read; users and
//! tokens are managed on the host only. Also log-in, log-out and `GET /v1/session`.

use super::{AppState, Peer};
use crate::api::{ErrorBody, ErrorKind, LoginRequest, SessionInfo};
use crate::auth::{Principal, constant_time_eq};
use crate::error::Error;
use crate::store::Role;
use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The session cookie's name.
pub const COOKIE: &str = "sistemo_session";
/// The header a browser session sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Whether the connection speaks TLS (cookies are then `Secure`).
#[derive(Clone, Copy, Debug)]
pub struct Secure(pub bool);

fn refuse(kind: ErrorKind, msg: impl Into<String>) -> Response {
    respond(ErrorBody::new(kind, msg))
}

fn respond(body: ErrorBody) -> Response {
    let code = StatusCode::from_u16(body.status).unwrap_or(StatusCode::FORBIDDEN);
    (code, Json(body)).into_response()
}

/// The session cookie's value, if the request has one.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE && !v.is_empty()).then(|| v.to_string())
        })
}

fn is_read(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Who is calling, from the request's credentials (401/403 as the API answers them).
fn principal(h: &AppState, req: &Request) -> Result<Principal, ErrorBody> {
    let headers = req.headers();
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let text = v.to_str().unwrap_or_default();
        let Some(token) = text.strip_prefix("Bearer ") else {
            return Err(ErrorBody::new(
                ErrorKind::Unauthorized,
                "the Authorization header is not a bearer token (allowed: Authorization: Bearer <API token>)",
            ));
        };
        return h.auth.bearer(token.trim()).map_err(|e| Error::from(e).body());
    }
    let Some(secret) = cookie(headers) else {
        return Err(ErrorBody::new(
            ErrorKind::Unauthorized,
            "not logged in (allowed: a session from POST /v1/login, or Authorization: Bearer <API token>)",
        ));
    };
    let p = h.auth.session(&secret).map_err(|e| Error::from(e).body())?;
    if !is_read(req.method()) {
        let Principal::User { csrf, .. } = &p else {
            unreachable!("sessions are users")
        };
        let sent = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !constant_time_eq(sent.as_bytes(), csrf.as_bytes()) {
            return Err(ErrorBody::new(
                ErrorKind::Forbidden,
                "CSRF token missing or wrong (a browser session sends the X-CSRF-Token header given by GET /v1/session on every change)",
            ));
        }
    }
    Ok(p)
}

/// The check of every TCP request to `/v1/…` (log-in aside).
pub async fn require(State(h): State<AppState>, mut req: Request, next: Next) -> Response {
    let p = match principal(&h, &req) {
        Ok(p) => p,
        Err(b) => return respond(b),
    };
    let path = req.uri().path();
    if path.starts_with("/v1/users") || path.starts_with("/v1/tokens") {
        return refuse(
            ErrorKind::Forbidden,
            "users and API tokens are managed on the host (`sistemo user …`, `sistemo token …`)",
        );
    }
    if p.role() == Role::Viewer && !is_read(req.method()) && path != "/v1/logout" {
        return refuse(
            ErrorKind::Forbidden,
            format!(
                "{} is a viewer: it reads everything and changes nothing ({} {path} refused)",
                p.actor(),
                req.method()
            ),
        );
    }
    if let Some(ConnectInfo(Peer(c))) = req.extensions_mut().get_mut::<ConnectInfo<Peer>>() {
        c.actor = Some(p.actor());
    }
    req.extensions_mut().insert(p);
    next.run(req).await
}

/// On the Unix socket: the caller is the local account behind the socket's peer uid.
pub async fn local(mut req: Request, next: Next) -> Response {
    let uid = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .and_then(|c| c.0.0.uid);
    let p = Principal::Local { uid };
    if let Some(ConnectInfo(Peer(c))) = req.extensions_mut().get_mut::<ConnectInfo<Peer>>() {
        c.actor = Some(p.actor());
    }
    req.extensions_mut().insert(p);
    next.run(req).await
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let s = format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&s).expect("a valid cookie")
}

/// `POST /v1/login`: open a session (an HttpOnly, SameSite=Strict cookie) and answer who.
pub async fn login(
    State(h): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    secure: Option<axum::Extension<Secure>>,
    Json(req): Json<LoginRequest>,
) -> Response {
    let secure = secure.is_some_and(|s| s.0.0);
    let ip = peer.0.remote.as_deref().map(|r| {
        r.parse::<std::net::SocketAddr>()
            .map_or_else(|_| r.to_string(), |a| a.ip().to_string())
    });
    let r = h.auth.login(&req.username, req.password, ip.as_deref()).await;
    let mut caller = peer.0.clone();
    caller.actor = Some(format!("user {}", req.username));
    let result = match &r {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    h.record(&caller, "user.login", &req.username, &result);
    match r {
        Ok((secret, p)) => {
            let max_age = match &p {
                Principal::User { expires_at, .. } => expires_at - crate::auth::now(),
                _ => 0,
            };
            let mut resp = Json(session_info(&p)).into_response();
            resp.headers_mut()
                .insert(header::SET_COOKIE, session_cookie(&secret, max_age, secure));
            resp
        }
        Err(e) => Error::from(e).into_response(),
    }
}

/// `POST /v1/logout`: end the session and clear its cookie.
pub async fn logout(
    State(h): State<AppState>,
    secure: Option<axum::Extension<Secure>>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    if let Some(secret) = cookie(&headers) {
        h.auth.logout(&secret)?;
    }
    let mut resp = Json(serde_json::json!({"logged_out": true})).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie("", 0, secure.is_some_and(|s| s.0.0)),
    );
    Ok(resp)
}

/// `GET /v1/session`: who is calling, and a session's CSRF token.
pub async fn session(axum::Extension(p): axum::Extension<Principal>) -> Json<SessionInfo> {
    Json(session_info(&p))
}

/// A caller as `GET /v1/session` and a log-in's answer show it.
fn session_info(p: &Principal) -> SessionInfo {
    let (csrf, expires_at) = match p {
        Principal::User { csrf, expires_at, .. } => (Some(csrf.clone()), Some(*expires_at)),
        _ => (None, None),
    };
    SessionInfo {
        actor: p.actor(),
        role: p.role().to_string(),
        csrf,
        expires_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sistemo_session=abc; b=2"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("sistemo_session="));
        assert_eq!(cookie(&h), None);
        let c = session_cookie("x", 60, true);
        let c = c.to_str().unwrap();
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("; Secure"),
            "{c}"
        );
    }
}
