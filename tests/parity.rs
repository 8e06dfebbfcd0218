//! Parity with Sistemo (issue 15): its `config.yml` starts our daemon with the same meaning, its
//! rate limits really limit, and where Sistemo is wrong (delete confirmation, unexpose, deploy
//! with a bad expose) we are not. The real-VM half (its README typed against our CLI, throttling
//! measured in a guest) is in `tests/vm_parity.rs`.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

fn json(env: &Env, args: &[&str]) -> Value {
    serde_json::from_str(&env.cli_ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Sistemo's README sample `config.yml`, whole: `port: 9090` serves the API and dashboard on
/// 127.0.0.1:9090 (accounts or a token to get in, as every TCP listener).
const SISTEMO_README_SAMPLE: &str = "# All settings are optional — these are example overrides, not defaults.\n\
port: 9090                      # default: 7777\n\
bridge_subnet: \"10.50.0.0/16\"  # default: 10.200.0.0/16\n\
max_vcpus: 8                    # default: 64\n\
default_bandwidth_mbps: 100     # default: 0 (unlimited)\n";

/// The host-side link of machine `name` (TAP or veth).
fn link_of(env: &Env, name: &str) -> String {
    let id = json(env, &["machine", "status", name, "-o", "json"])["id"]
        .as_str()
        .unwrap()
        .replace('-', "");
    format!("sm{}", &id[..10])
}

/// `tc qdisc show` in the daemon's namespace (every link).
fn qdiscs(env: &Env) -> String {
    String::from_utf8_lossy(&env.sh("tc qdisc show").stdout).into_owned()
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn sistemo_readme_config_starts_the_daemon_with_its_meaning() {
    let env = Env::with_config("sparcfg", SISTEMO_README_SAMPLE);
    step("the sample's values are in force");
    let c = json(&env, &["config", "-o", "json"]);
    assert_eq!(c["bridge_subnet"], "10.50.0.0/16");
    assert_eq!(c["max_vcpus"], 8);
    assert_eq!(c["default_bandwidth_mbps"], 100);
    let probe = |path: &str| {
        let o = env.sh(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:9090{path}"
        ));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(probe("/health"), "200", "port: 9090 serves the API");
    assert_eq!(
        probe("/ready"),
        "200",
        "its readiness probe needs no credentials either"
    );
    let ready = env.sh("curl -s http://127.0.0.1:9090/ready");
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ready\n");
    assert_eq!(probe("/v1/machines"), "401", "and wants credentials there");
    let ip = env.machine("web", &[]);
    assert_eq!(ip, "10.50.0.2", "machines get addresses of bridge_subnet");
    let e = env.cli_err(&["machine", "deploy", "debian", "--name", "big", "--vcpus", "9"]);
    assert!(e.contains("vcpus 9") && e.contains("1-8"), "{e}");
    step("default_bandwidth_mbps limits what the machine receives");
    let st = json(&env, &["machine", "status", "web", "-o", "json"]);
    assert_eq!(st["io"]["download_mbps"], 100, "{st}");
    assert_eq!(st["io"]["upload_mbps"], 0, "{st}");
    let link = link_of(&env, "web");
    let q = qdiscs(&env);
    assert!(
        q.lines().any(|l| l.contains(&format!("dev {link} root"))
            && l.contains("tbf")
            && l.contains("rate 100Mbit")),
        "no 100 Mbit/s shaper on {link}:\n{q}"
    );
    assert!(
        env.cli_ok(&["machine", "status", "web"])
            .lines()
            .any(|l| l == "I/O:      download 100 Mbit/s")
    );
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn every_sistemo_key_is_read_and_the_tcp_api_is_rate_limited() {
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    let every_key = format!(
        "host_interface: lo\nbridge_subnet: 10.60.0.0/16\nmax_vcpus: 4\nmax_memory_mb: 1024\n\
         max_storage_mb: 10240\nmin_disk_free_mb: 512\ndefault_bandwidth_mbps: 50\n\
         default_upload_mbps: 20\ndefault_iops: 300\ndefault_disk_bw_mbps: 8\n\
         reconciler_interval_sec: 1\nssh_timeout_sec: 20\nblock_smtp: false\n\
         rate_limit_rps: 2\nrate_limit_burst: 3\nport: 7445\ntoken: {TOKEN}\n"
    );
    let mut env = Env::with_config("sparkeys", &every_key);
    step("each key, under our name where it has one");
    let c = json(&env, &["config", "-o", "json"]);
    for (key, want) in [
        ("host_interface", Value::from("lo")),
        ("max_vcpus", 4.into()),
        ("max_memory", "1G".into()),
        ("max_storage", "10G".into()),
        ("min_disk_free", "512M".into()),
        ("liveness_interval_ms", 1000.into()),
        ("ready_timeout_sec", 20.into()),
        ("block_smtp", false.into()),
        ("rate_limit_rps", 2.into()),
        ("rate_limit_burst", 3.into()),
    ] {
        assert_eq!(c[key], want, "{key} in {c}");
    }
    let e = env.cli_err(&["machine", "deploy", "debian", "--name", "big", "--memory", "2G"]);
    assert!(
        e.contains("memory 2G") && e.contains("1024M"),
        "max_memory_mb: {e}"
    );
    assert!(
        !env.nft_table().contains("25, 465, 587"),
        "block_smtp: false opens SMTP"
    );
    step("the default rate limits, and a deploy's own");
    env.machine("web", &[]);
    let st = json(&env, &["machine", "status", "web", "-o", "json"]);
    assert_eq!(
        st["io"],
        serde_json::json!({"download_mbps": 50, "upload_mbps": 20, "iops": 300, "disk_bw_mbps": 8})
    );
    assert!(
        env.cli_ok(&["machine", "status", "web"])
            .lines()
            .any(|l| l == "I/O:      download 50 Mbit/s, upload 20 Mbit/s, disk 300 IOPS, disk 8 MiB/s")
    );
    env.machine("db", &["--bandwidth-mbps", "7", "--disk-iops", "50"]);
    let st = json(&env, &["machine", "status", "db", "-o", "json"]);
    assert_eq!(
        st["io"],
        serde_json::json!({"download_mbps": 7, "upload_mbps": 20, "iops": 50, "disk_bw_mbps": 8})
    );
    step("download and upload shapers on the machine's link");
    let link = link_of(&env, "db");
    let ifb = format!("sb{}", &link[2..]);
    let shaped = |env: &Env| {
        let q = qdiscs(env);
        let f = String::from_utf8_lossy(&env.sh(&format!("tc filter show dev {link} ingress")).stdout)
            .into_owned();
        q.lines()
            .any(|l| l.contains(&format!("dev {link} root")) && l.contains("rate 7Mbit"))
            && q.lines()
                .any(|l| l.contains(&format!("ingress ffff: dev {link}")))
            && f.contains(&format!("Redirect to device {ifb}"))
            && q.lines()
                .any(|l| l.contains(&format!("dev {ifb} root")) && l.contains("rate 20Mbit"))
    };
    assert!(shaped(&env), "{}", qdiscs(&env));
    step("the limits come back with the machine and survive a daemon restart");
    env.cli_ok(&["machine", "stop", "db"]);
    assert!(
        !qdiscs(&env).contains(&link),
        "a stopped machine has no link, no qdisc"
    );
    assert!(!qdiscs(&env).contains(&ifb), "nor an upload ifb");
    env.cli_ok(&["machine", "start", "db"]);
    assert!(shaped(&env), "re-applied at start: {}", qdiscs(&env));
    env.kill_daemon("-TERM");
    env.start_daemon();
    env.cli_ok(&["machine", "list"]); // answered once start-up (re-adoption) is done
    assert!(shaped(&env), "kept over a daemon restart: {}", qdiscs(&env));
    let filters = String::from_utf8_lossy(&env.sh(&format!("tc filter show dev {link} ingress")).stdout)
        .matches("Redirect to device")
        .count();
    assert_eq!(filters, 1, "re-applied, not added twice");
    step("deleted with the machine: no qdisc left behind");
    env.cli_ok(&["machine", "delete", "db", "-y"]);
    env.cli_ok(&["machine", "delete", "web", "-y"]);
    let q = qdiscs(&env);
    assert!(!q.contains("tbf") && !q.contains("ingress"), "leaked:\n{q}");
    let links = String::from_utf8_lossy(&env.sh("ip -o link show").stdout).into_owned();
    assert!(!links.contains(" sb"), "an upload ifb is left:\n{links}");
    step("the TCP API: a burst of 3, then 2 per second, per address");
    let codes = String::from_utf8_lossy(
        &env.sh(&format!(
            "for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' \
             -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7445/v1/machines; done"
        ))
        .stdout,
    )
    .into_owned();
    let codes: Vec<&str> = codes.split_whitespace().collect();
    assert_eq!(&codes[..3], ["200"; 3], "{codes:?}");
    assert!(codes[3..].contains(&"429"), "{codes:?}");
    let body = String::from_utf8_lossy(
        &env.sh(&format!(
            "curl -s -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7445/v1/machines"
        ))
        .stdout,
    )
    .into_owned();
    assert!(
        body.contains("too_many_requests") && body.contains("rate_limit_rps"),
        "{body}"
    );
    poll("a token after half a second", Duration::from_secs(5), || {
        let o = env.sh(&format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {TOKEN}' http://127.0.0.1:7445/v1/machines"
        ));
        (String::from_utf8_lossy(&o.stdout) == "200").then_some(())
    });
    // The Unix socket is never limited.
    for _ in 0..10 {
        env.cli_ok(&["machine", "list"]);
    }
    step("an unknown key, and two spellings that disagree, are refused naming them");
    env.kill_daemon("-TERM");
    env.write_config(&format!("{every_key}default_bandwidth_mbpz: 1\n"));
    let e = env.start_daemon_expecting_refusal(Duration::from_secs(30));
    assert!(e.contains("default_bandwidth_mbpz"), "{e}");
    env.write_config(&format!("{every_key}max_storage: 20G\n"));
    let e = env.start_daemon_expecting_refusal(Duration::from_secs(30));
    assert!(
        e.contains("max_storage_mb: 10240") && e.contains("max_storage: 20G") && e.contains("disagree"),
        "{e}"
    );
    env.write_config("host_interface: nosuchif0\n");
    let e = env.start_daemon_expecting_refusal(Duration::from_secs(30));
    assert!(e.contains("host_interface nosuchif0"), "{e}");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn where_sistemo_is_wrong_we_are_not() {
    let env = Env::new("spardef");
    env.machine("web", &["--expose", "8080:80", "--expose", "8080:53/udp"]);
    step("-o json does not skip the delete confirmation");
    let o = env.cli(&["machine", "delete", "web", "-o", "json"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("-y"), "{e}");
    step("without a terminal, a confirmation fails (exit 1, a message), it does not cancel with 0");
    let o = env.cli(&["machine", "delete", "web"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no terminal"),
        "{o:?}"
    );
    assert_eq!(
        json(&env, &["machine", "status", "web", "-o", "json"])["status"],
        "running"
    );
    step("unexpose of one protocol keeps the other");
    env.cli_ok(&["machine", "unexpose", "web", "--port", "8080"]);
    let ports = json(&env, &["machine", "status", "web", "-o", "json"])["ports"].clone();
    assert_eq!(ports.as_array().unwrap().len(), 1, "{ports}");
    assert_eq!(ports[0]["spec"], "8080:53/udp", "{ports}");
    let t = env.nft_table();
    assert!(t.contains("udp . 8080") && !t.contains("tcp . 8080"), "{t}");
    step("a deploy with a bad expose fails and leaves nothing (not a warning)");
    for (bad, code) in [("8080/udp", 1), ("99999", 2)] {
        let o = env.cli(&["machine", "deploy", "debian", "--name", "api", "--expose", bad]);
        assert_eq!(o.status.code(), Some(code), "--expose {bad}: {o:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(bad.split('/').next().unwrap()), "--expose {bad}: {e}");
        assert!(
            env.cli_err(&["machine", "status", "api"])
                .contains("does not exist"),
            "--expose {bad} left a machine"
        );
    }
    assert_eq!(
        env.machine_namespaces().len(),
        1,
        "no machine namespace left behind"
    );
    // The address the failed deploys would have had is still the next one handed out.
    assert_eq!(env.machine("api", &[]), "10.200.0.3");
}

/// `sistemo install` makes the socket's group, as `service install` does: said by a dry run on
/// the host (which changes nothing), and left alone under `--root`.
#[test]
fn install_creates_the_socket_group() {
    let exe = env!("CARGO_BIN_EXE_sistemo");
    let o = std::process::Command::new(exe)
        .args(["install", "--dry-run"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        out.lines()
            .any(|l| l == "would: create the group sistemo (its members use sistemo without sudo)"),
        "{out}"
    );
    let root = std::env::temp_dir().join(format!("sistemo-hv-group-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let o = std::process::Command::new(exe)
        .args(["install", "--dry-run", "--root", root.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(
        out.lines().any(|l| l == "group sistemo: not created (--root)"),
        "{out}"
    );
}
