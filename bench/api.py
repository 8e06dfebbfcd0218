"""sistemo web API benchmark (issue #13). Run as `bench/api`.

    sudo bench/api [--quick] [--bin target/release/sistemo] [--machines N] [--samples N] [--keep]

Figures:
  list_p50_ms_tls      GET /v1/machines with N machines (default 100), over TCP+TLS with
                       keep-alive and an API token (target <= 5 ms)
  dashboard_gzip_bytes the dashboard's first load (the page and every script and stylesheet it
                       references), gzip-compressed (target <= 300 KB); dashboard_bytes as served
  event_latency_ms_p50 `sistemo machine expose` (the CLI, process start included) until its
                       `machine` event arrives on an open GET /v1/events stream, the stream the
                       dashboard renders from (target <= 200 ms; the browser's own rendering is
                       measured once per run by tests/dashboard.rs: RESULT event_latency_ms)
  terminal_echo_ms_p50 a keystroke sent on the browser terminal's WebSocket until the shell's
                       echo of it comes back (machine m0's login shell, through its agent)

Everything runs in one network namespace this script creates (`sab-<pid>-d`: the daemon, with
`--hypervisor netns` machines `sab<pid>m-*`, listening on https://127.0.0.1:7443) and removes
again. The client (`--_client`) runs inside that namespace and pins the certificate by the
fingerprint the daemon printed. Python 3 standard library only.
"""

import argparse
import base64
import gzip
import hashlib
import json
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sistemo_bench import BenchError, Env, Report, log, main_with  # noqa: E402

PID = os.getpid()
DNS = f"sab-{PID}-d"
MPREFIX = f"sab{PID}m-"
TABLE = f"sab{PID}"
PORT = 7443


