//! Reproducible Gaussian noise for the initial latents.
//!
//! How to use: `gaussian_noise(seed, n)` gives `n` standard-normal f32 values. The generator is SplitMix64 feeding a
//! Box–Muller transform in f64, so a seed gives the same noise on every platform and backend. (It cannot reproduce
//! torch's generator; to match a PyTorch run exactly, pass its noise to the pipeline instead.)

use rayon::prelude::*;

/// SplitMix64's state increment per draw (the golden ratio in 64 bits).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Normal pairs per parallel task of [`gaussian_noise`].
const PAIRS_PER_TASK: usize = 4096;

/// SplitMix64: a small, fast, well-distributed 64-bit generator.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The generator `draws` draws after [`new(seed)`](Self::new): the state only adds a constant per draw.
    pub fn skipped(seed: u64, draws: u64) -> Self {
        SplitMix64(seed.wrapping_add(draws.wrapping_mul(GOLDEN)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `(0, 1]` (never 0, so that its logarithm is finite).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// `n` independent standard-normal values from `seed`: Box–Muller pairs from consecutive draws, computed in parallel
/// runs of pairs, each starting its own generator at its first draw (the same values as one sequential generator).
pub fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n.div_ceil(2) * 2];
    out.par_chunks_mut(2 * PAIRS_PER_TASK).enumerate().for_each(|(task, chunk)| {
        let mut rng = SplitMix64::skipped(seed, (task * 2 * PAIRS_PER_TASK) as u64);
        for pair in chunk.chunks_exact_mut(2) {
            let (u1, u2) = (rng.next_open01(), rng.next_open01());
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u2;
            pair[0] = (r * theta.cos()) as f32;
            pair[1] = (r * theta.sin()) as f32;
        }
    });
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_reproducible_and_standard_normal() {
        let a = gaussian_noise(42, 100_001);
        assert_eq!(a, gaussian_noise(42, 100_001));
        assert_ne!(a[..10], gaussian_noise(43, 10)[..]);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean}, var {var}");
        assert!(a.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn parallel_noise_is_the_sequential_generator() {
        let n = 3 * 2 * PAIRS_PER_TASK + 5;
        let mut rng = SplitMix64::new(7);
        let mut want = Vec::new();
        while want.len() < n {
            let (u1, u2) = (rng.next_open01(), rng.next_open01());
            let (r, theta) = ((-2.0 * u1.ln()).sqrt(), 2.0 * std::f64::consts::PI * u2);
            want.extend([(r * theta.cos()) as f32, (r * theta.sin()) as f32]);
        }
        want.truncate(n);
        assert_eq!(gaussian_noise(7, n), want);
    }
}
