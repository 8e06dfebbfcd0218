//! Accounts: users with argon2id passwords, API tokens (random secrets stored as SHA-256),
//! browser sessions with a CSRF token, failed log-ins slowed down per user and per address.

use crate::store::{Account, Role, SharedStore, StoreError, TokenRow};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::store::Role as AccountRole;

/// Errors of accounts and authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No or unknown credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Known credentials that may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// Too many failed log-ins (429).
    #[error("{0}")]
    Throttled(String),
    /// A bad value, naming it and what is allowed (400).
    #[error("{0}")]
    Invalid(String),
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing failed.
    #[error("hashing the password: {0}")]
    Hash(String),
}

impl AuthError {
    /// The kind of failure.
    pub fn kind(&self) -> Option<crate::error::ErrorKind> {
        use crate::error::ErrorKind as K;
        Some(match self {
            AuthError::Unauthorized(_) => K::Unauthorized,
            AuthError::Forbidden(_) => K::Forbidden,
            AuthError::Throttled(_) => K::TooManyRequests,
            AuthError::Invalid(_) => K::Invalid,
            AuthError::Store(StoreError::NotFound(_)) => K::NotFound,
            AuthError::Store(StoreError::Conflict(_)) => K::Conflict,
            _ => return None,
        })
    }
}

type Result<T> = std::result::Result<T, AuthError>;

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A process on the host, through the Unix socket (root or the `sistemo` group).
    Local {
        /// Its uid (SO_PEERCRED).
        uid: Option<u32>,
    },
    /// A user logged in from a browser.
    User {
        /// User name.
        name: String,
        /// What the user may do: `admin` changes, `viewer` reads.
        role: Role,
        /// The session's CSRF token.
        csrf: String,
        /// Session end (Unix seconds).
        expires_at: i64,
    },
    /// An API token.
    Token {
        /// Token name.
        name: String,
        /// What the token may do: `admin` changes, `viewer` reads.
        role: Role,
    },
    /// The shared `token` of the configuration file (an admin).
    ConfigToken,
}

impl Principal {
    /// What it may do.
    pub fn role(&self) -> Role {
        match self {
            Principal::User { role, .. } | Principal::Token { role, .. } => *role,
            Principal::Local { .. } | Principal::ConfigToken => Role::Admin,
        }
    }

    /// How the audit log names it.
    pub fn actor(&self) -> String {
        match self {
            Principal::Local { uid: Some(uid) } => {
                match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*uid)) {
                    Ok(Some(u)) => format!("local {}", u.name),
                    _ => format!("local uid {uid}"),
                }
            }
            Principal::Local { uid: None } => "local".into(),
            Principal::User { name, .. } => format!("user {name}"),
            Principal::Token { name, .. } => format!("token {name}"),
            Principal::ConfigToken => "config token".into(),
        }
    }
}

/// A token just created: its row, and the whole token text (shown once, stored nowhere).
#[derive(Debug)]
pub struct NewToken {
    /// The token as stored.
    pub row: TokenRow,
    /// `Authorization: Bearer …` or `SISTEMO_TOKEN`.
    pub token: String,
}

/// Failed log-ins a user or an address may make before each further attempt waits.
pub const FREE_FAILURES: u32 = 5;
/// The longest wait after failed log-ins.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(300);
/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(900);
/// Prefix of API tokens (recognisable in leaks and logs).
pub const TOKEN_PREFIX: &str = "sis_";

/// Failed log-ins per key (`user NAME`, `address IP`).
#[derive(Default)]
struct Throttle(HashMap<String, (u32, Instant)>);

impl Throttle {
    /// How long `key` must still wait, if it must.
    fn wait(&mut self, key: &str, now: Instant) -> Option<Duration> {
        self.0
            .retain(|_, (_, at)| now.duration_since(*at) < FAILURE_MEMORY);
        let (n, at) = *self.0.get(key)?;
        let over = n.checked_sub(FREE_FAILURES)?;
        let lock = Duration::from_secs(1u64 << over.min(9)).min(MAX_LOCKOUT);
        lock.checked_sub(now.duration_since(at)).filter(|d| !d.is_zero())
    }

