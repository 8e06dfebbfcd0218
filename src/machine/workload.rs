//! A machine's workload (the one program an OCI image runs): deploy overrides in Docker's
//! spelling, the effective command kept in the machine's folder, and the exit code its guest
//! reports on the console when the workload ends (the machine then stops, its policy applies).

use super::{Deploy, Machines};
use crate::Progress;
use crate::domain::{MachineState, RestartPolicy};
use crate::error::{Error, Result};
use crate::store::Machine;
use sistemo_vmm::image::oci::{ImageConfig, WORKLOAD_FILE, Workload};
use std::path::Path;

/// What the guest's PID 1 prints when the workload ends (`sistemo_agent::init`), before the
/// power-off.
const EXIT_LINE: &str = "sistemo-init: the workload exited with code ";
/// The stopped machine's reason, with the code in it.
const EXIT_REASON: &str = "workload exited with code ";

/// Deploy-time overrides of an OCI image's config (`--env`, `--env-file`, `--entrypoint`,
/// `--workdir`, `--user`, `-- CMD ARGS`), checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `K=V` each, replacing the image's value of `K`.
    pub env: Vec<String>,
    /// The program (Docker's `--entrypoint`: the image's `Cmd` is dropped with it; empty: no
    /// entrypoint).
    pub entrypoint: Option<String>,
    /// Working directory (absolute).
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    pub user: Option<String>,
    /// Replaces the image's `Cmd`.
    pub cmd: Vec<String>,
}

fn no_nul(what: &str, v: &str) -> Result<()> {
    if v.contains('\0') {
        return Err(Error::Invalid(format!(
            "{what} {v:?} contains a NUL byte (allowed: text without NUL)"
        )));
    }
    Ok(())
}

impl Overrides {
    /// Check each value; the first bad one is named.
    pub fn parse(
        env: Vec<String>,
        entrypoint: Option<String>,
        workdir: Option<String>,
        user: Option<String>,
        cmd: Vec<String>,
    ) -> Result<Overrides> {
        for kv in &env {
            let key = kv.split_once('=').map(|(k, _)| k);
            if key.is_none_or(|k| k.is_empty() || k.chars().any(|c| c.is_whitespace())) {
                return Err(Error::Invalid(format!(
                    "env {kv:?} is not valid (allowed: KEY=VALUE, KEY not empty and without spaces)"
                )));
            }
            no_nul("env", kv)?;
        }
        if let Some(e) = &entrypoint {
            no_nul("entrypoint", e)?;
        }
        if let Some(w) = &workdir
            && (!w.starts_with('/') || w.contains('\0'))
        {
            return Err(Error::Invalid(format!(
                "workdir {w:?} is not valid (allowed: an absolute path, e.g. /app)"
            )));
        }
        if let Some(u) = &user {
            let part = |p: &str| {
                !p.is_empty()
                    && !p.starts_with('-')
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            };
            let ok = match u.split_once(':') {
                Some((a, b)) => part(a) && part(b),
                None => part(u),
            };
            if !ok {
                return Err(Error::Invalid(format!(
                    "user {u:?} is not valid (allowed: USER, UID, USER:GROUP or UID:GID)"
                )));
            }
        }
        for a in &cmd {
            no_nul("command argument", a)?;
        }
        Ok(Overrides {
            env,
            entrypoint,
            workdir,
            user,
            cmd,
        })
    }

    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    /// The flags given, for messages: `--env, --user`.
    fn flags(&self) -> String {
        let mut f = Vec::new();
        if !self.env.is_empty() {
            f.push("--env");
        }
        if self.entrypoint.is_some() {
            f.push("--entrypoint");
        }
        if self.workdir.is_some() {
            f.push("--workdir");
        }
        if self.user.is_some() {
            f.push("--user");
        }
        if !self.cmd.is_empty() {
            f.push("a command after --");
        }
        f.join(", ")
    }

    /// The refusal for image `image`, which boots its own init system.
    fn refused(&self, image: &str, why: &str) -> Error {
        Error::Invalid(format!(
            "image {image:?} {why}; {} apply to OCI images that run one program (allowed: such an image, or no overrides)",
            self.flags()
        ))
    }

