//! Anodot: the 2.0 point encoding (`encode2`, re-exported here so that callers name
//! `sinks::anodot::Point`) and the 3.0 stream mapping (`encode3`).

pub mod encode2;
pub mod encode3;

pub use encode2::*;
