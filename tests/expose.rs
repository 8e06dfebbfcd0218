//! Port exposes, end to end: the paths a published port is reached by (localhost, the host's
//! LAN address, an external client, hairpin from machines, UDP, ranges, bound addresses),
//! conflicts between claims (other machines, host listeners, concurrent claims), large ranges in
//! one transaction, and bad input that must be one line and change nothing.
//! Real daemon and CLI, real bridge, veths and nftables table in namespaces each test creates,
//! machines as namespaces running real TCP/UDP servers (harness: `tests/common`).

mod common;
use common::*;
use std::time::Duration;

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn expose_paths_localhost_lan_external_hairpin_udp_range_bound() {
    let env = Env::new("paths");
    let web = env.machine(
        "web",
        &[
            "--expose",
            "8080:80",
            "--expose",
            "5353:53/udp",
            "--expose",
            "9000-9002:7000-7002",
            "--expose",
            "127.0.0.1:8081:81",
        ],
    );
    assert_eq!(web, "10.200.0.2", "first machine gets .2");
    env.serve_tcp("web", 80, "web");
    env.serve_tcp("web", 81, "web81");
    env.serve_tcp("web", 7001, "web7001");
    env.serve_udp("web", 53, "webudp");

    // localhost, the host's LAN address and the bridge address, from the host itself
    step("localhost, LAN and bridge addresses from the host");
    let r = expect_tcp(&env.ns, "127.0.0.1", 8080, "web");
    assert!(
        r.starts_with("web 10.200.0.1"),
        "localhost traffic is masqueraded to the bridge: {r}"
    );
    expect_tcp(&env.ns, HOST_LAN, 8080, "web");
    expect_tcp(&env.ns, "10.200.0.1", 8080, "web");
    // external client keeps its source address
    step("external client");
    let r = expect_tcp(&env.client, HOST_LAN, 8080, "web");
    assert_eq!(r, format!("web {CLIENT_IP}"), "external source IP preserved");
    // UDP, host and external
    step("udp");
    let r = poll("udp reply", Duration::from_secs(10), || {
        udp_from(&env.client, HOST_LAN, 5353)
    });
    assert_eq!(r, format!("webudp {CLIENT_IP}"));
    poll("udp from host", Duration::from_secs(10), || {
        udp_from(&env.ns, "127.0.0.1", 5353)
    });
    // a range maps port by port
    step("range");
    expect_tcp(&env.client, HOST_LAN, 9001, "web7001");
    // bound to 127.0.0.1: reachable there, not on the LAN address
    step("bound address");
    expect_tcp(&env.ns, "127.0.0.1", 8081, "web81");
    assert_eq!(
        tcp_from(&env.client, HOST_LAN, 8081),
        None,
        "bound expose must not answer on other addresses"
    );

    // hairpin: another machine reaches web through the host's addresses
    step("hairpin");
    let web_ns = env.machine_namespaces().into_iter().next().unwrap();
    env.machine("api", &[]);
    let api_ns = env
        .machine_namespaces()
        .into_iter()
        .find(|n| *n != web_ns)
        .unwrap();
    let r = expect_tcp(&api_ns, HOST_LAN, 8080, "web");
    assert_eq!(
        r, "web 10.200.0.1",
        "hairpin traffic is masqueraded so replies return through the host"
    );
    expect_tcp(&api_ns, "10.200.0.1", 8080, "web");
    // ...and the machine reaches itself through the host's address
    expect_tcp(&web_ns, HOST_LAN, 8080, "web");
    expect_tcp(&web_ns, "10.200.0.1", 8080, "web");
    // the same with bridge netfilter off (plain routed path)
    step("hairpin without bridge netfilter");
    env.sh("sysctl -qw net.bridge.bridge-nf-call-iptables=0 || true");
    expect_tcp(&web_ns, HOST_LAN, 8080, "web");
    expect_tcp(&api_ns, HOST_LAN, 8080, "web");
    env.sh("sysctl -qw net.bridge.bridge-nf-call-iptables=1 || true");

    // no hijack: a machine connecting to an outside server on the exposed port number reaches it
    step("no hijack of outgoing connections");
    ok(&[
        "ip",
        "netns",
        "exec",
        &env.client,
        "sh",
        "-c",
        "socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo outside' >/dev/null 2>&1 &",
    ]);
    for ns in [&web_ns, &api_ns] {
        expect_tcp(ns, CLIENT_IP, 8080, "outside");
    }

    // status shows the page's format, plus the bind address
    step("status");
    let st = env.cli_ok(&["machine", "status", "web"]);
    for line in [
        "Status:   running",
        "IP:       10.200.0.2",
        "Ports:",
        "  host:8080 → machine:80 (tcp)",
        "  host:5353 → machine:53 (udp)",
        "  host:9000-9002 → machine:7000-7002 (tcp)",
        "  host:127.0.0.1:8081 → machine:81 (tcp)",
    ] {
        assert!(st.lines().any(|l| l == line), "missing {line:?} in\n{st}");
    }
    // exposes live in maps: the chains hold a constant number of rules
    step("nftables maps");
    let t = env.nft_table();
    assert!(
        t.contains("map expose_any") && t.contains("tcp . 9001 : 10.200.0.2 . 7001"),
        "{t}"
    );
    assert_eq!(
        t.matches("dnat ip to").count(),
        4,
        "two map lookups per DNAT chain, not one rule per port: {t}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn conflicts_host_listener_and_concurrent_claims() {
    let env = Env::new("conf");
    env.machine("a", &["--expose", "8080:80"]);
    env.machine("b", &[]);
    let e = env.cli_err(&["machine", "expose", "b", "--port", "8080"]);
    assert!(
        e.contains("8080/tcp") && e.contains("\"a\""),
        "names the holder: {e}"
    );
    // a wildcard conflicts with a specific binding and vice versa
    step("wildcard vs specific binding");
    let e = env.cli_err(&["machine", "expose", "b", "--port", "127.0.0.1:8080:80"]);
    assert!(e.contains("\"a\""), "{e}");
    env.cli_ok(&["machine", "expose", "b", "--port", "127.0.0.1:9090:80"]);
    assert!(
        env.cli_err(&["machine", "expose", "a", "--port", "9090"])
            .contains("\"b\"")
    );
    // a range overlapping a held port is refused as a whole
    step("range overlapping a held port");
    let e = env.cli_err(&["machine", "expose", "b", "--port", "8075-8085"]);
    assert!(e.contains("8080"), "{e}");
    // host process listening
    step("host listener");
    env.sh("socat TCP-LISTEN:7070,fork,reuseaddr SYSTEM:true >/dev/null 2>&1 &");
    poll("host listener", Duration::from_secs(5), || {
        tcp_from(&env.ns, "127.0.0.1", 7070)
            .or(Some(String::new()))
            .filter(|_| env.sh("ss -ltn | grep -q ':7070 '").status.success())
    });
    let e = env.cli_err(&["machine", "expose", "b", "--port", "7070:80"]);
    assert!(e.contains("7070") && e.contains("in use by a process"), "{e}");
    // 50 concurrent claims of one port from 5 machines: exactly one wins
    step("concurrent claims");
    for i in 0..3 {
        env.machine(&format!("c{i}"), &[]);
    }
    let names = ["a", "b", "c0", "c1", "c2"];
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let sock = env.socket.clone();
            let name = names[i % names.len()].to_string();
            std::thread::spawn(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
                    .args([
                        "--socket",
                        sock.to_str().unwrap(),
                        "machine",
                        "expose",
                        &name,
                        "--port",
                        "6000:80",
                    ])
                    .output()
                    .unwrap()
                    .status
                    .success()
            })
        })
        .collect();
    let wins = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|w| *w)
        .count();
    assert_eq!(wins, 1, "exactly one concurrent claim wins");
    let ports: serde_json::Value = serde_json::from_str(&env.cli_ok(&["ports", "-o", "json"])).unwrap();
    let n6000 = ports
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["host_port"] == "6000")
        .count();
    assert_eq!(n6000, 1);
    let t = env.nft_table();
    assert_eq!(t.matches("tcp . 6000 :").count(), 1, "{t}");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn large_ranges_expose_and_unexpose_in_one_transaction() {
    let env = Env::new("big");
    env.machine("bg", &[]);
    env.cli_ok(&["machine", "expose", "bg", "--port", "20000-29999"]);
    let count = |env: &Env| {
        let o = env.sh(&format!("nft -j list map ip {} expose_any", env.table));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["nftables"][1]["map"]["elem"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0)
    };
    assert_eq!(count(&env), 10_000);
    env.serve_tcp("bg", 25000, "bg");
    expect_tcp(&env.client, HOST_LAN, 25000, "bg");
    env.cli_ok(&["machine", "unexpose", "bg", "--port", "20000-29999"]);
    assert_eq!(count(&env), 0);
    assert!(
        !env.log().contains("falling back to nft"),
        "element changes went over netlink"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn bad_input_is_one_line_and_changes_nothing() {
    let env = Env::new("bad");
    env.machine("web", &["--expose", "8080:80"]);
    env.cli_ok(&["network", "create", "blue", "--subnet", "10.210.0.0/24"]);
    let before = (
        env.cli_ok(&["ports", "-o", "json"]),
        env.nft_table(),
        env.cli_ok(&["network", "ls", "-o", "json"]),
    );
    for (args, needle) in [
        (vec!["machine", "expose", "web", "--port", "0"], "\"0\""),
        (vec!["machine", "expose", "web", "--port", "65536"], "65536"),
        (vec!["machine", "expose", "web", "--port", "abc"], "\"abc\""),
        (vec!["machine", "expose", "web", "--port", "80:"], "\"80:\""),
        (vec!["machine", "expose", "web", "--port", ":80"], "\":80\""),
        (vec!["machine", "expose", "web", "--port", "80-70"], "\"80-70\""),
        (
            vec!["machine", "expose", "web", "--port", "80-82:90-91"],
            "same length",
        ),
        (vec!["machine", "expose", "web", "--port", "80/sctp"], "sctp"),
        (
            vec!["machine", "expose", "web", "--port", "999.1.1.1:80:80"],
            "999.1.1.1",
        ),
        (
            vec!["machine", "expose", "web", "--port", "90", "--port", "90:91"],
            "same command",
        ),
        (vec!["machine", "expose", "web", "--port", "8070-8090"], "8080"),
        (
            vec!["machine", "unexpose", "web", "--port", "9999"],
            "9999/tcp is not exposed",
        ),
        (
            vec!["machine", "unexpose", "web", "--port", "8080/udp"],
            "8080/udp is not exposed",
        ),
        (vec!["network", "create", "my net"], "\"my net\""),
        (vec!["network", "create", "x;rm"], "\"x;rm\""),
        (
            vec!["network", "create", "red", "--subnet", "10.210.0.128/25"],
            "overlaps network blue",
        ),
        (
            vec!["network", "create", "red", "--subnet", "10.201.0.0/24"],
            "overlaps host route",
        ),
        (
            vec!["machine", "deploy", "debian", "--name", "x", "--expose", "8080"],
            "\"web\"",
        ),
        (
            vec!["machine", "deploy", "debian", "--name", "Bad_Name"],
            "\"Bad_Name\"",
        ),
        (vec!["machine", "expose", "nope", "--port", "80"], "\"nope\""),
    ] {
        let e = env.cli_err(&args);
        assert!(e.contains(needle), "{args:?}: {e:?} lacks {needle:?}");
    }
    // usage errors exit 2
    assert_eq!(env.cli(&["machine", "expose", "web"]).status.code(), Some(2));
    let after = (
        env.cli_ok(&["ports", "-o", "json"]),
        env.nft_table(),
        env.cli_ok(&["network", "ls", "-o", "json"]),
    );
    assert_eq!(before, after, "bad input changed state");
    assert!(
        env.cli_ok(&["machine", "ls"]).lines().count() == 2,
        "failed deploys left no machine"
    );
}
