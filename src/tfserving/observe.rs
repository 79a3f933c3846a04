//! From a decoded `Call` to observations: feature naming (`age`, `x_0 … x_{d-1}`,
//! row-major flattening, unnamed tensors named from the signature or `input`), the
//! probability rules of docs/architecture.md with the per-model overrides, classify scores per
//! label, regression values and per-row ids. It never fails a whole observation for
//! one bad tensor: what cannot be used is reported and left out.
//!
//! Where docs/architecture.md is silent, these rules hold:
//! - Rows are the leading dimension of the probabilities output, else of the first
//!   output, else of the first input of rank ≥ 1. A rank-0 input applies to every
//!   row; an input with another leading dimension is skipped (`batch_mismatch`).
//! - An unnamed REST output is named after the signature's only output, else `output`.
//! - A single column (`[n]`/`[n,1]`) outside [0, 1] is a regression output
//!   (`Observation::regression`), not an error, unless the config names it as the
//!   probabilities output. A `[n,k]` output chosen by the rules that is not a
//!   distribution is `not_probabilities`; any bad row (NaN included) voids the batch.
//! - Classify scores: class names are the config's, else the labels of the first
//!   result; other results are reordered to those labels. A single score per example
//!   is the positive class of a binary model.
//! - The id feature gives `row_ids` and is not monitored as a feature.
//! - Strings that are not UTF-8 become `b64:<base64>` categories.
//! - MultiInference gives one observation per task (at most `MAX_TASKS`), each with
//!   the task's method (Classify or Regress) and model spec; `Decoded::method` says
//!   MultiInference.

use super::call::{Call, ExampleFeatures, Inputs, Outputs};
use super::schema::SignatureSchema;
use super::tensor::{NamedTensor, Tensor, TensorValues};
use super::{
    reason, DecodeError, DecodeLimits, FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities,
    StreamKey,
};
use super::{ModelConfig, Task};
use crate::capture::Exchange;
use base64::Engine;
use std::collections::BTreeMap;

/// Output names tried, in order, when the config names no probabilities output.
pub const PROBABILITY_NAMES: [&str; 5] = ["probabilities", "probs", "scores", "predictions", "output_0"];

/// Tolerances of the probability check: bounds (float rounding) and row sums
/// (half and bfloat16 softmax rows are off by a few thousandths).
const BOUND_TOLERANCE: f64 = 1e-6;
const SUM_TOLERANCE: f64 = 0.01;

/// MultiInference tasks observed per exchange (TF Serving users send one to three).
pub const MAX_TASKS: usize = 16;

/// What `observe` needs besides the call.
pub struct Context<'a> {
    pub exchange: &'a Exchange,
    pub models: &'a BTreeMap<String, ModelConfig>,
    pub limits: &'a DecodeLimits,
    /// The signature the call used, when known (REST naming and dtypes).
    pub signature: Option<&'a SignatureSchema>,
}

/// The name of an unnamed input: the signature's only input, else `input`.
pub fn input_name(signature: Option<&SignatureSchema>) -> String {
    match signature.map(|s| s.inputs.as_slice()) {
        Some([(name, _)]) => name.clone(),
        _ => "input".to_string(),
    }
}

/// The name of an unnamed output: the signature's only output, else `output`.
pub fn output_name(signature: Option<&SignatureSchema>) -> String {
    match signature.map(|s| s.outputs.as_slice()) {
        Some([(name, _)]) => name.clone(),
        _ => "output".to_string(),
    }
}

