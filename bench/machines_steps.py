"""Steps of the machines benchmark (bench/machines.py): exec over the agent vs SSH, idle
machines' VMM memory and CPU, deletes, the 2 GiB image reference, and warm deploys from a
template. Each takes the running MachEnv and returns figures; machines.py runs and reports them.
"""

import json
import os
import shutil
import subprocess
import time

from procstats import cpu_ticks, smaps, status_kb
from sistemo_bench import CLK_TCK, BenchError, log, run

PID = os.getpid()
NS = f"bm-{PID}"
TABLE = f"bm_{PID}"
DEFAULT_ASSETS = "/var/cache/sistemo-test/data"


def ssh_argv(env, name, *cmd):
    """`machine ssh`'s command line (pinned host key), run inside the bench's namespace."""
    argv = env.api.get("shell", name=name)["argv"]
    argv = [a for a in argv if a not in ("-t", "-tt")]
    return ["ip", "netns", "exec", NS, *argv, *cmd]


def stream_rate(argv, want):
    """Run `argv`, read its stdout to the end; (MB/s, bytes) from its start to its end."""
    t = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n = 0
    while True:
        b = p.stdout.read(1 << 20)
        if not b:
            break
        n += len(b)
    err = p.stderr.read().decode(errors="replace")
    p.wait(60)
    dt = time.monotonic() - t
    if p.returncode != 0 or n != want:
        raise BenchError(f"`{' '.join(argv[-3:])}` gave {n} bytes (want {want}), exit {p.returncode}: {err[-300:]}")
    return n / 1e6 / dt, n


def settle_guest(env, name):
    """Wait until the guest's systemd has finished starting its units: ready means the agent
    answers, long before the boot's tail is done, and that tail would be measured as load."""
    env.cli("machine", "exec", name, "systemctl is-system-running --wait >/dev/null; true", timeout=120)


def agent_vs_ssh(env, name, runs):
    """exec `true` and 100 MB of output, through the guest agent (`machine exec`) and through the
    guest's sshd (`machine ssh`'s pinned command line), on the same machine once it has booted."""
    settle_guest(env, name)
    agent_ms = timed(lambda: env.cli("machine", "exec", name, "true"), runs)
    ssh = ssh_argv(env, name, "true")
    # Ready means the agent answers: sshd may come up a moment later. The first connection that
    # works also sets up SSH's shared master.
    deadline = time.monotonic() + 60
    while run(ssh, check=False, timeout=60).returncode != 0:
        if time.monotonic() > deadline:
            raise BenchError(f"sshd of {name} did not answer within 60 s")
        time.sleep(0.1)
    ssh_ms = timed(lambda: run(ssh, timeout=60), runs)
    size = 100_000_000
    gen = f"head -c {size} /dev/zero"
    agent_rate = [stream_rate([env.bin, "--socket", env.sock, "machine", "exec", name, gen], size)[0] for _ in range(2)]
    ssh_rate = [stream_rate(ssh_argv(env, name, gen), size)[0] for _ in range(2)]
    return dict(agent_ms=agent_ms, ssh_ms=ssh_ms, agent_rate=max(agent_rate), ssh_rate=max(ssh_rate))


def delete(env, name, mid=None):
    if mid:
        con = os.path.join(env.data, "machines", mid, "console.log")
        try:
            shutil.copyfile(con, os.path.join(env.tmp, f"console-{name}.log"))
        except OSError:
            pass
    t = time.monotonic()
    env.cli("machine", "delete", name, "-y", timeout=120)
    dt = time.monotonic() - t
    env.rss_trend.append((name, status_kb(env.daemon_pid())["VmRSS"]))
    return dt


def describe(r):
    def ms(x):
        return "   n/a" if x is None else f"{x * 1000:8.0f}"
    boot = "n/a" if r["boot"] is None else f"{r['boot']:.2f}s"
    s = (f"  {r['name']:<10} {r['label']:<22} total {r['total']:6.2f}s  deploy {r['deploy']:6.2f}s"
         f"  qemu@{ms(r['qemu_start'])}ms  console.log@{ms(r['console_birth'])}ms"
         f"  ready@{ms(r['ready_line'])}ms  boot {boot}"
         f"  overhead {ms(r['overhead'])}ms (pre {ms(r['pre'])} + post {ms(r['post'])})"
         f"  clone* {ms(r['clone'])}ms  api max {r['api_stall'] * 1000:.0f}ms@{r['api_stall_at'] * 1000:.0f}"
         f"  first exec {r['first_exec'] * 1000:.0f}ms x{r['attempts']}")
    return s


