"""sistemo network benchmark (issue #2): what exposing ports costs. Run as `bench/network`.

    sudo bench/network [--quick] [--bin target/release/sistemo] [--keep]

This file owns the network measurements and their set-up: the client namespace and veth pair
(NetEnv), the background exposes, the helpers (`--_probe`, `--_connrate`, run in the client
namespace, the daemon's or the machine `tgt`) and the figures below. The API client, the
daemon's start/stop, namespace cleanup, the report and the exit status come from sistemo_bench.py.

Needs root, a release build (`cargo build --release`), iproute2 (`ip`, `nsenter`), nft and
iperf3. Python 3 standard library only.

Everything runs in network namespaces this script creates and removes again:
  snb-<pid>-d   the daemon's namespace (`sistemo up --hypervisor netns`, bridge sistemo0 10.200.0.1/16)
  snb-<pid>-c   an "external client" namespace, veth to the daemon's: 10.201.0.2/24 -> 10.201.0.1
  snb<pid>m-*   the machines' namespaces (created by the daemon, netns_prefix)
Two machines are deployed (over the API): `bg` (holds the background exposes, as port ranges) and
`tgt` (the machine the measurements talk to; it runs iperf3 and a TCP accept-and-close server).
The client namespace runs the same two servers for the direct baselines (below).

Direct baselines. sistemo drops NEW connections routed into a machine that are not DNATed (README,
"Security model"), so the client cannot open a connection to the machine IP. The baselines use
the path the product does allow across the same hops: a connection opened BY the machine `tgt` to
the client namespace (machine -> bridge -> forward -> masquerade -> veth -> client). For
throughput the bytes flow the same way as on the exposed path: iperf3 runs in `tgt` with -R, so
the sender sits in the client namespace and the receiver in `tgt`, exactly as for the exposed
test (client -> 10.201.0.1:<host port> -> DNAT -> forward -> bridge -> tgt). Per data packet both
paths cross the same veth pairs, bridge, conntrack lookup, a destination rewrite (DNAT, or undoing
the masquerade) and the forward chain; what only the exposed path has is the DNAT map lookup and
the forward chain's `ct status dnat` accept. So throughput_ratio still drops when the DNAT or
forward path regresses for exposed traffic; a slowdown common to both paths shows in the absolute
throughput_exposed_gbps. Not chosen: direct from the daemon's namespace to the machine IP (the
output path never crosses the forward chain, so it would not compare like with like); a bench-only
accept rule in an earlier chain (a drop in any base chain is final, it cannot bypass sistemo's
forward chain). The start-up checks the servers in `tgt` from the daemon's namespace (the host
may reach machines) and logs that the client reaches the machine IP no more.

Figures:
  expose_p50_ms_N      API round trip of POST /v1/machines/tgt/expose (one new port), fresh Unix
                       socket connection per request, with N exposes already present.
                       Target: p50 <= 5 ms at 10,000 and p50(10,000)/p50(0) <= 1.5.
  expose_cli_p50_ms_N  the same through the CLI (`sistemo machine expose tgt --port P:80`),
                       including process start.
  unexpose_p50_ms_N    the API round trip of the matching unexpose.
  restore_ms_10000     `restore_ms=` logged by the daemon at start with 10,000 exposes
                       (SIGTERM, start again on the same data dir; median). Target <= 200 ms.
                       The script checks that all 10,000 map elements are back.
  throughput_*_gbps    iperf3 (TCP, data from the client namespace to `tgt`):
                       exposed = client -> 10.201.0.1:<host port> (DNAT path); direct = the same
                       bytes client -> tgt over a connection tgt opened (iperf3 -R run in tgt,
                       server in the client namespace; no DNAT, see "Direct baselines").
                       throughput_ratio = exposed/direct, target >= 0.95.
  repair_ms_element_drift_10000
                       with 10,000 exposes: time from a map element added, deleted or changed
                       behind the daemon's back (`nft` in its namespace) to the daemon's repair
                       (polled with `nft get element`); median over the three kinds and their
                       repetitions (the worst is printed too). Target <= 2000 ms.
  daemon_idle_cpu_pct_N  CPU of the idle daemon (and its reaped children) with N exposes.
                       Target <= 2 % at 10,000.
  connrate_*           new TCP connections per second through the exposed port (client connects,
                       waits for the server's close, closes with RST) with 1 and with 10,000
                       exposes present; connrate_ratio = 10k/1, target >= 0.9.
                       connrate_direct_N: the same helper run in tgt, connecting to the server in
                       the client namespace (machine-opened, masqueraded, no DNAT), same rounds.

Exit status: 0 if everything ran (a missed target is reported as MISS, not a failure), 1 if
something failed to run or to clean up (then no RESULT line is printed), 130 on Ctrl-C.
Namespaces, processes and temp dirs are removed on exit.
--quick runs fewer samples (< 1 minute); the default mode takes a few minutes.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import socket
import statistics
import sys
import time

from sistemo_bench import CLK_TCK, DEFAULT_BIN, BenchError, Env, Report, log, main_with, pct, proc_stat, run

PID = os.getpid()
DNS = f"snb-{PID}-d"
CNS = f"snb-{PID}-c"
MPREFIX = f"snb{PID}m-"
TABLE = f"snb_{PID}"
VETH_D = f"snb{PID}d"
VETH_C = f"snb{PID}c"
D_IP, C_IP = "10.201.0.1", "10.201.0.2"

BG_BASE = 20000        # background exposes: BG_BASE .. BG_BASE+n-1 on machine bg
SAMPLE_BASE = 40000    # latency samples: one new port each on machine tgt
IPERF_PORT, IPERF_HOST_PORT = 5201, 15201
CONN_PORT, CONN_HOST_PORT = 8080, 18080


def in_d(*args):
    """A command line run in the daemon's namespace (network namespace only)."""
    return ["nsenter", f"--net=/run/netns/{DNS}", *args]


