#!/usr/bin/env python3
"""sistemo machines benchmark: boot, deploy overhead, daemon memory, CLI latency, idle VMMs. Run as
`bench/machines`.

    sudo bench/machines [--quick] [--bin target/release/sistemo] [--boots N] [--keep]

This file owns the machine measurements: the VM assets linked into a private data dir, deploys
through the CLI timed against the qemu process start and the streamed progress lines, /proc
sampling of the daemon, the detailed output and the figures below; MachEnv adds the check that no
qemu of the run survives. The API client, daemon start/stop, namespace cleanup, the report and the
exit status come from sistemo_bench.py.

Needs root, a release build (`cargo build --release`), iproute2 (`ip`, `nsenter`), QEMU and the
prepared VM assets (kernel, initramfs, `debian` image) in /var/cache/sistemo-test/data (or
--assets DIR; they are hard-linked into a private data dir). Python 3 standard library only.

Everything runs in a network namespace this script creates and removes again (`bm-<pid>`):
the daemon (`sistemo up`, default hypervisor qemu), its bridge, the machines and its nftables
table `bm_<pid>`. Machines, the daemon, the namespace and the temp dir are removed on exit,
also on failure or Ctrl-C.

Figures (targets from the issue):
  boot_to_exec_s_median  wall time from starting `sistemo machine deploy debian` until the first
                         `sistemo machine exec NAME true` succeeds; median (and min/max) over
                         --boots runs (5, 2 with --quick); the machine is deleted between runs.
                         Ready = the guest agent answers (systemd may still be starting;
                         `deploy --wait init` waits for it too).
                         Target <= 2.5 s. boot_to_exec_s_ssh: the same for one
                         `deploy --wait ssh` (readiness as it was: the guest's sshd answers).
  exec_ms_median         p50 of `sistemo machine exec NAME true` (CLI process included), through the
                         guest agent; exec_ms_ssh_median: `true` over the pinned SSH command line of
                         `machine ssh` (connection shared after the first). Target <= 50 ms.
  exec_mb_s              100 MB of output (`head -c 100000000 /dev/zero`) read from the CLI's
                         stdout, best of 2; exec_mb_s_ssh: the same over SSH. Target >= 100 MB/s.
  deploy_overhead_ms     deploy wall time minus guest boot, for a 2 GB disk. Guest boot = from
                         the start of the machine's qemu-system-x86_64 process (starttime in
                         /proc/<pid>/stat, CLOCK_BOOTTIME ticks) until the daemon reports the
                         guest ready (the "ready after" progress line the CLI streams, time-stamped
                         on arrival). So overhead = (qemu start - CLI start) + (ready line - CLI
                         exit): CLI start, API, disk clone/resize, TAP, QEMU spawn, firewall rules,
                         final status. Median over all 2 GB deploys. Target <= 150 ms.
  daemon_rss_mb_idle     VmRSS of the daemon after >= 5 s idle; the larger of "one running machine"
                         and "no machine" (both reported). Target <= 20 MB.
  cli_list_ms            p50 over 50 runs of `sistemo machine list` with one machine (process
                         start included). Target <= 10 ms.
  vmm_overhead_mb        host memory per idle machine beyond its guest RAM, on --vmm-machines
                         machines running at once (5; 2 with --quick), after they idled: for each
                         machine's qemu-system-x86_64, the PSS of the whole process
                         (/proc/<pid>/smaps) minus the PSS of its guest-RAM mapping (the anonymous
                         mapping of exactly the guest's `-m` size: the part of the guest's RAM the
                         guest has touched), averaged over the machines. PSS, not RSS, so the
                         QEMU binary and libraries the machines share are counted once in all, not
                         once per machine; and the guest RAM actually resident, not the configured
                         size, because an idle guest touches only part of it and the rest costs the
                         host nothing. What is left is QEMU's own: the TCG translation cache
                         (tb-size, TCG only), its mapping of the guest kernel file, heap, device
                         state and its share of code. The RSS-based figure and the guest RAM
                         resident are reported too. The machines are the last boot machine and
                         --vmm-machines - 1 more, deployed for this and deleted after.
  idle_cpu_pct_per_machine  CPU (utime + stime, all threads) of those machines' QEMU processes
                         over --idle-secs, after a settle time, in % of one core, per machine.
  warm_deploy_to_exec_s_median  after `image warm debian` (image_warm_s), wall time from starting
                         `sistemo machine deploy debian` (restored from the template) until the
                         first `machine exec NAME true` succeeds, CLI included; median over 5 (2
                         with --quick) deploys, each deleted before the next. Target <= 0.6 s,
                         side by side with the cold boot_to_exec_s_median of the same run.
  warm_deploy_rss_mb     host memory a fresh clone adds: its QEMU's Pss (smaps_rollup) right
                         after the first exec; the guest RAM it shares with the template's file
                         (page cache) counts in part.

Exit status: 0 if everything ran (a missed target shows as MISS), 1 if something failed to run or
a deploy gave no boot/overhead figure or the cleanup had to kill a qemu (then no RESULT line is
printed), 130 on Ctrl-C / SIGTERM.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

from procstats import birth_mono, proc_starttime_mono
from sistemo_bench import DEFAULT_BIN, BenchError, Env, Report, log, main_with, pct, run

from machines_steps import (  # noqa: E402
    DEFAULT_ASSETS, NS, PID, TABLE, agent_vs_ssh, delete, describe, disk_reference, idle_rss,
    make_2g_image, phases, timed, vmm_idle, warm_deploys,
)


class MachEnv(Env):
    """The shared Env plus the VM assets, the CLI runs in flight and the qemu processes."""

    def __init__(self, args):
        super().__init__(args.bin, args.keep, f"bm-{PID}")
        self.assets = args.assets
        self.children = set()  # Popen objects of CLI runs in flight (killed on cleanup)
        self.notes = []        # observations printed with the output
        self.analyze = ""
        self.rss_trend = []    # (machine deleted, daemon VmRSS kB right after)

    def note(self, msg):
        log("NOTE: " + msg)
        self.notes.append(msg)

    def setup(self):
        if not os.access(self.bin, os.X_OK):
            raise BenchError(f"{self.bin} not found; run `cargo build --release`")
        self.add_ns(NS)
        os.makedirs(self.data)
        src = self.assets
        parts = [p for p in ("kernel", "images", "ssh") if os.path.exists(os.path.join(src, p))]
        if "kernel" not in parts or "images" not in parts:
            raise BenchError(f"no VM assets in {src}; run `{self.bin} image prepare --data-dir {src} "
                             f"--include nginx,nodejs` (or pass --assets)")
        for p in parts:
            r = run(["cp", "-al", os.path.join(src, p), self.data + "/"], check=False)
            if r.returncode != 0:  # another file system: copy (sparse)
                run(["cp", "-a", "--sparse=always", os.path.join(src, p), self.data + "/"], timeout=600)
        with open(self.cfg, "w") as f:
            # the 2 GiB image is a path image made in the run's temp dir: that folder is the
            # only place path images may come from (image_dirs)
            f.write(f"nft_table: {TABLE}\nimage_dirs: [{self.tmp}]\n")

    def start(self):
        _, secs = self.start_daemon(NS, "--nft-table", TABLE, timeout=120)
        return secs

    def daemon_pid(self):
        """nsenter execs the binary, so the Popen pid is the daemon; check that it is."""
        pid = self.daemon.pid
        exe = os.readlink(f"/proc/{pid}/exe")
        if os.path.basename(exe.replace(" (deleted)", "")) != "sistemo":
            raise BenchError(f"pid {pid} is {exe}, not the sistemo daemon")
        return pid

    def machines(self):
        return self.api.machines()

    def qemu_pids(self):
        """pids of qemu-system-x86_64 processes whose command line names our data dir."""
        out = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if cmd and b"qemu-system" in os.path.basename(cmd[0]) and any(self.data.encode() in a for a in cmd):
                out.append((int(d), b" ".join(cmd).decode(errors="replace")))
        return out

    # -- cleanup hooks
    def cleanup_children(self):
        for p in list(self.children):
            if p.poll() is None:
                p.kill()
                p.wait(5)
        return []

    def cleanup_leftovers(self):
        """Machines were deleted and the daemon stopped: no qemu of this run may remain."""
        left = self.qemu_pids()
        for pid, _ in left:
            log(f"cleanup: killing leftover qemu {pid}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        still = self.qemu_pids()
        if still:
            return [f"qemu processes of this run survive the cleanup: {still}"]
        if left:
            return [f"cleanup had to kill {len(left)} qemu process(es)"]
        log("cleanup: no qemu-system-x86_64 process of this run remains")
        return []


# ---------------------------------------------------------------- measurements

def deploy_once(env, name, image, storage=None, label="", wait=None):
    """Deploy, then exec `true` until it succeeds. Returns a dict of timings (seconds, monotonic)."""
    cmd = [env.bin, "--socket", env.sock, "machine", "deploy", image, "--name", name]
    if storage:
        cmd += ["--storage", storage]
    if wait:
        cmd += ["--wait", wait]
    lines = []
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    env.children.add(p)

    def reader():
        for line in p.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    stalls = []  # (start offset, latency) of GET /v1/info polled every 20 ms during the deploy
    poll_errors = []
    stop = threading.Event()

    def poller():
        while not stop.is_set():
            a = time.monotonic()
            try:
                env.api.ok("info", timeout=10)
            except Exception as e:
                poll_errors.append(f"+{(a - t0) * 1000:.0f} ms: {e}")
            stalls.append((a - t0, time.monotonic() - a))
            stop.wait(0.02)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    pt = threading.Thread(target=poller, daemon=True)
    pt.start()
    try:
        out = p.stdout.read()
        p.wait(timeout=400)
    finally:
        stop.set()
        th.join(5)
        pt.join(15)
        env.children.discard(p)
    t_deploy = time.monotonic()
    if p.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed ({p.returncode}):\n" + "\n".join(l for _, l in lines[-15:]))
    if poll_errors:
        raise BenchError(f"GET /v1/info failed {len(poll_errors)} time(s) during the deploy of {name}: "
                         + "; ".join(poll_errors[:3]))
    # first successful exec
    attempts, t_first_exec = 0, None
    while True:
        attempts += 1
        te = time.monotonic()
        r = env.cli("machine", "exec", name, "true", check=False, timeout=60)
        if t_first_exec is None:
            t_first_exec = time.monotonic() - te
        if r.returncode == 0:
            break
        if time.monotonic() - t_deploy > 120:
            raise BenchError(f"`sistemo machine exec {name} true` still fails 120 s after deploy: {r.stderr.strip()}")
        time.sleep(0.05)
    t_exec = time.monotonic()
    worst = max(stalls, key=lambda x: x[1]) if stalls else (float("nan"), float("nan"))
    st = json.loads(env.cli("machine", "status", name, "-o", "json").stdout)
    mid = st.get("id", "")
    q = [(pid, c) for pid, c in env.qemu_pids() if mid and mid in c]
    res = dict(name=name, label=label, image=image, storage=storage, t0=t0, deploy=t_deploy - t0,
               total=t_exec - t0, attempts=attempts, first_exec=t_first_exec, lines=lines,
               stdout=out.strip(), storage_bytes=st.get("storage_bytes"), id=mid,
               api_stall=worst[1], api_stall_at=worst[0], api_polls=len(stalls))
    if len(q) != 1:
        raise BenchError(f"{name}: expected one qemu process for machine {mid}, found {len(q)}: {q}")
    res["qemu_pid"] = q[0][0]
    res["qemu_start"] = proc_starttime_mono(q[0][0]) - t0
    con = os.path.join(env.data, "machines", mid, "console.log")
    b = birth_mono(con) if os.path.exists(con) else None
    res["console_birth"] = None if b is None else b - t0
    def line_at(word):
        ts = [t for t, l in lines if word in l]
        return ts[0] - t0 if ts else None
    c0, c1 = line_at("cloning the image"), line_at("starting ")
    res["clone"] = c1 - c0 if c0 is not None and c1 is not None else None
    res["spawn"] = res["qemu_start"] - c1 if c1 is not None and res["qemu_start"] is not None else None
    ready = [t for t, l in lines if "ready after" in l]
    res["ready_line"] = ready[-1] - t0 if ready else None
    if res["ready_line"] is None:
        raise BenchError(f"{name}: no 'ready after' progress line on the deploy's stderr: "
                         + " | ".join(l for _, l in lines[-10:]))
    res["boot"] = res["ready_line"] - res["qemu_start"]
    res["overhead"] = res["deploy"] - res["boot"]
    res["pre"] = res["qemu_start"]
    res["post"] = res["deploy"] - res["ready_line"]
    return res


def measure(env, args):
    boots = args.boots or (2 if args.quick else 5)
    extra = 1 if args.quick else 2
    rep = Report()
    load0 = open("/proc/loadavg").read().split()[:3]
    env.setup()
    log(f"namespace {NS}, data dir {env.data}, table {TABLE}")
    dstart = env.start()
    log(f"daemon pid {env.daemon.pid} ready in {dstart:.2f}s")
    m = re.search(r"accel\S*=\s*(\S+)", env.tail_log(200))
    accel = m.group(1) if m else "?"

    rss0 = idle_rss(env, args.idle_secs)
    log(f"idle daemon, no machine: VmRSS {rss0['VmRSS']} kB")

    # 1. boot to exec, default deploy (2 GB disk: max(image, 2G))
    runs = []
    for i in range(boots):
        name = f"b{i + 1}"
        log(f"boot {i + 1}/{boots}: machine deploy debian --name {name}")
        r = deploy_once(env, name, "debian", label="debian (default 2G)")
        runs.append(r)
        log(describe(r))
        if i == 0:
            a = env.cli("machine", "exec", name,
                        "systemctl is-system-running --wait >/dev/null; systemd-analyze; systemd-analyze critical-chain ssh.service 2>&1 | tail -n +3 | head -12; "
                        "systemd-analyze blame 2>&1 | head -8", check=False, timeout=60)
            env.analyze = (a.stdout + a.stderr).rstrip()
        if i < boots - 1:
            r["delete"] = delete(env, name, r["id"])
    keep = runs[-1]["name"]
    log(f"exec through the agent and through sshd on {keep}")
    ex = agent_vs_ssh(env, keep, 10 if args.quick else 30)
    log(f"exec true p50: agent {pct(ex['agent_ms'], 50):.1f} ms, ssh {pct(ex['ssh_ms'], 50):.1f} ms; "
        f"100 MB: agent {ex['agent_rate']:.0f} MB/s, ssh {ex['ssh_rate']:.0f} MB/s")

    # the SSH readiness of before, side by side: deploy --wait ssh
    log("boot with --wait ssh (readiness as before the agent)")
    wssh = deploy_once(env, "w1", "debian", label="debian --wait ssh", wait="ssh")
    log(describe(wssh))
    wssh["delete"] = delete(env, "w1", wssh["id"])

    # 3+4 with one running machine
    if len(env.machines()) != 1:
        raise BenchError(f"expected 1 machine, found {env.machines()}")
    rss1 = idle_rss(env, args.idle_secs)
    log(f"idle daemon, one machine: VmRSS {rss1['VmRSS']} kB")
    list_ms = timed(lambda: env.cli("machine", "list"), args.list_runs)
    list_json_ms = timed(lambda: env.cli("machine", "list", "-o", "json"), 20)
    api_ms = timed(lambda: env.api.ok("list"), args.list_runs)
    ver_ms = timed(lambda: run([env.bin, "--version"]), 20)
    vmm_n = args.vmm_machines or (2 if args.quick else 5)
    vmm = vmm_idle(env, vmm_n, 3 if args.quick else 5, args.idle_secs)
    runs[-1]["delete"] = delete(env, keep, runs[-1]["id"])

    # 2. deploy overhead: explicit --storage 2G, and an image that is 2 GB already
    extra_runs = []
    for i in range(extra):
        name = f"s{i + 1}"
        log(f"deploy debian --storage 2G --name {name}")
        r = deploy_once(env, name, "debian", storage="2G", label="debian --storage 2G")
        extra_runs.append(r)
        log(describe(r))
        r["delete"] = delete(env, name, r["id"])
    img2g, base_size = make_2g_image(env)
    for i in range(extra):
        name = f"g{i + 1}"
        log(f"deploy {img2g} --name {name}")
        r = deploy_once(env, name, img2g, label="2 GiB image file")
        extra_runs.append(r)
        log(describe(r))
        r["delete"] = delete(env, name, r["id"])

    warm = warm_deploys(env, 2 if args.quick else 5)

    ref = disk_reference(env, img2g)
    log("disk reference (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in ref.items()))
    rss_end = idle_rss(env, args.idle_secs)
    log(f"idle daemon, no machine (after the deploys): VmRSS {rss_end['VmRSS']} kB")
    leftovers = env.qemu_pids()
    if leftovers:
        env.note(f"qemu processes still running after every machine was deleted: {leftovers}")

    # ---------------------------------------------------------------- output
    allr = runs + extra_runs
    print("sistemo machines benchmark")
    print(f"  binary {env.bin} ({run([env.bin, '--version']).stdout.strip()}); accel {accel}; "
          f"{os.cpu_count()} CPUs; boots {boots}; daemon ready in {dstart:.2f}s")
    print(f"  load average at start {load0}, at end {open('/proc/loadavg').read().split()[:3]} (other work on the host skews TCG boots)")
    print()
    print("Deploys (times from the start of the deploy command; overhead = deploy - boot, see below):")
    for r in allr:
        print(describe(r) + f"  delete {r.get('delete', float('nan')):.2f}s")
    print()
    print("Definitions:")
    print("  total     = `machine deploy` start -> first successful `machine exec NAME true` returns")
    print("  qemu@     = start of the machine's qemu-system-x86_64 process (/proc/<pid>/stat starttime,")
    print("              CLOCK_BOOTTIME, 10 ms ticks); console.log@ = that file's birth time (statx)")
    print("  ready@    = arrival of the daemon's 'ready after' progress line (its SSH `true` succeeded)")
    print("  boot      = ready@ - qemu@ (guest boot, including the daemon's SSH polling granularity)")
    print("  clone*    = between the arrivals of the 'cloning' and 'starting' progress lines; only meaningful")
    print("              if the daemon streams progress while it clones (see 'api max')")
    print("  api max   = slowest GET /v1/info (polled every 20 ms during the deploy) and when it started")
    print("  overhead  = deploy - boot = pre (CLI start .. QEMU start: API, disk clone + resize2fs, TAP,")
    print("              spawn) + post (ready line .. CLI exit: firewall rules, state, status reply, exit)")
    print()
    print(f"Progress lines of the first deploy ({runs[0]['name']}), as the CLI received them:")
    print("\n".join(phases(runs[0])))
    print(f"Progress lines of the first 2 GiB-image deploy ({extra_runs[-extra]['name']}):")
    print("\n".join(phases(extra_runs[-extra])))
    print()
    if env.analyze:
        print(f"Guest boot of {runs[0]['name']} as systemd sees it (`machine exec {runs[0]['name']} \"systemd-analyze; ...\"`):")
        print("\n".join("    " + l for l in env.analyze.splitlines()))
        print()
    print("Disk clone steps redone with ordinary tools on the same file system (ms; page cache warm): "
          + ", ".join(f"{k} {v:.0f}" for k, v in ref.items()))
    print()
    print(f"daemon /proc/<pid>/status after {args.idle_secs:g}s idle (kB): fresh, no machine {rss0}; "
          f"one machine {rss1}; no machine after {len(allr)} deploys {rss_end}")
    print("daemon VmRSS (kB) right after each delete: " + ", ".join(f"{n} {kb}" for n, kb in env.rss_trend))
    print(f"CLI/API latency with one machine (ms): machine list p50 {pct(list_ms, 50):.2f} p90 {pct(list_ms, 90):.2f} "
          f"max {max(list_ms):.2f}; list -o json p50 {pct(list_json_ms, 50):.2f}; "
          f"GET /v1/machines over the socket p50 {pct(api_ms, 50):.2f}; `sistemo --version` p50 {pct(ver_ms, 50):.2f}")
    print(f"Idle machines' QEMU processes ({vmm_n} running at once; kB from /proc/<pid>/smaps; CPU over "
          f"{args.idle_secs:g}s, % of one core):")
    for d in vmm:
        print(f"    {d['name']:<6} pid {d['pid']:<8} -m {d['memory_mib']}M  Pss {d['pss']:>7}  Rss {d['rss']:>7}  "
              f"guest RAM resident {d['ram_rss']:>7} (Pss {d['ram_pss']:>7})  beyond it: Pss {d['pss'] - d['ram_pss']:>6}"
              f"  Rss {d['rss'] - d['ram_rss']:>6}  CPU {d['cpu_pct']:.2f}%")
        print("           largest other mappings (path, size kB, Rss kB): "
              + "; ".join(f"{os.path.basename(p)} {sz} {r}" for p, sz, r in d["top"]))
    if env.notes:
        print()
        print("Notes:")
        for n in env.notes:
            print(f"  - {n}")

    tot = [r["total"] for r in runs]
    rep.add("boot_to_exec_s_median", statistics.median(tot), "s", "boot (deploy debian -> exec true)", ("<=", 2.5))
    rep.add("boot_to_exec_s_min", min(tot), "s", "boot (deploy debian -> exec true)")
    rep.add("boot_to_exec_s_max", max(tot), "s", "boot (deploy debian -> exec true)")
    rep.add("guest_boot_s_median", statistics.median(r["boot"] for r in runs), "s",
            "boot (deploy debian -> exec true)")
    rep.add("boot_to_exec_s_ssh", wssh["total"], "s", "boot (deploy debian -> exec true)")
    sec = "warm deploys (restored from a template, image warm debian)"
    wt = [r["total"] for r in warm["runs"]]
    rep.add("warm_deploy_to_exec_s_median", statistics.median(wt), "s", sec, ("<=", 0.6))
    rep.add("warm_deploy_to_exec_s_min", min(wt), "s", sec)
    rep.add("warm_deploy_to_exec_s_max", max(wt), "s", sec)
    rep.add("warm_deploy_s_median", statistics.median(r["deploy"] for r in warm["runs"]), "s", sec)
    rep.add("warm_deploy_rss_mb", statistics.median(r["pss_kb"] for r in warm["runs"]) / 1024, "MB", sec)
    rep.add("image_warm_s", warm["warm_s"], "s", sec)
    rep.add("template_mb", warm["bytes"] / (1 << 20), "MB", sec)
    sec = "exec: guest agent vs sshd, same machine"
    rep.add("exec_ms_median", pct(ex["agent_ms"], 50), "ms", sec, ("<=", 50))
    rep.add("exec_ms_ssh_median", pct(ex["ssh_ms"], 50), "ms", sec)
    rep.add("exec_mb_s", ex["agent_rate"], "MB/s", sec, (">=", 100))
    rep.add("exec_mb_s_ssh", ex["ssh_rate"], "MB/s", sec)
    rep.add("first_exec_ms_median", statistics.median(r["first_exec"] for r in runs) * 1000, "ms",
            "boot (deploy debian -> exec true)")
    sec = "deploy overhead, 2 GB disk"
    ov = [r["overhead"] * 1000 for r in allr if r["storage_bytes"] == 2 << 30]
    if not ov:
        raise BenchError(f"no deploy had a 2 GiB disk: {[r['storage_bytes'] for r in allr]}")
    rep.add("deploy_overhead_ms", statistics.median(ov), "ms", sec, ("<=", 150))
    for key, sel in (("deploy_overhead_ms_default", runs),
                     ("deploy_overhead_ms_storage_2g", [r for r in extra_runs if r["storage"]]),
                     ("deploy_overhead_ms_image_2g", [r for r in extra_runs if not r["storage"]])):
        rep.add(key, statistics.median(r["overhead"] * 1000 for r in sel), "ms", sec)
    for key, sel in (("deploy_clone_ms_default", runs), ("deploy_clone_ms_image_2g", [r for r in extra_runs if not r["storage"]])):
        xs = [r["clone"] * 1000 for r in sel if r["clone"] is not None]
        if xs:
            rep.add(key, statistics.median(xs), "ms", sec)
    spawn = [r["spawn"] * 1000 for r in allr if r["spawn"] is not None]
    if spawn:
        rep.add("deploy_spawn_ms_median", statistics.median(spawn), "ms", sec)
    rep.add("deploy_pre_qemu_ms_median", statistics.median(r["pre"] * 1000 for r in allr), "ms", sec)
    rep.add("deploy_post_ready_ms_median", statistics.median(r["post"] * 1000 for r in allr), "ms", sec)
    sec = "daemon memory (VmRSS after idle)"
    idle = max(rss1["VmRSS"], rss_end["VmRSS"]) / 1024
    rep.add("daemon_rss_mb_idle", idle, "MB", sec, ("<=", 20))
    rep.add("daemon_rss_mb_idle_1_machine", rss1["VmRSS"] / 1024, "MB", sec)
    rep.add("daemon_rss_mb_idle_0_machines", rss_end["VmRSS"] / 1024, "MB", sec)
    rep.add("daemon_rss_mb_fresh", rss0["VmRSS"] / 1024, "MB", sec)
    rep.add("daemon_hwm_mb", rss_end["VmHWM"] / 1024, "MB", sec)
    rep.add("daemon_idle_cpu_pct_1_machine", rss1["cpu_pct"], "%", sec)
    sec = f"idle machines' VMMs ({vmm_n} machines)"
    rep.add("vmm_overhead_mb", statistics.mean(d["pss"] - d["ram_pss"] for d in vmm) / 1024, "MB", sec)
    rep.add("vmm_overhead_rss_mb", statistics.mean(d["rss"] - d["ram_rss"] for d in vmm) / 1024, "MB", sec)
    rep.add("guest_ram_resident_mb", statistics.mean(d["ram_rss"] for d in vmm) / 1024, "MB", sec)
    rep.add("idle_cpu_pct_per_machine", statistics.mean(d["cpu_pct"] for d in vmm), "%", sec)
    rep.add("idle_cpu_pct_max_machine", max(d["cpu_pct"] for d in vmm), "%", sec)
    sec = "CLI, one machine"
    rep.add("cli_list_ms", pct(list_ms, 50), "ms", sec, ("<=", 10))
    rep.add("cli_list_ms_p90", pct(list_ms, 90), "ms", sec)
    rep.add("api_list_ms", pct(api_ms, 50), "ms", sec)
    rep.add("cli_version_ms", pct(ver_ms, 50), "ms", sec)
    rep.add("api_max_ms_during_deploy", max(r["api_stall"] for r in allr) * 1000, "ms", "other")
    rep.add("delete_s_median", statistics.median(r["delete"] for r in allr if "delete" in r), "s", "other")
    return rep


def main():
    ap = argparse.ArgumentParser(prog="bench/machines", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 boots and 1 of each extra deploy variant")
    ap.add_argument("--bin", default=DEFAULT_BIN)
    ap.add_argument("--assets", default=DEFAULT_ASSETS, help="data dir with kernel/ and images/ to hard-link")
    ap.add_argument("--boots", type=int, default=None, help="deploys of `debian` for boot_to_exec (default 5, 2 with --quick)")
    ap.add_argument("--list-runs", type=int, default=50)
    ap.add_argument("--idle-secs", type=float, default=5.0,
                    help="idle window for the daemon's RSS/CPU and the machines' QEMU CPU")
    ap.add_argument("--vmm-machines", type=int, default=None,
                    help="machines running at once for vmm_overhead_mb / idle_cpu_pct_per_machine (default 5, 2 with --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log, data dir)")
    args = ap.parse_args()
    return main_with("machines", lambda: MachEnv(args), lambda env: measure(env, args))


if __name__ == "__main__":
    sys.exit(main())
