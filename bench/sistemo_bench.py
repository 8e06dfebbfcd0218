"""Shared pieces of the sistemo benches (`bench/network.py`, `bench/machines.py`).

Owns:
  ROUTES      the daemon's HTTP/JSON API as the benches use it, spelled once (method, path, kind)
  Api         a client over the daemon's Unix socket: plain JSON calls, NDJSON event streams
              (deploy, delete: progress / result / error) and exec streams (stdout / stderr /
              exit / error). Error bodies and error events are accepted in both shapes the API
              has had: {"error": "msg"} and {"error": "msg", "kind": "...", "status": N} for
              HTTP errors; {"error": "msg"} and {"error": {"error": "msg", "kind": ..., "status": N}}
              for stream error events. They raise ApiError(message, kind, status).
  Env         a temp dir, network namespaces this process creates (and removes again), the
              daemon (`sistemo up` inside a namespace) and the CLI pointed at its socket; cleanup
              deletes the machines, stops the daemon, kills what is left in our namespaces and
              deletes them, on success, failure, Ctrl-C or SIGTERM.
  Report      the result table and the `RESULT name=value` lines; refuses a value that is not a
              finite number, so a broken measurement fails instead of printing a figure.
  main_with   the common `main`: root check, signal handling, exit status (0 ran, 1 failed,
              130 interrupted); RESULT lines are printed only after a clean teardown.
  run, log, pct, fmt, BenchError: small helpers.

Python 3 standard library only. Nothing here touches the root network namespace's firewall.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BIN = os.path.join(REPO, "target", "release", "sistemo")

# name -> (method, path template, response kind): "json" a JSON body, "events" NDJSON
# {"progress"} ... then {"result"} or {"error"}, "exec" NDJSON {"stdout"|"stderr"} ... then
# {"exit"} or {"error"}.
ROUTES = {
    "info": ("GET", "/v1/info", "json"),
    "list": ("GET", "/v1/machines", "json"),
    "deploy": ("POST", "/v1/machines", "events"),
    "status": ("GET", "/v1/machines/{name}", "json"),
    "delete": ("DELETE", "/v1/machines/{name}", "events"),
    "expose": ("POST", "/v1/machines/{name}/expose", "json"),
    "unexpose": ("POST", "/v1/machines/{name}/unexpose", "json"),
    "exec": ("POST", "/v1/machines/{name}/exec", "exec"),
    "start": ("POST", "/v1/machines/{name}/start", "events"),
    "shell": ("GET", "/v1/machines/{name}/shell", "json"),
    "stop": ("POST", "/v1/machines/{name}/stop", "events"),
    "attach": ("POST", "/v1/machines/{name}/volumes", "json"),
    "volume_create": ("POST", "/v1/volumes", "events"),
    "volume_snapshot": ("POST", "/v1/volumes/{name}/snapshot", "events"),
    "volume_clone": ("POST", "/v1/volumes/{name}/clone", "events"),
    "volume_delete": ("DELETE", "/v1/volumes/{name}", "json"),
}


class BenchError(Exception):
    pass


class ApiError(BenchError):
    """An error the daemon reported: an HTTP error status or a stream's error event."""

    def __init__(self, message, kind=None, status=None, where=""):
        super().__init__(message)
        self.message, self.kind, self.status, self.where = message, kind, status, where

    def __str__(self):
        extra = ", ".join(x for x in (self.kind and f"kind {self.kind}",
                                      self.status and f"status {self.status}") if x)
        return f"{self.where}: {self.message}" + (f" ({extra})" if extra else "")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args, check=True, timeout=120, input=None):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        out = (r.stderr.strip() or r.stdout.strip())[-600:]
        raise BenchError(f"`{' '.join(args)}` failed ({r.returncode}): {out}")
    return r


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stat(pid):
    """/proc/<pid>/stat fields after the command name: [0] is the state (field 3 of proc(5)),
    [11]/[12] utime/stime, [13]/[14] the reaped children's, [19] starttime (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        return [int(x) if x.lstrip("-").isdigit() else x for x in f.read().rsplit(")", 1)[1].split()]


def fmt(v):
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


# ---------------------------------------------------------------- API over the Unix socket

def error_of(obj, where=""):
    """ApiError from an error body or error event, in either shape (see the module doc)."""
    e = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(e, dict):
        return ApiError(str(e.get("error", e)), e.get("kind"), e.get("status"), where)
    if e is None:
        return ApiError(json.dumps(obj)[:300], None, None, where)
    return ApiError(str(e), obj.get("kind"), obj.get("status"), where)


def dechunk(b):
    out = bytearray()
    while b:
        size, _, rest = b.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if n == 0:
            break
        out += rest[:n]
        b = rest[n + 2:]
    return bytes(out)


def parse_head(head, what):
    """(status, {lowercase header: value}) of an HTTP response head (bytes)."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise BenchError(f"{what}: bad HTTP response {head[:200]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


def stream_lines(sock, what):
    """The non-empty lines of a response body as they arrive (NDJSON), chunked or not; the
    status and headers are checked by the caller through the first item, (status, headers)."""
    f = sock.makefile("rb")
    try:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = f.readline()
            if not line:
                raise BenchError(f"{what}: the daemon closed the connection without a response")
            head += line
        status, headers = parse_head(head[:-4], what)
        yield status, headers
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        buf = b""
        while True:
            if chunked:
                size = f.readline()
                if not size:
                    raise BenchError(f"{what}: the connection closed inside a chunked body")
                n = int(size.split(b";")[0], 16)
                data = f.read(n)
                f.read(2)
            else:
                data = f.read1(65536)
                n = len(data)
            if n == 0:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line
        if buf.strip():
            yield buf
    finally:
        f.close()
        sock.close()


class Api:
    """The daemon's API over its Unix socket; one fresh connection per request."""

    def __init__(self, sock):
        self.sock = sock

    @staticmethod
    def path(route, **params):
        """(method, path) of a route in ROUTES."""
        method, tmpl, _ = ROUTES[route]
        return method, tmpl.format(**params)

    def connect(self, method, path, body, timeout):
        head = f"{method} {path} HTTP/1.1\r\nHost: sistemo\r\nConnection: close\r\n"
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sock)
            s.sendall((head + "\r\n").encode() + data)
        except BaseException:
            s.close()
            raise
        return s

    def call(self, method, path, body=None, timeout=60):
        """(status, body bytes) of one request; the whole response is read (until the daemon
        closes the connection)."""
        s = self.connect(method, path, body, timeout)
        chunks = []
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        finally:
            s.close()
        raw = b"".join(chunks)
        if not raw:
            raise BenchError(f"{method} {path}: the daemon closed the connection without a response")
        head, _, data = raw.partition(b"\r\n\r\n")
        status, headers = parse_head(head, f"{method} {path}")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = dechunk(data)
        return status, data

    @staticmethod
    def error(status, raw, where):
        """ApiError of an HTTP error response (JSON in either shape, or plain text)."""
        try:
            err = error_of(json.loads(raw), where)
        except ValueError:  # e.g. a plain-text rejection of a malformed request
            err = ApiError(raw.decode(errors="replace")[:300], None, status, where)
        if err.status is None:
            err.status = status
        return err

    def ok(self, route, body=None, timeout=60, **params):
        """A JSON route: the raw body (not decoded: the timed calls stay bare round trips);
        ApiError on an error status."""
        method, path = self.path(route, **params)
        assert ROUTES[route][2] == "json", f"{route} is a stream route"
        status, raw = self.call(method, path, body, timeout)
        if status != 200:
            raise self.error(status, raw, f"{method} {path}")
        return raw

    def get(self, route, body=None, timeout=60, **params):
        """A JSON route: the decoded body (None if empty); ApiError on an error status."""
        raw = self.ok(route, body, timeout, **params)
        return json.loads(raw) if raw.strip() else None

    def stream(self, route, body, timeout, params):
        """The NDJSON events of a stream route as dicts; ApiError on an HTTP error status."""
        method, path = self.path(route, **params)
        where = f"{method} {path}"
        lines = stream_lines(self.connect(method, path, body, timeout), where)
        status, _ = next(lines)
        if status != 200:
            raise self.error(status, b"\n".join(lines), where)
        return (json.loads(line) for line in lines), where

    def events(self, route, body=None, timeout=600, progress=None, **params):
        """An NDJSON operation: calls progress(line) per progress event, returns the result;
        ApiError on an error event, BenchError if the stream ends without a result."""
        assert ROUTES[route][2] == "events", f"{route} is not an events route"
        evs, where = self.stream(route, body, timeout, params)
        for ev in evs:
            if "progress" in ev:
                if progress:
                    progress(ev["progress"])
            elif "result" in ev:
                return ev["result"]
            elif "error" in ev:
                raise error_of(ev, where)
        raise BenchError(f"{where}: the stream ended without a result or an error")

    def exec(self, name, cmd, timeout_s=60):
        """Run cmd in machine `name`: (exit code, stdout, stderr); ApiError on an error event."""
        evs, where = self.stream("exec", {"cmd": cmd, "timeout_s": timeout_s}, timeout_s + 30,
                                 {"name": name})
        out, err = [], []
        for ev in evs:
            if "stdout" in ev:
                out.append(ev["stdout"])
            elif "stderr" in ev:
                err.append(ev["stderr"])
            elif "exit" in ev:
                return int(ev["exit"]), "".join(out), "".join(err)
            elif "error" in ev:
                raise error_of(ev, where)
        raise BenchError(f"{where}: the stream ended without an exit code or an error")

    # the calls the benches make
    def expose(self, machine, ports):
        return self.ok("expose", {"ports": ports}, name=machine)

    def unexpose(self, machine, port):
        return self.ok("unexpose", {"port": port}, name=machine)

    def machines(self):
        return self.get("list")

    def delete(self, machine, timeout=120):
        return self.events("delete", timeout=timeout, name=machine)


