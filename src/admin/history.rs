//! The dashboard's memory: a bounded history of recent Anodot points per model,
//! filled by the worker as buckets close (and again when label metrics for older
//! buckets arrive), reloaded from the Anodot files at start, and broadcast to live
//! subscribers (the dashboard's Server-Sent Events).
//!
//! It owns only what it is handed: it never computes a metric, never writes a file,
//! and never blocks its callers beyond a short lock (no lock is held across an await,
//! and a slow subscriber loses updates instead of holding back the worker). Memory is
//! bounded twice: a number of buckets per model and a total number of points.

use crate::catalog::Dimension;
use crate::sinks::Point;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio::sync::{broadcast, watch};

/// How many updates a live subscriber may fall behind before it is told it lagged.
const UPDATE_CHANNEL_CAPACITY: usize = 256;

/// Bounds of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Buckets kept per model: the longest range the dashboard can show
    /// (1440 = 24 h of 60 s buckets).
    pub max_buckets_per_model: usize,
    /// Points kept across all models, so that memory stays bounded whatever the number
    /// of models and features; the oldest buckets go first when it is reached. Each
    /// point costs about 16 bytes plus its share of its series' key.
    pub max_points: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        // 3 models x 100 features x ~16 points per feature x 1440 buckets fit.
        HistoryConfig { max_buckets_per_model: 1440, max_points: 8_000_000 }
    }
}

/// Identifies one time series within a model: the metric name and its dimensions but
/// the model (the history is keyed by it), in point order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    /// The metric name (`what`).
    pub what: String,
    /// Version, signature, then the metric's own dimensions.
    pub labels: Vec<(LabelKey, String)>,
}

/// The key of a series label: one of mltap's dimensions, or a property of a point
/// that mltap does not declare (a file written by another version).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabelKey {
    Dim(Dimension),
    Other(String),
}

impl LabelKey {
    /// The property key, as in the files and the API.
    pub fn as_str(&self) -> &str {
        match self {
            LabelKey::Dim(d) => d.key(),
            LabelKey::Other(k) => k,
        }
    }

    /// The label a query names by its property key.
    pub fn parse(key: &str) -> LabelKey {
        Dimension::from_key(key).map_or_else(|| LabelKey::Other(key.to_string()), LabelKey::Dim)
    }
}

/// By property key, so that series come out in the same order whatever their keys' kind.
impl Ord for LabelKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialOrd for LabelKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl SeriesKey {
    fn of(point: &Point) -> SeriesKey {
        let labels = point
            .dimensions()
            .filter(|(dim, _, _)| *dim != Some(Dimension::Model))
            .map(|(dim, key, value)| {
                (dim.map_or_else(|| LabelKey::Other(key.to_string()), LabelKey::Dim), value.to_string())
            })
            .collect();
        SeriesKey { what: point.what().to_string(), labels }
    }

    /// The value of one label.
    pub fn label(&self, key: &LabelKey) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The value of one of mltap's dimensions.
    pub fn dim(&self, dim: Dimension) -> Option<&str> {
        self.label(&LabelKey::Dim(dim))
    }
}

/// One series: values by bucket start, sorted by time.
#[derive(Debug, Default)]
struct Series {
    /// (bucket start, value), sorted and unique by bucket start; appends dominate,
    /// late label points are inserted in place.
    points: VecDeque<(i64, f64)>,
}

impl Series {
    /// Stores a value; returns whether it is new (rather than a rewrite of the bucket).
    fn upsert(&mut self, timestamp: i64, value: f64) -> bool {
        if self.points.back().is_none_or(|&(t, _)| t < timestamp) {
            self.points.push_back((timestamp, value));
            return true;
        }
        match self.points.binary_search_by_key(&timestamp, |&(t, _)| t) {
            Ok(i) => {
                self.points[i].1 = value;
                false
            }
            Err(i) => {
                self.points.insert(i, (timestamp, value));
                true
            }
        }
    }

