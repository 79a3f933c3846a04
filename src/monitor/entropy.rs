//! The entropy of a row of probabilities, −Σ p·ln p in nats, with a natural logarithm
//! cheaper than libm's.
//!
//! Every prediction row of every exchange needs one `ln` per class (the statistics of
//! `prediction_entropy` are exact, computed from every exchange, not a sample), which
//! made libm's `log` a sixth of the aggregation thread's time. `ln` here does what
//! libm's does in fewer steps, without its special cases: x = 2^k · z with z in
//! [0.6875, 1.375) (no branch), z's top mantissa bits pick one of `TABLE_SIZE`
//! sub-intervals with a centre c, whose 1/c and ln c come from a table computed at
//! compile time, and ln z = ln c + ln(1 + r) with r = z/c − 1, |r| ≤ 2⁻⁸, from six
//! terms of its series. The sub-interval holding 1 has c = 1, so r = z − 1 is exact
//! there and values next to 1 keep their relative accuracy.
//!
//! Error: the series cut after r⁶/6 is off by at most |r|⁶/7 < 1e-15 relative, the
//! table and the rounding of r add a few ulps of ln c and of 1 against |ln x| ≥ 0.002
//! outside the central sub-interval. `ln_is_accurate_over_the_unit_interval` measures
//! the whole against libm over (0, 1] and every binade and holds it below
//! `MAX_RELATIVE_ERROR` (1e-12; measured about 6e-14).
//!
//! Every term −p·ln p of a row has the same sign, so the entropy's relative error is
//! at most the logarithm's: ten orders of magnitude below the quantile sketches'
//! relative accuracy (α = 0.01 by default) and far below the f32 precision (≈ 6e-8)
//! of the probabilities TF Serving sends.

/// The largest relative error of `ln` against libm's `f64::ln` over positive finite
/// arguments, as the tests check it.
pub const MAX_RELATIVE_ERROR: f64 = 1e-12;

/// Mantissa bits that pick a sub-interval.
const TABLE_BITS: u32 = 7;
/// Sub-intervals of [0.6875, 1.375).
const TABLE_SIZE: usize = 1 << TABLE_BITS;
/// One sub-interval's width in the bits of a float.
const STEP: u64 = 1 << (52 - TABLE_BITS);
/// The bits of the reduced range's start, moved back by half a sub-interval so that
/// 1.0 is the centre of one. Subtracting them from a float's bits leaves, in the
/// exponent field, the power of two k and, below it, the sub-interval's index.
const OFFSET: u64 = 0x3FE6_0000_0000_0000 - STEP / 2;
/// The exponent field of an f64.
const EXPONENT_FIELD: u64 = 0xFFF << 52;

/// Per sub-interval: 1/c and ln c of its centre c (c = 1 exactly for the one holding 1).
static TABLE: [(f64, f64); TABLE_SIZE] = table();

const fn table() -> [(f64, f64); TABLE_SIZE] {
    let mut table = [(0.0, 0.0); TABLE_SIZE];
    let mut i = 0;
    while i < TABLE_SIZE {
        let centre = f64::from_bits(OFFSET + i as u64 * STEP + STEP / 2);
        table[i] = (1.0 / centre, ln_slowly(centre));
        i += 1;
    }
    table
}

/// ln x for x in [0.6875, 1.375), to about an ulp: 2·atanh((x − 1)/(x + 1)) summed
/// until its terms vanish (|s| < 0.19, so a few dozen terms). For the table only.
const fn ln_slowly(x: f64) -> f64 {
    let s = (x - 1.0) / (x + 1.0);
    let z = s * s;
    let mut power = s;
    let mut sum = 0.0;
    let mut n = 1.0;
    while n < 80.0 {
        sum += power / n;
        power *= z;
        n += 2.0;
    }
    2.0 * sum
}

/// The natural logarithm of a positive number, within `MAX_RELATIVE_ERROR` of
/// `f64::ln`. Zero, subnormal, infinite and NaN arguments (never probabilities that
/// matter for entropy: a subnormal p contributes below 1e-305) go to libm.
#[inline]
pub fn ln(x: f64) -> f64 {
    if !(f64::MIN_POSITIVE..=f64::MAX).contains(&x) {
        return x.ln();
    }
    let bits = x.to_bits();
    let shifted = bits.wrapping_sub(OFFSET);
    let index = ((shifted / STEP) % TABLE_SIZE as u64) as usize;
    let k = (shifted as i64) >> 52;
    // z = x / 2^k: only the exponent bits change, so z is exact.
    let z = f64::from_bits(bits.wrapping_sub(shifted & EXPONENT_FIELD));
    let (inverse, ln_centre) = TABLE[index];
    let r = z * inverse - 1.0;
    let r2 = r * r;
    // ln(1 + r) = r − r²/2 + r³/3 − r⁴/4 + r⁵/5 − r⁶/6, grouped to shorten the chain.
    let ln_1p = r + r2 * (-0.5 + r * (1.0 / 3.0) + r2 * (-0.25 + r * 0.2 - r2 * (1.0 / 6.0)));
    (k as f64 * std::f64::consts::LN_2 + ln_centre) + ln_1p
}

