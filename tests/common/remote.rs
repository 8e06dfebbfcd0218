//! The CLI helpers over TLS and an API token instead of the Unix socket: an [`Env`] with a
//! [`RemoteCli`] runs the chosen commands (by their leading words) as `sistemo --host
//! https://127.0.0.1:7443` inside its namespace, so a test written for the socket also proves
//! the remote path. `SISTEMO_TEST_REMOTE=1` turns it on, for every command but [`HOST_ONLY`],
//! in every `Env` whose config sets no listener itself (`scripts/test` runs the CLI suites again
//! that way).

use super::Env;
use std::process::{Command, Stdio};

/// The address of the TLS listener a remote env adds.
pub const URL: &str = "https://127.0.0.1:7443";
/// The config line that adds it.
pub const LISTEN: &str = "listen: [\"127.0.0.1:7777\", \"https://127.0.0.1:7443\"]\n";

/// The commands the remote helpers cover by default: the brief's set (list, deploy on the
/// netns backend, expose, exec, logs, history, volumes) and their neighbours.
pub const DEFAULT_COMMANDS: &[&str] = &[
    "machine list",
    "machine ls",
    "machine status",
    "machine deploy",
    "machine expose",
    "machine unexpose",
    "machine exec",
    "machine logs",
    "machine volume",
    "history",
    "volume",
];

/// With `SISTEMO_TEST_REMOTE=1`: every command goes over TLS except these, which work on the
/// daemon's host only by design (they start or install the daemon, read its files, or manage
/// the accounts that guard the remote API).
pub const HOST_ONLY: &[&str] = &[
    "up",
    "service",
    "install",
    "config",
    "doctor",
    "completion",
    "user",
    "token",
    "machine ssh",
];

/// How an env's CLI reaches its daemon over TLS.
#[derive(Clone, Debug)]
pub struct RemoteCli {
    /// The admin API token.
    pub token: String,
    /// The daemon's certificate fingerprint (given, so nothing is pinned in a home).
    pub fingerprint: String,
    /// Leading words of the commands that go over TLS (`machine list`, `volume`).
    pub commands: Vec<String>,
}

/// Whether `SISTEMO_TEST_REMOTE` asks every env to run its CLI remotely.
pub fn wanted() -> bool {
    std::env::var("SISTEMO_TEST_REMOTE").is_ok_and(|v| !v.is_empty() && v != "0")
}

impl RemoteCli {
    /// Set up `env` (whose config has [`LISTEN`]): an admin token made over the socket, the
    /// certificate's fingerprint; `commands` go over TLS.
    pub fn new(env: &Env, commands: &[&str]) -> RemoteCli {
        let token = super::web::token(env, "remote-cli", &[]);
        let c: serde_json::Value =
            serde_json::from_str(&env.cli_socket_ok(&["config", "-o", "json"])).unwrap();
        RemoteCli {
            token,
            fingerprint: c["tls_fingerprint"]
                .as_str()
                .expect("a TLS listener: the env's config needs LISTEN")
                .to_string(),
            commands: commands.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Whether `args` is one of the chosen commands (global flags before it are skipped); the
    /// command `*` stands for every command but [`HOST_ONLY`].
    pub fn covers(&self, args: &[&str]) -> bool {
        let words: Vec<&str> = args
            .iter()
            .copied()
            .skip_while(|a| a.starts_with('-'))
            .take(2)
            .collect();
        let named = |c: &str| {
            let want: Vec<&str> = c.split_whitespace().collect();
            want.len() <= words.len() && want.iter().zip(&words).all(|(a, b)| a == b)
        };
        if self.commands.iter().any(|c| c == "*") {
            return !words.is_empty() && !HOST_ONLY.iter().any(|c| named(c));
        }
        self.commands.iter().any(|c| named(c))
    }

    /// The command that runs `args` against `env`'s daemon over TLS.
    pub fn command(&self, env: &Env, args: &[&str]) -> Command {
        let home = env.dir.join("remote-home");
        std::fs::create_dir_all(&home).unwrap();
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &env.ns,
            env!("CARGO_BIN_EXE_sistemo"),
            "--host",
            URL,
        ])
        .args(args)
        .env("HOME", &home)
        .env_remove("SISTEMO_SOCKET")
        .env_remove("XDG_CONFIG_HOME")
        .env("SISTEMO_FINGERPRINT", &self.fingerprint)
        .env("SISTEMO_TOKEN", &self.token)
        .stdin(Stdio::null());
        c
    }
}

impl Env {
    /// Run the chosen `commands` of this env's CLI over TLS from now on.
    pub fn go_remote(&mut self, commands: &[&str]) {
        self.remote = Some(RemoteCli::new(self, commands));
    }

    /// Run `args` both over the socket and over TLS; both must exit alike and print the same
    /// (for commands that change nothing). Returns the output.
    pub fn cli_both(&self, args: &[&str]) -> std::process::Output {
        let r = self.remote.as_ref().expect("a remote env (go_remote)");
        let local = self.cli_socket(args);
        let remote = r.command(self, args).output().unwrap();
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert_eq!(
            (local.status.code(), s(&local.stdout), s(&local.stderr)),
            (remote.status.code(), s(&remote.stdout), s(&remote.stderr)),
            "sistemo {args:?}: the socket's answer (left) and TLS's (right) differ"
        );
        remote
    }
}
