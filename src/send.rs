//! `mltap send DIR --anodot-url URL`: uploads stored Anodot files, from this machine or
//! another, with the same batching, rate limit, retries and cursor as `serve`'s
//! delivery, a progress bar on stderr and a summary on stdout.
//!
//! DIR is an output dir (its `anodot/` folder is sent and the cursor is the one
//! `serve` keeps in `DIR/delivery/`), or an `anodot/` folder itself (cursor in
//! `../delivery/`), or any folder of `MODEL/YYYYMMDDTHHMMSSZ.json` files (cursor in
//! `DIR/.mltap-send/`). A second run sends only what the first did not get answered.
//! A folder that a running `serve` delivers from is refused (the cursor's lock).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::sinks::anodot::api::redacted;
use crate::sinks::anodot::spool;
use crate::sinks::anodot::{
    AnodotConfig, AnodotProtocol, DeliveryMetrics, DeliverySettings, Engine, Persistence, Progress,
};
use crate::units::parse_duration;

/// Exit code when the arguments or the environment are wrong.
const EXIT_USAGE: u8 = 2;
/// Bucket width assumed for 3.0 watermarks when the files do not show it.
const DEFAULT_BUCKET: Duration = Duration::from_secs(60);
/// Label horizon assumed for the 3.0 labels stream (the `serve` default).
const DEFAULT_LABEL_HORIZON: Duration = Duration::from_secs(3600);

/// `send` arguments (`mltap send --help`).
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Directory of stored Anodot files (an output dir or its `anodot/` folder).
    pub dir: PathBuf,
    /// Anodot metrics endpoint.
    #[arg(long, env = "MLTAP_ANODOT_URL", value_name = "URL")]
    pub anodot_url: String,
    /// Metric protocol: 2.0, or 3.0 (stream schemas and watermarks; access key from ANODOT_ACCESS_KEY).
    #[arg(long, value_name = "VERSION", default_value = "2.0")]
    pub protocol: String,
    /// Points per second sent at most.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub points_per_second: u32,
    /// Stop when Anodot keeps failing this long; a later run resumes where this one stopped.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub give_up_after: String,
}

/// Where the spool and the cursor are for a DIR argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendDirs {
    /// Folder of `MODEL/*.json` files.
    pub spool: PathBuf,
    /// Folder of the cursor.
    pub state: PathBuf,
}

impl SendDirs {
    pub fn for_dir(dir: &Path) -> SendDirs {
        if dir.join("anodot").is_dir() {
            return SendDirs { spool: dir.join("anodot"), state: dir.join("delivery") };
        }
        let is_anodot_folder = dir.file_name().is_some_and(|n| n == "anodot");
        match dir.parent() {
            Some(parent) if is_anodot_folder => SendDirs { spool: dir.to_path_buf(), state: parent.join("delivery") },
            _ => SendDirs { spool: dir.to_path_buf(), state: dir.join(".mltap-send") },
        }
    }
}

/// Runs `mltap send`; exit 0 when every point is delivered, 1 when some were refused
/// or could not be sent, 2 for bad arguments.
pub fn run(args: &SendArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mltap send: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(send(args))
}

