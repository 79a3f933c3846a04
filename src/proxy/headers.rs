//! Hop-by-hop header rules of RFC 9110 §7.6.1: the fields that describe one
//! connection, not the message, and so never cross the proxy. Everything else passes
//! byte for byte; values of one field keep their order (the order across different
//! fields carries no meaning, RFC 9110 §5.3).

use http::header::{self, HeaderMap, HeaderName};

/// `Keep-Alive` and `Proxy-Connection` have no constant in `http`.
const KEEP_ALIVE: &str = "keep-alive";
const PROXY_CONNECTION: &str = "proxy-connection";

/// Removes the connection-specific fields from a message forwarded over HTTP/1.1:
/// `Connection` and every field it names, `Keep-Alive`, `Proxy-Connection`, `TE`,
/// `Transfer-Encoding` and `Upgrade`. `Content-Length` is part of the message and stays.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_connection_listed(headers);
    headers.remove(header::TE);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
}

/// Like `strip_hop_by_hop`, but keeps `TE: trailers`, which HTTP/2 allows and gRPC
/// requires end to end (servers use it to detect proxies that would drop trailers).
pub fn strip_hop_by_hop_h2(headers: &mut HeaderMap) {
    let te_trailers = headers.get_all(header::TE).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers);
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// Whether a field is connection-specific by its name alone (the byte-level rule the
/// REST relay applies to raw header lines): `Connection`, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Transfer-Encoding` and `Upgrade`. Fields that
/// `Connection` lists are found with `connection_lists`.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    [b"connection".as_slice(), b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding", b"upgrade"]
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop))
}

/// Whether one of the `Connection` field values lists `name` among its
/// comma-separated tokens (case-insensitive, optional whitespace around tokens).
pub fn connection_lists<'a>(connection_values: impl IntoIterator<Item = &'a [u8]>, name: &[u8]) -> bool {
    connection_values.into_iter().any(|value| has_token(value, name))
}

/// Whether a comma-separated field value holds `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Removes `Connection` and the fields its values list (comma-separated tokens).
fn strip_connection_listed(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CONNECTION) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    headers.remove(header::CONNECTION);
    for name in listed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        m
    }

    #[test]
    fn connection_and_the_fields_it_lists_are_removed() {
        let mut h = map(&[
            ("connection", "X-Secret, keep-alive"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("content-length", "0"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    #[test]
    fn raw_field_names_follow_the_same_rules() {
        for name in ["Connection", "keep-alive", "Proxy-Connection", "TE", "transfer-encoding", "UPGRADE"] {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in ["content-length", "host", "x-request-id", "trailer", "tes"] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
        let values = [b"keep-alive".as_slice(), b" X-Secret ,Upgrade"];
        assert!(connection_lists(values, b"x-secret"));
        assert!(connection_lists(values, b"upgrade"));
        assert!(!connection_lists(values, b"x-secret-2"));
        assert!(!has_token(b"closed", b"close"));
    }

    #[test]
    fn te_trailers_survives_on_http2() {
        let mut h = map(&[("te", "trailers"), ("connection", "close")]);
        strip_hop_by_hop_h2(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(h.get("connection").is_none());
    }
}
