//! Drift measures between a reference distribution and a bucket's: the population
//! stability index (PSI), the Jensen-Shannon divergence (base 2, in [0, 1]) and the
//! L∞ distance of frequencies, plus the reference bins of numeric features.
//!
//! Numeric bins are fixed from the reference alone (its min, deciles and max, so ten
//! inner bins plus one below the reference's min and one above its max); nothing here
//! depends on the current window, so successive buckets are comparable.

/// Frequencies below this are raised to it in PSI, whose terms are infinite for an
/// empty bin on either side (the usual 0.0001 of credit-scoring practice).
pub const PSI_EPSILON: f64 = 1e-4;

/// The bin edges of one numeric feature: sorted, distinct `[min, d1, ..., d9, max]`
/// of the reference (ties between deciles collapse). Bins are: below `min`; one
/// half-open `[e_i, e_{i+1})` per pair of edges, the last one closed at `max`; above
/// `max`. A constant reference has the bins below, equal, above.
pub fn decile_edges(sample: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = sample.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return Vec::new();
    }
    sorted.sort_unstable_by(f64::total_cmp);
    let n = sorted.len();
    let mut edges = Vec::with_capacity(11);
    for decile in 0..=10 {
        // The lower empirical quantile: rank floor(q·(n-1)), as the sketches report.
        let rank = (decile * (n - 1)) / 10;
        let v = sorted[rank];
        if edges.last() != Some(&v) {
            edges.push(v);
        }
    }
    edges
}

/// Bins for a set of edges (see `decile_edges`): inner bins plus the two outer ones.
pub fn bin_count(edges: &[f64]) -> usize {
    inner_bins(edges) + 2
}

fn inner_bins(edges: &[f64]) -> usize {
    edges.len().saturating_sub(1).max(1)
}

/// The bin of a finite value (see `decile_edges`).
pub fn bin_of(edges: &[f64], v: f64) -> usize {
    let (Some(first), Some(last)) = (edges.first(), edges.last()) else {
        return 0;
    };
    if v < *first {
        return 0;
    }
    let inner = inner_bins(edges);
    if v > *last {
        return inner + 1;
    }
    // The edges are sorted and at most 11, so counting those at or below `v` finds
    // the same bin as a binary search, without its unpredictable branches (this runs
    // once per value).
    let at_or_below: usize = edges.iter().map(|e| usize::from(*e <= v)).sum();
    at_or_below.min(inner)
}

/// Counts per bin of the finite values of a sample.
pub fn histogram(edges: &[f64], values: &[f64]) -> Vec<u64> {
    let mut counts = vec![0u64; bin_count(edges)];
    for &v in values {
        if v.is_finite() {
            counts[bin_of(edges, v)] += 1;
        }
    }
    counts
}

/// Counts as frequencies; None when there is nothing to compare.
pub fn frequencies(counts: &[u64]) -> Option<Vec<f64>> {
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| counts.iter().map(|c| *c as f64 / total as f64).collect())
}

/// PSI = Σ (cur - ref) · ln(cur / ref), with frequencies floored at `PSI_EPSILON`.
pub fn psi(reference: &[f64], current: &[f64]) -> f64 {
    reference
        .iter()
        .zip(current)
        .map(|(r, c)| {
            let (r, c) = (r.max(PSI_EPSILON), c.max(PSI_EPSILON));
            (c - r) * (c / r).ln()
        })
        .sum::<f64>()
        .max(0.0)
}

/// Jensen-Shannon divergence in bits: ½ KL(ref ‖ m) + ½ KL(cur ‖ m), m the average;
/// 0 for identical distributions, 1 for disjoint ones.
pub fn js(reference: &[f64], current: &[f64]) -> f64 {
    let mut total = 0.0;
    for (r, c) in reference.iter().zip(current) {
        let m = (r + c) / 2.0;
        if *r > 0.0 {
            total += 0.5 * r * (r / m).log2();
        }
        if *c > 0.0 {
            total += 0.5 * c * (c / m).log2();
        }
    }
    total.clamp(0.0, 1.0)
}

/// L∞ distance: the largest absolute difference of frequencies.
pub fn linf(reference: &[f64], current: &[f64]) -> f64 {
    reference.iter().zip(current).map(|(r, c)| (r - c).abs()).fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deciles_give_ten_inner_bins_and_two_outer_ones() {
        let sample: Vec<f64> = (0..=100).map(f64::from).collect();
        let edges = decile_edges(&sample);
        assert_eq!(edges, vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]);
        assert_eq!(bin_count(&edges), 12);
        assert_eq!(bin_of(&edges, -1.0), 0);
        assert_eq!(bin_of(&edges, 0.0), 1);
        assert_eq!(bin_of(&edges, 9.99), 1);
        assert_eq!(bin_of(&edges, 10.0), 2);
        assert_eq!(bin_of(&edges, 100.0), 10);
        assert_eq!(bin_of(&edges, 100.5), 11);
    }

    /// The bin as the half-open intervals of `decile_edges` define it, written
    /// naively: below the first edge, `[e_i, e_{i+1})`, the last one closed, above.
    fn bin_by_definition(edges: &[f64], v: f64) -> usize {
        let inner = edges.len().saturating_sub(1).max(1);
        if v < edges[0] {
            return 0;
        }
        if v > edges[edges.len() - 1] {
            return inner + 1;
        }
        (0..edges.len().saturating_sub(1)).find(|&i| v < edges[i + 1]).map_or(inner, |i| i + 1)
    }

    proptest::proptest! {
        #[test]
        fn counting_edges_finds_the_bin_of_the_definition(
            sample in proptest::collection::vec(-1e6f64..1e6, 1..200),
            probes in proptest::collection::vec(-2e6f64..2e6, 1..50),
        ) {
            let edges = decile_edges(&sample);
            for v in probes.iter().copied().chain(edges.iter().copied()) {
                proptest::prop_assert_eq!(bin_of(&edges, v), bin_by_definition(&edges, v), "v = {}", v);
            }
        }
    }

    #[test]
    fn a_constant_reference_has_three_bins() {
        let edges = decile_edges(&[3.0; 50]);
        assert_eq!(edges, vec![3.0]);
        assert_eq!(histogram(&edges, &[2.0, 3.0, 3.0, 4.0]), vec![1, 2, 1]);
    }

    #[test]
    fn hand_computed_divergences() {
        let r = [0.5, 0.5];
        let c = [0.9, 0.1];
        let expected_psi = (0.9 - 0.5) * (0.9f64 / 0.5).ln() + (0.1 - 0.5) * (0.1f64 / 0.5).ln();
        assert!((psi(&r, &c) - expected_psi).abs() < 1e-12);
        assert_eq!(psi(&r, &r), 0.0);
        assert_eq!(js(&r, &r), 0.0);
        assert!((js(&[1.0, 0.0], &[0.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!((linf(&r, &c) - 0.4).abs() < 1e-12);
    }
}
