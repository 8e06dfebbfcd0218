//! CLI contract: the real binary against a real daemon. JSON schemas, exit codes, prompts,
//! aliases, doctor, history.

mod common;
use common::*;
use serde_json::Value;

fn json(env: &Env, args: &[&str]) -> Value {
    let out = env.cli_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {out:?}"))
}

fn has(v: &Value, fields: &[&str]) {
    for f in fields {
        assert!(v.get(f).is_some(), "missing field {f} in {v}");
    }
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn json_outputs_parse_and_have_documented_fields() {
    let env = Env::new("json");
    env.machine(
        "web",
        &["--expose", "8080:80", "--expose", "127.0.0.1:5353:53/udp"],
    );
    let ms = json(&env, &["machine", "list", "-o", "json"]);
    assert_eq!(ms.as_array().unwrap().len(), 1);
    let m = &ms[0];
    has(
        m,
        &[
            "id",
            "name",
            "status",
            "ip",
            "network",
            "image",
            "vcpus",
            "memory_mib",
            "storage_bytes",
            "ports",
            "created_at",
        ],
    );
    has(
        &m["ports"][0],
        &["bind", "host_port", "machine_port", "protocol", "spec", "display"],
    );
    assert_eq!(m["ports"][1]["bind"], "127.0.0.1");
    assert_eq!(m["ports"][0]["display"], "host:8080 → machine:80 (tcp)");
    let st = json(&env, &["machine", "status", "web", "-o", "json"]);
    assert_eq!(st["name"], "web");
    let ports = json(&env, &["ports", "-o", "json"]);
    has(
        &ports[0],
        &[
            "machine",
            "state",
            "bind",
            "host_port",
            "machine_port",
            "protocol",
        ],
    );
    let nets = json(&env, &["network", "list", "-o", "json"]);
    has(&nets[0], &["name", "bridge", "subnet", "gateway", "machines"]);
    let h = json(&env, &["history", "-o", "json"]);
    has(&h[0], &["at", "uid", "action", "target", "result"]);
    let d = json(&env, &["doctor", "-o", "json"]);
    has(&d, &["ok", "checks"]);
    has(&d["checks"][0], &["name", "ok", "detail", "fix"]);
    let c = json(&env, &["config", "-o", "json"]);
    assert_eq!(c["nft_table"], env.table.as_str());
    // deploy's JSON result is the machine
    let o = env.cli(&["machine", "deploy", "debian", "--name", "api", "-o", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("deploy -o json");
    assert_eq!(v["ip"], "10.200.0.3");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn exit_codes_prompts_and_aliases() {
    let env = Env::new("exit");
    env.machine("web", &["--expose", "8080:80"]);
    // 0, 1, 2
    step("exit codes");
    assert_eq!(env.cli(&["machine", "list"]).status.code(), Some(0));
    // Sistemo's spellings: -v, machine info, machine remove|destroy, ssh-key; status shows
    // the machine's image, network, size and creation after the page's block
    let st = env.cli_ok(&["machine", "status", "web"]);
    for line in [
        "Image:    debian",
        "Network:  default",
        "vCPUs:    1",
        "Memory:   512M",
    ] {
        assert!(st.lines().any(|l| l == line), "missing {line:?} in\n{st}");
    }
    assert!(
        env.cli_err(&["ssh-key"]).contains("no SSH key"),
        "the netns backend has none"
    );
    assert!(String::from_utf8_lossy(&env.cli(&["-v"]).stdout).starts_with("sistemo "));
    assert_eq!(env.cli(&["machine", "status", "nope"]).status.code(), Some(1));
    assert_eq!(env.cli(&["machine", "frobnicate"]).status.code(), Some(2));
    assert_eq!(env.cli(&["machine", "deploy"]).status.code(), Some(2));
    // errors are one line naming the value
    assert!(env.cli_err(&["machine", "status", "nope"]).contains("\"nope\""));
    // destructive commands refuse without a terminal and without -y, and change nothing
    step("delete prompt");
    let e = env.cli_err(&["machine", "delete", "web"]);
    assert!(e.contains("-y"), "{e}");
    assert!(env.cli_ok(&["machine", "list"]).contains("web"));
    // exec: streams stdout and stderr apart, exits with the command's code
    step("exec");
    let o = env.cli(&["machine", "exec", "web", "echo out; echo err >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    // several words are quoted, not re-split by the shell
    let o = env.cli(&["machine", "exec", "web", "printf", "%s|", "a b", "c"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "a b|c|");
    // a trailing & leaves the process running without hanging exec
    let t = std::time::Instant::now();
    env.cli_ok(&["machine", "exec", "web", "sleep 30 &"]);
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    // aliases
    step("aliases");
    assert_eq!(env.cli_ok(&["vm", "ls"]), env.cli_ok(&["machine", "list"]));
    assert_eq!(
        env.cli_ok(&["vm", "show", "web"]),
        env.cli_ok(&["machine", "status", "web"])
    );
    assert_eq!(
        env.cli_ok(&["machine", "info", "web"]),
        env.cli_ok(&["machine", "status", "web"])
    );
    for alias in ["remove", "destroy"] {
        env.machine(alias, &[]);
        env.cli_ok(&["machine", alias, alias, "-y"]);
        assert!(
            env.cli_err(&["machine", "status", alias])
                .contains("does not exist")
        );
    }
    let id = json(&env, &["machine", "status", "web", "-o", "json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        env.cli_ok(&["machine", "status", &id]),
        env.cli_ok(&["machine", "status", "web"]),
        "UUID names a machine too"
    );
    env.cli_ok(&["vm", "rm", &id, "-y"]);
    assert_eq!(env.cli_ok(&["machine", "ls", "-o", "json"]).trim(), "[]");
    // the audit log recorded who did what
    step("history");
    let h = json(&env, &["history", "--action", "machine.delete", "-o", "json"]);
    let next = json(
        &env,
        &[
            "history",
            "--action",
            "machine.delete",
            "--offset",
            "1",
            "-o",
            "json",
        ],
    );
    assert_eq!(next[0], h[1], "--offset 1 starts at the second newest");
    if env.remote.is_some() {
        // Over TLS (SISTEMO_TEST_REMOTE=1) the caller is the harness's token, from an address.
        assert_eq!(h[0]["actor"], "token remote-cli", "{}", h[0]);
        assert!(
            h[0]["remote"]
                .as_str()
                .is_some_and(|r| r.starts_with("127.0.0.1:")),
            "{}",
            h[0]
        );
    } else {
        assert_eq!(h[0]["uid"], 0);
    }
    assert_eq!(h[0]["result"], "ok");
    // the daemon not running: say how to start it
    step("daemon not running");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .args(["--socket", "/nonexistent/sistemo.sock", "machine", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sudo sistemo up"));
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn doctor_fails_with_a_fix_without_nftables_and_passes_on_a_good_setup() {
    let env = Env::new("doc");
    let o = env.cli(&["doctor"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "doctor failed on a good setup:\n{out}");
    assert!(out.contains("in sync"), "{out}");
    // nftables missing: simulate with a PATH that has no nft
    let dir = env.dir.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .args(["--socket", env.socket.to_str().unwrap(), "doctor", "-o", "json"])
        .env("PATH", &dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let nft = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "nftables")
        .unwrap();
    assert_eq!(nft["ok"], false);
    assert_eq!(nft["fix"], "apt-get install nftables");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn completion_offers_machine_names_from_the_daemon() {
    let env = Env::new("comp");
    env.machine("web", &[]);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .args(["--", "sistemo", "machine", "status", ""])
        .env("COMPLETE", "fish")
        .env("SISTEMO_SOCKET", &env.socket)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("web"))
    );
    for sh in ["bash", "zsh", "fish"] {
        assert!(!env.cli_ok(&["completion", sh]).is_empty());
    }
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn tcp_api_is_opt_in_and_needs_the_token() {
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    let mut env = Env::new("tcp");
    env.machine("web", &[]);
    let cfg = env.dir.join("config.yml");
    // This test sets the TCP listener itself (a remote run's own listener gives way).
    env.remote = None;
    let mut text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(common::remote::LISTEN, "");
    text.push_str(&format!("port: 7443\ntoken: {TOKEN}\n"));
    std::fs::write(&cfg, text).unwrap();
    // step: a token file others can read is refused, naming the mode
    env.kill_daemon("-TERM");
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = env.try_start_daemon();
    assert!(e.contains("readable by others") && e.contains("644"), "{e}");
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    env.kill_daemon("-TERM");
    env.start_daemon();
    let code = |auth: &str| {
        let o = env.sh(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' {auth} http://127.0.0.1:7443/v1/machines"
        ));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(code(""), "401");
    // the probes answer without a token (as Sistemo's)
    for probe in ["health", "ready"] {
        let o = env.sh(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:7443/{probe}"
        ));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "200", "/{probe}");
    }
    assert_eq!(code("-H 'Authorization: Bearer wrong'"), "401");
    assert_eq!(code(&format!("-H 'Authorization: Bearer {TOKEN}'")), "200");
    // step: 2,000 idle TCP connections starve neither the daemon nor its Unix socket
    let holder = hold_connections(&env.ns, "127.0.0.1", 7443, 2000);
    let t = std::time::Instant::now();
    env.cli_ok(&["machine", "list"]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "the socket answered in {:?}",
        t.elapsed()
    );
    drop(holder);
    // step: a client that never finishes its headers is cut off (no slow-loris)
    let t = std::time::Instant::now();
    let o = env.sh(
        "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',7443)); \
         s.sendall(b'GET /v1/machines HTTP/1.1\\r\\nHost: x\\r\\n'); s.settimeout(30); \
         print(len(s.recv(100)))\"",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(25),
        "the half-sent request was cut after {:?}",
        t.elapsed()
    );
    // step: a client that stops in the middle of its body is answered and cut off too
    let t = std::time::Instant::now();
    let o = env.sh(&format!(
        "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',7443)); \
         s.sendall(b'POST /v1/networks HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer {TOKEN}\\r\\n\
         Content-Type: application/json\\r\\nContent-Length: 100\\r\\n\\r\\n{{\\\"name\\\"'); \
         s.settimeout(30); print(s.recv(100).decode().split(chr(13))[0])\""
    ));
    let reply = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && reply.starts_with("HTTP/1.1 4"),
        "{reply} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(25),
        "the half-sent body was cut after {:?}",
        t.elapsed()
    );
    // the history names the TCP caller's address
    let o = env.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {TOKEN}' \
         -H 'content-type: application/json' -d '{{\"name\":\"tcpnet\"}}' http://127.0.0.1:7443/v1/networks"
    ));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "200");
    let h: Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "network", "-o", "json"])).unwrap();
    assert!(
        h[0]["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:"))
            && h[0]["uid"].is_null(),
        "{h}"
    );
    // the daemon's own port cannot be exposed
    let e = env.cli_err(&["machine", "expose", "web", "--port", "7443:80"]);
    assert!(e.contains("7443") && e.contains("API"), "{e}");
}
