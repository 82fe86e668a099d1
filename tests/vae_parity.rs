//! VAE parity against diffusers (fixtures from `tools/fixtures/vae.py`): posterior mode and decode in f32 and bf16,
//! the tiled modes, the pipeline's latent normalization, the `vae` example's code path on a held-out checkpoint, and
//! clear errors for bad inputs and mismatched checkpoints.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor, TensorData};
use qwen_image::{
    tensor_io::{rel_l2, to_f32_vec, write_f32, TensorFile},
    vae::{AutoencoderKLQwenImage, TileConfig},
    CpuBackend, ModelError,
};
use qwen_image_edit::reference::vae_file;

type B = CpuBackend;

/// diffusers' tiling of the `tiny` fixture: 32-pixel tiles every 16 pixels.
const FIXTURE_TILES: TileConfig = TileConfig { tile: 32, overlap: 16 };

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae").join(case)
}

fn load(case: &str, dtype: DType) -> AutoencoderKLQwenImage<B> {
    AutoencoderKLQwenImage::load(&case_dir(case).join("vae"), dtype, &Default::default()).unwrap()
}

fn fixture(case: &str, file: &str, name: &str) -> (Vec<f32>, Vec<usize>) {
    TensorFile::open(&case_dir(case).join(file)).unwrap().f32(name).unwrap()
}

/// `name` of a fixture file as a 4-D tensor (the frame axis of diffusers' 5-D tensors dropped).
fn frame(case: &str, file: &str, name: &str, dtype: DType) -> Tensor<B, 4> {
    let (values, shape) = fixture(case, file, name);
    let dims = [shape[0], shape[1], shape[shape.len() - 2], shape[shape.len() - 1]];
    Tensor::<B, 4>::from_data(TensorData::new(values, dims), (&Default::default(), DType::F32)).cast(dtype)
}

/// Runs the example's code path and returns output `name` with its shape.
fn run_file(
    model: &AutoencoderKLQwenImage<B>,
    case: &str,
    tiles: Option<&TileConfig>,
    name: &str,
) -> Vec<f32> {
    let outputs = vae_file(model, &case_dir(case).join("inputs.safetensors"), tiles).unwrap();
    let (_, values, shape) = outputs.into_iter().find(|(n, _, _)| *n == name).unwrap();
    let want = fixture(case, "expected.safetensors", name).1;
    assert_eq!(shape, want, "{case} {name}: shape");
    values
}

#[test]
fn encode_mode_and_decode_match_diffusers_f32() {
    let model = load("tiny", DType::F32);
    for name in ["latent_mode", "decoded"] {
        let out = run_file(&model, "tiny", None, name);
        let err = rel_l2(&out, &fixture("tiny", "expected.safetensors", name).0);
        println!("tiny f32 {name}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{name}: relative L2 error {err:.3e} > 1e-4");
    }
}

#[test]
fn encode_mode_and_decode_match_diffusers_bf16() {
    // bf16 weights and activations against diffusers run in bf16.
    let model = load("tiny", DType::BF16);
    assert_eq!(model.dtype(), DType::BF16);
    for name in ["latent_mode", "decoded"] {
        let out = run_file(&model, "tiny", None, name);
        let err = rel_l2(&out, &fixture("tiny", "expected_bf16.safetensors", name).0);
        let f32_ref = rel_l2(&out, &fixture("tiny", "expected.safetensors", name).0);
        println!("tiny bf16 {name}: rel L2 {err:.2e} (vs the f32 reference: {f32_ref:.2e})");
        assert!(err <= 2e-2, "{name}: bf16 relative L2 error {err:.3e} > 2e-2");
    }
}

