#!/usr/bin/env bash
# Carry CubeCL's kernel caches between fresh GPU machines (each device call may start bare, and
# a cold start compiles and autotunes hundreds of kernels for minutes).
#   tests/gpu/kernel_cache.sh env            print the exports that put every cache under target/
#   tests/gpu/kernel_cache.sh unpack DIR     restore DIR/kcache.tgz.* into target/ (if present)
#   tests/gpu/kernel_cache.sh pack OUT       write CubeCL's caches (xz, else gzip) as OUT/kcache.tgz.aa, .ab, ...
#                                            (15 MB pieces: the device returns files up to 16 MiB,
#                                            at most 64 MiB in all)
# CubeCL keeps autotune results (target/autotune, ~0.4 MB for the 4B training step) and PTX
# (target/cuda, ~110 MB) under target/ (cubecl.toml: [compilation] cache = "target"). The
# autotune folder is packed first: it alone spares compiling every candidate kernel. The
# driver's PTX->SASS cache (target/nvcache via CUDA_CACHE_PATH, ~420 MB) is not packed: too big
# to come back (tests/NOTES.md, session 5).
set -euo pipefail
case "${1:-}" in
  env)
    echo "export CUDA_CACHE_PATH=$PWD/target/nvcache CUDA_CACHE_MAXSIZE=4294967296" ;;
  unpack)
    mkdir -p target
    if ls "$2"/kcache.tgz.* >/dev/null 2>&1; then
      # xz (starts with 0xFD '7zXZ') or gzip, whichever pack found.
      if [ "$(head -c 5 "$(ls "$2"/kcache.tgz.* | head -n 1)" | tail -c 4)" = "7zXZ" ]; then unsqueeze="xz -dc"; else unsqueeze="gzip -dc"; fi
      cat "$2"/kcache.tgz.* | $unsqueeze | tar -C target -xf -
      echo "kernel cache restored: $(du -sh target | cut -f1)"
    else
      echo "no kernel cache in $2"
    fi ;;
  pack)
    mkdir -p "$2" target
    dirs=$(cd target && ls -d autotune cuda 2>/dev/null || true)
    # PTX is text: xz shrinks it ~10x where gzip -1 gave ~4x.
    if command -v xz >/dev/null; then squeeze="xz -T0 -6"; else squeeze="gzip -9"; fi
    tar -C target -cf - $dirs | $squeeze | split -b 15000000 - "$2/kcache.tgz."
    ls -l "$2"/kcache.tgz.* ;;
  *)
    echo "usage: $0 env | unpack DIR | pack OUT" >&2; exit 2 ;;
esac
