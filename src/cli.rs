//! Runs a parsed command line: sets up logging, loads the configuration and maps
//! failures to exit codes (2 for a bad configuration, 1 for a runtime failure).

use crate::config::{Cli, Command, Config};
use std::process::ExitCode;

/// Exit code of a configuration error (unknown key, bad value, port in use).
pub const EXIT_CONFIG: u8 = 2;

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => {
            let config = match Config::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("mltap: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&config.log);
            eprintln!("mltap serve: not wired yet ({config:?})");
            ExitCode::from(1)
        }
        Command::Send(args) => crate::send::run(&args),
        Command::Demo(_) => {
            eprintln!("mltap: not wired yet");
            ExitCode::from(1)
        }
    }
}

/// Structured logs on stderr, filtered by `log` (e.g. `info`, `mltap=debug`).
pub fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
