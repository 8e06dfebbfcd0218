//! `sistemo machine exec|shell|cp|ssh|logs`: the commands that reach into a running guest,
//! through its agent (a session on the daemon's API), or its sshd for `ssh`.

use super::output::print_json;
use super::{Usage, urlencode};
use crate::api::*;
use crate::client::Client;
use anyhow::{Result, bail};
use clap::Subcommand;
use std::path::PathBuf;

use super::machine::MachineArg;

/// The guest commands of `sistemo machine`.
#[derive(Debug, Subcommand)]
pub enum GuestCmd {
    /// Run a command in a machine (through its guest agent); exits with its exit code.
    #[command(
        after_help = "Examples:\n  sistemo machine exec web uname -a\n  sistemo machine exec web \"apt-get update && apt-get install -y nginx\"\n  sistemo machine exec api \"node server.js &\"\n  tar c src | sistemo machine exec -i web tar x -C /srv\n  sistemo machine exec -it -u www-data -w /var/www web bash"
    )]
    Exec {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// Stream this command's stdin to it.
        #[arg(short, long)]
        interactive: bool,
        /// Run it on a terminal (needs one here).
        #[arg(short, long)]
        tty: bool,
        /// Set an environment variable, NAME=value (repeatable).
        #[arg(short, long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest.
        #[arg(short, long)]
        workdir: Option<String>,
        /// Guest user name or uid (default root).
        #[arg(short, long)]
        user: Option<String>,
        /// Kill the command after this many seconds (default 600 without -i/-t, else none).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Command; a single quoted string runs through the guest's shell.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Interactive shell in a machine through its guest agent (no sshd needed).
    Shell {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
        /// Guest user name or uid (default root).
        #[arg(short, long)]
        user: Option<String>,
    },
    /// Copy files or directories between a machine and this host (modes kept).
    #[command(
        after_help = "Examples:\n  sistemo machine cp ./site web:/var/www/html\n  sistemo machine cp web:/etc/nginx/nginx.conf ."
    )]
    Cp {
        /// Source: a local path, or NAME:/guest/path.
        src: String,
        /// Destination: a local path, or NAME:/guest/path (into it when it is a directory).
        dst: String,
    },
    /// Interactive shell in a machine over SSH (images that run sshd).
    Ssh {
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
    /// The machine's console output.
    Logs {
        /// Keep printing new output as it arrives.
        #[arg(short, long)]
        follow: bool,
        /// Pass the guest's terminal control sequences through (by default they are removed:
        /// a guest must not drive your terminal).
        #[arg(long)]
        raw: bool,
        /// The machine it acts on.
        #[command(flatten)]
        m: MachineArg,
    },
}

/// The machine and guest path of a `machine cp` operand `NAME:/path`; `None` for a local path
/// (one with a `/` before any `:`, or no `:` at all).
fn guest_path(arg: &str) -> Result<Option<(String, String)>> {
    match arg.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            if !path.starts_with('/') {
                bail!(Usage::new(std::io::Error::other(format!(
                    "{arg:?}: the guest path must be absolute, as in {name}:/{path}"
                ))));
            }
            Ok(Some((name.to_string(), path.to_string())))
        }
        _ => Ok(None),
    }
}

