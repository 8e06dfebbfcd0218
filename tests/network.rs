//! Networks and the daemon's life, end to end: the loopback guard (CVE-2020-8558), a foreign
//! `policy drop` forward chain, daemon restarts and ruleset flushes (self-repair), machine
//! stop/start/delete without leaks, named networks and their isolation, foreign objects left
//! alone, subnet changes, and two daemons in one namespace.
//! Real daemon and CLI, real bridge, veths and nftables table in namespaces each test creates,
//! machines as namespaces running real TCP/UDP servers (harness: `tests/common`).

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn loopback_services_of_the_host_are_not_reachable_from_machines() {
    let env = Env::new("cve");
    env.machine("m", &["--expose", "8080:80"]);
    env.serve_tcp("m", 80, "m");
    expect_tcp(&env.ns, "127.0.0.1", 8080, "m"); // route_localnet is in effect for the DNAT path
    // a service on the host bound to 127.0.0.1
    // a host service on 127.0.0.1, and the attacker machine routing 127.0.0.1 to the host's
    // bridge (CVE-2020-8558)
    let ns = loopback_attack(&env);
    assert_eq!(
        tcp_from(&ns, "127.0.0.1", 7778),
        None,
        "machine reached a host loopback service"
    );
    // control: without sistemo's guard (and its input chain, which closes the host to machines
    // too) the same packets do reach it, so the test is real. The daemon is killed first so
    // that its repair loop cannot restore them meanwhile (its tables stay: kill -9 is not a
    // clean stop).
    let mut env = env;
    env.kill_daemon("-KILL");
    env.sh(&format!(
        "nft flush chain ip {t} guard && nft flush chain ip {t} input",
        t = env.table
    ));
    assert_eq!(
        tcp_from(&ns, "127.0.0.1", 7778).as_deref(),
        Some("secret"),
        "control: attack path works without the guard"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn foreign_forward_policy_drop_table_is_handled() {
    let env = Env::new("dock");
    env.machine("web", &["--expose", "8080:80"]);
    env.serve_tcp("web", 80, "web");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    // Docker's iptables-nft leaves `filter FORWARD` at policy drop
    env.sh("nft -f - <<'X'\ntable ip filter {\n chain FORWARD { type filter hook forward priority 0; policy drop;\n  iifname \"docker0\" accept\n }\n}\nX");
    // within the repair interval sistemo's tagged accept rules are at the top of that chain
    let t = poll("compat rules", Duration::from_secs(3), || {
        let t = String::from_utf8_lossy(&env.sh("nft list chain ip filter FORWARD").stdout).into_owned();
        (t.matches(&format!("sistemo:{}", env.table)).count() == 3).then_some(t)
    });
    assert!(
        t.contains("iifname \"docker0\" accept"),
        "foreign rules kept: {t}"
    );
    let r = expect_tcp(&env.client, HOST_LAN, 8080, "web");
    assert_eq!(r, format!("web {CLIENT_IP}"));
    // only exposed traffic is let through: direct access from outside to a machine is still dropped
    env.serve_tcp("web", 81, "direct");
    assert_eq!(tcp_from(&env.client, "10.200.0.2", 81), None);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn daemon_restart_and_ruleset_flush_restore_rules() {
    let mut env = Env::new("rst");
    env.machine("web", &["--expose", "8080:80", "--expose", "5353:53/udp"]);
    env.serve_tcp("web", 80, "web");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    let status = env.cli_ok(&["machine", "status", "web"]);
    // kill -9: the machine and its rules stay up
    step("kill -9");
    env.kill_daemon("-KILL");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    // someone wipes the table while the daemon is down; start brings it back from SQLite
    env.sh("nft flush ruleset");
    assert_eq!(tcp_from(&env.client, HOST_LAN, 8080), None);
    env.start_daemon();
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    assert_eq!(
        env.cli_ok(&["machine", "status", "web"]),
        status,
        "status intact after restart"
    );
    assert!(env.log().contains("re-adopted running machine"));
    // flush while the daemon runs: back within 2 seconds, and logged
    step("self-repair after flush");
    env.sh("nft flush ruleset");
    let t0 = Instant::now();
    poll("self-repair", Duration::from_secs(2), || {
        tcp_from(&env.client, HOST_LAN, 8080).filter(|r| r.starts_with("web"))
    });
    eprintln!("restored after {:?}", t0.elapsed());
    assert!(env.log().contains("nftables drifted"), "repair is logged");
    // deleting only the table is repaired too
    step("self-repair after delete table");
    env.sh(&format!("nft delete table ip {}", env.table));
    poll("self-repair after delete table", Duration::from_secs(2), || {
        tcp_from(&env.client, HOST_LAN, 8080).filter(|r| r.starts_with("web"))
    });
    // flushing only sistemo's rules is caught by the deep check (every 20 passes)
    step("deep self-repair");
    env.sh(&format!("nft flush chain ip {} prerouting", env.table));
    poll("deep self-repair", Duration::from_secs(8), || {
        tcp_from(&env.client, HOST_LAN, 8080).filter(|r| r.starts_with("web"))
    });
    // graceful restart: nothing lost
    step("graceful restart");
    env.kill_daemon("-TERM");
    env.start_daemon();
    assert_eq!(env.cli_ok(&["machine", "status", "web"]), status);
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn stop_start_delete_semantics_and_no_leaks() {
    let env = Env::new("life");
    env.machine("web", &["--expose", "8080:80"]);
    env.serve_tcp("web", 80, "web");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    env.cli_ok(&["machine", "stop", "web"]);
    assert_eq!(
        tcp_from(&env.client, HOST_LAN, 8080),
        None,
        "stopped machine's port is closed"
    );
    assert!(
        !env.nft_table().contains("tcp . 8080"),
        "rules leave nftables on stop"
    );
    let st = env.cli_ok(&["machine", "status", "web"]);
    assert!(
        st.contains("Status:   stopped") && st.contains("host:8080 → machine:80 (tcp)"),
        "{st}"
    );
    // ports stay reserved while stopped
    step("ports reserved while stopped");
    env.machine("other", &[]);
    assert!(
        env.cli_err(&["machine", "expose", "other", "--port", "8080"])
            .contains("\"web\"")
    );
    // expose/unexpose on a stopped machine: rows only, effective at start
    step("expose on a stopped machine");
    env.cli_ok(&["machine", "expose", "web", "--port", "9090:90"]);
    assert!(!env.nft_table().contains("tcp . 9090"));
    let ports: serde_json::Value = serde_json::from_str(&env.cli_ok(&["ports", "-o", "json"])).unwrap();
    assert!(ports.as_array().unwrap().iter().all(|p| p["state"] == "inactive"));
    // a host process that took a reserved port meanwhile blocks the start, naming the port
    step("host listener blocks start");
    let pidfile = env.dir.join("listener.pid");
    env.sh(&format!(
        "socat TCP-LISTEN:9090,reuseaddr SYSTEM:true >/dev/null 2>&1 & echo $! > {}",
        pidfile.display()
    ));
    poll("host listener on 9090", Duration::from_secs(5), || {
        env.sh("ss -ltn | grep -q ':9090 '")
            .status
            .success()
            .then_some(())
    });
    let e = env.cli_err(&["machine", "start", "web"]);
    assert!(e.contains("9090") && e.contains("in use"), "{e}");
    assert!(
        env.cli_ok(&["machine", "status", "web"])
            .contains("Status:   stopped")
    );
    env.sh(&format!("kill $(cat {})", pidfile.display()));
    poll("host listener gone", Duration::from_secs(5), || {
        (!env.sh("ss -ltn | grep -q ':9090 '").status.success()).then_some(())
    });
    env.cli_ok(&["machine", "start", "web"]);
    env.serve_tcp("web", 80, "web");
    env.serve_tcp("web", 90, "web90");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    expect_tcp(&env.client, HOST_LAN, 9090, "web90");
    assert!(
        env.cli_ok(&["machine", "status", "web"])
            .contains("IP:       10.200.0.2"),
        "IP kept"
    );
    env.cli_ok(&["machine", "restart", "web"]);
    assert!(
        env.cli_ok(&["machine", "status", "web"])
            .contains("IP:       10.200.0.2"),
        "IP kept across restart"
    );
    env.cli_ok(&["machine", "unexpose", "web", "--port", "9090"]);
    env.serve_tcp("web", 80, "web");
    expect_tcp(&env.ns, "10.200.0.2", 80, "web"); // the host now has a neighbour entry for web
    let bridge_mac = |env: &Env| {
        String::from_utf8_lossy(&env.sh("cat /sys/class/net/sistemo0/address").stdout).into_owned()
    };
    let mac_before = bridge_mac(&env);
    assert!(!env.nft_table().contains("tcp . 9090"));
    // delete without -y and without a terminal is refused
    step("delete");
    let e = env.cli_err(&["machine", "delete", "web"]);
    assert!(e.contains("-y"), "{e}");
    env.cli_ok(&["machine", "delete", "web", "-y"]);
    assert!(!env.nft_table().contains("10.200.0.2"), "no rule left");
    assert_eq!(env.machine_namespaces().len(), 1, "only `other` remains");
    assert_eq!(
        bridge_mac(&env),
        mac_before,
        "the bridge keeps its address as ports come and go"
    );
    let links = String::from_utf8_lossy(&env.sh("ip -o link").stdout).into_owned();
    assert_eq!(
        links.matches("master sistemo0").count(),
        1,
        "one port left on the bridge: {links}"
    );
    assert!(env.cli_ok(&["ports", "-o", "json"]).trim() == "[]");
    assert!(!env.dir.join("data/machines").read_dir().unwrap().any(|e| {
        let d = e.unwrap().path();
        d.join("disk.raw").exists()
    }));
    // the freed port is reused; the freed address is not while never-used ones are free
    // (released addresses come back last, least recently released first)
    step("reuse of the port, not of the address");
    let ip = env.machine("new", &["--expose", "8080:80"]);
    assert_ne!(
        ip, "10.200.0.2",
        "a released address is handed out again only last"
    );
    env.serve_tcp("new", 80, "new");
    poll(
        "direct connection to the new machine",
        Duration::from_secs(3),
        || tcp_from(&env.ns, &ip, 80).filter(|r| r.starts_with("new")),
    );
    expect_tcp(&env.client, HOST_LAN, 8080, "new");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn named_networks_isolation_and_foreign_objects_left_alone() {
    let mut env = Env::new("nets");
    // Docker-like objects that sistemo did not create
    env.sh("ip link add br-0123abcd type bridge && ip link set br-0123abcd up");
    env.sh("nft add table inet firewalld && nft add chain inet firewalld filter_INPUT '{ type filter hook input priority 10; policy accept; }' && nft add rule inet firewalld filter_INPUT tcp dport 22 accept");
    let fw_before = String::from_utf8_lossy(&env.sh("nft list table inet firewalld").stdout).into_owned();
    env.kill_daemon("-TERM");
    env.start_daemon();

    env.cli_ok(&["network", "create", "blue", "--subnet", "10.210.0.0/24"]);
    let nets = env.cli_ok(&["network", "ls"]);
    assert!(
        nets.contains("blue") && nets.contains("10.210.0.0/24") && nets.contains("sis-blue"),
        "{nets}"
    );
    let a = env.machine("a", &["--expose", "8080:80"]);
    let b = env.machine("b", &["--network", "blue"]);
    assert_eq!(b, "10.210.0.2");
    env.serve_tcp("a", 80, "a");
    env.serve_tcp("b", 80, "b");
    let nss = env.machine_namespaces();
    let ns_of = |ip: &str| {
        nss.iter()
            .find(|n| String::from_utf8_lossy(&run(&["ip", "-n", n, "-4", "addr"]).stdout).contains(ip))
            .unwrap()
            .clone()
    };
    let (na, nb) = (ns_of(&a), ns_of(&b));
    // same network reachable (control), different networks not
    expect_tcp(&env.ns, &b, 80, "b");
    assert_eq!(tcp_from(&nb, &a, 80), None, "blue reached default directly");
    assert_eq!(tcp_from(&na, &b, 80), None, "default reached blue directly");
    // a published port is reachable across networks through the host, like Docker
    expect_tcp(&nb, HOST_LAN, 8080, "a");
    // delete refused while used
    assert!(env.cli_err(&["network", "delete", "blue", "-y"]).contains("b"));
    env.cli_ok(&["machine", "delete", "b", "-y"]);
    env.cli_ok(&["network", "delete", "blue", "-y"]);
    assert!(
        !env.sh("ip link show sis-blue").status.success(),
        "bridge removed"
    );
    // foreign objects untouched through all of it, and after the daemon stops
    env.kill_daemon("-TERM");
    assert!(
        env.sh("ip link show br-0123abcd").status.success(),
        "docker-like bridge left alone"
    );
    let fw_after = String::from_utf8_lossy(&env.sh("nft list table inet firewalld").stdout).into_owned();
    assert_eq!(fw_before, fw_after, "foreign table untouched");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn subnet_change_that_strands_machines_is_a_clear_error() {
    let mut env = Env::new("subn");
    env.machine("web", &[]);
    env.kill_daemon("-TERM");
    env.extra_args_set(&["--subnet", "10.220.0.0/24"]);
    let out = env.try_start_daemon();
    assert!(
        out.contains("10.220.0.0/24") && out.contains("web (10.200.0.2)"),
        "{out}"
    );
    env.extra_args_set(&[]);
    env.start_daemon();
    assert!(env.cli_ok(&["machine", "status", "web"]).contains("10.200.0.2"));
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn two_daemons_in_one_namespace_do_not_interfere() {
    let env = Env::new("two");
    env.machine("a", &["--expose", "8080:80"]);
    env.serve_tcp("a", 80, "a");
    // a second daemon beside the first: its own socket, data dir, bridge, subnet, table and
    // TCP listener (the first holds 127.0.0.1:7777)
    let dir2 = env.dir.join("second");
    std::fs::create_dir_all(&dir2).unwrap();
    std::fs::write(
        dir2.join("config.yml"),
        format!(
            "netns_prefix: \"{}b-\"\nlisten: [\"127.0.0.1:7779\"]\n",
            env.prefix
        ),
    )
    .unwrap();
    let sock2 = dir2.join("api.sock");
    let log = std::fs::File::create(dir2.join("daemon.log")).unwrap();
    let mut d2 = std::process::Command::new("nsenter")
        .args([
            &format!("--net=/run/netns/{}", env.ns),
            "--",
            env!("CARGO_BIN_EXE_sistemo"),
        ])
        .args([
            "--socket",
            sock2.to_str().unwrap(),
            "up",
            "--config",
            dir2.join("config.yml").to_str().unwrap(),
        ])
        .args([
            "--data-dir",
            dir2.join("data").to_str().unwrap(),
            "--bridge",
            "sistemo1",
        ])
        .args([
            "--subnet",
            "10.230.0.0/24",
            "--nft-table",
            "second",
            "--hypervisor",
            "netns",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _k = Kill(&mut d2);
    let cli2 = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
            .arg("--socket")
            .arg(&sock2)
            .args(args)
            .output()
            .unwrap()
    };
    poll("second daemon", Duration::from_secs(20), || {
        cli2(&["machine", "ls"]).status.success().then_some(())
    });
    let o = cli2(&[
        "machine", "deploy", "debian", "--name", "b", "--expose", "9090:80",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = String::from_utf8_lossy(&cli2(&["machine", "status", "b"]).stdout).into_owned();
    assert!(st.contains("IP:       10.230.0.2"), "{st}");
    cli2(&[
        "machine",
        "exec",
        "b",
        "socat TCP-LISTEN:80,fork,reuseaddr SYSTEM:'echo b' &",
    ]);
    expect_tcp(&env.client, HOST_LAN, 8080, "a");
    expect_tcp(&env.client, HOST_LAN, 9090, "b");
    // each daemon sees only its own machines, and deleting one leaves the other's rules alone
    assert!(!env.cli_ok(&["machine", "ls"]).contains(" b "));
    assert!(cli2(&["machine", "delete", "b", "-y"]).status.success());
    expect_tcp(&env.client, HOST_LAN, 8080, "a");
    assert!(env.nft_table().contains("tcp . 8080"));
    let second = String::from_utf8_lossy(&env.sh("nft list table ip second").stdout).into_owned();
    assert!(
        second.contains("sistemo1") && !second.contains("tcp . 9090"),
        "{second}"
    );
}
