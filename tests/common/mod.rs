//! Test harness: each test gets its own network namespace with a real daemon (real bridge,
//! real nftables table, real SQLite file) and tears everything down on drop, even on failure.
//! Machines use the `netns` backend (a namespace with a veth on the bridge, running real
//! servers); the real-VM path is covered by `crates/vmm` tests and `tests/vm.rs`.
//!
//! Every test that builds an `Env` needs root: it is marked
//! `#[ignore = "needs root and network namespaces: run sudo scripts/test"]`, so plain
//! `cargo test` reports it as ignored with that reason, and `scripts/test` (as root) runs it with
//! `--include-ignored`. Run anyway without root, it stops at once with one line saying why.
//! Real-VM tests are named `real_vm_*` (one libtest filter selects or skips them all).
#![allow(dead_code)]

pub mod elements;
pub mod packets;
pub mod remote;
pub mod traffic;
pub mod vm_state;
pub mod volumes;
pub mod web;

// Each test binary uses some of them.
#[allow(unused_imports)]
pub use traffic::{expect_tcp, hold_connections, loopback_attack, tcp_from, udp_from};

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Panic at once, with one line saying why, unless the test runs as root (it creates network
/// namespaces). Called by `Env`; such tests are `#[ignore]`d, so this only fires when they are
/// run with `--include-ignored` (or `--ignored`) by a user who is not root.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "needs root and network namespaces (euid {} is not 0): run sudo scripts/test",
            nix::unistd::geteuid()
        );
    }
}

/// Marks the start of a named step of a long test: a failed assertion after it is reported with
/// the step's name (printed to the test's captured output, which libtest shows on failure).
pub fn step(name: &str) {
    eprintln!("--- step: {name}");
    STEP.with(|s| *s.borrow_mut() = Some(name.to_string()));
}

thread_local! {
    static STEP: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Run a command, return its output (never panics on non-zero exit).
pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"))
}

/// Run a command and require success; return stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// How many cores `pid` used over `window` (user and system time from `/proc`).
pub fn cores_used(pid: u32, window: Duration) -> f64 {
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        // utime and stime, fields 14 and 15 of the line.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let (t0, c0) = (Instant::now(), ticks());
    std::thread::sleep(window);
    (ticks() - c0) as f64 / hz / t0.elapsed().as_secs_f64()
}

/// Poll `f` until it returns Some or the deadline passes.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One isolated host: a namespace running a daemon, plus an "external client" namespace
/// connected by a veth (host side 10.201.0.1/24, client 10.201.0.2/24).
pub struct Env {
    /// Host namespace (where the daemon, bridge and table live).
    pub ns: String,
    /// External client namespace.
    pub client: String,
    /// Prefix of machine namespaces.
    pub prefix: String,
    /// Data dir, socket, config.
    pub dir: PathBuf,
    /// Socket path.
    pub socket: PathBuf,
    /// Table name.
    pub table: String,
    daemon: Option<Child>,
    extra_args: Vec<String>,
    /// Hypervisor backend of the daemon.
    pub hypervisor: String,
    /// Extra environment of the daemon (test hooks such as `SISTEMO_TEST_VOLUME_PAUSE_MS`).
    pub daemon_env: Vec<(String, String)>,
    /// When set, the chosen CLI commands go over TLS with a token (see `remote.rs`).
    pub remote: Option<remote::RemoteCli>,
}

pub const HOST_LAN: &str = "10.201.0.1";
pub const CLIENT_IP: &str = "10.201.0.2";

impl Env {
    /// A fresh environment with a running daemon.
    pub fn new(tag: &str) -> Env {
        Self::with_args(tag, &[])
    }

    /// A fresh environment; `setup` runs in the host namespace before the daemon starts.
    pub fn with_args(tag: &str, args: &[&str]) -> Env {
        Self::build(tag, args, "netns", None)
    }

    /// A fresh environment whose config file also holds `extra` (YAML lines, e.g.
    /// `"block_smtp: false\n"`); a `repair_interval_ms` in `extra` replaces the harness's 200.
    pub fn with_config(tag: &str, extra: &str) -> Env {
        Self::build_with(tag, &[], "netns", None, extra)
    }

    /// An environment whose daemon runs real VMs (QEMU), its data dir seeded (hard links) from
    /// `seed` (kernel, initramfs and images prepared by `scripts/prepare-vm-assets`).
    pub fn qemu(tag: &str, seed: &std::path::Path) -> Env {
        Self::build(tag, &[], "qemu", Some(seed))
    }

    fn build(tag: &str, args: &[&str], hypervisor: &str, seed: Option<&std::path::Path>) -> Env {
        Self::build_with(tag, args, hypervisor, seed, "")
    }

