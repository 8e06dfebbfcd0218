//! The CLI's usual commands over `--host https://…` with a token print what they print over the
//! Unix socket: machine list, deploy (netns backend), expose, exec, logs and logs -f, history,
//! and every volume command. Reads run both ways and must match byte for byte; changes made
//! over TLS must print what the socket shows of their result.

mod common;
use common::remote::{DEFAULT_COMMANDS, LISTEN};
use common::*;
use std::io::BufRead as _;
use std::process::Stdio;
use std::time::Duration;

fn out(o: &std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn cli_over_tls_prints_what_the_socket_prints() {
    let mut env = Env::with_config("hr2cli", LISTEN);
    env.go_remote(DEFAULT_COMMANDS);
    let st = |n: &str| env.cli_socket_ok(&["machine", "status", n]);

    step("deploy over TLS shows the machine as the socket does");
    let d = out(
        &env.cli(&["machine", "deploy", "debian", "--name", "web"]),
        "deploy",
    );
    assert_eq!(d, st("web"));
    let d = out(
        &env.cli(&["machine", "deploy", "debian", "--name", "api", "-o", "json"]),
        "deploy -o json",
    );
    assert_eq!(d, env.cli_socket_ok(&["machine", "status", "api", "-o", "json"]));

    step("list and status, table and JSON");
    for args in [
        &["machine", "list"][..],
        &["machine", "ls", "-o", "json"],
        &["machine", "status", "web", "-o", "json"],
        &["machine", "status", "nope"],
    ] {
        env.cli_both(args);
    }

    step("expose and unexpose over TLS; the port works");
    let e = out(
        &env.cli(&[
            "machine",
            "expose",
            "web",
            "--port",
            "8080:80",
            "--port",
            "5353:53/udp",
        ]),
        "expose",
    );
    assert_eq!(e, st("web"));
    assert!(e.contains("host:8080 → machine:80 (tcp)"), "{e}");
    env.serve_tcp("web", 80, "web");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    let u = out(
        &env.cli(&["machine", "unexpose", "web", "--port", "5353/udp"]),
        "unexpose",
    );
    assert_eq!(u, st("web"));
    let bad = env.cli_both(&["machine", "expose", "web", "--port", "70000"]);
    assert_eq!(bad.status.code(), Some(2));

    step("exec: output, stderr, exit code, JSON");
    let o = env.cli_both(&["machine", "exec", "web", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(o.stdout, b"out\n");
    env.cli_both(&["machine", "exec", "-o", "json", "web", "printf 'a\\nb'"]);
    env.cli_both(&["machine", "exec", "nope", "true"]);

    step("logs, and logs -f follows over TLS");
    let v: serde_json::Value =
        serde_json::from_str(&env.cli_socket_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    let log = env
        .dir
        .join("data/machines")
        .join(v["id"].as_str().unwrap())
        .join("console.log");
    std::fs::write(&log, b"boot \x1b[31mred\x1b[0m line\n").unwrap();
    let o = env.cli_both(&["machine", "logs", "web"]);
    assert_eq!(o.stdout, b"boot red line\n");
    env.cli_both(&["machine", "logs", "web", "--raw"]);
    let r = env.remote.clone().unwrap();
    let mut follow = r
        .command(&env, &["machine", "logs", "-f", "web"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "boot red line");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"later line\n").unwrap();
    let later = rx.recv_timeout(Duration::from_secs(10));
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(later.unwrap(), "later line");

    step("volumes: create, list, show, snapshot, clone, attach, detach, resize, delete");
    let c = out(
        &env.cli(&["volume", "create", "64M", "--name", "data", "-o", "json"]),
        "volume create",
    );
    assert_eq!(c, env.cli_socket_ok(&["volume", "show", "data", "-o", "json"]));
    out(&env.cli(&["volume", "snapshot", "data", "data-s1"]), "snapshot");
    out(&env.cli(&["volume", "clone", "data-s1", "data-c1"]), "clone");
    env.cli_socket_ok(&["machine", "stop", "api"]);
    out(
        &env.cli(&["machine", "volume", "attach", "api", "data", "--mount", "/data"]),
        "attach",
    );
    for args in [
        &["volume", "list"][..],
        &["volume", "ls", "-o", "json"],
        &["volume", "show", "data"],
        &["volume", "info", "data-s1", "-o", "json"],
        &["machine", "volume", "list", "api"],
        &["volume", "show", "nope"],
    ] {
        env.cli_both(args);
    }
    let e = env.cli(&["volume", "delete", "data", "-y"]);
    assert!(!e.status.success());
    let e = String::from_utf8_lossy(&e.stderr);
    assert!(e.contains("attached") && e.contains("api"), "{e}");
    out(
        &env.cli(&["machine", "volume", "detach", "api", "data"]),
        "detach",
    );
    out(&env.cli(&["volume", "resize", "data", "128M"]), "resize");
    out(&env.cli(&["volume", "delete", "data-c1", "-y"]), "delete");
    env.cli_both(&["volume", "list", "-o", "json"]);

    step("history: the same pages, naming the token");
    env.cli_both(&["history", "--limit", "100", "-o", "json"]);
    env.cli_both(&["history", "--action", "volume.create"]);
    let h: serde_json::Value =
        serde_json::from_str(&env.cli_socket_ok(&["history", "--action", "machine.deploy", "-o", "json"]))
            .unwrap();
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == "token remote-cli"),
        "{h}"
    );
}