    fn fail(&mut self, key: &str, now: Instant) {
        let e = self.0.entry(key.to_string()).or_insert((0, now));
        *e = (e.0 + 1, now);
    }

    fn clear(&mut self, key: &str) {
        self.0.remove(key);
    }
}

/// The accounts service.
pub struct Auth {
    store: Arc<SharedStore>,
    session_ttl: Duration,
    config_token: Option<String>,
    throttle: Mutex<Throttle>,
    /// A hash verified against when the user does not exist, so both take as long (made on
    /// first use: start-up does not wait for it).
    dummy_hash: Arc<std::sync::OnceLock<String>>,
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the kernel's random source");
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of `s`, hex.
pub fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// Equal, in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "{what} name {name:?} is not allowed (allowed: 1-32 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit)"
        )))
    }
}

fn check_password(pw: &str) -> Result<()> {
    if pw.chars().count() < 8 || pw.len() > 1024 {
        return Err(AuthError::Invalid(format!(
            "the password has {} characters (allowed: 8 to 1024)",
            pw.chars().count()
        )));
    }
    Ok(())
}

fn role_of(s: Option<&str>) -> Result<Role> {
    s.unwrap_or("admin")
        .parse()
        .map_err(|e: crate::domain::Invalid| AuthError::Invalid(e.0))
}

/// A lifetime like `30d`, `12h`, `90m`, `2w`, `45s`.
pub fn parse_lifetime(s: &str) -> Result<Duration> {
    let bad = || {
        AuthError::Invalid(format!(
            "lifetime {s:?} is not a duration (allowed: a number and s, m, h, d or w, e.g. 30d)"
        ))
    };
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(n.checked_mul(secs).ok_or_else(bad)?))
}

fn hash_password(pw: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("the kernel's random source");
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(argon2::Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string())
}

fn verify_password(pw: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(pw.as_bytes(), &h)
            .is_ok()
    })
}

/// Run CPU-heavy hashing off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("hashing task")
}

impl Auth {
    /// The service over `store`; sessions last `session_ttl`; `config_token` is the shared
    /// token of the configuration file, still accepted as an admin.
    pub fn new(store: Arc<SharedStore>, session_ttl: Duration, config_token: Option<String>) -> Auth {
        Auth {
            store,
            session_ttl,
            config_token,
            throttle: Mutex::default(),
            dummy_hash: Arc::default(),
        }
    }

    /// Add a user; its row as stored.
    pub async fn add_user(&self, name: &str, role: Option<&str>, password: String) -> Result<Account> {
        check_name("user", name)?;
        let role = role_of(role)?;
        check_password(&password)?;
        let hash = blocking(move || hash_password(&password)).await?;
        self.store.lock().create_user(name, role, &hash)?;
        Ok(self.store.lock().user(name)?.expect("just created"))
    }

    /// Change a user's password (its sessions end).
    pub async fn set_password(&self, name: &str, password: String) -> Result<()> {
        check_password(&password)?;
        let hash = blocking(move || hash_password(&password)).await?;
        Ok(self.store.lock().set_user_hash(name, &hash)?)
    }

    /// Remove a user (its sessions end).
    pub fn remove_user(&self, name: &str) -> Result<()> {
        Ok(self.store.lock().delete_user(name)?)
    }

    /// Every user.
    pub fn users(&self) -> Result<Vec<Account>> {
        Ok(self.store.lock().users()?)
    }

