//! Volumes through the real CLI and daemon (`netns` hypervisor, real SQLite, real mkfs.ext4,
//! e2fsck and resize2fs on the files): create, list, show, resize, snapshot, clone, delete,
//! attach and detach, with every bad input refused in one line and nothing changed. Crashes
//! and storage limits: `tests/volumes_safety.rs`.

mod common;
use common::volumes::*;
use common::*;
use std::os::unix::fs::PermissionsExt;

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn volumes_through_the_cli() {
    let env = Env::new("svol");
    step("create, list, show");
    let v = json(&env, &["volume", "create", "64M", "--name", "pgdata"]);
    assert_eq!(
        (v["kind"].as_str(), v["format"].as_str()),
        (Some("volume"), Some("ext4"))
    );
    assert_eq!(v["size_bytes"], 64 << 20);
    let path = v["path"].as_str().unwrap().to_string();
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&md) * 512 < 32 << 20,
        "sparse"
    );
    let dir = std::fs::metadata(env.dir.join("data/volumes")).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    ok(&["e2fsck", "-fn", &path]);
    let raw = json(&env, &["volume", "add", "16M", "--format", "raw"]);
    let gen_name = raw["name"].as_str().unwrap().to_string();
    assert!(gen_name.starts_with("vol-"), "{gen_name}");
    assert_eq!(raw["format"], "raw");
    for alias in ["show", "get", "info"] {
        assert_eq!(
            json(&env, &["volume", alias, "pgdata"])["path"].as_str(),
            Some(path.as_str())
        );
    }
    assert!(env.cli_ok(&["volume", "ls"]).contains("pgdata"));

    step("bad input: one line, nothing changed");
    let before = names(&env);
    for (args, want, code) in [
        (
            vec!["volume", "create", "0", "--name", "z"],
            "greater than zero",
            2,
        ),
        (vec!["volume", "create", "-5G", "--name", "z"], "is not a size", 2),
        (
            vec!["volume", "create", "lots", "--name", "z"],
            "is not a size",
            2,
        ),
        (vec!["volume", "create", "300G", "--name", "z"], "max_storage", 2),
        (
            vec!["volume", "create", "1M", "--name", "z"],
            "too small for ext4",
            2,
        ),
        (vec!["volume", "create", "1G", "--name", "Bad"], "\"Bad\"", 2),
        (
            vec!["volume", "create", "16M", "--name", "pgdata"],
            "already taken",
            1,
        ),
        (vec!["volume", "show", "nope"], "\"nope\" does not exist", 1),
        (
            vec!["volume", "resize", "nope", "1G"],
            "\"nope\" does not exist",
            1,
        ),
        (vec!["volume", "resize", "pgdata", "32M"], "only grow", 2),
        (vec!["volume", "resize", "pgdata", "0"], "greater than zero", 2),
        (
            vec!["volume", "snapshot", "nope", "s"],
            "\"nope\" does not exist",
            1,
        ),
        (vec!["volume", "clone", "nope", "c"], "\"nope\" does not exist", 1),
        (
            vec!["-y", "volume", "delete", "nope"],
            "\"nope\" does not exist",
            1,
        ),
    ] {
        refused(&env, &args, want, code);
    }
    assert_eq!(names(&env), before);
    assert_eq!(json(&env, &["volume", "show", "pgdata"])["size_bytes"], 64 << 20);
    files_match_rows(&env);

    step("resize grows the file and its ext4");
    let blocks = |p: &str| -> u64 {
        let o = ok(&["dumpe2fs", "-h", p]);
        let l = o
            .lines()
            .find(|l| l.starts_with("Block count:"))
            .unwrap()
            .to_string();
        l.split_whitespace().last().unwrap().parse().unwrap()
    };
    let b0 = blocks(&path);
    let r = json(&env, &["volume", "resize", "pgdata", "128M"]);
    assert_eq!(r["size_bytes"], 128 << 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 << 20);
    assert!(blocks(&path) >= b0 * 2 - 1024, "{} vs {b0}", blocks(&path));
    ok(&["e2fsck", "-fn", &path]);

    step("attach: deploy --attach, one writer, no hot-plug, no delete while attached");
    env.machine("a", &["--attach", "pgdata:/data"]);
    let m = json(&env, &["machine", "status", "a"]);
    assert_eq!(m["volumes"][0]["volume"], "pgdata");
    assert_eq!(m["volumes"][0]["mount"], "/data");
    refused(
        &env,
        &["machine", "deploy", "debian", "--name", "b", "--attach", "pgdata"],
        "read-write to machine a",
        1,
    );
    assert!(
        env.cli_err(&["machine", "status", "b"])
            .contains("does not exist")
    );
    refused(
        &env,
        &["machine", "volume", "attach", "a", &gen_name],
        "hot-plug is not implemented",
        1,
    );
    refused(
        &env,
        &["-y", "volume", "delete", "pgdata"],
        "attached to machine(s) a",
        1,
    );
    refused(
        &env,
        &["volume", "resize", "pgdata", "256M"],
        "stop them first",
        1,
    );
    // A copy of a file its machine writes to would be torn.
    refused(
        &env,
        &["volume", "snapshot", "pgdata", "hot"],
        "cannot be snapshotted while machine a (running) may write to it",
        1,
    );
    refused(
        &env,
        &["volume", "clone", "pgdata", "hot"],
        "cannot be cloned while machine a (running) may write to it",
        1,
    );
    assert!(!names(&env).contains("hot"));
    refused(
        &env,
        &["machine", "volume", "attach", "a", "nope"],
        "\"nope\" does not exist",
        1,
    );
    refused(
        &env,
        &["machine", "volume", "attach", "a", "pgdata", "--mount", "data"],
        "absolute",
        2,
    );
    assert_eq!(
        json(&env, &["machine", "volume", "ls", "a"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    step("stopped: attach read-only, raw without a mount, detach");
    env.cli_ok(&["machine", "stop", "a"]);
    refused(
        &env,
        &["machine", "volume", "attach", "a", &gen_name, "--mount", "/raw"],
        "is raw",
        2,
    );
    env.cli_ok(&["machine", "volume", "attach", "a", &gen_name, "--readonly"]);
    let vs = json(&env, &["machine", "volume", "list", "a"]);
    assert_eq!(vs.as_array().unwrap().len(), 2);
    assert_eq!(vs[1]["readonly"], true);
    env.cli_ok(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "b",
        "--attach",
        &format!("{gen_name}:ro"),
    ]);
    refused(
        &env,
        &["machine", "volume", "detach", "a", "nope"],
        "does not exist",
        1,
    );
    // Read-only users do not change it: it can be copied while they run.
    env.cli_ok(&["volume", "snapshot", &gen_name, "ro-snap"]);
    env.cli_ok(&["-y", "volume", "delete", "ro-snap"]);
    env.cli_ok(&["machine", "volume", "detach", "a", &gen_name]);
    env.cli_ok(&["machine", "start", "a"]);

    step("snapshot and clone");
    env.cli_ok(&["machine", "stop", "a"]);
    let snap = json(&env, &["volume", "snapshot", "pgdata", "snap1"]);
    assert_eq!(snap["kind"], "snapshot");
    assert_eq!(sha(snap["path"].as_str().unwrap()), sha(&path));
    refused(
        &env,
        &["machine", "volume", "attach", "a", "snap1"],
        "is a snapshot",
        1,
    );
    refused(&env, &["volume", "resize", "snap1", "1G"], "is a snapshot", 2);
    let c = json(&env, &["volume", "clone", "snap1", "c1"]);
    assert_eq!(
        (c["kind"].as_str(), c["size_bytes"].as_u64()),
        (Some("volume"), Some(128 << 20))
    );
    assert!(c["source"].as_str().unwrap().contains("snap1"));
    ok(&["e2fsck", "-fn", c["path"].as_str().unwrap()]);
    // netns machines have no root disk (the real-VM test snapshots one)
    refused(&env, &["machine", "snapshot", "a"], "no disk to snapshot", 2);

    step("machine delete keeps volumes; volume delete removes them");
    env.cli_ok(&["-y", "machine", "delete", "a"]);
    env.cli_ok(&["-y", "machine", "delete", "b"]);
    assert!(
        json(&env, &["volume", "show", "pgdata"])["attached_to"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(std::path::Path::new(&path).exists());
    env.cli_ok(&["-y", "volume", "rm", "pgdata"]);
    assert!(!std::path::Path::new(&path).exists());
    refused(&env, &["volume", "show", "pgdata"], "does not exist", 1);
    files_match_rows(&env);
    let h = json(&env, &["history", "--action", "volume"]);
    assert!(
        h.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "volume.create"),
        "{h}"
    );
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn deploy_attaches_repeated_and_comma_separated_volumes() {
    let env = Env::new("svolm");
    for v in ["va", "vb", "vc", "vd"] {
        env.cli_ok(&["volume", "create", "16M", "--name", v]);
    }
    let attached = |m: &str| -> Vec<(String, String, bool)> {
        json(&env, &["machine", "volume", "list", m])
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["volume"].as_str().unwrap().to_string(),
                    a["mount"].as_str().unwrap_or("-").to_string(),
                    a["readonly"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let t = |v: &str, m: &str, ro: bool| (v.to_string(), m.to_string(), ro);

    step("--attach a --attach b");
    env.machine("rep", &["--attach", "va:/a", "--attach", "vb"]);
    assert_eq!(attached("rep"), [t("va", "/a", false), t("vb", "-", false)]);

    step("--attach a,b (mounts and :ro in the list)");
    env.machine("comma", &["--attach", "vc:/c,vd:/d:ro"]);
    assert_eq!(attached("comma"), [t("vc", "/c", false), t("vd", "/d", true)]);
    let vd = json(&env, &["volume", "show", "vd"]);
    assert_eq!(vd["attached_to"].as_array().unwrap().len(), 1, "{vd}");

    step("one bad name in the list: no machine, nothing attached");
    let e = env.cli_err(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "bad",
        "--attach",
        "vd:ro,nope",
    ]);
    assert!(e.contains("\"nope\" does not exist"), "{e}");
    assert!(
        env.cli_err(&["machine", "status", "bad"])
            .contains("does not exist")
    );
    assert_eq!(
        json(&env, &["volume", "show", "vd"])["attached_to"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
