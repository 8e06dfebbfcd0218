//! Volume helpers shared by the volume test files: JSON output, names and files of the
//! volumes, content hashes, and refusals.

use super::{Env, ok, poll};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

pub fn json(env: &Env, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&env.cli_ok(&a)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub fn names(env: &Env) -> BTreeSet<String> {
    json(env, &["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

pub fn sha(path: &str) -> String {
    ok(&["sha256sum", path])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `volumes/` holds exactly one `ID.raw` per listed volume and nothing else.
pub fn files_match_rows(env: &Env) {
    let dir = env.dir.join("data/volumes");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let rows: BTreeSet<String> = json(env, &["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("{}.raw", v["id"].as_str().unwrap()))
        .collect();
    assert_eq!(files, rows, "volume files and rows differ");
}

/// Run `args`, expect a one-line error containing `want` and exit code `code`.
pub fn refused(env: &Env, args: &[&str], want: &str, code: i32) {
    let e = env.cli_err(args);
    assert!(e.contains(want), "{args:?}: {e}");
    assert_eq!(env.cli(args).status.code(), Some(code), "{args:?}: {e}");
}

/// How many times the daemon paused at `stage`.
pub fn pauses(env: &Env, stage: &str) -> usize {
    env.log()
        .lines()
        .filter(|l| l.contains("volume operation paused for a test") && l.contains(stage))
        .count()
}

/// Start `args` through the CLI, wait until the daemon pauses at `stage`, kill it with SIGKILL
/// there and start it again.
pub fn kill_at(env: &mut Env, args: &[&str], stage: &str) {
    let n = pauses(env, stage);
    let mut cli = env.spawn_cli(args);
    poll(
        &format!("{args:?} pausing at {stage}"),
        Duration::from_secs(60),
        || (pauses(env, stage) > n).then_some(()),
    );
    env.kill_daemon("-KILL");
    let _ = cli.wait();
    env.start_daemon();
}