    fn remove(&mut self, timestamp: i64) -> bool {
        if self.points.front().is_some_and(|&(t, _)| t == timestamp) {
            self.points.pop_front();
            return true;
        }
        match self.points.binary_search_by_key(&timestamp, |&(t, _)| t) {
            Ok(i) => {
                self.points.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    fn value_at(&self, timestamp: i64) -> Option<f64> {
        self.points.binary_search_by_key(&timestamp, |&(t, _)| t).ok().map(|i| self.points[i].1)
    }
}

#[derive(Debug, Default)]
struct ModelHistory {
    /// Buckets holding at least one point, with how many; the first is evicted first.
    buckets: BTreeMap<i64, usize>,
    /// Every series of the model, ordered so that API answers are stable.
    series: BTreeMap<SeriesKey, Series>,
}

impl ModelHistory {
    fn evict(&mut self, timestamp: i64) -> usize {
        let Some(count) = self.buckets.remove(&timestamp) else { return 0 };
        let mut removed = 0;
        self.series.retain(|_, series| {
            if series.remove(timestamp) {
                removed += 1;
            }
            !series.points.is_empty()
        });
        debug_assert_eq!(removed, count);
        removed
    }
}

#[derive(Debug, Default)]
struct State {
    models: BTreeMap<String, ModelHistory>,
    /// Points held across all models, compared with `max_points`.
    total_points: usize,
}

/// What a live subscriber hears when points are recorded: which buckets of which
/// model changed, so that it can fetch just those.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BucketUpdate {
    /// The model whose buckets changed.
    pub model: String,
    /// Bucket starts (epoch s) that received points, ascending; a closed bucket gives
    /// one, label metrics give the older buckets they belong to.
    pub buckets: Vec<i64>,
    /// Points recorded in this update.
    pub points: usize,
    /// The model's newest bucket after the update.
    pub latest_bucket: i64,
}

/// A model as `/api/models` describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    pub model: String,
    /// Distinct (version, signature) pairs seen; either may be absent from points
    /// (one pair of nulls when no point names either).
    pub streams: Vec<StreamSummary>,
    /// Numeric and categorical feature names (`feat_name`), natural order.
    pub features: Vec<String>,
    /// Class names (`class_name`), natural order (`class_2` before `class_10`).
    pub classes: Vec<String>,
    /// Metric names present.
    pub metrics: Vec<String>,
    /// Oldest and newest bucket start held, epoch s.
    pub first_bucket: i64,
    pub latest_bucket: i64,
    /// Buckets held.
    pub buckets: usize,
    /// Smallest gap between consecutive buckets: the bucket width, when two exist.
    pub bucket_seconds: Option<i64>,
    /// Points held for this model.
    pub points: usize,
}

/// A stream of a model: one version and signature.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct StreamSummary {
    pub version: Option<String>,
    pub signature: Option<String>,
}

/// Which series and which time range a query wants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesQuery {
    /// Metric names; empty means every metric.
    pub what: Vec<String>,
    /// Label filters: a series matches when, for each key, it has that label with one
    /// of the listed values.
    pub filters: Vec<(String, Vec<String>)>,
    /// Oldest bucket start wanted, inclusive (epoch s).
    pub since: Option<i64>,
    /// Newest bucket start wanted, inclusive (epoch s).
    pub until: Option<i64>,
    /// Only the buckets starting within this many seconds before the model's newest
    /// bucket (inclusive of it); combined with `since` the later bound wins.
    pub last: Option<i64>,
}

/// The answer to a series query, aligned for charting: every series has one value
/// (or null) per bucket of `buckets`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesAnswer {
    pub model: String,
    /// The model's bucket starts in the range, ascending.
    pub buckets: Vec<i64>,
    pub series: Vec<SeriesValues>,
}

/// One series of a `SeriesAnswer`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesValues {
    pub what: String,
    /// The series' labels, in point order.
    #[serde(serialize_with = "labels_as_object")]
    pub labels: Vec<(String, String)>,
    /// One value per bucket, null where the series has none.
    pub values: Vec<Option<f64>>,
}

