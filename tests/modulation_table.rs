//! The DiT's modulation table end to end on the CPU (fixtures from `tools/fixtures/dit.py`): denoising under `none`,
//! `cat` and true CFG in table mode is bit-identical to the resident model computing its rows in every forward pass
//! (Edit and `zero_cond_t` configs); a LoRA on the modulation layers, merged or attached, reaches the table and
//! gives the resident model's output; the pipeline keeps its table across edits.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor};
use qwen_image::{
    dit::{DitLoadOptions, ModulationMode, ModulationTable, QwenImageTransformer},
    tensor_io::{rel_l2, to_f32_vec, write_f32, TensorFile},
    CpuBackend,
};
use qwen_image_edit::reference::{read_dit_input, read_img_shapes};
use qwen_image_pipeline::{
    demo, denoise, lora::LoraWeights, DenoiseCaches, DenoiseInputs, EditRequest, LoadOptions, NoProgress,
    QwenImageEditPipeline, Snapshot, Stage, TextConditioning,
};
use qwen_image_pruning::ScheduleSpec;

type B = CpuBackend;

const CASES: [&str; 2] = ["plain", "zero_cond"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit").join(case)
}

fn load(case: &str, modulation: ModulationMode) -> QwenImageTransformer<B> {
    let dir = case_dir(case).join("transformer");
    QwenImageTransformer::load_with(
        &dir,
        DType::F32,
        &DitLoadOptions { modulation, ..Default::default() },
        &Default::default(),
    )
    .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen-modulation-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The fixture's denoising inputs, with a negative prompt (the prompt embeddings mirrored) for CFG at `cfg`.
fn denoise_inputs(case: &str, cfg: Option<f32>) -> DenoiseInputs<B> {
    let file = TensorFile::open(&case_dir(case).join("denoise_inputs.safetensors")).unwrap();
    let dev = Default::default();
    let sigmas = vec![1.0f32, 0.9, 0.75, 0.5, 0.0];
    let embeds: Tensor<B, 3> = file.tensor("encoder_hidden_states", &dev).unwrap();
    DenoiseInputs {
        latents: file.tensor("latents", &dev).unwrap(),
        image_latents: file.tensor("image_latents", &dev).unwrap(),
        prompt: TextConditioning { embeds: embeds.clone(), mask: None },
        negative: cfg.map(|_| TextConditioning { embeds: embeds.flip([1]) * 0.5, mask: None }),
        cfg_scale: cfg.unwrap_or(1.0),
        img_shapes: read_img_shapes(&file).unwrap(),
        timesteps: sigmas[..4].to_vec(),
        sigmas,
        modulation: None,
    }
}

fn run(model: &QwenImageTransformer<B>, inputs: &DenoiseInputs<B>, spec: &str) -> Vec<f32> {
    let mut schedule = spec.parse::<ScheduleSpec>().unwrap().build().unwrap();
    let mut caches = DenoiseCaches::default();
    let (x, _) = denoise(model, inputs, schedule.as_mut(), &mut caches, &mut |_| {}).unwrap();
    to_f32_vec(x)
}

#[test]
fn denoising_with_the_table_is_bit_identical_to_rows_computed_per_forward_pass() {
    for case in CASES {
        let resident = load(case, ModulationMode::Resident);
        let table_mode = load(case, ModulationMode::Table);
        let mut outputs = Vec::new();
        for cfg in [None, Some(4.0)] {
            let mut inputs = denoise_inputs(case, cfg);
            let calls: Vec<&[f32]> = inputs.timesteps.iter().map(std::slice::from_ref).collect();
            let table = table_mode.modulation_table(&calls).unwrap();
            for spec in ["none", "cat"] {
                // Today's path: a resident model computes its modulation in every forward pass.
                let want = run(&resident, &inputs, spec);
                // The table built by the loop itself, and one built beforehand (prompt and negative share it).
                assert_eq!(bits(&run(&table_mode, &inputs, spec)), bits(&want), "{case} {spec} cfg {cfg:?}");
                inputs.modulation = Some(table.clone());
                assert_eq!(bits(&run(&table_mode, &inputs, spec)), bits(&want), "{case} {spec} cfg {cfg:?}");
                inputs.modulation = None;
                outputs.push(want);
            }
        }
        // The four runs differ from each other: pruning and CFG were really exercised.
        for (i, a) in outputs.iter().enumerate() {
            for b in &outputs[i + 1..] {
                assert!(rel_l2(a, b) > 1e-4, "{case}: two configurations gave the same latents");
            }
        }
    }
}

/// A LoRA (Lightning key convention, with alpha) on `img_mod.1` and `txt_mod.1` of every block and on one attention
/// layer of `model`'s shape.
fn modulation_lora(model: &QwenImageTransformer<B>, dir: &Path) -> LoraWeights {
    let (dim, rank) = (model.config.inner_dim(), 4);
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.4).collect()
    };
    let mut tensors: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
    for b in 0..model.num_layers() {
        for (j, (layer, out)) in
            [("img_mod.1", 6 * dim), ("txt_mod.1", 6 * dim), ("attn.to_q", dim)].iter().enumerate()
        {
            let module = format!("transformer_blocks.{b}.{layer}");
            let seed = 3 * b + j;
            tensors.push((format!("{module}.lora_down.weight"), values(rank * dim, seed), vec![rank, dim]));
            tensors.push((
                format!("{module}.lora_up.weight"),
                values(out * rank, seed + 50),
                vec![*out, rank],
            ));
            tensors.push((format!("{module}.alpha"), vec![2.0], vec![]));
        }
    }
    let path = dir.join("modulation_lora.safetensors");
    let named: Vec<(&str, Vec<f32>, Vec<usize>)> =
        tensors.iter().map(|(n, v, s)| (n.as_str(), v.clone(), s.clone())).collect();
    write_f32(&path, &named).unwrap();
    let lora = LoraWeights::load(&path, model.num_layers()).unwrap();
    assert_eq!(lora.len(), 3 * model.num_layers());
    lora
}

