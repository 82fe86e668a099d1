//! Per-image reuse across edits: what depends only on the input images — the VAE latents of each image and the
//! vision tower's embeddings of the condition images — is computed once and reused by later edits of the same
//! images (interactive editing sends one image with many instructions).
//!
//! How to use:
//!
//! ```no_run
//! # use qwen_image::CpuBackend;
//! # use qwen_image_pipeline::{EditRequest, NoProgress, QwenImageEditPipeline, ReuseCache};
//! # use qwen_image_pruning::ScheduleSpec;
//! # fn f(pipe: &mut QwenImageEditPipeline<CpuBackend>, image: qwen_image::processor::RgbImage) -> qwen_image_pipeline::Result<()> {
//! let mut reuse = ReuseCache::new(512 << 20); // a 512 MiB budget
//! let schedule: ScheduleSpec = "cat".parse()?;
//! for prompt in ["Make it purple", "Add a hat"] {
//!     let req = EditRequest::new(vec![image.clone()], prompt);
//!     let out = pipe.edit_with(&req, &schedule, &mut NoProgress, &mut reuse)?;
//!     println!("{prompt}: {} hits, {} misses", out.report.image_reuse.hits, out.report.image_reuse.misses);
//! }
//! println!("{:?}", reuse.stats()); // the second edit hit both encodings
//! # Ok(()) }
//! ```
//!
//! Keys are SHA-256 content hashes of the *resized* images (sides and RGB bytes), so two uploads that resize to
//! the same pixels share an entry. A reused encoding is the very tensor the first edit computed and passed on, so
//! the edit is bit-identical to recomputing (the pipeline's `reuse` test checks the final latents). No
//! approximate reuse (e.g. of near-identical images) is offered.
//!
//! A cache belongs to one pipeline: its entries are outputs of that pipeline's VAE and vision tower, with its
//! dtype, device and tiling options.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{backend::Backend, Tensor};
use qwen_image::{
    ops::QwenBackend,
    processor::{PixelValues, RgbImage},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{QwenImageEditPipeline, Result};

/// Which encoding an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingKind {
    /// The VAE latents of one image, normalized and packed: `[1, tokens, 4·z_dim]`.
    VaeLatents,
    /// The vision tower's embeddings of all condition images of an edit: `[patches / merge², hidden]`.
    VisionEmbeds,
}

/// The key of an entry: the kind and the SHA-256 of the resized images it was computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReuseKey {
    /// The kind of encoding.
    pub kind: EncodingKind,
    /// SHA-256 over each image's width, height and RGB bytes, in order.
    pub hash: [u8; 32],
}

impl ReuseKey {
    /// The key of `kind` computed from `images`.
    pub fn new(kind: EncodingKind, images: &[RgbImage]) -> Self {
        let mut h = Sha256::new();
        for img in images {
            h.update(img.width().to_le_bytes());
            h.update(img.height().to_le_bytes());
            h.update(img.as_raw());
        }
        ReuseKey { kind, hash: h.finalize().into() }
    }
}

/// A cached encoding (a tensor on the pipeline's device, in its dtype).
#[derive(Clone, Debug)]
pub enum Encoding<B: Backend> {
    /// See [`EncodingKind::VaeLatents`].
    VaeLatents(Tensor<B, 3>),
    /// See [`EncodingKind::VisionEmbeds`].
    VisionEmbeds(Tensor<B, 2>),
}

impl<B: Backend> Encoding<B> {
    /// Bytes of the tensor.
    pub fn size_bytes(&self) -> usize {
        let (n, dtype) = match self {
            Encoding::VaeLatents(t) => (t.shape().num_elements(), t.dtype()),
            Encoding::VisionEmbeds(t) => (t.shape().num_elements(), t.dtype()),
        };
        n * dtype.size()
    }
}

/// Hits and misses of one edit: encodings taken from the cache, and encodings computed (and offered to it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReuseCounts {
    /// Encodings taken from the cache (not computed).
    pub hits: usize,
    /// Encodings computed because the cache lacked them.
    pub misses: usize,
}

