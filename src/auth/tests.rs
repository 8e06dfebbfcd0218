//! Accounts without a daemon: hashing, sessions, throttling, tokens.

use super::*;
use crate::store::Store;

fn auth() -> Auth {
    Auth::new(
        Arc::new(SharedStore::new(Store::in_memory().unwrap())),
        Duration::from_secs(3600),
        None,
    )
}

#[tokio::test]
async fn login_checks_the_argon2id_hash_and_opens_a_session() {
    let a = auth();
    a.add_user("alice", Some("viewer"), "correct horse".into())
        .await
        .unwrap();
    let stored = a.store.lock().user("alice").unwrap().unwrap().hash;
    assert!(stored.starts_with("$argon2id$"), "{stored}");
    let e = a.login("alice", "wrong pass".into(), None).await.unwrap_err();
    assert!(matches!(e, AuthError::Unauthorized(_)));
    let (secret, p) = a.login("alice", "correct horse".into(), None).await.unwrap();
    assert_eq!(p.role(), Role::Viewer);
    assert_eq!(a.session(&secret).unwrap(), p);
    a.logout(&secret).unwrap();
    assert!(matches!(a.session(&secret), Err(AuthError::Unauthorized(_))));
}

#[tokio::test]
async fn bad_values_are_named() {
    let a = auth();
    let e = a
        .add_user("Bob!", None, "longenough".into())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"Bob!\"") && e.contains("allowed"), "{e}");
    let e = a
        .add_user("bob", None, "short".into())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 characters") && e.contains("8"), "{e}");
    let e = a
        .add_user("bob", Some("root"), "longenough".into())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"root\"") && e.contains("viewer"), "{e}");
    let e = a.create_token("ci", None, Some("30x")).unwrap_err().to_string();
    assert!(e.contains("\"30x\""), "{e}");
    assert_eq!(parse_lifetime("30d").unwrap(), Duration::from_secs(30 * 86400));
}

#[tokio::test]
async fn failed_logins_are_slowed_per_user_and_per_address() {
    let a = auth();
    a.add_user("carol", None, "correct horse".into()).await.unwrap();
    for _ in 0..FREE_FAILURES {
        let e = a
            .login("carol", "nope nope".into(), Some("10.0.0.1"))
            .await
            .unwrap_err();
        assert!(matches!(e, AuthError::Unauthorized(_)), "{e}");
    }
    // The next failure locks the user and the address for a while.
    let _ = a.login("carol", "nope nope".into(), Some("10.0.0.1")).await;
    let e = a
        .login("carol", "correct horse".into(), Some("10.0.0.2"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AuthError::Throttled(m) if m.contains("user carol")),
        "{e}"
    );
    let e = a
        .login("dave", "whatever1".into(), Some("10.0.0.1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AuthError::Throttled(m) if m.contains("address 10.0.0.1")),
        "{e}"
    );
}

#[test]
fn tokens_are_hashed_revocable_and_expire() {
    let a = auth();
    let t = a.create_token("ci", Some("viewer"), None).unwrap();
    assert!(t.token.starts_with(TOKEN_PREFIX));
    let secret = t.token.rsplit('_').next().unwrap();
    assert!(
        a.store
            .lock()
            .tokens()
            .unwrap()
            .iter()
            .all(|r| !r.hash.contains(secret) && r.hash.len() == 64),
        "only the hash is stored"
    );
    assert_eq!(a.bearer(&t.token).unwrap().role(), Role::Viewer);
    // The same token with its last character changed (to something else than it is).
    let last = if t.token.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &t.token[..t.token.len() - 1]);
    assert!(matches!(a.bearer(&wrong), Err(AuthError::Unauthorized(_))));
    a.revoke_token("ci").unwrap();
    assert!(matches!(a.bearer(&t.token), Err(AuthError::Forbidden(m)) if m.contains("revoked")));
    let t = a.create_token("old", None, Some("1s")).unwrap();
    a.store.lock().revoke_token("nothing").unwrap_err();
    // Expire it by moving its expiry into the past.
    let id = t
        .token
        .trim_start_matches(TOKEN_PREFIX)
        .split('_')
        .next()
        .unwrap()
        .to_string();
    let row = a.store.lock().token_by_id(&id).unwrap().unwrap();
    assert!(row.expires_at.unwrap() > now());
    a.store.lock().expire_token_for_tests(&id);
    assert!(matches!(a.bearer(&t.token), Err(AuthError::Forbidden(m)) if m.contains("expired")));
}
