//! The dashboard in a real headless Chromium (Debian's, driven by playwright-core from
//! tests/browser, installed by scripts/deps), browser and daemon inside the test's network
//! namespace. Machines use the `netns` backend (a namespace running real servers), so a deploy
//! takes a second. Screenshots of every page land in target/screenshots.

mod common;
use common::web::*;
use common::*;
use std::time::Duration;

/// Run one scenario of tests/browser/dashboard.mjs in the env's namespace; its output.
fn scenario(env: &Env, mode: &str, user: &str, pass: &str) -> String {
    scenario_at(env, "http://127.0.0.1:7777/", mode, user, pass)
}

/// [`scenario`] with the dashboard at `url` (an https one is the env's self-signed listener).
fn scenario_at(env: &Env, url: &str, mode: &str, user: &str, pass: &str) -> String {
    browser_scenario(env, "dashboard.mjs", url, mode, user, pass)
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn dashboard_in_headless_chromium() {
    let env = Env::new("swebui");
    add_user(&env, "ada", "admin", "ada-password");
    add_user(&env, "val", "viewer", "val-password");

    step("admin: log in, deploy, expose through the form, live updates, every page, log out");
    let out = scenario(&env, "admin", "ada", "ada-password");
    let m: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    assert_eq!(m["status"], "running");
    assert!(
        m["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["spec"] == "8080:80/tcp"),
        "{m}"
    );
    if let Some(ms) = out.lines().find_map(|l| l.strip_prefix("event_latency_ms ")) {
        println!("RESULT event_latency_ms={ms}");
    }

    step("the port exposed in the browser answers curl inside the namespace");
    env.serve_tcp("web", 80, "hello-from-web");
    let body = poll("curl to the exposed port", Duration::from_secs(10), || {
        let o = env.sh("curl -s --http0.9 --max-time 2 http://127.0.0.1:8080/");
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.starts_with("hello-from-web").then_some(s)
    });
    assert!(body.starts_with("hello-from-web"), "{body}");

    step("the audit log names the browser's user");
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "machine.expose", "-o", "json"])).unwrap();
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "user ada" && e["target"] == "web 8080:80"),
        "{h}"
    );

    step("viewer: no mutating control, 403 from the API, log out");
    scenario(&env, "viewer", "val", "val-password");
    let m: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    assert_eq!(m["status"], "running", "the viewer changed nothing");
}

/// A WebSocket handshake to the terminal route with `headers`; the HTTP status.
fn terminal_handshake(env: &Env, headers: &[String]) -> Resp {
    let mut h = vec![
        "Connection: Upgrade".to_string(),
        "Upgrade: websocket".into(),
        "Sec-WebSocket-Version: 13".into(),
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".into(),
    ];
    h.extend(headers.iter().cloned());
    // A handshake that succeeds stays open: curl gives up after its --max-time.
    http_in(
        &env.ns,
        "GET",
        "http://127.0.0.1:7777/v1/machines/web/terminal?rows=30&cols=100",
        &h,
        None,
        false,
    )
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn terminal_in_headless_chromium_admins_only_same_origin() {
    let env = Env::with_config(
        "sterm",
        "listen: [\"127.0.0.1:7777\", \"https://127.0.0.1:7443\"]\n",
    );
    add_user(&env, "ada", "admin", "ada-password");
    add_user(&env, "val", "viewer", "val-password");
    env.machine("web", &[]);

    step("the handshake: admins, from the dashboard's own origin only");
    let (admin, _) = login(&env, "ada", "ada-password");
    let (viewer, _) = login(&env, "val", "val-password");
    let own = "Origin: http://127.0.0.1:7777".to_string();
    let r = terminal_handshake(&env, &[]);
    assert_eq!(r.code, 401, "no credentials: {}", r.body);
    let r = terminal_handshake(&env, &[viewer.clone(), own.clone()]);
    assert_eq!(r.code, 403, "a viewer: {}", r.body);
    assert!(r.body.contains("admins"), "{}", r.body);
    let r = terminal_handshake(&env, &[admin.clone(), "Origin: http://evil.example".into()]);
    assert_eq!(r.code, 403, "another origin: {}", r.body);
    assert!(r.body.contains("evil.example"), "{}", r.body);
    let r = terminal_handshake(&env, std::slice::from_ref(&admin));
    assert_eq!(r.code, 403, "a browser session without Origin: {}", r.body);
    let r = terminal_handshake(&env, &[admin.clone(), own.clone()]);
    assert_eq!(r.code, 101, "the dashboard's own origin: {}", r.body);
    let token = token(&env, "ci", &[]);
    let r = terminal_handshake(&env, &[format!("Authorization: Bearer {token}")]);
    assert_eq!(r.code, 101, "an admin token (no browser, no Origin): {}", r.body);
    let r = http(
        &env,
        "GET",
        "/v1/machines/web/terminal?rows=0",
        &[admin.clone(), own.clone()],
        None,
    );
    assert_eq!(r.code, 400, "{}", r.body);
    step("a stopped machine is an HTTP error, not a dead socket");
    env.cli_ok(&["machine", "stop", "web"]);
    let r = terminal_handshake(&env, &[admin.clone(), own.clone()]);
    assert_eq!(r.code, 409, "{}", r.body);
    env.cli_ok(&["machine", "start", "web"]);
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "machine.terminal", "-o", "json"]))
            .unwrap();
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "user ada" && e["target"] == "web" && e["result"] == "ok"),
        "{h}"
    );

    step("admin: the terminal in the browser, over TLS (wss, Secure cookie)");
    scenario_at(&env, "https://127.0.0.1:7443/", "terminal", "ada", "ada-password");
    step("viewer: no terminal");
    scenario(&env, "viewer", "val", "val-password");
}
