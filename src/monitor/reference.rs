//! Drift references: what "normal" looks like for one stream, learned from its first
//! N complete buckets (or read from a configured file), then frozen.
//!
//! A reference holds, per numeric feature, the bin edges (min, deciles, max) and the
//! frequency of each bin; per categorical feature, the frequency of each category
//! (with `__other__`); and the distribution of predicted classes. It is persisted as
//! JSON under `OUTPUT_DIR/reference/MODEL/` so that a restart keeps it, and that same
//! JSON is the export format accepted by `monitor.reference_file`. This module never
//! changes a frozen reference.

use crate::atomic_file;
use crate::monitor::drift;
use crate::monitor::stats::{CategoryCounts, FastMap, Reservoir};
use crate::sinks::files::fs_safe_name;
use crate::tfserving::StreamKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `format` field of every reference file.
pub const REFERENCE_FORMAT: &str = "mltap-reference/1";
/// The category holding everything outside the tracked (or top-k) categories.
pub const OTHER_CATEGORY: &str = "__other__";

/// The frozen reference of one stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// Always `REFERENCE_FORMAT`; lets a reader reject files of another shape.
    pub format: String,
    /// The stream this reference describes.
    pub model: String,
    /// None in a file: applies to every version of the model.
    pub version: Option<i64>,
    pub signature: String,
    /// Bucket width it was learned with (informative; drift is on frequencies).
    pub bucket_seconds: u64,
    /// Start of the first bucket of the reference window, epoch seconds.
    pub first_bucket: i64,
    /// Buckets in the reference window.
    pub buckets: usize,
    /// Rows observed in the window.
    pub rows: u64,
    /// Per numeric feature: bins and frequencies.
    pub numeric: BTreeMap<String, NumericReference>,
    /// Per categorical feature: frequency of each category, `__other__` included.
    pub categorical: BTreeMap<String, BTreeMap<String, f64>>,
    /// Distribution of predicted classes, when the stream has probabilities.
    pub classes: Option<ClassReference>,
    /// Bins of a regression stream's predictions (`prediction_drift`); absent from
    /// classifiers' references and from files written before regression streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<NumericReference>,
}

/// Bins of a numeric feature, fixed from the reference alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericReference {
    /// Sorted distinct `[min, d1..d9, max]` (see `drift::decile_edges`).
    pub edges: Vec<f64>,
    /// Frequency of each of the `edges.len() + 1` bins (one below min, one above max).
    pub frequencies: Vec<f64>,
}

/// Frequencies of predicted classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReference {
    pub names: Vec<String>,
    pub frequencies: Vec<f64>,
}

impl Reference {
    /// Checks a reference read from a file; the error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.format != REFERENCE_FORMAT {
            return Err(format!("format is `{}`, expected `{REFERENCE_FORMAT}`", self.format));
        }
        for (name, n) in &self.numeric {
            if n.edges.is_empty() || n.frequencies.len() != drift::bin_count(&n.edges) {
                return Err(format!(
                    "numeric feature `{name}`: {} edges need {} frequencies, found {}",
                    n.edges.len(),
                    drift::bin_count(&n.edges),
                    n.frequencies.len()
                ));
            }
            if n.edges.windows(2).any(|w| w[0] >= w[1]) || n.edges.iter().any(|e| !e.is_finite()) {
                return Err(format!("numeric feature `{name}`: edges must be finite and strictly increasing"));
            }
        }
        if let Some(c) = &self.classes {
            if c.names.len() != c.frequencies.len() {
                return Err("classes: names and frequencies differ in length".into());
            }
        }
        Ok(())
    }

    /// Whether this reference applies to a stream (a file's reference without a
    /// version applies to every version).
    pub fn applies_to(&self, key: &StreamKey) -> bool {
        self.model == key.model
            && self.signature == key.signature
            && (self.version.is_none() || self.version == key.version)
    }

    /// Whether a bucket start lies in the window this reference was learned from.
    pub fn learned_from(&self, bucket_start: i64) -> bool {
        let width = self.bucket_seconds as i64;
        bucket_start >= self.first_bucket && bucket_start < self.first_bucket + width * self.buckets as i64
    }

    /// Reads one persisted reference.
    pub fn load(path: &Path) -> Result<Reference, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let r: Reference = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        r.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(r)
    }

    /// Writes this reference atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        atomic_file::write(path, &json)
    }
}

