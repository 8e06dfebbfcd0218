//! Templates (warm starts) on real VMs (QEMU; TCG here), through the real daemon and CLI: one
//! template, three clones deployed at once, each with its own identity; a different shape and
//! a damaged template boot cold; deleting clones never touches the template.

mod common;
use common::vm_state::seed;
use common::*;
use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What a clone says about itself, one value per line.
const IDENTITY: &str = "cat /sys/class/net/eth0/address; hostname; cat /etc/machine-id; \
    cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; \
    head -c32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
    ip -4 -o addr show dev eth0 | awk '{print $4}'; date +%s.%N";

/// A TCP connection attempt to `IP` (its sshd), which makes the sender resolve its MAC: the
/// neighbour table then says who answered for that address.
const TOUCH: &str = "timeout 3 bash -c 'echo > /dev/tcp/IP/22' 2>/dev/null";

#[test]
#[ignore = "boots real VMs: run sudo scripts/test"]
fn real_vm_templates_give_each_clone_its_own_identity() {
    let seed = seed();
    let mut env = Env::qemu("warm", &seed);

    step("a daemon killed while it makes a template leaves nothing behind at its next start");
    let templates = env.dir.join("data/templates");
    let mut warm = std::process::Command::new(env!("CARGO_BIN_EXE_sistemo"))
        .arg("--socket")
        .arg(&env.socket)
        .args(["image", "warm", "debian", "--memory", "256M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let vmm_of_template = || {
        let o = run(&["pgrep", "-f", &format!("qemu-system.*{}", templates.display())]);
        o.status.success()
    };
    poll("the template's VMM", Duration::from_secs(60), || {
        vmm_of_template().then_some(())
    });
    env.kill_daemon("-KILL");
    let _ = warm.wait();
    env.start_daemon();
    poll(
        "the half-made template's VMM gone",
        Duration::from_secs(10),
        || (!vmm_of_template()).then_some(()),
    );
    let left: Vec<_> = std::fs::read_dir(&templates)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", templates.display());
    let links = String::from_utf8_lossy(&env.sh("ip -o link show").stdout).into_owned();
    assert!(!links.contains("st-t"), "a template's TAP was left: {links}");

    step("image warm makes a template; image list shows it with its size");
    let t = json(&env.cli_ok(&["image", "warm", "debian", "--memory", "384M", "-o", "json"]));
    let key = t["key"].as_str().unwrap().to_string();
    assert!(t["bytes"].as_u64().unwrap() > 10 << 20, "{t}");
    let images = json(&env.cli_ok(&["image", "list", "-o", "json"]));
    let listed: Vec<String> = images
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["templates"].as_array().cloned().unwrap_or_default())
        .map(|t| t["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, std::slice::from_ref(&key));
    let tdir = env.dir.join("data/templates").join(&key);
    let state_sum = ok(&["sha256sum", tdir.join("state").to_str().unwrap()]);
    // The RAM and disk files are too big to hash in a test: their size and change times move
    // with any write, truncation or chmod.
    let stamp = |f: &str| ok(&["stat", "-c", "%s %Y %Z %i", tdir.join(f).to_str().unwrap()]);
    let ram_stamp = stamp("ram");
    let disk_stamp = stamp("disk.raw");
    // Warming again finds it.
    let again = json(&env.cli_ok(&["image", "warm", "debian", "--memory", "384M", "-o", "json"]));
    assert_eq!(again["key"], t["key"]);

    step("three clones deployed at once");
    let names = ["c1", "c2", "c3"];
    // Each deploy's progress lines, for the message of a failure.
    let deployed: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = names
            .iter()
            .map(|n| {
                let env = &env;
                s.spawn(move || {
                    let o = env.cli(&["machine", "deploy", "debian", "--name", n, "--memory", "384M"]);
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    assert!(o.status.success(), "deploying {n} failed: {text}");
                    text
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (n, progress) in names.iter().zip(&deployed) {
        for l in progress.lines().filter(|l| l.contains("restored in")) {
            println!("{n}: {l}");
        }
    }
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); 7];
    for (&n, progress) in names.iter().zip(&deployed) {
        let st = json(&env.cli_ok(&["machine", "status", n, "-o", "json"]));
        assert_eq!(
            st["template"].as_str(),
            Some(key.as_str()),
            "{n} was not cloned: {st}\ndeploy said:\n{progress}"
        );
        let ip = st["ip"].as_str().unwrap().to_string();
        let before = now();
        let out = env.cli_ok(&["machine", "exec", n, IDENTITY]);
        let after = now();
        let v: Vec<&str> = out.lines().collect();
        assert_eq!(v.len(), 7, "{n}: {out}");
        assert_eq!(v[1], n, "{n}'s hostname");
        assert!(v[5].starts_with(&format!("{ip}/")), "{n}'s address: {}", v[5]);
        assert_ne!(v[0], "02:5e:00:00:00:01", "{n} kept the template's MAC");
        let clock: f64 = v[6].parse().unwrap();
        assert!(
            clock > before - 1.0 && clock < after + 1.0,
            "{n}'s clock {clock} is not within 1s of the host's ({before}..{after})"
        );
        for (i, val) in v.iter().take(6).enumerate() {
            assert!(
                seen[i].insert(val.to_string()),
                "{n} shares line {i} ({val}) with another clone"
            );
        }
        println!(
            "{n}: mac {} ip {} clock off by {:.3}s",
            v[0],
            v[5],
            clock - (before + after) / 2.0
        );
    }

    step("the clones settle: no agent spins on the port its template's host had left");
    for n in names {
        let vmm = json(&env.cli_ok(&["machine", "status", n, "-o", "json"]))["pid"]
            .as_u64()
            .unwrap() as u32;
        // A clone goes on with its template's boot for a while; then it idles.
        poll(&format!("{n}'s VMM to go idle"), Duration::from_secs(90), || {
            (cores_used(vmm, Duration::from_secs(2)) < 0.5).then_some(())
        });
    }

    step("each clone answers at its own address, with its own MAC");
    for n in names {
        let st = json(&env.cli_ok(&["machine", "status", n, "-o", "json"]));
        let ip = st["ip"].as_str().unwrap();
        let mac = env.cli_ok(&["machine", "exec", n, "cat /sys/class/net/eth0/address"]);
        let o = env.sh(&format!("{TOUCH}; ip neigh show {ip}").replace("IP", ip));
        let neigh = String::from_utf8_lossy(&o.stdout);
        assert!(
            neigh.contains(mac.trim()),
            "{ip} is not answered by {n} ({}): {neigh}",
            mac.trim()
        );
        // A clone reaches another clone only at that clone's address and MAC.
        for other in names.iter().filter(|o| **o != n) {
            let oip = json(&env.cli_ok(&["machine", "status", other, "-o", "json"]))["ip"]
                .as_str()
                .unwrap()
                .to_string();
            let seen = env.cli_ok(&[
                "machine",
                "exec",
                n,
                &format!("{TOUCH}; ip neigh show {oip}").replace("IP", &oip),
            ]);
            let omac = env.cli_ok(&["machine", "exec", other, "cat /sys/class/net/eth0/address"]);
            assert!(
                seen.contains(omac.trim()),
                "{n} sees {oip} at {seen}, not {other}'s {omac}"
            );
        }
    }

    step("a clone restarts cold with the same identity");
    env.cli_ok(&["machine", "restart", "c1"]);
    assert_eq!(env.cli_ok(&["machine", "exec", "c1", "hostname"]).trim(), "c1");

    step("another shape is never restored from the template");
    env.cli_ok(&[
        "machine", "deploy", "debian", "--name", "other", "--memory", "256M",
    ]);
    let st = json(&env.cli_ok(&["machine", "status", "other", "-o", "json"]));
    assert!(
        st["template"].is_null(),
        "a 256M machine used a 384M template: {st}"
    );
    env.cli_ok(&["machine", "delete", "other", "-y"]);

    step("--cold boots even with a template");
    env.cli_ok(&[
        "machine", "deploy", "debian", "--name", "cold", "--memory", "384M", "--cold",
    ]);
    let st = json(&env.cli_ok(&["machine", "status", "cold", "-o", "json"]));
    assert!(st["template"].is_null(), "{st}");
    env.cli_ok(&["machine", "delete", "cold", "-y"]);

    step("deleting clones never touches the template");
    for n in names {
        env.cli_ok(&["machine", "delete", n, "-y"]);
    }
    assert_eq!(
        ok(&["sha256sum", tdir.join("state").to_str().unwrap()]),
        state_sum
    );
    assert_eq!(stamp("ram"), ram_stamp, "the template's RAM file was written");
    assert_eq!(stamp("disk.raw"), disk_stamp, "the template's disk was written");

    step("a template whose files were removed behind the daemon's back: a cold boot");
    std::fs::remove_file(tdir.join("state")).unwrap();
    env.cli_ok(&[
        "machine", "deploy", "debian", "--name", "after", "--memory", "384M",
    ]);
    let st = json(&env.cli_ok(&["machine", "status", "after", "-o", "json"]));
    assert!(st["template"].is_null(), "{st}");
    assert_eq!(
        env.cli_ok(&["machine", "exec", "after", "hostname"]).trim(),
        "after"
    );
    env.cli_ok(&["machine", "delete", "after", "-y"]);

    step("image prune removes the broken template");
    let p = json(&env.cli_ok(&["image", "prune", "-o", "json"]));
    assert_eq!(p["templates_removed"], serde_json::json!([key]), "{p}");
    assert!(!tdir.exists());

    step("image rm takes the image's templates with it");
    let t = json(&env.cli_ok(&["image", "warm", "debian", "--memory", "256M", "-o", "json"]));
    let key = t["key"].as_str().unwrap().to_string();
    let tdir = env.dir.join("data/templates").join(&key);
    assert!(tdir.join("ram").exists());
    let rm = json(&env.cli_ok(&["image", "rm", "debian", "-y", "-o", "json"]));
    assert_eq!(rm["templates_removed"], serde_json::json!([key]), "{rm}");
    assert!(!tdir.exists(), "{} left after image rm", tdir.display());
}