fn labels_as_object<S: serde::Serializer>(labels: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(labels.len()))?;
    for (k, v) in labels {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// What `load_from_dir` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Files read and recorded.
    pub files: usize,
    /// Points recorded from them.
    pub points: usize,
    /// Files that could not be read or parsed, with the reason; they are skipped.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The bounded history. Share it as `Arc<History>` between the worker, which records,
/// and the dashboard routes, which read and subscribe.
#[derive(Debug)]
pub struct History {
    /// Bounds applied on every record.
    config: HistoryConfig,
    /// All series; a std lock because no caller holds it across an await.
    state: RwLock<State>,
    /// Live updates for subscribers; sending never waits.
    updates: broadcast::Sender<Arc<BucketUpdate>>,
    /// Set when the server shuts down, so that open event streams end.
    closed: watch::Sender<bool>,
}

impl Default for History {
    fn default() -> Self {
        History::new(HistoryConfig::default())
    }
}

impl History {
    pub fn new(config: HistoryConfig) -> History {
        let config = HistoryConfig {
            max_buckets_per_model: config.max_buckets_per_model.max(1),
            max_points: config.max_points.max(1),
        };
        let (updates, _) = broadcast::channel(UPDATE_CHANNEL_CAPACITY);
        let (closed, _) = watch::channel(false);
        History { config, state: RwLock::new(State::default()), updates, closed }
    }

    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// Stores the points of `model` (a closed bucket, or label metrics of older
    /// buckets) and tells live subscribers. A point for a bucket and series already
    /// held replaces the old value, so a rewritten file recorded again is no
    /// duplicate. Points whose bucket falls outside the bounds are dropped.
    pub fn record(&self, model: &str, points: &[Point]) {
        if let Some(update) = self.store(model, points) {
            // No subscriber is not an error: the dashboard may simply be closed.
            let _ = self.updates.send(Arc::new(update));
        }
    }

    fn store(&self, model: &str, points: &[Point]) -> Option<BucketUpdate> {
        if points.is_empty() {
            return None;
        }
        let mut state = self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = &mut *state;
        let history = state.models.entry(model.to_string()).or_default();
        let mut touched = BTreeSet::new();
        let mut added = 0usize;
        for point in points {
            let key = SeriesKey::of(point);
            if history.series.entry(key).or_default().upsert(point.timestamp, point.value) {
                *history.buckets.entry(point.timestamp).or_default() += 1;
                added += 1;
            }
            touched.insert(point.timestamp);
        }
        state.total_points += added;
        while history.buckets.len() > self.config.max_buckets_per_model {
            let Some((&oldest, _)) = history.buckets.first_key_value() else { break };
            state.total_points -= history.evict(oldest);
        }
        let latest_bucket = history.buckets.last_key_value().map(|(&t, _)| t);
        self.enforce_point_budget(state);
        let history = state.models.get(model)?;
        let buckets: Vec<i64> = touched.into_iter().filter(|t| history.buckets.contains_key(t)).collect();
        if buckets.is_empty() {
            return None;
        }
        Some(BucketUpdate {
            model: model.to_string(),
            buckets,
            points: points.len(),
            latest_bucket: latest_bucket.unwrap_or_default(),
        })
    }

    /// Evicts the globally oldest buckets until the budget holds; ties go to the
    /// model holding more points, so one model's flood does not starve the others.
    fn enforce_point_budget(&self, state: &mut State) {
        while state.total_points > self.config.max_points {
            let victim = state
                .models
                .iter()
                .filter_map(|(name, h)| {
                    let (&oldest, _) = h.buckets.first_key_value()?;
                    Some((oldest, std::cmp::Reverse(h.series.len()), name.clone()))
                })
                .min();
            let Some((oldest, _, name)) = victim else { break };
            let Some(history) = state.models.get_mut(&name) else { break };
            state.total_points -= history.evict(oldest);
            if history.buckets.is_empty() {
                state.models.remove(&name);
            }
        }
    }

    /// Reads the newest `max_buckets_per_model` files of each model under
    /// `OUTPUT_DIR/anodot/MODEL/`, oldest first, without telling live subscribers.
    /// A missing directory loads nothing; an unreadable or malformed file is skipped
    /// and reported. Call it from a blocking context: it reads and parses files.
    pub fn load_from_dir(&self, output_dir: &Path) -> LoadReport {
        let mut report = LoadReport::default();
        let root = output_dir.join("anodot");
        let Ok(models) = std::fs::read_dir(&root) else { return report };
        let mut model_dirs: Vec<(String, PathBuf)> = models
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                // Directory names encode model names (`sinks::files::fs_safe_name`).
                let dir = e.file_name().into_string().ok()?;
                let model = match crate::sinks::files::name_from_fs(&dir) {
                    Some(model) if dir != crate::sinks::files::PSEUDO_MODEL => model,
                    _ => dir,
                };
                Some((model, e.path()))
            })
            .collect();
        model_dirs.sort();
        for (model, dir) in model_dirs {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(error) => {
                    report.skipped.push((dir, error.to_string()));
                    continue;
                }
            };
            // File names are bucket starts (YYYYMMDDTHHMMSSZ), so name order is time
            // order; temporary files of atomic writes do not end in `.json`.
            let mut files: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            let keep_from = files.len().saturating_sub(self.config.max_buckets_per_model);
            for file in &files[keep_from..] {
                match read_points(file) {
                    Ok(points) => {
                        report.files += 1;
                        report.points += points.len();
                        self.store(&model, &points);
                    }
                    Err(reason) => report.skipped.push((file.clone(), reason)),
                }
            }
        }
        report
    }

    /// Subscribes to live updates. A subscriber that falls more than 256 updates
    /// behind gets `RecvError::Lagged` and should refetch.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<BucketUpdate>> {
        self.updates.subscribe()
    }

    /// Ends every open live stream; call it on shutdown so that graceful shutdown of
    /// the admin server does not wait for browsers to close their tabs.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Becomes true once `close` was called.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Points held across all models.
    pub fn total_points(&self) -> usize {
        self.read().total_points
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The models held, by name.
    pub fn models(&self) -> Vec<ModelSummary> {
        let state = self.read();
        state.models.iter().map(|(name, h)| summarize(name, h)).collect()
    }

    /// The newest bucket start of a model.
    pub fn latest_bucket(&self, model: &str) -> Option<i64> {
        self.read().models.get(model)?.buckets.last_key_value().map(|(&t, _)| t)
    }

    /// The series of `model` matching `query`, aligned on the model's buckets in
    /// range; None when the model is unknown.
    pub fn series(&self, model: &str, query: &SeriesQuery) -> Option<SeriesAnswer> {
        let state = self.read();
        let history = state.models.get(model)?;
        let latest = history.buckets.last_key_value().map(|(&t, _)| t).unwrap_or_default();
        let mut since = query.since.unwrap_or(i64::MIN);
        if let Some(last) = query.last {
            since = since.max(latest.saturating_sub(last.max(0)));
        }
        let until = query.until.unwrap_or(i64::MAX);
        let filters: Vec<(LabelKey, &Vec<String>)> =
            query.filters.iter().map(|(k, allowed)| (LabelKey::parse(k), allowed)).collect();
        let buckets: Vec<i64> =
            if since <= until { history.buckets.range(since..=until).map(|(&t, _)| t).collect() } else { Vec::new() };
        let series = history
            .series
            .iter()
            .filter(|(key, _)| query.what.is_empty() || query.what.contains(&key.what))
            .filter(|(key, _)| {
                filters.iter().all(|(k, allowed)| key.label(k).is_some_and(|v| allowed.iter().any(|a| a == v)))
            })
            .filter_map(|(key, s)| {
                let values: Vec<Option<f64>> = buckets.iter().map(|&t| s.value_at(t)).collect();
                values.iter().any(Option::is_some).then(|| SeriesValues {
                    what: key.what.clone(),
                    labels: key.labels.iter().map(|(k, v)| (k.as_str().to_string(), v.clone())).collect(),
                    values,
                })
            })
            .collect();
        Some(SeriesAnswer { model: model.to_string(), buckets, series })
    }
}

