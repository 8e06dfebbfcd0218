"""bench/volumes: sistemo's volumes, timed through the daemon's API (issue #14).

  create_10g_ms          POST /v1/volumes of a 10 GiB ext4 volume (sparse file + mkfs.ext4)   <= 200 ms
  reflink_snapshot_ms    snapshot of a 2 GiB volume holding data, on a loop-mounted XFS file    <= 50 ms
  reflink_clone_ms       clone of that snapshot into a new volume, same file system             <= 50 ms
  copy_mib_s             the fallback's rate on ext4 (no reflink): a sparse copy of the data
  attach_start_delta_ms  machine start with one volume attached minus without (medians)         <= 50 ms

The daemon runs `--hypervisor netns` in a namespace this bench creates (`svb-<pid>-d`), so the
start figure is the daemon's share of attaching a volume (store, disk list, the volume lock);
QEMU's own cost of one more virtio-blk device is not in it. Two daemons run one after the other:
one whose data dir is on an XFS file system in a sparse file the bench makes and loop-mounts
(mkfs.xfs with reflink=1), one on the temp dir's file system (ext4 on the development VM).
Everything (daemon, namespace, mount, loop device, files) is removed on exit.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sistemo_bench import DEFAULT_BIN, BenchError, Env, Report, log, main_with, run  # noqa: E402

PID = os.getpid()
NS = f"svb-{PID}-d"
MPREFIX = f"svb{PID}m-"


class VolEnv(Env):
    def __init__(self, args):
        super().__init__(args.bin, args.keep, f"svb-{PID}", ns_prefixes=[MPREFIX])
        self.mnt = None
        self.loop_file = None
        self.add_ns(NS)
        with open(self.cfg, "w") as f:
            # Volumes are counted in full against the free space: the XFS file is 16 GiB.
            f.write(f'netns_prefix: "{MPREFIX}"\nmin_disk_free: 1M\n')

    def start(self, data):
        self.data = data
        text, _ = self.start_daemon(NS, "--nft-table", f"svb{PID}", "--hypervisor", "netns")
        return text

    def mount_xfs(self, size_gib):
        self.loop_file = os.path.join(self.tmp, "xfs.img")
        with open(self.loop_file, "wb") as f:
            f.truncate(size_gib << 30)
        run(["mkfs.xfs", "-q", "-m", "reflink=1", self.loop_file])
        self.mnt = os.path.join(self.tmp, "xfs")
        os.makedirs(self.mnt)
        run(["mount", "-o", "loop", self.loop_file, self.mnt])
        return self.mnt

    def cleanup_leftovers(self):
        problems = []
        if self.mnt:
            r = run(["umount", self.mnt], check=False)
            if r.returncode != 0:
                problems.append(f"umount {self.mnt}: {r.stderr.strip()}")
            self.mnt = None
        return problems


def timed(f):
    t0 = time.perf_counter()
    r = f()
    return (time.perf_counter() - t0) * 1000, r


def fill(path, mib):
    """Write `mib` MiB of data (not zeros) at the start of a volume's file, as a guest would."""
    block = os.urandom(1 << 20)
    with open(path, "r+b") as f:
        for _ in range(mib):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def measure(env, args):
    rep = Report()
    api = env.api
    n = 3 if args.quick else 10
    data_mib = 256 if args.quick else 1024

    log("XFS with reflink: a 16 GiB sparse file, loop-mounted")
    mnt = env.mount_xfs(16)
    env.start(os.path.join(mnt, "data"))
    info = api.get("info")
    log(f"copy method: {info.get('volume_copy')}")
    if not info.get("volume_copy", "").startswith("reflink"):
        raise BenchError(f"the XFS data dir should reflink: {info.get('volume_copy')}")

    creates = []
    for i in range(n):
        ms, _ = timed(lambda: api.events("volume_create", {"size": "10G", "name": f"big{i}"}))
        creates.append(ms)
        api.get("volume_delete", name=f"big{i}")
    rep.add("create_10g_ms", statistics.median(creates), "ms", "create (XFS)", ("<=", 200))

    v = api.events("volume_create", {"size": "2G", "name": "src", "format": "raw"})
    log(f"filling {data_mib} MiB of the 2 GiB volume")
    fill(v["path"], data_mib)
    snaps, clones = [], []
    for i in range(n):
        ms, _ = timed(lambda: api.events("volume_snapshot", {"name": f"s{i}"}, name="src"))
        snaps.append(ms)
        ms, _ = timed(lambda: api.events("volume_clone", {"name": f"c{i}"}, name=f"s{i}"))
        clones.append(ms)
        api.get("volume_delete", name=f"c{i}")
        api.get("volume_delete", name=f"s{i}")
    rep.add("reflink_snapshot_ms", statistics.median(snaps), "ms", "snapshot and clone of 2 GiB (XFS)", ("<=", 50))
    rep.add("reflink_clone_ms", statistics.median(clones), "ms", "snapshot and clone of 2 GiB (XFS)", ("<=", 50))

    log("start with and without an attached volume")
    api.events("deploy", {"image": "debian", "name": "m", "expose": []})
    api.events("stop", name="m")

    def starts(k):
        out = []
        for _ in range(k):
            ms, _ = timed(lambda: api.events("start", name="m"))
            out.append(ms)
            api.events("stop", name="m")
        return out
    plain = starts(n)
    api.get("attach", {"volume": "src", "mount": None, "readonly": False}, name="m")
    attached = starts(n)
    rep.add("start_ms_no_volume", statistics.median(plain), "ms", "start (netns hypervisor)")
    rep.add("start_ms_one_volume", statistics.median(attached), "ms", "start (netns hypervisor)")
    rep.add("attach_start_delta_ms", statistics.median(attached) - statistics.median(plain), "ms",
            "start (netns hypervisor)", ("<=", 50))
    api.delete("m")
    env.stop_daemon()

    log("the copy fallback on the temp dir's file system")
    env.start(os.path.join(env.tmp, "data"))
    info = api.get("info")
    log(f"copy method: {info.get('volume_copy')}")
    v = api.events("volume_create", {"size": "2G", "name": "src", "format": "raw"})
    fill(v["path"], data_mib)
    rates = []
    for i in range(max(2, n // 3)):
        run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=False)
        ms, _ = timed(lambda: api.events("volume_snapshot", {"name": f"s{i}"}, name="src"))
        rates.append(data_mib / (ms / 1000))
        api.get("volume_delete", name=f"s{i}")
    copy = info.get("volume_copy", "")
    rep.add("copy_mib_s", statistics.median(rates), "MiB/s",
            "copy fallback (" + ("reflink here" if copy.startswith("reflink") else "sparse copy") + ")")
    api.get("volume_delete", name="src")
    env.stop_daemon()
    return rep


def main():
    ap = argparse.ArgumentParser(prog="bench/volumes", description="sistemo volumes benchmark")
    ap.add_argument("--quick", action="store_true", help="fewer samples, less data (< 1 minute)")
    ap.add_argument("--bin", default=DEFAULT_BIN)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs)")
    args = ap.parse_args()
    return main_with("volumes", lambda: VolEnv(args), lambda env: measure(env, args))


if __name__ == "__main__":
    sys.exit(main())
