//! Anodot 2.0 metric points and Anodot's property rules: at most 20 properties,
//! keys of at most 50 and values of at most 150 characters, `.`, `=` and space in
//! values replaced by `_`, and finite values only. A `Point` that exists obeys them.
//!
//! Producers' typed samples become points here (`Point::from_sample`): the catalogue
//! (`catalog`) gives the name, the target type and the property keys. A point
//! remembers its catalogue entry and where each dimension sits, so that the other
//! sinks read it by type, not by property name.

use crate::catalog::{self, Dimension, Kind, MetricDef, Sample, ScopeValues};
use serde::ser::{Serialize, SerializeMap, Serializer};

/// Anodot's aggregation hint: counters are summed, gauges averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetType {
    Gauge,
    Counter,
}

impl TargetType {
    /// Anodot's hint for a catalogue kind: statistics are gauges.
    pub const fn of(kind: Kind) -> TargetType {
        if kind.is_counter() {
            TargetType::Counter
        } else {
            TargetType::Gauge
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetType::Gauge => "gauge",
            TargetType::Counter => "counter",
        }
    }
}

/// Most properties a point may carry.
pub const MAX_PROPERTIES: usize = 20;
/// Longest property key.
pub const MAX_KEY_CHARS: usize = 50;
/// Longest property value.
pub const MAX_VALUE_CHARS: usize = 150;

/// One Anodot 2.0 point. Properties keep their insertion order (`what`,
/// `target_type`, `model`, `version`, `signature`, the metric's own dimensions, `ver`),
/// which is also the order they are written in.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    properties: Vec<(String, String)>,
    /// The catalogue's entry for `what`; None for a metric mltap does not declare (a
    /// file of another version, a test's made-up point).
    metric: Option<&'static MetricDef>,
    /// Per dimension (by `Dimension::index`), 1 + its position in `properties`, or 0
    /// when the point does not carry it.
    dim_slots: DimSlots,
    /// Bucket start, epoch seconds.
    pub timestamp: i64,
    /// A finite number.
    pub value: f64,
}

type DimSlots = [u8; Dimension::COUNT];

/// Builds a point of any name and properties, for points that do not come from the
/// catalogue (tests, tools); `finish` checks the value and appends `ver`. mltap's own
/// producers use `Point::from_sample`.
#[derive(Debug, Clone)]
pub struct PointBuilder {
    properties: Vec<(String, String)>,
    timestamp: i64,
    value: f64,
}

impl Point {
    /// Starts a point of metric `what`.
    pub fn builder(what: &str, target_type: TargetType, timestamp: i64, value: f64) -> PointBuilder {
        let mut b = PointBuilder { properties: Vec::with_capacity(8), timestamp, value };
        b = b.with("what", what).with("target_type", target_type.as_str());
        b
    }

    /// Renders a typed sample of a bucket of `scope` starting at `timestamp`: `what`,
    /// `target_type`, the scope's dimensions, the sample's, `ver`. None when the value
    /// is not finite (never emitted).
    pub fn from_sample(sample: &Sample<'_>, scope: &ScopeValues<'_>, timestamp: i64) -> Option<Point> {
        if !sample.value.is_finite() {
            return None;
        }
        let metric = sample.metric;
        let mut properties = Vec::with_capacity(6 + sample.dims().len());
        properties.push(("what".to_string(), metric.name.to_string()));
        properties.push(("target_type".to_string(), TargetType::of(metric.kind).as_str().to_string()));
        let mut dim_slots = [0u8; Dimension::COUNT];
        for (dim, value) in
            scope.dims().filter(|(d, _)| metric.scope.dims().contains(d)).chain(sample.dims().iter().copied())
        {
            properties.push((dim.key().to_string(), sanitize_value(value)));
            dim_slots[dim.index()] = properties.len() as u8;
        }
        properties.push(("ver".to_string(), "1".to_string()));
        Some(Point { properties, metric: Some(metric), dim_slots, timestamp, value: sample.value })
    }

