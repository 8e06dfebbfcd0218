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
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The prepared VM assets (kernel, initramfs, the `debian` image); panics saying how to make
/// them.
fn seed() -> PathBuf {
    require_root();
    let cache = std::env::var("SISTEMO_TEST_CACHE").unwrap_or_else(|_| "/var/cache/sistemo-test".into());
    let dir = PathBuf::from(&cache).join("data");
    let debian = std::fs::read_to_string(dir.join("images/index.json"))
        .is_ok_and(|index| index.contains("\"debian\""));
    if !debian || !dir.join("kernel/kernel.json").exists() {
        panic!(
            "VM assets missing in {}: run sudo scripts/prepare-vm-assets {cache} \
             (sudo scripts/test does it; SISTEMO_VM_TESTS=0 scripts/test skips real-VM tests)",
            dir.display()
        );
    }
    dir
}

fn json(env: &Env, args: &[&str]) -> Value {
    serde_json::from_str(&env.cli_ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// QEMU processes of this env: pid → the machine id its command line names.
fn qemus(env: &Env) -> BTreeMap<i32, String> {
    let root = format!("{}/", env.dir.join("data/machines").display());
    let mut out = BTreeMap::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
        if !String::from_utf8_lossy(argv0).contains("qemu-system") {
            continue;
        }
        // A zombie (killed, not reaped yet) is gone for our purposes.
        let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
        if stat.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')) {
            continue;
        }
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if let Some(rest) = cmd.split(&root).nth(1) {
            out.insert(pid, rest.split('/').next().unwrap_or("").to_string());
        }
    }
    out
}

/// The machine's short id as interface names and cgroups use it.
fn simple(id: &str) -> String {
    id.replace('-', "")
}

/// Where the daemon puts a machine's cgroups (v2, or each v1 controller under the daemon's own
/// cgroup, which is the test's: the daemon is its child).
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("/sys/fs/cgroup/sistemo").join(simple(id))];
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for c in ["memory", "pids", "cpu"] {
        let path = own
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':').skip(1);
                f.next().zip(f.next())
            })
            .find(|(ctl, _)| ctl.split(',').any(|x| x == c))
            .map_or("/", |(_, p)| p);
        out.push(
            PathBuf::from("/sys/fs/cgroup")
                .join(c)
                .join(path.trim_start_matches('/'))
                .join("sistemo")
                .join(simple(id)),
        );
    }
    out
}

/// What the kernel's maps hold and what the database says they must hold, as
/// `bind|proto|port -> ip:port` strings (as `tests/faults.rs` compares them).
fn elements(env: &Env, machines: &[Value]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut kernel = BTreeSet::new();
    for map in ["expose_any", "expose_bound"] {
        let o = env.sh(&format!("nft -j list map ip {} {map}", env.table));
        assert!(
            o.status.success(),
            "nft list map {map}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        for e in v["nftables"][1]["map"]["elem"].as_array().into_iter().flatten() {
            let k = e[0]["concat"].as_array().unwrap();
            let d = e[1]["concat"].as_array().unwrap();
            let (bind, k) = if k.len() == 3 {
                (k[0].as_str().unwrap_or("?"), &k[1..])
            } else {
                ("*", &k[..])
            };
            kernel.insert(format!("{bind}|{}|{} -> {}:{}", k[0], k[1], d[0], d[1]).replace('"', ""));
        }
    }
    let mut db = BTreeSet::new();
    for r in json(env, &["ports", "-o", "json"]).as_array().unwrap() {
        if r["state"] != "active" {
            continue;
        }
        let m = machines
            .iter()
            .find(|m| m["name"] == r["machine"])
            .unwrap_or_else(|| panic!("no machine for port row {r}"));
        let range = |s: &str| match s.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
            None => (s.parse().unwrap(), s.parse().unwrap()),
        };
        let (h0, h1) = range(r["host_port"].as_str().unwrap());
        let (m0, _) = range(r["machine_port"].as_str().unwrap());
        for p in h0..=h1 {
            db.insert(format!(
                "{}|{}|{p} -> {}:{}",
                r["bind"].as_str().unwrap_or("*"),
                r["protocol"].as_str().unwrap(),
                m["ip"].as_str().unwrap(),
                m0 + (p - h0)
            ));
        }
    }
    (kernel, db)
}

