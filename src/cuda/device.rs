//! The device handle: the embedded fatbins, loaded once per context, and a function cache.

use crate::error::{Error, Result};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The compiled kernel files (one fatbin each, see build.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Module {
    Rope,
    Scores,
    AttentionFwd,
    AttentionDecode,
    AttentionDecodeMma,
    Merge,
}

impl Module {
    fn image(self) -> &'static [u8] {
        match self {
            Module::Rope => fatbins::ROPE,
            Module::Scores => fatbins::SCORES,
            Module::AttentionFwd => fatbins::ATTENTION_FWD,
            Module::AttentionDecode => fatbins::ATTENTION_DECODE,
            Module::AttentionDecodeMma => fatbins::ATTENTION_DECODE_MMA,
            Module::Merge => fatbins::MERGE,
        }
    }
}

/// Whether a CUDA driver and at least one device are present; `Err` says why not.
/// Safe to call on machines without a driver: cudarc's dynamic loading would panic on the
/// first driver call, so the library's presence is checked first.
pub fn device_status() -> std::result::Result<usize, String> {
    // With cudarc's dynamic loading (our default) libcuda may be absent: check before the first
    // call. candle's CUDA backend (feature `candle-cuda`) links libcuda instead: then it is there.
    #[cfg(not(feature = "candle-cuda"))]
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda) is not installed".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the CUDA driver reports no devices".into()),
        Err(e) => Err(format!("the CUDA driver failed to initialise: {e}")),
    }
}

/// A CUDA context with rope-attn's kernels loaded (lazily, once per module) and cached.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    smem_per_sm: usize,
}

impl Gpu {
    /// Open device `ordinal` (its primary context). Fails with [`Error::NoDevice`] when no driver
    /// or device is present, instead of panicking.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_status().map_err(Error::NoDevice)?;
        if ordinal >= count {
            return Err(Error::NoDevice(format!("device {ordinal} requested, {count} present")));
        }
        Ok(Self::from_context(CudaContext::new(ordinal)?))
    }

    /// Use a context the caller already has (e.g. a candle device's).
    pub fn from_context(ctx: Arc<CudaContext>) -> Self {
        let smem_per_sm =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR).map_or(0, |v| v.max(0) as usize);
        Gpu { ctx, modules: Mutex::new(HashMap::new()), functions: Mutex::new(HashMap::new()), smem_per_sm }
    }

    /// Shared memory per SM in bytes (228 KB on an H100, 164 KB on an A100, 100 KB on sm_86/89),
    /// 0 if the driver does not say.
    pub fn smem_per_sm(&self) -> usize {
        self.smem_per_sm
    }

    /// The underlying context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's name and compute capability, for reports.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown".into());
        match self.ctx.compute_capability() {
            Ok((ma, mi)) => format!("{name} (sm_{ma}{mi})"),
            Err(_) => name,
        }
    }

    /// A stream must belong to this context: kernels are loaded per context.
    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() != self.ctx.cu_ctx() {
            return Err(Error::Cuda("the stream belongs to another CUDA context than this Gpu".into()));
        }
        Ok(())
    }

    /// A kernel by symbol name, loading its module on first use.
    pub(crate) fn function(&self, module: Module, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let m = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(&module) {
                Some(m) => m.clone(),
                None => {
                    let m = self.ctx.load_module(Ptx::from_binary(module.image().to_vec()))?;
                    modules.insert(module, m.clone());
                    m
                }
            }
        };
        let f = m.load_function(name)?;
        self.functions.lock().unwrap().insert(name.to_string(), f.clone());
        Ok(f)
    }
}
