//! OCI images, the rest of issue 12 with real tools and no Docker: deploy overrides in Docker's
//! spelling and the workload's exit code (real VMs under the QEMU backend), pulls with the
//! invoking user's Docker `config.json`, and concurrent pulls of one image (Debian's
//! `docker-registry` on loopback inside the test's namespace).

mod common;
mod oci_support;
use common::vm_state::seed;
use common::*;
use oci_support::*;
use std::time::Duration;

fn status(env: &Env, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.cli_ok(&["machine", "status", name, "-o", "json"])).unwrap()
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_oci_overrides_exit_codes_and_on_failure_restarts() {
    let env = Env::qemu("ho2run", &seed());
    let work = env.dir.join("oci");
    std::fs::create_dir_all(&work).unwrap();
    let layout = build_layout(&work);
    let _reg = Registry::start(&env.ns, &work, "reg", "127.0.0.1:5077", None);
    push(&env, &layout, "web", "127.0.0.1:5077/web:1");
    env.cli_ok(&["image", "pull", "127.0.0.1:5077/web:1"]);

    step("bad overrides: one line naming the value, nothing made");
    let before = env.cli_ok(&["machine", "list", "-o", "json"]);
    for (args, bad) in [
        (vec!["--workdir", "rel/dir"], "rel/dir"),
        (vec!["--user", "a b"], "a b"),
        (vec!["--env", "=x"], "=x"),
    ] {
        let mut a = vec!["machine", "deploy", "127.0.0.1:5077/web:1", "--name", "bad"];
        a.extend(args);
        let e = env.cli_err(&a);
        assert!(e.contains(bad) && e.contains("allowed"), "{e}");
    }
    let e = env.cli_err(&["machine", "deploy", "debian", "--env", "A=1", "--", "sleep", "1"]);
    assert!(
        e.contains("\"debian\"") && e.contains("init") && e.contains("--env"),
        "an image with an init system refuses overrides: {e}"
    );
    let envf = work.join("app.env");
    std::fs::write(&envf, "# comment\nMODE=from-file\nGREETING=overridden\n").unwrap();
    let e = env.cli_err(&[
        "machine",
        "deploy",
        "127.0.0.1:5077/web:1",
        "--env-file",
        "/nonexistent/app.env",
    ]);
    assert!(e.contains("/nonexistent/app.env"), "{e}");
    assert_eq!(env.cli_ok(&["machine", "list", "-o", "json"]), before);

    step("deploy with --env, --env-file, --workdir, --user and -- CMD");
    let script = "echo \"ov: $GREETING $MODE $PWD uid=$(/bin/busybox id -u)\"; \
                  exec /bin/busybox httpd -f -p 8080 -h /www";
    let o = env.cli(&[
        "machine",
        "deploy",
        "127.0.0.1:5077/web:1",
        "--name",
        "ov",
        "--env",
        "GREETING=hi",
        "--env-file",
        envf.to_str().unwrap(),
        "--workdir",
        "/tmp",
        "--user",
        "1000:1000",
        "--expose",
        "8080:8080",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "deploy: {err}");
    assert!(
        !err.contains("cloning the image"),
        "the first deploy after the pull takes the spare disk made by the pull: {err}"
    );
    assert!(
        out.contains("Command:  /bin/busybox sh -c 'echo") && out.contains("Workdir:  /tmp"),
        "status shows the effective command: {out}"
    );
    let want = "ov: hi from-file /tmp uid=1000";
    poll(
        "the overridden workload's output",
        Duration::from_secs(30),
        || {
            env.cli_ok(&["machine", "logs", "ov"])
                .contains(want)
                .then_some(())
        },
    );
    poll("its web server", Duration::from_secs(30), || {
        let o = env.sh("curl -s -m 3 http://localhost:8080/");
        String::from_utf8_lossy(&o.stdout)
            .contains("hello from an OCI image")
            .then_some(())
    });
    let st = status(&env, "ov");
    assert_eq!(st["workload"]["command"][0], "/bin/busybox", "{st}");
    assert_eq!(st["workload"]["user"], "1000:1000", "{st}");
    assert!(
        st["workload"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k == "MODE"),
        "{st}"
    );

    step("the overrides are kept across a restart");
    env.cli_ok(&["machine", "restart", "ov"]);
    poll("the output after the restart", Duration::from_secs(30), || {
        env.cli_ok(&["machine", "logs", "ov"])
            .contains(want)
            .then_some(())
    });
    env.cli_ok(&["-y", "machine", "delete", "ov"]);

    step("signals reach the workload as themselves; orphans are reaped; sistemo's hosts and DNS");
    // What the workload prints is spelled differently in its argv, which the init logs too.
    let script = "for s in HUP USR1 QUIT USR2; do trap \"echo got:\"$s $s; done; \
                  for i in 1 2 3; do (/bin/busybox sleep 30 &); done; \
                  echo \"trap\"ping; while :; do /bin/busybox sleep 1 & wait $!; done";
    let o = env.cli(&[
        "machine",
        "deploy",
        "127.0.0.1:5077/web:1",
        "--name",
        "sg",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    poll("the trapping workload", Duration::from_secs(30), || {
        env.cli_ok(&["machine", "logs", "sg"])
            .contains("trapping")
            .then_some(())
    });
    // Each process of the guest: its parent, state and command line.
    let procs = || {
        env.cli_ok(&[
            "machine",
            "exec",
            "sg",
            r#"for d in /proc/[0-9]*; do echo "${d#/proc/} $(grep -h -e ^PPid -e ^State $d/status | tr '\n\t' '  ')$(tr '\0' ' ' < $d/cmdline)"; done"#,
        ])
    };
    let orphans = |ps: &str| {
        ps.lines()
            .filter(|l| l.ends_with("PPid: 1 /bin/busybox sleep 30 "))
            .count()
    };
    let ps = procs();
    assert_eq!(orphans(&ps), 3, "three sleeps left to PID 1: {ps}");
    for sig in ["HUP", "USR1", "QUIT", "USR2"] {
        env.cli_ok(&["machine", "exec", "sg", "sh", "-c", &format!("kill -{sig} 1")]);
        let want = format!("got:{sig}");
        poll(&want, Duration::from_secs(20), || {
            env.cli_ok(&["machine", "logs", "sg"])
                .contains(&want)
                .then_some(())
        });
    }
    assert_eq!(status(&env, "sg")["status"], "running", "no signal stopped it");
    poll("the orphans reaped by PID 1", Duration::from_secs(30), || {
        let ps = procs();
        (orphans(&ps) == 0).then_some(ps)
    });
    let ps = procs();
    assert!(!ps.contains("zombie"), "no zombie in the guest: {ps}");
    let hosts = env.cli_ok(&[
        "machine",
        "exec",
        "sg",
        "sh",
        "-c",
        "cat /etc/hosts /etc/resolv.conf",
    ]);
    assert!(
        !hosts.contains("10.9.9.9") && hosts.contains("localhost") && hosts.contains("nameserver"),
        "sistemo's /etc/hosts and /etc/resolv.conf, not the image's: {hosts}"
    );
    assert!(hosts.contains(" sg"), "the machine's name in /etc/hosts: {hosts}");
    env.cli_ok(&["-y", "machine", "delete", "sg"]);

    step("a workload exiting with 3 stops the machine with its code");
    let o = env.cli(&[
        "machine",
        "deploy",
        "127.0.0.1:5077/web:1",
        "--name",
        "ex",
        "--",
        "sh",
        "-c",
        "echo about to fail; exit 3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    poll("the machine to stop", Duration::from_secs(60), || {
        let st = status(&env, "ex");
        (st["status"] == "stopped").then_some(())
    });
    let st = status(&env, "ex");
    assert_eq!(st["exit_code"], 3, "{st}");
    let text = env.cli_ok(&["machine", "status", "ex"]);
    assert!(
        text.contains("Status:   stopped (workload exited with code 3)"),
        "{text}"
    );
    assert!(env.cli_ok(&["machine", "logs", "ex"]).contains("about to fail"));

    step("--restart on-failure restarts a non-zero exit, not a zero one");
    // Boot 1 exits 3 (restarted), boot 2 exits 0 (stays stopped): the count is on the disk.
    let o = env.cli(&[
        "machine",
        "deploy",
        "127.0.0.1:5077/web:1",
        "--name",
        "rs",
        "--restart",
        "on-failure",
        "--",
        "sh",
        "-c",
        "echo x >> /count; n=$(/bin/busybox wc -l < /count); echo boot $n; [ $n -ge 2 ] && exit 0; exit 3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    poll("the second boot to exit 0", Duration::from_secs(120), || {
        let st = status(&env, "rs");
        (st["status"] == "stopped" && st["exit_code"] == 0).then_some(())
    });
    let logs = env.cli_ok(&["machine", "logs", "rs"]);
    assert!(logs.contains("boot 2"), "{logs}");
}

/// `sistemo image pull ARGS…` with the environment changed by `envs` (`None`: removed).
fn pull_with(env: &Env, args: &[&str], envs: &[(&str, Option<&str>)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"));
    c.args(["--socket", env.socket.to_str().unwrap(), "image", "pull"])
        .args(args)
        .stdin(std::process::Stdio::null());
    for (k, v) in envs {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn oci_docker_config_credentials_and_concurrent_pulls() {
    let env = Env::qemu("ho2pull", &seed());
    let work = env.dir.join("oci");
    std::fs::create_dir_all(&work).unwrap();
    let layout = build_layout(&work);
    let _reg = Registry::start(&env.ns, &work, "reg", "127.0.0.1:5077", None);
    let _auth = Registry::with_login(&env.ns, &work, "authreg", "127.0.0.1:5078", "soci", "sociPW");
    // `four`: three plus a layer of its own, so it is converted only in the race below.
    let tar = work.join("four.tar");
    sh(&format!(
        "/usr/bin/python3 - <<'EOF'\nimport tarfile, io, os\nt = tarfile.open('{}', 'w')\ndata = os.urandom(1 << 20)\ni = tarfile.TarInfo('four'); i.size = len(data)\nt.addfile(i, io.BytesIO(data))\nt.close()\nEOF\numoci raw add-layer --image {}:three --tag four {}",
        tar.display(),
        layout.display(),
        tar.display()
    ));
    for (tag, dest) in [
        ("web", "127.0.0.1:5077/web:1"),
        ("three", "127.0.0.1:5077/three:1"),
        ("four", "127.0.0.1:5077/four:1"),
        ("web", "127.0.0.1:5078/private:1"),
        ("web", "127.0.0.1:5078/private:2"),
    ] {
        push(&env, &layout, tag, dest);
    }

    step("two images sharing a layer, pulled at once: the layer is downloaded once");
    let spawn = |r: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
            .args(["--socket", env.socket.to_str().unwrap(), "image", "pull", r])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("127.0.0.1:5077/web:1"), spawn("127.0.0.1:5077/three:1"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        text(&a),
        text(&b)
    );
    let both = text(&a) + &text(&b);
    let downloads = both
        .lines()
        .filter(|l| l.contains("layer 1/") && l.contains("downloaded in"))
        .count();
    assert_eq!(downloads, 1, "the shared layer once: {both}");

    step("the same image pulled twice at once: one conversion, both succeed");
    let (a, b) = (spawn("127.0.0.1:5077/four:1"), spawn("127.0.0.1:5077/four:1"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        text(&a),
        text(&b)
    );
    let both = text(&a) + &text(&b);
    assert_eq!(
        both.matches("making the ext4").count(),
        1,
        "converted once: {both}"
    );
    assert_eq!(both.matches("already converted").count(), 1, "{both}");
    let fours = images(&env)
        .into_iter()
        .filter(|i| {
            i["tags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t == "127.0.0.1:5077/four:1")
        })
        .count();
    assert_eq!(fours, 1);
    let oci = images(&env).into_iter().filter(|i| i["oci"].is_object()).count();
    assert_eq!(oci, 3, "web, three and four, one file each");
    step("--docker-config PATH: credentials for this pull only");
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let cfg = work.join("dcfg.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{}"}},"127.0.0.1:5078":{{"auth":"{}"}}}}}}"#,
            b64("hub:x"),
            b64("soci:sociPW")
        ),
    )
    .unwrap();
    let e = env.cli_err(&["image", "pull", "127.0.0.1:5078/private:1"]);
    assert!(e.contains("127.0.0.1:5078"), "anonymous is refused: {e}");
    let o = pull_with(
        &env,
        &[
            "127.0.0.1:5078/private:1",
            "--docker-config",
            cfg.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !env.dir.join("data/registries.json").exists(),
        "the credentials are not stored"
    );
    let e = env.cli_err(&["image", "pull", "127.0.0.1:5078/private:2"]);
    assert!(e.contains("127.0.0.1:5078"), "not kept for the next pull: {e}");

    step("--docker-config alone reads ~/.docker/config.json of the invoking user");
    let home = work.join("home");
    std::fs::create_dir_all(home.join(".docker")).unwrap();
    std::fs::copy(&cfg, home.join(".docker/config.json")).unwrap();
    let h = home.to_str().unwrap();
    let clean = [("HOME", Some(h)), ("SUDO_USER", None), ("DOCKER_CONFIG", None)];
    let o = pull_with(&env, &["127.0.0.1:5078/private:2", "--docker-config"], &clean);
    assert!(o.status.success(), "{}", text(&o));

    step("wrong credentials, a credential helper, a broken file: one line each");
    std::fs::write(
        home.join(".docker/config.json"),
        format!(
            r#"{{"auths":{{"127.0.0.1:5078":{{"auth":"{}"}}}}}}"#,
            b64("soci:wrong")
        ),
    )
    .unwrap();
    env.cli_ok(&["-y", "image", "rm", "127.0.0.1:5078/private:2"]);
    for (content, want) in [
        (None, "authentication"),
        (Some(r#"{"credsStore":"desktop"}"#), "desktop"),
        (Some("{not json"), "config.json"),
    ] {
        if let Some(c) = content {
            std::fs::write(home.join(".docker/config.json"), c).unwrap();
        }
        let o = pull_with(&env, &["127.0.0.1:5078/private:2", "--docker-config"], &clean);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{e}");
        let lines: Vec<&str> = e.lines().filter(|l| !l.starts_with('…')).collect();
        assert_eq!(lines.len(), 1, "one line: {e}");
        assert!(lines[0].contains(want), "{e}");
    }

    let temps: Vec<_> = std::fs::read_dir(env.dir.join("data/images/blobs/sha256"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(temps.is_empty(), "no temporary blob left: {temps:?}");
}