/// The observations of a call: one, or one per task for MultiInference.
pub fn observations(call: &Call, ctx: &Context<'_>, errors: &mut Vec<DecodeError>) -> Vec<Observation> {
    let default_config = ModelConfig::default();
    let config_of = |model: &str| ctx.models.get(model).unwrap_or(&default_config);
    let stream = |model: &str, version: Option<i64>, signature: &str| StreamKey {
        model: model.to_string(),
        version,
        signature: if signature.is_empty() { "serving_default".to_string() } else { signature.to_string() },
    };
    let base = |stream: StreamKey, method: InferenceMethod, rows: usize| Observation {
        stream,
        method,
        event_time: ctx.exchange.started_at,
        request_id: ctx.exchange.request_id.clone(),
        rows,
        features: Vec::new(),
        probabilities: None,
        regression: None,
        row_ids: None,
        upstream_latency: ctx.exchange.upstream_latency,
    };
    let key = stream(&call.model, call.version, &call.signature);
    let config = config_of(&call.model);
    // Predict calls; a count record of one has no inputs, its rows come from the outputs.
    let tensor_inputs: Option<&[NamedTensor]> = match (&call.inputs, &call.outputs) {
        (Inputs::Tensors(inputs), _) => Some(inputs),
        (Inputs::Unsampled, Outputs::Tensors(_)) => Some(&[]),
        _ => None,
    };
    match (tensor_inputs, &call.inputs, &call.outputs) {
        (Some(inputs), _, outputs) => {
            let mut outputs: Vec<NamedTensor> = match outputs {
                Outputs::Tensors(t) => t.clone(),
                _ => Vec::new(),
            };
            for o in &mut outputs {
                if o.name.is_empty() {
                    o.name = output_name(ctx.signature);
                }
            }
            let regression_model = config.task == Some(Task::Regression);
            let candidate = if regression_model {
                prediction_candidate(&outputs, config)
            } else {
                probability_candidate(&outputs, config)
            };
            let rows = batch_rows(candidate, &outputs, inputs);
            let mut obs = base(key, call.method, rows);
            let (features, ids) = tensor_features(inputs, rows, config, ctx, errors);
            obs.features = features;
            obs.row_ids = ids;
            let (probabilities, regression) = match candidate {
                Some(c) if regression_model => (None, predictions_of(c, rows, errors)),
                Some(c) => {
                    // A classifier's single column outside [0, 1] is an error, not a regression.
                    let explicit = config.probabilities_output.is_some() || config.task == Some(Task::Classification);
                    probabilities_of(c, rows, config, explicit, errors)
                }
                None => {
                    let configured = if regression_model {
                        config.prediction_output.as_ref().map(|name| (name, reason::NOT_REGRESSION, "prediction"))
                    } else {
                        config
                            .probabilities_output
                            .as_ref()
                            .map(|name| (name, reason::NOT_PROBABILITIES, "probabilities"))
                    };
                    if let Some((name, reason, what)) = configured {
                        if !outputs.is_empty() {
                            errors.push(DecodeError::new(
                                reason,
                                format!("configured {what} output `{name}` is not in the response"),
                            ));
                        }
                    }
                    (None, None)
                }
            };
            obs.probabilities = probabilities;
            obs.regression = regression;
            vec![obs]
        }
        (None, Inputs::Examples(examples), Outputs::Tasks(tasks)) => {
            let (features, ids) = example_features(examples, config, ctx.limits, errors);
            if tasks.len() > MAX_TASKS {
                // Each task's observation copies the features.
                errors.push(DecodeError::new(
                    reason::TOO_LARGE,
                    format!("{} MultiInference tasks; the first {MAX_TASKS} are observed", tasks.len()),
                ));
            }
            tasks
                .iter()
                .take(MAX_TASKS)
                .map(|task| {
                    let config = config_of(&task.model);
                    let mut obs = base(stream(&task.model, task.version, &task.signature), task.method, examples.len());
                    obs.features = features.clone();
                    obs.row_ids = ids.clone();
                    example_outputs(&mut obs, &task.outputs, config, errors);
                    obs
                })
                .collect()
        }
        (None, Inputs::Examples(examples), outputs) => {
            let mut obs = base(key, call.method, examples.len());
            let (features, ids) = example_features(examples, config, ctx.limits, errors);
            obs.features = features;
            obs.row_ids = ids;
            example_outputs(&mut obs, outputs, config, errors);
            vec![obs]
        }
        (None, Inputs::Unsampled, Outputs::Tasks(tasks)) => tasks
            .iter()
            .take(MAX_TASKS)
            .filter_map(|task| {
                let rows = result_rows(&task.outputs)?;
                let mut obs = base(stream(&task.model, task.version, &task.signature), task.method, rows);
                example_outputs(&mut obs, &task.outputs, config_of(&task.model), errors);
                Some(obs)
            })
            .collect(),
        (None, Inputs::Unsampled, outputs) => match result_rows(outputs) {
            Some(rows) => {
                let mut obs = base(key, call.method, rows);
                example_outputs(&mut obs, outputs, config, errors);
                vec![obs]
            }
            None => Vec::new(),
        },
        (None, Inputs::Tensors(_) | Inputs::None, _) => Vec::new(),
    }
}

