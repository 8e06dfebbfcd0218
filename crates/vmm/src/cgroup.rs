//! One control group per machine, so that a guest (or a compromised VMM) cannot take the host's
//! memory, CPU or task table: `memory.max`, `cpu.max` and `pids.max` on cgroup v2 under
//! `/sys/fs/cgroup/sistemo/<machine>`; on hosts whose memory, pids and cpu controllers are still
//! on cgroup v1 (hybrid layouts, some containers), the same limits under the daemon's own cgroup
//! of each v1 hierarchy. Without either, machines run unlimited and [`Cgroups::describe`] says so.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
/// The subtree sistemo creates.
const SUBTREE: &str = "sistemo";

/// What a machine's cgroup allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (guest RAM plus the VMM's overhead), bytes.
    pub memory_bytes: u64,
    /// CPU time per 100 ms period, microseconds (100 000 per vCPU).
    pub cpu_quota_us: u64,
    /// Tasks (processes and threads).
    pub pids: u64,
}

impl Limits {
    /// These limits with the CPU capped at `milli` thousandths of a CPU (`--cpu-limit`) when
    /// that is below what they allow; 0 changes nothing.
    pub fn with_cpu_limit(mut self, milli: u32) -> Limits {
        let quota = u64::from(milli) * CPU_PERIOD_US / 1000;
        if milli > 0 && quota < self.cpu_quota_us {
            // The kernel's smallest quota is 1 ms.
            self.cpu_quota_us = quota.max(1000);
        }
        self
    }
}

/// CPU accounting period, microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// How this host's cgroups can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// Unified hierarchy with the memory, cpu and pids controllers; machines under `base`.
    V2 {
        /// `/sys/fs/cgroup/sistemo`.
        base: PathBuf,
    },
    /// Legacy hierarchies: `(controller, base)` for memory, pids and cpu.
    V1 {
        /// Each controller's `…/<daemon's cgroup>/sistemo`.
        bases: Vec<(String, PathBuf)>,
    },
    /// No usable cgroups (the reason); machines run without limits.
    Unavailable(String),
}

impl Cgroups {
    /// Detect what the host offers and prepare sistemo's subtree (as root).
    pub fn detect() -> Cgroups {
        Self::detect_with(true)
    }

    /// What [`Cgroups::detect`] would find, changing nothing (for `doctor`).
    pub fn probe() -> Cgroups {
        Self::detect_with(false)
    }