def phases(r):
    out = []
    prev = 0.0
    for t, l in r["lines"]:
        off = t - r["t0"]
        out.append(f"    +{off * 1000:8.0f} ms (+{(off - prev) * 1000:6.0f})  {l.strip()}")
        prev = off
    out.append(f"    +{r['deploy'] * 1000:8.0f} ms (+{(r['deploy'] - prev) * 1000:6.0f})  deploy exited; stdout: {r['stdout'][:100]!r}")
    if r["qemu_start"] is not None:
        out.append(f"    qemu process started at +{r['qemu_start'] * 1000:.0f} ms (pid {r.get('qemu_pid')}, /proc starttime, {1000 // CLK_TCK} ms ticks)")
    return out


def idle_rss(env, secs):
    pid = env.daemon_pid()
    c0 = cpu_ticks(pid)
    time.sleep(secs)
    c1 = cpu_ticks(pid)
    d = status_kb(pid)
    d["cpu_pct"] = (c1 - c0) / CLK_TCK / secs * 100
    return d


def vmm_idle(env, n, settle, window):
    """Run `n` machines at once (one is already running; n - 1 more are deployed), let them
    idle `settle` s, then measure their QEMU processes' CPU over `window` s and their memory
    (smaps) at its end. The extra machines are deleted again. Returns per-machine dicts."""
    extra = [f"i{i + 1}" for i in range(n - 1)]
    for name in extra:
        log(f"vmm overhead: machine deploy debian --name {name} ({len(extra)} extra, {n} running)")
        env.cli("machine", "deploy", "debian", "--name", name, timeout=400)
    ms = env.machines()
    if len(ms) != n or any(m["status"] != "running" for m in ms):
        raise BenchError(f"expected {n} running machines, found {[(m['name'], m['status']) for m in ms]}")
    by_id = {m["id"]: m for m in ms}
    procs = {}
    for pid, cmd in env.qemu_pids():
        mid = next((i for i in by_id if f"/machines/{i}/" in cmd), None)
        if mid is None or mid in procs:
            raise BenchError(f"qemu {pid} is not the only VMM of one of our machines: {cmd[:200]}")
        procs[mid] = pid
    if len(procs) != n:
        raise BenchError(f"expected {n} qemu processes, found {len(procs)}")
    for m in ms:
        settle_guest(env, m["name"])
    log(f"vmm overhead: {n} machines booted, idle {settle:g}s, then CPU over {window:g}s")
    time.sleep(settle)
    c0 = {mid: cpu_ticks(pid) for mid, pid in procs.items()}
    time.sleep(window)
    out = []
    for mid, pid in procs.items():
        m = by_id[mid]
        d = smaps(pid, m["memory_mib"] * 1024)
        d.update(name=m["name"], pid=pid, memory_mib=m["memory_mib"],
                 cpu_pct=(cpu_ticks(pid) - c0[mid]) / CLK_TCK / window * 100)
        out.append(d)
    for name in extra:
        env.cli("machine", "delete", name, "-y", timeout=120)
    return out


def timed(fn, n):
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1000)
    return xs


def make_2g_image(env):
    """A copy of the debian image grown to 2 GiB (ext4), so a default deploy needs no resize2fs."""
    idx = json.load(open(os.path.join(env.data, "images", "index.json")))
    sha = idx.get("tags", {}).get("debian")
    if not sha:
        raise BenchError(f"no `debian` tag in {env.data}/images/index.json: {idx}")
    src = os.path.join(env.data, "images", f"{sha}.ext4")
    dst = os.path.join(env.tmp, "debian-2g.ext4")
    run(["cp", "--sparse=always", src, dst], timeout=300)
    run(["e2fsck", "-fp", dst], check=False, timeout=300)
    run(["resize2fs", dst, "2G"], timeout=300)
    size = os.path.getsize(dst)
    if size != 2 << 30:
        raise BenchError(f"{dst} is {size} bytes after resize2fs, not 2 GiB")
    return dst, os.path.getsize(src)


