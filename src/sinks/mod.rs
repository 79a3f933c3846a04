//! Where metrics go: JSON files of Anodot 2.0 points in the output dir (`files`),
//! Anodot itself (`anodot`: the 2.0 and 3.0 encodings, the REST API, and delivery
//! with those files as the spool), and Prometheus.
//!
//! Sinks never decide what a metric means; they receive finished points.

pub mod anodot;
pub mod files;
pub mod prometheus;

pub use anodot::{AnodotConfig, AnodotProtocol, Point, TargetType};
