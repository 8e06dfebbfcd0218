//! Network isolation (issue 9), one test per hole, each performing the real attack with real
//! packets, plus a control showing the legitimate path still works and, where cheap, that the
//! same attack succeeds once sistemo's rule is gone (so the test is real):
//! direct routing around exposes, ARP/IP/MAC spoofing between machines, IPv6 router
//! advertisements and DHCP-server replies, machines reaching the host and the metadata address,
//! outbound SMTP, the self-repaired loopback guard, the foreign-chain compat rules, and bind
//! addresses (`0.0.0.0`, the API port).
//! Everything happens in namespaces each test creates (harness: `tests/common`); packets that
//! no tool in `scripts/deps` sends are crafted by a small Python script over raw sockets.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Crafts the packets of the attacks (run as root inside a namespace):
/// `arp IF OP SIP TIP DST [COUNT]`, `ping IP [TIMEOUT]`, `ra IF PREFIX`, `dhcp IF`,
/// `udp SRC DST PORT PAYLOAD`, `sniff IF MARKER_IP [TIMEOUT]`.
const PKT_PY: &str = r##"
# Packets the isolation tests craft (run inside a namespace as root).
import fcntl, os, select, socket, struct, sys, time

def own_mac(ifname):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    info = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("256s", ifname.encode()[:15]))
    return info[18:24]

def mac(text):
    return bytes(int(x, 16) for x in text.split(":"))

def l2(ifname):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((ifname, 0))
    return s

def csum(data):
    if len(data) % 2:
        data += b"\0"
    t = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF

def arp(ifname, op, sip, tip, dst, count):
    """ARP from this port's MAC claiming `sip`; op 1 request, 2 reply; dst MAC or 'bcast'."""
    me = own_mac(ifname)
    dst_mac = b"\xff" * 6 if dst == "bcast" else mac(dst)
    # a broadcast reply names its sender as target, as gratuitous replies do
    tha = b"\0" * 6 if op == 1 else (me if dst == "bcast" else dst_mac)
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, me,
                       socket.inet_aton(sip), tha, socket.inet_aton(tip))
    s = l2(ifname)
    for _ in range(count):
        s.send(dst_mac + me + b"\x08\x06" + body)

def ping(dst, timeout):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    end = time.time() + timeout
    seq = 0
    while time.time() < end:
        seq += 1
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"sistemo-ping"
        hdr = hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:]
        s.sendto(hdr, (dst, 0))
        stop = min(end, time.time() + 0.3)
        while time.time() < stop:
            r, _, _ = select.select([s], [], [], max(0, stop - time.time()))
            if not r:
                break
            pkt, addr = s.recvfrom(2048)
            ihl = (pkt[0] & 15) * 4
            t, _, _, i = struct.unpack("!BBHH", pkt[ihl:ihl + 6])
            if t == 0 and i == ident and addr[0] == dst:
                print("reply")
                return 0
    return 1

def ll_of(m):
    eui = bytes([m[0] ^ 2]) + m[1:3] + b"\xff\xfe" + m[3:6]
    return b"\xfe\x80" + b"\0" * 6 + eui

def ra(ifname, prefix):
    """A router advertisement (lifetime 1800 s, one autoconf prefix /64) to ff02::1."""
    me = own_mac(ifname)
    src = ll_of(me)
    dst = socket.inet_pton(socket.AF_INET6, "ff02::1")
    pfx = socket.inet_pton(socket.AF_INET6, prefix)
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    body += struct.pack("!BB6s", 1, 1, me)
    body += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0, pfx)
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", csum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + src + dst
    s = l2(ifname)
    for _ in range(3):
        s.send(b"\x33\x33\x00\x00\x00\x01" + me + b"\x86\xdd" + ip6 + body)

def dhcp_reply(ifname):
    """A UDP datagram from port 67 to 255.255.255.255:68, as a DHCP server's offer goes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    s.bind(("0.0.0.0", 67))
    for _ in range(3):
        s.sendto(b"\x02\x01\x06\x00sistemo-dhcp-offer", ("255.255.255.255", 68))

def udp_spoof(src, dst, port, payload):
    """An IPv4 UDP datagram with any source address (raw socket, the kernel routes it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    data = payload.encode()
    udp = struct.pack("!HHHH", 40000, port, 8 + len(data), 0) + data
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + udp, (dst, 0))

