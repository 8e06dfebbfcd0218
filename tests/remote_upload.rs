//! Local image files sent to a remote daemon (`--host https://…`, `SISTEMO_TOKEN`): `machine
//! deploy ./x.ext4` uploads the image (streamed, with progress) into the image store under its
//! sha256 and deploys it by that digest; `image import ./x.tar` uploads and imports an archive.
//! Refused: a viewer's upload, a file that is not ext4 / not a tar, one over `max_image_size`
//! (announced or streamed), bytes that differ from the announced digest; nothing half-made stays.

mod common;
use common::vm_state::seed;
use common::web::token;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const URL: &str = "https://127.0.0.1:7443";
const LISTEN: &str = "listen: [\"127.0.0.1:7777\", \"https://127.0.0.1:7443\"]\n";

/// The CLI in the env's namespace against `URL`, run in `cwd`, with the daemon's fingerprint.
fn remote(env: &Env, cwd: &Path, token: &str, args: &[&str]) -> Output {
    let c: Value = serde_json::from_str(&env.cli_ok(&["config", "-o", "json"])).unwrap();
    let fp = c["tls_fingerprint"].as_str().unwrap().to_string();
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &env.ns,
            env!("CARGO_BIN_EXE_sistemo"),
            "--host",
            URL,
        ])
        .args(args)
        .current_dir(cwd)
        .env("HOME", cwd)
        .env_remove("SISTEMO_SOCKET")
        .env("SISTEMO_FINGERPRINT", fp)
        .env("SISTEMO_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn ok_out(o: &Output, what: &str) -> (String, String) {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn err_line(o: &Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} unexpectedly succeeded");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    let lines: Vec<&str> = e.lines().filter(|l| !l.starts_with('…')).collect();
    assert_eq!(lines.len(), 1, "{what}: one line: {e:?}");
    lines[0].to_string()
}

