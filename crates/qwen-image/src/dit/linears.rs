//! The DiT's linear layers by checkpoint name: [`QwenImageTransformer::visit_linears`] and
//! [`visit_linears_mut`](QwenImageTransformer::visit_linears_mut) walk every `nn.Linear` of the model with its
//! diffusers name (`img_in`, `transformer_blocks.3.attn.to_q`, `transformer_blocks.3.img_mlp.net.0.proj`, …).
//!
//! What the DiT holds is written in one place per module: its loader (`load` / `from_store`), which reads every
//! tensor by name and shape and builds the fields. Everything else is derived from it:
//! - the checkpoint's key list with shapes ([`synthetic::dit_checkpoint_tensors`](crate::synthetic::dit_checkpoint_tensors)):
//!   the loader run on a [shape-only store](crate::weights::WeightStore::shape_only);
//! - the linear layers by name ([`dit_linear_names`], LoRA targets): this visitor, which each module implements with
//!   `linear_layers!` from the list of its fields. The macro names *every* field of the struct
//!   (the others after `without`), so a new field does not compile until it is listed, and a test checks that the
//!   visited names are exactly the linear layers the loader reads.
//!
//! The visitor hands each layer out as a [`LinearLayer`]: on the device ([`Linear`]) or deferred on the host
//! ([`DeferredLinear`](crate::nn::DeferredLinear), the modulation layers in
//! [table mode](super::ModulationMode::Table)).

use std::collections::HashMap;

use burn::tensor::DType;

use super::{
    config::DitConfig,
    transformer::{DitLoadOptions, QwenImageTransformer},
};
use crate::{
    nn::{Linear, LinearLayer, PlacedLinear},
    ops::QwenBackend,
    quant::LinearWeightSummary,
    weights::WeightStore,
    CpuBackend, Result,
};

/// A layer as the visitor hands it out.
pub(crate) type LayerRef<'a, B> = &'a dyn LinearLayer<B>;
/// A layer as the mutable visitor hands it out.
pub(crate) type LayerMut<'a, B> = &'a mut dyn LinearLayer<B>;

/// A module of the DiT that holds linear layers (or is one).
pub(crate) trait Linears<B: QwenBackend> {
    /// Calls `f` with the checkpoint name of each linear layer (below `prefix`) and the layer.
    fn walk<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, LayerRef<'a, B>));
    /// [`walk`](Self::walk) with mutable layers.
    fn walk_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, LayerMut<'a, B>));
}

/// `prefix.name`, or `name` at the root.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl<B: QwenBackend> Linears<B> for Linear<B> {
    fn walk<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, LayerRef<'a, B>)) {
        f(prefix, self)
    }

    fn walk_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, LayerMut<'a, B>)) {
        f(prefix, self)
    }
}

impl<B: QwenBackend> Linears<B> for PlacedLinear<B> {
    fn walk<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, LayerRef<'a, B>)) {
        f(prefix, self.layer())
    }

    fn walk_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, LayerMut<'a, B>)) {
        f(prefix, self.layer_mut())
    }
}

/// A list of modules named by their index (`transformer_blocks.0`, `transformer_blocks.1`, …).
impl<B: QwenBackend, T: Linears<B>> Linears<B> for Vec<T> {
    fn walk<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, LayerRef<'a, B>)) {
        for (i, m) in self.iter().enumerate() {
            m.walk(&join(prefix, &i.to_string()), f);
        }
    }

    fn walk_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, LayerMut<'a, B>)) {
        for (i, m) in self.iter_mut().enumerate() {
            m.walk_mut(&join(prefix, &i.to_string()), f);
        }
    }
}

/// Implements [`Linears`] for a module from the list `field => "checkpoint name"` of its fields that are linear
/// layers, modules holding some, or lists of those; every other field is named after `without`. The struct is
/// destructured without `..`, so a field missing from both lists is a compile error.
macro_rules! linear_layers {
    ($ty:ident { $($field:ident => $name:literal),* $(,)? } without { $($other:ident),* $(,)? }) => {
        impl<B: $crate::ops::QwenBackend> $crate::dit::linears::Linears<B> for $ty<B> {
            fn walk<'a>(
                &'a self,
                prefix: &str,
                f: &mut dyn FnMut(&str, $crate::dit::linears::LayerRef<'a, B>),
            ) {
                let $ty { $($field,)* $($other: _,)* } = self;
                $( $crate::dit::linears::Linears::walk($field, &$crate::dit::linears::join(prefix, $name), f); )*
            }

            fn walk_mut<'a>(
                &'a mut self,
                prefix: &str,
                f: &mut dyn FnMut(&str, $crate::dit::linears::LayerMut<'a, B>),
            ) {
                let $ty { $($field,)* $($other: _,)* } = self;
                $( $crate::dit::linears::Linears::walk_mut($field, &$crate::dit::linears::join(prefix, $name), f); )*
            }
        }
    };
}
pub(crate) use linear_layers;

