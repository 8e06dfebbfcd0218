//! Routes of users and API tokens (`sistemo user …`, `sistemo token …`), served on the Unix
//! socket only (the TCP check refuses them), each change in the audit log.

use super::{AppState, Peer, audited};
use crate::api::{PasswordRequest, TokenCreateRequest, TokenCreated, TokenInfo, UserAddRequest, UserInfo};
use crate::auth::{NewToken, now};
use crate::error::Error;
use crate::store::{Account, TokenRow};
use axum::extract::{ConnectInfo, Path, State};
use axum::routing::{delete, get, post};
use axum::{Json, Router};

/// A user as the API shows it (never its hash).
fn user_info(u: Account) -> UserInfo {
    UserInfo {
        name: u.name,
        role: u.role.to_string(),
        created_at: u.created_at,
    }
}

/// A token as the API shows it, with its state at `now` (never its hash).
fn token_info(t: &TokenRow, now: i64) -> TokenInfo {
    let state = if t.revoked {
        "revoked"
    } else if t.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    };
    TokenInfo {
        name: t.name.clone(),
        role: t.role.to_string(),
        expires_at: t.expires_at,
        state: state.into(),
        last_used_at: t.last_used_at,
        created_at: t.created_at.clone(),
    }
}

async fn users(State(h): State<AppState>) -> Result<Json<Vec<UserInfo>>, Error> {
    Ok(Json(h.auth.users()?.into_iter().map(user_info).collect()))
}

async fn user_add(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<UserAddRequest>,
) -> Result<Json<UserInfo>, Error> {
    let r = h
        .auth
        .add_user(&req.name, req.role.as_deref(), req.password)
        .await
        .map(user_info);
    let target = format!("{} {}", req.name, req.role.as_deref().unwrap_or("admin"));
    Ok(Json(audited(
        &h,
        &p,
        "user.add",
        &target,
        r.map_err(Error::from),
    )?))
}

async fn user_passwd(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
    Json(req): Json<PasswordRequest>,
) -> Result<Json<serde_json::Value>, Error> {
    let r = h.auth.set_password(&name, req.password).await;
    audited(&h, &p, "user.passwd", &name, r.map_err(Error::from))?;
    Ok(Json(serde_json::json!({"changed": name})))
}

async fn user_rm(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    audited(
        &h,
        &p,
        "user.rm",
        &name,
        h.auth.remove_user(&name).map_err(Error::from),
    )?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn tokens(State(h): State<AppState>) -> Result<Json<Vec<TokenInfo>>, Error> {
    let now = now();
    Ok(Json(
        h.auth.tokens()?.iter().map(|t| token_info(t, now)).collect(),
    ))
}

async fn token_create(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Json(req): Json<TokenCreateRequest>,
) -> Result<Json<TokenCreated>, Error> {
    let r = h
        .auth
        .create_token(&req.name, req.role.as_deref(), req.expires.as_deref())
        .map(|NewToken { row, token }| TokenCreated {
            info: token_info(&row, now()),
            token,
        });
    let target = format!("{} {}", req.name, req.role.as_deref().unwrap_or("admin"));
    Ok(Json(audited(
        &h,
        &p,
        "token.create",
        &target,
        r.map_err(Error::from),
    )?))
}

async fn token_revoke(
    State(h): State<AppState>,
    ConnectInfo(p): ConnectInfo<Peer>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    audited(
        &h,
        &p,
        "token.revoke",
        &name,
        h.auth.revoke_token(&name).map_err(Error::from),
    )?;
    Ok(Json(serde_json::json!({"revoked": name})))
}

/// The routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/users", get(users).post(user_add))
        .route("/v1/users/{name}", delete(user_rm))
        .route("/v1/users/{name}/password", post(user_passwd))
        .route("/v1/tokens", get(tokens).post(token_create))
        .route("/v1/tokens/{name}", delete(token_revoke))
        .route("/v1/session", get(super::auth::session))
        .route("/v1/logout", post(super::auth::logout))
}