fn read_points(file: &Path) -> Result<Vec<Point>, String> {
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    serde_json::from_slice::<Vec<Point>>(&bytes).map_err(|e| format!("not an array of Anodot 2.0 points: {e}"))
}

fn summarize(name: &str, h: &ModelHistory) -> ModelSummary {
    let mut streams = BTreeSet::new();
    let mut features = BTreeSet::new();
    let mut classes = BTreeSet::new();
    let mut metrics = BTreeSet::new();
    for key in h.series.keys() {
        let stream = StreamSummary {
            version: key.dim(Dimension::Version).map(str::to_string),
            signature: key.dim(Dimension::Signature).map(str::to_string),
        };
        // Points counted before decoding (capture drops) know no stream: they are not
        // one of their own.
        if stream.version.is_some() || stream.signature.is_some() {
            streams.insert(stream);
        }
        if let Some(f) = key.dim(Dimension::FeatName) {
            features.insert(NaturalOrder(f.to_string()));
        }
        if let Some(c) = key.dim(Dimension::ClassName) {
            classes.insert(NaturalOrder(c.to_string()));
        }
        metrics.insert(key.what.clone());
    }
    if streams.is_empty() {
        streams.insert(StreamSummary { version: None, signature: None });
    }
    let times: Vec<i64> = h.buckets.keys().copied().collect();
    let bucket_seconds = times.windows(2).map(|w| w[1] - w[0]).filter(|d| *d > 0).min();
    ModelSummary {
        model: name.to_string(),
        streams: streams.into_iter().collect(),
        features: features.into_iter().map(|n| n.0).collect(),
        classes: classes.into_iter().map(|n| n.0).collect(),
        metrics: metrics.into_iter().collect(),
        first_bucket: times.first().copied().unwrap_or_default(),
        latest_bucket: times.last().copied().unwrap_or_default(),
        buckets: times.len(),
        bucket_seconds,
        points: h.buckets.values().sum(),
    }
}

