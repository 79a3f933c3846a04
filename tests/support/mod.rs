//! Shared test support: a fake TF Serving that speaks the real protocols, mltap
//! started in-process on loopback ports, and a pass-through gRPC codec for comparing
//! wire bytes. Each test binary uses a different part of it.
#![allow(dead_code)]

pub mod fake_tfserving;
pub mod mltap;
pub mod raw_codec;

use std::path::PathBuf;

/// The TF Serving fixtures (real encodings; see their README): `MLTAP_FIXTURES`, else
/// the copy in this repository, `tests/fixtures/tfserving`.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("MLTAP_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tfserving"),
    }
}