impl<B: QwenBackend> QwenImageTransformer<B> {
    /// Calls `f` with the diffusers name (e.g. `transformer_blocks.3.attn.to_q`) and each linear layer of the model,
    /// top-level layers and blocks in checkpoint order.
    pub fn visit_linears<'a>(&'a self, mut f: impl FnMut(&str, &'a dyn LinearLayer<B>)) {
        self.walk("", &mut f);
    }

    /// [`visit_linears`](Self::visit_linears) with mutable layers (e.g. to merge or attach a LoRA). The model's
    /// weights count as changed afterwards: [modulation tables](super::ModulationTable) built before are refused by
    /// its forward passes and rebuilt by [`extend_modulation_table`](Self::extend_modulation_table).
    pub fn visit_linears_mut<'a>(&'a mut self, mut f: impl FnMut(&str, &'a mut dyn LinearLayer<B>)) {
        self.mark_weights_changed();
        self.walk_mut("", &mut f);
    }
}

impl<B: QwenBackend> QwenImageTransformer<B> {
    /// How the linear layers hold their weights (FP8, dense, on the host) and the FP8 keep list it was loaded with.
    pub fn linear_weights(&self) -> LinearWeightSummary {
        let dtype = self.dtype();
        let mut summary = LinearWeightSummary::new(dtype);
        self.visit_linears(|_, layer| {
            summary.add(layer.shape(), layer.weight_format(), layer.is_resident(), dtype);
        });
        summary.set_fp8_options(self.fp8_options());
        summary
    }
}

/// The [`LinearWeightSummary`] a DiT of `config` loaded in `dtype` with `options` would have, from a
/// [shape-only](WeightStore::shape_only) build: nothing is allocated, and the FP8 keep list is checked.
pub fn dit_linear_plan(
    config: &DitConfig,
    dtype: DType,
    options: &DitLoadOptions,
) -> Result<LinearWeightSummary> {
    let mut store = WeightStore::shape_only(dtype);
    let model = QwenImageTransformer::<CpuBackend>::from_store_with(
        config.clone(),
        &mut store,
        options,
        &Default::default(),
    )?;
    // A shape-only build holds empty tensors: the shapes come from what the loader asked for.
    let shapes: HashMap<&str, &[usize]> =
        store.created().iter().map(|(k, s)| (k.as_str(), s.as_slice())).collect();
    let mut summary = LinearWeightSummary::new(dtype);
    model.visit_linears(|name, layer| {
        let shape = match shapes.get(format!("{name}.weight").as_str()) {
            Some(&[out, inp]) => [*out, *inp],
            _ => layer.shape(),
        };
        summary.add(shape, layer.weight_format(), layer.is_resident(), dtype);
    });
    summary.set_fp8_options(options.fp8.as_ref());
    Ok(summary)
}

/// The diffusers names of every linear layer of a DiT of `config` (e.g. the layers a LoRA may target), from the
/// model's visitor on a [shape-only](WeightStore::shape_only) build: nothing is allocated.
pub fn dit_linear_names(config: &DitConfig) -> Result<Vec<String>> {
    let model = QwenImageTransformer::<CpuBackend>::from_store(
        config.clone(),
        &mut WeightStore::shape_only(DType::F32),
        &Default::default(),
    )?;
    let mut names = Vec::new();
    model.visit_linears(|name, _| names.push(name.to_string()));
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_visitor_names_exactly_the_linear_layers_the_loader_reads() {
        let config = DitConfig { num_layers: 2, ..DitConfig::default() };
        let mut store = WeightStore::shape_only(DType::F32);
        let mut model =
            QwenImageTransformer::<CpuBackend>::from_store(config.clone(), &mut store, &Default::default())
                .unwrap();
        // Every weight of rank 2 the loader reads is a linear layer with a bias.
        let read: BTreeSet<&str> = store.created().iter().map(|(k, _)| k.as_str()).collect();
        let loaded: BTreeSet<String> = store
            .created()
            .iter()
            .filter(|(k, s)| s.len() == 2 && k.ends_with(".weight"))
            .map(|(k, _)| k.trim_end_matches(".weight").to_string())
            .collect();
        let mut visited = Vec::new();
        model.visit_linears(|name, lin| {
            // Resident layers of a shape-only build hold empty tensors; deferred ones (the modulation layers in
            // table mode) hold nothing on the device and know their shape.
            let modulation = name.ends_with("_mod.1");
            assert_eq!(lin.is_resident(), !modulation, "{name}");
            assert_eq!(lin.shape()[0] == 0, !modulation, "{name}");
            visited.push(name.to_string());
        });
        assert_eq!(visited.len(), 6 + 2 * 14);
        assert_eq!(visited.iter().cloned().collect::<BTreeSet<_>>(), loaded);
        for name in &visited {
            assert!(read.contains(format!("{name}.bias").as_str()), "{name}");
        }
        assert_eq!(visited[..3], ["img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1"]);
        assert!(visited.contains(&"transformer_blocks.1.attn.to_out.0".to_string()));
        assert_eq!(dit_linear_names(&config).unwrap(), visited);
        // The mutable walk visits the same layers in the same order.
        let mut again = Vec::new();
        model.visit_linears_mut(|name, lin| {
            lin.adapters_mut().clear();
            again.push(name.to_string());
        });
        assert_eq!(again, visited);
    }
}