#[test]
fn latent_normalization_matches_the_pipeline() {
    for (dtype, file, tol) in
        [(DType::F32, "expected.safetensors", 1e-6), (DType::BF16, "expected_bf16.safetensors", 1e-2)]
    {
        let model = load("tiny", dtype);
        let mode = frame("tiny", file, "latent_mode", dtype);
        let latents = frame("tiny", "inputs.safetensors", "latents", dtype);
        let normalized = model.normalize_latents(mode.clone()).unwrap();
        assert_eq!(normalized.dtype(), dtype);
        let err = rel_l2(&to_f32_vec(normalized.clone()), &fixture("tiny", file, "normalized").0);
        println!("{dtype:?} normalize: rel L2 {err:.2e}");
        assert!(err <= tol, "{dtype:?} normalize: {err:.3e}");
        let err = rel_l2(
            &to_f32_vec(model.denormalize_latents(latents).unwrap()),
            &fixture("tiny", file, "denormalized").0,
        );
        println!("{dtype:?} denormalize: rel L2 {err:.2e}");
        assert!(err <= tol, "{dtype:?} denormalize: {err:.3e}");
        if dtype == DType::F32 {
            let back = to_f32_vec(model.denormalize_latents(normalized).unwrap());
            assert!(rel_l2(&back, &to_f32_vec(mode)) < 1e-6);
        }
    }
}

