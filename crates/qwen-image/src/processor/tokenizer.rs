//! The Qwen2 byte-level BPE tokenizer, loaded from `tokenizer.json` or assembled from `vocab.json` + `merges.txt`.
//!
//! Parity (`tests/processor_parity.rs`): token ids equal transformers 5.24's `Qwen2Tokenizer` (and tiktoken's
//! encoding of the same ranks) on 60 prompts — English, Chinese, Japanese, Korean, emoji, digits, whitespace runs,
//! CRLF, combining characters (NFC), special tokens — with the real Qwen vocabulary, through both loading paths.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{ModelError, Result};

/// The Qwen2 pre-tokenizer regex (transformers' `PRETOKENIZE_REGEX`; single digits, unlike tiktoken's cl100k).
pub const PRETOKENIZE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `<|im_start|>`: opens a chat turn.
pub const IM_START: &str = "<|im_start|>";
/// `<|im_end|>`: closes a chat turn.
pub const IM_END: &str = "<|im_end|>";
/// `<|vision_start|>`: precedes an image's tokens.
pub const VISION_START: &str = "<|vision_start|>";
/// `<|vision_end|>`: follows an image's tokens.
pub const VISION_END: &str = "<|vision_end|>";
/// `<|image_pad|>`: one per merged image patch; the text encoder replaces these with vision embeddings.
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// `<|video_pad|>`: video placeholder (videos are not supported).
pub const VIDEO_PAD: &str = "<|video_pad|>";

/// The special tokens every Qwen2-VL tokenizer has, checked at load time.
const REQUIRED: [&str; 6] = [IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD];

/// A Qwen2 / Qwen2.5-VL tokenizer.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2/tokenization_qwen2.py#L36
#[derive(Clone)]
pub struct QwenTokenizer {
    inner: Tokenizer,
    image_pad_id: u32,
    video_pad_id: u32,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("image_pad_id", &self.image_pad_id)
            .finish()
    }
}