    /// The workload of an image with config `c` under these overrides, as Docker runs it.
    pub fn apply(&self, image: &str, c: &ImageConfig) -> Result<Workload> {
        if c.runs_init_system() {
            let init = c
                .entrypoint
                .iter()
                .chain(&c.cmd)
                .next()
                .cloned()
                .unwrap_or_default();
            return Err(self.refused(image, &format!("boots its init system ({init})")));
        }
        let (entrypoint, cmd) = match &self.entrypoint {
            // Docker: a new entrypoint drops the image's Cmd.
            Some(e) => (
                Some(e.clone()).filter(|e| !e.is_empty()).into_iter().collect(),
                self.cmd.clone(),
            ),
            None if self.cmd.is_empty() => (c.entrypoint.clone(), c.cmd.clone()),
            None => (c.entrypoint.clone(), self.cmd.clone()),
        };
        let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if argv.is_empty() {
            return Err(Error::Invalid(format!(
                "image {image:?} has no command (allowed: give one with --entrypoint or after --)"
            )));
        }
        let mut env = c.env.clone();
        for kv in &self.env {
            let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
            env.push(kv.clone());
        }
        Ok(Workload {
            argv,
            env,
            cwd: self
                .workdir
                .clone()
                .or_else(|| Some(c.working_dir.clone()).filter(|w| !w.is_empty())),
            user: self
                .user
                .clone()
                .or_else(|| Some(c.user.clone()).filter(|u| !u.is_empty())),
        })
    }
}

/// The code in the last workload-exit line of a console `tail`, if the workload ended.
pub(super) fn exit_from_console(tail: &str) -> Option<i32> {
    tail.lines()
        .rev()
        .find_map(|l| l.split_once(EXIT_LINE))
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
}

/// The exit code a stopped machine's reason carries (see [`Machines::workload_exited`]).
pub fn exit_code(state: MachineState, reason: Option<&str>) -> Option<i32> {
    if state != MachineState::Stopped {
        return None;
    }
    reason?.strip_prefix(EXIT_REASON)?.parse().ok()
}

/// The workload in machine folder `dir`, if it runs one.
pub(super) fn read(dir: &Path) -> Option<Workload> {
    serde_json::from_slice(&std::fs::read(dir.join(WORKLOAD_FILE)).ok()?).ok()
}

impl Machines {
    /// Refuse overrides before anything is made when the image is known not to run one
    /// program (an image with an init system, a volume, a clone).
    pub(super) fn check_workload(&self, d: &Deploy) -> Result<()> {
        let o = &d.workload;
        if o.is_empty() {
            return Ok(());
        }
        if let Some(v) = &d.root_volume {
            return Err(o.refused(&format!("volume:{v}"), "is a volume booting its own init"));
        }
        if let Some(i) = self.images.as_ref().and_then(|b| b.lookup(&d.image)) {
            match &i.oci {
                Some(meta) => {
                    o.apply(&d.image, &meta.config)?;
                }
                None => return Err(o.refused(&d.image, "boots its own init system")),
            }
        }
        Ok(())
    }

    /// Write the machine's workload under the deploy's overrides into `dir` (the disk is made,
    /// so the image is in the store); nothing to do without overrides.
    pub(super) fn apply_workload(&self, d: &Deploy, dir: &Path) -> Result<()> {
        let o = &d.workload;
        if o.is_empty() {
            return Ok(());
        }
        let meta = self
            .images
            .as_ref()
            .and_then(|b| b.lookup(&d.image))
            .and_then(|i| i.oci)
            .ok_or_else(|| o.refused(&d.image, "boots its own init system"))?;
        let w = o.apply(&d.image, &meta.config)?;
        sistemo_vmm::image::oci::write_workload(dir, &w)?;
        Ok(())
    }

    /// The code of the workload that ended machine `id`'s guest, when its console says so
    /// and that the guest then powered off.
    pub(super) fn workload_exit_of(&self, id: uuid::Uuid) -> Option<i32> {
        let tail = self.console_tail(id);
        exit_from_console(&tail).filter(|_| tail.contains(super::lifecycle::POWER_DOWN))
    }

