//! Persistent caches of burn's own CUDA kernels (cubecl): compiled PTX and autotune results.
//!
//! burn compiles each of its kernels with NVRTC the first time a process launches it and autotunes some of them
//! (matmul, convolution, reductions) per shape. Without a compilation cache every new process pays that again:
//! the first CUDA edit of a process took ≈ 300 s, almost all of it in the VAE's and the text encoder's burn
//! kernels. [`configure_runtime_caches`] points cubecl's PTX cache and autotune cache at one folder, so only the
//! first process on a machine pays (the driver caches the PTX → machine-code step itself, in `~/.nv`).

use std::path::{Path, PathBuf};

use cubecl::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};

/// Where the caches go when no folder is given: `$QWEN_CUDA_CACHE_DIR` (read once per process, with the other
/// `QWEN_*` variables), else `$XDG_CACHE_HOME/qwen-image/cubecl`,
/// else `$HOME/.cache/qwen-image/cubecl`, else `./.qwen-image-cache/cubecl`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = super::config::cache_dir_from_env() {
        return d.to_path_buf();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| Path::new(&h).join(".cache")));
    match base {
        Some(b) => b.join("qwen-image").join("cubecl"),
        None => PathBuf::from(".qwen-image-cache").join("cubecl"),
    }
}

/// What [`configure_runtime_caches`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheSetup {
    /// Compiled kernels and autotune results are cached under this folder.
    Configured(PathBuf),
    /// A `cubecl.toml` / `burn.toml` already chooses a compilation cache: left as it is.
    UserConfig,
    /// cubecl's configuration was already in use (a burn CUDA operation ran before): nothing changed.
    TooLate,
}

/// Makes burn's CUDA kernels (compiled PTX and autotune results) persist in `dir` (default
/// [`default_cache_dir`]) across processes. Call it once at program start, before the first CUDA tensor is
/// created; later calls, or a configuration file that already sets `[compilation] cache`, leave things as they are
/// (see [`CacheSetup`]). Environment overrides of cubecl (`CUBECL_AUTOTUNE_LEVEL`, `CUBECL_DEBUG_LOG`, …) still
/// apply. A folder that cannot be created is an error.
pub fn configure_runtime_caches(dir: Option<&Path>) -> std::io::Result<CacheSetup> {
    let storage = CubeClRuntimeConfig::storage();
    let mut state = storage.lock();
    if state.is_some() {
        return Ok(CacheSetup::TooLate);
    }
    let mut config = CubeClRuntimeConfig::from_current_dir();
    if config.compilation.cache.is_some() {
        *state = Some(std::sync::Arc::new(config.override_from_env()));
        return Ok(CacheSetup::UserConfig);
    }
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(default_cache_dir);
    std::fs::create_dir_all(&dir)?;
    config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    config.autotune.cache = CacheConfig::File(dir.clone());
    *state = Some(std::sync::Arc::new(config.override_from_env()));
    Ok(CacheSetup::Configured(dir))
}