#[test]
fn tiled_modes_match_diffusers_tiling() {
    let model = load("tiny", DType::F32);
    for name in ["latent_mode", "decoded"] {
        let out = run_file(&model, "tiny", Some(&FIXTURE_TILES), name);
        let err = rel_l2(&out, &fixture("tiny", "expected.safetensors", &format!("{name}_tiled")).0);
        println!("tiny tiled {name}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "tiled {name}: relative L2 error {err:.3e} > 1e-4");
    }
}

#[test]
fn tiled_vs_untiled_difference() {
    // The tiny random VAE is not an autoencoder and its middle block attends globally, so tiling changes the result
    // far more than it does for the trained model; this reports the size and checks the plumbing.
    let model = load("tiny", DType::F32);
    let image = frame("tiny", "inputs.safetensors", "image", DType::F32);
    let latents = frame("tiny", "inputs.safetensors", "latents", DType::F32);
    let mode = to_f32_vec(model.encode_mode(image.clone()).unwrap());
    let decoded = to_f32_vec(model.decode(latents.clone()).unwrap());
    for (tile, overlap) in [(32, 16), (48, 16), (48, 24), (24, 0)] {
        let tiles = TileConfig::new(tile, overlap).unwrap();
        let tiled_mode = model.encode_mode_tiled(image.clone(), &tiles).unwrap();
        let tiled_dec = model.decode_tiled(latents.clone(), &tiles).unwrap();
        assert_eq!(tiled_mode.dims(), [2, 4, 5, 7]);
        assert_eq!(tiled_dec.dims(), [2, 3, 40, 56]);
        let tiled_dec = to_f32_vec(tiled_dec);
        assert!(tiled_dec.iter().all(|v| (-1.0..=1.0).contains(v)));
        let (e_enc, e_dec) = (rel_l2(&to_f32_vec(tiled_mode), &mode), rel_l2(&tiled_dec, &decoded));
        println!(
            "tile {tile} overlap {overlap}: tiled vs untiled rel L2: encode {e_enc:.3e}, decode {e_dec:.3e}"
        );
        assert!(e_enc > 1e-3 && e_dec > 1e-3, "{tile}/{overlap}: the image was not tiled");
        // Closer to the untiled result than the untiled result is to zero.
        assert!(e_enc < 1.0 && e_dec < 1.0, "{tile}/{overlap}: tiled output is off the untiled scale");
    }
    // A tile that covers the image is the untiled computation.
    let whole = TileConfig::new(64, 16).unwrap();
    assert_eq!(to_f32_vec(model.encode_mode_tiled(image, &whole).unwrap()), mode);
    assert_eq!(to_f32_vec(model.decode_tiled(latents, &whole).unwrap()), decoded);
}

#[test]
fn the_example_path_matches_diffusers_on_the_heldout_checkpoint() {
    // bf16 checkpoint, another config (z_dim 16, odd channel counts, temperal_downsample [T, F, T]), 4-D inputs.
    let model = load("heldout", DType::F32);
    assert_eq!(model.z_dim(), 16);
    for name in ["latent_mode", "decoded"] {
        let out = run_file(&model, "heldout", None, name);
        let err = rel_l2(&out, &fixture("heldout", "expected.safetensors", name).0);
        println!("heldout {name}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "heldout {name}: relative L2 error {err:.3e} > 1e-4");
    }
}

fn expect_invalid<T: std::fmt::Debug>(result: Result<T, ModelError>, needle: &str) {
    let err = result.unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains(needle), "`{err}` does not mention `{needle}`");
}

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen-vae-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = load("tiny", DType::F32);
    let dev = Default::default();
    expect_invalid(model.encode_mode(Tensor::zeros([1, 3, 36, 56], &dev)), "multiples of 8");
    expect_invalid(model.encode_mode(Tensor::zeros([1, 3, 40, 60], &dev)), "multiples of 8");
    expect_invalid(model.encode_mode(Tensor::zeros([1, 4, 40, 56], &dev)), "[batch ≥ 1, 3, height, width]");
    expect_invalid(
        model.encode_mode_tiled(Tensor::zeros([1, 3, 12, 16], &dev), &FIXTURE_TILES),
        "multiples of 8",
    );
    expect_invalid(model.decode(Tensor::zeros([1, 16, 5, 7], &dev)), "[batch ≥ 1, 4, height ≥ 1, width ≥ 1]");
    expect_invalid(model.normalize_latents(Tensor::zeros([1, 3, 5, 7], &dev)), "expected [batch ≥ 1, 4");
    let bad_tiles = TileConfig { tile: 36, overlap: 8 };
    expect_invalid(model.decode_tiled(Tensor::zeros([1, 4, 5, 7], &dev), &bad_tiles), "multiple of 8");
    expect_invalid(TileConfig::new(32, 24), "at most half the tile");

    // The example's reader: wrong ranks, pixel ranges and empty files.
    let dir = tmp_dir("inputs");
    type Tensors = Vec<(&'static str, Vec<f32>, Vec<usize>)>;
    let cases: [(&str, Tensors, &str); 4] = [
        (
            "rank3",
            vec![("image", vec![0.0; 3 * 8 * 8], vec![3, 8, 8])],
            "expected [batch, channels, height, width]",
        ),
        ("frames", vec![("latents", vec![0.0; 2 * 4 * 2], vec![1, 4, 2, 1, 2])], "(one frame)"),
        ("range", vec![("image", vec![200.0; 3 * 8 * 8], vec![1, 3, 8, 8])], "[-1, 1]"),
        ("empty", vec![("noise", vec![0.0], vec![1])], "neither `image` nor `latents`"),
    ];
    for (name, tensors, needle) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        write_f32(&path, &tensors).unwrap();
        expect_invalid(vae_file(&model, &path, None), needle);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Copies the `tiny` checkpoint to `dir`, passing each tensor through `edit` (`None` drops it), adding `extra`, and
/// passing the config text through `config`.
fn rewrite_with(
    dir: &Path,
    config: impl Fn(String) -> String,
    edit: impl Fn(&str, Vec<f32>, &[usize]) -> Option<Vec<f32>>,
    extra: Vec<(&str, Vec<f32>, Vec<usize>)>,
) {
    let src = case_dir("tiny").join("vae");
    let file = TensorFile::open(&src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let (values, shape) = file.f32(name).unwrap();
        if let Some(values) = edit(name, values, &shape) {
            tensors.push((name, values, shape));
        }
    }
    tensors.extend(extra);
    std::fs::create_dir_all(dir).unwrap();
    write_f32(&dir.join("diffusion_pytorch_model.safetensors"), &tensors).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config(std::fs::read_to_string(src.join("config.json")).unwrap()),
    )
    .unwrap();
}

fn rewrite(
    dir: &Path,
    config: impl Fn(String) -> String,
    edit: impl Fn(&str, Vec<f32>, &[usize]) -> Option<Vec<f32>>,
) {
    rewrite_with(dir, config, edit, Vec::new());
}

fn load_dir(dir: &Path) -> Result<AutoencoderKLQwenImage<B>, ModelError> {
    AutoencoderKLQwenImage::load(dir, DType::F32, &Default::default())
}

#[test]
fn mismatched_checkpoints_are_clear_errors() {
    let dir = tmp_dir("mismatch");
    let same = |c: String| c;
    let keep = |_: &str, v: Vec<f32>, _: &[usize]| Some(v);

    // A dropped tensor is reported by name.
    rewrite(&dir, same, |k, v, _| (k != "decoder.conv_out.bias").then_some(v));
    let err = load_dir(&dir).unwrap_err();
    assert!(matches!(err, ModelError::MissingKey { ref key, .. } if key == "decoder.conv_out.bias"), "{err}");

    // time_conv is skipped, but only where the config says it exists.
    rewrite(&dir, same, |k, v, _| (k != "encoder.down_blocks.5.time_conv.weight").then_some(v));
    let err = load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingKey { ref key, .. } if key.ends_with("time_conv.weight")),
        "{err}"
    );
    rewrite(&dir, |c| c.replace("true", "false"), keep);
    let err = load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, ModelError::UnexpectedKeys { .. }) && err.to_string().contains("time_conv"),
        "{err}"
    );

    // A tensor the model does not have.
    rewrite_with(&dir, same, keep, vec![("decoder.extra.weight", vec![1.0], vec![1])]);
    let err = load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, ModelError::UnexpectedKeys { .. }) && err.to_string().contains("decoder.extra.weight"),
        "{err}"
    );

    // Another width: a shape mismatch naming the key and both shapes.
    rewrite(&dir, |c| c.replace("\"base_dim\": 4", "\"base_dim\": 8"), keep);
    let err = load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, ModelError::ShapeMismatch { ref key, .. } if key == "encoder.conv_in.weight"),
        "{err}"
    );
    assert!(
        err.to_string().contains("[4, 3, 3, 3, 3]") && err.to_string().contains("[8, 3, 3, 3, 3]"),
        "{err}"
    );

    // Fewer residual blocks than the checkpoint holds.
    rewrite(&dir, |c| c.replace("\"num_res_blocks\": 2", "\"num_res_blocks\": 1"), keep);
    assert!(load_dir(&dir).is_err());

    // A config of another model, and no config at all.
    rewrite(&dir, |c| c.replace("AutoencoderKLQwenImage", "AutoencoderKLWan"), keep);
    let err = load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, ModelError::Config { .. }) && err.to_string().contains("AutoencoderKLWan"),
        "{err}"
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(matches!(load_dir(&dir).unwrap_err(), ModelError::Io { .. }));
    std::fs::remove_dir_all(&dir).ok();
}

