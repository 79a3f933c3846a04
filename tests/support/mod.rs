//! Shared test support: a fake TF Serving that speaks the real protocols, mltap
//! started in-process on loopback ports, and a pass-through gRPC codec for comparing
//! wire bytes. Each test binary uses a different part of it.
#![allow(dead_code)]

pub mod fake_tfserving;
pub mod mltap;
pub mod raw_codec;

use std::path::PathBuf;

/// The shared TF Serving fixtures: `MLTAP_FIXTURES`, else `../shared/fixtures/tfserving`
/// relative to the repository (or to the directory holding its worktree).
pub fn fixtures_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("MLTAP_FIXTURES") {
        return PathBuf::from(dir);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for candidate in [root.join("../shared/fixtures/tfserving"), root.join("../../shared/fixtures/tfserving")] {
        if candidate.is_dir() {
            return candidate;
        }
    }
    panic!("TF Serving fixtures not found: set MLTAP_FIXTURES or place them at ../shared/fixtures/tfserving");
}
