//! What delivery needs, resolved from the configuration (or `send`'s arguments) and the
//! environment once, at start: the endpoints, the secrets and the `[anodot]` section.
//! A missing token or access key stops start-up with an error naming the key at fault.

use std::time::Duration;

use super::api::{Endpoints, Secret};
use super::{AnodotConfig, AnodotProtocol};
use crate::units::ConfigError;

/// Environment variable holding Anodot's data-collection token.
pub const TOKEN_ENV: &str = "ANODOT_TOKEN";

/// Everything delivery needs, resolved and validated: where, with which secrets, how.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Metrics, watermark and API URLs.
    pub endpoints: Endpoints,
    /// Data-collection token (`ANODOT_TOKEN`).
    pub token: Secret,
    /// Access key for the 3.0 schema API.
    pub access_key: Option<Secret>,
    /// The `[anodot]` section: batch size, rate, protocol, timeouts, retention.
    pub anodot: AnodotConfig,
    /// Bucket width: a 3.0 watermark for a bucket is the start of the next one.
    pub bucket: Duration,
    /// How long label metrics may still be appended to a closed bucket's file, so the
    /// 3.0 labels stream's watermark waits that long.
    pub label_horizon: Duration,
}

impl DeliverySettings {
    /// Resolves the settings, reading secrets through `env` (the process environment
    /// outside tests). Errors name the configuration key at fault.
    pub fn resolve(
        anodot_url: &str,
        anodot: AnodotConfig,
        bucket: Duration,
        label_horizon: Duration,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<DeliverySettings, ConfigError> {
        anodot.validate().map_err(|(key, problem)| ConfigError::new(format!("anodot.{key}"), "", problem))?;
        let endpoints = Endpoints::new(anodot_url, anodot.api_url.as_deref())
            .map_err(|problem| ConfigError::new("anodot_url", "", problem))?;
        let token = env(TOKEN_ENV).map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).ok_or_else(|| {
            ConfigError::new(
                "anodot_url",
                "",
                format!("delivery to Anodot needs the data-collection token in the {TOKEN_ENV} environment variable"),
            )
        })?;
        let access_key = match anodot.protocol {
            AnodotProtocol::V20 => None,
            AnodotProtocol::V30 => {
                let name = &anodot.access_key_env;
                let key = env(name).map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).ok_or_else(|| {
                    ConfigError::new(
                        "anodot.access_key_env",
                        "",
                        format!("protocol 3.0 needs an Anodot access key in the {name} environment variable"),
                    )
                })?;
                Some(Secret::new(key))
            }
        };
        Ok(DeliverySettings { endpoints, token: Secret::new(token), access_key, anodot, bucket, label_horizon })
    }

    /// Points per request: at most `batch_points`, and never more than a second's worth.
    pub(super) fn batch_size(&self) -> usize {
        self.anodot.batch_points.min(self.anodot.points_per_second as usize).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(anodot: AnodotConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<DeliverySettings, ConfigError> {
        DeliverySettings::resolve("https://a.example", anodot, Duration::from_secs(60), Duration::from_secs(3600), env)
    }

    #[test]
    fn settings_need_the_token_and_for_30_the_access_key() {
        let e = resolve(AnodotConfig::default(), &|_| None).unwrap_err();
        assert!(e.problem.contains("ANODOT_TOKEN"), "{e}");
        let v30 = AnodotConfig { protocol: AnodotProtocol::V30, ..AnodotConfig::default() };
        let token_only = |k: &str| (k == TOKEN_ENV).then(|| "t".to_string());
        let e = resolve(v30, &token_only).unwrap_err();
        assert_eq!(e.key, "anodot.access_key_env");
        let s = resolve(AnodotConfig::default(), &token_only).unwrap();
        assert!(!format!("{s:?}").contains("\"t\""));
    }
}
