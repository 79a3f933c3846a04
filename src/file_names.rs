//! Model and signature names as file and directory names: clients choose them, so
//! they are encoded injectively into one safe path component (no separator, no `..`,
//! bounded length), and decoded back where a directory name must name its model
//! again. The Anodot files, the drift references and the request log all name their
//! directories this way.

/// Longest encoded name used whole as a path component; a longer one is cut and given
/// a hash of the whole name (`NAME_HASH_CHARS` more bytes), so that it fits in the
/// 255 bytes file systems allow with room for a suffix.
const MAX_NAME_BYTES: usize = 200;
const NAME_HASH_CHARS: usize = 17;

/// A model or signature name as one path component, injectively: ASCII letters,
/// digits, `-`, `_` and `.` stay, every other byte becomes `%XX` (so `a/b` is `a%2Fb`
/// and `a\nb` is `a%0Ab`); a name of dots only is encoded whole (`.` is `%2E`), the
/// empty name is `%`, and a name starting with `__` has its first `_` encoded, which
/// keeps `__mltap__` (the pseudo-model's directory) out of clients' reach. A name
/// whose encoding is longer than 200 bytes is cut there and ends in `~` and 16 hex
/// digits of a hash of the whole name; mltap warns about it (once a minute at most).
pub fn fs_safe_name(name: &str) -> String {
    if name.is_empty() {
        return "%".to_string();
    }
    let all_dots = name.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(name.len());
    for (i, byte) in name.bytes().enumerate() {
        let keep = (byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
            && !(all_dots || (i == 0 && name.starts_with("__")));
        if keep {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    if out.len() <= MAX_NAME_BYTES {
        return out;
    }
    warn_long_name(name);
    // Cut between two escapes, never inside one.
    let mut cut = MAX_NAME_BYTES - NAME_HASH_CHARS;
    while out.as_bytes()[..cut].iter().rev().take(2).any(|b| *b == b'%') {
        cut -= 1;
    }
    out.truncate(cut);
    out.push_str(&format!("~{:016x}", fnv1a(name.as_bytes())));
    out
}

/// The pseudo-model's directory name, which `fs_safe_name` never gives a client's model.
pub fn pseudo_model_dir(name: &str) -> String {
    name.to_string()
}

/// The name `fs_safe_name` encoded (None for a cut name, or one it cannot have made).
pub fn name_from_fs(component: &str) -> Option<String> {
    if component == "%" {
        return Some(String::new());
    }
    let bytes = component.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'~' => return None,
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// FNV-1a, 64 bits: a hash that stays the same across versions and platforms, so that
/// a cut name keeps its directory across restarts.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// One warning a minute at most about names cut to fit a file name, with the count.
fn warn_long_name(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_WARNED_SECOND: AtomicU64 = AtomicU64::new(0);
    static CUT_SINCE: AtomicU64 = AtomicU64::new(0);
    let cut = CUT_SINCE.fetch_add(1, Ordering::Relaxed) + 1;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let last = LAST_WARNED_SECOND.load(Ordering::Relaxed);
    if now >= last + 60 && LAST_WARNED_SECOND.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        CUT_SINCE.store(0, Ordering::Relaxed);
        let shown: String = name.chars().take(64).collect();
        tracing::warn!(
            message = "Model or signature names too long for a file name were cut and given a hash suffix.",
            example = %shown.escape_debug(),
            bytes = name.len(),
            names_cut = cut,
        );
    }
}