/// Rows of Classify or Regress results (of a count record, whose examples were not
/// copied); None for anything else.
fn result_rows(outputs: &Outputs) -> Option<usize> {
    match outputs {
        Outputs::Classifications(rows) => Some(rows.len()),
        Outputs::Regressions(values) => Some(values.len()),
        _ => None,
    }
}

/// The output holding probabilities: the configured one, else the first of
/// `PROBABILITY_NAMES`, else the only float output.
pub fn probability_candidate<'t>(outputs: &'t [NamedTensor], config: &ModelConfig) -> Option<&'t NamedTensor> {
    if let Some(name) = &config.probabilities_output {
        return outputs.iter().find(|o| &o.name == name);
    }
    for name in PROBABILITY_NAMES {
        if let Some(o) = outputs.iter().find(|o| o.name == name) {
            return Some(o);
        }
    }
    let mut floats = outputs.iter().filter(|o| o.tensor.dtype.is_float());
    match (floats.next(), floats.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// Output names tried, in order, for a regression model's predictions when the
/// config names no `prediction_output`.
pub const PREDICTION_NAMES: [&str; 5] = ["predictions", "outputs", "output_0", "value", "scores"];

/// The output holding a regression model's predictions: the configured one, else the
/// first of `PREDICTION_NAMES`, else the only float output.
pub fn prediction_candidate<'t>(outputs: &'t [NamedTensor], config: &ModelConfig) -> Option<&'t NamedTensor> {
    if let Some(name) = &config.prediction_output {
        return outputs.iter().find(|o| &o.name == name);
    }
    for name in PREDICTION_NAMES {
        if let Some(o) = outputs.iter().find(|o| o.name == name) {
            return Some(o);
        }
    }
    let mut floats = outputs.iter().filter(|o| o.tensor.dtype.is_float());
    match (floats.next(), floats.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// A regression model's predictions: one number per row (`[n]` or `[n,1]`).
/// Non-finite values are kept (the statistics count them as missing).
fn predictions_of(output: &NamedTensor, rows: usize, errors: &mut Vec<DecodeError>) -> Option<Vec<f64>> {
    let t = &output.tensor;
    let not = |errors: &mut Vec<DecodeError>, why: String| {
        errors.push(DecodeError::new(reason::NOT_REGRESSION, format!("output `{}`: {why}", output.name)));
        None
    };
    if matches!(t.values, TensorValues::Bytes(_) | TensorValues::Bool(_)) {
        return not(errors, "not numeric".into());
    }
    let leading = match t.shape.as_slice() {
        [] => 1,
        [n] | [n, 1] => *n,
        other => return not(errors, format!("shape {other:?} is not [n] or [n,1]")),
    };
    if leading != rows {
        errors.push(DecodeError::new(
            reason::BATCH_MISMATCH,
            format!("output `{}` has {leading} rows, the batch {rows}", output.name),
        ));
        return None;
    }
    (rows > 0).then(|| (0..t.len().min(rows)).map(|i| t.values.number(i)).collect())
}

/// Rows in the batch: the leading dimension of the probabilities, else of the
/// first output, else of the first input of rank ≥ 1; 1 when all are scalars.
fn batch_rows(candidate: Option<&NamedTensor>, outputs: &[NamedTensor], inputs: &[NamedTensor]) -> usize {
    candidate.into_iter().chain(outputs).chain(inputs).find_map(|t| t.tensor.shape.first().copied()).unwrap_or(1)
}

fn check_row(row: &[f64]) -> bool {
    let in_range = row.iter().all(|p| p.is_finite() && *p >= -BOUND_TOLERANCE && *p <= 1.0 + BOUND_TOLERANCE);
    in_range && (row.len() < 2 || (row.iter().sum::<f64>() - 1.0).abs() <= SUM_TOLERANCE)
}

/// Probabilities from a `[n,k]` or `[n]`/`[n,1]` tensor. A single column outside
/// [0, 1] is a regression output unless the config named it as probabilities.
fn probabilities_of(
    output: &NamedTensor,
    rows: usize,
    config: &ModelConfig,
    explicit: bool,
    errors: &mut Vec<DecodeError>,
) -> (Option<Probabilities>, Option<Vec<f64>>) {
    let t = &output.tensor;
    let not = |errors: &mut Vec<DecodeError>, why: String| {
        errors.push(DecodeError::new(reason::NOT_PROBABILITIES, format!("output `{}`: {why}", output.name)));
        (None, None)
    };
    if matches!(t.values, TensorValues::Bytes(_) | TensorValues::Bool(_)) {
        return not(errors, "not numeric".into());
    }
    let (leading, width) = match t.shape.as_slice() {
        [] => (1, 1),
        [n] => (*n, 1),
        [n, k] => (*n, *k),
        other => return not(errors, format!("shape {other:?} is not [n] or [n,k]")),
    };
    if leading != rows {
        errors.push(DecodeError::new(
            reason::BATCH_MISMATCH,
            format!("output `{}` has {leading} rows, the batch {rows}", output.name),
        ));
        return (None, None);
    }
    if width == 0 || rows == 0 {
        return (None, None);
    }
    let values: Vec<f64> = (0..t.len()).map(|i| t.values.number(i)).collect();
    if width == 1 {
        if values.iter().all(|p| check_row(&[*p])) {
            let two = values.iter().flat_map(|p| [1.0 - p, *p]).collect();
            let threshold = Some(config.threshold.unwrap_or(0.5));
            return (
                Some(Probabilities { classes: 2, values: two, class_names: config.class_names.clone(), threshold }),
                None,
            );
        }
        if explicit {
            return not(errors, "values outside [0, 1]".into());
        }
        return (None, Some(values));
    }
    if let Some(bad) = values.chunks_exact(width).position(|row| !check_row(row)) {
        return not(errors, format!("row {bad} is not a distribution (values in [0,1] summing to 1)"));
    }
    let threshold = if width == 2 { config.threshold } else { None };
    (Some(Probabilities { classes: width, values, class_names: config.class_names.clone(), threshold }), None)
}

/// Classify scores per label, or regression values, of example-based calls. Results
/// that contradict the model's configured task are reported and not scored.
fn example_outputs(obs: &mut Observation, outputs: &Outputs, config: &ModelConfig, errors: &mut Vec<DecodeError>) {
    match (outputs, config.task) {
        (Outputs::Classifications(_), Some(Task::Regression)) => errors.push(DecodeError::new(
            reason::TASK_MISMATCH,
            "classification results of a model configured as a regression",
        )),
        (Outputs::Regressions(_), Some(Task::Classification)) => errors.push(DecodeError::new(
            reason::TASK_MISMATCH,
            "regression results of a model configured as a classification",
        )),
        (Outputs::Classifications(rows), _) => {
            if rows.len() != obs.rows {
                errors.push(DecodeError::new(
                    reason::BATCH_MISMATCH,
                    format!("{} classification results for {} examples", rows.len(), obs.rows),
                ));
                return;
            }
            obs.probabilities = classification_probabilities(rows, config, errors);
        }
        (Outputs::Regressions(values), _) => {
            if values.len() != obs.rows {
                errors.push(DecodeError::new(
                    reason::BATCH_MISMATCH,
                    format!("{} regression results for {} examples", values.len(), obs.rows),
                ));
                return;
            }
            obs.regression = Some(values.clone());
        }
        _ => {}
    }
}

/// The scores of Classify results as probabilities over the labels of the first
/// result (other rows are reordered to them).
fn classification_probabilities(
    rows: &[Vec<(String, f64)>],
    config: &ModelConfig,
    errors: &mut Vec<DecodeError>,
) -> Option<Probabilities> {
    let labels: Vec<&str> = rows.first()?.iter().map(|(l, _)| l.as_str()).collect();
    let k = labels.len();
    if k == 0 {
        return None;
    }
    let mut values = Vec::with_capacity(rows.len() * k.max(2));
    for row in rows {
        if row.len() != k {
            errors.push(DecodeError::new(reason::INCONSISTENT_CLASSES, "classification results differ in length"));
            return None;
        }
        let start = values.len();
        if row.iter().zip(&labels).all(|((l, _), want)| l == want) {
            values.extend(row.iter().map(|(_, s)| *s));
        } else {
            for want in &labels {
                match row.iter().find(|(l, _)| l == want) {
                    Some((_, s)) => values.push(*s),
                    None => {
                        errors.push(DecodeError::new(
                            reason::INCONSISTENT_CLASSES,
                            format!("label `{want}` missing from a classification result"),
                        ));
                        return None;
                    }
                }
            }
        }
        if !check_row(&values[start..]) {
            errors.push(DecodeError::new(
                reason::NOT_PROBABILITIES,
                "classification scores are not a distribution (values in [0,1] summing to 1)",
            ));
            return None;
        }
    }
    let named = labels.iter().all(|l| !l.is_empty());
    if k == 1 {
        // One score per example: the probability of the positive class.
        let two = values.iter().flat_map(|p| [1.0 - p, *p]).collect();
        return Some(Probabilities {
            classes: 2,
            values: two,
            class_names: config.class_names.clone(),
            threshold: Some(config.threshold.unwrap_or(0.5)),
        });
    }
    let class_names =
        config.class_names.clone().or_else(|| named.then(|| labels.iter().map(|l| l.to_string()).collect()));
    let threshold = if k == 2 { config.threshold } else { None };
    Some(Probabilities { classes: k, values, class_names, threshold })
}

/// The text of a string element: UTF-8 as is, other bytes in base64.
fn bytes_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => format!("b64:{}", base64::engine::general_purpose::STANDARD.encode(b)),
    }
}

