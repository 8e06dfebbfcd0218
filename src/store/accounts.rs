//! Accounts in the store: users (argon2id hashes), API tokens (SHA-256 of their secret) and
//! browser sessions (SHA-256 of the cookie); secrets themselves are never stored.

use super::{Result, Store, StoreError};
use rusqlite::{OptionalExtension, params};

/// Migration 6: the account tables, and who made each change in the audit log.
pub(super) const MIGRATION: &str = "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        hash TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
     );
     CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL,
        hash TEXT NOT NULL,
        expires_at INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0,
        last_used_at INTEGER,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ','now'))
     );
     CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        csrf TEXT NOT NULL,
        expires_at INTEGER NOT NULL
     );
     CREATE INDEX sessions_user ON sessions(user);
     ALTER TABLE history ADD COLUMN actor TEXT;";

/// What an account may do: an admin changes anything, a viewer reads everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads and changes.
    Admin,
    /// Reads only.
    Viewer,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = crate::domain::Invalid;
    fn from_str(s: &str) -> std::result::Result<Role, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            _ => Err(crate::domain::Invalid(format!(
                "role {s:?} is not a role (allowed: admin, viewer)"
            ))),
        }
    }
}

impl rusqlite::types::ToSql for Role {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::from(self.to_string()))
    }
}

impl rusqlite::types::FromSql for Role {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        v.as_str()?
            .parse()
            .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
    }
}

/// A user.
#[derive(Debug, Clone)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// What the user may do.
    pub role: Role,
    /// argon2id PHC string.
    pub hash: String,
    /// Creation time (UTC).
    pub created_at: String,
}

/// An API token (its secret is not stored, only its hash).
#[derive(Debug, Clone)]
pub struct TokenRow {
    /// Name given at creation.
    pub name: String,
    /// Public identifier, part of the token text, to find its row.
    pub id: String,
    /// What the token may do.
    pub role: Role,
    /// SHA-256 (hex) of the secret part.
    pub hash: String,
    /// Expiry (Unix seconds), if any.
    pub expires_at: Option<i64>,
    /// Revoked tokens are kept so their use is refused with a reason.
    pub revoked: bool,
    /// Last use (Unix seconds).
    pub last_used_at: Option<i64>,
    /// Creation time (UTC).
    pub created_at: String,
}

/// A browser session.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// The user.
    pub user: String,
    /// The user's role.
    pub role: Role,
    /// Anti-CSRF token every mutating request must carry.
    pub csrf: String,
    /// Expiry (Unix seconds).
    pub expires_at: i64,
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        name: r.get(0)?,
        id: r.get(1)?,
        role: r.get(2)?,
        hash: r.get(3)?,
        expires_at: r.get(4)?,
        revoked: r.get(5)?,
        last_used_at: r.get(6)?,
        created_at: r.get(7)?,
    })
}

const TOKEN_COLS: &str = "name, id, role, hash, expires_at, revoked, last_used_at, created_at";

impl Store {
    /// Add a user; a taken name is a conflict.
    pub fn create_user(&self, name: &str, role: Role, hash: &str) -> Result<()> {
        let n = self.conn.execute(
            "INSERT INTO users(name, role, hash) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            params![name, role, hash],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("user {name:?} already exists")));
        }
        Ok(())
    }

