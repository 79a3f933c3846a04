//! Runs a parsed command line: sets up logging, loads the configuration and maps
//! failures to exit codes (2 for a bad configuration, 1 for a runtime failure).

use crate::app::ServeError;
use crate::config::{Cli, Command, Config};
use std::process::ExitCode;

/// Exit code of a configuration error (unknown key, bad value, port in use).
pub const EXIT_CONFIG: u8 = 2;
/// Exit code of a failure at run time.
pub const EXIT_RUNTIME: u8 = 1;

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
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("mltap: cannot start the async runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            match runtime.block_on(crate::app::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ServeError::Config(e)) => {
                    eprintln!("mltap: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    eprintln!("mltap: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Send(args) => crate::send::run(&args),
        Command::Demo(_) => {
            eprintln!("mltap: not wired yet");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Structured logs on stderr, filtered by `log` (e.g. `info`, `mltap=debug`).
pub fn init_logging(filter: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