def in_c(*args):
    return ["ip", "netns", "exec", CNS, *args]


def helper_argv(*args):
    """This script as a helper (`--_probe`, `--_connrate`)."""
    return [sys.executable, "-B", os.path.abspath(__file__), *args]


def run_from(env, src, argv, timeout):
    """argv run in the client namespace (src "client"), the daemon's ("host") or in machine src
    (over the API's exec); returns (exit code, stdout, stderr)."""
    if src in ("client", "host"):
        r = run((in_c if src == "client" else in_d)(*argv), check=False, timeout=timeout)
        return r.returncode, r.stdout, r.stderr
    return env.api.exec(src, shlex.join(argv), timeout_s=int(timeout))


class NetEnv(Env):
    """The shared Env plus the client namespace, the veth pair and the background exposes."""

    def __init__(self, args):
        super().__init__(args.bin, args.keep, f"snb-{PID}", ns_prefixes=[MPREFIX])
        self.bg_ports = 0  # size of the background range on bg
        self.ips = {}
        self.servers = []  # the direct baselines' servers in the client namespace (Popen)

    def setup_net(self):
        for ns in (DNS, CNS):
            self.add_ns(ns)
        run(["ip", "link", "add", VETH_D, "netns", DNS, "type", "veth", "peer", "name", VETH_C, "netns", CNS])
        run(["ip", "-n", DNS, "addr", "add", f"{D_IP}/24", "dev", VETH_D])
        run(["ip", "-n", CNS, "addr", "add", f"{C_IP}/24", "dev", VETH_C])
        run(["ip", "-n", DNS, "link", "set", VETH_D, "up"])
        run(["ip", "-n", CNS, "link", "set", VETH_C, "up"])
        run(["ip", "-n", CNS, "route", "add", "default", "via", D_IP])
        run(in_c("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"))
        run(in_c("sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"))
        run(in_d("sysctl", "-qw", "net.ipv4.ip_forward=1"))
        # RST-closed connections linger 10 s in conntrack; at ~20k conn/s that nears nf_conntrack_max
        run(in_d("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_close=1"), check=False)

    def start(self):
        text, _ = self.start_daemon(DNS, "--nft-table", TABLE, "--hypervisor", "netns")
        return text

    def deploy(self, name):
        st = self.api.events("deploy", {"image": "debian", "name": name, "expose": []})
        ip = find_ip(st)
        if not ip:
            raise BenchError(f"no IP in the deploy result of {name}: {st}")
        self.ips[name] = ip
        return ip

    def mexec(self, name, cmd, timeout=60):
        code, out, err = self.api.exec(name, cmd, timeout)
        if code != 0:
            raise BenchError(f"exec {cmd!r} in {name} exited {code}: {(err or out).strip()[-300:]}")
        return out

    # -- background exposes
    def set_background(self, n):
        if n == self.bg_ports:
            return
        if self.bg_ports:
            self.api.unexpose("bg", f"{BG_BASE}-{BG_BASE + self.bg_ports - 1}")
            self.bg_ports = 0
        if n:
            r = f"{BG_BASE}-{BG_BASE + n - 1}" if n > 1 else str(BG_BASE)
            self.api.expose("bg", [f"{r}:{r}"])
            self.bg_ports = n

    def serve_client(self, name, *argv):
        """A server in the client namespace, stopped at cleanup (its namespace's pids are
        killed again when the namespace is removed)."""
        with open(os.path.join(self.tmp, f"client-{name}.log"), "w") as f:
            self.servers.append(subprocess.Popen(in_c(*argv), stdin=subprocess.DEVNULL, stdout=f,
                                                 stderr=f, start_new_session=True))

    def cleanup_children(self):
        problems = []
        for p in self.servers:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                problems.append(f"client-namespace server {p.pid} did not exit")
        self.servers = []
        return problems

    def map_elements(self):
        out = run(in_d("nft", "-j", "list", "map", "ip", TABLE, "expose_any")).stdout
        for item in json.loads(out).get("nftables", []):
            if "map" in item:
                return len(item["map"].get("elem", []))
        raise BenchError("map expose_any not found")


