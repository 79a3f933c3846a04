//! Per-model overrides (`[models.NAME]`): what the payload cannot say about a model,
//! read when its exchanges are decoded (probabilities, classes, threshold, ids) and
//! aggregated (categorical features).

use serde::Deserialize;

/// What a model predicts, which decides how its outputs are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Class probabilities (or scores): prediction counts, confidence, class labels.
    Classification,
    /// One number per row: prediction statistics and drift, numeric labels.
    Regression,
}

impl Task {
    /// The word the config and the docs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Regression => "regression",
        }
    }
}

/// Per-model overrides (`[models.NAME]`), for what the payload cannot say.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// What the model predicts. Unset: `Regress` calls are regression, `Classify`
    /// calls classification, and a `Predict` output is decided by the probability
    /// rules (a single column outside [0, 1] is a regression).
    pub task: Option<Task>,
    /// The output holding the class probabilities.
    pub probabilities_output: Option<String>,
    /// The output holding a regression model's predictions (one value per row).
    pub prediction_output: Option<String>,
    /// Class names, by class index.
    pub class_names: Option<Vec<String>>,
    /// Binary sigmoid models predict class 1 when p > threshold.
    pub threshold: Option<f64>,
    /// Features to treat as categorical even when numeric.
    pub categorical_features: Vec<String>,
    /// An input feature whose per-row value is the id labels refer to.
    pub id_feature: Option<String>,
    /// This model's share of exchanges in the request log, instead of `request_log.sampling_rate`.
    pub request_log_sampling_rate: Option<f64>,
}

impl ModelConfig {
    /// Checks one model's overrides; the error names the key within `[models.NAME]`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(t) = self.threshold {
            if !(t > 0.0 && t < 1.0) {
                return Err(("threshold".into(), format!("{t} is not strictly between 0 and 1")));
            }
        }
        if self.task == Some(Task::Regression) {
            for (key, set) in [
                ("probabilities_output", self.probabilities_output.is_some()),
                ("class_names", self.class_names.is_some()),
                ("threshold", self.threshold.is_some()),
            ] {
                if set {
                    return Err((
                        key.into(),
                        "applies to classification models; this one has task = \"regression\"".into(),
                    ));
                }
            }
        }
        if self.task == Some(Task::Classification) && self.prediction_output.is_some() {
            return Err((
                "prediction_output".into(),
                "applies to regression models; this one has task = \"classification\"".into(),
            ));
        }
        if let Some(rate) = self.request_log_sampling_rate.filter(|r| !(0.0..=1.0).contains(r)) {
            return Err(("request_log_sampling_rate".into(), format!("{rate} is not between 0 and 1")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_must_lie_strictly_inside_the_unit_interval() {
        assert!(ModelConfig::default().validate().is_ok());
        assert!(ModelConfig { threshold: Some(0.7), ..ModelConfig::default() }.validate().is_ok());
        for t in [0.0, 1.0, 1.5, f64::NAN] {
            let e = ModelConfig { threshold: Some(t), ..ModelConfig::default() }.validate().unwrap_err();
            assert_eq!(e.0, "threshold");
        }
    }

    #[test]
    fn class_keys_and_the_prediction_output_belong_to_their_task() {
        let regression = ModelConfig { task: Some(Task::Regression), ..ModelConfig::default() };
        assert!(regression.validate().is_ok());
        let both = ModelConfig { threshold: Some(0.5), ..regression.clone() };
        assert_eq!(both.validate().unwrap_err().0, "threshold");
        let classifier = ModelConfig {
            task: Some(Task::Classification),
            prediction_output: Some("y".into()),
            ..ModelConfig::default()
        };
        assert_eq!(classifier.validate().unwrap_err().0, "prediction_output");
        let parsed: ModelConfig = toml::from_str("task = \"regression\"\nprediction_output = \"eta\"\n").unwrap();
        assert_eq!((parsed.task, parsed.prediction_output.as_deref()), (Some(Task::Regression), Some("eta")));
        assert!(toml::from_str::<ModelConfig>("task = \"ranking\"\n").is_err());
    }

    #[test]
    fn a_request_log_sampling_rate_lies_in_the_unit_interval() {
        for rate in [0.0, 0.25, 1.0] {
            let model = ModelConfig { request_log_sampling_rate: Some(rate), ..ModelConfig::default() };
            assert!(model.validate().is_ok());
        }
        for rate in [-0.1, 1.5, f64::NAN] {
            let model = ModelConfig { request_log_sampling_rate: Some(rate), ..ModelConfig::default() };
            assert_eq!(model.validate().unwrap_err().0, "request_log_sampling_rate");
        }
    }
}
