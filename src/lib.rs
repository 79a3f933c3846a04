//! mltap: a transparent reverse proxy in front of TensorFlow Serving that copies
//! inference traffic to a background worker, which buckets it by time and computes
//! monitoring metrics of the model's inputs, outputs and delayed labels.
//!
//! The modules follow the data flow of DESIGN.md: `proxy` forwards and tees,
//! `capture` carries exchanges over a bounded queue, `tfserving` decodes them into
//! observations, `monitor` aggregates them into buckets, `labels` joins ground truth,
//! `sinks` writes and delivers Anodot points, `admin` serves health, metrics, labels
//! and the dashboard, `request_log` keeps the sampled PredictionLog files and the
//! access log, and `config` holds the one typed configuration.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod capture;
pub mod cli;
pub mod config;
pub mod demo;
pub mod labels;
pub mod monitor;
pub mod proxy;
pub mod request_log;
pub mod send;
pub mod sinks;
pub mod tfserving;
pub mod worker;