    fn detect_with(prepare: bool) -> Cgroups {
        let root = Path::new(ROOT);
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| v2.split_whitespace().any(|x| x == c);
        if has("memory") && has("pids") && has("cpu") {
            let base = root.join(SUBTREE);
            if !prepare {
                return Cgroups::V2 { base };
            }
            return match prepare_v2(root, &base) {
                Ok(()) => Cgroups::V2 { base },
                Err(e) => Cgroups::Unavailable(format!("cgroup v2 at {ROOT} is not usable: {e}")),
            };
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut bases = Vec::new();
        for c in ["memory", "pids", "cpu"] {
            let mount = root.join(c);
            let probe = match c {
                "memory" => "memory.limit_in_bytes",
                "pids" => "cgroup.procs",
                _ => "cpu.cfs_quota_us",
            };
            if !mount.join(probe).exists() {
                return Cgroups::Unavailable(format!(
                    "no cgroup v2 memory/pids/cpu controllers at {ROOT}, and no cgroup v1 {c} hierarchy"
                ));
            }
            let base = mount.join(v1_own_path(&own, c)).join(SUBTREE);
            if !prepare {
                bases.push((c.to_string(), base));
                continue;
            }
            if let Err(e) = std::fs::create_dir_all(&base) {
                return Cgroups::Unavailable(format!("cannot create {}: {e}", base.display()));
            }
            bases.push((c.to_string(), base));
        }
        Cgroups::V1 { bases }
    }

    /// One line for `doctor`.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { base } => format!("cgroup v2: one cgroup per machine under {}", base.display()),
            Cgroups::V1 { bases } => format!(
                "cgroup v1 (memory, pids, cpu): one cgroup per machine under {}",
                bases
                    .first()
                    .map(|b| b.1.display().to_string())
                    .unwrap_or_default()
            ),
            Cgroups::Unavailable(why) => format!("machines run without memory/CPU/task limits: {why}"),
        }
    }

    /// True when machines get limits.
    pub fn available(&self) -> bool {
        !matches!(self, Cgroups::Unavailable(_))
    }

    /// The machine's cgroup directories (one per v1 controller).
    pub fn dirs(&self, machine: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { base } => vec![base.join(machine)],
            Cgroups::V1 { bases } => bases.iter().map(|(_, b)| b.join(machine)).collect(),
            Cgroups::Unavailable(_) => vec![],
        }
    }

    /// Create (or reuse) the machine's cgroup with `limits`; returns the `cgroup.procs` files a
    /// process joins it through.
    pub fn create(&self, machine: &str, limits: Limits) -> std::io::Result<Vec<PathBuf>> {
        let ctx =
            |p: &Path, e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", p.display()));
        let write = |p: PathBuf, v: String| std::fs::write(&p, v).map_err(|e| ctx(&p, e));
        let mut procs = Vec::new();
        match self {
            Cgroups::V2 { base } => {
                let d = base.join(machine);
                std::fs::create_dir_all(&d).map_err(|e| ctx(&d, e))?;
                write(d.join("memory.max"), limits.memory_bytes.to_string())?;
                // The guest's RAM stays in RAM: swapping it out only hides the limit.
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                write(d.join("pids.max"), limits.pids.to_string())?;
                write(
                    d.join("cpu.max"),
                    format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                procs.push(d.join("cgroup.procs"));
            }
            Cgroups::V1 { bases } => {
                for (c, b) in bases {
                    let d = b.join(machine);
                    std::fs::create_dir_all(&d).map_err(|e| ctx(&d, e))?;
                    match c.as_str() {
                        "memory" => write(d.join("memory.limit_in_bytes"), limits.memory_bytes.to_string())?,
                        "pids" => write(d.join("pids.max"), limits.pids.to_string())?,
                        _ => {
                            write(d.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                            write(d.join("cpu.cfs_quota_us"), limits.cpu_quota_us.to_string())?;
                        }
                    }
                    procs.push(d.join("cgroup.procs"));
                }
            }
            Cgroups::Unavailable(_) => {}
        }
        Ok(procs)
    }

    /// The limits a machine's cgroup has now (`None` without one).
    pub fn limits(&self, machine: &str) -> Option<Limits> {
        let read = |p: PathBuf| -> Option<u64> {
            std::fs::read_to_string(p)
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        match self {
            Cgroups::V2 { base } => {
                let d = base.join(machine);
                Some(Limits {
                    memory_bytes: read(d.join("memory.max"))?,
                    cpu_quota_us: read(d.join("cpu.max"))?,
                    pids: read(d.join("pids.max"))?,
                })
            }
            Cgroups::V1 { bases } => {
                let d = |c: &str| bases.iter().find(|b| b.0 == c).map(|b| b.1.join(machine));
                Some(Limits {
                    memory_bytes: read(d("memory")?.join("memory.limit_in_bytes"))?,
                    cpu_quota_us: read(d("cpu")?.join("cpu.cfs_quota_us"))?,
                    pids: read(d("pids")?.join("pids.max"))?,
                })
            }
            Cgroups::Unavailable(_) => None,
        }
    }

    /// True when `pid` is in the machine's cgroup (in every v1 hierarchy).
    pub fn contains(&self, machine: &str, pid: i32) -> bool {
        let dirs = self.dirs(machine);
        !dirs.is_empty()
            && dirs.iter().all(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
            })
    }

    /// Remove the machine's cgroup once its processes are gone; absent is fine.
    pub fn remove(&self, machine: &str) -> std::io::Result<()> {
        for d in self.dirs(machine) {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Enable the controllers for sistemo's subtree and for the machines below it.
fn prepare_v2(root: &Path, base: &Path) -> std::io::Result<()> {
    let enable = |dir: &Path| std::fs::write(dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
    enable(root)?;
    std::fs::create_dir_all(base)?;
    enable(base)
}

/// The daemon's own cgroup in v1 hierarchy `controller`, relative (from `/proc/self/cgroup`).
fn v1_own_path(proc_self_cgroup: &str, controller: &str) -> PathBuf {
    proc_self_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, cs, path) = (f.next()?, f.next()?, f.next()?);
            cs.split(',')
                .any(|c| c == controller)
                .then(|| path.trim_start_matches('/').to_string())
        })
        .next()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The limits for a machine: its RAM plus `overhead_mib`, 100 % of a host CPU per vCPU, and
/// `pids` tasks.
pub fn machine_limits(memory_mib: u64, vcpus: u32, overhead_mib: u64, pids: u64) -> Limits {
    Limits {
        memory_bytes: (memory_mib + overhead_mib) << 20,
        cpu_quota_us: u64::from(vcpus.max(1)) * CPU_PERIOD_US,
        pids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_v1_path_is_found_per_controller() {
        let t = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/x\n0::/\n";
        assert_eq!(v1_own_path(t, "memory"), PathBuf::from("process_api/abc"));
        assert_eq!(v1_own_path(t, "cpu"), PathBuf::from("x"));
        assert_eq!(v1_own_path(t, "pids"), PathBuf::new());
    }

    #[test]
    fn limits_follow_memory_and_vcpus() {
        let l = machine_limits(512, 2, 160, 300);
        assert_eq!(l.memory_bytes, 672 << 20);
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(l.pids, 300);
        assert_eq!(machine_limits(512, 0, 0, 1).cpu_quota_us, 100_000);
        // --cpu-limit: half a core of two vCPUs; none, or one over the vCPUs, changes nothing
        assert_eq!(l.with_cpu_limit(500).cpu_quota_us, 50_000);
        assert_eq!(l.with_cpu_limit(1250).cpu_quota_us, 125_000);
        assert_eq!(l.with_cpu_limit(0), l);
        assert_eq!(l.with_cpu_limit(3000), l);
        assert_eq!(l.with_cpu_limit(1).cpu_quota_us, 1000);
    }

    #[test]
    fn unavailable_has_no_dirs_and_says_why() {
        let c = Cgroups::Unavailable("read-only".into());
        assert!(c.dirs("m").is_empty() && !c.available());
        assert!(c.create("m", machine_limits(1, 1, 1, 1)).unwrap().is_empty());
        assert!(c.describe().contains("without") && c.describe().contains("read-only"));
    }
}