fn sha256(p: &Path) -> String {
    ok(&["sha256sum", p.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// What the image store folder holds (names), scratch folders included.
fn store(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.dir.join("data/images"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".index.lock" && n != "index.json" && n != "blobs")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// An ext4 image of `mib` MiB holding `/hello` with `text`.
fn ext4(dir: &Path, name: &str, mib: u32, text: &str) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello"), text).unwrap();
    let p = dir.join(name);
    ok(&["truncate", "-s", &format!("{mib}M"), p.to_str().unwrap()]);
    ok(&[
        "mkfs.ext4",
        "-q",
        "-F",
        "-d",
        tree.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    p
}

/// curl in the env's namespace against `URL` with `token`; stdin from `input` (a shell
/// pipeline) sent chunked when given. Returns (status, body).
fn curl(env: &Env, token: &str, path: &str, input: &str) -> (u16, String) {
    let o = env.sh(&format!(
        "{input} | curl -sk -X POST -T - -H 'Authorization: Bearer {token}' -w '\\n%{{http_code}}' '{URL}{path}'"
    ));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn remote_deploy_uploads_a_local_ext4_image() {
    let env = Env::with_config("hr2up", &format!("{LISTEN}max_image_size: 16M\n"));
    let admin = token(&env, "ci", &[]);
    let viewer = token(&env, "look", &["--role", "viewer"]);
    let work = env.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let img = ext4(&work, "my.ext4", 8, "uploaded\n");
    let sha = sha256(&img);

    step("a relative image path is uploaded, stored by sha256 and deployed by its digest");
    let o = remote(
        &env,
        &work,
        &admin,
        &["machine", "deploy", "./my.ext4", "-o", "json"],
    );
    let (out, err) = ok_out(&o, "deploy ./my.ext4");
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["name"], "my", "named after the file: {m}");
    assert_eq!(m["image"], sha.as_str(), "deployed by its digest: {m}");
    assert!(err.contains("uploading ./my.ext4: 100%"), "progress shown: {err}");
    let stored = env.dir.join(format!("data/images/{sha}.ext4"));
    assert_eq!(sha256(&stored), sha, "the same bytes in the store");
    assert_eq!(store(&env), vec![format!("{sha}.ext4")], "no scratch left");
    let hist: Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "image.upload", "-o", "json"])).unwrap();
    let entries = hist.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{hist}");
    assert_eq!(entries[0]["actor"], "token ci");
    assert_eq!(entries[0]["target"], sha.as_str());

    step("the same image again is not sent again; an absolute path is uploaded too");
    let o = remote(
        &env,
        &env.dir,
        &admin,
        &["machine", "deploy", img.to_str().unwrap()],
    );
    let (_, err) = ok_out(&o, "deploy again");
    assert!(err.contains("already has"), "{err}");
    let hist: Value =
        serde_json::from_str(&env.cli_ok(&["history", "--action", "image.upload", "-o", "json"])).unwrap();
    assert_eq!(hist.as_array().unwrap().len(), 1, "one upload only: {hist}");
    let list: Value = serde_json::from_str(&env.cli_ok(&["machine", "list", "-o", "json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["my", "my-2"]);

    step("refusals: a viewer, a file that is not ext4, a missing file, over the size cap");
    let before = store(&env);
    let other = ext4(&work, "other.ext4", 8, "other\n");
    let o = remote(&env, &work, &viewer, &["machine", "deploy", "./other.ext4"]);
    let e = err_line(&o, "a viewer's upload");
    assert!(e.contains("viewer"), "{e}");
    std::fs::write(work.join("bad.ext4"), vec![7u8; 4096]).unwrap();
    let o = remote(&env, &work, &admin, &["machine", "deploy", "./bad.ext4"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o, "not ext4").contains("not an ext4 image"));
    let o = remote(&env, &work, &admin, &["machine", "deploy", "./gone.ext4"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o, "a missing file").contains("\"./gone.ext4\""));
    let big = ext4(&work, "big.ext4", 20, "big\n");
    let o = remote(&env, &work, &admin, &["machine", "deploy", big.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = err_line(&o, "over the cap");
    assert!(e.contains("max_image_size") && e.contains("16M"), "{e}");
    // Streamed (chunked, no length announced): cut off at the cap.
    let (code, body) = curl(&env, &admin, "/v1/images/upload", "head -c 20000000 /dev/zero");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("max_image_size"), "{body}");
    // Bytes that differ from the announced digest.
    let (code, body) = curl(
        &env,
        &admin,
        &format!("/v1/images/upload?sha256={}", "0".repeat(64)),
        &format!("cat {}", other.display()),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not the announced"), "{body}");
    assert_eq!(store(&env), before, "nothing stored, no scratch left");
    let list: Value = serde_json::from_str(&env.cli_ok(&["machine", "list", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "no machine added: {list}");
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn remote_image_import_uploads_an_archive() {
    let env = Env::qemu_with_config("hr2imp", &seed(), LISTEN);
    let admin = token(&env, "ci", &[]);
    let viewer = token(&env, "look", &["--role", "viewer"]);
    let work = env.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (l, b) = (work.join("layout"), work.join("bundle"));
    let archive = work.join("app.tar");
    let o = run(&[
        "sh",
        "-c",
        &format!(
            "umoci init --layout {l} && umoci new --image {l}:web && umoci unpack --image {l}:web {b} && \
             mkdir -p {b}/rootfs/bin && cp /bin/busybox {b}/rootfs/bin/ && echo up > {b}/rootfs/hello && \
             umoci repack --image {l}:web {b} && rm -rf {b} && \
             skopeo copy --quiet oci:{l}:web docker-archive:{a}:hr2/app:1",
            l = l.display(),
            b = b.display(),
            a = archive.display()
        ),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = store(&env);

    step("a viewer cannot upload; a file that is not a tar is refused");
    let o = remote(&env, &work, &viewer, &["image", "import", "./app.tar"]);
    assert!(err_line(&o, "a viewer's import").contains("viewer"));
    std::fs::write(work.join("notes.tar"), b"not an archive\n").unwrap();
    let o = remote(&env, &work, &admin, &["image", "import", "./notes.tar"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err_line(&o, "not a tar").contains("not a tar archive"));
    assert_eq!(store(&env), before, "nothing stored, no scratch left");

    step("the archive is uploaded and imported under the given tag");
    let o = remote(
        &env,
        &work,
        &admin,
        &["image", "import", "./app.tar", "--name", "upapp", "-o", "json"],
    );
    let (out, err) = ok_out(&o, "import");
    assert!(err.contains("uploading ./app.tar: 100%"), "{err}");
    let row: Value = serde_json::from_str(&out).unwrap();
    let tags: Vec<&str> = row["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(tags.contains(&"upapp"), "{row}");
    let sha = row["sha256"].as_str().unwrap();
    let file = env.dir.join(format!("data/images/{sha}.ext4"));
    let o = run(&["debugfs", "-R", "cat /hello", file.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "up\n",
        "the archive's file in the image"
    );
    assert!(
        !store(&env).iter().any(|n| n.starts_with(".upload-")),
        "the upload is removed: {:?}",
        store(&env)
    );
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_remote_deploy_of_an_uploaded_image_boots() {
    let env = Env::qemu_with_config("hr2vm", &seed(), LISTEN);
    let admin = token(&env, "ci", &[]);
    let work = env.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    step("a copy of the debian image with a marker file, made on the client's side");
    let images: Value = serde_json::from_str(&env.cli_ok(&["image", "list", "-o", "json"])).unwrap();
    let debian = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["tags"].as_array().unwrap().iter().any(|t| t == "debian"))
        .expect("the debian image")["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let img = work.join("custom.ext4");
    ok(&[
        "cp",
        "--sparse=always",
        env.dir
            .join(format!("data/images/{debian}.ext4"))
            .to_str()
            .unwrap(),
        img.to_str().unwrap(),
    ]);
    std::fs::write(work.join("marker"), "uploaded-by-hr2\n").unwrap();
    std::fs::write(
        work.join("cmds"),
        format!("cd /etc\nwrite {} hr2-marker\n", work.join("marker").display()),
    )
    .unwrap();
    ok(&[
        "debugfs",
        "-w",
        "-f",
        work.join("cmds").to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let sha = sha256(&img);

    step("deployed from the client's file over TLS: uploaded, stored, booted");
    let o = remote(
        &env,
        &work,
        &admin,
        &["machine", "deploy", "./custom.ext4", "-o", "json"],
    );
    let (out, err) = ok_out(&o, "deploy ./custom.ext4");
    assert!(err.contains("uploading ./custom.ext4: 100%"), "{err}");
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (m["name"].as_str(), m["status"].as_str()),
        (Some("custom"), Some("running")),
        "{m}"
    );
    assert_eq!(m["image"], sha.as_str());
    assert_eq!(
        env.cli_ok(&["machine", "exec", "custom", "cat /etc/hr2-marker"]),
        "uploaded-by-hr2\n",
        "the machine runs the uploaded bytes"
    );
    let _ = std::fs::remove_file(&img);

    step("the uploaded image is listed, kept while used, removable by its digest after");
    let e = env.cli_err(&["image", "rm", &sha[..12], "-y"]);
    assert!(e.contains("custom"), "{e}");
    env.cli_ok(&["machine", "delete", "custom", "-y"]);
    env.cli_ok(&["image", "rm", &sha[..12], "-y"]);
    assert!(!env.dir.join(format!("data/images/{sha}.ext4")).exists());
}
