//! The `mltap` command: `serve`, `demo` and `send` (DESIGN.md, "Command line").

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = mltap::config::Cli::parse();
    mltap::cli::run(cli)
}
