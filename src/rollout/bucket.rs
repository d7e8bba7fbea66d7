//! Sticky, monotone bucketing: which backend a key goes to.
//!
//! A key's bucket is a stable hash of (salt, key) into [0, 10000). The key goes to
//! `new` when its bucket is below `percent × 100`. Because the bucket does not depend
//! on the percentage, raising the percentage never moves a key from `new` back to
//! `legacy`, and lowering it moves only the keys above the new line.
//!
//! The hash is spelled out here (FNV-1a, then the splitmix64 finaliser for avalanche,
//! then Lemire's multiply-shift into the range) rather than taken from std, whose
//! hasher may change between Rust releases: buckets must be identical across
//! versions, machines and instances, or users would flip between backends on upgrade.

/// Number of buckets: percentages have a resolution of 0.01.
pub const BUCKETS: u32 = 10_000;

/// Why a number is not a [`Percent`].
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum InvalidPercent {
    #[error("percent must be between 0 and 100, got {0}")]
    OutOfRange(f64),
    #[error("percent moves in steps of 0.01, got {0}")]
    TooFine(f64),
}

/// A share of traffic in hundredths of a percent: 0 ..= 10000 (100.00%).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Percent(u32);

impl Percent {
    pub const ZERO: Percent = Percent(0);
    pub const ALL: Percent = Percent(BUCKETS);

    /// From a percentage such as `12.5`; it must be within 0..=100 in steps of 0.01.
    pub fn from_f64(p: f64) -> Result<Percent, InvalidPercent> {
        if !p.is_finite() || !(0.0..=100.0).contains(&p) {
            return Err(InvalidPercent::OutOfRange(p));
        }
        let hundredths = (p * 100.0).round();
        if ((p * 100.0) - hundredths).abs() > 1e-6 {
            return Err(InvalidPercent::TooFine(p));
        }
        Ok(Percent(hundredths as u32))
    }

    pub fn hundredths(self) -> u32 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

/// The stable bucket of `key` under `salt`, in [0, 10000).
pub fn bucket(salt: &str, key: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.bytes().chain(std::iter::once(0)).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser: similar keys ("user-1", "user-2") land far apart.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    ((u128::from(h) * u128::from(BUCKETS)) >> 64) as u32
}

/// Whether a key in `bucket` goes to `new` at `percent`.
pub fn in_new(bucket: u32, percent: Percent) -> bool {
    bucket < percent.hundredths()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> impl Iterator<Item = String> {
        (0..n).map(|i| format!("user-{i}"))
    }

    #[test]
    fn buckets_are_stable_across_releases() {
        // Pinned values: a change here moves real users between backends.
        assert_eq!(bucket("", ""), bucket("", ""));
        let pinned: Vec<u32> = ["alice", "bob", "session-42"]
            .iter()
            .map(|k| bucket("s1", k))
            .collect();
        assert_eq!(pinned, PINNED);
        assert_ne!(
            bucket("s1", "alice"),
            bucket("s2", "alice"),
            "the salt reshuffles"
        );
    }

    const PINNED: [u32; 3] = [PIN_ALICE, PIN_BOB, PIN_SESSION];
    const PIN_ALICE: u32 = 7497;
    const PIN_BOB: u32 = 5673;
    const PIN_SESSION: u32 = 9923;

    #[test]
    fn the_split_is_within_half_a_percent_over_100k_keys() {
        for p in [1.0, 10.0, 33.33, 50.0, 99.0] {
            let percent = Percent::from_f64(p).unwrap();
            let n = 100_000;
            let hits = keys(n)
                .filter(|k| in_new(bucket("salt", k), percent))
                .count();
            let share = hits as f64 * 100.0 / n as f64;
            assert!((share - p).abs() <= 0.5, "{p}%: got {share:.3}%");
        }
    }

    #[test]
    fn raising_the_percentage_keeps_every_key_already_in_new() {
        let ten = Percent::from_f64(10.0).unwrap();
        let fifty = Percent::from_f64(50.0).unwrap();
        for k in keys(100_000) {
            let b = bucket("salt", &k);
            if in_new(b, ten) {
                assert!(in_new(b, fifty), "{k} moved back to legacy");
            }
            // Lowering moves only keys above the new line.
            if !in_new(b, fifty) {
                assert!(!in_new(b, ten));
            }
        }
        assert!(in_new(0, Percent::ALL) && in_new(BUCKETS - 1, Percent::ALL));
        assert!(!in_new(0, Percent::ZERO));
    }

    #[test]
    fn percentages_are_validated() {
        assert_eq!(Percent::from_f64(12.34).unwrap().hundredths(), 1234);
        assert_eq!(Percent::from_f64(100.0).unwrap(), Percent::ALL);
        assert_eq!(
            Percent::from_f64(100.01),
            Err(InvalidPercent::OutOfRange(100.01))
        );
        assert!(Percent::from_f64(-1.0).is_err());
        assert_eq!(
            Percent::from_f64(1.005),
            Err(InvalidPercent::TooFine(1.005))
        );
        assert_eq!(
            InvalidPercent::TooFine(1.005).to_string(),
            "percent moves in steps of 0.01, got 1.005"
        );
        assert!(Percent::from_f64(f64::NAN).is_err());
    }
}
