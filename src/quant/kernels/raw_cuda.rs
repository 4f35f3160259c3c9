//! CUDA C++ kernels launched through CubeCL's own runtime (compiled by nvrtc like every
//! CubeCL kernel, cached the same way, and queued on the same stream), for the code that
//! CubeCL 0.10's kernel language cannot express: byte offsets into shared memory and
//! tensor-core fragments held in registers (`mma.sync`).
//!
//! A [`RawCudaKernel`] is a complete `extern "C" __global__` source. Its parameters are the
//! buffers' device pointers in the order given to [`launch_raw`], then one by-value struct of
//! `u64` words (the scalars): CubeCL passes kernel scalars that way on every card with grid
//! constants (compute capability 7.0 and newer, which the callers check).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::{
    AddressType, CompiledKernel, ComputeClient, KernelDefinition, KernelId, KernelMetadata,
    KernelOptions, Scope, StorageType,
};
use cubecl::server::{KernelArguments, MetadataBindingInfo};
use cubecl::{CompilationError, Compiler, CubeCount, CubeDim, CubeTask, ExecutionMode};

/// A CUDA C++ kernel: its source, entry point and cube size.
#[derive(Clone, Debug)]
pub struct RawCudaKernel {
    /// The whole translation unit (no includes needed beyond nvrtc's built-ins).
    source: Arc<str>,
    /// The `extern "C"` entry point's name.
    entry: &'static str,
    /// Threads per cube.
    cube_dim: CubeDim,
    /// A hash of the source (the kernel's whole configuration), part of its id.
    key: u64,
}

impl RawCudaKernel {
    /// `source`'s kernel `entry` on cubes of `cube_dim` threads; the source is hashed here, once,
    /// not on every launch.
    pub fn new(source: String, entry: &'static str, cube_dim: CubeDim) -> Self {
        let mut h = DefaultHasher::new();
        source.hash(&mut h);
        Self {
            source: source.into(),
            entry,
            cube_dim,
            key: h.finish(),
        }
    }

    /// The kernel's source.
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl KernelMetadata for RawCudaKernel {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>()
            .info((self.entry, self.key))
            .cube_dim(self.cube_dim)
            .address_type(AddressType::U32)
    }

    fn address_type(&self) -> StorageType {
        AddressType::U32.unsigned_type()
    }
}

impl<C: Compiler> CubeTask<C> for RawCudaKernel {
    fn compile(
        &self,
        compiler: &mut C,
        options: &C::CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CompiledKernel<C>, CompilationError> {
        // The runtime wants its own representation next to the source (it reads the shared
        // memory to reserve from it): an empty kernel's, which reserves none. The source's
        // static `__shared__` arrays are sized by nvrtc.
        let empty = KernelDefinition {
            buffers: Vec::new(),
            tensor_maps: Vec::new(),
            scalars: Vec::new(),
            cube_dim: self.cube_dim,
            body: Scope::root(false),
            options: KernelOptions {
                kernel_name: self.entry.into(),
                debug_symbols: false,
                cluster_dim: None,
            },
        };
        let repr = compiler.compile(empty, options, mode, address_type)?;
        Ok(CompiledKernel {
            entrypoint_name: self.entry.into(),
            debug_name: Some(self.entry),
            source: self.source.to_string(),
            repr: Some(repr),
            cube_dim: self.cube_dim,
            debug_info: None,
        })
    }
}

/// Whether `client` runs CUDA, where a [`RawCudaKernel`] can be launched.
pub fn is_cuda<R: CubeRuntime>(client: &ComputeClient<R>) -> bool {
    R::name(client) == "cuda"
}

/// Queues `kernel` on `count` cubes with `buffers` as its pointer parameters (in order) and
/// `scalars` as its final by-value struct.
///
/// # Safety
/// The source must read and write only inside the buffers it is given, for every cube of
/// `count`, and its parameter list must match `buffers` and `scalars`.
pub unsafe fn launch_raw<R: CubeRuntime>(
    client: &ComputeClient<R>,
    kernel: RawCudaKernel,
    count: CubeCount,
    buffers: &[&CubeTensor<R>],
    scalars: Vec<u64>,
) {
    debug_assert!(is_cuda(client), "raw CUDA kernels need the CUDA runtime");
    let mut args = KernelArguments::new();
    for b in buffers {
        args = args.with_buffer(b.handle.clone().binding());
    }
    // All of it static: a dynamic part would go in as one more pointer before the struct.
    let words = scalars.len();
    args.info = MetadataBindingInfo::new(scalars, words);
    // SAFETY: the caller vouches for the kernel's indexing (see above).
    unsafe { client.launch_unchecked(Box::new(kernel), count, args) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubecl::cuda::CudaCompiler;

    #[test]
    fn raw_kernel_compiles_to_its_own_source_and_entry() {
        let source = "extern \"C\" __global__ void probe(float* out) { out[0] = 1.0f; }";
        let kernel = RawCudaKernel::new(source.into(), "probe", CubeDim::new_1d(64));
        let compiled = CubeTask::<CudaCompiler>::compile(
            &kernel,
            &mut CudaCompiler::default(),
            &Default::default(),
            ExecutionMode::Unchecked,
            AddressType::U32.unsigned_type(),
        )
        .unwrap();
        assert_eq!(compiled.source, source);
        assert_eq!(compiled.entrypoint_name, "probe");
        assert_eq!(compiled.cube_dim, CubeDim::new_1d(64));
        assert_eq!(compiled.repr.unwrap().shared_memory_size(), 0);
        // Different sources are different kernels to the runtime's cache.
        let other =
            RawCudaKernel::new(source.replace("1.0f", "2.0f"), "probe", CubeDim::new_1d(64));
        assert_ne!(kernel.id(), other.id());
    }
}