async fn send(args: &SendArgs) -> ExitCode {
    let usage = |message: String| {
        eprintln!("mltap send: {message}");
        ExitCode::from(EXIT_USAGE)
    };
    if !args.dir.is_dir() {
        return usage(format!("{} is not a directory", args.dir.display()));
    }
    let protocol = match AnodotProtocol::parse(&args.protocol) {
        Ok(p) => p,
        Err(e) => return usage(format!("--protocol: {e}")),
    };
    let give_up_after = match parse_duration(&args.give_up_after) {
        Ok(d) => d,
        Err(e) => return usage(format!("--give-up-after: {e}")),
    };
    let dirs = SendDirs::for_dir(&args.dir);
    let files = match spool::list(&dirs.spool) {
        Ok(f) => f,
        Err(e) => return usage(format!("cannot list {}: {e}", dirs.spool.display())),
    };
    if files.is_empty() {
        eprintln!(
            "mltap send: no Anodot files (MODEL/YYYYMMDDTHHMMSSZ.json) under {}; nothing sent",
            dirs.spool.display()
        );
        return ExitCode::from(1);
    }
    let anodot = AnodotConfig { protocol, points_per_second: args.points_per_second, ..AnodotConfig::default() };
    let settings =
        match DeliverySettings::resolve(&args.anodot_url, anodot, infer_bucket(&files), DEFAULT_LABEL_HORIZON, |name| {
            std::env::var(name).ok()
        }) {
            Ok(s) => s,
            Err(e) => return usage(e.to_string()),
        };
    let endpoint = redacted(&settings.endpoints.metrics);
    let mut engine = match Engine::open(
        settings,
        &dirs.spool,
        &dirs.state,
        DeliveryMetrics::default(),
        Persistence::GiveUpAfter(give_up_after),
    ) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mltap send: cannot open the cursor in {}: {e}", dirs.state.display());
            return ExitCode::from(1);
        }
    };
    let mut bar = ProgressBar::new(std::io::stderr().is_terminal());
    engine.on_progress(move |p| bar.show(p));

    let stop = CancellationToken::new();
    let outcome = engine.pass(&stop).await;
    let totals = engine.totals();
    let left = engine.backlog().unwrap_or(0);
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            println!(
                "mltap send: {} points accepted, {} rejected, {} retried requests; {left} points not sent",
                totals.accepted, totals.rejected, totals.retries
            );
            eprintln!("mltap send: stopped: {e}. Run the same command again to send the rest.");
            return ExitCode::from(1);
        }
    };
    println!(
        "mltap send: {} points accepted, {} rejected by Anodot, {} retried requests, {} watermarks, to {endpoint}{}",
        totals.accepted,
        totals.rejected,
        totals.retries,
        totals.watermarks,
        if report.already_done > 0 {
            format!(" ({} points were delivered by an earlier run)", report.already_done)
        } else {
            String::new()
        }
    );
    let mut problems = Vec::new();
    if totals.rejected > 0 {
        problems.push(format!("{} points were rejected by Anodot (logged with Anodot's error codes)", totals.rejected));
    }
    if !report.unreadable.is_empty() {
        problems.push(format!(
            "{} files are not JSON arrays of Anodot points and were skipped: {}",
            report.unreadable.len(),
            report.unreadable.join(", ")
        ));
    }
    if left > 0 && report.unreadable.is_empty() {
        problems.push(format!("{left} points are still waiting (files grew while sending); run again"));
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        for p in problems {
            eprintln!("mltap send: {p}");
        }
        ExitCode::from(1)
    }
}

/// The smallest gap between two bucket starts of one model, or one minute.
fn infer_bucket(files: &[spool::SpoolFile]) -> Duration {
    let mut best: Option<i64> = None;
    let mut last: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for f in files {
        if let Some(prev) = last.insert(&f.model, f.bucket_start) {
            let gap = f.bucket_start - prev;
            if gap > 0 && best.is_none_or(|b| gap < b) {
                best = Some(gap);
            }
        }
    }
    best.map(|s| Duration::from_secs(s as u64)).unwrap_or(DEFAULT_BUCKET)
}

/// Progress on stderr: a bar redrawn in place on a terminal, a line per tenth otherwise.
struct ProgressBar {
    /// Redraw in place (a terminal) or print lines (a log).
    terminal: bool,
    /// Last tenth printed (not a terminal).
    last_tenth: u64,
}

impl ProgressBar {
    fn new(terminal: bool) -> Self {
        ProgressBar { terminal, last_tenth: 0 }
    }

    fn show(&mut self, p: Progress) {
        let pending = p.pending.max(1);
        let done = p.done.min(pending);
        let line = format!(
            "{done}/{} points ({} accepted, {} rejected, {} retries)",
            p.pending, p.totals.accepted, p.totals.rejected, p.totals.retries
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let width = 30u64;
            let filled = (done * width / pending) as usize;
            let _ = write!(err, "\r[{}{}] {line}", "#".repeat(filled), " ".repeat(width as usize - filled));
            let _ = err.flush();
        } else {
            let tenth = done * 10 / pending;
            if tenth > self.last_tenth || done == p.pending {
                self.last_tenth = tenth;
                let _ = writeln!(err, "mltap send: {}% {line}", done * 100 / pending);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_sits_beside_the_spool_it_belongs_to() {
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(out.path().join("anodot/iris")).unwrap();
        let d = SendDirs::for_dir(out.path());
        assert_eq!(d, SendDirs { spool: out.path().join("anodot"), state: out.path().join("delivery") });
        let d = SendDirs::for_dir(&out.path().join("anodot"));
        assert_eq!(d, SendDirs { spool: out.path().join("anodot"), state: out.path().join("delivery") });
        let other = tempfile::tempdir().unwrap();
        let d = SendDirs::for_dir(other.path());
        assert_eq!(d.state, other.path().join(".mltap-send"));
    }
}
