//! The `mltap` command: `serve`, `demo` and `send` (README.md; parsing and dispatch in `cli`).

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = mltap::cli::Cli::parse();
    mltap::cli::run(cli)
}

/// Opts this process out of transparent huge pages. With huge pages, every thread
/// that touches its own part of a mimalloc arena holds a whole 2 MiB page: 20 MiB of
/// an idle mltap's 35 MiB RSS. mimalloc's own `madvise` for them is compiled out (its
/// `no_thp` feature); this covers kernels set to use huge pages everywhere. Faults
/// after this call use normal pages.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag on this
    // process; failure (an old kernel) leaves the default, which is only memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
