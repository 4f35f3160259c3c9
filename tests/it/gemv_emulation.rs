//! The CUDA C++ NF4 GEMVs (`src/quant/kernels/gemv_mma.cu` and `gemv_row.cu`) run on CPU
//! threads against a double reference by `tests/gpu/gemv_emulate.py` (g++, C++20): their
//! tiles, warps, chunks, fragment layout, shared-memory layout, padded row pitches and the
//! row kernel's cp.async groups (copies land only at their wait) are checked here without a
//! GPU; the GPU checks are `bench nf4 --checks gemv`.

use std::process::Command;

#[test]
fn gemv_sources_match_the_reference_on_cpu_threads() {
    let out = Command::new("python3")
        .arg("tests/gpu/gemv_emulate.py")
        .output()
        .expect("python3 runs tests/gpu/gemv_emulate.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "emulated GEMV failed:\n{text}");
    // 6 configurations of the mma kernel; 12 of the row kernel: W in registers or through its
    // cp.async ring of whole-line slots (below or above the pair table), f16 and bf16.
    assert_eq!(text.matches(" ok").count(), 18, "{text}");
}
