//! The two text formats of `/metrics`: OpenMetrics for clients that ask for it (the
//! Prometheus server does, in its `Accept` header), else Prometheus's classic text
//! format 0.0.4, which `curl`, `promtool check metrics` and older scrapers read.
//!
//! prometheus-client writes OpenMetrics, where a counter family `x` has samples
//! `x_total`; in the classic format the family itself is `x_total`, else every
//! counter reads as an untyped metric without help. The conversion renames those
//! families and drops what the classic format lacks (`# UNIT`, `# EOF`).

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default();
            let refused = params.any(|p| p.replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// The classic text format of prometheus-client's OpenMetrics output.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(previous) = help.replace(line) {
                out.push_str(previous);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (renamed, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                _ => (name.to_string(), kind),
            };
            if let Some(help_line) = help.take() {
                match help_line.strip_prefix("# HELP ").and_then(|h| h.strip_prefix(name)) {
                    Some(text) if text.is_empty() || text.starts_with(' ') => {
                        out.push_str("# HELP ");
                        out.push_str(&renamed);
                        out.push_str(text);
                    }
                    _ => out.push_str(help_line),
                }
                out.push('\n');
            }
            out.push_str("# TYPE ");
            out.push_str(&renamed);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
            continue;
        }
        if let Some(previous) = help.take() {
            out.push_str(previous);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(previous) = help {
        out.push_str(previous);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_renamed_and_openmetrics_only_lines_dropped() {
        let openmetrics = "# HELP mltap_requests Proxied requests.\n# TYPE mltap_requests counter\n\
            mltap_requests_total{status=\"200\"} 3\n# HELP mltap_queue_bytes Bytes.\n# TYPE mltap_queue_bytes gauge\n\
            # UNIT mltap_queue_bytes bytes\nmltap_queue_bytes 5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP mltap_requests_total Proxied requests.\n# TYPE mltap_requests_total counter\n\
             mltap_requests_total{status=\"200\"} 3\n# HELP mltap_queue_bytes Bytes.\n# TYPE mltap_queue_bytes gauge\n\
             mltap_queue_bytes 5\n"
        );
    }

    #[test]
    fn openmetrics_is_served_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(None));
    }
}