/// Run one guest command; its exit code.
pub async fn run(c: &Client, cmd: GuestCmd, json: bool) -> Result<i32> {
    let path = |n: &str| format!("/v1/machines/{}", urlencode(n));
    match cmd {
        GuestCmd::Exec {
            m: MachineArg { name },
            interactive,
            tty,
            env,
            workdir,
            user,
            timeout,
            cmd,
        } if !json || interactive || tty || !env.is_empty() || workdir.is_some() || user.is_some() => {
            use std::io::IsTerminal;
            if tty && !std::io::stdin().is_terminal() {
                bail!("-t needs a terminal on stdin (drop -t to pipe data with -i)");
            }
            let job = if cmd.len() == 1 {
                SessionJob::Shell { cmd: cmd[0].clone() }
            } else {
                SessionJob::Exec { argv: cmd }
            };
            let req = SessionRequest {
                job,
                env,
                workdir,
                user,
                tty: if tty {
                    super::session::term_size().or(Some(TermSize { rows: 24, cols: 80 }))
                } else {
                    None
                },
                stdin: interactive || tty,
                timeout_s: timeout,
            };
            // Output goes out byte-exact as it comes; `-o json` (below) collects it instead.
            let local = match (tty, interactive) {
                (true, _) => super::session::Local::Terminal,
                (false, true) => super::session::Local::Stdin,
                (false, false) => super::session::Local::Nothing,
            };
            return super::session::run(c, &name, &req, local).await;
        }
        GuestCmd::Shell {
            m: MachineArg { name },
            user,
        } => {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                bail!(
                    "machine shell needs a terminal; run a command with `sistemo machine exec -i {name} CMD`"
                );
            }
            let req = SessionRequest {
                job: SessionJob::Login,
                env: Vec::new(),
                workdir: None,
                user,
                tty: super::session::term_size().or(Some(TermSize { rows: 24, cols: 80 })),
                stdin: true,
                timeout_s: None,
            };
            return super::session::run(c, &name, &req, super::session::Local::Terminal).await;
        }
        GuestCmd::Cp { src, dst } => {
            let (name, job, local) = match (guest_path(&src)?, guest_path(&dst)?) {
                (Some((n, p)), None) => (
                    n,
                    SessionJob::CopyFrom { path: p },
                    super::session::Local::Download(PathBuf::from(&dst)),
                ),
                (None, Some((n, p))) => {
                    if !std::path::Path::new(&src).exists() {
                        bail!("{src}: no such file or directory");
                    }
                    (
                        n,
                        SessionJob::CopyTo { path: p },
                        super::session::Local::Upload(PathBuf::from(&src)),
                    )
                }
                _ => bail!(Usage::new(std::io::Error::other(format!(
                    "copy between a machine and this host: exactly one of {src:?} and {dst:?} must be NAME:/path"
                )))),
            };
            let req = SessionRequest {
                job,
                env: Vec::new(),
                workdir: None,
                user: None,
                tty: None,
                stdin: matches!(local, super::session::Local::Upload(_)),
                timeout_s: None,
            };
            let code = super::session::run(c, &name, &req, local).await?;
            return Ok(code);
        }
        GuestCmd::Exec {
            m: MachineArg { name },
            timeout,
            cmd,
            ..
        } => {
            let line = if cmd.len() == 1 {
                cmd[0].clone()
            } else {
                cmd.iter()
                    .map(|w| sistemo_vmm::shell_quote(w))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            use std::io::Write;
            let (mut code, mut error) = (None, None);
            // -o json collects the output (lossy where it is not UTF-8); otherwise it is written
            // byte-exact as it comes.
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let mut broken = false;
            c.exec(
                &format!("{}/exec", path(&name)),
                &ExecRequest {
                    cmd: line,
                    timeout_s: timeout,
                },
                |ev| match ev {
                    ExecEvent::Exit(c) => {
                        code = Some(c);
                        true
                    }
                    ExecEvent::Error(e) => {
                        error = Some(e);
                        true
                    }
                    // A reader of ours that went away (`| head`) ends the command too.
                    ev => match (ev.bytes(), json) {
                        (Some((b, false)), true) => {
                            out.extend_from_slice(&b);
                            true
                        }
                        (Some((b, true)), true) => {
                            err.extend_from_slice(&b);
                            true
                        }
                        (Some((b, false)), false) => {
                            let mut o = std::io::stdout();
                            broken = o.write_all(&b).and_then(|_| o.flush()).is_err();
                            !broken
                        }
                        (Some((b, true)), false) => {
                            broken = std::io::stderr().write_all(&b).is_err();
                            !broken
                        }
                        (None, _) => true,
                    },
                },
            )?;
            if broken {
                // Our output closed under us: end quietly, as a shell pipeline's writer does.
                return Ok(141);
            }
            let mut collected = ExecResponse {
                code: 0,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr: String::from_utf8_lossy(&err).into_owned(),
            };
            if let Some(e) = error {
                return Err(crate::client::ClientError::Api(e).into());
            }
            let Some(code) = code else {
                bail!("the daemon closed the exec stream without an exit code");
            };
            collected.code = code;
            if json {
                print_json(&collected)?;
            }
            return Ok(code);
        }
        GuestCmd::Ssh {
            m: MachineArg { name },
        } => {
            if c.is_remote() {
                bail!(Usage::new(std::io::Error::other(
                    "machine ssh runs ssh on the daemon's host, with its key: from another host use `sistemo machine shell NAME` (through the guest agent)"
                )));
            }
            let s: ShellResponse = c.get(&format!("{}/shell", path(&name)))?;
            let st = std::process::Command::new(&s.argv[0])
                .args(&s.argv[1..])
                .status()?;
            return Ok(st.code().unwrap_or(1));
        }
        GuestCmd::Logs {
            m: MachineArg { name },
            follow,
            raw,
        } => {
            use std::io::Write;
            // The first read is the tail; then each continues where the last ended (stream
            // offsets, valid across the daemon's cap on the log).
            let mut offset: Option<u64> = None;
            loop {
                let q = offset.map_or(String::new(), |o| format!("?offset={o}"));
                let (at, chunk) = c.log_bytes(&format!("{}/logs{q}", path(&name)), offset)?;
                offset = Some(at + chunk.len() as u64);
                let shown = if raw {
                    chunk
                } else {
                    super::output::without_escapes(&chunk)
                };
                std::io::stdout().write_all(&shown)?;
                std::io::stdout().flush()?;
                if !follow {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
    }
    Ok(0)
}
