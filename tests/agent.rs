//! The guest agent on a real VM (QEMU; TCG here), through the real daemon and CLI: one machine,
//! deployed from an image whose sshd was removed, carries every assertion. Exec codes and
//! signals, stdin, 100 MB of binary output, a reader that stops, 50 concurrent execs, a PTY
//! and its resize, `cp` both ways, a daemon restart during an exec, and the agent killed.

mod common;
use common::vm_state::seed;
use common::*;
use sha2::Digest;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sistemo(env: &Env) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sistemo"));
    c.arg("--socket").arg(&env.socket);
    c
}

/// The daemon's resident memory, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A copy of the test image with sshd deleted: the machine must work without it.
fn image_without_sshd(env: &Env, seed: &std::path::Path) -> std::path::PathBuf {
    let index = std::fs::read_to_string(seed.join("images/index.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&index).unwrap();
    let hash = v["tags"]["debian"]
        .as_str()
        .unwrap_or_else(|| panic!("no debian image in {index}"));
    let src = seed.join("images").join(format!("{hash}.ext4"));
    let dir = env.dir.join("imgs");
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join("nossh.ext4");
    ok(&[
        "cp",
        "--sparse=always",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    ok(&["debugfs", "-w", "-R", "rm /usr/sbin/sshd", dst.to_str().unwrap()]);
    let o = run(&["debugfs", "-R", "stat /usr/sbin/sshd", dst.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not found")
            || String::from_utf8_lossy(&o.stdout).contains("not found"),
        "sshd still in the image"
    );
    dst
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_agent_exec_shell_cp_without_sshd() {
    let seed = seed();
    let mut env = Env::qemu("agent", &seed);
    let img = image_without_sshd(&env, &seed);
    env.write_config(&format!(
        "image_dirs: [\"{}\"]\n",
        img.parent().unwrap().display()
    ));
    env.kill_daemon("-TERM");
    env.start_daemon();

    step("deploy an image without sshd: ready when the agent answers");
    let t = Instant::now();
    env.cli_ok(&["machine", "deploy", img.to_str().unwrap(), "--name", "web"]);
    println!(
        "deploy until exec-ready (no sshd): {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        env.cli_ok(&["machine", "exec", "web", "test -e /usr/sbin/sshd || echo no-sshd"]),
        "no-sshd\n"
    );
    let st = env.cli_ok(&["machine", "status", "web"]);
    assert!(
        st.contains("Status:   running\n") && st.contains("init systemd"),
        "{st}"
    );
    // Exec works while systemd is still starting; a systemctl then waits for it (sistemo's
    // stand-in comes first on PATH until systemd takes commands); status says when it does.
    let v = env.cli_ok(&["machine", "exec", "web", "systemctl show -p Version --value"]);
    assert!(v.trim().starts_with("25"), "systemd's version: {v:?}");
    poll("systemd to take commands", Duration::from_secs(60), || {
        env.cli_ok(&["machine", "status", "web"])
            .contains("init systemd, agent ")
            .then_some(())
    });
    // --wait ssh cannot succeed without sshd: it fails clearly, and rolls back.
    let e = env.cli_err(&[
        "machine",
        "deploy",
        img.to_str().unwrap(),
        "--name",
        "w2",
        "--wait",
        "ssh",
        "--wait-timeout",
        "20",
    ]);
    assert!(e.contains("SSH"), "{e}");
    assert!(
        env.cli_err(&["machine", "status", "w2"])
            .contains("does not exist")
    );

    step("a stop right after the deploy, while systemd still starts, powers off in order");
    env.cli_ok(&["machine", "deploy", img.to_str().unwrap(), "--name", "w3"]);
    let t = Instant::now();
    env.cli_ok(&["machine", "stop", "w3"]);
    // systemd ignores its power-off signal until it has set up: the agent holds the request
    // until systemd takes commands, so the guest powers itself off and nothing is killed.
    assert!(
        !env.log()
            .lines()
            .any(|l| l.contains("w3") && l.contains("did not power off in time")),
        "w3's VMM was killed after {:?}:\n{}",
        t.elapsed(),
        env.log()
    );
    assert!(
        env.cli_ok(&["machine", "status", "w3"])
            .contains("Status:   stopped"),
    );
    env.cli_ok(&["machine", "delete", "w3", "-y"]);

    step("exit codes and signals");
    assert_eq!(
        env.cli(&["machine", "exec", "web", "exit 3"]).status.code(),
        Some(3)
    );
    assert_eq!(
        env.cli(&["machine", "exec", "web", "kill -TERM $$"])
            .status
            .code(),
        Some(128 + 15)
    );
    assert_eq!(
        env.cli(&["machine", "exec", "web", "ls", "/nonexistent"])
            .status
            .code(),
        Some(2)
    );
    let o = env.cli(&["machine", "exec", "web", "/no/such/program"]);
    assert_eq!(o.status.code(), Some(127), "{o:?}");

    step("stdin is streamed (-i), env, workdir and user are applied");
    let mut child = sistemo(&env)
        .args(["machine", "exec", "-i", "web", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .unwrap(),
        hex(&sha2::Sha256::digest(&data))
    );
    let o = env.cli_ok(&[
        "machine",
        "exec",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "-u",
        "nobody",
        "web",
        "echo \"$GREETING\" $(pwd) $(id -un)",
    ]);
    assert_eq!(o, "hi there /tmp nobody\n");
    let e = env.cli_err(&["machine", "exec", "-e", "1BAD", "web", "true"]);
    assert!(e.contains("1BAD") && e.contains("NAME=value"), "{e}");

    step("100 MB of binary output, byte-exact");
    env.cli_ok(&[
        "machine",
        "exec",
        "web",
        "head -c 100000000 /dev/urandom > /root/blob",
    ]);
    let want = env.cli_ok(&["machine", "exec", "web", "sha256sum /root/blob"]);
    let t = Instant::now();
    let mut child = sistemo(&env)
        .args(["machine", "exec", "web", "cat", "/root/blob"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut h = sha2::Sha256::new();
    let mut n = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = child.stdout.take().unwrap();
    loop {
        let k = out.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k;
        h.update(&buf[..k]);
    }
    assert!(child.wait().unwrap().success());
    let secs = t.elapsed().as_secs_f64();
    println!(
        "100 MB through exec: {:.1}s = {:.0} MB/s",
        secs,
        n as f64 / 1e6 / secs
    );
    assert_eq!(n, 100_000_000);
    assert_eq!(hex(&h.finalize()), want.split_whitespace().next().unwrap());

    step("a reader that stops holds the command back; the daemon does not grow");
    let daemon = env.daemon_pid().expect("daemon pid");
    let before = rss_kib(daemon);
    let mut child = sistemo(&env)
        .args(["machine", "exec", "web", "head -c 2000000000 /dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    out.read_exact(&mut vec![0u8; 1 << 20]).unwrap();
    // How much `head` has written, until it stops moving (it blocks on its full pipe).
    let written = || -> u64 {
        let o = env.cli_ok(&[
            "machine",
            "exec",
            "web",
            "cat /proc/$(pgrep -x head)/io 2>/dev/null | sed -n 's/^wchar: //p'",
        ]);
        o.trim().parse().unwrap_or(0)
    };
    let mut last = written();
    let stalled = poll("the command to stall", Duration::from_secs(60), || {
        let now = written();
        let same = now == last && now > 0;
        last = now;
        same.then_some(now)
    });
    assert!(
        stalled < 64 << 20,
        "the guest wrote {stalled} bytes to a reader that stopped"
    );
    let grown = rss_kib(daemon).saturating_sub(before);
    assert!(
        grown < 32 << 10,
        "the daemon grew by {grown} KiB for a stalled reader"
    );
    drop(out);
    let _ = child.wait();
    poll(
        "the stalled command to be killed",
        Duration::from_secs(20),
        || (env.cli_ok(&["machine", "exec", "web", "pgrep -x head || echo gone"]) == "gone\n").then_some(()),
    );

    step("50 concurrent execs");
    let kids: Vec<_> = (0..50)
        .map(|i| {
            sistemo(&env)
                .args(["machine", "exec", "web", &format!("echo n{i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "exec {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("n{i}\n"));
    }

    step("a PTY of the size asked, resized while it runs");
    pty_resize(&env);

    step("cp both ways, modes kept");
    let local = env.dir.join("cp-src");
    std::fs::create_dir_all(local.join("sub")).unwrap();
    std::fs::write(local.join("sub/run.sh"), b"#!/bin/sh\necho copied\n").unwrap();
    std::fs::set_permissions(
        local.join("sub/run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    env.cli_ok(&["machine", "cp", local.to_str().unwrap(), "web:/srv"]);
    assert_eq!(
        env.cli_ok(&[
            "machine",
            "exec",
            "web",
            "stat -c %a /srv/cp-src/sub/run.sh && /srv/cp-src/sub/run.sh"
        ]),
        "750\ncopied\n"
    );
    let back = env.dir.join("cp-back");
    env.cli_ok(&["machine", "cp", "web:/srv/cp-src", back.to_str().unwrap()]);
    let m = std::fs::metadata(back.join("sub/run.sh")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
        0o750
    );
    assert_eq!(
        std::fs::read(back.join("sub/run.sh")).unwrap(),
        b"#!/bin/sh\necho copied\n"
    );
    let e = env.cli_err(&["machine", "cp", "web:/nonexistent", back.to_str().unwrap()]);
    assert!(e.contains("/nonexistent"), "{e}");
    let e = env.cli_err(&["machine", "cp", "web:relative", "x"]);
    assert!(e.contains("absolute"), "{e}");

    step("the daemon restarts while an exec runs");
    let child = sistemo(&env)
        .args(["machine", "exec", "web", "sleep 300; echo finished"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    poll("the sleep to run", Duration::from_secs(30), || {
        (env.cli_ok(&[
            "machine",
            "exec",
            "web",
            "pgrep -x sleep >/dev/null && echo yes || true",
        ]) == "yes\n")
            .then_some(())
    });
    env.kill_daemon("-TERM");
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("daemon"), "a clear error: {e}");
    env.start_daemon();
    // The agent took the daemon's departure as the client's: the command is gone; the new
    // daemon reaches the agent again.
    poll("the orphaned sleep to be killed", Duration::from_secs(30), || {
        (env.cli_ok(&["machine", "exec", "web", "pgrep -x sleep || echo gone"]) == "gone\n").then_some(())
    });
    // The port hung up while the daemon was away; an idle agent must wait, not spin on it
    // (it did: a whole host core per machine from then on).
    let v: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    let vmm = v["pid"].as_u64().expect("the VMM's pid") as u32;
    let busy = cores_used(vmm, Duration::from_secs(3));
    assert!(
        busy < 0.5,
        "the idle machine's VMM used {busy:.2} of a core after the daemon's restart"
    );

    step("the agent killed in the guest: a clear error, the machine shown degraded");
    let _ = env.cli(&["machine", "exec", "web", "kill -9 $(cat /run/sistemo/agent.pid)"]);
    let e = env.cli_err(&["machine", "exec", "web", "true"]);
    assert!(e.contains("agent"), "{e}");
    let st = env.cli_ok(&["machine", "status", "web"]);
    assert!(
        st.contains("Status:   running (degraded)") && st.contains("Degraded: "),
        "{st}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    assert!(v["degraded"].as_str().is_some_and(|d| d.contains("agent")), "{v}");

    env.cli_ok(&["machine", "delete", "web", "-y"]);
}

/// Through the API directly: a terminal of 30x100, then 50x132, as `stty size` sees it.
fn pty_resize(env: &Env) {
    use bytes::BytesMut;
    use sistemo::api::{SessionJob, SessionRequest, TermSize};
    use sistemo_agent::proto::{Codec, Frame, GuestMsg, HostMsg, Kind, WinSize};
    use tokio_util::codec::{Decoder, Encoder};
    let c = sistemo::client::Client::new(&env.socket);
    let req = SessionRequest {
        job: SessionJob::Shell {
            cmd: "stty size; read x; stty size".into(),
        },
        env: vec![],
        workdir: None,
        user: None,
        tty: Some(TermSize { rows: 30, cols: 100 }),
        stdin: true,
        timeout_s: Some(60),
    };
    let (mut s, early) = c
        .upgrade("/v1/machines/web/session", &req, "sistemo-session")
        .unwrap();
    let mut acc = BytesMut::from(&early[..]);
    let mut out = Vec::new();
    async fn next(s: &mut Box<dyn sistemo::client::Duplex>, acc: &mut BytesMut) -> Frame {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(f) = Codec.decode(acc).unwrap() {
                return f;
            }
            let n = tokio::time::timeout(Duration::from_secs(60), s.read_buf(acc))
                .await
                .expect("session output within 60 s")
                .unwrap();
            assert!(n > 0, "session closed early");
        }
    }
    async fn send(s: &mut Box<dyn sistemo::client::Duplex>, f: Frame) {
        use tokio::io::AsyncWriteExt;
        let mut b = BytesMut::new();
        Codec.encode(f, &mut b).unwrap();
        s.write_all(&b).await.unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        while !String::from_utf8_lossy(&out).contains("30 100") {
            let f = next(&mut s, &mut acc).await;
            if f.kind == Kind::Stdout {
                out.extend_from_slice(&f.payload);
            }
        }
        send(
            &mut s,
            Frame::control(1, &HostMsg::Resize(WinSize { rows: 50, cols: 132 })),
        )
        .await;
        send(&mut s, Frame::data(Kind::Stdin, 1, b"go\r".to_vec())).await;
        loop {
            let f = next(&mut s, &mut acc).await;
            match f.kind {
                Kind::Stdout => out.extend_from_slice(&f.payload),
                Kind::Control => {
                    if let Ok(GuestMsg::Exited { code, .. }) = f.message::<GuestMsg>() {
                        assert_eq!(code, Some(0));
                        break;
                    }
                }
                _ => {}
            }
        }
    });
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("50 132"), "{text}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The same agent serves `netns` machines (over a socket pair in the namespace): exec with
/// stdin, a terminal-less session's exit code, and `cp` both ways, in seconds.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn netns_machines_run_the_same_agent() {
    require_root();
    let env = Env::new("agentns");
    env.machine("m", &[]);
    let mut child = sistemo(&env)
        .args(["machine", "exec", "-i", "m", "tr a-z A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.stdout, b"HELLO\n");
    assert_eq!(
        env.cli(&["machine", "exec", "m", "exit 4"]).status.code(),
        Some(4)
    );
    // Its own hostname, as in a VM (a UTS namespace per session).
    assert_eq!(env.cli_ok(&["machine", "exec", "m", "hostname"]).trim(), "m");
    let src = env.dir.join("ns-src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/f"), b"data").unwrap();
    let guest = env.dir.join("ns-guest");
    std::fs::create_dir_all(&guest).unwrap();
    env.cli_ok(&[
        "machine",
        "cp",
        src.to_str().unwrap(),
        &format!("m:{}", guest.display()),
    ]);
    assert_eq!(std::fs::read(guest.join("ns-src/d/f")).unwrap(), b"data");
    let back = env.dir.join("ns-back");
    env.cli_ok(&[
        "machine",
        "cp",
        &format!("m:{}", guest.join("ns-src").display()),
        back.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(back.join("d/f")).unwrap(), b"data");
}
