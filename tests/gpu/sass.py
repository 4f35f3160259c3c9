#!/usr/bin/env python3
"""SASS of a CUDA C++ kernel source, compiled the way CubeCL does it, without a GPU.

nvrtc (--gpu-architecture=sm_90a -lineinfo, CubeCL's options) -> PTX -> ptxas -> cubin ->
cuobjdump -sass; prints ptxas's register and spill report and an opcode histogram, and writes
OUT.ptx, OUT.cubin and OUT.sass. The tools come from NVIDIA's PyPI wheels (no CUDA install):

  pip download --no-deps "nvidia-cuda-nvcc>=13,<13.1" "nvidia-cuda-nvrtc>=13,<13.1" \\
      nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm -d /tmp/cu
  for f in /tmp/cu/*.whl; do unzip -qo "$f" -d /tmp/cu/x; done
  CUDA_WHEELS=/tmp/cu/x/nvidia/cu13 tests/gpu/sass.py OUT SOURCE... -D NAME=VALUE...

The sources are concatenated after the #defines (e.g. gemv_common.cuh, then gemv_row.cu).
"""
import collections
import ctypes
import os
import re
import subprocess
import sys


def nvrtc_ptx(lib, src: str, arch: str) -> str:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-lineinfo"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit("nvrtc failed:\n" + log.value.decode())
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    out, rest = args[0], args[1:]
    defines = [a[2:] for a in rest if a.startswith("-D")]
    sources = [a for a in rest if not a.startswith("-D")]
    cu = os.environ.get("CUDA_WHEELS", "/tmp/cu/x/nvidia/cu13")
    os.environ["PATH"] = f"{cu}/bin:" + os.environ["PATH"]
    # nvrtc finds its builtins library next to itself only through the loader's path.
    ctypes.CDLL(f"{cu}/lib/libnvrtc-builtins.so.13.0", mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(f"{cu}/lib/libnvrtc.so.13")
    src = "".join(f"#define {d.split('=')[0]} {d.split('=')[1]}u\n" for d in defines)
    src += "".join(open(s).read() for s in sources)
    with open(out + ".ptx", "w") as f:
        f.write(nvrtc_ptx(lib, src, "sm_90a"))
    subprocess.run(["ptxas", "-arch=sm_90a", "-v", out + ".ptx", "-o", out + ".cubin"], check=True)
    sass = subprocess.run(
        ["cuobjdump", "-sass", out + ".cubin"], check=True, capture_output=True, text=True
    ).stdout
    with open(out + ".sass", "w") as f:
        f.write(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(2)] += 1
    print(sum(ops.values()), "instructions:", " ".join(f"{k} {v}" for k, v in ops.most_common(16)))


if __name__ == "__main__":
    main()