    /// A user by name.
    pub fn user(&self, name: &str) -> Result<Option<Account>> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, role, hash, created_at FROM users WHERE name = ?1",
                [name],
                |r| {
                    Ok(Account {
                        name: r.get(0)?,
                        role: r.get(1)?,
                        hash: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<Account>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, role, hash, created_at FROM users ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(Account {
                name: r.get(0)?,
                role: r.get(1)?,
                hash: r.get(2)?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Replace a user's password hash and end its sessions.
    pub fn set_user_hash(&mut self, name: &str, hash: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        if tx.execute("UPDATE users SET hash = ?2 WHERE name = ?1", params![name, hash])? == 0 {
            return Err(StoreError::NotFound(format!("user {name:?} does not exist")));
        }
        tx.execute("DELETE FROM sessions WHERE user = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    /// Remove a user and its sessions.
    pub fn delete_user(&self, name: &str) -> Result<()> {
        if self.conn.execute("DELETE FROM users WHERE name = ?1", [name])? == 0 {
            return Err(StoreError::NotFound(format!("user {name:?} does not exist")));
        }
        Ok(())
    }

    /// Add a token; a taken name is a conflict.
    pub fn create_token(&self, t: &TokenRow) -> Result<()> {
        let n = self.conn.execute(
            "INSERT INTO tokens(name, id, role, hash, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO NOTHING",
            params![t.name, t.id, t.role, t.hash, t.expires_at],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "token {:?} already exists (revoked tokens keep their name)",
                t.name
            )));
        }
        Ok(())
    }

    /// A token by its public identifier.
    pub fn token_by_id(&self, id: &str) -> Result<Option<TokenRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"),
                [id],
                token_row,
            )
            .optional()?)
    }

    /// Every token, by name.
    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {TOKEN_COLS} FROM tokens ORDER BY name"))?;
        let rows = st.query_map([], token_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Revoke a token (kept, so its use is refused with a reason).
    pub fn revoke_token(&self, name: &str) -> Result<()> {
        if self
            .conn
            .execute("UPDATE tokens SET revoked = 1 WHERE name = ?1", [name])?
            == 0
        {
            return Err(StoreError::NotFound(format!("token {name:?} does not exist")));
        }
        Ok(())
    }

    /// Note a token's use (at most once a minute, to keep reads cheap).
    pub fn touch_token(&self, id: &str, now: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE tokens SET last_used_at = ?2 WHERE id = ?1 AND coalesce(last_used_at, 0) < ?2 - 60",
            params![id, now],
        )?;
        Ok(())
    }

    /// Open a session for `user`, keyed by the hash of its cookie; drops expired sessions.
    pub fn create_session(
        &self,
        id_hash: &str,
        user: &str,
        csrf: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<()> {
        self.conn
            .execute("DELETE FROM sessions WHERE expires_at <= ?1", [now])?;
        self.conn.execute(
            "INSERT INTO sessions(id, user, csrf, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![id_hash, user, csrf, expires_at],
        )?;
        Ok(())
    }

    /// A live session by the hash of its cookie, with its user's current role.
    pub fn session(&self, id_hash: &str, now: i64) -> Result<Option<SessionRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT s.user, u.role, s.csrf, s.expires_at FROM sessions s JOIN users u ON u.name = s.user
                 WHERE s.id = ?1 AND s.expires_at > ?2",
                params![id_hash, now],
                |r| {
                    Ok(SessionRow {
                        user: r.get(0)?,
                        role: r.get(1)?,
                        csrf: r.get(2)?,
                        expires_at: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// End a session.
    pub fn delete_session(&self, id_hash: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM sessions WHERE id = ?1", [id_hash])?;
        Ok(())
    }

    /// Move a token's expiry into the past.
    #[cfg(test)]
    pub fn expire_token_for_tests(&self, id: &str) {
        self.conn
            .execute("UPDATE tokens SET expires_at = 1 WHERE id = ?1", [id])
            .unwrap();
    }

    /// Call `f` with the table's name after every row change (`machines`, `exposes`, …), from
    /// inside the change: it must not touch the store (it only wakes someone who will).
    pub fn on_change(&self, mut f: impl FnMut(&str) + Send + 'static) {
        self.conn.update_hook(Some(
            move |_: rusqlite::hooks::Action, _: &str, table: &str, _: i64| f(table),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_tokens_sessions_round_trip() {
        let mut s = Store::in_memory().unwrap();
        s.create_user("alice", Role::Admin, "h1").unwrap();
        let e = s
            .create_user("alice", Role::Viewer, "h2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("alice") && e.contains("exists"), "{e}");
        s.create_session("sid", "alice", "csrf", 100, 0).unwrap();
        assert_eq!(s.session("sid", 50).unwrap().unwrap().role, Role::Admin);
        assert!(s.session("sid", 100).unwrap().is_none(), "expired");
        s.set_user_hash("alice", "h3").unwrap();
        assert!(
            s.session("sid", 50).unwrap().is_none(),
            "a new password ends sessions"
        );
        assert_eq!(s.user("alice").unwrap().unwrap().hash, "h3");
        s.create_session("sid2", "alice", "c", 100, 0).unwrap();
        s.delete_user("alice").unwrap();
        assert!(
            s.session("sid2", 50).unwrap().is_none(),
            "sessions go with the user"
        );
        let t = TokenRow {
            name: "ci".into(),
            id: "abcd".into(),
            role: Role::Viewer,
            hash: "x".into(),
            expires_at: Some(10),
            revoked: false,
            last_used_at: None,
            created_at: String::new(),
        };
        s.create_token(&t).unwrap();
        assert!(s.create_token(&t).is_err());
        s.revoke_token("ci").unwrap();
        let back = s.token_by_id("abcd").unwrap().unwrap();
        assert!(back.revoked && back.role == Role::Viewer && back.expires_at == Some(10));
        assert!(s.revoke_token("nope").unwrap_err().to_string().contains("nope"));
    }
}