/// One entry of `added_tokens_decoder` in `tokenizer_config.json`.
#[derive(Deserialize)]
struct AddedTokenEntry {
    content: String,
    #[serde(default)]
    special: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    single_word: bool,
    normalized: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TokenizerConfig {
    added_tokens_decoder: BTreeMap<String, AddedTokenEntry>,
    add_prefix_space: Option<bool>,
}

impl QwenTokenizer {
    /// Loads the tokenizer of a `processor/` (or `tokenizer/`) folder: `tokenizer.json` when present, otherwise
    /// assembled from `vocab.json`, `merges.txt`, `tokenizer_config.json` and `added_tokens.json` as transformers'
    /// `Qwen2Tokenizer` does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_file(&json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab.is_file() || !merges.is_file() {
            return Err(ModelError::config(
                dir,
                "no tokenizer found: the folder has neither tokenizer.json nor vocab.json + merges.txt",
            ));
        }
        Self::from_vocab_merges(
            &vocab,
            &merges,
            Some(&dir.join("tokenizer_config.json")),
            Some(&dir.join("added_tokens.json")),
        )
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| ModelError::config(path, format!("not a valid tokenizer.json: {e}")))?;
        Self::wrap(inner, path)
    }

    /// Assembles the tokenizer from a GPT-2-style `vocab.json` + `merges.txt` the way transformers'
    /// `Qwen2Tokenizer.__init__` does (byte-level BPE without unknown token, NFC normalizer, the Qwen2 regex split
    /// then byte-level mapping, byte-level decoder), then adds the tokens of `tokenizer_config.json`'s
    /// `added_tokens_decoder` and of `added_tokens.json` (each file optional; missing files are skipped) at their
    /// declared ids.
    pub fn from_vocab_merges(
        vocab_path: &Path,
        merges_path: &Path,
        tokenizer_config: Option<&Path>,
        added_tokens: Option<&Path>,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(vocab_path).map_err(|e| ModelError::io(vocab_path, e))?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&text)
            .map_err(|e| ModelError::config(vocab_path, format!("not a token → id JSON map: {e}")))?;
        let merges = read_merges(merges_path)?;

        let mut config = TokenizerConfig::default();
        let mut config_origin = PathBuf::from("tokenizer_config.json");
        if let Some(path) = tokenizer_config.filter(|p| p.is_file()) {
            let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
            config = serde_json::from_str(&text).map_err(|e| ModelError::config(path, e.to_string()))?;
            config_origin = path.to_path_buf();
        }
        // Added tokens by id: the config's entries first, then the legacy `added_tokens.json`.
        let mut added: BTreeMap<u32, AddedToken> = BTreeMap::new();
        for (id, entry) in config.added_tokens_decoder {
            let id: u32 = id.parse().map_err(|_| {
                ModelError::config(
                    &config_origin,
                    format!("added_tokens_decoder key `{id}` is not a token id"),
                )
            })?;
            let token = AddedToken::from(entry.content, entry.special)
                .lstrip(entry.lstrip)
                .rstrip(entry.rstrip)
                .single_word(entry.single_word)
                .normalized(entry.normalized.unwrap_or(!entry.special));
            added.insert(id, token);
        }
        if let Some(path) = added_tokens.filter(|p| p.is_file()) {
            let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
            let map: HashMap<String, u32> = serde_json::from_str(&text)
                .map_err(|e| ModelError::config(path, format!("not a token → id JSON map: {e}")))?;
            for (content, id) in map {
                match added.get(&id) {
                    Some(t) if t.content != content => {
                        return Err(ModelError::config(
                            path,
                            format!(
                                "id {id} is `{content}` here but `{}` in tokenizer_config.json",
                                t.content
                            ),
                        ))
                    }
                    Some(_) => {}
                    None => {
                        added.insert(id, AddedToken::from(content, false).normalized(false));
                    }
                }
            }
        }

        // The added tokens join the model vocabulary, so each keeps its declared id whatever the gaps.
        let by_id: HashMap<u32, &str> = vocab.iter().map(|(t, &i)| (i, t.as_str())).collect();
        for (id, token) in &added {
            if let Some(other) = by_id.get(id).filter(|t| **t != token.content) {
                return Err(ModelError::config(
                    vocab_path,
                    format!(
                        "added token `{}` has id {id}, which vocab.json gives to `{other}`",
                        token.content
                    ),
                ));
            }
        }
        let mut full: Vocab = vocab.into_iter().collect();
        for (id, token) in &added {
            full.insert(token.content.clone(), *id);
        }
        let bpe =
            BPE::builder().vocab_and_merges(full, merges).ignore_merges(false).build().map_err(|e| {
                ModelError::config(merges_path, format!("vocab.json and merges.txt do not fit: {e}"))
            })?;

        let mut inner = Tokenizer::new(bpe);
        inner.with_normalizer(Some(NFC));
        let split = Split::new(
            SplitPattern::Regex(PRETOKENIZE_REGEX.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ModelError::config(vocab_path, format!("pre-tokenizer regex: {e}")))?;
        let byte_level = ByteLevel::new(config.add_prefix_space.unwrap_or(false), true, false);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let (special, normal): (Vec<AddedToken>, Vec<AddedToken>) =
            added.into_values().partition(|t| t.special);
        inner.add_special_tokens(&special);
        inner.add_tokens(&normal);
        Self::wrap(inner, vocab_path)
    }

    fn wrap(inner: Tokenizer, origin: &Path) -> Result<Self> {
        for token in REQUIRED {
            if inner.token_to_id(token).is_none() {
                return Err(ModelError::config(
                    origin,
                    format!("the tokenizer has no `{token}` token; is it a Qwen2-VL tokenizer?"),
                ));
            }
        }
        let id = |t: &str| inner.token_to_id(t).expect("checked above");
        let (image_pad_id, video_pad_id) = (id(IMAGE_PAD), id(VIDEO_PAD));
        Ok(QwenTokenizer { inner, image_pad_id, video_pad_id })
    }

    /// Token ids of `text` (no BOS/EOS is added; special tokens in the text are matched as single tokens, as
    /// transformers does by default).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::invalid(format!("cannot tokenize the prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::invalid(format!("cannot decode token ids: {e}")))
    }

    /// The id of `token`, if it is in the vocabulary (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of `id`, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of `<|image_pad|>` (151655 in Qwen2.5-VL).
    pub fn image_pad_id(&self) -> u32 {
        self.image_pad_id
    }

    /// The id of `<|video_pad|>` (151656 in Qwen2.5-VL).
    pub fn video_pad_id(&self) -> u32 {
        self.video_pad_id
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Reads `merges.txt`: one `left right` pair per line; a `#version` header and blank lines are skipped.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merges.push((a.into(), b.into())),
            _ => {
                return Err(ModelError::config(
                    path,
                    format!("line {}: `{line}` is not a `left right` merge", n + 1),
                ))
            }
        }
    }
    Ok(merges)
}
