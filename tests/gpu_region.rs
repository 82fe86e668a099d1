//! GPU check of target-token subsets (feature `cuda`; needs an NVIDIA GPU, so CI only compiles it): on the tiny DiT
//! fixtures, a step computing a third of the target tokens, the rest attending as the target's cached K/V, stays on
//! the fast path (segmented flash attention, no fallbacks) and matches the full pass on the GPU and the same subset
//! step on the CPU.
//!
//! ```text
//! CARGO_TARGET_DIR=target/cuda cargo test --release --features cuda --test gpu_region --no-run
//! LD_LIBRARY_PATH=/usr/local/cuda/lib64 <binary> --test-threads=1 --nocapture
//! ```
#![cfg(feature = "cuda")]

use std::path::Path;

use burn::tensor::DType;
use qwen_image::{
    cuda::{self, CudaBackend, CudaDevice},
    dit::{DitInput, QwenImageTransformer},
    ops::QwenBackend,
    tensor_io::{rel_l2, to_f32_vec, TensorFile},
    CpuBackend,
};
use qwen_image_edit::reference::read_dit_input;
use qwen_image_pruning::{
    full_cache_plan, GroupAction, GroupPlan, LayerPlan, ReuseMode, StepPlan, TokenPruningCache,
};

/// A full caching step, then a subset step of every third target token on the same input; both predictions.
fn full_then_subset<B: QwenBackend>(
    model: &QwenImageTransformer<B>,
    input: &DitInput<B>,
    mode: ReuseMode,
) -> (Vec<f32>, Vec<f32>) {
    let layout = input.layout();
    let (layers, n) = (model.num_layers(), layout.condition_tokens.len());
    let subset: Vec<u32> = (0..layout.target_tokens as u32).filter(|i| i % 3 == 1).collect();
    let layer = LayerPlan {
        target: GroupPlan::subset(subset, mode),
        ..LayerPlan::with_conditions(n, GroupAction::Reuse(mode))
    };
    let mut cache = TokenPruningCache::new();
    let (full, _) = model.forward_planned(input, &full_cache_plan(layers, n), 0, &mut cache).unwrap();
    let (sub, _) = model.forward_planned(input, &StepPlan::new(vec![layer; layers]), 1, &mut cache).unwrap();
    (to_f32_vec(full), to_f32_vec(sub))
}

#[test]
fn target_subsets_on_the_gpu_match_the_full_pass_and_the_cpu() {
    let dev = CudaDevice::new(0);
    cuda::configure_runtime_caches(None).expect("kernel cache folder");
    for case in ["plain", "zero_cond"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit").join(case);
        let file = TensorFile::open(&dir.join("inputs.safetensors")).unwrap();
        let gpu =
            QwenImageTransformer::<CudaBackend>::load(&dir.join("transformer"), DType::BF16, &dev).unwrap();
        let cpu = QwenImageTransformer::<CpuBackend>::load(
            &dir.join("transformer"),
            DType::BF16,
            &Default::default(),
        )
        .unwrap();
        let gpu_input = read_dit_input::<CudaBackend>(&file, &dev).unwrap();
        let cpu_input = read_dit_input::<CpuBackend>(&file, &Default::default()).unwrap();
        for mode in [ReuseMode::KeyValue, ReuseMode::RecomputeKeyValue] {
            cuda::reset_stats(&dev);
            let (full, sub) = full_then_subset(&gpu, &gpu_input, mode);
            let stats =
                CudaBackend::fast_path_report(&dev).expect("the CUDA backend reports its fast path").kinds;
            // GEMMs, attention and glue ran fast (a bf16 DiT has no FP8 layer and no convolution); nothing fell back.
            let ran = |kind: &str| stats.iter().any(|k| k.kind == kind && k.calls > 0);
            assert!(
                ["gemm", "attention", "glue"].into_iter().all(ran),
                "{case} {mode:?}: not all on the fast path: {stats:?}"
            );
            assert!(stats.iter().all(|k| k.fallbacks == 0), "{case} {mode:?}: fallbacks {stats:?}");
            let (_, cpu_sub) = full_then_subset(&cpu, &cpu_input, mode);
            assert!(sub.iter().all(|v| v.is_finite()), "{case} {mode:?}: non-finite outputs");
            let (vs_full, vs_cpu) = (rel_l2(&sub, &full), rel_l2(&sub, &cpu_sub));
            println!("{case} {mode:?}: subset step vs full pass {vs_full:.2e}, GPU vs CPU {vs_cpu:.2e}");
            assert!(vs_full <= 2e-2 && vs_cpu <= 2e-2, "{case} {mode:?}: {vs_full:.3e} / {vs_cpu:.3e}");
        }
    }
}
