//! Delayed ground truth: the `/v1/labels` endpoint, the join store (embedded or
//! Redis) that maps prediction ids to what label metrics need, and label metrics.

use serde::Deserialize;

/// Settings of label ingestion (`[labels]`); the store and horizon are flat keys.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelsConfig {
    /// Environment variable holding the bearer token that protects `/v1/labels`.
    pub token_env: Option<String>,
}

impl LabelsConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
