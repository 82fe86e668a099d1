//! Activations between host and device in the model's dtype: the conversion to or from f32 happens on the host, so
//! only the model-dtype bytes cross the bus (half of f32's for bf16) and no cast kernel runs.
//!
//! How to use: [`upload_as`] puts host f32 values (pixels, image values) on the device as a `dtype` tensor without
//! copying them first; [`read_f32`] reads a tensor back as f32 values.
//!
//! Equivalence with an f32 transfer followed by a cast: bf16/f16 → f32 is exact, so [`read_f32`] always gives the
//! same values. f32 → bf16/f16 rounds to nearest even on the host (`half`'s `from_f32`), as CUDA's conversion
//! (`__float2bfloat16`) does: the same bits on the GPU (`pipeline_bench --stages` checks it). burn's CPU backend
//! (Flex) casts through f64 with `half`'s `from_f64`, which drops the lowest 3 mantissa bits of an f32 before
//! rounding, so it rounds values within 7 f32 ulps above a bf16 tie down to even where round-to-nearest rounds
//! them up; none of the values the pipeline uploads is such a value (the image processor's and the VAE input's 8-bit
//! levels; tested where they are made), so the CPU results do not change either.

use burn::tensor::{backend::Backend, bf16, f16, DType, Tensor, TensorData};
use half::vec::HalfBitsVecExt;
use rayon::prelude::*;

use crate::{ops::QwenBackend, ModelError, Result};

/// `values` (row-major, `shape`) as a `dtype` tensor on `device`, converted on the host and uploaded with
/// [`QwenBackend::upload_activation`] (a direct or staged copy on the CUDA fast path).
///
/// Panics if `values` does not fill `shape` (a caller's bug).
pub fn upload_as<B: QwenBackend, const D: usize>(
    values: &[f32],
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "{} values for the shape {shape:?}",
        values.len()
    );
    let data = match dtype {
        DType::BF16 => {
            let bits = convert_all(values, |v| bf16::from_f32(v).to_bits());
            TensorData::new(bits.reinterpret_into::<bf16>(), shape)
        }
        DType::F16 => {
            let bits = convert_all(values, |v| f16::from_f32(v).to_bits());
            TensorData::new(bits.reinterpret_into::<f16>(), shape)
        }
        DType::F32 => TensorData::new(values.to_vec(), shape),
        other => TensorData::new(values.to_vec(), shape).convert_dtype(other),
    };
    B::upload_activation(data, device)
}

/// Values per parallel task of the host conversions: large buffers (the 6.4 M values of a 1024² vision-language
/// image, ~10 ms on one core, most of it first touches of the new buffer) convert on rayon's threads.
const VALUES_PER_TASK: usize = 1 << 18;

/// `convert(v)` of every value, in runs of [`VALUES_PER_TASK`] on rayon's threads: f32 to a 16-bit float's bits on
/// upload, 16-bit floats to f32 on read-back.
fn convert_all<S: Copy + Sync, T: Copy + Default + Send>(values: &[S], convert: fn(S) -> T) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    out.par_chunks_mut(VALUES_PER_TASK)
        .zip(values.par_chunks(VALUES_PER_TASK))
        .for_each(|(o, v)| o.iter_mut().zip(v).for_each(|(o, &v)| *o = convert(v)));
    out
}

/// The values of `t` as f32, read back in the tensor's own dtype and converted on the host (16-bit floats on
/// rayon's threads).
pub fn read_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    let data = t.into_data();
    let err = |e| ModelError::invalid(format!("cannot read a tensor back: {e:?}"));
    match data.dtype {
        DType::BF16 => Ok(convert_all(data.as_slice::<bf16>().map_err(err)?, bf16::to_f32)),
        DType::F16 => Ok(convert_all(data.as_slice::<f16>().map_err(err)?, f16::to_f32)),
        _ => data.convert::<f32>().into_vec::<f32>().map_err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend as B;

    /// Values around the rounding cases of bf16/f16: ties, subnormals, signed zeros, large and small magnitudes (not
    /// the values just above a bf16 tie, which burn's CPU cast rounds differently: see the module docs).
    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..4096).map(|i| ((i as f32) * 0.754_321).sin() * 3.1).collect();
        v.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f80_4000),
            65504.0,
            1e-30,
            -2.5e-39,
            1e30,
        ]);
        v.extend((8..64).map(|i| f32::from_bits(0x3f80_8000 + i))); // above bf16 ties
        v.extend((1..64).map(|i| f32::from_bits(0x3f80_8000 - i))); // below bf16 ties
        v
    }

    #[test]
    fn host_rounding_is_round_to_nearest_even() {
        // 1 + 2⁻⁸ is halfway between bf16 1 and 1 + 2⁻⁷: to even (1); one f32 ulp more rounds up.
        assert_eq!(bf16::from_f32(f32::from_bits(0x3f80_8000)).to_bits(), 0x3f80);
        assert_eq!(bf16::from_f32(f32::from_bits(0x3f80_8001)).to_bits(), 0x3f81);
        assert_eq!(bf16::from_f32(f32::from_bits(0x3f81_8000)).to_bits(), 0x3f82);
    }

    #[test]
    fn upload_equals_an_f32_upload_and_a_cast_bit_for_bit() {
        let device = Default::default();
        let v = values();
        let shape = [1, v.len()];
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let fast = upload_as::<B, 2>(&v, shape, dtype, &device);
            let cast = Tensor::<B, 2>::from_data(TensorData::new(v.clone(), shape), (&device, DType::F32))
                .cast(dtype);
            assert_eq!(fast.dtype(), dtype);
            let (a, b) = (fast.into_data(), cast.into_data());
            let bytes = |d: &TensorData, i: usize| d.as_bytes()[i * dtype.size()..][..dtype.size()].to_vec();
            if let Some(i) = (0..v.len()).find(|&i| bytes(&a, i) != bytes(&b, i)) {
                panic!("{dtype:?}: {:e} uploads as {:?}, cast as {:?}", v[i], bytes(&a, i), bytes(&b, i));
            }
        }
    }

    #[test]
    fn large_buffers_convert_in_parallel_to_the_same_values() {
        let v: Vec<f32> =
            (0..4 * VALUES_PER_TASK + 12345).map(|i| ((i as f32) * 0.123_457).cos() * 7.0).collect();
        let shape = [1, v.len()];
        for dtype in [DType::BF16, DType::F16] {
            let t = upload_as::<B, 2>(&v, shape, dtype, &Default::default());
            let want = TensorData::new(v.clone(), shape).convert_dtype(dtype);
            assert_eq!(t.clone().into_data().as_bytes(), want.as_bytes(), "{dtype:?}");
            let back: Vec<f32> = want.convert::<f32>().to_vec().unwrap();
            assert_eq!(read_f32(t).unwrap(), back, "{dtype:?} read back");
        }
    }

    #[test]
    fn read_back_equals_a_cast_and_an_f32_read_bit_for_bit() {
        let device = Default::default();
        let v = values();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let t = upload_as::<B, 2>(&v, [1, v.len()], dtype, &device);
            let want: Vec<f32> = t.clone().cast(DType::F32).into_data().to_vec().unwrap();
            let got = read_f32(t).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
        }
    }
}
