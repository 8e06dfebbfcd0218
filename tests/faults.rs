//! Fault injection: the daemon is killed with SIGKILL at random moments of deploy, expose,
//! unexpose, delete and network create, started again, and after every round the host must be
//! consistent: no machine left in a transitional state, the kernel's map elements equal to the
//! database's active exposes, no machine namespace or veth without its machine, unique
//! addresses, and `doctor` passing. Also: map elements changed behind the daemon's back are
//! repaired within 2 s.
//! Real daemon and CLI, `netns` hypervisor, in namespaces the harness creates (`tests/common`).

mod common;
use common::elements::{database_elements, kernel_elements};
use common::*;
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A small deterministic generator (xorshift), seeded per run and printed, so a failing
/// sequence can be replayed with `SISTEMO_FAULT_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn json(env: &Env, args: &[&str]) -> Value {
    serde_json::from_str(&env.cli_ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Every invariant the host must hold between rounds; `None` while one does not (yet), with
/// the reason kept in `why`.
fn consistent(env: &Env, why: &mut String) -> Option<()> {
    let machines = json(env, &["machine", "list", "-o", "json"]);
    let machines = machines.as_array().unwrap().clone();
    for m in &machines {
        let st = m["status"].as_str().unwrap();
        if ["creating", "starting", "stopping", "deleting"].contains(&st) {
            *why = format!("machine {} is stuck in {st}", m["name"]);
            return None;
        }
    }
    let ips: Vec<(&str, &str)> = machines
        .iter()
        .map(|m| (m["network"].as_str().unwrap(), m["ip"].as_str().unwrap()))
        .collect();
    let unique: HashSet<_> = ips.iter().collect();
    if unique.len() != ips.len() {
        *why = format!("addresses are not unique: {ips:?}");
        return None;
    }
    let (kernel, db) = (kernel_elements(env), database_elements(env, &machines));
    if kernel != db {
        *why = format!(
            "map elements differ from the database: kernel-only {:?}, database-only {:?}",
            kernel.difference(&db).take(5).collect::<Vec<_>>(),
            db.difference(&kernel).take(5).collect::<Vec<_>>()
        );
        return None;
    }
    let id = |m: &Value, n: usize| m["id"].as_str().unwrap().replace('-', "")[..n].to_string();
    let running: Vec<&Value> = machines.iter().filter(|m| m["status"] == "running").collect();
    let want_ns: BTreeSet<String> = running
        .iter()
        .map(|m| format!("{}{}", env.prefix, id(m, 12)))
        .collect();
    let have_ns: BTreeSet<String> = env.machine_namespaces().into_iter().collect();
    if want_ns != have_ns {
        *why = format!("machine namespaces {have_ns:?}, running machines' {want_ns:?}");
        return None;
    }
    let links = String::from_utf8_lossy(&env.sh("ip -o link show").stdout).into_owned();
    let veths: BTreeSet<String> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .filter(|n| n.starts_with("sm") && n.len() == 12)
        .collect();
    let want_veths: BTreeSet<String> = running.iter().map(|m| format!("sm{}", id(m, 10))).collect();
    if veths != want_veths {
        *why = format!("host veths {veths:?}, running machines' {want_veths:?}");
        return None;
    }
    if let Err(w) = bindings_match(env, &machines) {
        *why = w;
        return None;
    }
    let d = env.cli(&["doctor"]);
    if !d.status.success() {
        *why = format!("doctor failed:\n{}", String::from_utf8_lossy(&d.stdout));
        return None;
    }
    Some(())
}

/// The elements of set `name` of sistemo's bridge table, as strings (`a . b` for concatenations).
fn bridge_set(env: &Env, name: &str) -> BTreeSet<String> {
    let o = env.sh(&format!("nft -j list set bridge {} {name}", env.table));
    assert!(
        o.status.success(),
        "nft list set {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = |e: &Value| e.as_str().map(String::from).unwrap_or_else(|| e.to_string());
    v["nftables"][1]["set"]["elem"]
        .as_array()
        .map(|els| {
            els.iter()
                .map(|e| match e["concat"].as_array() {
                    Some(c) => c.iter().map(text).collect::<Vec<_>>().join(" . "),
                    None => text(e),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The bridge table's port bindings against the database: one port per machine, bound to the
/// machine's IP, and to the MAC its link really has (running machines).
fn bindings_match(env: &Env, machines: &[Value]) -> Result<(), String> {
    let port = |m: &Value| format!("sm{}", &m["id"].as_str().unwrap().replace('-', "")[..10]);
    let want_ports: BTreeSet<String> = machines.iter().map(port).collect();
    let want_ips: BTreeSet<String> = machines
        .iter()
        .map(|m| format!("{} . {}", port(m), m["ip"].as_str().unwrap()))
        .collect();
    let (ports, ips, macs) = (
        bridge_set(env, "ports"),
        bridge_set(env, "port_ip"),
        bridge_set(env, "port_mac"),
    );
    if ports != want_ports {
        return Err(format!("bridge ports {ports:?}, machines' {want_ports:?}"));
    }
    if ips != want_ips {
        return Err(format!("port IPs {ips:?}, machines' {want_ips:?}"));
    }
    let mac_ports: BTreeSet<String> = macs
        .iter()
        .map(|e| e.split(" . ").next().unwrap().to_string())
        .collect();
    if mac_ports != want_ports || macs.len() != want_ports.len() {
        return Err(format!("port MACs {macs:?}, machines' ports {want_ports:?}"));
    }
    for m in machines.iter().filter(|m| m["status"] == "running") {
        let ns = format!(
            "{}{}",
            env.prefix,
            &m["id"].as_str().unwrap().replace('-', "")[..12]
        );
        let link = String::from_utf8_lossy(&run(&["ip", "-n", &ns, "-o", "link", "show", "eth0"]).stdout)
            .into_owned();
        let mac = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1);
        let want = mac.map(|mac| format!("{} . {mac}", port(m)));
        if want.as_ref().is_none_or(|w| !macs.contains(w)) {
            return Err(format!(
                "machine {} has MAC {mac:?}, its port's binding is not it: {macs:?}",
                m["name"]
            ));
        }
    }
    Ok(())
}

fn assert_consistent(env: &Env, round: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    let mut why = String::new();
    while consistent(env, &mut why).is_none() {
        assert!(Instant::now() < end, "round {round}: {why}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn killed_daemon_leaves_a_consistent_host() {
    let mut env = Env::new("flt");
    let seed = std::env::var("SISTEMO_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("SISTEMO_FAULT_SEED={seed}");
    let mut rng = Rng(seed);
    env.machine(
        "base",
        &["--expose", "7000:70", "--expose", "127.0.0.1:7001:71/udp"],
    );
    let rounds: usize = 40;
    let mut interrupted = 0;
    let (mut next_port, mut next_name) = (8000u32, 0u32);
    for round in 0..rounds {
        let machines = json(&env, &["machine", "list", "-o", "json"]);
        let names: Vec<String> = machines
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["name"] != "base")
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        let ports = json(&env, &["ports", "-o", "json"]);
        let exposed: Vec<(String, String)> = ports
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["machine"].as_str().unwrap().to_string(),
                    r["spec"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let pick = |rng: &mut Rng, v: &[String]| v[rng.below(v.len() as u64) as usize].clone();
        let op = rng.below(5);
        let args: Vec<String> = match op {
            0 => {
                next_name += 1;
                next_port += 10;
                let mut a = vec!["machine", "deploy", "debian", "--name"]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>();
                a.push(format!("f{next_name}"));
                a.extend(["--expose".into(), format!("{next_port}:80")]);
                a
            }
            1 => {
                next_port += 10;
                let m = if names.is_empty() || rng.below(2) == 0 {
                    "base".into()
                } else {
                    pick(&mut rng, &names)
                };
                vec![
                    "machine".into(),
                    "expose".into(),
                    m,
                    "--port".into(),
                    format!("{next_port}-{}:80-83", next_port + 3),
                ]
            }
            2 if !exposed.is_empty() => {
                let (m, spec) = exposed[rng.below(exposed.len() as u64) as usize].clone();
                vec![
                    "machine".into(),
                    "unexpose".into(),
                    m,
                    "--port".into(),
                    host_side(&spec),
                ]
            }
            3 if !names.is_empty() => {
                vec![
                    "machine".into(),
                    "delete".into(),
                    pick(&mut rng, &names),
                    "-y".into(),
                ]
            }
            _ => {
                next_name += 1;
                let n = next_name % 200;
                vec![
                    "network".into(),
                    "create".into(),
                    format!("n{next_name}"),
                    "--subnet".into(),
                    format!("10.{}.{}.0/24", 210 + n / 100, n % 100),
                ]
            }
        };
        step(&format!("round {round}: sistemo {}", args.join(" ")));
        let mut child = Command::new(env!("CARGO_BIN_EXE_sistemo"))
            .arg("--socket")
            .arg(&env.socket)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The fault: SIGKILL at a random moment of the operation (or as soon as it is done).
        let delay = Duration::from_millis(rng.below(60));
        let t = Instant::now();
        while t.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        env.kill_daemon("-KILL");
        if !child.wait().unwrap().success() {
            interrupted += 1;
        }
        env.start_daemon();
        assert_consistent(&env, round);
    }
    eprintln!("{interrupted} of {rounds} operations were killed before they answered");
    assert!(
        interrupted > 0,
        "no operation was interrupted: the rounds tested nothing (seed {seed})"
    );
    // The daemon that survived all that still publishes a port.
    env.cli_ok(&["machine", "expose", "base", "--port", "7500:70"]);
    env.serve_tcp("base", 70, "base");
    expect_tcp(&env.client, HOST_LAN, 7500, "base");
}

/// `8080-8083/tcp` style host side of a `ports` spec such as `8080-8083:80-83/tcp`.
fn host_side(spec: &str) -> String {
    let (host, proto) = spec.rsplit_once('/').map_or((spec, None), |(h, p)| (h, Some(p)));
    // [bind:]host[:machine]
    let parts: Vec<&str> = host.split(':').collect();
    let h = match parts.len() {
        3 => format!("{}:{}", parts[0], parts[1]),
        2 if parts[0].contains('.') => format!("{}:{}", parts[0], parts[1]),
        _ => parts[0].to_string(),
    };
    match proto {
        Some(p) => format!("{h}/{p}"),
        None => h,
    }
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn map_elements_changed_behind_the_daemons_back_are_repaired() {
    let env = Env::new("drift");
    env.machine(
        "web",
        &["--expose", "8080:80", "--expose", "127.0.0.1:5353:53/udp"],
    );
    let machines = json(&env, &["machine", "list", "-o", "json"]);
    let want = database_elements(&env, machines.as_array().unwrap());
    assert_eq!(kernel_elements(&env), want);
    let t = &env.table;
    for (what, cmd) in [
        (
            "added",
            format!("nft add element ip {t} expose_any {{ tcp . 9999 : 10.200.0.99 . 22 }}"),
        ),
        (
            "missing",
            format!("nft delete element ip {t} expose_any {{ tcp . 8080 }}"),
        ),
        (
            "changed",
            format!(
                "nft 'delete element ip {t} expose_bound {{ 127.0.0.1 . udp . 5353 }}; add element ip {t} expose_bound {{ 127.0.0.1 . udp . 5353 : 10.200.0.99 . 53 }}'"
            ),
        ),
        ("guard flushed", format!("nft flush chain ip {t} guard")),
    ] {
        step(what);
        let o = env.sh(&cmd);
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let t0 = Instant::now();
        poll(&format!("repair of {what}"), Duration::from_secs(2), || {
            (kernel_elements(&env) == want && env.nft_table().contains("127.0.0.0/8 drop")).then_some(())
        });
        eprintln!("{what}: repaired in {:?}", t0.elapsed());
    }
    // a change elsewhere in the ruleset is left alone and repairs nothing
    let restored = || env.log().matches("restored from the database").count();
    let before = poll("one restore logged per drift", Duration::from_secs(2), || {
        let n = restored();
        (n >= 4).then_some(n)
    });
    env.sh("nft add table ip other");
    poll("a quiet loop", Duration::from_secs(2), || {
        env.sh("nft list table ip other").status.success().then_some(())
    });
    // Nothing to wait for (it must not happen): give the loop three passes (200 ms each).
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(restored(), before);
}

#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn unexpose_and_delete_forget_tracked_flows() {
    let env = Env::new("ct");
    let ip = env.machine("web", &["--expose", "5353:53/udp", "--expose", "8080:80"]);
    let flows = |filter: &str| {
        let o = env.sh(&format!("conntrack -L {filter} 2>/dev/null"));
        String::from_utf8_lossy(&o.stdout).lines().count()
    };
    env.serve_udp("web", 53, "web");
    poll("a UDP answer through 5353", Duration::from_secs(10), || {
        udp_from(&env.client, HOST_LAN, 5353).filter(|r| r.starts_with("web"))
    });
    assert!(
        flows("-p udp --orig-port-dst 5353") >= 1,
        "the UDP flow is tracked"
    );
    env.cli_ok(&["machine", "unexpose", "web", "--port", "5353/udp"]);
    assert_eq!(
        flows("-p udp --orig-port-dst 5353"),
        0,
        "unexpose forgot the flow"
    );
    env.serve_tcp("web", 80, "web");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
    assert!(
        flows(&format!("--reply-src {ip}")) >= 1,
        "the TCP flow is tracked"
    );
    env.cli_ok(&["machine", "delete", "web", "-y"]);
    assert_eq!(
        flows(&format!("--reply-src {ip}")),
        0,
        "delete forgot the address's flows"
    );
    assert_eq!(flows(&format!("--orig-src {ip}")), 0);
}

fn finished_ok(child: std::process::Child, what: &str) {
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

// Hole 6's trigger: `machine delete a -y` racing `network create` (a rebuild of the whole
// table from the database): none of a's rules may come back, and a's address is handed out
// again only after every never-used one.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn delete_racing_network_create_leaves_no_rules_and_reuses_the_address_last() {
    let env = Env::new("delrace");
    let mut released = vec![];
    for round in 0..6u16 {
        let name = format!("a{round}");
        let ip = env.machine(&name, &["--expose", &format!("{}:80", 8100 + round)]);
        let points_to_a = |env: &Env| {
            kernel_elements(env)
                .into_iter()
                .filter(|e| e.contains(&format!("-> {ip}:")))
                .collect::<Vec<_>>()
        };
        assert_eq!(points_to_a(&env).len(), 1, "control: a's expose is in the kernel");
        step(&format!(
            "round {round}: delete {name} while a network is created"
        ));
        let del = env.spawn_cli(&["machine", "delete", &name, "-y"]);
        // The race's offset (not a wait for anything): the rebuild starts at a different moment
        // of the delete each round.
        std::thread::sleep(Duration::from_millis(u64::from(round) * 3));
        let net = env.spawn_cli(&[
            "network",
            "create",
            &format!("n{round}"),
            "--subnet",
            &format!("10.220.{round}.0/24"),
        ]);
        finished_ok(del, "machine delete");
        finished_ok(net, "network create");
        assert_eq!(
            points_to_a(&env),
            Vec::<String>::new(),
            "round {round}: {name}'s rules came back"
        );
        let machines = json(&env, &["machine", "list", "-o", "json"]);
        assert_eq!(
            kernel_elements(&env),
            database_elements(&env, machines.as_array().unwrap()),
            "round {round}: the kernel's elements are the database's"
        );
        released.push(ip);
    }
    step("the next deploys do not get a released address");
    for n in 0..3 {
        let ip = env.machine(&format!("fresh{n}"), &[]);
        assert!(
            !released.contains(&ip),
            "a new machine got {ip}, released by a deleted one ({released:?})"
        );
    }
}

// Hole 6: a kernel batch delete aborts whole when one element is missing; the failure makes
// the daemon rebuild from the database, so an unexposed range leaves nothing behind.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn failed_element_batch_delete_ends_with_none_of_the_range() {
    // no repair pass: it would put the hand-deleted element back before the unexpose
    let env = Env::with_config("batchdel", "repair_interval_ms: 600000\n");
    env.machine("m", &["--expose", "9000-9003:80-83", "--expose", "9100:80"]);
    let range = |env: &Env| {
        kernel_elements(env)
            .into_iter()
            .filter(|e| (9000..=9003).any(|p| e.starts_with(&format!("*|tcp|{p} "))))
            .count()
    };
    assert_eq!(range(&env), 4, "control: the range is in the kernel");
    step("one element of the range deleted by hand, then the range unexposed");
    let o = env.sh(&format!(
        "nft delete element ip {} expose_any {{ tcp . 9001 }}",
        env.table
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(range(&env), 3);
    env.cli_ok(&["machine", "unexpose", "m", "--port", "9000-9003/tcp"]);
    assert!(
        env.log()
            .contains("element change failed; rebuilding from the database"),
        "control: the batch delete failed in the kernel: {}",
        env.log()
    );
    assert_eq!(range(&env), 0, "elements of the unexposed range stayed");
    let machines = json(&env, &["machine", "list", "-o", "json"]);
    let db = database_elements(&env, machines.as_array().unwrap());
    assert_eq!(
        kernel_elements(&env),
        db,
        "the kernel's elements are the database's"
    );
    assert_eq!(db.len(), 1, "the other expose stays: {db:?}");
}
