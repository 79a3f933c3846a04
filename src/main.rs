//! The `mltap` command: `serve`, `demo` and `send` (DESIGN.md, "Command line").

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    return_freed_memory_at_once();
    let cli = mltap::config::Cli::parse();
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

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, the same index in v2 and v3).
const MI_OPTION_PURGE_DELAY: libc::c_int = 15;

/// Makes the allocator give freed pages back to the OS at once instead of 10 ms (100 ms
/// for arenas) later. Under saturating load mltap frees whole batches every
/// millisecond, and the delay kept about 15 MiB of freed memory resident; the extra
/// `madvise` calls did not measurably cost throughput. `MIMALLOC_PURGE_DELAY` in the
/// environment still wins.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; options may be set at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}