/// Relative errors of encode and decode of a model loaded from `dir` against the f32 reference.
fn errors_of(dir: &Path) -> (f64, f64) {
    let model = load_dir(dir).unwrap();
    let enc = rel_l2(
        &run_file(&model, "tiny", None, "latent_mode"),
        &fixture("tiny", "expected.safetensors", "latent_mode").0,
    );
    let dec = rel_l2(
        &run_file(&model, "tiny", None, "decoded"),
        &fixture("tiny", "expected.safetensors", "decoded").0,
    );
    (enc, dec)
}

#[test]
fn the_fixtures_catch_the_likely_mistakes() {
    let dir = tmp_dir("sensitivity");

    // Using the first temporal slice of the 3-D kernels instead of the last: swap them in the checkpoint.
    rewrite(
        &dir,
        |c| c,
        |_, mut v, shape| {
            if let &[o, i, kt, kh, kw] = shape {
                let plane = kh * kw;
                for pair in 0..o * i {
                    let base = pair * kt * plane;
                    for p in 0..plane {
                        v.swap(base + p, base + (kt - 1) * plane + p);
                    }
                }
            }
            Some(v)
        },
    );
    let (enc, dec) = errors_of(&dir);
    println!("first temporal slice: encode {enc:.2e}, decode {dec:.2e}");
    assert!(
        enc > 1e-2 && dec > 1e-2,
        "the first temporal slice changed the outputs by only {enc:.2e} / {dec:.2e}"
    );

    // Dropping the √C factor of the RMS norm: divide every γ by √C.
    rewrite(
        &dir,
        |c| c,
        |k, v, shape| {
            let scale = if k.ends_with("gamma") { 1.0 / (shape[0] as f32).sqrt() } else { 1.0 };
            Some(v.into_iter().map(|x| x * scale).collect())
        },
    );
    let (enc, dec) = errors_of(&dir);
    println!("without √C: encode {enc:.2e}, decode {dec:.2e}");
    assert!(enc > 1e-2 && dec > 1e-2, "dropping √C changed the outputs by only {enc:.2e} / {dec:.2e}");
    std::fs::remove_dir_all(&dir).ok();
}
