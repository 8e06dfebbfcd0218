//! What the isolation tests (`tests/isolation.rs`, `tests/spoofing.rs`) share: the Python
//! script that crafts the attacks' packets over raw sockets (ARP, ICMP, RA, DHCP, spoofed UDP)
//! and sniffs frames, the default network's addresses, neighbour-table and MAC lookups, the
//! LAN and host services the attacks aim at, and an observation window (`never`).

use super::*;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Crafts the packets of the attacks (run as root inside a namespace):
/// `arp IF OP SIP TIP DST [COUNT]`, `ping IP [TIMEOUT]`, `ra IF PREFIX`, `dhcp IF`,
/// `udp SRC DST PORT PAYLOAD`, `sniff IF MARKER_IP [TIMEOUT]`.
pub const PKT_PY: &str = r##"
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
pub const GW: &str = "10.200.0.1";
/// The default network's bridge.
pub const BRIDGE: &str = "sistemo0";

/// `PKT_PY` written to the test's directory (once).
fn pkt_script(env: &Env) -> PathBuf {
    let p = env.dir.join("pkt.py");
    if !p.exists() {
        std::fs::write(&p, PKT_PY).unwrap();
    }
    p
}

/// Run the packet script in namespace `ns`.
pub fn pkt(env: &Env, ns: &str, args: &[&str]) -> Output {
    let p = pkt_script(env);
    let mut a = vec!["ip", "netns", "exec", ns, "python3", p.to_str().unwrap()];
    a.extend(args);
    run(&a)
}

/// Run the packet script and require success.
pub fn pkt_ok(env: &Env, ns: &str, args: &[&str]) {
    let o = pkt(env, ns, args);
    assert!(
        o.status.success(),
        "packet script {args:?} in {ns} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Whether `ns` gets an ICMP echo reply from `ip` within `secs`.
pub fn pings(env: &Env, ns: &str, ip: &str, secs: &str) -> bool {
    pkt(env, ns, &["ping", ip, secs]).status.success()
}

/// The namespace of the machine holding `ip`.
pub fn ns_of(env: &Env, ip: &str) -> String {
    let want = format!("inet {ip}/");
    env.machine_namespaces()
        .into_iter()
        .find(|n| String::from_utf8_lossy(&run(&["ip", "-n", n, "-4", "addr"]).stdout).contains(&want))
        .unwrap_or_else(|| panic!("no machine namespace holds {ip}"))
}

/// The MAC address of `eth0` in namespace `ns`.
pub fn mac_of(ns: &str) -> String {
    let o = ok(&["ip", "-n", ns, "-o", "link", "show", "eth0"]);
    o.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_string()
}

/// The MAC a neighbour entry (`ip neigh show IP dev DEV`, run with `prefix`) points to.
pub fn lladdr(out: &str) -> Option<String> {
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(String::from)
}

/// The host's neighbour entry for `ip` on the default bridge.
pub fn host_neigh(env: &Env, ip: &str) -> Option<String> {
    lladdr(&String::from_utf8_lossy(
        &env.sh(&format!("ip neigh show {ip} dev {BRIDGE}")).stdout,
    ))
}

/// A machine's neighbour entry for `ip` on its `eth0`.
pub fn machine_neigh(ns: &str, ip: &str) -> Option<String> {
    lladdr(&String::from_utf8_lossy(
        &run(&["ip", "-n", ns, "neigh", "show", ip, "dev", "eth0"]).stdout,
    ))
}

/// Fails if `f` reports something at any time within `window` (an observation window for an
/// attack that must have no effect; its control shows the effect appears well within it).
pub fn never(what: &str, window: Duration, mut f: impl FnMut() -> Option<String>) {
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
pub fn serve_lan(env: &Env, port: u16, reply: &str) {
    env.csh(&format!(
        "socat TCP-LISTEN:{port},fork,reuseaddr SYSTEM:'echo {reply} $SOCAT_PEERADDR' >/dev/null 2>&1 &"
    ));
}

/// A TCP service in the host namespace on 0.0.0.0:`port` answering `reply`.
pub fn serve_host(env: &Env, port: u16, reply: &str) {
    env.sh(&format!(
        "socat TCP-LISTEN:{port},fork,reuseaddr SYSTEM:'echo {reply}' >/dev/null 2>&1 &"
    ));
}

/// A frame sniffer on `eth0` of `ns` (see `PKT_PY`), ready to receive when this returns.
pub struct Sniffer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Sniffer {
    pub fn start(env: &Env, ns: &str, marker: &str) -> Sniffer {
        let p = pkt_script(env);
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
    pub fn finish(mut self) -> Vec<String> {
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