    /// The catalogue's entry for this point's metric.
    pub fn metric(&self) -> Option<&'static MetricDef> {
        self.metric
    }

    /// The value of one of mltap's dimensions, when the point carries it.
    pub fn dim(&self, dim: Dimension) -> Option<&str> {
        match self.dim_slots[dim.index()] {
            0 => None,
            slot => self.properties.get(usize::from(slot) - 1).map(|(_, v)| v.as_str()),
        }
    }

    /// The properties that are dimensions (all but `what`, `target_type` and `ver`),
    /// in order, each with its typed dimension when it is one of mltap's.
    pub fn dimensions(&self) -> impl Iterator<Item = (Option<Dimension>, &str, &str)> {
        self.properties.iter().enumerate().filter(|(_, (k, _))| !is_bookkeeping(k)).map(|(i, (k, v))| {
            let dim = Dimension::ALL.into_iter().find(|d| usize::from(self.dim_slots[d.index()]) == i + 1);
            (dim, k.as_str(), v.as_str())
        })
    }

    /// The properties in order.
    pub fn properties(&self) -> &[(String, String)] {
        &self.properties
    }

    /// The value of one property.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The metric name.
    pub fn what(&self) -> &str {
        self.property("what").unwrap_or_default()
    }
}

impl PointBuilder {
    /// Adds a property, sanitized to Anodot's rules. Properties past the 19th (one
    /// slot stays for `ver`) are ignored: dimensions are fixed by the code, so this
    /// only guards against a programming error, which debug builds assert.
    pub fn with(mut self, key: &str, value: impl AsRef<str>) -> Self {
        debug_assert!(self.properties.len() < MAX_PROPERTIES - 1, "too many properties for {key}");
        if self.properties.len() < MAX_PROPERTIES - 1 {
            self.properties.push((sanitize_key(key), sanitize_value(value.as_ref())));
        }
        self
    }

    /// Adds a property when the value is known.
    pub fn with_opt(self, key: &str, value: Option<impl AsRef<str>>) -> Self {
        match value {
            Some(v) => self.with(key, v),
            None => self,
        }
    }

    /// The point, or None when its value is not finite (never emitted).
    pub fn finish(mut self) -> Option<Point> {
        if !self.value.is_finite() {
            return None;
        }
        self.properties.push(("ver".to_string(), "1".to_string()));
        Some(Point::typed(self.properties, self.timestamp, self.value))
    }
}

impl Point {
    /// A point from properties in file order, with its catalogue entry and dimension
    /// slots resolved from the property keys: the one place names are read back.
    fn typed(properties: Vec<(String, String)>, timestamp: i64, value: f64) -> Point {
        let what = properties.iter().find(|(k, _)| k == "what").map(|(_, v)| v.as_str()).unwrap_or_default();
        let metric = catalog::find(what);
        let mut dim_slots = [0u8; Dimension::COUNT];
        for (i, (k, _)) in properties.iter().enumerate().take(usize::from(u8::MAX)) {
            if let Some(d) = Dimension::from_key(k) {
                dim_slots[d.index()] = (i + 1) as u8;
            }
        }
        Point { properties, metric, dim_slots, timestamp, value }
    }
}

/// Properties of the 2.0 format itself rather than dimensions: the metric name, its
/// aggregation hint and the metric version.
fn is_bookkeeping(key: &str) -> bool {
    matches!(key, "what" | "target_type" | "ver")
}

fn sanitize_key(key: &str) -> String {
    key.chars().take(MAX_KEY_CHARS).collect()
}

/// Replaces `.`, `=` and whitespace with `_`, writes control characters (NUL among
/// them) and Unicode bidirectional controls (which can make a name read as another in
/// a UI) as `\u{XXXX}` text, and cuts to 150 characters. An empty value becomes `_`,
/// since Anodot rejects empty property values.
pub fn sanitize_value(value: &str) -> String {
    let mut s = String::with_capacity(value.len().min(MAX_VALUE_CHARS));
    for c in value.chars() {
        if c == '.' || c == '=' || c.is_whitespace() {
            s.push('_');
        } else if c.is_control() || is_bidi_control(c) {
            s.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            s.push(c);
        }
        if s.len() >= 4 * MAX_VALUE_CHARS {
            break;
        }
    }
    let s: String = s.chars().take(MAX_VALUE_CHARS).collect();
    if s.is_empty() {
        "_".to_string()
    } else {
        s
    }
}

