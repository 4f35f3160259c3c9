//! CUDA C++ kernels launched through CubeCL's own runtime (compiled by nvrtc like every
//! CubeCL kernel, cached the same way, and queued on the same stream), for the code that
//! CubeCL 0.10's kernel language cannot express: byte offsets into shared memory and
//! tensor-core fragments held in registers (`mma.sync`).
//!
//! A [`RawCudaKernel`] is a complete `extern "C" __global__` source. Its parameters are the
//! buffers' device pointers in the order given to [`launch_raw`], then one by-value struct of
//! `u64` words (the scalars): CubeCL passes kernel scalars that way on every card with grid
//! constants (compute capability 7.0 and newer, which the callers check).
//!
//! Shared memory: static `__shared__` arrays (at most 48 KiB), or a dynamic
//! `extern __shared__` array of [`RawCudaKernel::with_dynamic_shared`] bytes, which may be
//! larger (CubeCL raises the kernel's limit to it before each launch).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::ir::{
    ConstantValue, ElemType, IndexAssignOperator, Instruction, Operator, Type, UIntKind, Variable,
};
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
    /// Bytes of dynamic shared memory each cube gets (`extern __shared__`).
    dynamic_shared: usize,
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
            dynamic_shared: 0,
        }
    }

    /// The same kernel with `bytes` of dynamic shared memory per cube.
    pub fn with_dynamic_shared(self, bytes: usize) -> Self {
        Self {
            dynamic_shared: bytes,
            ..self
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
            .info((self.entry, self.key, self.dynamic_shared))
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
        // The runtime wants its own representation next to the source: it launches with as
        // much dynamic shared memory as that reserves. So the representation is a kernel
        // that only writes one word of a shared array of `dynamic_shared` bytes (none when 0);
        // the source's static `__shared__` arrays are sized by nvrtc.
        let mut body = Scope::root(false);
        if self.dynamic_shared > 0 {
            let word = Type::new(StorageType::Scalar(ElemType::UInt(UIntKind::U32)));
            let smem = *body.create_shared_array(word, self.dynamic_shared.div_ceil(4), Some(16));
            let zero = Variable::constant(ConstantValue::UInt(0), word);
            body.register(Instruction::new(
                Operator::UncheckedIndexAssign(IndexAssignOperator {
                    index: zero,
                    value: zero,
                    vector_size: 0,
                    unroll_factor: 1,
                }),
                smem,
            ));
        }
        let empty = KernelDefinition {
            buffers: Vec::new(),
            tensor_maps: Vec::new(),
            scalars: Vec::new(),
            cube_dim: self.cube_dim,
            body,
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

/// A kernel configuration: `#define` names and values, put in front of the source.
pub type Defines = Vec<(&'static str, usize)>;

/// `source` after one `#define NAME VALUEu` line per entry of `defines`.
pub fn with_defines(defines: &Defines, source: &str) -> String {
    let mut s: String = defines
        .iter()
        .map(|(k, v)| format!("#define {k} {v}u\n"))
        .collect();
    s.push_str(source);
    s
}

/// The kernel `entry` of `source` configured by `defines`, on cubes of `threads` threads with
/// `dynamic_shared` bytes of dynamic shared memory: built (source and hash) on the
/// configuration's first call only, since decoding calls the same few configurations once per
/// layer and token.
pub fn configured_kernel(
    source: &'static str,
    entry: &'static str,
    defines: Defines,
    threads: u32,
    dynamic_shared: usize,
) -> RawCudaKernel {
    type Key = (&'static str, Defines, u32, usize);
    static KERNELS: OnceLock<Mutex<HashMap<Key, RawCudaKernel>>> = OnceLock::new();
    let mut kernels = KERNELS.get_or_init(Default::default).lock().unwrap();
    let key = (entry, defines, threads, dynamic_shared);
    kernels
        .entry(key)
        .or_insert_with_key(|(entry, defines, threads, dynamic_shared)| {
            RawCudaKernel::new(
                with_defines(defines, source),
                entry,
                CubeDim::new_1d(*threads),
            )
            .with_dynamic_shared(*dynamic_shared)
        })
        .clone()
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

    fn compile(kernel: &RawCudaKernel) -> CompiledKernel<CudaCompiler> {
        CubeTask::<CudaCompiler>::compile(
            kernel,
            &mut CudaCompiler::default(),
            &Default::default(),
            ExecutionMode::Unchecked,
            AddressType::U32.unsigned_type(),
        )
        .unwrap()
    }

    #[test]
    fn raw_kernel_compiles_to_its_own_source_and_entry() {
        let source = "extern \"C\" __global__ void probe(float* out) { out[0] = 1.0f; }";
        let kernel = RawCudaKernel::new(source.into(), "probe", CubeDim::new_1d(64));
        let compiled = compile(&kernel);
        assert_eq!(compiled.source, source);
        assert_eq!(compiled.entrypoint_name, "probe");
        assert_eq!(compiled.cube_dim, CubeDim::new_1d(64));
        assert_eq!(compiled.repr.unwrap().shared_memory_size(), 0);
        // Different sources are different kernels to the runtime's cache.
        let other =
            RawCudaKernel::new(source.replace("1.0f", "2.0f"), "probe", CubeDim::new_1d(64));
        assert_ne!(kernel.id(), other.id());
    }

    #[test]
    fn raw_kernel_reserves_its_dynamic_shared_memory() {
        let source = "extern \"C\" __global__ void probe(float* out) { out[0] = 1.0f; }";
        let bytes = 63 * 1024;
        let kernel = RawCudaKernel::new(source.into(), "probe", CubeDim::new_1d(64))
            .with_dynamic_shared(bytes);
        let compiled = compile(&kernel);
        assert_eq!(compiled.source, source);
        let reserved = compiled.repr.unwrap().shared_memory_size();
        assert!(
            (bytes..bytes + 16).contains(&reserved),
            "{reserved} bytes reserved"
        );
        let plain = RawCudaKernel::new(source.into(), "probe", CubeDim::new_1d(64));
        assert_ne!(kernel.id(), plain.id());
    }
}