    fn build_with(
        tag: &str,
        args: &[&str],
        hypervisor: &str,
        seed: Option<&std::path::Path>,
        config: &str,
    ) -> Env {
        require_root();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{}{}", tag, std::process::id() % 100000, n);
        let dir = std::env::temp_dir().join(format!("sistemo-test-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = Env {
            ns: format!("st-{id}"),
            client: format!("sc-{id}"),
            prefix: format!("sm{id}-"),
            socket: dir.join("api.sock"),
            table: format!("sistemo_{tag}"),
            dir,
            daemon: None,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            hypervisor: hypervisor.to_string(),
            daemon_env: vec![],
            remote: None,
        };
        if let Some(seed) = seed {
            std::fs::create_dir_all(env.dir.join("data")).unwrap();
            for sub in ["kernel", "images", "ssh"] {
                if seed.join(sub).exists() {
                    ok(&[
                        "cp",
                        "-al",
                        seed.join(sub).to_str().unwrap(),
                        env.dir.join("data").to_str().unwrap(),
                    ]);
                }
            }
        }
        ok(&["ip", "netns", "add", &env.ns]);
        ok(&["ip", "netns", "add", &env.client]);
        env.sh("ip link set lo up");
        env.csh("ip link set lo up");
        let (h, c) = (
            format!("vh{n}{}", std::process::id() % 10000),
            format!("vc{n}{}", std::process::id() % 10000),
        );
        ok(&[
            "ip",
            "link",
            "add",
            &h,
            "netns",
            &env.ns,
            "type",
            "veth",
            "peer",
            "name",
            &c,
            "netns",
            &env.client,
        ]);
        env.sh(&format!(
            "ip addr add {HOST_LAN}/24 dev {h} && ip link set {h} up"
        ));
        env.csh(&format!(
            "ip addr add {CLIENT_IP}/24 dev {c} && ip link set {c} up && ip route add default via {HOST_LAN}"
        ));
        // A config with listeners of its own (`listen`, or Sistemo's `port`) keeps them.
        let over_tls = remote::wanted()
            && !config.contains("listen")
            && !config.lines().any(|l| l.trim_start().starts_with("port:"));
        if over_tls {
            env.write_config(&format!("{config}{}", remote::LISTEN));
        } else {
            env.write_config(config);
        }
        env.start_daemon();
        if over_tls {
            env.go_remote(&["*"]);
        }
        env
    }

    /// Write the config file: the harness's keys (namespace prefix, a 200 ms repair interval
    /// unless `extra` sets one) and `extra`. Takes effect at the next daemon start.
    pub fn write_config(&self, extra: &str) {
        let repair = if extra.contains("repair_interval_ms") {
            ""
        } else {
            "repair_interval_ms: 200\n"
        };
        let path = self.dir.join("config.yml");
        std::fs::write(
            &path,
            format!("netns_prefix: \"{}\"\n{repair}{extra}", self.prefix),
        )
        .unwrap();
        // It may hold the API token: the daemon refuses a token others can read.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }

    /// `nsenter` arguments that run this env's daemon in its namespace.
    fn daemon_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            // nsenter, not `ip netns exec`: the daemon must share the root mount namespace so
            // the machine namespaces it creates are visible to the test.
            format!("--net=/run/netns/{}", self.ns),
            "--".into(),
            env!("CARGO_BIN_EXE_sistemo").into(),
            "--socket".into(),
            self.socket.display().to_string(),
            "up".into(),
            "--config".into(),
            self.dir.join("config.yml").display().to_string(),
            "--data-dir".into(),
            self.dir.join("data").display().to_string(),
            "--nft-table".into(),
            self.table.clone(),
            "--hypervisor".into(),
            self.hypervisor.clone(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Start (or restart) the daemon and wait for its socket to answer.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let args = self.daemon_args();
        let child = Command::new("nsenter")
            .args(&args)
            .envs(self.daemon_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let sock = self.socket.clone();
        let logp = self.dir.join("daemon.log");
        poll("the daemon socket", Duration::from_secs(120), || {
            if let Some(d) = self.daemon.as_mut()
                && let Ok(Some(st)) = d.try_wait()
            {
                panic!(
                    "daemon exited with {st}: {}",
                    std::fs::read_to_string(&logp).unwrap_or_default()
                );
            }
            answers(&sock).then_some(())
        });
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Kill the daemon with a signal and wait for it.
    pub fn kill_daemon(&mut self, signal: &str) {
        if let Some(mut d) = self.daemon.take() {
            let _ = Command::new("kill").args([signal, &d.id().to_string()]).status();
            let _ = d.wait();
        }
    }

    /// Run the CLI against this daemon: over TLS when the env is remote and `args` is one of
    /// its chosen commands, else over the socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        if let Some(r) = &self.remote
            && r.covers(args)
        {
            return r.command(self, args).output().unwrap();
        }
        self.cli_socket(args)
    }

    /// `sistemo --socket SOCKET ARGS…`: the CLI against this daemon over its Unix socket.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sistemo"));
        c.arg("--socket").arg(&self.socket).args(args);
        c
    }

    /// Start the CLI against this daemon over its Unix socket without waiting for it (stdout
    /// discarded, stderr piped).
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        self.cli_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Run the CLI against this daemon over its Unix socket.
    pub fn cli_socket(&self, args: &[&str]) -> Output {
        self.cli_command(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Run the CLI and require success; return stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "sistemo {args:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run the CLI over the socket and require success; return stdout.
    pub fn cli_socket_ok(&self, args: &[&str]) -> String {
        let o = self.cli_socket(args);
        assert!(
            o.status.success(),
            "sistemo {args:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run the CLI expecting failure; return stderr (asserted to be one line).
    pub fn cli_err(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(!o.status.success(), "sistemo {args:?} unexpectedly succeeded");
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        let lines: Vec<&str> = e.lines().filter(|l| !l.starts_with('…')).collect();
        assert_eq!(lines.len(), 1, "error must be one line: {e:?}");
        lines[0].to_string()
    }

    /// Shell in the host namespace.
    pub fn sh(&self, cmd: &str) -> Output {
        run(&["ip", "netns", "exec", &self.ns, "sh", "-c", cmd])
    }

    /// Shell in the external client namespace.
    pub fn csh(&self, cmd: &str) -> Output {
        run(&["ip", "netns", "exec", &self.client, "sh", "-c", cmd])
    }

    /// Deploy a machine and start a TCP server on `port` answering `<name> <peer address>`,
    /// and a UDP echo-style server on `udp` answering the same.
    pub fn machine(&self, name: &str, extra: &[&str]) -> String {
        let mut a = vec!["machine", "deploy", "debian", "--name", name];
        a.extend(extra);
        self.cli_ok(&a);
        let st = self.cli_ok(&["machine", "status", name, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&st).unwrap();
        v["ip"].as_str().unwrap().to_string()
    }

    /// Start a TCP server in machine `name` on `port` replying `<reply> <peer ip>`.
    pub fn serve_tcp(&self, name: &str, port: u16, reply: &str) {
        self.cli_ok(&[
            "machine",
            "exec",
            name,
            &format!("socat TCP-LISTEN:{port},fork,reuseaddr SYSTEM:'echo {reply} $SOCAT_PEERADDR' &"),
        ]);
    }

    /// Start a UDP server in machine `name` on `port` replying `<reply> <peer ip>`.
    pub fn serve_udp(&self, name: &str, port: u16, reply: &str) {
        self.cli_ok(&[
            "machine",
            "exec",
            name,
            &format!("socat UDP-RECVFROM:{port},fork SYSTEM:'echo {reply} $SOCAT_PEERADDR' &"),
        ]);
    }

    /// Namespaces of this env's machines that exist now.
    pub fn machine_namespaces(&self) -> Vec<String> {
        ok(&["ip", "netns", "list"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&self.prefix))
            .map(String::from)
            .collect()
    }

    /// `nft list table` of this env's table.
    pub fn nft_table(&self) -> String {
        String::from_utf8_lossy(&self.sh(&format!("nft list table ip {}", self.table)).stdout).into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_daemon("-KILL");
        for n in self.machine_namespaces() {
            let pids = run(&["ip", "netns", "pids", &n]);
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run(&["kill", "-KILL", p]);
            }
            let _ = run(&["ip", "netns", "del", &n]);
        }
        for n in [&self.ns, &self.client] {
            let pids = run(&["ip", "netns", "pids", n]);
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run(&["kill", "-KILL", p]);
            }
            let _ = run(&["ip", "netns", "del", n]);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            if let Some(s) = STEP.with(|s| s.borrow().clone()) {
                eprintln!("failed in step: {s}");
            }
            eprintln!("daemon log:\n{}", self.log());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Env {
    /// Replace the extra `up` flags for the next start.
    pub fn extra_args_set(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// The running daemon's pid (`nsenter` execs it), e.g. to kill it from another thread at
    /// a precise moment; `kill_daemon` still reaps it.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Start the daemon expecting it to fail; return its output.
    pub fn try_start_daemon(&mut self) -> String {
        let args = self.daemon_args();
        let o = Command::new("nsenter")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success(), "daemon should have refused to start");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// Start the daemon expecting it to refuse: return its output once it exits non-zero.
    /// Panics if it answers on its socket instead (it is killed first) or is still starting
    /// after `timeout`, so a daemon that wrongly starts cannot hang the test.
    pub fn start_daemon_expecting_refusal(&mut self, timeout: Duration) -> String {
        let args = self.daemon_args();
        let mut child = Command::new("nsenter")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let sock = self.socket.clone();
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let o = child.wait_with_output().unwrap();
                assert!(!st.success(), "daemon exited 0 instead of refusing");
                return format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let up = answers(&sock);
            if up || Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon should have refused to start, but {}",
                    if up {
                        "it answers on its socket"
                    } else {
                        "it is still running"
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True when a daemon serves requests on `sock`: a connection alone proves nothing, the socket
/// is bound (and queues connections) before start-up has finished or refused.
pub fn answers(sock: &std::path::Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: sistemo\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/"))
}

impl Env {
    /// An environment whose daemon runs real VMs (see [`Env::qemu`]) with `extra` in its
    /// config file (see [`Env::with_config`]).
    pub fn qemu_with_config(tag: &str, seed: &std::path::Path, extra: &str) -> Env {
        Self::build_with(tag, &[], "qemu", Some(seed), extra)
    }
}
