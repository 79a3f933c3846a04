//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/v1/labels` and the
//! dashboard. It never sits on the proxy's path.
//!
//! Components that serve admin endpoints (labels, dashboard) implement `AdminRoute`
//! and are registered when the server is composed; the admin server owns only
//! health, readiness and metrics.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

/// Request bodies as admin routes see them (tests build them from `Full`).
pub type AdminRequestBody = UnsyncBoxBody<Bytes, hyper::Error>;
/// Response bodies of admin routes; streaming (SSE) bodies box a stream.
pub type AdminBody = UnsyncBoxBody<Bytes, Infallible>;
pub type AdminRequest = http::Request<AdminRequestBody>;
pub type AdminResponse = http::Response<AdminBody>;
pub type AdminFuture = Pin<Box<dyn Future<Output = AdminResponse> + Send>>;

/// An endpoint served on the admin port by another component.
pub trait AdminRoute: Send + Sync + 'static {
    /// Whether this route serves the request; asked in registration order.
    fn matches(&self, method: &http::Method, path: &str) -> bool;
    /// Answers the request.
    fn call(&self, request: AdminRequest) -> AdminFuture;
}

pub mod capture_metrics;
pub mod dashboard;
pub mod exposition;
pub mod history;
pub mod process_metrics;
pub mod server;

pub use server::{AdminServer, MonitoringCheck, MonitoringHealth, ReadinessTarget};

/// The admin port's own settings (`[admin]`).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Environment variable holding the token the dashboard and its JSON API need;
    /// unset, they are open to whoever reaches the admin port (docs/security.md).
    pub token_env: Option<String>,
}

impl AdminConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match &self.token_env {
            Some(name) if name.trim().is_empty() || name.contains('=') || name.contains('\0') => {
                Err(("token_env".into(), format!("`{name}` is not an environment variable name")))
            }
            _ => Ok(()),
        }
    }

    /// The token, read from the variable the section names; an error when it is named
    /// but unset, so that the dashboard is never served open by mistake.
    pub fn token(&self) -> Result<Option<String>, String> {
        let Some(name) = &self.token_env else { return Ok(None) };
        match std::env::var(name) {
            Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
            _ => Err(format!("admin.token_env names `{name}`, which is not set or empty")),
        }
    }
}
