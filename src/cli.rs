//! The command line: parses `serve`, `validate`, `demo` and `send`, hands each
//! command what it takes (`serve` and `validate` a loaded `Config`, `demo` its
//! duration and the `serve` flags, `send` its own arguments), and maps failures to
//! exit codes (2 for a bad configuration, 1 for a runtime failure).

use crate::app::{self, ServeError};
use crate::config::{Config, Flags};
use crate::logging;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub use crate::send::SendArgs;
/// Exit code of a configuration error (unknown key, bad value, port in use).
pub use crate::units::EXIT_CONFIG;

/// Exit code of a failure at run time.
pub const EXIT_RUNTIME: u8 = 1;

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "mltap", version, about = "Transparent monitoring proxy for TensorFlow Serving")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and its monitoring worker.
    Serve(ServeArgs),
    /// Check the configuration (and, with --check-upstreams, that TF Serving answers) without serving.
    Validate(ValidateArgs),
    /// Run a self-contained demonstration: model server, proxy, traffic and labels.
    Demo(DemoArgs),
    /// Upload stored Anodot files to Anodot (token from ANODOT_TOKEN).
    Send(SendArgs),
}

/// `serve` flags. Every flag is optional here so that the file and the defaults can
/// fill in what the command line leaves out; `Config::load` applies the precedence.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "MLTAP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listener (h2c) [default: 0.0.0.0:8500]
    #[arg(long, env = "MLTAP_GRPC_LISTEN", value_name = "ADDR")]
    pub grpc_listen: Option<String>,
    /// REST listener (HTTP/1.1) [default: 0.0.0.0:8501]
    #[arg(long, env = "MLTAP_REST_LISTEN", value_name = "ADDR")]
    pub rest_listen: Option<String>,
    /// TF Serving gRPC port [default: http://127.0.0.1:9500]
    #[arg(long, env = "MLTAP_GRPC_UPSTREAM", value_name = "URL")]
    pub grpc_upstream: Option<String>,
    /// TF Serving REST port [default: http://127.0.0.1:9501]
    #[arg(long, env = "MLTAP_REST_UPSTREAM", value_name = "URL")]
    pub rest_upstream: Option<String>,
    /// Admin server: /metrics, /healthz, /readyz, /v1/labels, dashboard [default: 0.0.0.0:8510]
    #[arg(long, env = "MLTAP_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Bucket width, e.g. 2s, 5m, 1h [default: 60s]
    #[arg(long, env = "MLTAP_BUCKET", value_name = "DURATION")]
    pub bucket: Option<String>,
    /// Anodot JSON files and local state [default: ./mltap-out]
    #[arg(long, env = "MLTAP_OUTPUT_DIR", value_name = "DIR")]
    pub output_dir: Option<String>,
    /// Label join store: redis://host:port/db (comma-separated nodes for a cluster) [default: embedded file in the output dir]
    #[arg(long, env = "MLTAP_LABELS_STORE", value_name = "URL")]
    pub labels_store: Option<String>,
    /// How long a bucket waits for its labels before its label metrics are emitted [default: 1h]
    #[arg(long, env = "MLTAP_LABEL_HORIZON", value_name = "DURATION")]
    pub label_horizon: Option<String>,
    /// Anodot metrics endpoint; token from ANODOT_TOKEN
    #[arg(long, env = "MLTAP_ANODOT_URL", value_name = "URL")]
    pub anodot_url: Option<String>,
    /// Header (or gRPC metadata key) carrying the request id [default: x-request-id]
    #[arg(long, env = "MLTAP_REQUEST_ID_HEADER", value_name = "NAME")]
    pub request_id_header: Option<String>,
    /// Log filter, e.g. info, debug, mltap=debug; RUST_LOG when neither this nor MLTAP_LOG is set [default: info]
    #[arg(long, env = "MLTAP_LOG", value_name = "FILTER")]
    pub log: Option<String>,
    /// Log format: text (coloured only on a terminal, never with NO_COLOR) or json (one object per line) [default: text]
    #[arg(long, env = "MLTAP_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
}

/// `validate` flags: every `serve` flag, and whether to reach the upstreams.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Also check that TF Serving's gRPC and REST ports accept a connection (exit 1 when not).
    #[arg(long)]
    pub check_upstreams: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl From<&ServeArgs> for Flags {
    fn from(args: &ServeArgs) -> Flags {
        Flags {
            config: args.config.clone(),
            grpc_listen: args.grpc_listen.clone(),
            rest_listen: args.rest_listen.clone(),
            grpc_upstream: args.grpc_upstream.clone(),
            rest_upstream: args.rest_upstream.clone(),
            admin_listen: args.admin_listen.clone(),
            bucket: args.bucket.clone(),
            output_dir: args.output_dir.clone(),
            labels_store: args.labels_store.clone(),
            label_horizon: args.label_horizon.clone(),
            anodot_url: args.anodot_url.clone(),
            request_id_header: args.request_id_header.clone(),
            log: args.log.clone(),
            rust_log: std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()),
            log_format: args.log_format.clone(),
        }
    }
}

