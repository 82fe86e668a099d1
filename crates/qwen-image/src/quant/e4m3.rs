//! The e4m3 format (`float8_e4m3fn`: 4 exponent bits with bias 7, 3 mantissa bits, no infinities, `0x7F`/`0xFF` are
//! NaN, largest finite value 448) and per-row scaled quantization to it, on the host.
//!
//! Conversion is the `float8` crate's [`F8E4M3::from_f64`] (a port of CUDA's `__nv_cvt_double_to_fp8` with
//! `__NV_SATFINITE`: round to nearest, ties to even, subnormals kept, values beyond 448 saturate to ±448). It equals
//! PyTorch's `x.clamp(-448, 448).to(torch.float8_e4m3fn)` bit for bit (the clamp makes the saturation explicit:
//! older PyTorch casts made NaN of values rounding past 448); the fixture `tests/fixtures/fp8/e4m3.safetensors`
//! (`tools/fixtures/fp8.py`, checked by `tests/fp8.rs`) covers ties, subnormals, saturation and signed zeros.
//!
//! **Row scaling** (weights per output channel, activations per token): `scale = amax / 448` in f32 over the row
//! (`1` when that is below `f32::MIN_POSITIVE`, e.g. an all-zero row), then `q = e4m3(v / scale)` with the division in
//! f32; `v ≈ decode(q) · scale`.

use float8::F8E4M3;

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// `v` as e4m3 bits: round to nearest even, saturating at ±448 (NaN stays NaN).
pub fn encode(v: f32) -> u8 {
    F8E4M3::from_f64(f64::from(v)).to_bits()
}

/// The value of the e4m3 bits `bits` (exact in f32).
pub fn decode(bits: u8) -> f32 {
    F8E4M3::from_bits(bits).to_f32()
}

/// The values of all 256 bit patterns (`table[b] = decode(b)`): the lookup a device dequantizes with.
pub fn decode_table() -> [f32; 256] {
    std::array::from_fn(|b| decode(b as u8))
}

/// The scale of a row whose largest magnitude is `amax`: `amax / 448`, or 1 when that is not a positive normal f32
/// (an all-zero row, or values so small that every one quantizes to zero anyway).
pub fn row_scale(amax: f32) -> f32 {
    let scale = amax / E4M3_MAX;
    if scale >= f32::MIN_POSITIVE {
        scale
    } else {
        1.0
    }
}

/// A matrix quantized per row: e4m3 bits `[rows, cols]` row-major and one f32 scale per row.
#[derive(Clone, Debug, PartialEq)]
pub struct RowQuantized {
    /// e4m3 bits, row-major.
    pub bits: Vec<u8>,
    /// One scale per row.
    pub scales: Vec<f32>,
}

/// Quantizes the row-major `[rows, cols]` matrix `values` row by row (see the module docs).
pub fn quantize_rows(values: &[f32], cols: usize) -> RowQuantized {
    let rows = values.len().checked_div(cols).unwrap_or(0);
    let mut bits = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(rows);
    for row in values.chunks_exact(cols.max(1)).take(rows) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = row_scale(amax);
        bits.extend(row.iter().map(|&v| encode(v / scale)));
        scales.push(scale);
    }
    RowQuantized { bits, scales }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_pattern_round_trips_and_the_extremes_are_right() {
        for b in 0..=255u8 {
            let v = decode(b);
            if b & 0x7F == 0x7F {
                assert!(v.is_nan(), "{b:#04x}");
            } else if b == 0x80 {
                assert_eq!(encode(v), 0x80, "-0 keeps its sign");
            } else {
                assert_eq!(encode(v), b, "{b:#04x} = {v}");
            }
        }
        assert_eq!(decode(0x7E), E4M3_MAX);
        assert_eq!(decode(0x01), 2f32.powi(-9), "smallest subnormal");
        assert_eq!(decode(0x08), 2f32.powi(-6), "smallest normal");
    }

    #[test]
    fn rounding_is_to_nearest_even_and_saturates() {
        // Between 1 (0x38) and 1.125 (0x39): the tie goes to the even mantissa (1), just above it rounds up.
        assert_eq!(encode(1.0625), 0x38);
        assert_eq!(encode(1.0625f32.next_up()), 0x39);
        // Between 1.125 and 1.25 the tie goes up to the even 1.25 (0x3A).
        assert_eq!(encode(1.1875), 0x3A);
        // Subnormals: the tie between 2⁻⁹ and 2·2⁻⁹ goes to 2·2⁻⁹; half of the smallest subnormal rounds to 0.
        assert_eq!(encode(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(encode(0.5 * 2f32.powi(-9)), 0x00);
        assert_eq!(encode(-0.5 * 2f32.powi(-9)), 0x80);
        // Past 448 saturates (464 is the tie between 448 and the NaN pattern's 480), also infinities.
        for v in [449.0, 464.0, 465.0, 479.0, 480.0, 1e6, f32::INFINITY] {
            assert_eq!(encode(v), 0x7E, "{v}");
            assert_eq!(encode(-v), 0xFE, "-{v}");
        }
        assert_eq!(encode(f32::NAN) & 0x7F, 0x7F);
    }

    #[test]
    fn rows_are_scaled_by_their_largest_magnitude() {
        let q = quantize_rows(&[7.0, -14.0, 3.5, 0.0, 0.0, 0.0, 3.0, 3.0, -3.0], 3);
        assert_eq!(q.scales, vec![1.0 / 32.0, 1.0, 3.0 / 448.0]);
        // The largest magnitude of a row maps to ±448 exactly.
        assert_eq!(q.bits[1], 0xFE);
        assert_eq!(&q.bits[3..6], &[0, 0, 0]);
        assert_eq!(&q.bits[6..9], &[0x7E, 0x7E, 0xFE]);
        let back: Vec<f32> = q.bits[..3].iter().map(|&b| decode(b) * q.scales[0]).collect();
        assert_eq!(back, vec![7.0, -14.0, 3.5]);
        assert_eq!(quantize_rows(&[], 4), RowQuantized { bits: vec![], scales: vec![] });
    }
}