def sniff(ifname, marker, timeout):
    """Print RA / DHCP for each such frame received on `ifname`, until an ARP request for
    `marker` arrives (printed as MARKER) or `timeout` s pass."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((ifname, 0))
    print("ready", flush=True)
    want = socket.inet_aton(marker)
    end = time.time() + timeout
    while time.time() < end:
        r, _, _ = select.select([s], [], [], max(0, end - time.time()))
        if not r:
            break
        f, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        et = struct.unpack("!H", f[12:14])[0]
        if et == 0x86DD and f[20] == 58 and f[54] == 134:
            print("RA", flush=True)
        elif et == 0x0800 and f[23] == 17:
            ihl = (f[14] & 15) * 4
            if struct.unpack("!H", f[14 + ihl:16 + ihl])[0] == 67:
                print("DHCP", flush=True)
        elif et == 0x0806 and f[38:42] == want:
            print("MARKER", flush=True)
            return 0
    return 1

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "arp":
    arp(args[0], int(args[1]), args[2], args[3], args[4], int(args[5]) if len(args) > 5 else 3)
elif cmd == "ping":
    sys.exit(ping(args[0], float(args[1]) if len(args) > 1 else 2))
elif cmd == "ra":
    ra(args[0], args[1])
elif cmd == "dhcp":
    dhcp_reply(args[0])
elif cmd == "udp":
    udp_spoof(args[0], args[1], int(args[2]), args[3])
elif cmd == "sniff":
    sys.exit(sniff(args[0], args[1], float(args[2]) if len(args) > 2 else 10))
else:
    sys.exit("unknown command " + cmd)
"##;

/// The default network's gateway (the bridge address).
const GW: &str = "10.200.0.1";
/// The default network's bridge.
const BRIDGE: &str = "sistemo0";

/// Run the packet script in namespace `ns`.
fn pkt(env: &Env, ns: &str, args: &[&str]) -> Output {
    let p = env.dir.join("pkt.py");
    if !p.exists() {
        std::fs::write(&p, PKT_PY).unwrap();
    }
    let mut a = vec!["ip", "netns", "exec", ns, "python3", p.to_str().unwrap()];
    a.extend(args);
    run(&a)
}

/// Run the packet script and require success.
fn pkt_ok(env: &Env, ns: &str, args: &[&str]) {
    let o = pkt(env, ns, args);
    assert!(
        o.status.success(),
        "packet script {args:?} in {ns} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Whether `ns` gets an ICMP echo reply from `ip` within `secs`.
fn pings(env: &Env, ns: &str, ip: &str, secs: &str) -> bool {
    pkt(env, ns, &["ping", ip, secs]).status.success()
}

/// The namespace of the machine holding `ip`.
fn ns_of(env: &Env, ip: &str) -> String {
    let want = format!("inet {ip}/");
    env.machine_namespaces()
        .into_iter()
        .find(|n| String::from_utf8_lossy(&run(&["ip", "-n", n, "-4", "addr"]).stdout).contains(&want))
        .unwrap_or_else(|| panic!("no machine namespace holds {ip}"))
}

/// The MAC address of `eth0` in namespace `ns`.
fn mac_of(ns: &str) -> String {
    let o = ok(&["ip", "-n", ns, "-o", "link", "show", "eth0"]);
    o.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_string()
}

/// The MAC a neighbour entry (`ip neigh show IP dev DEV`, run with `prefix`) points to.
fn lladdr(out: &str) -> Option<String> {
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(String::from)
}

/// The host's neighbour entry for `ip` on the default bridge.
fn host_neigh(env: &Env, ip: &str) -> Option<String> {
    lladdr(&String::from_utf8_lossy(
        &env.sh(&format!("ip neigh show {ip} dev {BRIDGE}")).stdout,
    ))
}

/// A machine's neighbour entry for `ip` on its `eth0`.
fn machine_neigh(ns: &str, ip: &str) -> Option<String> {
    lladdr(&String::from_utf8_lossy(
        &run(&["ip", "-n", ns, "neigh", "show", ip, "dev", "eth0"]).stdout,
    ))
}

/// Fails if `f` reports something at any time within `window` (an observation window for an
/// attack that must have no effect; its control shows the effect appears well within it).
fn never(what: &str, window: Duration, mut f: impl FnMut() -> Option<String>) {
    let end = Instant::now() + window;
    loop {
        if let Some(s) = f() {
            panic!("{what}: {s}");
        }
        if Instant::now() > end {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP service in the LAN namespace on `port` answering `<reply> <peer address>`.
fn serve_lan(env: &Env, port: u16, reply: &str) {
    env.csh(&format!(
        "socat TCP-LISTEN:{port},fork,reuseaddr SYSTEM:'echo {reply} $SOCAT_PEERADDR' >/dev/null 2>&1 &"
    ));
}

/// A TCP service in the host namespace on 0.0.0.0:`port` answering `reply`.
fn serve_host(env: &Env, port: u16, reply: &str) {
    env.sh(&format!(
        "socat TCP-LISTEN:{port},fork,reuseaddr SYSTEM:'echo {reply}' >/dev/null 2>&1 &"
    ));
}

/// A frame sniffer on `eth0` of `ns` (see `PKT_PY`), ready to receive when this returns.
struct Sniffer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Sniffer {
    fn start(env: &Env, ns: &str, marker: &str) -> Sniffer {
        let p = env.dir.join("pkt.py");
        if !p.exists() {
            std::fs::write(&p, PKT_PY).unwrap();
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(&p)
            .args(["sniff", "eth0", marker, "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "sniffer did not start");
        Sniffer { child, out }
    }

    /// Everything it saw up to the marker (which must have arrived).
    fn finish(mut self) -> Vec<String> {
        let mut lines = vec![];
        let mut line = String::new();
        while self.out.read_line(&mut line).unwrap() > 0 {
            lines.push(line.trim().to_string());
            line.clear();
        }
        let st = self.child.wait().unwrap();
        assert!(
            st.success() && lines.last().map(String::as_str) == Some("MARKER"),
            "the marker frame never reached the sniffer: {lines:?}"
        );
        lines
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// 1. Direct routing around exposes.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn lan_routing_to_machines_reaches_only_exposed_ports_and_networks_stay_apart() {
    let mut env = Env::new("droute");
    let a = env.machine("a", &["--expose", "8080:80"]);
    env.serve_tcp("a", 80, "a");
    env.serve_tcp("a", 81, "unexposed-a");
    env.cli_ok(&["network", "create", "blue", "--subnet", "10.210.0.0/24"]);
    let b = env.machine("b", &["--network", "blue", "--expose", "8081:80"]);
    env.serve_tcp("b", 80, "b");
    env.serve_tcp("b", 81, "unexposed-b");
    let (na, nb) = (ns_of(&env, &a), ns_of(&env, &b));

    step("control: exposed ports through the host's address");
    assert_eq!(
        expect_tcp(&env.client, HOST_LAN, 8080, "a"),
        format!("a {CLIENT_IP}")
    );
    assert_eq!(
        expect_tcp(&env.client, HOST_LAN, 8081, "b"),
        format!("b {CLIENT_IP}")
    );
    // the machines' own servers answer on every port (from the host, the machines' router)
    expect_tcp(&env.ns, &a, 81, "unexposed-a");
    expect_tcp(&env.ns, &b, 81, "unexposed-b");

    step("attack: the LAN routes the machine subnets through the host");
    ok(&[
        "ip",
        "netns",
        "exec",
        &env.client,
        "sh",
        "-c",
        "ip route add 10.200.0.0/16 via 10.201.0.1 && ip route add 10.210.0.0/24 via 10.201.0.1",
    ]);
    for (ip, port) in [(&a, 81), (&a, 80), (&b, 81), (&b, 80)] {
        assert_eq!(
            tcp_from(&env.client, ip, port),
            None,
            "a LAN host reached machine port {ip}:{port} directly, around the exposes"
        );
    }

    step("control: exposed ports still work with the route in place");
    assert_eq!(
        expect_tcp(&env.client, HOST_LAN, 8080, "a"),
        format!("a {CLIENT_IP}")
    );
    expect_tcp(&env.client, HOST_LAN, 8081, "b");

    step("attack: a machine connects to another network's machine directly");
    for (from, ip) in [(&na, &b), (&nb, &a)] {
        for port in [80, 81] {
            assert_eq!(
                tcp_from(from, ip, port),
                None,
                "machine in {from} reached {ip}:{port} on another network"
            );
        }
    }

    step("control: another network's exposed port through the host's addresses");
    expect_tcp(&na, HOST_LAN, 8081, "b");
    expect_tcp(&na, GW, 8081, "b");
    expect_tcp(&nb, HOST_LAN, 8080, "a");
    expect_tcp(&nb, "10.210.0.1", 8080, "a");

    step("control: without sistemo's forward rules the route reaches the unexposed port");
    // kill -9, so that the repair loop cannot restore them; the machines stay up
    env.kill_daemon("-KILL");
    ok(&[
        "ip", "netns", "exec", &env.ns, "nft", "flush", "chain", "ip", &env.table, "forward",
    ]);
    assert_eq!(
        tcp_from(&env.client, &a, 81),
        Some(format!("unexposed-a {CLIENT_IP}")),
        "control: the direct route works without the forward rules"
    );
}

// 2. ARP, IP and MAC spoofing between machines.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn machines_cannot_spoof_addresses_arp_or_mac() {
    // no repair pass: the control deletes the bridge table and it must stay deleted
    let env = Env::with_config("spoof", "repair_interval_ms: 600000\n");
    let x = env.machine("x", &["--expose", "8081:80"]);
    let y = env.machine("y", &["--expose", "8080:80"]);
    env.serve_tcp("x", 80, "x");
    env.serve_tcp("y", 80, "y");
    let (nx, ny) = (ns_of(&env, &x), ns_of(&env, &y));
    let (mx, my) = (mac_of(&nx), mac_of(&ny));
    let bridge_mac = env.sh(&format!("cat /sys/class/net/{BRIDGE}/address"));
    let bridge_mac = String::from_utf8_lossy(&bridge_mac.stdout).trim().to_string();
    serve_lan(&env, 9000, "lan");
    // a UDP sink on the LAN recording every datagram's payload
    let sink = env.dir.join("udp-sink");
    env.csh(&format!(
        "socat -u UDP-RECV:9999 OPEN:{},creat,append >/dev/null 2>&1 &",
        sink.display()
    ));
    let received = || std::fs::read_to_string(&sink).unwrap_or_default();
    // sends `payload` from machine namespace `ns` with source `src` until the sink has it
    let arrives = |ns: &str, src: &str, payload: &str| {
        poll(
            &format!("datagram {payload} at the LAN"),
            Duration::from_secs(5),
            || {
                pkt_ok(&env, ns, &["udp", src, CLIENT_IP, "9999", payload]);
                received().contains(payload).then_some(())
            },
        )
    };

    step("control: the legitimate paths");
    assert_eq!(
        expect_tcp(&env.client, HOST_LAN, 8080, "y"),
        format!("y {CLIENT_IP}")
    );
    assert_eq!(host_neigh(&env, &y).as_deref(), Some(my.as_str()));
    expect_tcp(&nx, CLIENT_IP, 9000, "lan");
    expect_tcp(&ny, CLIENT_IP, 9000, "lan");
    assert_eq!(machine_neigh(&ny, GW).as_deref(), Some(bridge_mac.as_str()));
    assert!(pings(&env, &nx, GW, "3"), "machine x cannot ping its gateway");
    arrives(&nx, &x, "own-1");

    step("attack: x takes y's address and announces it (gratuitous ARP)");
    ok(&["ip", "-n", &nx, "addr", "add", &format!("{y}/32"), "dev", "eth0"]);
    let garp_y = || {
        pkt_ok(&env, &nx, &["arp", "eth0", "1", &y, &y, "bcast"]);
        pkt_ok(&env, &nx, &["arp", "eth0", "2", &y, &y, "bcast"]);
    };
    garp_y();
    // x's later packets reach the host after its ARP frames: a reply means they were processed
    assert!(pings(&env, &nx, GW, "3"), "machine x cannot ping its gateway");
    never(
        "the host's neighbour entry for y moved",
        Duration::from_secs(1),
        || host_neigh(&env, &y).filter(|m| *m != my),
    );
    for _ in 0..3 {
        let r = tcp_from(&env.client, HOST_LAN, 8080);
        assert!(
            r.as_deref().is_some_and(|r| r.starts_with("y ")),
            "y's exposed port answered {r:?} after x's ARP spoofing"
        );
    }

    step("attack: x sends IPv4 from addresses that are not its own");
    for (src, payload) in [
        ("10.200.0.77", "spoof-unleased"),
        (y.as_str(), "spoof-neighbour"),
        ("192.0.2.7", "spoof-outside"),
    ] {
        pkt_ok(&env, &nx, &["udp", src, CLIENT_IP, "9999", payload]);
    }
    arrives(&nx, &x, "own-2"); // sent after the spoofed ones, on the same path
    assert!(
        !received().contains("spoof-"),
        "spoofed datagrams left the bridge: {}",
        received()
    );

    step("attack: x answers for the gateway");
    let garp_gw = || {
        pkt_ok(&env, &nx, &["arp", "eth0", "1", GW, GW, "bcast"]);
        pkt_ok(&env, &nx, &["arp", "eth0", "2", GW, GW, "bcast"]);
        pkt_ok(&env, &nx, &["arp", "eth0", "2", GW, &y, &my]);
    };
    garp_gw();
    never(
        "y's neighbour entry for the gateway moved",
        Duration::from_secs(1),
        || machine_neigh(&ny, GW).filter(|m| *m != bridge_mac),
    );
    expect_tcp(&ny, CLIENT_IP, 9000, "lan");

    step("attack: x changes its MAC address");
    let new_mac = "02:5e:00:00:be:ef";
    ok(&["ip", "-n", &nx, "link", "set", "eth0", "address", new_mac]);
    pkt_ok(&env, &nx, &["arp", "eth0", "1", &x, &x, "bcast"]);
    assert!(
        !pings(&env, &nx, GW, "1"),
        "x reached its gateway with a changed MAC"
    );
    assert_eq!(
        tcp_from(&nx, CLIENT_IP, 9000),
        None,
        "x's egress works with a changed MAC"
    );
    ok(&["ip", "-n", &nx, "link", "set", "eth0", "address", &mx]);
    // control: with its own MAC back, x's traffic flows again
    expect_tcp(&nx, CLIENT_IP, 9000, "lan");

    step("control: without sistemo's bridge table the same attacks succeed");
    let del = env.sh(&format!("nft delete table bridge {}", env.table));
    assert!(
        del.status.success(),
        "deleting sistemo's bridge table (bridge {}): {}",
        env.table,
        String::from_utf8_lossy(&del.stderr)
    );
    poll(
        "the host's neighbour entry for y moved to x",
        Duration::from_secs(3),
        || {
            garp_y();
            (host_neigh(&env, &y).as_deref() == Some(mx.as_str())).then_some(())
        },
    );
    expect_tcp(&env.client, HOST_LAN, 8080, "x");
    arrives(&nx, "10.200.0.77", "spoof-unleased-unfiltered");
    poll("y's gateway entry moved to x", Duration::from_secs(3), || {
        garp_gw();
        (machine_neigh(&ny, GW).as_deref() == Some(mx.as_str())).then_some(())
    });
    ok(&["ip", "-n", &nx, "link", "set", "eth0", "address", new_mac]);
    poll("egress with a changed MAC", Duration::from_secs(5), || {
        pkt_ok(&env, &nx, &["arp", "eth0", "1", &x, &x, "bcast"]);
        tcp_from(&nx, CLIENT_IP, 9000).filter(|r| r.starts_with("lan"))
    });
}

// 3. IPv6 router advertisements and DHCP-server replies from machines.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn router_advertisements_and_dhcp_replies_from_machines_go_nowhere() {
    // no repair pass: the controls delete the bridge table and change sysctls
    let env = Env::with_config("ra", "repair_interval_ms: 600000\n");
    let x = env.machine("x", &[]);
    let y = env.machine("y", &[]);
    let (nx, ny) = (ns_of(&env, &x), ns_of(&env, &y));
    // With br_netfilter loaded (Docker hosts), bridged IPv4 also passes the `ip` table's forward
    // chain, which drops the broadcast DHCP offer on its own; switched off in this host
    // namespace, the bridge table is the only filter between machines, as this test wants.
    env.sh("if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then \
         sysctl -qw net.bridge.bridge-nf-call-iptables=0; fi");
    let marker = "10.200.0.250";
    // x's RA, DHCP offer and a harmless ARP request marking the end, seen from y
    let attack = |env: &Env| {
        let sniffer = Sniffer::start(env, &ny, marker);
        pkt_ok(env, &nx, &["ra", "eth0", "2001:db8:1::"]);
        pkt_ok(env, &nx, &["dhcp", "eth0"]);
        pkt_ok(env, &nx, &["arp", "eth0", "1", &x, marker, "bcast", "1"]);
        sniffer.finish()
    };
    let host_v6 = |env: &Env| {
        let r = env.sh(&format!(
            "ip -6 route show default; ip -6 addr show dev {BRIDGE} | grep 2001:db8"
        ));
        let s = String::from_utf8_lossy(&r.stdout).trim().to_string();
        (!s.is_empty()).then_some(s)
    };
    let sysctl = |env: &Env, k: &str| {
        let r = env.sh(&format!("cat /proc/sys/net/ipv6/conf/{BRIDGE}/{k}"));
        String::from_utf8_lossy(&r.stdout).trim().to_string()
    };
    eprintln!(
        "bridge: accept_ra={} autoconf={} disable_ipv6={}",
        sysctl(&env, "accept_ra"),
        sysctl(&env, "autoconf"),
        sysctl(&env, "disable_ipv6")
    );
    assert_eq!(host_v6(&env), None, "the host has IPv6 routes before the attack");

    step("attack: x advertises itself as a router and offers DHCP");
    let seen = attack(&env);
    assert!(
        !seen.iter().any(|l| l == "RA" || l == "DHCP"),
        "another machine received them: {seen:?}"
    );
    never(
        "the host took x's router advertisement",
        Duration::from_millis(500),
        || host_v6(&env),
    );

    step("control: without the bridge table, y receives them; the bridge's sysctls still hold");
    let del = env.sh(&format!("nft delete table bridge {}", env.table));
    assert!(
        del.status.success(),
        "deleting sistemo's bridge table: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    let seen = attack(&env);
    assert!(
        seen.iter().any(|l| l == "RA") && seen.iter().any(|l| l == "DHCP"),
        "control: y gets x's RA and DHCP offer without the bridge table: {seen:?}"
    );
    never(
        "the host took x's router advertisement (sysctls)",
        Duration::from_millis(500),
        || host_v6(&env),
    );

    step("control: with the kernel's defaults, the host takes the RA");
    env.sh(&format!(
        "sysctl -qw net.ipv6.conf.{BRIDGE}.disable_ipv6=0 net.ipv6.conf.{BRIDGE}.accept_ra=2 \
         net.ipv6.conf.{BRIDGE}.autoconf=1"
    ));
    poll(
        "the host's IPv6 default route via x",
        Duration::from_secs(5),
        || {
            pkt_ok(&env, &nx, &["ra", "eth0", "2001:db8:1::"]);
            host_v6(&env).filter(|s| s.contains("default via fe80"))
        },
    );
}

// 4. Machines reaching the host's services and the metadata address.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn machines_reach_neither_host_services_nor_metadata_unless_configured() {
    let mut env = Env::new("hostin");
    let m = env.machine("m", &[]);
    env.machine("web", &["--expose", "8080:80"]);
    env.serve_tcp("web", 80, "web");
    let nm = ns_of(&env, &m);
    serve_host(&env, 7000, "host7000");
    serve_host(&env, 7001, "host7001");
    serve_lan(&env, 9000, "lan");
    // a metadata service on the LAN side, routed from the host like a cloud's
    env.csh(
        "ip addr add 169.254.169.254/32 dev lo && socat TCP-LISTEN:80,bind=169.254.169.254,fork,reuseaddr \
         SYSTEM:'echo metadata' >/dev/null 2>&1 &",
    );
    ok(&[
        "ip",
        "netns",
        "exec",
        &env.ns,
        "ip",
        "route",
        "add",
        "169.254.169.254/32",
        "via",
        CLIENT_IP,
    ]);

    step("control: the services are there");
    expect_tcp(&env.ns, GW, 7000, "host7000");
    expect_tcp(&env.ns, GW, 7001, "host7001");
    expect_tcp(&env.ns, "169.254.169.254", 80, "metadata");

    step("control: what a machine may reach");
    assert_eq!(
        expect_tcp(&nm, CLIENT_IP, 9000, "lan"),
        "lan 10.201.0.1",
        "egress is masqueraded"
    );
    assert!(pings(&env, &nm, GW, "3"), "a machine cannot ping its gateway");
    expect_tcp(&nm, HOST_LAN, 8080, "web");
    expect_tcp(&nm, GW, 8080, "web");

    step("attack: host services and metadata from a machine");
    for (ip, port) in [(GW, 7000), (HOST_LAN, 7000), (GW, 7001), (HOST_LAN, 7001)] {
        assert_eq!(
            tcp_from(&nm, ip, port),
            None,
            "a machine reached host service {ip}:{port}"
        );
    }
    assert_eq!(
        tcp_from(&nm, "169.254.169.254", 80),
        None,
        "a machine reached the metadata address"
    );

    step("control: the config opens a listed port and the metadata range");
    env.kill_daemon("-TERM");
    env.write_config("host_ports_for_machines: [7001]\nallow_metadata: true\n");
    env.start_daemon();
    expect_tcp(&nm, GW, 7001, "host7001");
    assert_eq!(
        tcp_from(&nm, GW, 7000),
        None,
        "an unlisted port opened with the list"
    );
    expect_tcp(&nm, "169.254.169.254", 80, "metadata");
    expect_tcp(&nm, CLIENT_IP, 9000, "lan");
}

// 5. Outbound SMTP.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn machines_cannot_send_smtp_by_default() {
    let mut env = Env::new("smtp");
    let m = env.machine("m", &[]);
    let nm = ns_of(&env, &m);
    for port in [25, 465, 587, 2525] {
        serve_lan(&env, port, &format!("smtp{port}"));
    }
    step("control: the listeners answer, and a machine reaches another port");
    for port in [25, 465, 587] {
        expect_tcp(&env.ns, CLIENT_IP, port, &format!("smtp{port}"));
    }
    expect_tcp(&nm, CLIENT_IP, 2525, "smtp2525");
    step("attack: a machine connects to the SMTP ports");
    for port in [25, 465, 587] {
        assert_eq!(
            tcp_from(&nm, CLIENT_IP, port),
            None,
            "a machine connected to port {port} outside (block_smtp is on by default)"
        );
    }
    step("control: block_smtp: false lets it through");
    env.kill_daemon("-TERM");
    env.write_config("block_smtp: false\n");
    env.start_daemon();
    expect_tcp(&nm, CLIENT_IP, 25, "smtp25");
}

// 6. The loopback guard (CVE-2020-8558) is repaired.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn flushed_loopback_guard_is_repaired() {
    let env = Env::with_config("guard", "repair_interval_ms: 500\n");
    env.machine("m", &["--expose", "8080:80"]);
    env.serve_tcp("m", 80, "m");
    expect_tcp(&env.ns, "127.0.0.1", 8080, "m");
    env.sh("socat TCP-LISTEN:7777,bind=127.0.0.1,fork,reuseaddr SYSTEM:'echo secret' >/dev/null 2>&1 &");
    expect_tcp(&env.ns, "127.0.0.1", 7777, "secret");
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
    assert_eq!(
        tcp_from(&ns, "127.0.0.1", 7777),
        None,
        "machine reached a host loopback service"
    );
    let guard = || {
        let o = env.sh(&format!("nft list chain ip {} guard", env.table));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(guard().contains("127.0.0.0/8 drop"), "{}", guard());

    step("flush the guard: repaired within 2 s");
    ok(&[
        "ip", "netns", "exec", &env.ns, "nft", "flush", "chain", "ip", &env.table, "guard",
    ]);
    let t0 = Instant::now();
    poll("the guard rule back", Duration::from_secs(2), || {
        guard().contains("127.0.0.0/8 drop").then_some(())
    });
    eprintln!("guard restored after {:?}", t0.elapsed());
    assert_eq!(
        tcp_from(&ns, "127.0.0.1", 7777),
        None,
        "machine reached a host loopback service after the guard was flushed"
    );
}

// 2 and 6. The anti-spoofing table fails closed too: deleted or flushed, it is repaired.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn deleted_or_flushed_anti_spoofing_table_is_repaired() {
    let env = Env::with_config("brrep", "repair_interval_ms: 500\n");
    let x = env.machine("x", &[]);
    let y = env.machine("y", &["--expose", "8080:80"]);
    env.serve_tcp("y", 80, "y");
    let (nx, ny) = (ns_of(&env, &x), ns_of(&env, &y));
    let my = mac_of(&ny);
    expect_tcp(&env.client, HOST_LAN, 8080, "y");
    ok(&["ip", "-n", &nx, "addr", "add", &format!("{y}/32"), "dev", "eth0"]);
    let bridge_table = || {
        let o = env.sh(&format!("nft list table bridge {}", env.table));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let rules = bridge_table();
    assert!(
        rules.contains("arp saddr ip") && rules.contains(&format!(". {y}")),
        "sistemo's bridge table: {rules}"
    );
    for (what, cmd) in [
        ("deleted", format!("nft delete table bridge {}", env.table)),
        ("flushed", format!("nft flush table bridge {}", env.table)),
    ] {
        step(&format!("bridge table {what}: repaired within 2 s"));
        let o = env.sh(&cmd);
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let t0 = Instant::now();
        poll(
            &format!("the {what} bridge table back"),
            Duration::from_secs(2),
            || {
                let t = bridge_table();
                let whole = t.contains("arp saddr ip")
                    && t.contains("ip saddr")
                    && t.contains(&format!(". {x}"))
                    && t.contains(&format!(". {y}"));
                whole.then_some(())
            },
        );
        eprintln!("bridge table restored after {:?}", t0.elapsed());
        pkt_ok(&env, &nx, &["arp", "eth0", "1", &y, &y, "bcast"]);
        assert!(pings(&env, &nx, GW, "3"), "machine x cannot ping its gateway");
        assert_eq!(
            host_neigh(&env, &y).as_deref(),
            Some(my.as_str()),
            "x's gratuitous ARP for y's address moved the host's entry after the repair"
        );
    }
}

// 7. The rules sistemo puts in a foreign `policy drop` forward chain.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn compat_rules_admit_only_exposed_traffic_and_leave_on_stop() {
    let mut env = Env::new("compat");
    let web = env.machine("web", &["--expose", "8080:80"]);
    env.serve_tcp("web", 80, "web");
    env.serve_tcp("web", 81, "unexposed");
    let nweb = ns_of(&env, &web);
    serve_lan(&env, 9000, "lan");
    // Docker's iptables-nft leaves `filter FORWARD` at policy drop
    env.sh("nft -f - <<'X'\ntable ip filter {\n chain FORWARD { type filter hook forward priority 0; policy drop;\n  iifname \"docker0\" accept\n }\n}\nX");
    let tag = format!("sistemo:{}", env.table);
    let chain =
        |env: &Env| String::from_utf8_lossy(&env.sh("nft list chain ip filter FORWARD").stdout).into_owned();
    poll(
        "compat rules in the foreign chain",
        Duration::from_secs(3),
        || chain(&env).contains(&tag).then_some(()),
    );
    eprintln!("foreign chain with sistemo's rules:\n{}", chain(&env));

    step("control: exposed traffic, replies and egress pass the foreign chain");
    assert_eq!(
        expect_tcp(&env.client, HOST_LAN, 8080, "web"),
        format!("web {CLIENT_IP}")
    );
    expect_tcp(&nweb, CLIENT_IP, 9000, "lan");

    step("attack: direct routing from the LAN to the machine");
    env.csh("ip route add 10.200.0.0/16 via 10.201.0.1");
    for port in [81, 80] {
        assert_eq!(
            tcp_from(&env.client, &web, port),
            None,
            "the LAN reached machine port {port} directly through the compat rules"
        );
    }

    step("clean stop removes the compat rules");
    env.kill_daemon("-TERM");
    let after = chain(&env);
    assert!(
        !after.contains(&tag),
        "sistemo's rules stayed in the foreign chain after a clean stop:\n{after}"
    );
    assert!(
        after.contains("iifname \"docker0\" accept"),
        "foreign rule kept: {after}"
    );

    step("control: a restart puts them back");
    env.start_daemon();
    poll("compat rules back", Duration::from_secs(3), || {
        chain(&env).contains(&tag).then_some(())
    });
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
}

// 8. Bind addresses: 0.0.0.0 is the wildcard; an expose on the API's port blocks the start.
#[test]
#[ignore = "needs root and network namespaces: run sudo scripts/test"]
fn wildcard_bind_address_and_api_port_collision() {
    let mut env = Env::new("bind0");
    env.machine("web", &["--expose", "0.0.0.0:8080:80"]);
    env.serve_tcp("web", 80, "web");
    step("0.0.0.0 answers on every address");
    assert_eq!(
        expect_tcp(&env.client, HOST_LAN, 8080, "web"),
        format!("web {CLIENT_IP}")
    );
    expect_tcp(&env.ns, "127.0.0.1", 8080, "web");
    expect_tcp(&env.ns, HOST_LAN, 8080, "web");

    step("an expose on the API's TCP port refuses the start");
    env.cli_ok(&["machine", "expose", "web", "--port", "8765:80"]);
    expect_tcp(&env.client, HOST_LAN, 8765, "web");
    let token = "token: \"isolation-test-token-0123456789abcdef\"\n";
    // control: the API on another port starts
    env.kill_daemon("-TERM");
    env.write_config(&format!("port: 8766\n{token}"));
    env.start_daemon();
    env.kill_daemon("-TERM");
    env.write_config(&format!("port: 8765\n{token}"));
    let out = env.start_daemon_expecting_refusal(Duration::from_secs(20));
    assert!(
        out.contains("8765") && out.contains("web"),
        "the refusal names the port and the machine: {out}"
    );
    step("control: without the API port it starts, exposes intact");
    env.write_config("");
    env.start_daemon();
    expect_tcp(&env.client, HOST_LAN, 8765, "web");
    expect_tcp(&env.client, HOST_LAN, 8080, "web");
}
