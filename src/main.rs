//! The `sistemo` binary: parses the command line, runs it, and prints a failure as one line
//! with the exit code of its kind.

use clap::Parser;

fn main() {
    clap_complete::CompleteEnv::with_factory(<sistemo::cli::Cli as clap::CommandFactory>::command).complete();
    let cli = sistemo::cli::Cli::parse();
    let daemon = matches!(cli.cmd, sistemo::cli::Cmd::Up(_));
    if daemon {
        // Before any thread exists: as PID 1 (a container) a minimal init stays behind to reap
        // orphans and forward signals; the daemon goes on in its child.
        sistemo::sys::init_if_pid1();
        // Before any thread exists: the allocator's arenas are made as threads first allocate.
        sistemo::sys::lean_allocator();
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = if daemon {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
    .expect("tokio runtime");
    let code = match rt.block_on(sistemo::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // A boot error quotes the guest's console: its escapes must not drive the terminal
            // (`machine logs --raw` shows them as written).
            let msg = sistemo_vmm::qemu::printable(&sistemo::error::chain(e.as_ref()));
            if std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr())
            {
                eprintln!("\x1b[31merror:\x1b[0m {msg}");
            } else {
                eprintln!("error: {msg}");
            }
            sistemo::cli::exit_code(&e)
        }
    };
    std::process::exit(code);
}
