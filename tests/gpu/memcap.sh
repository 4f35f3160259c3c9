#!/usr/bin/env bash
# Run a CUDA program as if the GPU had only MIB of memory (tests/gpu/memcap.c says how).
#   tests/gpu/memcap.sh MIB COMMAND...   e.g. tests/gpu/memcap.sh 8192 /tmp/qv bench train ...
#   tests/gpu/memcap.sh selftest         check the shim against a fake driver (no GPU needed)
# Needs gcc. The line "memcap: cap C MiB, peak allocated P MiB, refused R" ends COMMAND's stderr;
# R > 0 means the program asked for more than the cap at some point.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

build() { # build DIR DRIVER: DIR/libcuda.so forwarding to DRIVER (a libcuda.so.1)
  mkdir -p "$1"
  gcc -O2 -Wall -shared -fPIC -Wl,-soname,libcuda.so -o "$1/libcuda.so" "$here/memcap.c" \
    -Wl,--no-as-needed "$2" -ldl -lpthread
}

if [ "${1:-}" = selftest ]; then
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  mkdir -p "$dir/fake"
  cat > "$dir/fake.c" <<'EOF'
#include <stddef.h>
static unsigned long long next = 1 << 20;
int cuInit(unsigned f) { return 0; }
int cuDeviceTotalMem_v2(size_t *b, int d) { *b = 150ull << 30; return 0; }
int cuMemAllocAsync(unsigned long long *p, size_t n, void *s) { *p = next; next += n + 256; return 0; }
int cuMemFreeAsync(unsigned long long p, void *s) { return 0; }
EOF
  cat > "$dir/probe.c" <<'EOF'
#include <dlfcn.h>
#include <stdio.h>
int main(void) { /* looks functions up the way cudarc does: dlopen("libcuda.so"), then dlsym */
  void *h = dlopen("libcuda.so", RTLD_NOW);
  if (!h) { puts(dlerror()); return 1; }
  int (*init)(unsigned) = dlsym(h, "cuInit");
  int (*total)(size_t *, int) = dlsym(h, "cuDeviceTotalMem_v2");
  int (*alloc)(unsigned long long *, size_t, void *) = dlsym(h, "cuMemAllocAsync");
  int (*release)(unsigned long long, void *) = dlsym(h, "cuMemFreeAsync");
  if (!init || !total || !alloc || !release) { puts("missing symbol"); return 1; }
  size_t t; unsigned long long a, b;
  total(&t, 0);
  int r1 = alloc(&a, 6ull << 30, 0), r2 = alloc(&b, 3ull << 30, 0);
  release(a, 0);
  int r3 = alloc(&b, 3ull << 30, 0);
  printf("%d %zu %d %d %d\n", init(0), t >> 20, r1, r2, r3);
  return 0;
}
EOF
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/fake/libcuda.so.1" "$dir/fake.c"
  build "$dir/shim" "$dir/fake/libcuda.so.1"
  gcc -o "$dir/probe" "$dir/probe.c" -ldl
  got=$(LD_LIBRARY_PATH="$dir/shim:$dir/fake" MEMCAP_MIB=8192 "$dir/probe" 2>/dev/null)
  # cuInit forwarded (0), total capped to 8192 MiB, 6 GiB fits, 3 more refused (2), fits after a free.
  if [ "$got" = "0 8192 0 2 0" ]; then echo "memcap selftest: ok"; else echo "memcap selftest: got '$got'"; exit 1; fi
  exit 0
fi

mib=$1
shift
driver=$(ldconfig -p | awk '$1 == "libcuda.so.1" { print $NF; exit }')
[ -n "$driver" ] || { echo "memcap: no libcuda.so.1 in ldconfig's cache" >&2; exit 1; }
dir=/tmp/memcap-shim
[ -f "$dir/libcuda.so" ] || build "$dir" "$driver"
LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" MEMCAP_MIB=$mib exec "$@"