/// Number formatting for categorical numbers and ids: integers without a point.
fn number_text(v: f64, integer: bool) -> Option<String> {
    if v.is_nan() {
        None
    } else if integer && v.fract() == 0.0 && v.abs() < 9.0e15 {
        Some(format!("{}", v as i64))
    } else {
        Some(format!("{v}"))
    }
}

/// One column from selected elements of a tensor.
fn column(
    name: String,
    t: &Tensor,
    indices: impl Iterator<Item = usize>,
    categorical: bool,
    integer: bool,
) -> FeatureColumn {
    let values = match &t.values {
        TensorValues::Bytes(v) => {
            FeatureValues::Categorical(indices.map(|i| v.get(i).map(|b| bytes_text(b))).collect())
        }
        TensorValues::Bool(v) => FeatureValues::Categorical(indices.map(|i| v.get(i).map(|b| b.to_string())).collect()),
        TensorValues::Int(v) if categorical => {
            FeatureValues::Categorical(indices.map(|i| v.get(i).map(|x| x.to_string())).collect())
        }
        TensorValues::UInt(v) if categorical => {
            FeatureValues::Categorical(indices.map(|i| v.get(i).map(|x| x.to_string())).collect())
        }
        values if categorical => {
            FeatureValues::Categorical(indices.map(|i| number_text(values.number(i), false)).collect())
        }
        values => FeatureValues::Numeric { values: indices.map(|i| values.number(i)).collect(), integer },
    };
    FeatureColumn { name, values }
}