#[test]
fn a_lora_on_the_modulation_layers_reaches_the_table() {
    let dir = tmp("lora");
    for case in CASES {
        let inputs_path = case_dir(case).join("inputs.safetensors");
        let file = TensorFile::open(&inputs_path).unwrap();
        let forward = |model: &QwenImageTransformer<B>, table: bool| {
            let mut input = read_dit_input::<B>(&file, model.device()).unwrap();
            if table {
                let timesteps = input.timestep.clone();
                input.modulation = Some(model.modulation_table(&[&timesteps]).unwrap());
            }
            to_f32_vec(model.forward(&input).unwrap())
        };
        let base = forward(&load(case, ModulationMode::Resident), false);
        let lora = modulation_lora(&load(case, ModulationMode::Resident), &dir);
        for merge in [true, false] {
            let mut resident = load(case, ModulationMode::Resident);
            let mut table_mode = load(case, ModulationMode::Table);
            let stale: ModulationTable<B> = table_mode.modulation_table(&[&[0.5]]).unwrap();
            let ids: Vec<Option<u64>> = [&mut resident, &mut table_mode]
                .into_iter()
                .map(|m| {
                    if merge {
                        assert_eq!(lora.merge_into(m, 0.8).unwrap(), lora.len());
                        None
                    } else {
                        Some(lora.attach(m, 0.8).unwrap())
                    }
                })
                .collect();
            let want = forward(&resident, false);
            let moved = rel_l2(&want, &base);
            println!("{case} merge {merge}: the LoRA moves the output by {moved:.2e}");
            assert!(moved > 1e-3, "{case}: the LoRA changed nothing");
            // The same arithmetic on the same weights: bit-identical, with rows computed per call or from a table.
            assert_eq!(bits(&forward(&table_mode, false)), bits(&want), "{case} merge {merge}");
            assert_eq!(bits(&forward(&table_mode, true)), bits(&want), "{case} merge {merge}");
            // A table from before the LoRA is refused (it would silently drop the update).
            let mut input = read_dit_input::<B>(&file, table_mode.device()).unwrap();
            input.modulation = Some(stale);
            assert!(table_mode.forward(&input).unwrap_err().to_string().contains("other weights"));
            if let Some(Some(id)) = ids.last() {
                lora.detach(&mut table_mode, *id);
                assert_eq!(
                    bits(&forward(&table_mode, true)),
                    bits(&base),
                    "{case}: detaching restores the base"
                );
            }
        }
    }
}

#[test]
fn the_pipeline_keeps_its_table_across_edits() {
    let root = demo::write_demo_snapshot(&tmp("pipeline")).unwrap();
    let snapshot = Snapshot::open(&root).unwrap();
    let mut latents = Vec::new();
    for modulation in [ModulationMode::Table, ModulationMode::Resident] {
        let options = LoadOptions { modulation, ..LoadOptions::default() };
        let mut pipe = QwenImageEditPipeline::<B>::from_snapshot(
            snapshot.clone(),
            &options,
            &Default::default(),
            &mut NoProgress,
        )
        .unwrap();
        assert_eq!(pipe.transformer().modulation_mode(), modulation);
        let mut req = EditRequest::new(vec![demo::sample_image().unwrap()], "Make it purple");
        req.areas = demo::demo_areas();
        req.num_steps = 3;
        let spec: ScheduleSpec = "cat".parse().unwrap();
        let first = pipe.edit(&req, &spec, &mut NoProgress).unwrap();
        let table_stage =
            |r: &qwen_image_pipeline::EditReport| r.stages.iter().any(|s| s.stage == Stage::ModulationTable);
        assert_eq!(table_stage(&first.report), modulation == ModulationMode::Table);
        let rows = pipe.modulation_table().len();
        assert_eq!(rows, if modulation == ModulationMode::Table { 3 } else { 0 });
        // The same schedule again: no new rows; the same result.
        let again = pipe.edit(&req, &spec, &mut NoProgress).unwrap();
        assert_eq!(pipe.modulation_table().len(), rows);
        assert_eq!(bits(&again.latents), bits(&first.latents));
        // Lending the DiT out mutably (to attach a LoRA) empties the table; the next edit rebuilds it.
        pipe.transformer_mut();
        assert!(pipe.modulation_table().is_empty());
        assert_eq!(bits(&pipe.edit(&req, &spec, &mut NoProgress).unwrap().latents), bits(&first.latents));
        assert_eq!(pipe.modulation_table().len(), rows);
        latents.push(first.latents);
    }
    assert_eq!(bits(&latents[0]), bits(&latents[1]), "table and resident mode give the same edit");
}