/// Where [`QwenImageEditPipeline::edit_with`] looks up and stores per-image encodings.
pub trait ImageReuse<B: Backend> {
    /// Whether lookups are made at all (`false`: nothing is hashed, looked up or counted).
    fn enabled(&self) -> bool {
        true
    }
    /// The entry of `key`, if held (a hit).
    fn get(&mut self, key: &ReuseKey) -> Option<Encoding<B>>;
    /// Offers a freshly computed entry.
    fn put(&mut self, key: ReuseKey, value: Encoding<B>);
}

/// No reuse: every edit computes everything ([`QwenImageEditPipeline::edit`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoReuse;

impl<B: Backend> ImageReuse<B> for NoReuse {
    fn enabled(&self) -> bool {
        false
    }
    fn get(&mut self, _key: &ReuseKey) -> Option<Encoding<B>> {
        None
    }
    fn put(&mut self, _key: ReuseKey, _value: Encoding<B>) {}
}

/// Counters of a [`ReuseCache`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReuseStats {
    /// Lookups that found their entry.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Entries dropped to stay within the budget.
    pub evictions: u64,
    /// Entries held now.
    pub entries: usize,
    /// Bytes held now.
    pub bytes: usize,
    /// The byte budget.
    pub budget_bytes: usize,
}

/// A least-recently-used cache of encodings within a byte budget. An entry larger than the whole budget is not
/// kept. (A map plus an ordered index of last uses: a few lines, no extra dependency.)
#[derive(Debug)]
pub struct ReuseCache<B: Backend> {
    entries: HashMap<ReuseKey, (Encoding<B>, u64)>,
    /// Last-use tick → key, oldest first.
    order: BTreeMap<u64, ReuseKey>,
    tick: u64,
    stats: ReuseStats,
}

impl<B: Backend> ReuseCache<B> {
    /// An empty cache that holds at most `budget_bytes` of tensors.
    pub fn new(budget_bytes: usize) -> Self {
        let stats = ReuseStats { budget_bytes, ..ReuseStats::default() };
        ReuseCache { entries: HashMap::new(), order: BTreeMap::new(), tick: 0, stats }
    }

    /// The counters.
    pub fn stats(&self) -> ReuseStats {
        self.stats
    }

    /// Drops every entry (the counters stay).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.stats.entries = 0;
        self.stats.bytes = 0;
    }

    fn touch(&mut self, key: ReuseKey, old_tick: Option<u64>) -> u64 {
        if let Some(t) = old_tick {
            self.order.remove(&t);
        }
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.tick
    }

    fn remove(&mut self, key: &ReuseKey) {
        if let Some((value, tick)) = self.entries.remove(key) {
            self.order.remove(&tick);
            self.stats.bytes -= value.size_bytes();
            self.stats.entries -= 1;
        }
    }
}

impl<B: Backend> ImageReuse<B> for ReuseCache<B> {
    fn get(&mut self, key: &ReuseKey) -> Option<Encoding<B>> {
        let Some((value, tick)) = self.entries.get(key).map(|(v, t)| (v.clone(), *t)) else {
            self.stats.misses += 1;
            return None;
        };
        self.stats.hits += 1;
        let new_tick = self.touch(*key, Some(tick));
        self.entries.get_mut(key).expect("present").1 = new_tick;
        Some(value)
    }

    fn put(&mut self, key: ReuseKey, value: Encoding<B>) {
        let bytes = value.size_bytes();
        self.remove(&key);
        if bytes > self.stats.budget_bytes {
            return;
        }
        while self.stats.bytes + bytes > self.stats.budget_bytes {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some((value, _)) = self.entries.remove(&oldest) {
                self.stats.bytes -= value.size_bytes();
                self.stats.entries -= 1;
                self.stats.evictions += 1;
            }
        }
        let tick = self.touch(key, None);
        self.entries.insert(key, (value, tick));
        self.stats.bytes += bytes;
        self.stats.entries += 1;
    }
}