# ---------------------------------------------------------------- output

class Report:
    def __init__(self):
        self.rows = []     # (section, name, value, unit, target text, verdict)
        self.results = []  # (key, value)

    def add(self, key, value, unit="", section="", target=None, label=None, result=True):
        """target: (op, bound) with op '<=' or '>='. A value that is not a finite number means
        the measurement broke: BenchError, so no RESULT line is printed for it."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BenchError(f"{key}: no valid measurement ({value!r})")
        verdict, ttext = "", ""
        if target is not None:
            op, bound = target
            ttext = f"{op} {bound:g}"
            verdict = "OK" if (value <= bound if op == "<=" else value >= bound) else "MISS"
        self.rows.append((section, label or key, value, unit, ttext, verdict))
        if result:
            self.results.append((key, value))

    def print(self):
        w = max([len(r[1]) for r in self.rows] + [10])
        sec = None
        print()
        print(f"{'figure':<{w}}  {'value':>12} {'unit':<8} {'target':<10} verdict")
        print("-" * (w + 44))
        for s, name, v, unit, t, verdict in self.rows:
            if s != sec:
                print(f"# {s}")
                sec = s
            print(f"{name:<{w}}  {fmt(v):>12} {unit:<8} {t:<10} {verdict}")
        print()
        for k, v in self.results:
            print(f"RESULT {k}={fmt(v)}")
        sys.stdout.flush()


# ---------------------------------------------------------------- the bench environment

def kill_ns_pids(ns):
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for p in r.stdout.split():
        try:
            os.kill(int(p), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


class Env:
    """Temp dir, namespaces, daemon and CLI of one bench run. `ns_prefixes`: names of
    namespaces the daemon creates for this run (removed at cleanup too)."""

    def __init__(self, bin, keep, tag, ns_prefixes=()):
        self.bin = os.path.abspath(bin)
        self.keep = keep
        self.tmp = tempfile.mkdtemp(prefix=f"{tag}-")
        self.data = os.path.join(self.tmp, "data")
        self.sock = os.path.join(self.tmp, "sistemo.sock")
        self.cfg = os.path.join(self.tmp, "config.yml")
        self.api = Api(self.sock)
        self.daemon = None
        self.daemon_log = None
        self.starts = 0
        self.made_ns = []
        self.ns_prefixes = tuple(ns_prefixes)

    def add_ns(self, ns):
        run(["ip", "netns", "add", ns])
        self.made_ns.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    # -- daemon
    def start_daemon(self, ns, *up_args, timeout=60):
        """`sistemo up` in namespace ns (network namespace only; nsenter execs, so the Popen
        pid is the daemon). Ready = its "ready" log line and a served GET /v1/info.
        Returns (log text, seconds from start to ready)."""
        self.starts += 1
        path = os.path.join(self.tmp, f"daemon-{self.starts}.log")
        self.daemon_log = path
        env = dict(os.environ, NO_COLOR="1", RUST_LOG=os.environ.get("RUST_LOG", "info"))
        cmd = ["nsenter", f"--net=/run/netns/{ns}", self.bin, "--socket", self.sock, "up",
               "--data-dir", self.data, "--config", self.cfg, *up_args]
        t0 = time.monotonic()
        with open(path, "w") as f:
            self.daemon = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env,
                                           start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.daemon.poll() is not None:
                raise BenchError(f"daemon exited with {self.daemon.returncode}:\n{self.tail_log()}")
            with open(path, errors="replace") as f:
                text = f.read()
            if "sistemo daemon ready" in text:
                try:
                    self.api.call("GET", ROUTES["info"][1], timeout=5)
                    return text, time.monotonic() - t0
                except (OSError, BenchError):
                    pass
            time.sleep(0.02)
        raise BenchError(f"daemon not ready within {timeout}s:\n{self.tail_log()}")

    def stop_daemon(self, timeout=20):
        p, self.daemon = self.daemon, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"daemon {p.pid} did not exit {timeout}s after SIGTERM; killing it")
            p.kill()
            p.wait(5)
            raise BenchError("daemon did not stop on SIGTERM")

    def tail_log(self, n=25):
        try:
            with open(self.daemon_log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except (OSError, TypeError):
            return ""

    # -- CLI
    def cli(self, *args, check=True, timeout=120):
        return run([self.bin, "--socket", self.sock, *args], check=check, timeout=timeout)

    # -- cleanup
    def cleanup(self):
        """Remove everything this run made. Returns a list of problems (empty: clean)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = self.cleanup_children()
        d = self.daemon
        if d is not None and d.poll() is not None:
            log(f"the daemon had exited (status {d.returncode}); end of its log:\n{self.tail_log()}")
        if d is not None and d.poll() is None:
            try:
                for m in self.api.machines():
                    log(f"cleanup: deleting machine {m['name']}")
                    try:
                        self.api.delete(m["name"], timeout=90)
                    except Exception as e:
                        problems.append(f"deleting machine {m['name']}: {e}")
            except Exception as e:
                problems.append(f"listing machines: {e}")
            try:
                self.stop_daemon(20)
            except Exception as e:
                problems.append(str(e))
        self.daemon = None
        problems += self.cleanup_leftovers()
        names = []
        if self.ns_prefixes:
            try:
                names = [n for n in os.listdir("/run/netns") if n.startswith(self.ns_prefixes)]
            except OSError:
                pass
        for ns in names + list(reversed(self.made_ns)):
            kill_ns_pids(ns)
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
        try:
            left = [n for n in os.listdir("/run/netns") if n in names + self.made_ns]
        except OSError:
            left = []
        if left:
            problems.append(f"namespaces left behind: {left}")
        self.made_ns = []
        if self.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems

    def cleanup_children(self):
        """Hook, first step of cleanup: stop the bench's own child processes; returns problems."""
        return []

    def cleanup_leftovers(self):
        """Hook, after the daemon stopped: kill and report what survived it; returns problems."""
        return []


# ---------------------------------------------------------------- main

def main_with(name, make_env, measure):
    """Run measure(env) -> Report with env = make_env(); print the report only if the
    measurement and the teardown both succeeded. Exit status 0 / 1 (failed) / 130 (interrupted)."""
    if os.geteuid() != 0:
        print(f"bench/{name} must run as root (it creates network namespaces)", file=sys.stderr)
        return 1

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)  # SIGINT too when started in the background (inherited as ignored)
    t0 = time.monotonic()
    env, rep, status = None, None, 0
    try:
        env = make_env()
        rep = measure(env)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    except (BenchError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
        log(f"FAILED: {e}")
        if env is not None and env.daemon is not None:
            log(f"end of the daemon log:\n{env.tail_log()}")
        status = 1
    finally:
        problems = env.cleanup() if env is not None else []
    for p in problems:
        log(f"cleanup: {p}")
    if problems:
        status = status or 1
    if status == 0:
        rep.print()
    word = {0: "done", 130: "interrupted"}.get(status, "FAILED")
    log(f"{word} in {time.monotonic() - t0:.0f}s (exit {status})")
    return status
