#!/usr/bin/env python3
"""sistemo OCI images benchmark: pull + convert against skopeo + umoci + mkfs.ext4, a second
deploy of the same digest, and boot-to-exec of a busybox image. Run as `bench/images`.

    sudo bench/images [--bin target/release/sistemo] [--mb 100] [--boots 3] [--assets DIR]

Everything runs in a network namespace this script creates and removes (`bi-<pid>`): a
`docker-registry` on 127.0.0.1, the daemon (hypervisor qemu, assets hard-linked from --assets)
and its machines. Needs root, docker-registry, skopeo, umoci, e2fsprogs, busybox-static, QEMU.

Figures:
  oci_pull_convert_s      `sistemo image pull` of a three-layer image of about --mb MB (random
                          data, gzip layers) from the local registry, cold (no cached blob).
  baseline_s              the same image with the tools: `skopeo copy docker://… oci:DIR`, then
                          `umoci unpack` and `mkfs.ext4 -d` of the tree into a sparse file.
  pull_ratio              oci_pull_convert_s / baseline_s. Target <= 1.2.
  second_deploy_overhead_ms  deploy of an image already converted (no pull, no convert), wall
                          time minus the guest's boot as the daemon reports it ("ready after").
                          Target <= 100 ms. Split into second_deploy_pre_qemu_ms (CLI start to
                          the daemon's "starting" line: reference, disk, workload) and
                          second_deploy_post_ready_ms ("ready after" to the CLI's exit).
  plain_deploy_overhead_ms   the same for the plain ext4 image `debian` from --assets (same run,
                          same way); second_deploy_extra_ms is the difference of the medians.
  oci_boot_to_exec_s_median  from starting `machine deploy` of the busybox web image until the
                          first `machine exec NAME true` succeeds; median over --boots. Target
                          <= 2.2 s under TCG.
Python 3 standard library only. Prints a table and RESULT name=value lines.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PID = os.getpid()
NS = f"bi-{PID}"


def sh(cmd, check=True, ns=False, **kw):
    if ns:
        cmd = f"ip netns exec {NS} sh -c {shlex_quote(cmd)}"
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{r.stdout}{r.stderr}")
    return r


def shlex_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def timed(fn):
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def deploy_timed(cmd):
    """Run a deploy; its wall time and each progress line with its time since the start."""
    t = time.monotonic()
    p = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [(time.monotonic() - t, l) for l in p.stderr]
    p.wait()
    wall = time.monotonic() - t
    if p.returncode != 0:
        raise SystemExit(f"failed: {cmd}\n{p.stdout.read()}" + "".join(l for _, l in lines))
    return wall, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/sistemo")
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--assets", default="/var/cache/sistemo-test/data")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: sudo bench/images")
    binary = os.path.abspath(a.bin)
    tmp = tempfile.mkdtemp(prefix="sistemo-bench-images-")
    procs = []
    sock = f"{tmp}/api.sock"
    cli = f"{binary} --socket {sock}"
    try:
        sh(f"ip netns add {NS} && ip netns exec {NS} ip link set lo up")
        # The image: busybox web server + two layers of random data.
        lay, b = f"{tmp}/layout", f"{tmp}/bundle"
        third = a.mb // 3
        sh(f"umoci init --layout {lay} && umoci new --image {lay}:img && umoci unpack --image {lay}:img {b}"
           f" && mkdir -p {b}/rootfs/bin {b}/rootfs/www && cp /bin/busybox {b}/rootfs/bin/"
           f" && ln -s busybox {b}/rootfs/bin/sh && echo hi > {b}/rootfs/www/index.html"
           f" && head -c {third}M /dev/urandom > {b}/rootfs/data1 && umoci repack --refresh-bundle --image {lay}:img {b}"
           f" && head -c {third}M /dev/urandom > {b}/rootfs/data2 && umoci repack --refresh-bundle --image {lay}:img {b}"
           f" && head -c {third}M /dev/urandom > {b}/rootfs/data3 && umoci repack --refresh-bundle --image {lay}:img {b}"
           f" && rm -rf {b} && umoci config --image {lay}:img --config.entrypoint /bin/busybox"
           f" --config.cmd httpd --config.cmd -f --config.cmd -p --config.cmd 8080 --config.cmd -h --config.cmd /www")
        with open(f"{tmp}/reg.yml", "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp}/reg\n"
                    "http:\n  addr: 127.0.0.1:5099\n")
        procs.append(subprocess.Popen(["ip", "netns", "exec", NS, "docker-registry", "serve", f"{tmp}/reg.yml"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while sh("curl -sf http://127.0.0.1:5099/v2/", check=False, ns=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("the registry did not start")
            time.sleep(0.1)
        sh(f"skopeo copy --quiet --dest-tls-verify=false oci:{lay}:img docker://127.0.0.1:5099/img:1", ns=True)

        # Baseline: skopeo to a layout, umoci unpack, mkfs.ext4 -d.
        def baseline():
            sh(f"skopeo copy --quiet --src-tls-verify=false docker://127.0.0.1:5099/img:1 oci:{tmp}/base:img", ns=True)
            sh(f"umoci unpack --image {tmp}/base:img {tmp}/basetree")
            size = int(sh(f"du -sb {tmp}/basetree/rootfs").stdout.split()[0])
            sh(f"truncate -s {int(size * 1.3) + (128 << 20)} {tmp}/base.ext4 && mkfs.ext4 -q -F -E "
               f"lazy_itable_init=0,lazy_journal_init=0 -d {tmp}/basetree/rootfs {tmp}/base.ext4")
        base_s, _ = timed(baseline)
        shutil.rmtree(f"{tmp}/basetree", ignore_errors=True)
        for p in [f"{tmp}/base", f"{tmp}/base.ext4"]:
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.path.exists(p) and os.remove(p)

        # The daemon.
        os.makedirs(f"{tmp}/data")
        for sub in ["kernel", "ssh", "images"]:
            if os.path.exists(f"{a.assets}/{sub}"):
                sh(f"cp -al {a.assets}/{sub} {tmp}/data/")
        # The daemon rewrites index.json (a new file, by rename): the assets' copy stays as it is.
        plain = os.path.exists(f"{tmp}/data/images/index.json") and '"debian"' in open(
            f"{tmp}/data/images/index.json").read()
        with open(f"{tmp}/config.yml", "w") as f:
            f.write(f'netns_prefix: "bim{PID}-"\n')
        os.chmod(f"{tmp}/config.yml", 0o600)
        procs.append(subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{NS}", "--", binary, "--socket", sock, "up", "--config",
             f"{tmp}/config.yml", "--data-dir", f"{tmp}/data", "--nft-table", f"bi_{PID}", "--hypervisor", "qemu"],
            stdout=open(f"{tmp}/daemon.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while sh(f"{cli} image list", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not start: " + open(f"{tmp}/daemon.log").read())
            time.sleep(0.2)

        def settle():
            """Wait until the daemon's background spare-disk copies are done (a `.filling` file
            exists while one runs): the daemon makes spares at start and again after each deploy
            took one, and a multi-GB copy with its fsync running beside a timed pull or deploy
            measures the disk's contention, not the pull or the deploy."""
            deadline = time.monotonic() + 120
            pool = f"{tmp}/data/pool"
            while os.path.isdir(pool) and any(n.endswith(".filling") for n in os.listdir(pool)):
                if time.monotonic() > deadline:
                    raise SystemExit("spare disks were still being made after 120 s")
                time.sleep(0.05)

        settle()
        pull_s, _ = timed(lambda: sh(f"{cli} image pull 127.0.0.1:5099/img:1"))

        boots, overheads, pre, post = [], [], [], []
        for i in range(max(a.boots, 1)):
            name = f"b{i}"
            settle()
            t = time.monotonic()
            wall, lines = deploy_timed(f"{cli} machine deploy 127.0.0.1:5099/img:1 --name {name}")
            # `exit 0` runs through the guest's shell (busybox's), which has it built in.
            while sh(f"{cli} machine exec {name} 'exit 0'", check=False).returncode != 0:
                time.sleep(0.05)
            boots.append(time.monotonic() - t)
            ready = next((float(m.group(1)) for _, l in lines
                          for m in [re.search(r"ready after ([0-9.]+)s", l)] if m), None)
            starting = next((at for at, l in lines if "starting " in l), None)
            ready_at = next((at for at, l in lines if "ready after" in l), None)
            if ready is not None:
                overheads.append((wall - ready) * 1000)
            if starting is not None and ready_at is not None:
                # Before QEMU starts (resolve, disk, workload) and after the guest is ready.
                pre.append(starting * 1000)
                post.append((wall - ready_at) * 1000)
            sh(f"{cli} -y machine rm {name}")
        # The same figure for a plain ext4 image (`debian`), deployed the same way, in the same run.
        plain_overheads = []
        for i in range(max(a.boots, 1) if plain else 0):
            name = f"p{i}"
            settle()
            wall, lines = deploy_timed(f"{cli} machine deploy debian --name {name}")
            ready = next((float(m.group(1)) for _, l in lines
                          for m in [re.search(r"ready after ([0-9.]+)s", l)] if m), None)
            if ready is not None:
                plain_overheads.append((wall - ready) * 1000)
            sh(f"{cli} -y machine rm {name}")
        print("plain deploys (overhead; ms):", ", ".join(f"{o:.0f}" for o in plain_overheads), file=sys.stderr)
        print("deploys (overhead, before QEMU, after ready; ms):",
              ", ".join(f"{o:.0f}/{b:.0f}/{c:.0f}" for o, b, c in zip(overheads, pre, post)), file=sys.stderr)
        rows = [
            ("oci_pull_convert_s", f"{pull_s:.2f}", ""),
            ("baseline_s", f"{base_s:.2f}", "skopeo + umoci unpack + mkfs.ext4 -d"),
            ("pull_ratio", f"{pull_s / base_s:.2f}", "target <= 1.2"),
            ("second_deploy_overhead_ms", f"{statistics.median(overheads):.0f}" if overheads else "n/a",
             "target <= 100"),
            ("plain_deploy_overhead_ms", f"{statistics.median(plain_overheads):.0f}" if plain_overheads else "n/a",
             "the same for the plain ext4 image debian"),
            ("second_deploy_extra_ms", f"{statistics.median(overheads) - statistics.median(plain_overheads):.0f}"
             if overheads and plain_overheads else "n/a", "what the OCI image adds"),
            ("second_deploy_pre_qemu_ms", f"{statistics.median(pre):.0f}" if pre else "n/a",
             "CLI start to `starting` (resolve, disk, workload)"),
            ("second_deploy_post_ready_ms", f"{statistics.median(post):.0f}" if post else "n/a",
             "`ready after` to CLI exit (rules, reply)"),
            ("oci_boot_to_exec_s_median", f"{statistics.median(boots):.2f}", "target <= 2.2 (TCG)"),
        ]
        print(f"{'figure':28} {'value':>8}  note")
        for k, v, n in rows:
            print(f"{k:28} {v:>8}  {n}")
        for k, v, _ in rows:
            if v != "n/a":
                print(f"RESULT {k}={v}")
    finally:
        if os.path.exists(sock):
            import json
            try:
                for m in json.loads(sh(f"{cli} machine list -o json", check=False).stdout or "[]"):
                    sh(f"{cli} -y machine rm {m['name']}", check=False)
            except ValueError:
                pass
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        sh(f"ip netns del {NS}", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
