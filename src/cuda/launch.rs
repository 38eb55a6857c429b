//! Where a planned kernel launch runs: on a GPU stream (cudarc), or on the CPU through the SIMT
//! emulator (feature `emulator`). Every launcher validates its inputs and packs the parameter
//! struct once, then hands the [`Launch`] to a [`Backend`]; so the emulator exercises exactly
//! the validation, parameter packing, grid and shared-memory sizing that a GPU call uses.

use super::device::{Gpu, Module};
use super::scores::set_smem;
use crate::error::Result;
use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// One kernel launch, fully planned: which kernel, the grid, and its parameter struct.
pub(crate) struct Launch<P> {
    pub module: Module,
    pub name: String,
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub smem: usize,
    pub params: P,
}

/// Something that runs planned launches in order (a stream, or the emulator).
pub(crate) trait Backend {
    fn run<P: DeviceRepr + Copy>(&self, launch: &Launch<P>) -> Result<()>;
    /// Shared memory of one SM in bytes (0 if unknown): what a launcher may spend without
    /// costing the kernel a resident block (decode's base steps).
    fn smem_per_sm(&self) -> usize;
}

/// Launches on the caller's stream; nothing synchronizes.
pub(crate) struct OnStream<'a> {
    pub gpu: &'a Gpu,
    pub stream: &'a Arc<CudaStream>,
}

impl<'a> OnStream<'a> {
    /// The stream must belong to the Gpu's context (kernels are loaded per context).
    pub fn new(gpu: &'a Gpu, stream: &'a Arc<CudaStream>) -> Result<Self> {
        gpu.check_stream(stream)?;
        Ok(OnStream { gpu, stream })
    }
}

impl Backend for OnStream<'_> {
    fn run<P: DeviceRepr + Copy>(&self, l: &Launch<P>) -> Result<()> {
        let func = self.gpu.function(l.module, &l.name)?;
        set_smem(&func, l.smem)?;
        let cfg = LaunchConfig { grid_dim: l.grid, block_dim: (l.threads, 1, 1), shared_mem_bytes: l.smem as u32 };
        let mut b = self.stream.launch_builder(&func);
        b.arg(&l.params);
        // SAFETY: every parameter struct mirrors its kernel's (tests/abi_layout.rs), and the
        // launcher that planned this launch checked each buffer against the extents the kernel
        // touches before packing its address.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    fn smem_per_sm(&self) -> usize {
        self.gpu.smem_per_sm()
    }
}