/// Where a stream's reference is persisted: `OUTPUT_DIR/reference/MODEL/vVERSION_SIGNATURE.json`.
pub fn reference_path(output_dir: &Path, key: &StreamKey) -> PathBuf {
    let version = key.version.map(|v| format!("v{v}")).unwrap_or_else(|| "unversioned".to_string());
    output_dir
        .join("reference")
        .join(fs_safe_name(&key.model))
        .join(format!("{version}_{}.json", fs_safe_name(&key.signature)))
}

/// References given in `monitor.reference_file`: one reference object or an array.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReferenceSet {
    pub references: Vec<Reference>,
}

impl ReferenceSet {
    /// Reads and checks a reference file.
    pub fn load(path: &Path) -> Result<ReferenceSet, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        let references: Vec<Reference> = if value.is_array() {
            serde_json::from_value(value)
        } else {
            serde_json::from_value(value).map(|r| vec![r])
        }
        .map_err(|e| format!("{} is not a reference export: {e}", path.display()))?;
        for r in &references {
            r.check().map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(ReferenceSet { references })
    }

    /// The reference for a stream: same version first, then a versionless one.
    pub fn find(&self, key: &StreamKey) -> Option<&Reference> {
        self.references
            .iter()
            .find(|r| r.applies_to(key) && r.version.is_some())
            .or_else(|| self.references.iter().find(|r| r.applies_to(key)))
    }
}

/// Collects a stream's reference window as its observations arrive.
#[derive(Debug)]
pub struct ReferenceBuilder {
    /// Start of the first bucket of the window.
    pub first_bucket: i64,
    /// Bucket width, seconds.
    width: i64,
    /// Buckets in the window.
    buckets: usize,
    /// Rows seen in the window.
    rows: u64,
    /// A uniform sample of each numeric feature.
    numeric: FastMap<String, Reservoir>,
    /// Category counts of each categorical feature.
    categorical: FastMap<String, CategoryCounts>,
    /// Predicted classes counted, with their names.
    classes: Option<(Vec<u64>, Vec<String>)>,
    /// A uniform sample of a regression stream's predictions.
    predictions: Option<Reservoir>,
    /// Sample size per numeric feature.
    sample_size: usize,
    /// Categories per categorical feature.
    max_categories: usize,
}

impl ReferenceBuilder {
    pub fn new(first_bucket: i64, width: i64, buckets: usize, sample_size: usize, max_categories: usize) -> Self {
        ReferenceBuilder {
            first_bucket,
            width,
            buckets,
            rows: 0,
            numeric: FastMap::default(),
            categorical: FastMap::default(),
            classes: None,
            predictions: None,
            sample_size,
            max_categories,
        }
    }

    /// Whether a bucket belongs to the window.
    pub fn covers(&self, bucket_start: i64) -> bool {
        bucket_start >= self.first_bucket && bucket_start < self.last_bucket() + self.width
    }

    /// Start of the window's last bucket: the reference freezes when it closes.
    pub fn last_bucket(&self) -> i64 {
        self.first_bucket + self.width * (self.buckets as i64 - 1)
    }

    pub fn add_rows(&mut self, rows: u64) {
        self.rows += rows;
    }

    pub fn add_numeric(&mut self, feature: &str, values: &[f64]) {
        if let Some(r) = self.numeric.get_mut(feature) {
            r.add_slice(values);
            return;
        }
        let mut r = Reservoir::new(self.sample_size);
        r.add_slice(values);
        self.numeric.insert(feature.to_string(), r);
    }

    pub fn categorical_mut(&mut self, feature: &str) -> &mut CategoryCounts {
        let max = self.max_categories;
        self.categorical.entry(feature.to_string()).or_insert_with(|| CategoryCounts::new(max))
    }

    /// Counts a predicted class; `names` are the stream's class names.
    pub fn add_prediction(&mut self, class: usize, names: impl FnOnce() -> Vec<String>) {
        let (counts, _) = self.classes.get_or_insert_with(|| {
            let names = names();
            (vec![0; names.len()], names)
        });
        if let Some(c) = counts.get_mut(class) {
            *c += 1;
        }
    }

