//! Real VMs end to end (QEMU; TCG where KVM cannot run the guest): the user's page, command by
//! command, against the real daemon and CLI, inside a network namespace the test creates.
//! Ignored by plain `cargo test` (named `real_vm_*`, so `--skip real_vm_` leaves it out); run it
//! as root with `sudo scripts/test`, which prepares the assets (`scripts/prepare-vm-assets`) in
//! `$SISTEMO_TEST_CACHE/data`. Included but without root or assets, it fails saying what is
//! missing; it never passes without booting.

mod common;
use common::vm_state::seed;
use common::*;
use std::time::{Duration, Instant};

fn curl(env: &Env, port: u16) -> Option<String> {
    let o = env.sh(&format!("curl -s -m 3 http://localhost:{port}/"));
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn qemu_pids(env: &Env) -> Vec<String> {
    let o = run(&[
        "pgrep",
        "-f",
        &format!("qemu-system-x86_64.*{}", env.dir.display()),
    ]);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_page_examples() {
    let seed = seed();
    let mut env = Env::qemu("vm", &seed);

    // A failed deploy (unknown image) leaves nothing behind.
    let e = env.cli_err(&["machine", "deploy", "nope", "--name", "bad"]);
    assert!(e.contains("nope"), "{e}");
    assert_eq!(env.cli_ok(&["machine", "ls", "-o", "json"]).trim(), "[]");

    // sistemo machine deploy debian --name web --expose 80 (+ the Node.js port)
    let t0 = Instant::now();
    env.cli_ok(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "web",
        "--expose",
        "80",
        "--expose",
        "8080:3000",
    ]);
    eprintln!("deploy until exec-ready: {:.1}s", t0.elapsed().as_secs_f64());
    let st = env.cli_ok(&["machine", "status", "web"]);
    // An address on the default network (the failed deploy's one is handed out again last).
    let ip_line = st
        .lines()
        .find(|l| l.starts_with("IP:       10.200.0."))
        .unwrap_or_else(|| panic!("no default-network IP: {st}"))
        .to_string();
    assert!(st.contains("Status:   running"), "{st}");
    assert!(
        st.contains("  host:80 → machine:80 (tcp)\n  host:8080 → machine:3000 (tcp)"),
        "{st}"
    );

    // exec: output, exit code, shell operators
    let o = env.cli(&["machine", "exec", "web", "echo hi && exit 3"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    assert_eq!(o.status.code(), Some(3));

    // The nginx example (nginx is baked into the test image: test namespaces have no internet).
    env.cli_ok(&[
        "machine",
        "exec",
        "web",
        "rm -f /usr/sbin/policy-rc.d && systemctl start nginx",
    ]);
    let page = poll("nginx on localhost:80", Duration::from_secs(30), || {
        curl(&env, 80)
    });
    assert!(page.contains("nginx"), "{page}");

    // The Node.js example: a trailing & leaves it running without hanging exec.
    let t = Instant::now();
    env.cli_ok(&[
        "machine",
        "exec",
        "web",
        "node -e 'require(\"http\").createServer((q,s)=>{s.end(\"hello\\n\")}).listen(3000)' &",
    ]);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "exec with & returned promptly"
    );
    assert_eq!(
        poll("node on 8080", Duration::from_secs(30), || curl(&env, 8080)),
        "hello\n"
    );

    // expose / unexpose on a running machine
    env.cli_ok(&["machine", "expose", "web", "--port", "8081:80"]);
    assert!(poll("8081", Duration::from_secs(10), || curl(&env, 8081)).contains("nginx"));
    env.cli_ok(&["machine", "unexpose", "web", "--port", "8081"]);
    assert_eq!(curl(&env, 8081), None);

    // stop: port closed, ports still listed; exec refused
    env.cli_ok(&["machine", "exec", "web", "systemctl enable nginx"]);
    env.cli_ok(&["machine", "stop", "web"]);
    assert_eq!(curl(&env, 80), None);
    assert!(qemu_pids(&env).is_empty(), "VMM gone after stop");
    let st = env.cli_ok(&["machine", "status", "web"]);
    assert!(
        st.contains("Status:   stopped") && st.contains("host:80 → machine:80 (tcp)"),
        "{st}"
    );
    assert!(
        env.cli_err(&["machine", "exec", "web", "true"])
            .contains("stopped")
    );
    // start: open again, same IP
    env.cli_ok(&["machine", "start", "web"]);
    assert!(poll("nginx after start", Duration::from_secs(30), || curl(&env, 80)).contains("nginx"));
    assert!(env.cli_err(&["machine", "start", "web"]).contains("running"));
    // restart keeps IP and ports
    env.cli_ok(&["machine", "restart", "web"]);
    assert!(poll("nginx after restart", Duration::from_secs(30), || curl(&env, 80)).contains("nginx"));
    let st = env.cli_ok(&["machine", "status", "web"]);
    assert!(
        st.contains(&ip_line) && st.contains("host:80 → machine:80 (tcp)"),
        "{st}"
    );

    // daemon kill -9 and restart: machine still running, port answers, status intact
    env.kill_daemon("-KILL");
    assert!(
        curl(&env, 80).is_some_and(|p| p.contains("nginx")),
        "port answers while the daemon is down"
    );
    // the bridge lost while the daemon is down: re-created, the machine's TAP attached again
    env.sh("ip link del sistemo0");
    env.start_daemon();
    // The same status, but for the guest's live figures (uptime, memory in use, disk use).
    let fixed = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("Guest:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(fixed(&env.cli_ok(&["machine", "status", "web"])), fixed(&st));
    env.cli_ok(&["machine", "exec", "web", "true"]);
    assert!(
        poll(
            "nginx after the bridge came back",
            Duration::from_secs(30),
            || curl(&env, 80)
        )
        .contains("nginx"),
        "port answers through the re-created bridge"
    );

    // the VMM and its limits are shown (TCG said to be no isolation boundary)
    let st = env.cli_ok(&["machine", "status", "web"]);
    let vmm = st
        .lines()
        .find(|l| l.starts_with("VMM:      qemu-"))
        .unwrap_or_else(|| panic!("{st}"));
    assert!(
        !vmm.contains("tcg") || vmm.contains("not an isolation boundary"),
        "{vmm}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    if !info["limits"].is_null() {
        assert_eq!(
            info["limits"]["memory_mib"],
            512 + 256,
            "guest RAM + the VMM's overhead"
        );
        assert!(st.contains("Limits:   memory 768M, 1 CPU, 256 tasks"), "{st}");
    }

    // the key machines trust, and the image in use
    assert!(env.cli_ok(&["ssh-key"]).starts_with("ssh-ed25519 "));
    let images = env.cli_ok(&["image", "list"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with("debian") && l.contains(" web ")),
        "{images}"
    );

    // two machines at once; --wait init: systemctl works as soon as the deploy returns
    let out = env.cli_ok(&["machine", "deploy", "debian", "--name", "api", "--wait", "init"]);
    assert!(out.contains("Status:   running"), "{out}");
    assert!(
        env.cli_ok(&["machine", "status", "api"])
            .contains("init systemd, agent "),
        "systemd takes commands after deploy --wait init"
    );
    let ls = env.cli_ok(&["machine", "ls"]);
    assert_eq!(ls.matches("running").count(), 2, "{ls}");
    assert_eq!(qemu_pids(&env).len(), 2);

    // a guest that powers itself off is noticed: `stopped`, its port closed, its VMM gone
    let _ = env.cli(&["machine", "exec", "api", "systemctl poweroff --no-block"]);
    poll("api stopped after its poweroff", Duration::from_secs(60), || {
        env.cli_ok(&["machine", "status", "api"])
            .contains("Status:   stopped")
            .then_some(())
    });
    assert_eq!(qemu_pids(&env).len(), 1, "only web's VMM is left");
    // a VMM that dies (killed, crashed) is noticed: `error` with the reason, port closed
    let web_pid = qemu_pids(&env).pop().unwrap();
    ok(&["kill", "-9", &web_pid]);
    let st = poll(
        "web in error after its VMM was killed",
        Duration::from_secs(10),
        || {
            let st = env.cli_ok(&["machine", "status", "web"]);
            st.contains("Status:   error").then_some(st)
        },
    );
    assert!(st.contains("exited unexpectedly"), "{st}");
    assert_eq!(curl(&env, 80), None, "a dead machine's port is closed");

    // delete: no VMM, TAP, rule, row or file left
    for m in ["web", "api"] {
        env.cli_ok(&["machine", "delete", m, "-y"]);
    }
    assert!(qemu_pids(&env).is_empty());
    let links = String::from_utf8_lossy(&env.sh("ip -o link").stdout).into_owned();
    assert!(!links.contains("master sistemo0"), "{links}");
    assert!(!env.nft_table().contains(": 10.200.0."), "no rule left");
    assert_eq!(env.cli_ok(&["ports", "-o", "json"]).trim(), "[]");
    assert_eq!(
        std::fs::read_dir(env.dir.join("data/machines")).unwrap().count(),
        0
    );
}