def disk_reference(env, img2g):
    """What the daemon's disk clone costs with ordinary tools (no reflink on this file system):
    the same steps as clone_disk (copy keeping holes, fsync, grow + resize2fs), timed one by one."""
    idx = json.load(open(os.path.join(env.data, "images", "index.json")))
    src = os.path.join(env.data, "images", f"{idx['tags']['debian']}.ext4")
    dst = os.path.join(env.tmp, "ref-disk.raw")
    out = {}

    def t(key, fn):
        a = time.monotonic()
        fn()
        out[key] = (time.monotonic() - a) * 1000

    def fsync(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    t("read_image_0.5G", lambda: run(["dd", f"if={src}", "of=/dev/null", "bs=64k"]))
    t("read_image_2G", lambda: run(["dd", f"if={img2g}", "of=/dev/null", "bs=64k"]))
    t("cp_sparse_0.5G", lambda: run(["cp", "--sparse=always", src, dst]))
    t("fsync_0.5G", lambda: fsync(dst))
    t("resize2fs_to_2G", lambda: (os.truncate(dst, 2 << 30), run(["resize2fs", dst], timeout=300)))
    t("fsync_after_resize", lambda: fsync(dst))
    os.remove(dst)
    t("cp_sparse_2G", lambda: run(["cp", "--sparse=always", img2g, dst]))
    t("fsync_2G", lambda: fsync(dst))
    os.remove(dst)
    return out


# ---------------------------------------------------------------- main

def warm_deploys(env, n):
    """`image warm debian`, then n deploys restored from that template, each timed from the start of
    `machine deploy` until `machine exec NAME true` succeeds (CLI included), and the host memory
    the fresh clone's QEMU adds (its Pss: pages shared with the template's RAM file or other
    clones count in part). Each clone is deleted before the next (the spare disk is refilled)."""
    t = time.monotonic()
    r = env.cli("image", "warm", "debian", "-o", "json", check=False, timeout=400)
    if r.returncode != 0:
        raise BenchError(f"`image warm debian` failed: {r.stderr.strip()[-800:]}")
    warm_s = time.monotonic() - t
    tmpl = json.loads(r.stdout)
    runs = []
    for i in range(n):
        name = f"w{i + 1}"
        # the spare copy of the template's disk is refilled after each deploy: wait for it
        pool = os.path.join(env.data, "pool")
        end = time.monotonic() + 60
        while time.monotonic() < end and os.path.isdir(pool) and any(
                f.endswith((".filling", ".cloning")) for f in os.listdir(pool)):
            time.sleep(0.05)
        t0 = time.monotonic()
        p = subprocess.Popen([env.bin, "--socket", env.sock, "machine", "deploy", "debian", "--name", name],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        env.children.add(p)
        lines = [(time.monotonic() - t0, l.rstrip("\n")) for l in p.stderr]
        p.wait(timeout=120)
        env.children.discard(p)
        if p.returncode != 0:
            raise BenchError(f"warm deploy of {name} failed: " + " | ".join(l for _, l in lines[-8:]))
        t_deploy = time.monotonic() - t0
        while True:
            e = env.cli("machine", "exec", name, "true", check=False, timeout=60)
            if e.returncode == 0:
                break
            if time.monotonic() - t0 > 60:
                raise BenchError(f"`machine exec {name} true` fails 60 s after a warm deploy: {e.stderr.strip()}")
        total = time.monotonic() - t0
        st = json.loads(env.cli("machine", "status", name, "-o", "json").stdout)
        if st.get("template") != tmpl["key"]:
            raise BenchError(f"{name} was not restored from the template: {st.get('template')}")
        q = [pid for pid, c in env.qemu_pids() if st["id"] in c]
        pss = 0
        if q:
            for line in open(f"/proc/{q[0]}/smaps_rollup"):
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
        runs.append(dict(name=name, deploy=t_deploy, total=total, pss_kb=pss))
        log(f"warm {name}: deploy {t_deploy:.3f}s, exec-ready {total:.3f}s, qemu Pss {pss} kB; progress: "
            + " | ".join(f"+{t * 1000:.0f} ms {l.strip('… ')}" for t, l in lines))
        delete(env, name, st["id"])
    return dict(warm_s=warm_s, bytes=tmpl.get("bytes", 0), runs=runs)