/// Unicode's bidirectional formatting characters (UAX #9).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

struct Properties<'a>(&'a [(String, String)]);

impl Serialize for Properties<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

struct EmptyTags;

impl Serialize for EmptyTags {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_map(Some(0))?.end()
    }
}

impl Serialize for Point {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("properties", &Properties(&self.properties))?;
        map.serialize_entry("tags", &EmptyTags)?;
        map.serialize_entry("timestamp", &self.timestamp)?;
        map.serialize_entry("value", &self.value)?;
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for Point {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Wire {
            properties: serde_json::Map<String, serde_json::Value>,
            timestamp: i64,
            value: f64,
        }
        let wire = Wire::deserialize(deserializer)?;
        let properties = wire
            .properties
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect();
        Ok(Point::typed(properties, wire.timestamp, wire.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_serialize_in_anodot_20_shape_with_ordered_properties() {
        let p = Point::builder("feature_value", TargetType::Gauge, 1_700_000_000, 1.5)
            .with("model", "iris")
            .with("feat_name", "petal.length x=1")
            .with("stat", "mean")
            .finish()
            .unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"properties":{"what":"feature_value","target_type":"gauge","model":"iris","feat_name":"petal_length_x_1","stat":"mean","ver":"1"},"tags":{},"timestamp":1700000000,"value":1.5}"#
        );
        let back: Point = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn a_sample_renders_as_the_same_point_as_its_spelled_out_properties() {
        use crate::catalog::{Dimension, FEATURE_VALUE, REQUEST_COUNT};
        let scope = ScopeValues { model: Some("iris"), version: Some("2"), signature: Some("serving default") };
        let sample = FEATURE_VALUE.sample(1.5).with(Dimension::FeatName, "petal.length").with(Dimension::Stat, "q50");
        let typed = Point::from_sample(&sample, &scope, 60).unwrap();
        let spelled = Point::builder("feature_value", TargetType::Gauge, 60, 1.5)
            .with("model", "iris")
            .with("version", "2")
            .with("signature", "serving default")
            .with("feat_name", "petal.length")
            .with("stat", "q50")
            .finish()
            .unwrap();
        assert_eq!(serde_json::to_string(&typed).unwrap(), serde_json::to_string(&spelled).unwrap());
        assert_eq!(typed, spelled);
        assert_eq!(typed.metric(), Some(&FEATURE_VALUE));
        assert_eq!(typed.dim(Dimension::FeatName), Some("petal_length"));
        assert_eq!(typed.dim(Dimension::Signature), Some("serving_default"));
        assert_eq!(typed.dim(Dimension::Method), None);
        let back: Point = serde_json::from_str(&serde_json::to_string(&typed).unwrap()).unwrap();
        assert_eq!(back.dim(Dimension::Stat), Some("q50"));
        assert_eq!(back.metric(), Some(&FEATURE_VALUE));

        // A model-level metric drops the stream's version and signature.
        let sample = REQUEST_COUNT.sample(3.0).with(Dimension::Method, "predict").with(Dimension::Status, "200");
        let p = Point::from_sample(&sample, &scope, 60).unwrap();
        let keys: Vec<&str> = p.properties().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["what", "target_type", "model", "method", "status", "ver"]);
        assert_eq!(p.property("target_type"), Some("counter"));
        assert!(Point::from_sample(&REQUEST_COUNT.sample(f64::NAN), &scope, 60).is_none());
    }

    #[test]
    fn non_finite_values_are_never_emitted() {
        assert!(Point::builder("x", TargetType::Gauge, 0, f64::NAN).finish().is_none());
        assert!(Point::builder("x", TargetType::Gauge, 0, f64::INFINITY).finish().is_none());
    }

    #[test]
    fn long_values_and_keys_are_cut() {
        let long = "a".repeat(400);
        let p = Point::builder("x", TargetType::Counter, 0, 1.0).with(&long, &long).finish().unwrap();
        let (k, v) = &p.properties()[2];
        assert_eq!(k.len(), MAX_KEY_CHARS);
        assert_eq!(v.len(), MAX_VALUE_CHARS);
    }
}
