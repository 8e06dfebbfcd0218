//! The CLI against a remote daemon (`--host https://…`, `SISTEMO_TOKEN`): the certificate
//! pinned by fingerprint (given, or trusted on first use on a terminal and kept in the user's
//! known hosts), a changed or unknown certificate refused, and the usual commands (deploy,
//! list, status, expose, exec with stdin, cp both ways, delete) working as over the socket.

mod common;
use common::web::token;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const URL: &str = "https://127.0.0.1:7443";

/// The CLI in the env's namespace against `URL`, as a user whose home is `home`.
fn remote(
    env: &Env,
    home: &Path,
    token: &str,
    extra_env: &[(&str, &str)],
    args: &[&str],
    stdin: &[u8],
) -> Output {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &env.ns,
        env!("CARGO_BIN_EXE_sistemo"),
        "--host",
        URL,
    ])
    .args(args)
    .env("HOME", home)
    .env_remove("XDG_CONFIG_HOME")
    .env_remove("SISTEMO_SOCKET")
    .env_remove("SISTEMO_FINGERPRINT")
    .env("SISTEMO_TOKEN", token)
    .envs(extra_env.iter().copied())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn ok_out(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err_line(o: &Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} unexpectedly succeeded");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(e.lines().count(), 1, "{what}: one line: {e:?}");
    e
}

fn fingerprint(env: &Env) -> String {
    let c: Value = serde_json::from_str(&env.cli_ok(&["config", "-o", "json"])).unwrap();
    c["tls_fingerprint"]
        .as_str()
        .expect("a TLS fingerprint")
        .to_string()
}