def client(args):
    """Inside the daemon's namespace: the measurements over TLS; prints one JSON line."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint below instead

    def connect():
        raw = socket.create_connection(("127.0.0.1", PORT))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait on the requests
        s = ctx.wrap_socket(raw)
        fp = hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest().upper()
        if fp != args.fingerprint.replace(":", ""):
            raise SystemExit(f"certificate fingerprint {fp} is not the pinned {args.fingerprint}")
        return s

    import http.client

    class Pinned(http.client.HTTPSConnection):
        def connect(self):
            self.sock = connect()

    auth = {"Authorization": f"Bearer {args.token}"}
    c = Pinned("127.0.0.1", PORT)

    def call(method, path, body=None):
        hdrs = dict(auth)
        if body is not None:
            hdrs["Content-Type"] = "application/json"
            body = json.dumps(body)
        c.request(method, path, body=body, headers=hdrs)
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise SystemExit(f"{method} {path}: {r.status} {data[:200]!r}")
        return data

    out = {}
    for _ in range(5):
        call("GET", "/v1/machines")
    times = []
    for _ in range(args.samples):
        t = time.perf_counter()
        n = len(json.loads(call("GET", "/v1/machines")))
        times.append((time.perf_counter() - t) * 1000)
    out["list_machines"] = n
    out["list_p50_ms"] = statistics.median(times)
    out["list_p90_ms"] = sorted(times)[int(len(times) * 0.9) - 1]

    # Everything the page loads before it can show anything: the page and what it references.
    c.request("GET", "/")
    index = c.getresponse().read()
    refs = re.findall(rb'(?:src|href)="(/[^"]+)"', index)
    if not refs:
        raise SystemExit("the dashboard's page references no script or style")
    raw, gz = len(index), len(gzip.compress(index, 9))
    for p in refs:
        c.request("GET", p.decode())
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise SystemExit(f"GET {p.decode()}: {r.status}")
        raw += len(body)
        gz += len(gzip.compress(body, 9))
    out["dashboard_bytes"], out["dashboard_gzip_bytes"] = raw, gz

    ev = connect()
    ev.sendall(f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {args.token}\r\n\r\n".encode())
    # The daemon subscribes this stream before it answers: wait for its headers, or an expose
    # made before the subscription is never seen (this race made the bench time out now and then).
    buf = b""
    ev.settimeout(10)
    while b"\r\n\r\n" not in buf:
        chunk = ev.recv(65536)
        if not chunk:
            raise SystemExit("the event stream closed before its headers")
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"GET /v1/events answered {head[:100]!r}")

    def wait_for(pred, deadline):
        nonlocal buf
        ev.settimeout(max(0.01, deadline - time.monotonic()))
        while True:
            for m in re.finditer(rb"data: (\{.*?\})\n", buf):
                d = json.loads(m.group(1))
                if pred(d):
                    buf = buf[m.end():]
                    return d
            buf = buf[-65536:]
            try:
                chunk = ev.recv(65536)
            except TimeoutError:
                raise SystemExit("no matching event within the deadline")
            if not chunk:
                raise SystemExit("the event stream ended")
            buf += chunk

    lat = []
    for i in range(args.samples):
        port = 20000 + i
        spec = f"{port}:80/tcp"
        # Made with the CLI (its start included), seen on the stream the dashboard reads.
        t = time.perf_counter()
        r = subprocess.run([*json.loads(args.cli), "machine", "expose", "m0", "--port", f"{port}:80"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SystemExit(f"sistemo machine expose m0 --port {port}:80: {r.stderr.strip()}")
        try:
            wait_for(lambda d: d.get("type") == "machine" and d["machine"]["name"] == "m0"
                     and any(p["spec"] == spec for p in d["machine"]["ports"]), time.monotonic() + 5)
        except SystemExit as e:
            raise SystemExit(f"expose {spec} (sample {i}): {e}") from None
        lat.append((time.perf_counter() - t) * 1000)
        call("POST", "/v1/machines/m0/unexpose", {"port": str(port)})
    out["event_latency_ms_p50"] = statistics.median(lat)
    out["event_latency_ms_max"] = max(lat)
    out["terminal_echo_ms_p50"], out["terminal_echo_ms_max"] = terminal_echo(connect, args)
    print(json.dumps(out), flush=True)


def terminal_echo(connect, args):
    """Keystrokes on GET /v1/machines/m0/terminal (a WebSocket, spoken by hand: the standard
    library has no client) until the shell echoes each; (p50, max) in ms."""
    ws = connect()
    key = base64.b64encode(os.urandom(16)).decode()
    ws.sendall((f"GET /v1/machines/m0/terminal?rows=24&cols=80 HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\n"
                f"Authorization: Bearer {args.token}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode())
    ws.settimeout(10)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = ws.recv(65536)
        if not chunk:
            raise SystemExit("the terminal closed before its handshake")
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"the terminal answered {head[:200]!r}")

    def send(data):
        mask = os.urandom(4)
        n = len(data)
        hdr = bytes([0x82, 0x80 | n]) if n < 126 else bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
        ws.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def frame():
        nonlocal buf
        while True:
            if len(buf) >= 2:
                n, at = buf[1] & 0x7F, 2
                if n == 126:
                    n, at = int.from_bytes(buf[2:4], "big"), 4
                elif n == 127:
                    n, at = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) >= at + n:
                    op, data, buf = buf[0] & 0x0F, buf[at:at + n], buf[at + n:]
                    if op == 1:
                        raise SystemExit(f"the terminal ended: {data.decode(errors='replace')}")
                    if op == 2:
                        return data
                    continue
            chunk = ws.recv(65536)
            if not chunk:
                raise SystemExit("the terminal closed")
            buf += chunk

    # In step with the shell: a command whose output cannot be its echo, then its next prompt.
    send(b"echo READY-$((6*7))\r")
    seen = b""
    while b"READY-42\r\n" not in seen:
        seen = (seen + frame())[-4096:]
    seen = seen.split(b"READY-42\r\n", 1)[1]
    while not re.search(rb"[#$] $", seen):
        seen = (seen + frame())[-4096:]
    times = []
    for _ in range(args.samples):
        t = time.perf_counter()
        send(b"Q")
        while b"Q" not in frame():
            pass
        times.append((time.perf_counter() - t) * 1000)
    send(b"\x15exit\r")
    ws.close()
    return statistics.median(times), max(times)


def measure(env, args):
    n = args.machines or (20 if args.quick else 100)
    samples = args.samples or (30 if args.quick else 200)
    if not os.path.exists(env.bin):
        raise BenchError(f"{env.bin} not found: build it with `cargo build --release`")
    with open(env.cfg, "w") as f:
        f.write(f'netns_prefix: "{MPREFIX}"\nlisten: ["https://127.0.0.1:{PORT}"]\n')
    env.add_ns(DNS)
    env.start_daemon(DNS, "--nft-table", TABLE, "--hypervisor", "netns")
    # The fingerprint is printed just after the "ready" line start_daemon waits for: poll the
    # log for it (reading it once lost that race now and then).
    deadline = time.monotonic() + 10
    while True:
        with open(env.daemon_log, errors="replace") as f:
            m = re.search(r"fingerprint: ([0-9A-F:]{95})", f.read())
        if m:
            break
        if time.monotonic() > deadline:
            raise BenchError("the daemon printed no certificate fingerprint within 10 s")
        time.sleep(0.02)
    t = time.monotonic()
    for i in range(n):
        env.api.events("deploy", {"image": "debian", "name": f"m{i}", "expose": []})
    log(f"deployed {n} machines in {time.monotonic() - t:.1f}s")
    token = env.cli("token", "create", "bench").stdout.strip()
    r = subprocess.run(["ip", "netns", "exec", DNS, sys.executable, "-B", os.path.abspath(__file__), "--_client",
                        "--token", token, "--fingerprint", m.group(1), "--samples", str(samples),
                        "--cli", json.dumps([env.bin, "--socket", env.sock])],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise BenchError(f"the client failed: {r.stderr.strip() or r.stdout.strip()}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["list_machines"] != n:
        raise BenchError(f"the list had {out['list_machines']} machines, not {n}")
    rep = Report()
    sec = f"TCP+TLS keep-alive, {n} machines, {samples} samples"
    rep.add("list_p50_ms_tls", out["list_p50_ms"], "ms", sec, ("<=", 5))
    rep.add("list_p90_ms_tls", out["list_p90_ms"], "ms", sec)
    rep.add("dashboard_bytes", out["dashboard_bytes"], "B", "dashboard first load")
    rep.add("dashboard_gzip_bytes", out["dashboard_gzip_bytes"], "B", "dashboard first load", ("<=", 300 * 1024))
    rep.add("event_latency_ms_p50", out["event_latency_ms_p50"], "ms", "CLI expose -> event on the dashboard's stream", ("<=", 200))
    rep.add("event_latency_ms_max", out["event_latency_ms_max"], "ms", "CLI expose -> event on the dashboard's stream")
    rep.add("terminal_echo_ms_p50", out["terminal_echo_ms_p50"], "ms", "browser terminal keystroke -> echo")
    rep.add("terminal_echo_ms_max", out["terminal_echo_ms_max"], "ms", "browser terminal keystroke -> echo")
    return rep


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="target/release/sistemo")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--machines", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--_client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--token", help=argparse.SUPPRESS)
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    p.add_argument("--cli", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._client:
        return client(args)
    return main_with("api", lambda: Env(args.bin, args.keep, f"sab-{PID}", ns_prefixes=[MPREFIX]),
                     lambda env: measure(env, args))


if __name__ == "__main__":
    sys.exit(main())