/// Takes the id feature out of the columns, as per-row ids.
fn take_ids(features: &mut Vec<FeatureColumn>, config: &ModelConfig) -> Option<Vec<String>> {
    let name = config.id_feature.as_ref()?;
    let at = features.iter().position(|f| &f.name == name)?;
    let column = features.remove(at);
    Some(match column.values {
        FeatureValues::Categorical(v) => v.into_iter().map(Option::unwrap_or_default).collect(),
        FeatureValues::Numeric { values, integer } => {
            values.into_iter().map(|v| number_text(v, integer).unwrap_or_default()).collect()
        }
    })
}

/// Feature columns of Predict inputs, in input-name order.
fn tensor_features(
    inputs: &[NamedTensor],
    rows: usize,
    config: &ModelConfig,
    ctx: &Context<'_>,
    errors: &mut Vec<DecodeError>,
) -> (Vec<FeatureColumn>, Option<Vec<String>>) {
    let mut features = Vec::new();
    for input in inputs {
        let name = if input.name.is_empty() { input_name(ctx.signature) } else { input.name.clone() };
        let t = &input.tensor;
        // JSON numbers carry no dtype; the signature's says whether they are integers.
        let declared = match ctx.exchange.protocol {
            crate::capture::Protocol::Rest => ctx.signature.and_then(|s| s.input_dtype(&name)),
            crate::capture::Protocol::Grpc => None,
        };
        let integer = match (declared, &t.values) {
            (Some(d), TensorValues::Float(_) | TensorValues::Int(_)) => d.is_integer(),
            _ => t.dtype.is_integer(),
        };
        let (width, broadcast) = match t.shape.first() {
            None => (1, true),
            Some(&n) if n == rows => {
                // A zero-row tensor may declare absurd inner dimensions.
                match t.shape[1..].iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)) {
                    Some(width) => (width, false),
                    None => {
                        errors.push(DecodeError::new(reason::TOO_LARGE, format!("input `{name}` is too wide")));
                        continue;
                    }
                }
            }
            Some(&n) => {
                errors.push(DecodeError::new(
                    reason::BATCH_MISMATCH,
                    format!("input `{name}` has {n} rows, the batch {rows}"),
                ));
                continue;
            }
        };
        if features.len() + width > ctx.limits.max_features {
            errors.push(DecodeError::new(
                reason::TOO_MANY_FEATURES,
                format!("input `{name}` has {width} values per row; at most {} features", ctx.limits.max_features),
            ));
            continue;
        }
        if width == 1 {
            let categorical = config.categorical_features.contains(&name);
            let indices: Box<dyn Iterator<Item = usize>> =
                if broadcast { Box::new(std::iter::repeat_n(0, rows)) } else { Box::new(0..rows) };
            features.push(column(name, t, indices, categorical, integer));
        } else {
            for j in 0..width {
                let feature = format!("{name}_{j}");
                let categorical = config.categorical_features.contains(&feature);
                features.push(column(feature, t, (0..rows).map(|r| r * width + j), categorical, integer));
            }
        }
    }
    let ids = take_ids(&mut features, config);
    (features, ids)
}

