//! Traffic helpers of the harness: TCP and UDP clients run from a namespace, the loopback
//! attack's set-up, and floods of idle connections.

use super::{Env, ok, poll, run};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Connect over TCP from namespace `ns` and return the reply line, or None when it fails
/// within 2 s.
pub fn tcp_from(ns: &str, addr: &str, port: u16) -> Option<String> {
    let o = run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "socat",
        "-T2",
        "-",
        &format!("TCP:{addr}:{port},connect-timeout=2"),
    ]);
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

/// Send a UDP datagram from a namespace and return the reply, or None within 2 s.
pub fn udp_from(ns: &str, addr: &str, port: u16) -> Option<String> {
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "socat",
            "-T2",
            "-",
            &format!("UDP:{addr}:{port}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"ping\n")?;
            c.wait_with_output()
        })
        .ok()?;
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Poll until a TCP connection from `ns` gets a reply starting with `want`.
pub fn expect_tcp(ns: &str, addr: &str, port: u16, want: &str) -> String {
    poll(
        &format!("{want} at {addr}:{port} from {ns}"),
        Duration::from_secs(10),
        || tcp_from(ns, addr, port).filter(|r| r.starts_with(want)),
    )
}

/// The CVE-2020-8558 set-up: a host service bound to 127.0.0.1:7778 answering `secret` (7777 is the daemon's own API), and the
/// env's (only) machine routing 127.0.0.1 to the host's bridge; the machine's namespace.
pub fn loopback_attack(env: &Env) -> String {
    env.sh("socat TCP-LISTEN:7778,bind=127.0.0.1,fork,reuseaddr SYSTEM:'echo secret' >/dev/null 2>&1 &");
    expect_tcp(&env.ns, "127.0.0.1", 7778, "secret");
    let ns = env.machine_namespaces().pop().unwrap();
    ok(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "sh",
        "-c",
        "sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1 && \
         ip addr del 127.0.0.1/8 dev lo && ip route add 127.0.0.1/32 via 10.200.0.1 dev eth0 src 10.200.0.2 onlink",
    ]);
    ns
}

/// `n` idle TCP connections to `addr:port`, opened from namespace `ns` and held (a python3
/// process) until the guard is dropped; returns once they were attempted.
pub fn hold_connections(ns: &str, addr: &str, port: u16, n: usize) -> impl Drop {
    struct Held(std::process::Child);
    impl Drop for Held {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c"])
        .arg(format!(
            "import resource,socket,time\n\
             resource.setrlimit(resource.RLIMIT_NOFILE,({fds},{fds}))\n\
             s=[]\n\
             for _ in range({n}):\n\
             \x20 c=socket.socket()\n\
             \x20 c.setblocking(False)\n\
             \x20 c.connect_ex(('{addr}',{port}))\n\
             \x20 s.append(c)\n\
             time.sleep(1)\n\
             print('open',flush=True)\n\
             time.sleep(120)",
            fds = n * 2 + 64
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = Held(child);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(
        line.trim(),
        "open",
        "{n} connections to {addr}:{port} were attempted"
    );
    held
}
