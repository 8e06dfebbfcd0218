//! `machine deploy`'s overrides of an OCI image's config in Docker's spelling (`--env`,
//! `--env-file`, `--entrypoint`, `--workdir`, `--user`, `-- CMD ARGS`) and their status lines.

use crate::api::{DeployRequest, WorkloadInfo};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;

/// Overrides of an OCI image's config for one machine (kept with it across restarts).
#[derive(Debug, Args, Default)]
pub struct WorkloadFlags {
    /// OCI images: set an environment variable, KEY=VALUE (KEY alone takes this shell's
    /// value). Repeatable.
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// OCI images: read KEY=VALUE lines from a file (# comments and blank lines skipped),
    /// before --env. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// OCI images: run this program instead of the image's entrypoint (the image's command is
    /// dropped too, as with Docker).
    #[arg(long, value_name = "PROGRAM")]
    pub entrypoint: Option<String>,
    /// OCI images: working directory of the program.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// OCI images: run as USER[:GROUP] (names or IDs).
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// OCI images: the command (arguments to the entrypoint), after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// One `--env` or env-file entry: `K=V` as is, `K` from this process's environment (`None`
/// when unset, as Docker skips it).
fn entry(kv: &str) -> Option<String> {
    if kv.contains('=') {
        return Some(kv.to_string());
    }
    std::env::var(kv).ok().map(|v| format!("{kv}={v}"))
}

/// The entries of env file `text` (named `file` in errors).
fn env_file(file: &str, text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim_start();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let key = l.split_once('=').map_or(l, |(k, _)| k);
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            bail!(
                "env file {file} line {}: {l:?} is not valid (allowed: KEY=VALUE, KEY, or a # comment)",
                n + 1
            );
        }
        out.extend(entry(l));
    }
    Ok(out)
}

impl WorkloadFlags {
    /// The request's override fields (the rest default).
    pub fn request(self) -> Result<DeployRequest> {
        let mut env = Vec::new();
        for f in &self.env_file {
            let text = std::fs::read_to_string(f).with_context(|| {
                format!(
                    "env file {} cannot be read (allowed: a readable text file)",
                    f.display()
                )
            })?;
            env.extend(env_file(&f.display().to_string(), &text)?);
        }
        env.extend(self.env.iter().filter_map(|e| entry(e)));
        Ok(DeployRequest {
            env,
            entrypoint: self.entrypoint,
            workdir: self.workdir,
            user: self.user,
            command: self.cmd,
            ..Default::default()
        })
    }
}

/// `machine status` lines of a workload.
pub fn status_lines(w: &WorkloadInfo) -> String {
    let mut s = format!(
        "Command:  {}\n",
        w.command
            .iter()
            .map(|a| sistemo_vmm::shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(d) = &w.workdir {
        s.push_str(&format!("Workdir:  {d}\n"));
    }
    if let Some(u) = &w.user {
        s.push_str(&format!("User:     {u}\n"));
    }
    if !w.env.is_empty() {
        s.push_str(&format!("Env:      {}\n", w.env.join(", ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_read_like_docker() {
        let got = env_file("f", "# c\n\nA=1\n  B=x y\nSISTEMO_SURELY_UNSET\n").unwrap();
        assert_eq!(got, ["A=1", "B=x y"]);
        let e = env_file("/tmp/app.env", "A=1\nBAD KEY=2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/tmp/app.env line 2") && e.contains("BAD KEY"), "{e}");
    }

    #[test]
    fn the_command_is_shown_quoted() {
        let w = WorkloadInfo {
            command: vec!["sh".into(), "-c".into(), "exit 3".into()],
            env: vec!["A".into()],
            workdir: Some("/app".into()),
            user: None,
        };
        let s = status_lines(&w);
        assert!(
            s.starts_with("Command:  sh -c 'exit 3'\n") && s.contains("Workdir:  /app"),
            "{s}"
        );
    }
}
