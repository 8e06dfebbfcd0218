//! What a host running real VMs holds, read back for consistency checks: QEMU processes, TAPs,
//! machine directories, cgroups, nftables elements and rows, which must match one another.

use super::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// The prepared VM assets (kernel, initramfs, the `debian` image); panics saying how to make
/// them.
pub fn seed() -> PathBuf {
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

pub fn json(env: &Env, args: &[&str]) -> Value {
    serde_json::from_str(&env.cli_ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// QEMU processes of this env: pid → the machine id its command line names.
pub fn qemus(env: &Env) -> BTreeMap<i32, String> {
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
pub fn simple(id: &str) -> String {
    id.replace('-', "")
}

/// Where the daemon puts a machine's cgroups (v2, or each v1 controller under the daemon's own
/// cgroup, which is the test's: the daemon is its child).
pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
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

/// What the kernel's maps hold and what the database says they must hold.
pub fn elements(env: &Env, machines: &[Value]) -> (BTreeSet<String>, BTreeSet<String>) {
    (
        super::elements::kernel_elements(env),
        super::elements::database_elements(env, machines),
    )
}

/// Every invariant between rounds; `Err` with the first that does not hold (yet). `seen` is
/// every machine id the test has known (for cgroups, which are named by id only).
pub fn consistent(env: &Env, seen: &BTreeSet<String>) -> Result<(), String> {
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
pub fn assert_consistent(env: &Env, seen: &BTreeSet<String>, round: &str) -> BTreeMap<String, String> {
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