/// Orders names with embedded numbers as people do: `x_2` before `x_10`.
#[derive(Debug, PartialEq, Eq)]
struct NaturalOrder(String);

impl NaturalOrder {
    fn chunks(&self) -> impl Iterator<Item = (bool, &str)> {
        let s = self.0.as_str();
        let mut rest = s;
        std::iter::from_fn(move || {
            let first = rest.chars().next()?;
            let digits = first.is_ascii_digit();
            let end = rest.find(|c: char| c.is_ascii_digit() != digits).unwrap_or(rest.len());
            let (chunk, tail) = rest.split_at(end);
            rest = tail;
            Some((digits, chunk))
        })
    }
}

impl Ord for NaturalOrder {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let mut a = self.chunks();
        let mut b = other.chunks();
        loop {
            match (a.next(), b.next()) {
                (None, None) => return self.0.cmp(&other.0),
                (None, Some(_)) => return std::cmp::Ordering::Less,
                (Some(_), None) => return std::cmp::Ordering::Greater,
                (Some((true, x)), Some((true, y))) => {
                    let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                    let ord = x.len().cmp(&y.len()).then_with(|| x.cmp(y));
                    if ord.is_ne() {
                        return ord;
                    }
                }
                (Some((_, x)), Some((_, y))) => {
                    let ord = x.cmp(y);
                    if ord.is_ne() {
                        return ord;
                    }
                }
            }
        }
    }
}

impl PartialOrd for NaturalOrder {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::TargetType;

    fn point(what: &str, t: i64, v: f64, dims: &[(&str, &str)]) -> Point {
        let mut b = Point::builder(what, TargetType::Gauge, t, v).with("model", "m").with("version", "1");
        for (k, val) in dims {
            b = b.with(k, val);
        }
        b.finish().unwrap()
    }

    #[test]
    fn names_with_numbers_sort_naturally() {
        let mut v: Vec<NaturalOrder> =
            ["x_10", "x_2", "x_1", "class_0", "x_02b"].iter().map(|s| NaturalOrder(s.to_string())).collect();
        v.sort();
        let names: Vec<&str> = v.iter().map(|n| n.0.as_str()).collect();
        assert_eq!(names, ["class_0", "x_1", "x_2", "x_02b", "x_10"]);
    }

    #[test]
    fn rewriting_a_bucket_replaces_values_instead_of_adding_points() {
        let h = History::default();
        h.record("m", &[point("buffer_count", 60, 1.0, &[])]);
        h.record("m", &[point("buffer_count", 60, 2.0, &[])]);
        assert_eq!(h.total_points(), 1);
        let a = h.series("m", &SeriesQuery::default()).unwrap();
        assert_eq!(a.series[0].values, vec![Some(2.0)]);
    }

    #[test]
    fn late_points_are_inserted_in_time_order() {
        let h = History::default();
        for t in [0, 60, 180] {
            h.record("m", &[point("accuracy", t, 0.5, &[])]);
        }
        h.record("m", &[point("accuracy", 120, 0.9, &[])]);
        let a = h.series("m", &SeriesQuery::default()).unwrap();
        assert_eq!(a.buckets, vec![0, 60, 120, 180]);
        assert_eq!(a.series[0].values, vec![Some(0.5), Some(0.5), Some(0.9), Some(0.5)]);
    }
}
