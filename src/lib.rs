//! mltap: a transparent reverse proxy in front of TensorFlow Serving that copies
//! inference traffic to a background worker, which buckets it by time and computes
//! monitoring metrics of the model's inputs, outputs and delayed labels.
//!
//! The modules follow the data flow: `proxy` forwards and tees, `capture` carries
//! exchanges over a bounded queue, `tfserving` decodes them into observations,
//! `monitor` aggregates them into buckets, `labels` joins ground truth, `sinks`
//! writes and delivers Anodot points, `admin` serves health, metrics, labels and the
//! dashboard, `request_log` keeps the sampled PredictionLog files and the access log.
//! `catalog` declares every metric once for producers and sinks. `units` is the leaf
//! every section type uses (durations, sizes, the configuration error), `config`
//! composes the sections into the one typed configuration, `app` wires the components
//! and `cli` runs the commands, `logging` sets up the logs. Modules import each other without cycles, in the order
//! of docs/architecture.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod atomic_file;
pub mod capture;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod demo;
pub mod file_names;
pub mod fleet;
pub mod labels;
pub mod logging;
pub mod monitor;
pub mod proxy;
pub mod request_log;
pub mod send;
pub mod sinks;
pub mod tfserving;
pub mod units;
pub mod worker;