def find_ip(obj):
    if isinstance(obj, dict):
        for k in ("ip", "address", "ipv4"):
            v = obj.get(k)
            if isinstance(v, str) and re.fullmatch(r"10\.200\.\d+\.\d+", v.split("/")[0]):
                return v.split("/")[0]
        for v in obj.values():
            r = find_ip(v)
            if r:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = find_ip(v)
            if r:
                return r
    return None


# ---------------------------------------------------------------- helpers run in the client namespace

CONN_SERVER = r"""
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4096)
lg = struct.pack("ii", 1, 0)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, lg)
    c.close()
"""


def helper_probe(host, port, timeout):
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            print("ok")
            return 0
        except OSError:
            time.sleep(0.05)
    print(f"no connection to {host}:{port}")
    return 1


def helper_connrate(host, port, secs):
    """Sequential connections for `secs` seconds: connect, wait for the server's close, RST."""
    import struct
    port, secs = int(port), float(secs)
    lg = struct.pack("ii", 1, 0)
    n, errors, kinds = 0, 0, {}
    t0 = time.perf_counter()
    end = t0 + secs
    while True:
        for _ in range(50):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, lg)
            s.settimeout(5)
            try:
                try:
                    s.connect((host, port))
                    s.recv(1)  # wait for the server's accept-and-close (RST)
                except ConnectionResetError:
                    pass  # established, then reset by the server: a complete connection
                n += 1
            except OSError as e:
                errors += 1
                k = f"{type(e).__name__}:{e.errno}"
                kinds[k] = kinds.get(k, 0) + 1
            finally:
                s.close()
        now = time.perf_counter()
        if now >= end:
            break
    print(json.dumps({"n": n, "secs": now - t0, "errors": errors, "kinds": kinds}))
    return 0


# ---------------------------------------------------------------- measurements

def latency_samples(env, k, api, cli):
    """k samples: expose one new port on tgt (timed), then unexpose it (timed for the API)."""
    for i in range(k):
        port = SAMPLE_BASE + i
        t0 = time.perf_counter()
        env.api.expose("tgt", [f"{port}:80"])
        t1 = time.perf_counter()
        env.api.unexpose("tgt", str(port))
        t2 = time.perf_counter()
        api["expose"].append((t1 - t0) * 1000)
        api["unexpose"].append((t2 - t1) * 1000)
    for i in range(k):
        port = SAMPLE_BASE + i
        t0 = time.perf_counter()
        env.cli("machine", "expose", "tgt", "--port", f"{port}:80")
        t1 = time.perf_counter()
        env.api.unexpose("tgt", str(port))
        cli.append((t1 - t0) * 1000)


