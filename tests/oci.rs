//! OCI images end to end with real tools and no Docker: images built with `umoci` from the
//! host's static busybox, pushed with `skopeo` into Debian's `docker-registry` listening on
//! loopback inside the test's namespace, pulled and imported by the real daemon (QEMU backend),
//! the converted file system read back with `debugfs` (nothing mounted), and one real VM running
//! a busybox web server as its workload.

mod common;
mod oci_support;
use common::vm_state::seed;
use common::*;
use oci_support::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn image_file(env: &Env, tag: &str) -> PathBuf {
    let sha = images(env)
        .into_iter()
        .find(|i| i["tags"].as_array().unwrap().iter().any(|t| t == tag))
        .unwrap_or_else(|| panic!("no image tagged {tag}"))["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    env.dir.join("data/images").join(format!("{sha}.ext4"))
}

fn debugfs(img: &Path, req: &str) -> String {
    let o = run(&["debugfs", "-R", req, img.to_str().unwrap()]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The counts that must not change when a pull or import fails.
fn store_state(env: &Env) -> (usize, usize) {
    let blobs = std::fs::read_dir(env.dir.join("data/images/blobs/sha256"))
        .map(|r| r.count())
        .unwrap_or(0);
    (images(env).len(), blobs)
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn oci_pull_import_convert_and_refusals() {
    let mut env = Env::qemu("soci", &seed());
    let work = env.dir.join("oci");
    std::fs::create_dir_all(&work).unwrap();
    step("build images with umoci");
    let layout = build_layout(&work);
    let _reg = Registry::start(&env.ns, &work, "reg", "127.0.0.1:5077", None);
    let _auth = Registry::with_login(&env.ns, &work, "authreg", "127.0.0.1:5078", "soci", "sociPW");
    let _lan = Registry::start(&env.ns, &work, "lanreg", &format!("{HOST_LAN}:5079"), None);
    for (tag, dest) in [
        ("web", "127.0.0.1:5077/web:1"),
        ("three", "127.0.0.1:5077/three:1"),
        ("web", "127.0.0.1:5078/private:1"),
        ("web", &format!("{HOST_LAN}:5079/web:1")),
    ] {
        push(&env, &layout, tag, dest);
    }

    step("pull: progress per layer, config kept, converted once per digest");
    let o = env.cli(&["image", "pull", "127.0.0.1:5077/three:1"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    for want in ["layer 1/4", "layer 2/4", "layer 4/4", "making the ext4"] {
        assert!(out.contains(want), "no {want:?} in {out}");
    }
    let o = env.cli(&["image", "pull", "127.0.0.1:5077/web:1"]);
    let out = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        out.contains("layer 1/1") && out.contains("cached"),
        "the shared layer is cached: {out}"
    );
    let list = images(&env);
    let web = list
        .iter()
        .find(|i| i["tags"][0] == "127.0.0.1:5077/web:1")
        .expect("web listed");
    let digest = web["oci"]["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:") && web["oci"]["created"].is_string());
    assert_eq!(web["oci"]["exposed_ports"][0], "8080/tcp");
    assert_eq!(web["oci"]["command"][1], "httpd");
    let table = env.cli_ok(&["image", "list"]);
    assert!(
        table.contains("DIGEST") && table.contains(&digest[..19]),
        "{table}"
    );
    // The same digest again, by digest: no conversion.
    let by_digest = format!("127.0.0.1:5077/web@{digest}");
    let out = String::from_utf8_lossy(&env.cli(&["image", "pull", &by_digest]).stderr).into_owned();
    assert!(out.contains("already converted"), "{out}");
    let oci = images(&env).into_iter().filter(|i| i["oci"].is_object()).count();
    assert_eq!(oci, 2, "one image per digest");

    step("the converted tree, read back with debugfs (nothing mounted)");
    let img = image_file(&env, "127.0.0.1:5077/three:1");
    let ls_data = debugfs(&img, "ls /data");
    assert!(
        !ls_data.contains("gone") && ls_data.contains("hard2"),
        "{ls_data}"
    );
    let opq = debugfs(&img, "ls /opq");
    assert!(
        opq.contains("new") && !opq.contains("lower1") && !opq.contains("lowerdir"),
        "{opq}"
    );
    let hard = debugfs(&img, "stat /data/hard");
    assert!(hard.contains("Links: 2"), "{hard}");
    let owned = debugfs(&img, "stat /etc/owned");
    assert!(
        owned.contains("User:  1234") && owned.contains("Group:  5678") && owned.contains("Mode:  0640"),
        "{owned}"
    );
    assert!(debugfs(&img, "stat /bin/suid").contains("Mode:  04755"));
    let caps = debugfs(&img, "ea_list /bin/capped");
    assert!(
        caps.contains("security.capability"),
        "file capability kept: {caps}"
    );
    assert!(debugfs(&img, "stat /bin/sh").contains("Type: symlink"));

    step("refusals leave nothing behind");
    let before = store_state(&env);
    let e = env.cli_err(&["image", "pull", "127.0.0.1:5077/web:nope"]);
    eprintln!("refusal: {e}");
    assert!(
        e.contains("127.0.0.1:5077/web:nope") && e.contains("not found"),
        "{e}"
    );
    let e = env.cli_err(&["image", "pull", "127.0.0.1:5071/web:1"]);
    eprintln!("refusal: {e}");
    assert!(e.contains("127.0.0.1:5071"), "registry down: {e}");
    let e = env.cli_err(&["image", "pull", "Not A Ref"]);
    eprintln!("refusal: {e}");
    assert!(e.contains("Not A Ref") && e.contains("allowed"), "{e}");
    let e = env.cli_err(&["image", "pull", "127.0.0.1:5078/private:1"]);
    eprintln!("refusal: {e}");
    assert!(e.contains("127.0.0.1:5078"), "no credentials: {e}");
    let lan = format!("{HOST_LAN}:5079/web:1");
    let e = env.cli_err(&["image", "pull", &lan]);
    eprintln!("refusal: {e}");
    assert!(
        e.contains(&format!("{HOST_LAN}:5079")),
        "plain http refused off loopback: {e}"
    );
    assert_eq!(store_state(&env), before, "nothing stored by failed pulls");

    step("corrupt blob: the digest mismatch is refused");
    // A layer only this image has, corrupted in the registry's storage after the push.
    let tar = work.join("fresh.tar");
    sh(&format!(
        "/usr/bin/python3 - <<'EOF'\nimport tarfile, io, os\nt = tarfile.open('{}', 'w')\ndata = os.urandom(65536)\ni = tarfile.TarInfo('fresh'); i.size = len(data)\nt.addfile(i, io.BytesIO(data))\nt.close()\nEOF\numoci raw add-layer --image {}:web --tag corrupt {}",
        tar.display(),
        layout.display(),
        tar.display()
    ));
    push(&env, &layout, "corrupt", "127.0.0.1:5077/corrupt:2");
    let m: serde_json::Value = serde_json::from_str(&sh(&format!(
        "skopeo inspect --raw oci:{}:corrupt",
        layout.display()
    )))
    .unwrap();
    let fresh = m["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let hex = fresh.strip_prefix("sha256:").unwrap();
    let data = work.join(format!(
        "reg/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let before = store_state(&env);
    let e = env.cli_err(&["image", "pull", "127.0.0.1:5077/corrupt:2"]);
    eprintln!("refusal: {e}");
    assert!(e.contains(&fresh[..19]) || e.contains("digest"), "{e}");
    assert_eq!(store_state(&env), before, "no corrupt blob kept");

    step("registry login, then the private pull works");
    let o = Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .args(["--socket", env.socket.to_str().unwrap()])
        .args([
            "registry",
            "login",
            "127.0.0.1:5078",
            "-u",
            "soci",
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"sociPW\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(o.status.success());
    let creds = env.dir.join("data/registries.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    env.cli_ok(&["image", "pull", "127.0.0.1:5078/private:1"]);

    step("insecure_registries allows plain http to a listed registry");
    env.kill_daemon("-TERM");
    env.write_config(&format!("insecure_registries: [\"{HOST_LAN}:5079\"]\n"));
    env.start_daemon();
    env.cli_ok(&["image", "pull", &lan]);

    step("import: docker save archive and OCI layout; not-an-image refused");
    let archive = work.join("web-docker.tar");
    sh(&format!(
        "skopeo copy --quiet oci:{}:three docker-archive:{}:soci/imported:2",
        layout.display(),
        archive.display()
    ));
    let out = env.cli_ok(&["image", "import", archive.to_str().unwrap()]);
    assert!(out.contains("docker.io/soci/imported:2"), "{out}");
    let img = image_file(&env, "docker.io/soci/imported:2");
    assert!(debugfs(&img, "stat /data/hard").contains("Links: 2"));
    let oci_dir = work.join("copied");
    sh(&format!(
        "skopeo copy --quiet oci:{}:web oci:{}:v1",
        layout.display(),
        oci_dir.display()
    ));
    env.cli_ok(&[
        "image",
        "import",
        oci_dir.to_str().unwrap(),
        "--name",
        "fromlayout",
    ]);
    assert!(image_file(&env, "fromlayout").exists());
    let before = store_state(&env);
    let e = env.cli_err(&["image", "import", "/etc/hostname"]);
    eprintln!("refusal: {e}");
    assert!(e.contains("/etc/hostname") && e.contains("not an image"), "{e}");
    assert_eq!(store_state(&env), before);

    step("image build REF tags the repository's last component; rm and prune");
    env.cli_ok(&["image", "build", "127.0.0.1:5077/web:1"]);
    assert!(image_file(&env, "web").exists());
    env.cli_ok(&["-y", "image", "rm", "127.0.0.1:5078/private:1"]);
    env.cli_ok(&["image", "prune"]);
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_oci_busybox_serves_http_execs_and_stops_with_its_workload() {
    let env = Env::qemu("socivm", &seed());
    let work = env.dir.join("oci");
    std::fs::create_dir_all(&work).unwrap();
    let layout = build_layout(&work);
    let _reg = Registry::start(&env.ns, &work, "reg", "127.0.0.1:5077", None);
    push(&env, &layout, "web", "127.0.0.1:5077/web:1");

    step("deploy REF pulls, converts and boots the entrypoint as the workload");
    let o = env.cli(&[
        "machine",
        "deploy",
        "127.0.0.1:5077/web:1",
        "--expose",
        "8080:8080",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "deploy: {err}");
    assert!(
        err.contains("resolving 127.0.0.1:5077/web:1"),
        "pulled on deploy: {err}"
    );
    assert!(err.contains("init sistemo-agent"), "{err}");
    let page = poll("the workload's web server", Duration::from_secs(60), || {
        let o = env.sh("curl -s -m 3 http://localhost:8080/");
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.contains("hello from an OCI image").then_some(s)
    });
    assert_eq!(page.trim(), "hello from an OCI image");
    let o = env.csh(&format!("curl -s -m 5 http://{HOST_LAN}:8080/"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("hello from an OCI image"));

    step("image rm refuses an image in use, by any of its names");
    let e = env.cli_err(&["-y", "image", "rm", "127.0.0.1:5077/web:1"]);
    assert!(e.contains("used by machine(s) web"), "{e}");
    let used: Vec<serde_json::Value> =
        serde_json::from_str(&env.cli_ok(&["image", "list", "-o", "json"])).unwrap();
    assert!(
        used.iter()
            .any(|i| i["oci"].is_object() && i["used_by"][0] == "web"),
        "{used:?}"
    );

    step("exec goes through the agent: no sshd, no systemd in the image");
    let out = env.cli_ok(&[
        "machine",
        "exec",
        "web",
        "cat /proc/1/comm; ls /usr/sbin/sshd /lib/systemd 2>&1; hostname",
    ]);
    assert!(out.starts_with("agent\n"), "{out}");
    assert!(out.contains("No such file") && out.contains("web"), "{out}");
    let st: serde_json::Value =
        serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["guest"]["init"], "sistemo-agent", "{st}");

    step("the workload's output is the machine's log");
    let logs = poll("httpd's request log", Duration::from_secs(20), || {
        let l = env.cli_ok(&["machine", "logs", "web"]);
        l.contains("response:200").then_some(l)
    });
    assert!(
        logs.contains("sistemo-init: started [\"/bin/busybox\", \"httpd\""),
        "{logs}"
    );

    step("the workload exiting powers the machine off, its exit code logged");
    let _ = env.cli(&["machine", "exec", "web", "kill $(cat /run/sistemo/workload.pid)"]);
    poll("the machine to stop", Duration::from_secs(60), || {
        let st: serde_json::Value =
            serde_json::from_str(&env.cli_ok(&["machine", "status", "web", "-o", "json"])).unwrap();
        (st["status"] == "stopped").then_some(())
    });
    let logs = env.cli_ok(&["machine", "logs", "web"]);
    assert!(logs.contains("the workload exited with code 143"), "{logs}");
}