    /// Check a password and open a session: the cookie's secret and the principal. Failures
    /// count per user and per address; past [`FREE_FAILURES`] each attempt waits first.
    pub async fn login(
        &self,
        user: &str,
        password: String,
        addr: Option<&str>,
    ) -> Result<(String, Principal)> {
        let keys: Vec<String> = std::iter::once(format!("user {user}"))
            .chain(addr.map(|a| format!("address {a}")))
            .collect();
        {
            let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some((k, w)) = keys.iter().find_map(|k| t.wait(k, now).map(|w| (k, w))) {
                return Err(AuthError::Throttled(format!(
                    "too many failed log-ins for {k}; try again in {} s",
                    w.as_secs().max(1)
                )));
            }
        }
        let account = self.store.lock().user(user)?;
        let stored = account.as_ref().map(|a| a.hash.clone());
        let dummy = self.dummy_hash.clone();
        let ok = blocking(move || {
            let hash = stored.unwrap_or_else(|| {
                dummy
                    .get_or_init(|| hash_password("not a password of anyone").unwrap_or_default())
                    .clone()
            });
            verify_password(&password, &hash)
        })
        .await
            && account.is_some();
        let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
        let Some(account) = account.filter(|_| ok) else {
            for k in &keys {
                t.fail(k, Instant::now());
            }
            return Err(AuthError::Unauthorized("wrong user name or password".into()));
        };
        for k in &keys {
            t.clear(k);
        }
        drop(t);
        let secret = random_hex(32);
        let csrf = random_hex(32);
        let now = now();
        let expires_at = now + self.session_ttl.as_secs() as i64;
        self.store
            .lock()
            .create_session(&sha256_hex(&secret), &account.name, &csrf, expires_at, now)?;
        Ok((
            secret,
            Principal::User {
                name: account.name,
                role: account.role,
                csrf,
                expires_at,
            },
        ))
    }

    /// The principal of a session cookie.
    pub fn session(&self, secret: &str) -> Result<Principal> {
        let s = self
            .store
            .lock()
            .session(&sha256_hex(secret), now())?
            .ok_or_else(|| AuthError::Unauthorized("the session ended or is unknown; log in again".into()))?;
        Ok(Principal::User {
            name: s.user,
            role: s.role,
            csrf: s.csrf,
            expires_at: s.expires_at,
        })
    }

    /// End a session.
    pub fn logout(&self, secret: &str) -> Result<()> {
        Ok(self.store.lock().delete_session(&sha256_hex(secret))?)
    }

    /// Create an API token; the secret is in the answer and nowhere else.
    pub fn create_token(&self, name: &str, role: Option<&str>, expires: Option<&str>) -> Result<NewToken> {
        check_name("token", name)?;
        let role = role_of(role)?;
        let now = now();
        let expires_at = expires
            .map(parse_lifetime)
            .transpose()?
            .map(|d| now + d.as_secs() as i64);
        let (id, secret) = (random_hex(6), random_hex(32));
        let row = TokenRow {
            name: name.into(),
            id: id.clone(),
            role,
            hash: sha256_hex(&secret),
            expires_at,
            revoked: false,
            last_used_at: None,
            created_at: String::new(),
        };
        self.store.lock().create_token(&row)?;
        Ok(NewToken {
            row: self.store.lock().token_by_id(&id)?.expect("just created"),
            token: format!("{TOKEN_PREFIX}{id}_{secret}"),
        })
    }

    /// Every token.
    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        Ok(self.store.lock().tokens()?)
    }

    /// Revoke a token.
    pub fn revoke_token(&self, name: &str) -> Result<()> {
        Ok(self.store.lock().revoke_token(name)?)
    }

    /// The principal of an `Authorization: Bearer` value: 401 when unknown, 403 when revoked
    /// or expired.
    pub fn bearer(&self, text: &str) -> Result<Principal> {
        if let Some(t) = &self.config_token
            && constant_time_eq(text.as_bytes(), t.as_bytes())
        {
            return Ok(Principal::ConfigToken);
        }
        let unknown =
            || AuthError::Unauthorized("unknown API token (create one with `sistemo token create`)".into());
        let (id, secret) = text
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|r| r.split_once('_'))
            .ok_or_else(unknown)?;
        let st = self.store.lock();
        let row = st.token_by_id(id)?.ok_or_else(unknown)?;
        if !constant_time_eq(sha256_hex(secret).as_bytes(), row.hash.as_bytes()) {
            return Err(unknown());
        }
        let now = now();
        if row.revoked {
            return Err(AuthError::Forbidden(format!(
                "API token {} was revoked",
                row.name
            )));
        }
        if row.expires_at.is_some_and(|e| e <= now) {
            return Err(AuthError::Forbidden(format!(
                "API token {} has expired",
                row.name
            )));
        }
        st.touch_token(id, now)?;
        Ok(Principal::Token {
            name: row.name,
            role: row.role,
        })
    }
}

#[cfg(test)]
mod tests;