def measure_latency(env, levels, n, rounds, rep):
    """n samples per level, taken in `rounds` interleaved rounds so drift hits every level alike."""
    api = {lv: {"expose": [], "unexpose": []} for lv in levels}
    cli = {lv: [] for lv in levels}
    latency_samples(env, 10, {"expose": [], "unexpose": []}, [])  # warm-up
    per = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    for r, k in enumerate(per):
        order = levels if r % 2 == 0 else list(reversed(levels))
        for lv in order:
            env.set_background(lv)
            latency_samples(env, k, api[lv], cli[lv])
    sec = "expose latency (ms)"
    for lv in levels:
        lat, unl, c = api[lv]["expose"], api[lv]["unexpose"], cli[lv]
        log(f"  exposes={lv}: api p50={pct(lat, 50):.2f} ms p90={pct(lat, 90):.2f} max={max(lat):.2f}; "
            f"unexpose p50={pct(unl, 50):.2f}; cli p50={pct(c, 50):.2f} p90={pct(c, 90):.2f}")
        rep.add(f"expose_p50_ms_{lv}", pct(lat, 50), "ms", sec, target=("<=", 5.0) if lv == 10000 else None)
        rep.add(f"expose_p90_ms_{lv}", pct(lat, 90), "ms", sec)
        rep.add(f"expose_max_ms_{lv}", max(lat), "ms", sec)
        rep.add(f"unexpose_p50_ms_{lv}", pct(unl, 50), "ms", sec)
        rep.add(f"expose_cli_p50_ms_{lv}", pct(c, 50), "ms", sec)
        rep.add(f"expose_cli_p90_ms_{lv}", pct(c, 90), "ms", sec)
    return {lv: pct(api[lv]["expose"], 50) for lv in levels}


def proc_cpu_secs(pid):
    """CPU seconds of a process and its reaped children (the daemon's nft runs)."""
    return sum(proc_stat(pid)[11:15]) / CLK_TCK


def idle_cpu_pct(env, secs):
    pid = env.daemon.pid
    c0, t0 = proc_cpu_secs(pid), time.perf_counter()
    time.sleep(secs)
    return (proc_cpu_secs(pid) - c0) / (time.perf_counter() - t0) * 100


def get_element(port):
    """The target `ip . port` of map element `tcp . port` in expose_any, or None when absent."""
    r = run(in_d("nft", "get", "element", "ip", TABLE, "expose_any", "{", f"tcp . {port}", "}"), check=False)
    if r.returncode != 0:
        return None
    m = re.search(r":\s*([0-9.]+ \. [0-9]+)", r.stdout)
    return m.group(1) if m else ""


def measure_drift(kind, bg_ip, timeout=10.0):
    """ms from a foreign change of one map element to the daemon's repair of it."""
    t = f"ip {TABLE} expose_any"
    port = {"add": 39999, "delete": BG_BASE, "change": BG_BASE + 1}[kind]
    good = None if kind == "add" else f"{bg_ip} . {port}"
    if get_element(port) != good:
        raise BenchError(f"element tcp . {port} is {get_element(port)!r} before the {kind}, expected {good!r}")
    script = {
        "add": f"add element {t} {{ tcp . {port} : 10.200.255.250 . 80 }}",
        "delete": f"delete element {t} {{ tcp . {port} }}",
        "change": f"delete element {t} {{ tcp . {port} }}\nadd element {t} {{ tcp . {port} : 10.200.255.250 . 80 }}",
    }[kind]
    t0 = time.perf_counter()
    run(in_d("nft", "-f", "-"), input=script)
    while time.perf_counter() - t0 < timeout:
        if get_element(port) == good:
            return (time.perf_counter() - t0) * 1000
        time.sleep(0.005)
    raise BenchError(f"a foreign element {kind} (tcp . {port}) was not repaired within {timeout:.0f}s")


