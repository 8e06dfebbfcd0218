//! Daemon start, after re-adoption: what a crash left that no row owns goes, each logged:
//! machine links (TAPs, veths) no running machine owns, and the image store's scratch folders.

use super::Machines;
use crate::domain::MachineState;
use crate::error::chain;
use sistemo_vmm::Instance;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Scratch folders in the image store (`.WHAT-PID-UUID`): builds, pulls, uploads, OCI
/// conversions and imports in progress.
const SCRATCH: &[&str] = &[".build-", ".pull-", ".upload-", ".oci-", ".import-"];

/// A machine's host-side link name: `sm` and ten hex digits of its ID (`net::host_ifname`).
fn is_machine_link(name: &str) -> bool {
    name.len() == 12 && name.starts_with("sm") && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl Machines {
    /// Sweep leftovers no row owns (see the module's header).
    pub(super) async fn sweep_leftovers(&self) {
        self.sweep_links().await;
        let images = self.settings.machines_dir.with_file_name("images");
        sweep_scratch(&images);
    }

    /// Delete machine links no running machine owns: those on one of our bridges, and
    /// detached ones named after one of our machines (another daemon's links in this network
    /// namespace sit on its own bridges and are left alone).
    async fn sweep_links(&self) {
        let (bridges, ours, running) = {
            let st = self.store.lock();
            let bridges: HashSet<String> = st
                .networks()
                .map(|ns| ns.into_iter().map(|n| n.bridge.to_string()).collect())
                .unwrap_or_default();
            let rows = st.machines().unwrap_or_default();
            let name = |m: &crate::store::Machine| crate::net::host_ifname(&m.id);
            let ours: HashSet<String> = rows.iter().map(name).collect();
            let running: HashSet<String> = rows
                .iter()
                .filter(|m| {
                    m.state == MachineState::Running && m.instance.as_ref().is_some_and(Instance::is_alive)
                })
                .map(name)
                .collect();
            (bridges, ours, running)
        };
        let links = match self.links.with_controllers().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "listing links for the start-up sweep failed");
                return;
            }
        };
        for (link, controller) in links {
            if !is_machine_link(&link) || running.contains(&link) {
                continue;
            }
            let on_ours = controller.as_ref().is_some_and(|c| bridges.contains(c));
            if !on_ours && !ours.contains(&link) {
                continue;
            }
            tracing::warn!(
                link,
                bridge = controller.as_deref().unwrap_or("none"),
                "deleting a machine link no running machine owns"
            );
            if let Err(e) = self.links.unshape(&link).await {
                tracing::warn!(link, error = %chain(&e), "deleting its shaper failed");
            }
            if let Err(e) = self.links.delete(&link).await {
                tracing::warn!(link, error = %chain(&e), "deleting it failed");
            }
        }
    }
}

/// Remove the scratch folders in `images` (a build's `proc`, `sys`… unmounted first; a folder
/// that still holds a mount is kept, so nothing is deleted through it).
pub(super) fn sweep_scratch(images: &Path) {
    let Ok(rd) = std::fs::read_dir(images) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !SCRATCH.iter().any(|p| name.starts_with(p)) || !e.path().is_dir() {
            continue;
        }
        let dir = e.path();
        for m in mounts_under(&dir) {
            tracing::warn!(mount = %m.display(), "unmounting what a crashed image build left mounted");
            let _ = std::process::Command::new("umount").arg("-l").arg(&m).status();
        }
        if !mounts_under(&dir).is_empty() {
            tracing::warn!(dir = %dir.display(), "keeping a scratch folder that still holds a mount");
            continue;
        }
        tracing::warn!(dir = %dir.display(), "removing a scratch folder a crash left");
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %err, "could not remove it");
        }
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// A mountinfo path: spaces, tabs, newlines and backslashes come as `\ooo`.
fn unescape(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(n) = u8::from_str_radix(&p[i + 1..i + 4], 8)
        {
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_links_are_told_apart() {
        assert!(is_machine_link("sm0123456789"));
        assert!(is_machine_link("smabcdef0123"));
        for n in [
            "sistemo0",
            "sb0123456789",
            "st-t01234567",
            "sm012345678",
            "smxyz0123456",
            "sm01234567890",
        ] {
            assert!(!is_machine_link(n), "{n}");
        }
    }

    #[test]
    fn scratch_folders_go_and_the_rest_stays() {
        let dir = std::env::temp_dir().join(format!("sistemo-sweep-{}", uuid::Uuid::new_v4().simple()));
        for d in [
            ".build-1-a/root/proc",
            ".pull-2-b",
            ".upload-3-c",
            "keep",
            ".other-4-d",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join(".pull-2-b/image.ext4"), b"half").unwrap();
        std::fs::write(dir.join("abc.ext4"), b"image").unwrap();
        sweep_scratch(&dir);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".other-4-d", "abc.ext4", "keep"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[ignore = "mounting needs root (CAP_SYS_ADMIN): run sudo scripts/test"]
    fn a_build_left_mounted_is_unmounted_before_it_is_removed() {
        let dir = std::env::temp_dir().join(format!("sistemo-sweep-{}", uuid::Uuid::new_v4().simple()));
        let proc_dir = dir.join(".build-1-a/root/proc");
        std::fs::create_dir_all(&proc_dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "hh-sweep", proc_dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(mounts_under(&dir), std::slice::from_ref(&proc_dir));
        sweep_scratch(&dir);
        assert!(mounts_under(&dir).is_empty(), "the mount is gone");
        assert!(!dir.join(".build-1-a").exists(), "and then the folder");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
