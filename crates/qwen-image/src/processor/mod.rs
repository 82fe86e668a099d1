//! Everything that turns a user's images and instruction into the text encoder's inputs, as diffusers'
//! Qwen-Image-Edit pipelines and transformers' `Qwen2VLProcessor` do it.
//!
//! - [`image_io`]: [`load_image`] — PNG/JPEG → RGB8, with size limits.
//! - [`sizes`]: [`calculate_dimensions`] and the Edit / Edit-Plus condition, VAE and output sizes.
//! - [`resize`](mod@resize): Pillow's and torch's antialiased resampling (Lanczos, bicubic), bit-exact.
//! - [`image_processor`]: the Qwen2-VL image processor → `pixel_values [P, 1176]` + `image_grid_thw`.
//! - [`tokenizer`]: the Qwen2 BPE tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`).
//! - [`prompt`]: the Edit / Edit-Plus chat templates, `<|image_pad|>` expansion, and the selection of the text
//!   encoder's hidden states (first 64 dropped) that condition the DiT.
//!
//! The Qwen-Image-Edit (v1) flow for one image:
//!
//! ```no_run
//! # fn main() -> qwen_image::Result<()> {
//! use std::path::Path;
//! use qwen_image::processor::*;
//!
//! let dir = Path::new("Qwen-Image-Edit/processor");
//! let image = load_image(Path::new("photo.jpg"))?;
//! let (w, h) = edit_image_size(image.width(), image.height())?;
//! let condition = resize(&image, w, h, Filter::Lanczos)?; // VL input and VAE input
//! let processor = ImageProcessor::from_config_file(&dir.join("preprocessor_config.json"))?;
//! let pixels = processor.preprocess(&condition)?; // pixel_values [P, 1176], grids
//! let tokenizer = QwenTokenizer::from_dir(dir)?;
//! let text = encode_prompt(&tokenizer, PromptTemplate::Edit, "make the sky purple", &pixels.grids,
//!     processor.config().merge_size)?;
//! // text encoder(text.input_ids, pixels) → last hidden state → extract_prompt_embeds(.., DROP_IDX)
//! # Ok(()) }
//! ```

pub mod image_io;
pub mod image_processor;
pub mod prompt;
pub mod resize;
pub mod sizes;
pub mod tokenizer;

pub use image::RgbImage;
pub use image_io::{decode_image, load_image, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE};
pub use image_processor::{smart_resize, GridThw, ImageProcessor, ImageProcessorConfig, PixelValues};
pub use prompt::{
    encode_prompt, expand_image_tokens, extract_prompt_embeds, PromptEmbeds, PromptTemplate, TextInputs,
    DROP_IDX,
};
pub use resize::{resize, resize_with, Filter, Resampler};
pub use sizes::{
    calculate_dimensions, edit_image_size, edit_plus_image_sizes, output_size, EditPlusSizes,
    CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE,
};
pub use tokenizer::QwenTokenizer;