def iperf(env, src, target, port, secs, reverse=False, attempts=3):
    """Receiver-side Gbit/s of one iperf3 run, its client in src (see run_from); reverse: -R
    (the server sends). Retried (the single-test server can be busy finishing the previous test)."""
    err = ""
    argv = ["iperf3", "-c", target, "-p", str(port), "-t", str(secs), "-J"] + (["-R"] if reverse else [])
    for a in range(attempts):
        if a:
            log(f"  iperf3 from {src} to {target}:{port} failed ({err}); retrying")
            time.sleep(1)
        _, out, stderr = run_from(env, src, argv, secs + 30)
        try:
            j = json.loads(out)
        except ValueError:
            err = stderr.strip() or out[:300]
            continue
        if "error" in j:
            err = j["error"]
            continue
        time.sleep(0.2)
        return j["end"]["sum_received"]["bits_per_second"] / 1e9
    raise BenchError(f"iperf3 from {src} to {target}:{port}: {err} (server logs in {env.tmp})")


def connrate(env, src, target, port, secs):
    code, out, err = run_from(env, src, helper_argv("--_connrate", target, str(port), str(secs)), secs + 60)
    if code != 0:
        raise BenchError(f"connrate from {src} to {target}:{port} exited {code}: {(err or out).strip()[-300:]}")
    j = json.loads(out)
    if j["errors"]:
        raise BenchError(f"connrate from {src} to {target}:{port}: {j['errors']} of {j['n'] + j['errors']} "
                         f"connections failed: {j['kinds']}")
    return j["n"] / j["secs"]


def probe(env, target, port, timeout=10, src="client"):
    code, out, err = run_from(env, src, helper_argv("--_probe", target, str(port), str(timeout)), timeout + 10)
    if code != 0:
        raise BenchError(f"cannot connect from {src} to {target}:{port}: {out.strip()} {err.strip()}")