/// Every invariant between rounds; `Err` with the first that does not hold (yet). `seen` is
/// every machine id the test has known (for cgroups, which are named by id only).
fn consistent(env: &Env, seen: &BTreeSet<String>) -> Result<(), String> {
    let machines = json(env, &["machine", "list", "-o", "json"]);
    let machines = machines.as_array().unwrap().clone();
    let ids: BTreeSet<String> = machines
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let running: BTreeSet<String> = machines
        .iter()
        .filter(|m| m["status"] == "running")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    for m in &machines {
        let st = m["status"].as_str().unwrap();
        if ["creating", "starting", "stopping", "deleting"].contains(&st) {
            return Err(format!("machine {} is stuck in {st}", m["name"]));
        }
    }
    // QEMU: exactly one per running machine, none for any other row or for no row.
    let mut per: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (pid, id) in qemus(env) {
        per.entry(id).or_default().push(pid);
    }
    for (id, pids) in &per {
        if !running.contains(id) {
            return Err(format!(
                "QEMU {pids:?} runs for machine {id}, which is {}",
                machines
                    .iter()
                    .find(|m| m["id"] == id.as_str())
                    .map_or("not in the database".into(), |m| format!("{}", m["status"]))
            ));
        }
        if pids.len() != 1 {
            return Err(format!(
                "machine {id} has {} QEMU processes: {pids:?}",
                pids.len()
            ));
        }
    }
    if let Some(id) = running.iter().find(|id| !per.contains_key(*id)) {
        return Err(format!("running machine {id} has no QEMU"));
    }
    // TAPs: `sm` + 10 hex digits per running machine, each on the bridge; no other.
    let links = String::from_utf8_lossy(&env.sh("ip -o link show").stdout).into_owned();
    let mut taps = BTreeMap::new();
    for l in links.lines() {
        let Some(name) = l.split(": ").nth(1).map(|n| n.split('@').next().unwrap()) else {
            continue;
        };
        if name.starts_with("sm") && name.len() == 12 {
            taps.insert(name.to_string(), l.contains(" master sistemo0 "));
        }
    }
    let want: BTreeSet<String> = running
        .iter()
        .map(|id| format!("sm{}", &simple(id)[..10]))
        .collect();
    let have: BTreeSet<String> = taps.keys().cloned().collect();
    if want != have {
        return Err(format!("TAPs {have:?}, running machines' {want:?}"));
    }
    if let Some((t, _)) = taps.iter().find(|(_, on)| !**on) {
        return Err(format!("TAP {t} is not on the bridge sistemo0"));
    }
    // Machine directories and disks: one per row, with its disk; none without a row.
    let dirs: BTreeSet<String> = std::fs::read_dir(env.dir.join("data/machines"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if dirs != ids {
        return Err(format!("machine directories {dirs:?}, rows {ids:?}"));
    }
    for id in &ids {
        let disk = env.dir.join("data/machines").join(id).join("disk.raw");
        if !disk.is_file() {
            return Err(format!("machine {id} has no disk {}", disk.display()));
        }
    }
    // cgroups: only running machines have one.
    for id in seen {
        if let Some(d) = cgroup_dirs(id).into_iter().find(|d| d.exists())
            && !running.contains(id)
        {
            return Err(format!(
                "cgroup {} left for machine {id}, which is not running",
                d.display()
            ));
        }
    }
    // Map elements: exactly the database's active exposes, and only to running machines.
    let (kernel, db) = elements(env, &machines);
    if kernel != db {
        return Err(format!(
            "map elements differ from the database: kernel-only {:?}, database-only {:?}",
            kernel.difference(&db).collect::<Vec<_>>(),
            db.difference(&kernel).collect::<Vec<_>>()
        ));
    }
    for m in &machines {
        let ip = format!("-> {}:", m["ip"].as_str().unwrap());
        if m["status"] != "running" && kernel.iter().any(|e| e.contains(&ip)) {
            return Err(format!(
                "map elements point at {} machine {}",
                m["status"], m["name"]
            ));
        }
    }
    // No half-made spare disk.
    if let Ok(rd) = std::fs::read_dir(env.dir.join("data/pool")) {
        let filling: Vec<_> = rd
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "filling"))
            .map(|e| e.path())
            .collect();
        if !filling.is_empty() {
            return Err(format!("half-made spare disks: {filling:?}"));
        }
    }
    let d = env.cli(&["doctor"]);
    if !d.status.success() {
        return Err(format!("doctor failed:\n{}", String::from_utf8_lossy(&d.stdout)));
    }
    Ok(())
}

/// Wait (a bounded while: reaping a dead VMM and removing its cgroup take a moment) until the
/// host is consistent; returns the machines by name with their status.
fn assert_consistent(env: &Env, seen: &BTreeSet<String>, round: &str) -> BTreeMap<String, String> {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match consistent(env, seen) {
            Ok(()) => break,
            Err(why) if Instant::now() > end => panic!("{round}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    json(env, &["machine", "list", "-o", "json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(&env.socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    let mut big = deploy("d2");
    big.extend(["--storage", "2500M"]);
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
