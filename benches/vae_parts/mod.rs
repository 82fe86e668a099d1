//! `pipeline_bench`'s VAE section, part by part: for each part of the encoder and of the decoder at 1024², its wall
//! time (device idle before, synchronized after) beside the host's time until it returns. Queueing a whole encode
//! took the host 14–29 ms against ≈ 21 ms of device time in the FP8 edit (H100, session 30): a part whose host time
//! is near its wall time is bound by the host's issue rate, which is what to make cheaper there.

use burn::tensor::Tensor;
use qwen_image::vae::{encoder::DownLayer, AutoencoderKLQwenImage};
use serde_json::{json, Value};

use crate::common::G;

/// One part: its name and what it computes from the previous part's output.
type Part<'a> = (String, Box<dyn Fn(Tensor<G, 4>) -> Tensor<G, 4> + 'a>);

/// The encoder's parts (`conv_in`, each down layer, the mid block, the head) run on `image` in order, then the
/// decoder's (`conv_in`, the mid block, each up block, the head) on `latents`: per part `{part, ms, enqueue_ms}`,
/// timed by `time` (wall) and `enqueue` (the host's share), each `reps` times on the part's real input.
pub fn vae_parts(
    vae: &AutoencoderKLQwenImage<G>,
    image: Tensor<G, 4>,
    latents: Tensor<G, 4>,
    time: &dyn Fn(&mut dyn FnMut()) -> f64,
    enqueue: &dyn Fn(&mut dyn FnMut()) -> f64,
) -> Value {
    let (enc, dec) = (&vae.encoder, &vae.decoder);
    let mut encoder: Vec<Part<'_>> = vec![("conv_in".into(), Box::new(|x| enc.conv_in.forward(x)))];
    for (i, layer) in enc.down_blocks.iter().enumerate() {
        let kind = match layer {
            DownLayer::Residual(_) => "residual",
            DownLayer::Downsample(_) => "downsample",
        };
        encoder.push((format!("down {i} ({kind})"), Box::new(move |x| layer.forward(x))));
    }
    encoder.push(("mid block".into(), Box::new(|x| enc.mid_block.forward(x))));
    encoder.push((
        "norm_out + conv_out".into(),
        Box::new(|x| enc.conv_out.forward(enc.norm_out.forward_silu(x))),
    ));
    let mut decoder: Vec<Part<'_>> = vec![
        ("conv_in".into(), Box::new(|x| dec.conv_in.forward(x))),
        ("mid block".into(), Box::new(|x| dec.mid_block.forward(x))),
    ];
    for (i, block) in dec.up_blocks.iter().enumerate() {
        decoder.push((format!("up block {i}"), Box::new(move |x| block.forward(x))));
    }
    decoder.push((
        "norm_out + conv_out".into(),
        Box::new(|x| dec.conv_out.forward(dec.norm_out.forward_silu(x))),
    ));
    json!({
        "encoder": run_parts("encoder", &encoder, image, time, enqueue),
        "decoder": run_parts("decoder", &decoder, latents, time, enqueue),
    })
}

fn run_parts(
    what: &str,
    parts: &[Part<'_>],
    mut input: Tensor<G, 4>,
    time: &dyn Fn(&mut dyn FnMut()) -> f64,
    enqueue: &dyn Fn(&mut dyn FnMut()) -> f64,
) -> Value {
    let mut rows = Vec::new();
    let (mut wall_sum, mut host_sum) = (0.0, 0.0);
    for (name, part) in parts {
        let ms = time(&mut || drop(part(input.clone())));
        let host = enqueue(&mut || drop(part(input.clone())));
        println!("  {what} {name:22} {ms:7.2} ms, host {host:6.2} ms  {:?}", input.dims());
        (wall_sum, host_sum) = (wall_sum + ms, host_sum + host);
        rows.push(json!({"part": name, "ms": ms, "enqueue_ms": host, "input": input.dims()}));
        input = part(input);
    }
    println!("  {what} parts summed: {wall_sum:.2} ms, host {host_sum:.2} ms");
    Value::Array(rows)
}
