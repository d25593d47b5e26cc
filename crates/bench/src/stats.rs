//! Percentiles over a sorted list of latencies (nearest-rank: the value below which `p`% of
//! the samples fall), medians and rates.

use std::time::Duration;

/// The median (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The item whose `key` is the median of all (the lower one for an even count), e.g. the
/// round whose warren/raw ratio is the median.
pub fn median_by<T>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = v.len().saturating_sub(1) / 2;
    v.into_iter().nth(mid)
}

/// Of `(raw, warren)` pairs measured side by side, the one whose ratio `warren / raw` is
/// the median.
pub fn median_ratio(pairs: Vec<(f64, f64)>) -> Option<(f64, f64)> {
    median_by(pairs, |(r, w)| w / r.max(1e-9))
}

/// `n` things in `took`, per second.
#[allow(clippy::cast_precision_loss)]
pub fn per_sec(n: u64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(1e-9)
}

/// The `p`-th percentile (0 < p <= 100) of `samples`, in microseconds; sorts them first.
pub fn percentile_us(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let n = samples.len();
    // nearest rank: ceil(p/100 * n), 1-based
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    let idx = rank.clamp(1, n) - 1;
    samples[idx].as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert!((percentile_us(&mut v, 50.0) - 50.0).abs() < 1e-6);
        assert!((percentile_us(&mut v, 99.0) - 99.0).abs() < 1e-6);
        assert!((percentile_us(&mut v, 100.0) - 100.0).abs() < 1e-6);
        assert!((percentile_us(&mut [], 50.0)).abs() < 1e-6);
        let mut one = [Duration::from_micros(7)];
        assert!((percentile_us(&mut one, 99.0) - 7.0).abs() < 1e-6);
    }
}
