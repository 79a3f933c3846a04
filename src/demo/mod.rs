//! `mltap demo`: an embedded TF-Serving-compatible model server, mltap in front of it,
//! a traffic generator whose inputs drift half-way, and delayed labels posted to the
//! label endpoint, so that a newcomer sees the whole system work with nothing else
//! installed.
//!
//! The demo owns its model server (`server`, `grpc`, `rest`, `serving`, `model`,
//! `tensor`), its traffic (`traffic`) and its labels (`labels`); it runs mltap itself
//! through the same composition as `mltap serve` and never reaches into the proxy,
//! the monitor or the label store: what it reports comes from their public outputs
//! (files, HTTP answers).

pub mod grpc;
pub mod labels;
pub mod mltap;
pub mod model;
pub mod rest;
pub mod runner;
pub mod server;
pub mod serving;
pub mod tensor;
pub mod traffic;

pub use runner::{run, run_blocking};