def measure(env, args):
    q = args.quick
    samples = args.samples or (15 if q else 50)
    lat_rounds = 3 if q else 5
    iperf_secs, iperf_reps = (1, 2) if q else (3, 4)
    conn_secs, conn_reps = (0.5, 4) if q else (0.75, 8)
    restore_reps = 2 if q else 5

    if not os.path.exists(env.bin):
        raise BenchError(f"{env.bin} not found: build it with `cargo build --release`")
    for tool in ("ip", "nsenter", "nft", "iperf3"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is not installed")
    rep = Report()
    with open(env.cfg, "w") as f:
        f.write(f'netns_prefix: "{MPREFIX}"\nrepair_interval_ms: {args.repair_interval_ms}\n')
    log(f"namespaces {DNS} (daemon), {CNS} (client); machines {MPREFIX}*; table ip {TABLE}; tmp {env.tmp}")
    env.setup_net()
    env.start()
    for m in ("bg", "tgt"):
        ip = env.deploy(m)
        log(f"deployed {m} at {ip}")
    tgt_ip = env.ips["tgt"]
    srv = os.path.join(env.tmp, "connsrv.py")
    with open(srv, "w") as f:
        f.write(CONN_SERVER)
    env.mexec("tgt", f"iperf3 -s -p {IPERF_PORT} --logfile {os.path.join(env.tmp, 'tgt-iperf3.log')} &")
    env.mexec("tgt", f"{sys.executable} {srv} {CONN_PORT} &")
    # the direct baselines' servers, in the client namespace (machine-opened connections)
    env.serve_client("iperf3", "iperf3", "-s", "-p", str(IPERF_PORT))
    env.serve_client("conn", sys.executable, srv, str(CONN_PORT))
    env.mexec("tgt", "sysctl -qw net.ipv4.ip_local_port_range='10000 65000'")
    for port in (IPERF_PORT, CONN_PORT):
        probe(env, tgt_ip, port, src="host")  # the servers in tgt (the host may reach machines)
        probe(env, C_IP, port, src="tgt")  # the client's servers, from the machine (egress)
    code, out, _ = run_from(env, "client", helper_argv("--_probe", tgt_ip, str(CONN_PORT), "1"), 15)
    log(f"client -> {tgt_ip}:{CONN_PORT} (routed, not DNATed): "
        + ("connected: machines are NOT isolated from routed traffic" if code == 0 else "no connection (isolated)"))

    # 1. expose latency at 0, 1,000 and 10,000 existing exposes (background on bg, as ranges)
    log(f"expose latency: {samples} samples per level (API, then CLI)")
    p50 = measure_latency(env, [0, 1000, 10000], samples, lat_rounds, rep)
    rep.add("expose_ratio_10000_0", p50[10000] / p50[0], "", "expose latency (ms)",
            target=("<=", 1.5))

    # idle cost of the daemon (self-repair loop: nft runs every repair_interval_ms)
    idle_secs = 2 if q else 5
    log(f"idle daemon CPU over {idle_secs}s at 0 and 10,000 exposes")
    sec = "idle daemon CPU (% of one core, incl. its nft runs)"
    for lv in (0, 10000):
        env.set_background(lv)
        time.sleep(0.5)
        rep.add(f"daemon_idle_cpu_pct_{lv}", idle_cpu_pct(env, idle_secs), "%", sec,
                target=("<=", 2.0) if lv == 10000 else None)

    # 4. new-connection rate with 1 and with 10,000 exposes (the target port's plus 9,999)
    env.set_background(0)
    env.api.expose("tgt", [f"{CONN_HOST_PORT}:{CONN_PORT}"])
    probe(env, D_IP, CONN_HOST_PORT)
    connrate(env, "client", D_IP, CONN_HOST_PORT, 0.2)  # warm-up
    connrate(env, "tgt", C_IP, CONN_PORT, 0.2)
    log(f"connection rate: {conn_reps} x {conn_secs}s of connections at 1 and 10,000 exposes "
        f"(client -> exposed port, then direct: tgt -> client)")
    r = {(lv, path): [] for lv in (1, 10000) for path in ("ex", "di")}
    for i in range(conn_reps):
        for lv in ((1, 10000) if i % 2 == 0 else (10000, 1)):  # ABBA against drift
            env.set_background(0 if lv == 1 else 9999)
            r[(lv, "ex")].append(connrate(env, "client", D_IP, CONN_HOST_PORT, conn_secs))
            r[(lv, "di")].append(connrate(env, "tgt", C_IP, CONN_PORT, conn_secs))
        log("  " + "  ".join(f"{lv}/{path}: {r[(lv, path)][-1]:.0f}/s" for lv, path in r))
    med = {k: statistics.median(v) for k, v in r.items()}
    sec = "new connections (conn/s)"
    rep.add("connrate_1", med[(1, "ex")], "conn/s", sec)
    rep.add("connrate_10000", med[(10000, "ex")], "conn/s", sec)
    rep.add("connrate_direct_1", med[(1, "di")], "conn/s", sec)
    rep.add("connrate_direct_10000", med[(10000, "di")], "conn/s", sec)
    # ratio of each adjacent (same-round) pair, then the median: robust against load drift
    pairs = [a / b for a, b in zip(r[(10000, "ex")], r[(1, "ex")])]
    rep.add("connrate_ratio", statistics.median(pairs), "", sec, target=(">=", 0.9))

    # 3. throughput client -> tgt: exposed port (DNAT) vs a connection tgt opened (direct), few
    # exposes; then exposed at 10,000
    env.set_background(0)
    env.api.expose("tgt", [f"{IPERF_HOST_PORT}:{IPERF_PORT}"])
    probe(env, D_IP, IPERF_HOST_PORT)
    log(f"throughput: iperf3 -t {iperf_secs}, {iperf_reps} reps each (direct: iperf3 -R run in tgt)")
    ex, di = [], []
    iperf(env, "tgt", C_IP, IPERF_PORT, 1, reverse=True)  # warm-up
    for i in range(iperf_reps):
        for path in (("ex", "di") if i % 2 == 0 else ("di", "ex")):
            if path == "ex":
                ex.append(iperf(env, "client", D_IP, IPERF_HOST_PORT, iperf_secs))
            else:
                di.append(iperf(env, "tgt", C_IP, IPERF_PORT, iperf_secs, reverse=True))
        log(f"  exposed {ex[-1]:.2f} Gbit/s  direct {di[-1]:.2f} Gbit/s")
    env.set_background(10000 - 2)
    ex10k = [iperf(env, "client", D_IP, IPERF_HOST_PORT, iperf_secs) for _ in range(iperf_reps)]
    log(f"  exposed at 10,000 exposes: {' '.join(f'{x:.2f}' for x in ex10k)} Gbit/s")
    sec = "throughput (Gbit/s)"
    rep.add("throughput_exposed_gbps", statistics.median(ex), "Gbit/s", sec)
    rep.add("throughput_direct_gbps", statistics.median(di), "Gbit/s", sec)
    rep.add("throughput_exposed_gbps_10000", statistics.median(ex10k), "Gbit/s", sec)
    rep.add("throughput_ratio", statistics.median(a / b for a, b in zip(ex, di)), "", sec,
            target=(">=", 0.95))

    # 2. restore time of 10,000 exposes at daemon start
    want = env.map_elements()
    if want != 10000:
        raise BenchError(f"expected 10000 elements in expose_any before restart, found {want}")
    log(f"restore: {restore_reps} daemon restarts with 10,000 exposes")
    rs, readys = [], []
    for _ in range(restore_reps):
        env.stop_daemon()
        t0 = time.perf_counter()
        text = env.start()
        ready_wall = (time.perf_counter() - t0) * 1000
        m = re.findall(r"restore_ms=([0-9.]+)", re.sub(r"\x1b\[[0-9;]*m", "", text))
        if not m:
            raise BenchError(f"no restore_ms= in the daemon log:\n{env.tail_log()}")
        rs.append(float(m[-1]))
        readys.append(ready_wall)
        got = env.map_elements()
        if got != 10000:
            raise BenchError(f"after restart expose_any holds {got} elements, expected 10000")
        log(f"  restore_ms={rs[-1]:.1f} (start to ready {ready_wall:.0f} ms), 10000 elements back")
    probe(env, D_IP, CONN_HOST_PORT)  # the exposed port works after the restart
    sec = "restore at start (ms)"
    rep.add("restore_ms_10000", statistics.median(rs), "ms", sec, target=("<=", 200.0))
    rep.add("daemon_start_ms_10000", statistics.median(readys), "ms", sec)

    # 5. element drift with 10,000 exposes: a foreign add, delete and change, each repaired
    drift_reps = 1 if q else 3
    log(f"element drift repair: {drift_reps} x (add, delete, change) with 10,000 exposes")
    ds = [measure_drift(kind, env.ips["bg"]) for _ in range(drift_reps)
          for kind in ("add", "delete", "change")]
    log("  " + " ".join(f"{d:.0f}" for d in ds) + " ms")
    sec = "element drift repair (ms)"
    rep.add("repair_ms_element_drift_10000", statistics.median(ds), "ms", sec, target=("<=", 2000.0))
    rep.add("repair_ms_element_drift_10000_max", max(ds), "ms", sec)
    if env.map_elements() != 10000:
        raise BenchError("expose_any does not hold its 10,000 elements after the drift repairs")
    return rep


def main():
    ap = argparse.ArgumentParser(prog="bench/network", description="sistemo network benchmark")
    ap.add_argument("--quick", action="store_true", help="fewer samples (< 1 minute)")
    ap.add_argument("--bin", default=DEFAULT_BIN)
    ap.add_argument("--samples", type=int, default=0, help="latency samples per level")
    ap.add_argument("--repair-interval-ms", type=int, default=500,
                    help="daemon's repair_interval_ms (500 = the product default)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs)")
    ap.add_argument("--_probe", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_connrate", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._probe:
        return helper_probe(*args._probe)
    if args._connrate:
        return helper_connrate(*args._connrate)
    return main_with("network", lambda: NetEnv(args), lambda env: measure(env, args))


if __name__ == "__main__":
    sys.exit(main())
