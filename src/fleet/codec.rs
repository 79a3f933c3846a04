//! How a bucket's partial state is written to Redis: its JSON (the serde of the
//! monitor's accumulators), deflated. JSON keeps the format readable and stable
//! across builds; deflate takes the sketches' long runs of small counts down to a
//! fraction (figures in docs/fleet.md).

use crate::monitor::BucketState;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use flate2::Compression;
use std::io::{Read, Write};

/// Largest decoded partial accepted; a bucket of 100 streams × 200 features is far below.
const MAX_DECODED_BYTES: u64 = 256 * 1024 * 1024;

/// The bytes of a partial state.
pub fn encode(state: &BucketState) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(state).map_err(|e| format!("cannot encode the state: {e}"))?;
    let mut encoder = DeflateEncoder::new(Vec::with_capacity(json.len() / 4), Compression::fast());
    encoder.write_all(&json).map_err(|e| format!("cannot compress the state: {e}"))?;
    encoder.finish().map_err(|e| format!("cannot compress the state: {e}"))
}

/// A partial state from its bytes.
pub fn decode(bytes: &[u8]) -> Result<BucketState, String> {
    let mut json = Vec::new();
    DeflateDecoder::new(bytes)
        .take(MAX_DECODED_BYTES)
        .read_to_end(&mut json)
        .map_err(|e| format!("the partial state is not deflated JSON: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("the partial state is not a bucket state: {e}"))
}

/// A name for this process among the partials of a bucket: unique per process, so
/// that a restarted replica never overwrites the partial of its previous life.
pub fn replica_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!("{host}-{}-{:016x}", std::process::id(), rand::random::<u64>())
}
