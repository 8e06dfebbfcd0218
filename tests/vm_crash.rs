//! Crash test with real VMs (QEMU; TCG where KVM cannot run the guest): the daemon is killed with
//! SIGKILL at chosen points of deploy, start, stop and delete, started again, and after every
//! round the host must agree with the database: every running machine has exactly one live QEMU,
//! its TAP on the bridge, its cgroup and its map elements; nothing (QEMU, TAP, machine directory,
//! cgroup, map element) exists without its row; every row has its directory and disk; no row is
//! left in `creating`, `starting`, `stopping` or `deleting`; `doctor` passes. A machine that runs
//! through all rounds keeps its one QEMU (re-adopted, never rebooted).
//!
//! The kill points are reached by timing, not by failpoints: the CLI's streamed progress lines
//! (`cloning the image…`, `starting NAME on …`, `booting (…)`, `ready after …`, `stopping NAME`)
//! mark where the daemon is, and the QEMU process list marks the end of a VMM stop.
//! Ignored by plain `cargo test` (named `real_vm_*`); run as root with `sudo scripts/test`, which
//! prepares the assets in `$SISTEMO_TEST_CACHE/data`.

mod common;
use common::vm_state::*;
use common::*;

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where to kill the daemon during an operation.
enum At {
    /// When a progress line containing the text arrives, then after the delay.
    Line(&'static str, Duration),
    /// When the condition holds (polled every 10 ms).
    When(Box<dyn Fn(&Env) -> bool>),
}

/// Run `sistemo ARGS`, SIGKILL the daemon at `at`, start it again. Returns the progress lines
/// the CLI received and whether the operation had already answered when the daemon died.
/// With `again`, the daemon is killed a second time that long into its start-up (while it
/// rolls back or finishes what the first kill interrupted), and started once more.
fn crash_during(
    env: &mut Env,
    args: &[&str],
    at: At,
    again: Option<Duration>,
    watch: &dyn Fn(&Env),
) -> (Vec<String>, bool) {
    let mut child = env.spawn_cli(args);
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    // A line without delay is acted on by the reader itself, as the line arrives: the daemon
    // runs on meanwhile (a state change and the rules take a few milliseconds after "ready").
    let instant = match &at {
        At::Line(text, d) if d.is_zero() => Some((*text, env.daemon_pid().unwrap() as i32)),
        _ => None,
    };
    let reader = std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if let Some((text, pid)) = instant
                && l.contains(text)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = tx.send(l);
        }
    });
    let mut lines = Vec::new();
    let end = Instant::now() + Duration::from_secs(120);
    let mut fire: Option<Instant> = None;
    loop {
        watch(env);
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        if fire.is_none() {
            fire = match &at {
                At::Line(text, delay) => lines
                    .iter()
                    .any(|l| l.contains(text))
                    .then(|| Instant::now() + *delay),
                At::When(f) => f(env).then(Instant::now),
            };
        }
        if fire.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        assert!(
            Instant::now() < end,
            "the kill point of `sistemo {}` never came; progress: {lines:?}",
            args.join(" ")
        );
        if fire.is_none() && child.try_wait().unwrap().is_some() {
            // Drain what came before the exit, then judge.
            reader.join().unwrap();
            while let Ok(l) = rx.try_recv() {
                lines.push(l);
            }
            // The line came just before the answer: the daemon dies right after it.
            if let At::Line(text, _) = &at
                && lines.iter().any(|l| l.contains(text))
            {
                break;
            }
            panic!(
                "`sistemo {}` ended before its kill point; progress: {lines:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let answered = child.try_wait().unwrap().is_some_and(|s| s.success());
    env.kill_daemon("-KILL");
    let _ = child.wait();
    while let Ok(l) = rx.try_recv() {
        lines.push(l);
    }
    let t = Instant::now();
    env.start_daemon();
    if let Some(d) = again {
        std::thread::sleep(d);
        eprintln!("    killed again {:.1}s into its start-up", d.as_secs_f64());
        env.kill_daemon("-KILL");
        env.start_daemon();
    }
    eprintln!(
        "    killed after: {:?}; the CLI {}; daemon back in {:.1}s",
        lines.last(),
        if answered {
            "had answered"
        } else {
            "had not answered"
        },
        t.elapsed().as_secs_f64()
    );
    (lines, answered)
}

fn id_of(env: &Env, name: &str) -> String {
    json(env, &["machine", "status", name, "-o", "json"])["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Removes the cgroups of every machine the test knew once the env (and its QEMUs) is gone, also
/// when the test fails: the harness removes namespaces and processes, not cgroups.
struct CgroupSweep(std::cell::RefCell<BTreeSet<String>>);

impl Drop for CgroupSweep {
    fn drop(&mut self) {
        for id in self.0.borrow().iter() {
            for d in cgroup_dirs(id) {
                for _ in 0..50 {
                    if !d.exists() || std::fs::remove_dir(&d).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_crash_at_every_step_leaves_nothing_inconsistent() {
    let t0 = Instant::now();
    let seed = seed();
    // Every machine id the test has known (the sweep's set), learnt from the machine
    // directories, which appear first in a deploy, also while an operation runs: a deploy rolled
    // back at start leaves no row to learn its id from.
    let sweep = CgroupSweep(Default::default());
    let mut env = Env::qemu("crash", &seed);
    let mut rounds = Vec::new();
    let learn = |env: &Env| {
        if let Ok(rd) = std::fs::read_dir(env.dir.join("data/machines")) {
            let mut seen = sweep.0.borrow_mut();
            for e in rd.flatten() {
                seen.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    };
    let seen = || sweep.0.borrow().clone();

    step("setup: keep, a machine that lives through every round");
    env.cli_ok(&[
        "machine",
        "deploy",
        "debian",
        "--name",
        "keep",
        "--expose",
        "8080:80",
        "--expose",
        "127.0.0.1:5353:53/udp",
    ]);
    learn(&env);
    let keep = id_of(&env, "keep");
    let keep_pid = *qemus(&env).iter().find(|(_, id)| **id == keep).unwrap().0;
    assert_consistent(&env, &seen(), "setup");

    // Each round: what runs, where the daemon dies, and what the machine may be afterwards.
    let mut round = |env: &mut Env,
                     name: &str,
                     args: &[&str],
                     at: At,
                     again: Option<Duration>,
                     machine: &str,
                     allowed: &[&str]| {
        step(name);
        let t = Instant::now();
        let (_, answered) = crash_during(env, args, at, again, &learn);
        learn(env);
        let state = assert_consistent(env, &seen(), name);
        let got = state.get(machine).map_or("absent", |s| s.as_str());
        assert!(
            allowed.contains(&got),
            "{name}: {machine} is {got}, expected one of {allowed:?}; machines: {state:?}"
        );
        assert_eq!(
            state.get("keep").map(String::as_str),
            Some("running"),
            "{name}: keep"
        );
        assert_eq!(
            qemus(env).iter().find(|(_, id)| **id == keep).map(|(p, _)| *p),
            Some(keep_pid),
            "{name}: keep's QEMU was re-adopted, not restarted"
        );
        eprintln!(
            "    {name}: {machine} {got} ({}), {:.1}s",
            if answered {
                "answered before the kill"
            } else {
                "interrupted"
            },
            t.elapsed().as_secs_f64()
        );
        rounds.push(format!("{name} -> {machine} {got}"));
        got.to_string()
    };
    let dir_appeared = |n: usize| -> At {
        At::When(Box::new(move |env: &Env| {
            std::fs::read_dir(env.dir.join("data/machines")).is_ok_and(|rd| rd.count() > n)
        }))
    };

    // deploy
    let deploy = |name: &'static str| {
        vec![
            "machine", "deploy", "debian", "--name", name, "--expose", "9000:80",
        ]
    };
    round(
        &mut env,
        "deploy, killed as its machine directory appears",
        &deploy("d1"),
        dir_appeared(1),
        None,
        "d1",
        &["absent"],
    );
    // Below the default size: no spare disk fits, the image is copied and grown.
    let mut big = deploy("d2");
    big.extend(["--storage", "1500M"]);
    round(
        &mut env,
        "deploy, killed while cloning and growing the disk",
        &big,
        At::Line("cloning the image", Duration::from_millis(150)),
        None,
        "d2",
        &["absent"],
    );
    round(
        &mut env,
        "deploy, killed right after the TAP, at the QEMU spawn",
        &deploy("d3"),
        At::Line("starting d3 on", Duration::ZERO),
        None,
        "d3",
        &["absent"],
    );
    round(
        &mut env,
        "deploy, killed while the guest boots",
        &deploy("d4"),
        At::Line("booting (", Duration::from_millis(1500)),
        None,
        "d4",
        &["absent"],
    );
    round(
        &mut env,
        "deploy, killed while the guest boots, and again in the start-up's rollback",
        &deploy("d5"),
        At::Line("booting (", Duration::from_millis(1500)),
        Some(Duration::from_secs(3)),
        "d5",
        &["absent"],
    );
    let v = round(
        &mut env,
        "deploy, killed at its \"ready\" line (the state, rules and answer win the race)",
        &deploy("v"),
        At::Line("ready after", Duration::ZERO),
        None,
        "v",
        &["absent", "running"],
    );
    if v == "absent" {
        env.cli_ok(&deploy("v"));
        learn(&env);
    }

    // stop
    round(
        &mut env,
        "stop, killed after the rules left, before the VMM stops",
        &["machine", "stop", "v"],
        At::Line("stopping v", Duration::ZERO),
        None,
        "v",
        &["stopped"],
    );

    // start
    round(
        &mut env,
        "start, killed at the QEMU spawn",
        &["machine", "start", "v"],
        At::Line("starting v on", Duration::ZERO),
        None,
        "v",
        &["error"],
    );
    round(
        &mut env,
        "start, killed while the guest boots",
        &["machine", "start", "v"],
        At::Line("booting (", Duration::from_millis(1500)),
        None,
        "v",
        &["error"],
    );
    let v = round(
        &mut env,
        "start, killed at its \"ready\" line (the state, rules and answer win the race)",
        &["machine", "start", "v"],
        At::Line("ready after", Duration::ZERO),
        None,
        "v",
        &["error", "running"],
    );
    if v != "running" {
        env.cli_ok(&["machine", "start", "v"]);
    }

    // stop, later: the guest is powering off
    round(
        &mut env,
        "stop, killed while the guest powers off",
        &["machine", "stop", "v"],
        At::Line("stopping v", Duration::from_millis(300)),
        None,
        "v",
        &["stopped"],
    );

    // delete
    env.cli_ok(&["machine", "start", "v"]);
    round(
        &mut env,
        "delete of a running machine, killed after its rules left",
        &["machine", "delete", "v", "-y"],
        At::Line("stopping v", Duration::ZERO),
        None,
        "v",
        &["absent"],
    );
    env.cli_ok(&deploy("w"));
    learn(&env);
    let w = id_of(&env, "w");
    round(
        &mut env,
        "delete of a running machine, killed as its VMM is gone",
        &["machine", "delete", "w", "-y"],
        At::When(Box::new(move |env: &Env| !qemus(env).values().any(|id| *id == w))),
        None,
        "w",
        &["absent"],
    );
    env.cli_ok(&deploy("x"));
    learn(&env);
    env.cli_ok(&["machine", "stop", "x"]);
    let xdir = env.dir.join("data/machines").join(id_of(&env, "x"));
    round(
        &mut env,
        "delete of a stopped machine, killed as its directory goes",
        &["machine", "delete", "x", "-y"],
        At::When(Box::new(move |_: &Env| !xdir.join("disk.raw").exists())),
        None,
        "x",
        &["absent"],
    );

    step("the end: everything deleted normally leaves nothing");
    for m in json(&env, &["machine", "list", "-o", "json"]).as_array().unwrap() {
        env.cli_ok(&["machine", "delete", m["name"].as_str().unwrap(), "-y"]);
    }
    let seen = seen();
    assert_consistent(&env, &seen, "the end");
    assert!(qemus(&env).is_empty());
    let left: Vec<PathBuf> = seen
        .iter()
        .flat_map(|id| cgroup_dirs(id))
        .filter(|d| d.exists())
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    eprintln!(
        "{} rounds, {} machines seen, {:.0}s:\n  {}",
        rounds.len(),
        seen.len(),
        t0.elapsed().as_secs_f64(),
        rounds.join("\n  ")
    );
}
