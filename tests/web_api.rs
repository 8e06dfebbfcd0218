//! The web API's access control against a real daemon: users made with the CLI log in
//! (argon2id, session cookie, CSRF), API tokens (viewer, revoked, expired), viewers change
//! nothing, failed log-ins are slowed down, every change names who made it, events stream,
//! and the TCP listeners: TLS off loopback, the certificate's fingerprint, idle connections.

mod common;
use common::web::*;
use common::*;
use std::time::Duration;

const NET: &str = r#"{"name":"swebnet"}"#;

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn web_api_sessions_tokens_roles_and_csrf() {
    let env = Env::new("swebapi");
    step("without credentials: 401; probes and the dashboard's page answer");
    let r = http(&env, "GET", "/v1/machines", &[], None);
    assert_eq!(r.code, 401, "{}", r.body);
    assert_eq!(r.json()["kind"], "unauthorized");
    assert_eq!(http(&env, "GET", "/health", &[], None).code, 200);
    let page = http(&env, "GET", "/", &[], None);
    assert!(
        page.code == 200 && page.body.contains("/assets/app.js"),
        "{}",
        page.body
    );
    assert!(
        page.headers
            .contains("content-security-policy: default-src 'self'")
    );

    step("users from the CLI; bad values named, nothing stored");
    add_user(&env, "alice", "admin", "alice-password");
    add_user(&env, "vic", "viewer", "vic-password");
    let o = cli_stdin(&env, &["user", "add", "Bad!", "--password-stdin"], "longenough\n");
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("\"Bad!\"") && e.contains("allowed") && e.lines().count() == 1,
        "{e}"
    );
    let o = cli_stdin(&env, &["user", "add", "bob", "--password-stdin"], "short\n");
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let users: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["user", "list", "-o", "json"])).unwrap();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "vic"]);

    step("log-in: wrong password 401, right one a HttpOnly SameSite=Strict cookie");
    let bad = http(
        &env,
        "POST",
        "/v1/login",
        &[],
        Some(r#"{"username":"alice","password":"nope-nope"}"#),
    );
    assert_eq!(bad.code, 401);
    assert!(bad.cookie().is_none());
    let ok = http(
        &env,
        "POST",
        "/v1/login",
        &[],
        Some(r#"{"username":"alice","password":"alice-password"}"#),
    );
    assert_eq!(ok.code, 200, "{}", ok.body);
    let set = ok
        .headers
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap()
        .to_string();
    assert!(
        set.contains("httponly") && set.contains("samesite=strict") && !set.contains("secure"),
        "{set}"
    );
    let (cookie, csrf) = login(&env, "alice", "alice-password");
    assert_eq!(
        http(&env, "GET", "/v1/machines", std::slice::from_ref(&cookie), None).code,
        200
    );

    step("CSRF: a change without or with a wrong token is refused");
    let r = http(
        &env,
        "POST",
        "/v1/networks",
        std::slice::from_ref(&cookie),
        Some(NET),
    );
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(r.body.contains("CSRF"), "{}", r.body);
    let r = http(
        &env,
        "POST",
        "/v1/networks",
        &[cookie.clone(), "X-CSRF-Token: 00".into()],
        Some(NET),
    );
    assert_eq!(r.code, 403);
    assert!(
        env.cli_ok(&["network", "list"])
            .lines()
            .all(|l| !l.starts_with("swebnet")),
        "no state change"
    );
    let with_csrf = [cookie.clone(), format!("X-CSRF-Token: {csrf}")];
    let r = http(&env, "POST", "/v1/networks", &with_csrf, Some(NET));
    assert_eq!(r.code, 200, "{}", r.body);

    step("the audit log names the user and the address");
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "network", "-o", "json"])).unwrap();
    assert_eq!(h[0]["actor"], "user alice", "{h}");
    assert!(h[0]["remote"].as_str().unwrap().starts_with("127.0.0.1:"), "{h}");

    step("a viewer reads everything and changes nothing");
    let (vcookie, vcsrf) = login(&env, "vic", "vic-password");
    let vh = [vcookie.clone(), format!("X-CSRF-Token: {vcsrf}")];
    for path in [
        "/v1/machines",
        "/v1/networks",
        "/v1/history",
        "/v1/system",
        "/v1/info",
        "/v1/ports",
    ] {
        assert_eq!(http(&env, "GET", path, &vh, None).code, 200, "{path}");
    }
    let r = http(&env, "DELETE", "/v1/networks/swebnet", &vh, None);
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(r.body.contains("viewer"), "{}", r.body);
    let r = http(
        &env,
        "POST",
        "/v1/machines",
        &vh,
        Some(r#"{"image":"debian","expose":[]}"#),
    );
    assert_eq!(r.code, 403);

    step("API tokens: viewer, admin, revoked, expired, unknown");
    let viewer = token(&env, "ci-read", &["--role", "viewer"]);
    let admin = token(&env, "ci", &[]);
    let bearer = |t: &str| vec![format!("Authorization: Bearer {t}")];
    assert_eq!(
        http(&env, "GET", "/v1/machines", &bearer(&viewer), None).code,
        200
    );
    assert_eq!(
        http(&env, "DELETE", "/v1/networks/swebnet", &bearer(&viewer), None).code,
        403
    );
    let r = http(&env, "DELETE", "/v1/networks/swebnet", &bearer(&admin), None);
    assert_eq!(r.code, 200, "{}", r.body);
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "network.delete", "-o", "json"])).unwrap();
    assert_eq!(h[0]["actor"], "token ci", "{h}");
    let list = env.cli_ok(&["token", "list"]);
    assert!(
        !list.contains(&admin[admin.len() - 16..]),
        "secrets are never listed: {list}"
    );
    env.cli_ok(&["token", "revoke", "ci"]);
    let r = http(&env, "GET", "/v1/machines", &bearer(&admin), None);
    assert_eq!(r.code, 403);
    assert!(r.body.contains("revoked"), "{}", r.body);
    let short = token(&env, "short", &["--expires", "1s"]);
    let r = poll("the 1 s token to expire", Duration::from_secs(10), || {
        let r = http(&env, "GET", "/v1/machines", &bearer(&short), None);
        (r.code != 200).then_some(r)
    });
    assert_eq!(r.code, 403);
    assert!(r.body.contains("expired"), "{}", r.body);
    assert_eq!(
        http(&env, "GET", "/v1/machines", &bearer("sis_0000_1111"), None).code,
        401
    );
    let e = env.cli_err(&["token", "create", "x", "--expires", "30x"]);
    assert!(e.contains("\"30x\""), "{e}");

    step("users and tokens are managed on the host only");
    let r = http(&env, "GET", "/v1/tokens", &with_csrf, None);
    assert_eq!(r.code, 403, "{}", r.body);

    step("log-out ends the session");
    assert_eq!(http(&env, "POST", "/v1/logout", &with_csrf, None).code, 200);
    assert_eq!(
        http(&env, "GET", "/v1/machines", std::slice::from_ref(&cookie), None).code,
        401
    );

    step("the Unix socket works as before; history names the local account");
    env.cli_ok(&["network", "create", "swebsock"]);
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "network.create", "-o", "json"])).unwrap();
    assert_eq!(h[0]["actor"], "local root", "{h}");
    assert_eq!(h[0]["uid"], 0);

    step("user passwd and rm end sessions");
    let (c2, _) = login(&env, "alice", "alice-password");
    let o = cli_stdin(
        &env,
        &["user", "passwd", "alice", "--password-stdin"],
        "new-password\n",
    );
    assert!(o.status.success());
    assert_eq!(
        http(&env, "GET", "/v1/machines", std::slice::from_ref(&c2), None).code,
        401
    );
    login(&env, "alice", "new-password");
    env.cli_ok(&["user", "rm", "vic", "-y"]);
    assert_eq!(
        http(&env, "GET", "/v1/machines", std::slice::from_ref(&vcookie), None).code,
        401
    );

    step("failed log-ins are slowed down per user and per address");
    for _ in 0..6 {
        http(
            &env,
            "POST",
            "/v1/login",
            &[],
            Some(r#"{"username":"alice","password":"wrong-wrong"}"#),
        );
    }
    let r = http(
        &env,
        "POST",
        "/v1/login",
        &[],
        Some(r#"{"username":"alice","password":"new-password"}"#),
    );
    assert_eq!(r.code, 429, "{}", r.body);
    assert!(
        r.body.contains("alice") && r.body.contains("try again"),
        "{}",
        r.body
    );
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "user.login", "-o", "json"])).unwrap();
    assert!(h[0]["result"].as_str().unwrap().contains("too many"), "{h}");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn web_api_events_stream_machine_changes() {
    let env = Env::new("swebev");
    let mut ev = std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(&env.socket)
        .args(["events", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = ev.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&l)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    // Subscribed once a change shows up.
    poll("the event stream", Duration::from_secs(10), || {
        env.cli_ok(&["network", "create", &format!("swebp{}", rand_suffix())]);
        rx.recv_timeout(Duration::from_millis(300)).ok()
    });
    env.machine("web", &[]);
    let wait = |what: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) if f(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("no event: {what}"),
            }
        }
    };
    wait("web running", &|v| {
        v["type"] == "machine" && v["machine"]["status"] == "running"
    });
    let t = std::time::Instant::now();
    env.cli_ok(&["machine", "expose", "web", "--port", "8080:80"]);
    // The machine's event comes from a watcher task, the audit entry's at once: either first.
    let (mut machine, mut audit) = (false, false);
    while !(machine && audit) {
        let v = wait("the expose and its audit entry", &|v| {
            (v["type"] == "machine" && v["machine"]["ports"][0]["spec"].as_str() == Some("8080:80/tcp"))
                || (v["type"] == "change" && v["entry"]["action"] == "machine.expose")
        });
        if v["type"] == "machine" {
            eprintln!("expose → event: {:?}", t.elapsed());
            machine = true;
        } else {
            audit = true;
        }
    }
    env.cli_ok(&["machine", "stop", "web"]);
    wait("web stopped", &|v| {
        v["type"] == "machine" && v["machine"]["status"] == "stopped"
    });
    env.cli_ok(&["machine", "delete", "web", "-y"]);
    wait("web removed", &|v| {
        v["type"] == "machine_removed" && v["name"] == "web"
    });
    let _ = ev.kill();
    let _ = ev.wait();
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn web_api_tls_off_loopback_fingerprint_and_idle_connections() {
    let mut env = Env::new("swebtls");
    step("plain HTTP off loopback is a config error naming the address");
    env.kill_daemon("-TERM");
    env.write_config(&format!("listen: [\"http://{HOST_LAN}:7443\"]\n"));
    let out = env.start_daemon_expecting_refusal(Duration::from_secs(20));
    assert!(
        out.contains(&format!("http://{HOST_LAN}:7443")) && out.contains(&format!("https://{HOST_LAN}:7443")),
        "{out}"
    );
    step("an address off loopback gets TLS with a generated certificate");
    env.write_config(&format!("listen: [\"{HOST_LAN}:7443\", \"127.0.0.1:7777\"]\n"));
    env.start_daemon();
    let key = env.dir.join("data/tls/key.pem");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let url = format!("https://{HOST_LAN}:7443");
    let r = http_in(&env.client, "GET", &format!("{url}/v1/machines"), &[], None, true);
    assert_eq!(r.code, 401, "TLS answers, and wants credentials: {}", r.body);
    let plain = http_in(
        &env.client,
        "GET",
        &format!("http://{HOST_LAN}:7443/health"),
        &[],
        None,
        false,
    );
    assert_ne!(plain.code, 200, "no plain HTTP on the TLS listener");
    step("the fingerprint: in the log, in `sistemo config`, and the certificate served");
    let served = run(&[
        "ip",
        "netns",
        "exec",
        &env.client,
        "sh",
        "-c",
        &format!(
            "openssl s_client -connect {HOST_LAN}:7443 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ),
    ]);
    let served = String::from_utf8_lossy(&served.stdout);
    let fp = served.trim().rsplit('=').next().unwrap().to_string();
    assert_eq!(fp.len(), 95, "{served}");
    assert!(env.log().contains(&format!("fingerprint: {fp}")), "{}", env.log());
    let cfg = env.cli_ok(&["config", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(v["tls_fingerprint"], fp.as_str());
    step("kept across restarts");
    env.kill_daemon("-TERM");
    env.start_daemon();
    let again = run(&[
        "ip",
        "netns",
        "exec",
        &env.client,
        "sh",
        "-c",
        &format!(
            "openssl s_client -connect {HOST_LAN}:7443 </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ),
    ]);
    assert!(String::from_utf8_lossy(&again.stdout).contains(&fp));
    step("a token works over TLS; cookies are Secure there");
    add_user(&env, "tina", "admin", "tina-password");
    let r = http_in(
        &env.client,
        "POST",
        &format!("{url}/v1/login"),
        &[],
        Some(r#"{"username":"tina","password":"tina-password"}"#),
        true,
    );
    assert_eq!(r.code, 200, "{}", r.body);
    assert!(r.headers.contains("; secure"), "{}", r.headers);
    step("2,000 idle connections to the TLS listener do not stop the Unix socket");
    let holder = hold_connections(&env.client, HOST_LAN, 7443, 2000);
    let t = std::time::Instant::now();
    env.cli_ok(&["machine", "list"]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the socket answered in {:?}",
        t.elapsed()
    );
    drop(holder);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn web_api_socket_group_members_use_the_cli_without_sudo() {
    // The group `service install` creates; made here when missing and removed again.
    struct Group(bool);
    impl Drop for Group {
        fn drop(&mut self) {
            if self.0 {
                let _ = run(&["groupdel", "sistemo"]);
            }
        }
    }
    let made = run(&["getent", "group", "sistemo"]).stdout.is_empty();
    if made {
        ok(&["groupadd", "--system", "sistemo"]);
    }
    let _g = Group(made);
    let env = Env::new("swebgrp");
    let meta = std::fs::metadata(&env.socket).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let gid = String::from_utf8_lossy(&run(&["getent", "group", "sistemo"]).stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse::<u32>()
        .unwrap();
    assert_eq!(meta.gid(), gid);
    let as_nobody = |groups: &str| {
        let mut a = vec!["setpriv", "--reuid=nobody", "--regid=nogroup"];
        a.push(groups);
        a.extend([
            env!("CARGO_BIN_EXE_sistemo"),
            "--socket",
            env.socket.to_str().unwrap(),
        ]);
        a.extend(["network", "create", "swebgrp"]);
        run(&a)
    };
    step("outside the group: refused by the socket's mode");
    let o = as_nobody("--clear-groups");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ermission denied"),
        "{o:?}"
    );
    step("a member: works, and the audit log names the account");
    let o = as_nobody("--groups=sistemo");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "network.create", "-o", "json"])).unwrap();
    assert_eq!(h[0]["actor"], "local nobody", "{h}");
}