/// One class's term of a row's entropy, −p·ln p; 0 for p = 0 (its limit) and for
/// anything that is not a positive probability.
#[inline]
pub fn term(p: f64) -> f64 {
    if p > 0.0 {
        -p * ln(p)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(x: f64) -> f64 {
        let exact = x.ln();
        let approx = ln(x);
        if exact == 0.0 {
            return approx.abs();
        }
        ((approx - exact) / exact).abs()
    }

    #[test]
    fn ln_is_accurate_over_the_unit_interval() {
        let mut worst = (0.0f64, 0.0f64);
        let mut check = |x: f64| {
            let e = relative_error(x);
            if e > worst.0 {
                worst = (e, x);
            }
        };
        // A dense grid of (0, 1], where probabilities live.
        for i in 1..=1_000_000u32 {
            check(f64::from(i) / 1_000_000.0);
        }
        // Next to 1 (where ln is tiny and cancellation would show), both sides.
        for k in 1..=52 {
            let d = 2f64.powi(-k);
            check(1.0 - d);
            check(1.0 + d);
            check(1.0 - d * 0.7);
        }
        // Every binade of normal floats, at its edges, at the reduction's boundaries
        // (0.6875 · 2^e and 1.375 · 2^e) and inside.
        for e in -1022..=1023 {
            let p = 2f64.powi(e);
            for x in [
                p,
                p * (1.0 + f64::EPSILON),
                p * (2.0 - f64::EPSILON),
                p * 0.6875,
                p * 1.375,
                p * 1.374_999_999_999_999,
                p * 1.234_567,
            ] {
                if x.is_normal() {
                    check(x);
                }
            }
        }
        // Probabilities as f32 values, what TF Serving's float outputs decode to.
        for i in 1..=100_000u32 {
            check(f64::from(i as f32 / 100_000.0));
        }
        assert!(worst.0 <= MAX_RELATIVE_ERROR, "relative error {:e} at x = {:e}", worst.0, worst.1);
        // Not a vacuous bound: the series is cut, so the error is not zero.
        assert!(worst.0 > 0.0);
    }

    #[test]
    fn the_table_holds_each_centre_s_inverse_and_logarithm() {
        let mut holds_one = 0;
        for (i, (inverse, ln_centre)) in TABLE.iter().enumerate() {
            let centre = f64::from_bits(OFFSET + i as u64 * STEP + STEP / 2);
            assert!((0.6875..1.375).contains(&centre), "{i}: {centre}");
            assert_eq!(*inverse, 1.0 / centre);
            let exact = centre.ln();
            assert!((ln_centre - exact).abs() <= 4.0 * f64::EPSILON * exact.abs(), "{i}: {ln_centre} vs {exact}");
            if centre == 1.0 {
                holds_one += 1;
                assert_eq!((*inverse, *ln_centre), (1.0, 0.0));
            }
        }
        assert_eq!(holds_one, 1);
    }

    #[test]
    fn ln_is_exact_at_one_and_at_powers_of_two_and_hands_other_arguments_to_libm() {
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.5), -std::f64::consts::LN_2);
        assert_eq!(ln(0.25), -2.0 * std::f64::consts::LN_2);
        assert_eq!(ln(1024.0), 10.0 * std::f64::consts::LN_2);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
        assert!(ln(f64::NAN).is_nan());
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
        let subnormal = f64::MIN_POSITIVE / 8.0;
        assert_eq!(ln(subnormal), subnormal.ln());
    }

    #[test]
    fn terms_are_those_of_the_entropy_and_zero_without_probability() {
        assert_eq!(term(0.0), 0.0);
        assert_eq!(term(-0.25), 0.0);
        assert_eq!(term(f64::NAN), 0.0);
        assert_eq!(term(1.0), 0.0);
        for p in [1e-300f64, 1e-9, 0.01, 0.2, 0.5, 0.75, 1.0 - 1e-9] {
            let exact = -p * p.ln();
            assert!(((term(p) - exact) / exact).abs() <= MAX_RELATIVE_ERROR, "p = {p}");
        }
        // A uniform row over k classes has entropy ln k.
        let uniform: f64 = (0..5).map(|_| term(0.2)).sum();
        assert!((uniform - 5f64.ln()).abs() <= 5f64.ln() * MAX_RELATIVE_ERROR);
    }
}
