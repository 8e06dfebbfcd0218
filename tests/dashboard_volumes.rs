//! The dashboard's volumes page in a real headless Chromium (Debian's, driven by
//! playwright-core from tests/browser/volumes.mjs), browser and daemon inside the test's network
//! namespace: an admin creates, snapshots, clones, attaches, detaches and deletes volumes through
//! the page and sees CLI changes live; a viewer sees it read-only and gets 403. Screenshots land
//! in target/screenshots (volumes-*.png).

mod common;
use common::web::*;
use common::*;
use serde_json::Value;

/// Run one scenario of tests/browser/volumes.mjs in the env's namespace; its output.
fn scenario(env: &Env, mode: &str, user: &str, pass: &str) -> String {
    browser_scenario(env, "volumes.mjs", "http://127.0.0.1:7777/", mode, user, pass)
}

fn volumes(env: &Env) -> Vec<Value> {
    serde_json::from_str::<Value>(&env.cli_ok(&["volume", "list", "-o", "json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn volumes_page_in_headless_chromium() {
    let env = Env::new("hr2vol");
    add_user(&env, "ada", "admin", "ada-password");
    add_user(&env, "val", "viewer", "val-password");
    env.machine("db", &[]);
    env.cli_ok(&["machine", "stop", "db"]);
    env.machine("web", &[]);

    step("admin: create, snapshot, clone, attach, refused delete, detach, delete, live CLI changes");
    let out = scenario(&env, "admin", "ada", "ada-password");
    if let Some(ms) = out
        .lines()
        .find_map(|l| l.strip_prefix("volume_event_latency_ms "))
    {
        println!("RESULT volume_event_latency_ms={ms}");
    }
    let vs = volumes(&env);
    let by = |n: &str| vs.iter().find(|v| v["name"] == n).cloned();
    let pg = by("pgdata").expect("pgdata exists");
    assert_eq!(
        (pg["size_bytes"].as_u64(), pg["format"].as_str()),
        (Some(64 << 20), Some("ext4"))
    );
    assert_eq!(pg["attached_to"], serde_json::json!([]), "detached: {pg}");
    let snap = by("pg-snap").expect("the snapshot exists");
    assert_eq!(
        (snap["kind"].as_str(), snap["source"].as_str()),
        (Some("snapshot"), Some("volume pgdata"))
    );
    assert_eq!(by("pg-clone").expect("the clone")["source"], "snapshot pg-snap");
    assert!(by("fromcli").is_none(), "deleted through the page");
    let h: Value = serde_json::from_str(&env.cli_ok(&["history", "--limit", "200", "-o", "json"])).unwrap();
    let by_ada = |action: &str, result: &dyn Fn(&str) -> bool| {
        h.as_array().unwrap().iter().any(|e| {
            e["actor"] == "user ada" && e["action"] == action && result(e["result"].as_str().unwrap_or(""))
        })
    };
    for a in [
        "volume.create",
        "volume.snapshot",
        "volume.clone",
        "machine.volume.attach",
        "machine.volume.detach",
    ] {
        assert!(by_ada(a, &|r| r == "ok"), "{a} by user ada: {h}");
    }
    assert!(
        by_ada("volume.delete", &|r| r.contains("attached")),
        "the refused delete: {h}"
    );
    assert!(
        by_ada("machine.volume.attach", &|r| r.contains("running")),
        "the refused attach: {h}"
    );

    step("viewer: read-only page, 403 from the API");
    scenario(&env, "viewer", "val", "val-password");
    assert_eq!(volumes(&env), vs, "the viewer changed nothing");
}
