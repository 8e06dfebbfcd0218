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
    assert!(
        o.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("Command:  /bin/busybox sh -c 'echo") && out.contains("Workdir:  /tmp"),
        "status shows the effective command: {out}"
    );
    let want = "ov: hi from-file /tmp uid=1000";
    poll("the overridden workload's output", Duration::from_secs(30), || {
        env.cli_ok(&["machine", "logs", "ov"]).contains(want).then_some(())
    });
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
        env.cli_ok(&["machine", "logs", "ov"]).contains(want).then_some(())
    });
    env.cli_ok(&["-y", "machine", "delete", "ov"]);

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