fn home(env: &Env, name: &str) -> PathBuf {
    let h = env.dir.join(name);
    std::fs::create_dir_all(&h).unwrap();
    h
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn remote_cli_pins_the_certificate_and_runs_the_usual_commands() {
    let mut env = Env::with_config(
        "stermr",
        "listen: [\"127.0.0.1:7777\", \"https://127.0.0.1:7443\"]\n",
    );
    let admin = token(&env, "ci", &[]);
    let viewer = token(&env, "look", &["--role", "viewer"]);
    let fp = fingerprint(&env);
    let pinned = [("SISTEMO_FINGERPRINT", fp.as_str())];

    step("an unknown certificate without a terminal is refused, naming the fingerprint");
    let h = home(&env, "home-a");
    let o = remote(&env, &h, &admin, &[], &["machine", "list"], b"");
    let e = err_line(&o, "an unknown certificate");
    assert!(
        e.contains("not known") && e.contains(&fp) && e.contains("--fingerprint"),
        "{e}"
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(!h.join(".config/sistemo/known_hosts").exists(), "nothing pinned");

    step("bad values: exit 2, one line naming them");
    let o = remote(
        &env,
        &h,
        &admin,
        &[],
        &["--fingerprint", "AB:CD", "machine", "list"],
        b"",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o, "a short fingerprint").contains("\"AB:CD\""));
    let o = Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .args(["--host", "http://10.1.2.3:7777", "machine", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o, "plain HTTP off loopback").contains("in clear"));
    let o = remote(
        &env,
        &h,
        &admin,
        &pinned,
        &["machine", "deploy", "img/x.ext4"],
        b"",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o, "a relative image path").contains("\"img/x.ext4\""));
    let o = remote(&env, &h, &admin, &pinned, &["machine", "ssh", "web"], b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o, "ssh from another host").contains("machine shell"));
    let o = remote(&env, &h, "", &pinned, &["machine", "list"], b"");
    assert!(err_line(&o, "no token").contains("SISTEMO_TOKEN"));

    step("with the fingerprint: deploy, list, status, expose, exec -i, cp, delete");
    let run = |args: &[&str], stdin: &[u8]| remote(&env, &h, &admin, &pinned, args, stdin);
    let out = ok_out(
        &run(
            &["machine", "deploy", "debian", "--name", "web", "-o", "json"],
            b"",
        ),
        "deploy",
    );
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["status"], "running", "{m}");
    assert_eq!(
        ok_out(&run(&["machine", "list", "-o", "json"], b""), "list"),
        env.cli_ok(&["machine", "list", "-o", "json"]),
        "the same answer as over the socket"
    );
    ok_out(
        &run(&["machine", "expose", "web", "--port", "8080:80"], b""),
        "expose",
    );
    let st = ok_out(&run(&["machine", "status", "web"], b""), "status");
    assert!(st.contains("host:8080 → machine:80 (tcp)"), "{st}");
    let o = run(
        &["machine", "exec", "-i", "web", "tr a-z A-Z; exit 3"],
        b"hello remote\n",
    );
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "HELLO REMOTE\n");
    let o = run(&["machine", "exec", "web", "echo out; echo err >&2"], b"");
    assert_eq!(
        (o.stdout.as_slice(), o.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    // Many chunks in one answer (each a read of the stream): the socket and TLS alike.
    let many = ["machine", "exec", "-o", "json", "web", "seq 1 1000000"];
    for o in [run(&many, b""), env.cli(&many)] {
        let out = ok_out(&o, "a long exec -o json");
        assert!(
            out.contains("\\n999999\\n1000000\\n"),
            "{}",
            &out[out.len().saturating_sub(200)..]
        );
    }
    let src = env.dir.join("cp-src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(src.join("d/blob"), &blob).unwrap();
    let guest = env.dir.join("cp-guest");
    std::fs::create_dir_all(&guest).unwrap();
    let to = format!("web:{}", guest.display());
    ok_out(&run(&["machine", "cp", src.to_str().unwrap(), &to], b""), "cp up");
    assert_eq!(std::fs::read(guest.join("cp-src/d/blob")).unwrap(), blob);
    let back = env.dir.join("cp-back");
    std::fs::create_dir_all(&back).unwrap();
    let from = format!("web:{}", guest.join("cp-src").display());
    ok_out(
        &run(&["machine", "cp", &from, back.to_str().unwrap()], b""),
        "cp down",
    );
    assert_eq!(std::fs::read(back.join("cp-src/d/blob")).unwrap(), blob);
    step("a terminal session (machine shell) and exec -t over TLS");
    let on_tty = |args: &str, input: &str| {
        let cmd = format!(
            "ip netns exec {} {} --host {URL} {args}",
            env.ns,
            env!("CARGO_BIN_EXE_sistemo")
        );
        let mut c = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("HOME", &h)
            .env("SISTEMO_FINGERPRINT", &fp)
            .env("SISTEMO_TOKEN", &admin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let o = on_tty("machine shell web", "echo sistemo-$((6*7)); tty; exit 5\n");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("sistemo-42") && text.contains("/dev/pts/"),
        "{text}"
    );
    assert_eq!(o.status.code(), Some(5), "{text}");
    let o = on_tty("machine exec -t web 'test -t 0 && echo on-a-tty'", "");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success() && text.contains("on-a-tty"), "{text}");

    step("events and logs stream over TLS");
    let mut events = Command::new("ip")
        .args([
            "netns",
            "exec",
            &env.ns,
            env!("CARGO_BIN_EXE_sistemo"),
            "--host",
            URL,
            "events",
            "-o",
            "json",
        ])
        .env("HOME", &h)
        .env("SISTEMO_FINGERPRINT", &fp)
        .env("SISTEMO_TOKEN", &admin)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = events.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    // Until the stream is subscribed an expose may go unseen: each try exposes a new port.
    let mut n = 0;
    let seen = poll(
        "a machine event on the remote stream",
        Duration::from_secs(20),
        || {
            n += 1;
            env.cli_ok(&["machine", "expose", "web", "--port", &format!("{}:80", 9000 + n)]);
            let spec = format!("\"{}:80/tcp\"", 9000 + n);
            let end = Instant::now() + Duration::from_millis(500);
            while let Ok(l) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                if l.contains(&spec) {
                    return Some(l);
                }
            }
            None
        },
    );
    let _ = events.kill();
    let _ = events.wait();
    assert!(seen.contains("\"web\""), "{seen}");
    ok_out(&run(&["machine", "logs", "web"], b""), "logs");

    let hist: Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "machine.expose", "-o", "json"])).unwrap();
    assert!(
        hist.as_array().unwrap().iter().any(|e| e["actor"] == "token ci"
            && e["target"] == "web 8080:80"
            && e["remote"].as_str().is_some_and(|r| r.starts_with("127.0.0.1:"))),
        "history names the token and its address: {hist}"
    );
    let c: Value = serde_json::from_str(&ok_out(&run(&["config", "-o", "json"], b""), "config")).unwrap();
    assert_eq!(
        c["tls_fingerprint"],
        fp.as_str(),
        "the remote daemon's configuration: {c}"
    );
    step("a viewer's token reads, and its changes are refused");
    let o = remote(
        &env,
        &h,
        &viewer,
        &pinned,
        &["machine", "list", "-o", "json"],
        b"",
    );
    ok_out(&o, "viewer list");
    let o = remote(&env, &h, &viewer, &pinned, &["machine", "stop", "web"], b"");
    assert!(err_line(&o, "viewer stop").contains("viewer"));
    ok_out(&run(&["machine", "delete", "web", "-y"], b""), "delete");
    assert_eq!(env.cli_ok(&["machine", "list", "-o", "json"]).trim(), "[]");

    step("trust on first use on a terminal: asked once, then remembered");
    let h2 = home(&env, "home-b");
    let tofu = |answer: &str| {
        let cmd = format!(
            "ip netns exec {} {} --host {URL} machine list -o json",
            env.ns,
            env!("CARGO_BIN_EXE_sistemo")
        );
        let mut c = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("HOME", &h2)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("SISTEMO_FINGERPRINT")
            .env("SISTEMO_TOKEN", &admin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), answer.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let o = tofu("n\n");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        !o.status.success() && text.contains(&fp) && text.contains("not trusted"),
        "{text}"
    );
    assert!(!h2.join(".config/sistemo/known_hosts").exists());
    let o = tofu("y\n");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && text.contains(&fp) && text.contains("[]"),
        "{text}"
    );
    let kh = std::fs::read_to_string(h2.join(".config/sistemo/known_hosts")).unwrap();
    assert_eq!(kh, format!("127.0.0.1:7443 {fp}\n"));
    let o = remote(&env, &h2, &admin, &[], &["machine", "list", "-o", "json"], b"");
    assert_eq!(ok_out(&o, "a pinned host without a terminal").trim(), "[]");

    step("a changed certificate is refused, by the known hosts and by --fingerprint");
    env.kill_daemon("-TERM");
    for f in ["cert.pem", "key.pem"] {
        std::fs::remove_file(env.dir.join("data/tls").join(f)).unwrap();
    }
    env.start_daemon();
    let new_fp = fingerprint(&env);
    assert_ne!(new_fp, fp, "a new certificate");
    let o = remote(&env, &h2, &admin, &[], &["machine", "list"], b"");
    let e = err_line(&o, "a changed certificate");
    assert!(
        e.contains("changed") && e.contains(&new_fp) && e.contains(&fp) && e.contains("known_hosts"),
        "{e}"
    );
    let o = remote(&env, &h, &admin, &pinned, &["machine", "list"], b"");
    let e = err_line(&o, "a changed certificate against --fingerprint");
    assert!(e.contains("changed") && e.contains("--fingerprint"), "{e}");
    let o = remote(
        &env,
        &h,
        &admin,
        &[("SISTEMO_FINGERPRINT", &new_fp)],
        &["machine", "list", "-o", "json"],
        b"",
    );
    assert_eq!(ok_out(&o, "the new fingerprint").trim(), "[]");
}