    /// `m`'s workload ended with `code` and its guest powered off (the VMM is down): the
    /// machine is stopped with the code as its reason, and its restart policy applies
    /// (`on-failure`: a non-zero code).
    pub(super) fn stopped_by_workload(&self, m: &Machine, code: i32, progress: Progress<'_>) -> Result<()> {
        tracing::info!(machine = %m.name, code, "the workload exited");
        progress(&format!(
            "{}: the workload exited with code {code}; stopped",
            m.name
        ));
        self.store
            .lock()
            .set_state(m.id, MachineState::Stopped, Some(&format!("{EXIT_REASON}{code}")))?;
        if m.restart == RestartPolicy::Always || (m.restart == RestartPolicy::OnFailure && code != 0) {
            self.schedule_restart(m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/bin/busybox".into()],
            cmd: vec!["httpd".into(), "-f".into()],
            env: vec!["PATH=/bin".into(), "MODE=prod".into()],
            working_dir: "/www".into(),
            user: "".into(),
            exposed_ports: vec![],
        }
    }

    fn o(
        env: &[&str],
        ep: Option<&str>,
        wd: Option<&str>,
        user: Option<&str>,
        cmd: &[&str],
    ) -> Result<Overrides> {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        Overrides::parse(
            v(env),
            ep.map(Into::into),
            wd.map(Into::into),
            user.map(Into::into),
            v(cmd),
        )
    }

    #[test]
    fn overrides_follow_docker() {
        let w = o(&["MODE=dev", "NEW=1"], None, Some("/tmp"), Some("1000:1000"), &[])
            .unwrap()
            .apply("web", &cfg())
            .unwrap();
        assert_eq!(w.argv, ["/bin/busybox", "httpd", "-f"]);
        assert_eq!(w.env, ["PATH=/bin", "MODE=dev", "NEW=1"]);
        assert_eq!(w.cwd.as_deref(), Some("/tmp"));
        assert_eq!(w.user.as_deref(), Some("1000:1000"));
        // A command replaces Cmd, keeps the entrypoint.
        let w = o(&[], None, None, None, &["sh", "-c", "exit 3"])
            .unwrap()
            .apply("web", &cfg())
            .unwrap();
        assert_eq!(w.argv, ["/bin/busybox", "sh", "-c", "exit 3"]);
        assert_eq!(w.cwd.as_deref(), Some("/www"));
        // An entrypoint drops the image's Cmd; an empty one clears it.
        let w = o(&[], Some("/bin/sh"), None, None, &[])
            .unwrap()
            .apply("web", &cfg())
            .unwrap();
        assert_eq!(w.argv, ["/bin/sh"]);
        let w = o(&[], Some(""), None, None, &["/bin/true"])
            .unwrap()
            .apply("web", &cfg())
            .unwrap();
        assert_eq!(w.argv, ["/bin/true"]);
        let e = o(&[], Some(""), None, None, &[])
            .unwrap()
            .apply("web", &cfg())
            .unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
    }

    #[test]
    fn bad_values_and_init_images_are_refused_by_name() {
        for (r, bad) in [
            (o(&["NOEQUALS"], None, None, None, &[]), "NOEQUALS"),
            (o(&["=v"], None, None, None, &[]), "=v"),
            (o(&[], None, Some("rel/dir"), None, &[]), "rel/dir"),
            (o(&[], None, None, Some("a b"), &[]), "a b"),
            (o(&[], None, None, Some("www:"), &[]), "www:"),
        ] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("allowed"), "{e}");
            assert!(!e.contains('\n'));
        }
        let mut init = cfg();
        init.entrypoint.clear();
        init.cmd = vec!["/sbin/init".into()];
        let e = o(&["A=1"], None, None, None, &[])
            .unwrap()
            .apply("deb", &init)
            .unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("deb") && e.contains("/sbin/init") && e.contains("--env"),
            "{e}"
        );
    }

    #[test]
    fn the_exit_code_comes_from_the_console() {
        let tail = "httpd: started\nsistemo-init: the workload exited with code 3; powering off\n\
                    reboot: Power down\n";
        assert_eq!(exit_from_console(tail), Some(3));
        assert_eq!(exit_from_console("reboot: Power down\n"), None);
        let r = format!("{EXIT_REASON}3");
        assert_eq!(exit_code(MachineState::Stopped, Some(&r)), Some(3));
        assert_eq!(exit_code(MachineState::Error, Some(&r)), None);
        assert_eq!(exit_code(MachineState::Stopped, Some("other")), None);
    }
}
