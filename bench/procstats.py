"""What the benches read about processes and files from /proc and stat(1): start times and file
births on the time.monotonic() scale, a process's memory (status, smaps) and its CPU ticks."""

import re
import subprocess
import time

from sistemo_bench import CLK_TCK, BenchError, proc_stat


def mono_offset(clock):
    """clock - CLOCK_MONOTONIC, in seconds (to map other clocks onto time.monotonic())."""
    best = None
    for _ in range(5):
        a = time.monotonic()
        c = time.clock_gettime(clock)
        b = time.monotonic()
        if best is None or b - a < best[0]:
            best = (b - a, c - (a + b) / 2)
    return best[1]


def proc_starttime_mono(pid):
    """Process start on the time.monotonic() scale, from /proc/<pid>/stat (CLOCK_BOOTTIME ticks).
    /proc/stat's btime has 1 s resolution, so CLOCK_BOOTTIME is used directly instead."""
    return proc_stat(pid)[19] / CLK_TCK - mono_offset(time.CLOCK_BOOTTIME)


def birth_mono(path):
    """File creation time (statx btime via coreutils stat) on the time.monotonic() scale."""
    r = subprocess.run(["stat", "-c", "%.9W", path], capture_output=True, text=True)
    try:
        w = float(r.stdout.strip())
    except ValueError:
        return None
    if w <= 0:
        return None
    return w - mono_offset(time.CLOCK_REALTIME)


def status_kb(pid):
    d = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            d[k] = int(v.split()[0])
    return d


def cpu_ticks(pid):
    f = proc_stat(pid)
    return f[11] + f[12]  # utime + stime


def smaps(pid, ram_kb):
    """Memory of one QEMU process from /proc/<pid>/smaps, in kB: the whole process's Pss and Rss,
    and the Pss and Rss of its guest RAM: the anonymous mapping whose size is the guest's `-m`
    (allowing a few pages of alignment); QEMU maps guest RAM in one piece on `-M microvm`."""
    maps = []  # [path, size, rss, pss]
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
                maps.append([head[5] if len(head) > 5 else "", 0, 0, 0])
            elif head[0] in ("Size:", "Rss:", "Pss:"):
                maps[-1][("Size:", "Rss:", "Pss:").index(head[0]) + 1] = int(head[1])
    ram = [m for m in maps if not m[0] and ram_kb <= m[1] <= ram_kb + 4096]
    if len(ram) != 1:
        raise BenchError(f"qemu {pid}: expected one anonymous mapping of the guest RAM ({ram_kb} kB), "
                         f"found {[(m[1], m[2]) for m in ram]}")
    rest = sorted((m for m in maps if m is not ram[0]), key=lambda m: -m[2])
    return dict(pss=sum(m[3] for m in maps), rss=sum(m[2] for m in maps), ram_pss=ram[0][3], ram_rss=ram[0][2],
                top=[(m[0] or "[anon]", m[1], m[2]) for m in rest[:3]])