impl<B: QwenBackend> QwenImageEditPipeline<B> {
    /// The vision tower's embeddings of the condition images `images`, from `reuse` or computed (the image
    /// processor's patches, or `ahead` when made already, then the tower) and offered to it.
    pub(crate) fn vision_embeds_reused(
        &self,
        images: &[RgbImage],
        ahead: Option<PixelValues>,
        reuse: &mut dyn ImageReuse<B>,
        counts: &mut ReuseCounts,
    ) -> Result<Tensor<B, 2>> {
        if !reuse.enabled() {
            return self.vision_embeds(images, ahead);
        }
        let key = ReuseKey::new(EncodingKind::VisionEmbeds, images);
        if let Some(Encoding::VisionEmbeds(t)) = reuse.get(&key) {
            counts.hits += 1;
            return Ok(t);
        }
        counts.misses += 1;
        let t = self.vision_embeds(images, ahead)?;
        reuse.put(key, Encoding::VisionEmbeds(t.clone()));
        Ok(t)
    }

    /// The packed VAE latents of `images` concatenated, each image's from `reuse` or computed and offered to it.
    pub(crate) fn encode_images_reused(
        &self,
        images: &[RgbImage],
        reuse: &mut dyn ImageReuse<B>,
        counts: &mut ReuseCounts,
    ) -> Result<Tensor<B, 3>> {
        if !reuse.enabled() {
            return self.encode_images(images);
        }
        let mut parts = Vec::with_capacity(images.len());
        for img in images {
            let key = ReuseKey::new(EncodingKind::VaeLatents, std::slice::from_ref(img));
            if let Some(Encoding::VaeLatents(t)) = reuse.get(&key) {
                counts.hits += 1;
                parts.push(t);
                continue;
            }
            counts.misses += 1;
            let t = self.encode_images(std::slice::from_ref(img))?;
            reuse.put(key, Encoding::VaeLatents(t.clone()));
            parts.push(t);
        }
        Ok(Tensor::cat(parts, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = qwen_image::CpuBackend;

    fn entry(n: usize) -> Encoding<B> {
        Encoding::VisionEmbeds(Tensor::zeros([n, 1], &Default::default()))
    }

    fn key(i: u8) -> ReuseKey {
        ReuseKey { kind: EncodingKind::VisionEmbeds, hash: [i; 32] }
    }

    #[test]
    fn lru_keeps_the_budget_and_counts() {
        let mut c = ReuseCache::<B>::new(100 * 4); // 100 f32
        c.put(key(1), entry(40));
        c.put(key(2), entry(40));
        assert!(c.get(&key(1)).is_some()); // 1 is now newer than 2
        c.put(key(3), entry(40)); // evicts 2
        assert!(c.get(&key(2)).is_none());
        assert!(c.get(&key(1)).is_some() && c.get(&key(3)).is_some());
        c.put(key(4), entry(200)); // larger than the budget: not kept
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions, s.entries, s.bytes), (3, 1, 1, 2, 320));
        c.put(key(3), entry(10)); // replaces
        assert_eq!(c.stats().bytes, 200);
    }

    #[test]
    fn keys_follow_the_pixels() {
        let a = RgbImage::new(4, 2);
        let mut b = a.clone();
        assert_eq!(
            ReuseKey::new(EncodingKind::VaeLatents, std::slice::from_ref(&a)),
            ReuseKey::new(EncodingKind::VaeLatents, &[b.clone()])
        );
        b.put_pixel(0, 0, image::Rgb([1, 0, 0]));
        assert_ne!(
            ReuseKey::new(EncodingKind::VaeLatents, std::slice::from_ref(&a)),
            ReuseKey::new(EncodingKind::VaeLatents, &[b])
        );
        let c = RgbImage::new(2, 4); // same bytes, other shape
        assert_ne!(
            ReuseKey::new(EncodingKind::VaeLatents, &[a]),
            ReuseKey::new(EncodingKind::VaeLatents, &[c])
        );
    }
}
