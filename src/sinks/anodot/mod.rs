//! Anodot: the points mltap emits, encoded for Anodot's 2.0 protocol (`encode2`, whose
//! types are re-exported here) and mapped onto 3.0 stream schemas (`encode3`), and
//! their delivery to Anodot's REST API with the output dir's files as the spool.
//!
//! Delivery is built from small parts, each with one concern:
//! - `config`: the `[anodot]` section; `settings`: that section resolved with the
//!   endpoints and secrets from the environment;
//! - `api`: the HTTP calls, and what each answer means (accepted, refused, retry, halt);
//! - `spool`: the files and the durable cursor of what Anodot answered for;
//! - `rate_limit`: the points-per-second token bucket; `retry`: backoff and when to
//!   stop trying, for every call;
//! - `delivery`: the engine that reads the spool past the cursor and sends it, shared
//!   by `serve` (a long-running task) and `mltap send`; `metrics`: its self-metrics.
//!
//! Nothing here decides what a metric means, changes a point, or logs a secret.

pub mod api;
pub mod config;
pub mod delivery;
pub mod encode2;
pub mod encode3;
pub mod metrics;
pub mod rate_limit;
pub mod retry;
pub mod settings;
pub mod spool;

pub use config::{AnodotConfig, AnodotProtocol};
pub use delivery::{Delivery, DeliveryError, DeliveryHandle, Engine, PassReport, Progress, Totals};
pub use encode2::*;
pub use metrics::DeliveryMetrics;
pub use retry::Persistence;
pub use settings::{DeliverySettings, TOKEN_ENV};
