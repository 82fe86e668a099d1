//! Kernel modules: compiled from their CUDA C++ source with NVRTC for the device's architecture on first use,
//! loaded into the device's context, and cached with their functions.

use std::{
    collections::{HashMap, HashSet},
    ffi::{c_char, c_void, CStr, CString},
    path::Path,
};

use cudarc::{
    driver::{result, sys},
    nvrtc::{result as nvrtc, sys as nvrtc_sys},
};

use super::{error::FastError, gpu::drv, kernels};

/// One device's loaded modules and functions. Modules are never unloaded: a handful per device (one per kernel
/// source), kept for the process's lifetime as the device state is.
#[derive(Default)]
pub(crate) struct KernelCache {
    modules: HashMap<&'static str, sys::CUmodule>,
    functions: HashMap<(&'static str, &'static str), sys::CUfunction>,
    /// (module, function, bytes) whose dynamic shared memory limit is raised.
    smem_set: HashSet<(&'static str, &'static str, u32)>,
}

impl KernelCache {
    /// The kernel `name` of module `module`, compiled on first use for compute capability `cc` from `source`, or
    /// from `<kernel_dir>/<module>.cu` when that file exists, and allowed `smem` bytes of dynamic shared memory.
    /// The device's context must be current.
    pub(crate) fn function(
        &mut self,
        cc: (i32, i32),
        kernel_dir: Option<&Path>,
        (module, source, name): (&'static str, &'static str, &'static str),
        smem: u32,
    ) -> Result<sys::CUfunction, FastError> {
        let f = match self.functions.get(&(module, name)) {
            Some(&f) => f,
            None => {
                let m = match self.modules.get(module) {
                    Some(&m) => m,
                    None => {
                        // Kernel development: `<kernel_dir>/<module>.cu`, when present, replaces the built-in source.
                        let dev_src = kernel_dir
                            .and_then(|d| std::fs::read_to_string(d.join(format!("{module}.cu"))).ok());
                        let m = compile(module, dev_src.as_deref().unwrap_or(source), cc)?;
                        self.modules.insert(module, m);
                        m
                    }
                };
                let cname = CString::new(name).map_err(|e| FastError::cuda(e.to_string()))?;
                // SAFETY: `m` is a module loaded in the current context (never unloaded); `cname` is a
                // NUL-terminated name.
                let f = drv("cuModuleGetFunction", unsafe { result::module::get_function(m, cname) })?;
                self.functions.insert((module, name), f);
                f
            }
        };
        // Above the default limit of 48 KiB, the limit is raised once per function and size.
        if smem > 48 * 1024 && self.smem_set.insert((module, name, smem)) {
            // SAFETY: `f` is a function of a module loaded in the current context; the attribute takes an int.
            drv("cuFuncSetAttribute", unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            })?;
        }
        Ok(f)
    }
}

/// NVRTC architecture flag for compute capability `cc` (`sm_90a` on Hopper, for its warpgroup instructions).
fn arch(cc: (i32, i32)) -> String {
    match cc {
        (9, 0) => "sm_90a".to_string(),
        (major, minor) => format!("sm_{major}{minor}"),
    }
}

/// Compiles `source` (after the shared prelude) with NVRTC and loads the PTX into the current context.
fn compile(module: &str, source: &str, cc: (i32, i32)) -> Result<sys::CUmodule, FastError> {
    // SAFETY: only checks whether libnvrtc could be loaded.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(FastError::cuda("libnvrtc not found (put the CUDA lib64 directory on LD_LIBRARY_PATH)"));
    }
    let src = CString::new(format!("{}\n{}", kernels::PRELUDE, source))
        .map_err(|e| FastError::cuda(e.to_string()))?;
    let name = CString::new(module).map_err(|e| FastError::cuda(e.to_string()))?;
    let prog = nvrtc::create_program(&src, Some(&name))
        .map_err(|e| FastError::cuda(format!("NVRTC create ({module}): {e:?}")))?;
    let arch = format!("--gpu-architecture={}", arch(cc));
    let opts = [arch.as_str(), "-std=c++17", "-lineinfo"];
    // SAFETY: `prog` is the live program created above; it is destroyed below on every path.
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    // SAFETY: `prog` is live; the log is copied into an owned buffer.
    let log = unsafe { nvrtc::get_program_log(prog) }.map(|l| c_text(&l)).unwrap_or_default();
    // SAFETY: `prog` is live; the PTX is copied into an owned buffer.
    let ptx = compiled.and_then(|()| unsafe { nvrtc::get_ptx(prog) });
    // SAFETY: `prog` is live and not used after this.
    unsafe { nvrtc::destroy_program(prog) }.ok();
    let ptx = ptx.map_err(|e| FastError::cuda(format!("NVRTC compile of {module} failed: {e:?}\n{log}")))?;
    // SAFETY: `ptx` is NUL-terminated PTX text (NVRTC's output) that outlives the call; the module is loaded into
    // the current context and never unloaded (see `KernelCache`).
    drv("cuModuleLoadData", unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) })
}

/// NVRTC's NUL-terminated text (a log) as a string.
fn c_text(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
