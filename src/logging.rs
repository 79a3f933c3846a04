//! Process logging: the filter (`--log`, `MLTAP_LOG`, else `RUST_LOG`), the format
//! (`--log-format text|json`, `MLTAP_LOG_FORMAT`) and colours.
//!
//! Logs go to stderr. Text logs are coloured only when stderr is a terminal and
//! `NO_COLOR` is unset or empty (<https://no-color.org>), so that files, pipes and
//! `kubectl logs` never carry ANSI escapes. JSON logs are one object per line with
//! `timestamp`, `level`, `target`, `message` and `fields` (the event's other fields),
//! which log collectors index without parsing text.

use serde_json::{Map, Value};
use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing's default format).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{value}` is not a log format: use `text` or `json`")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Parses a log filter (`info`, `mltap=debug,h2=warn`, ...), or says why it does not
/// parse; start-up refuses a filter that does not, rather than logging at a level
/// nobody asked for.
pub fn parse_filter(filter: &str) -> Result<EnvFilter, String> {
    if filter.trim().is_empty() {
        return Err("the log filter is empty".to_string());
    }
    EnvFilter::builder().parse(filter).map_err(|e| format!("`{filter}` is not a log filter: {e}"))
}

/// Whether text logs on stderr may be coloured: only on a terminal, never with
/// `NO_COLOR` set to a non-empty value.
pub fn colours_wanted(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the process's logger on stderr. A filter that does not parse is refused
/// with its reason (the command exits 2 with it); a logger already installed (tests,
/// the demo running `serve` inside) is left in place.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = parse_filter(filter)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(colours_wanted(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref()))
            .try_init(),
        LogFormat::Json => builder.with_ansi(false).event_format(JsonLines).try_init(),
    };
    Ok(())
}

/// One JSON object per event: `{"timestamp", "level", "target", "message", "fields"}`.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let metadata = event.metadata();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()),
        );
        line.insert("level".into(), Value::String(metadata.level().to_string()));
        line.insert("target".into(), Value::String(metadata.target().to_string()));
        line.insert("message".into(), Value::String(fields.message.unwrap_or_default()));
        line.insert("fields".into(), Value::Object(fields.fields));
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields: its `message` apart, the others as JSON values.
#[derive(Default)]
struct JsonFields {
    message: Option<String>,
    fields: Map<String, Value>,
}

impl JsonFields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = Some(match value {
                Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.fields.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value).map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_filters_parse_or_say_why() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("Text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().unwrap_err().contains("text"));
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("mltap=debug,h2=warn").is_ok());
        assert!(parse_filter("mltap=loud").is_err());
        assert!(parse_filter("").is_err());
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colours_wanted(true, None));
        assert!(colours_wanted(true, Some(OsStr::new(""))));
        assert!(!colours_wanted(true, Some(OsStr::new("1"))));
        assert!(!colours_wanted(false, None));
    }
}