    /// Adds a regression stream's predictions to the sample its bins come from.
    pub fn add_prediction_values(&mut self, values: &[f64]) {
        let size = self.sample_size;
        self.predictions.get_or_insert_with(|| Reservoir::new(size)).add_slice(values);
    }

    /// The frozen reference.
    pub fn freeze(self, key: &StreamKey) -> Reference {
        let mut numeric = BTreeMap::new();
        for (name, sample) in &self.numeric {
            if let Some(bins) = NumericReference::of_sample(sample.values()) {
                numeric.insert(name.clone(), bins);
            }
        }
        let mut categorical = BTreeMap::new();
        for (name, counts) in &self.categorical {
            let total = counts.total();
            if total == 0 {
                continue;
            }
            let mut freqs: BTreeMap<String, f64> =
                counts.counts().map(|(k, c)| (k.to_string(), c as f64 / total as f64)).collect();
            if counts.untracked() > 0 {
                freqs.insert(OTHER_CATEGORY.to_string(), counts.untracked() as f64 / total as f64);
            }
            categorical.insert(name.clone(), freqs);
        }
        let classes = self.classes.and_then(|(counts, names)| {
            drift::frequencies(&counts).map(|frequencies| ClassReference { names, frequencies })
        });
        Reference {
            format: REFERENCE_FORMAT.to_string(),
            model: key.model.clone(),
            version: key.version,
            signature: key.signature.clone(),
            bucket_seconds: self.width as u64,
            first_bucket: self.first_bucket,
            buckets: self.buckets,
            rows: self.rows,
            numeric,
            categorical,
            classes,
            prediction: self.predictions.as_ref().and_then(|sample| NumericReference::of_sample(sample.values())),
        }
    }
}

impl NumericReference {
    /// Decile bins of a sample and its frequency in each; None for a sample without a
    /// finite value.
    pub fn of_sample(sample: &[f64]) -> Option<NumericReference> {
        let edges = drift::decile_edges(sample);
        if edges.is_empty() {
            return None;
        }
        let counts = drift::histogram(&edges, sample);
        drift::frequencies(&counts).map(|frequencies| NumericReference { edges, frequencies })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StreamKey {
        StreamKey { model: "iris".into(), version: Some(3), signature: "serving_default".into() }
    }

    #[test]
    fn a_frozen_reference_survives_a_save_and_load() {
        let mut b = ReferenceBuilder::new(100, 10, 2, 1000, 10);
        b.add_numeric("x", &(0..100).map(f64::from).collect::<Vec<_>>());
        b.categorical_mut("city").add("paris");
        b.add_prediction(1, || vec!["a".into(), "b".into()]);
        let r = b.freeze(&key());
        assert_eq!(r.numeric["x"].edges.len(), 11);
        assert!((r.numeric["x"].frequencies.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(r.categorical["city"]["paris"], 1.0);
        assert_eq!(r.classes.as_ref().unwrap().frequencies, vec![0.0, 1.0]);
        let dir = tempfile::tempdir().unwrap();
        let path = reference_path(dir.path(), &key());
        assert!(path.ends_with("reference/iris/v3_serving_default.json"));
        r.save(&path).unwrap();
        assert_eq!(Reference::load(&path).unwrap(), r);
        assert_eq!(ReferenceSet::load(&path).unwrap().find(&key()), Some(&r));
    }

    #[test]
    fn a_versionless_reference_applies_to_every_version() {
        let r = ReferenceBuilder::new(0, 1, 1, 10, 10).freeze(&StreamKey { version: None, ..key() });
        let set = ReferenceSet { references: vec![r] };
        assert!(set.find(&key()).is_some());
        assert!(set.find(&StreamKey { model: "other".into(), ..key() }).is_none());
    }

    #[test]
    fn the_window_covers_exactly_its_buckets() {
        let b = ReferenceBuilder::new(100, 10, 3, 10, 10);
        assert!(!b.covers(90));
        assert!(b.covers(100) && b.covers(120));
        assert!(!b.covers(130));
        assert_eq!(b.last_bucket(), 120);
    }
}