/// Feature columns of tf.Examples: a feature whose lists hold one value is `name`,
/// longer lists give `name_0 …`; examples without the feature (or shorter lists)
/// are missing values.
fn example_features(
    examples: &[ExampleFeatures],
    config: &ModelConfig,
    limits: &DecodeLimits,
    errors: &mut Vec<DecodeError>,
) -> (Vec<FeatureColumn>, Option<Vec<String>>) {
    // Per feature: the longest list, whether any value is text, whether all are integers.
    let mut shapes: BTreeMap<&str, (usize, bool, bool)> = BTreeMap::new();
    for example in examples {
        for (name, values) in example {
            let entry = shapes.entry(name.as_str()).or_insert((0, false, true));
            entry.0 = entry.0.max(values.len());
            entry.1 |= matches!(values, TensorValues::Bytes(_));
            entry.2 &= matches!(values, TensorValues::Int(_) | TensorValues::UInt(_));
        }
    }
    let mut features = Vec::new();
    for (name, (width, text, integer)) in shapes {
        if width == 0 {
            continue;
        }
        if features.len() + width > limits.max_features {
            errors.push(DecodeError::new(
                reason::TOO_MANY_FEATURES,
                format!("feature `{name}` has {width} values per example; at most {} features", limits.max_features),
            ));
            continue;
        }
        fn lookup<'e>(example: &'e ExampleFeatures, name: &str) -> Option<&'e TensorValues> {
            example.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok().map(|i| &example[i].1)
        }
        for j in 0..width {
            let feature = if width == 1 { name.to_string() } else { format!("{name}_{j}") };
            let categorical = text || config.categorical_features.contains(&feature);
            let values = if categorical {
                FeatureValues::Categorical(
                    examples
                        .iter()
                        .map(|e| {
                            lookup(e, name).and_then(|v| match v {
                                TensorValues::Bytes(b) => b.get(j).map(|b| bytes_text(b)),
                                v if j < v.len() => number_text(v.number(j), integer),
                                _ => None,
                            })
                        })
                        .collect(),
                )
            } else {
                FeatureValues::Numeric {
                    values: examples.iter().map(|e| lookup(e, name).map_or(f64::NAN, |v| v.number(j))).collect(),
                    integer,
                }
            };
            features.push(FeatureColumn { name: feature, values });
        }
    }
    let ids = take_ids(&mut features, config);
    (features, ids)
}
