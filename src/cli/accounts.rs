//! `sistemo user …`, `sistemo token …` (accounts of the web API, managed on the host) and
//! `sistemo events` (the daemon's event stream).

use super::Usage;
use super::output::{confirm, print_json, table};
use crate::api::*;
use crate::client::Client;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::io::BufRead;

/// `user` subcommands.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a user who logs in to the dashboard and the API.
    Add {
        /// Name (a-z, 0-9, '.', '_', '-').
        name: String,
        /// `admin` changes anything, `viewer` only reads.
        #[arg(long, default_value = "admin", value_parser = ["admin", "viewer"])]
        role: String,
        /// Read the password from standard input (one line) instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's password (their sessions end).
    Passwd {
        /// The user.
        name: String,
        /// Read the password from standard input (one line) instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a user (their sessions end).
    #[command(visible_alias = "remove")]
    Rm {
        /// The user.
        name: String,
    },
    /// List users.
    #[command(visible_alias = "ls")]
    List,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create an API token (shown once; only its hash is kept).
    Create {
        /// The token's name (unique; `token revoke NAME` uses it).
        name: String,
        /// `admin` changes anything, `viewer` only reads.
        #[arg(long, default_value = "admin", value_parser = ["admin", "viewer"])]
        role: String,
        /// Lifetime, e.g. 30d, 12h, 2w (default: none).
        #[arg(long)]
        expires: Option<String>,
    },
    /// List tokens (never their secrets).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a token: its use is refused from now on.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// Read a password: one line from stdin, or twice from the terminal without echo.
fn password(stdin: bool) -> Result<String> {
    let pw = if stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        let a = prompt_hidden("Password: ")?;
        let b = prompt_hidden("Password again: ")?;
        if a != b {
            bail!("the two passwords differ; nothing changed");
        }
        a
    };
    Ok(pw)
}

/// One line from the terminal with echo off.
fn prompt_hidden(prompt: &str) -> Result<String> {
    use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
    use std::io::Write;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| {
            Usage::new(std::io::Error::other(format!(
                "no terminal to read the password from ({e}); pass --password-stdin"
            )))
        })?;
    let old = tcgetattr(&tty).context("reading the terminal's settings")?;
    let mut quiet = old.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&tty, SetArg::TCSANOW, &quiet).context("turning the terminal's echo off")?;
    let mut w = &tty;
    let _ = w.write_all(prompt.as_bytes());
    let mut line = String::new();
    let r = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = tcsetattr(&tty, SetArg::TCSANOW, &old);
    r?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Run a `user` subcommand.
pub fn run_user(c: &Client, cmd: UserCmd, json: bool, yes: bool) -> Result<()> {
    match cmd {
        UserCmd::Add {
            name,
            role,
            password_stdin,
        } => {
            let password = password(password_stdin)?;
            let u: UserInfo = c.call(
                "POST",
                "/v1/users",
                Some(&UserAddRequest {
                    name,
                    role: Some(role),
                    password,
                }),
            )?;
            if json {
                print_json(&u)?;
            } else {
                println!("user {} added ({})", u.name, u.role);
            }
        }
        UserCmd::Passwd { name, password_stdin } => {
            let password = password(password_stdin)?;
            let _: serde_json::Value = c.call(
                "POST",
                &format!("/v1/users/{name}/password"),
                Some(&PasswordRequest { password }),
            )?;
            println!("password of {name} changed; their sessions ended");
        }
        UserCmd::Rm { name } => {
            confirm(yes, &format!("remove user {name}"))?;
            let _: serde_json::Value = c.call("DELETE", &format!("/v1/users/{name}"), None::<&()>)?;
            println!("user {name} removed");
        }
        UserCmd::List => {
            let us: Vec<UserInfo> = c.get("/v1/users")?;
            if json {
                print_json(&us)?;
            } else {
                table(
                    &["NAME", "ROLE", "CREATED"],
                    us.into_iter()
                        .map(|u| vec![u.name, u.role, u.created_at])
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

fn when(t: Option<i64>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| {
            let left = t - crate::auth::now();
            if left > 0 {
                format!("in {}", human(left))
            } else {
                format!("{} ago", human(-left))
            }
        },
    )
}

fn human(s: i64) -> String {
    match s {
        s if s >= 86400 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Run a `token` subcommand.
pub fn run_token(c: &Client, cmd: TokenCmd, json: bool) -> Result<()> {
    match cmd {
        TokenCmd::Create { name, role, expires } => {
            let t: TokenCreated = c.call(
                "POST",
                "/v1/tokens",
                Some(&TokenCreateRequest {
                    name,
                    role: Some(role),
                    expires,
                }),
            )?;
            if json {
                print_json(&t)?;
            } else {
                println!("{}", t.token);
                eprintln!(
                    "token {} ({}) created, expires {}; it is shown only now",
                    t.info.name,
                    t.info.role,
                    t.info
                        .expires_at
                        .map_or_else(|| "never".into(), |e| when(Some(e)))
                );
            }
        }
        TokenCmd::List => {
            let ts: Vec<TokenInfo> = c.get("/v1/tokens")?;
            if json {
                print_json(&ts)?;
            } else {
                table(
                    &["NAME", "ROLE", "STATE", "EXPIRES", "LAST USED", "CREATED"],
                    ts.into_iter()
                        .map(|t| {
                            vec![
                                t.name,
                                t.role,
                                t.state,
                                t.expires_at.map_or_else(|| "never".into(), |e| when(Some(e))),
                                when(t.last_used_at),
                                t.created_at,
                            ]
                        })
                        .collect(),
                );
            }
        }
        TokenCmd::Revoke { name } => {
            let _: serde_json::Value = c.call("DELETE", &format!("/v1/tokens/{name}"), None::<&()>)?;
            println!("token {name} revoked");
        }
    }
    Ok(())
}

/// `sistemo events`: print the daemon's events as they happen (JSON lines with `-o json`).
pub fn run_events(c: &Client, json: bool) -> Result<()> {
    use std::io::Write;
    c.lines("/v1/events", |line| {
        let Some(data) = line.strip_prefix("data:") else {
            return true;
        };
        let mut out = std::io::stdout().lock();
        let ok = if json {
            writeln!(out, "{}", data.trim())
        } else {
            match serde_json::from_str::<DaemonEvent>(data.trim()) {
                Ok(ev) => writeln!(out, "{}", describe(&ev)),
                Err(_) => writeln!(out, "{}", data.trim()),
            }
        };
        // A closed stdout (a pipe into `head`) ends the stream.
        ok.and_then(|()| out.flush()).is_ok()
    })?;
    Ok(())
}

fn describe(ev: &DaemonEvent) -> String {
    match ev {
        DaemonEvent::Machine { machine } => {
            let ports: Vec<&str> = machine.ports.iter().map(|p| p.spec.as_str()).collect();
            format!(
                "machine   {} {} {}",
                machine.name,
                machine.status,
                if ports.is_empty() {
                    String::new()
                } else {
                    format!("ports {}", ports.join(","))
                }
            )
        }
        DaemonEvent::MachineRemoved { name } => format!("machine   {name} removed"),
        DaemonEvent::Progress {
            action,
            target,
            message,
        } => format!("progress  {action} {target}: {message}"),
        DaemonEvent::Change { entry } => format!(
            "change    {} {} by {}: {}",
            entry.action,
            entry.target,
            entry.actor.as_deref().or(entry.remote.as_deref()).unwrap_or("-"),
            entry.result
        ),
        DaemonEvent::Firewall { detail } => format!("firewall  {detail}"),
        DaemonEvent::Resync => "resync    (events were missed)".into(),
    }
}
