//! Helpers of the web API tests: HTTP requests with curl inside the test's namespace, users
//! made with the real CLI, session cookies.

use super::Env;
use std::process::{Command, Output, Stdio};

/// An HTTP answer.
pub struct Resp {
    /// Status code (0 when the connection failed).
    pub code: u16,
    /// Response headers, lowercase names.
    pub headers: String,
    /// Body.
    pub body: String,
}

impl Resp {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The session cookie it sets (`sistemo_session=…`), if any.
    pub fn cookie(&self) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let v = l.strip_prefix("set-cookie: ")?;
            Some(v.split(';').next()?.trim().to_string())
        })
    }
}

/// A request from namespace `ns` to `url` with extra `headers` (`Name: value`) and a JSON
/// `body`; `-k` when `insecure`.
pub fn http_in(
    ns: &str,
    method: &str,
    url: &str,
    headers: &[String],
    body: Option<&str>,
    insecure: bool,
) -> Resp {
    let hfile = std::env::temp_dir().join(format!("sweb-h-{}-{}", std::process::id(), uuid_like()));
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-X",
        method,
        "-D",
    ])
    .arg(&hfile)
    .args(["-w", "\n%{http_code}", url]);
    if insecure {
        c.arg("-k");
    }
    for h in headers {
        c.args(["-H", h]);
    }
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
    let headers = std::fs::read_to_string(&hfile)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let _ = std::fs::remove_file(&hfile);
    Resp {
        code: code.trim().parse().unwrap_or(0),
        headers,
        body: body.to_string(),
    }
}

fn uuid_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// A request to the env's default listener (`http://127.0.0.1:7777`) from its host namespace.
pub fn http(env: &Env, method: &str, path: &str, headers: &[String], body: Option<&str>) -> Resp {
    http_in(
        &env.ns,
        method,
        &format!("http://127.0.0.1:7777{path}"),
        headers,
        body,
        false,
    )
}

/// Run the CLI with `input` on its standard input.
pub fn cli_stdin(env: &Env, args: &[&str], input: &str) -> Output {
    let mut c = env
        .cli_command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    c.wait_with_output().unwrap()
}

/// Add a user with the CLI (`--password-stdin`).
pub fn add_user(env: &Env, name: &str, role: &str, password: &str) {
    let o = cli_stdin(
        env,
        &["user", "add", name, "--role", role, "--password-stdin"],
        &format!("{password}\n"),
    );
    assert!(
        o.status.success(),
        "user add: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Log in; the cookie header and the CSRF token.
pub fn login(env: &Env, user: &str, password: &str) -> (String, String) {
    let r = http(
        env,
        "POST",
        "/v1/login",
        &[],
        Some(&serde_json::json!({"username": user, "password": password}).to_string()),
    );
    assert_eq!(r.code, 200, "login {user}: {}", r.body);
    let cookie = r.cookie().expect("a session cookie");
    (
        format!("Cookie: {cookie}"),
        r.json()["csrf"].as_str().unwrap().to_string(),
    )
}

/// Create an API token with the CLI; its secret.
pub fn token(env: &Env, name: &str, extra: &[&str]) -> String {
    let mut a = vec!["token", "create", name];
    a.extend(extra);
    env.cli_ok(&a).trim().to_string()
}

/// Run scenario `mode` of the browser script `tests/browser/SCRIPT` (playwright-core driving
/// Debian's headless Chromium) in the env's namespace against the dashboard at `url`, logged in
/// as `user`; its output, which must say `PASS MODE`. Screenshots land in target/screenshots.
pub fn browser_scenario(env: &Env, script: &str, url: &str, mode: &str, user: &str, pass: &str) -> String {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed in {}: run scripts/deps (npm ci there)",
        dir.display()
    );
    let shots = root.join("target/screenshots");
    let o = Command::new("ip")
        .args(["netns", "exec", &env.ns, "node"])
        .arg(dir.join(script))
        .env("URL", url)
        .env("MODE", mode)
        .env("USER", user)
        .env("PASS", pass)
        .env("SHOTS", &shots)
        .env("SISTEMO", env!("CARGO_BIN_EXE_sistemo"))
        .env("SOCKET", &env.socket)
        .env("DATA", env.dir.join("data"))
        .current_dir(&dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{out}{err}");
    assert!(
        o.status.success() && out.contains(&format!("PASS {mode}")),
        "{script}: the {mode} scenario failed (its failure screenshot is in {}): {out}{err}",
        shots.display()
    );
    out
}