/// `demo` flags: its own duration plus every `serve` flag.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How long to run; runs until Ctrl-C when absent.
    #[arg(long = "for", value_name = "DURATION")]
    pub run_for: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Runs a parsed command line to its exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Validate(args) => validate(&args),
        Command::Send(args) => {
            let filter = std::env::var("MLTAP_LOG").unwrap_or_else(|_| "warn".to_string());
            let format = std::env::var("MLTAP_LOG_FORMAT").unwrap_or_else(|_| "text".to_string());
            let logging = format.parse().and_then(|format| logging::init(&filter, format));
            if let Err(problem) = logging {
                eprintln!("mltap: {problem}");
                return ExitCode::from(EXIT_CONFIG);
            }
            crate::send::run(&args)
        }
        Command::Demo(args) => crate::demo::run_blocking(args.run_for.as_deref(), Flags::from(&args.serve)),
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match Config::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mltap: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The filter was checked when the configuration loaded.
    let _ = logging::init(&config.log, config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("mltap: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(app::serve(config)) {
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

/// Loads the configuration as `serve` would (exit 2 with its one-line error), and with
/// `--check-upstreams` connects to both upstreams (exit 1 naming the one that does not
/// answer). Binds no port, starts nothing.
fn validate(args: &ValidateArgs) -> ExitCode {
    let config = match Config::load(&args.serve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mltap: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_upstreams {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("mltap: cannot start the async runtime: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let upstreams = [("grpc_upstream", &config.grpc_upstream), ("rest_upstream", &config.rest_upstream)];
        for (key, url) in upstreams {
            if let Err(problem) = runtime.block_on(reach(url)) {
                eprintln!("mltap: {key} {url}: {problem}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    }
    println!("mltap: configuration valid");
    ExitCode::SUCCESS
}

/// Opens (and closes) a TCP connection to an upstream's host and port within 2 s.
async fn reach(url: &http::Uri) -> Result<(), String> {
    let host = url.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']');
    let default_port = if url.scheme_str() == Some("https") { 443 } else { 80 };
    let port = url.port_u16().unwrap_or(default_port);
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("does not accept a connection ({e})")),
        Err(_) => Err("did not accept a connection within 2s".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_serve_flag_reaches_the_configuration() {
        let args = ServeArgs {
            config: Some("mltap.toml".into()),
            grpc_listen: Some("1".into()),
            rest_listen: Some("2".into()),
            grpc_upstream: Some("3".into()),
            rest_upstream: Some("4".into()),
            admin_listen: Some("5".into()),
            bucket: Some("6".into()),
            output_dir: Some("7".into()),
            labels_store: Some("8".into()),
            label_horizon: Some("9".into()),
            anodot_url: Some("10".into()),
            request_id_header: Some("11".into()),
            log: Some("12".into()),
            log_format: Some("13".into()),
        };
        let flags = Flags::from(&args);
        assert_eq!(flags.config, Some(PathBuf::from("mltap.toml")));
        let given = [
            &flags.grpc_listen,
            &flags.rest_listen,
            &flags.grpc_upstream,
            &flags.rest_upstream,
            &flags.admin_listen,
            &flags.bucket,
            &flags.output_dir,
            &flags.labels_store,
            &flags.label_horizon,
            &flags.anodot_url,
            &flags.request_id_header,
            &flags.log,
            &flags.log_format,
        ];
        for (i, value) in given.into_iter().enumerate() {
            assert_eq!(value.as_deref(), Some((i + 1).to_string().as_str()));
        }
    }

    #[test]
    fn the_commands_parse_as_documented() {
        let cli = Cli::try_parse_from(["mltap", "demo", "--for", "30s", "--bucket", "2s"]).unwrap();
        let Command::Demo(demo) = cli.command else { panic!("not demo") };
        assert_eq!((demo.run_for.as_deref(), demo.serve.bucket.as_deref()), (Some("30s"), Some("2s")));
        let cli = Cli::try_parse_from(["mltap", "send", "out", "--anodot-url", "http://a"]).unwrap();
        let Command::Send(send) = cli.command else { panic!("not send") };
        assert_eq!((send.protocol.as_str(), send.give_up_after.as_str()), ("2.0", "10m"));
    }
}
