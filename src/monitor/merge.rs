//! The one pattern of mergeable bucket state: every accumulator a closed bucket holds
//! (counts, moments, sketches, category and class counts, drift bins, CBPE sums) is
//! `Serialize + Deserialize` and implements `Merge`, so that the partial states of
//! one bucket written by several replicas add up to what one mltap seeing all the
//! traffic would have held. The fleet (`crate::fleet`) writes the `BucketState` of
//! each closed bucket (`monitor::engine`) and merges them; points are then computed
//! from the merged state by the same code as a single replica's.
//!
//! A new accumulator follows the pattern: derive (or write) serde, implement `Merge`
//! with exact arithmetic where the statistic is exact (sums, counts, min/max, Chan's
//! formula for moments), and document its error where it is estimated (sketches).

/// Folds another partial state of the same bucket into this one.
///
/// Merging is associative and commutative for the exact parts (counts, sums, means,
/// extremes), so the order in which replicas' partials are merged does not change
/// them; sketches merge within their documented accuracy.
pub trait Merge {
    fn merge(&mut self, other: &Self);
}

impl Merge for u64 {
    fn merge(&mut self, other: &Self) {
        *self += *other;
    }
}

impl<T: Merge + Clone> Merge for Option<T> {
    fn merge(&mut self, other: &Self) {
        match (self.as_mut(), other) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (None, Some(theirs)) => *self = Some(theirs.clone()),
            (_, None) => {}
        }
    }
}

/// Adds the counts of `other` to `mine`, key by key.
pub fn merge_maps<K: Ord + Clone, V: Merge + Clone>(
    mine: &mut std::collections::BTreeMap<K, V>,
    other: &std::collections::BTreeMap<K, V>,
) {
    for (key, value) in other {
        match mine.get_mut(key) {
            Some(v) => v.merge(value),
            None => {
                mine.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Serde of a map whose keys are not strings (tuples, enums) as a list of pairs, which
/// every format (JSON included) can carry.
pub mod pairs {
    use serde::de::Deserializer;
    use serde::ser::Serializer;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<K, V>, D::Error> {
        let list: Vec<(K, V)> = Vec::deserialize(deserializer)?;
        Ok(list.into_iter().collect())
    }
}
