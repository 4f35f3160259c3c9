/* memcap: make one CUDA process see, and be held to, a smaller GPU (e.g. an 8 GB card on an H200).
 *
 * Built as a library named libcuda.so (tests/gpu/memcap.sh builds it) and put first on
 * LD_LIBRARY_PATH. cudarc (burn-cuda's driver binding) dlopens "libcuda.so" first and looks every
 * driver function up in that library and its dependencies; this one depends on the real driver
 * (libcuda.so.1), so every function it does not define comes from the driver unchanged. It defines:
 *   cuDeviceTotalMem_v2, cuMemGetInfo_v2  report at most MEMCAP_MIB of device memory (CubeCL sizes
 *                                         its memory pools from the total, as on a smaller card)
 *   cuMemAlloc_v2, cuMemAllocAsync        refuse (CUDA_ERROR_OUT_OF_MEMORY) an allocation that would
 *                                         take the process's live device allocations past the cap
 *   cuMemFree_v2, cuMemFreeAsync          give the bytes back
 * At exit (after any allocation) it prints to stderr "memcap: cap C MiB, peak allocated P MiB,
 * refused R".
 * What it cannot count: the CUDA context and loaded kernels (nvidia-smi shows them; an H200's are
 * larger than a consumer card's).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUstream;
enum { CUDA_SUCCESS = 0, CUDA_ERROR_OUT_OF_MEMORY = 2 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static size_t cap_bytes, used_bytes, peak_bytes;
static unsigned long refused;

/* Live allocations: open addressing on the pointer, tombstones on free. */
#define SLOTS (1u << 18)
static CUdeviceptr slot_ptr[SLOTS];
static size_t slot_size[SLOTS];
static const CUdeviceptr TOMBSTONE = ~0ull;

static size_t slot_of(CUdeviceptr p) { return (size_t)((p >> 8) * 0x9E3779B97F4A7C15ull) & (SLOTS - 1); }

static void remember(CUdeviceptr p, size_t n) {
    for (size_t i = slot_of(p);; i = (i + 1) & (SLOTS - 1))
        if (slot_ptr[i] == 0 || slot_ptr[i] == TOMBSTONE) {
            slot_ptr[i] = p;
            slot_size[i] = n;
            return;
        }
}

static size_t forget(CUdeviceptr p) {
    for (size_t i = slot_of(p); slot_ptr[i] != 0; i = (i + 1) & (SLOTS - 1))
        if (slot_ptr[i] == p) {
            slot_ptr[i] = TOMBSTONE;
            return slot_size[i];
        }
    return 0;
}

static void *real(const char *name) {
    static void *driver;
    if (!driver) driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!driver) driver = dlopen("libcuda.so.1", RTLD_NOW);
    void *f = driver ? dlsym(driver, name) : NULL;
    if (!f) {
        fprintf(stderr, "memcap: the real driver has no %s\n", name);
        abort();
    }
    return f;
}

__attribute__((constructor)) static void start(void) {
    const char *mib = getenv("MEMCAP_MIB");
    cap_bytes = (size_t)(mib ? strtoull(mib, NULL, 10) : 8192) << 20;
}

/* Driver probes load and unload the library before the real use: report only after allocations. */
__attribute__((destructor)) static void report(void) {
    if (peak_bytes == 0 && refused == 0) return;
    fprintf(stderr, "memcap: cap %zu MiB, peak allocated %zu MiB, refused %lu\n", cap_bytes >> 20,
            peak_bytes >> 20, refused);
}

/* Reserve n bytes under the cap; 0 when the allocation must be refused. */
static int reserve(size_t n) {
    pthread_mutex_lock(&lock);
    int ok = used_bytes + n <= cap_bytes;
    if (ok) {
        used_bytes += n;
        if (used_bytes > peak_bytes) peak_bytes = used_bytes;
    } else {
        refused++;
    }
    pthread_mutex_unlock(&lock);
    return ok;
}

static void settle(CUresult r, CUdeviceptr p, size_t n) {
    pthread_mutex_lock(&lock);
    if (r == CUDA_SUCCESS) remember(p, n);
    else used_bytes -= n;
    pthread_mutex_unlock(&lock);
}

static void release(CUdeviceptr p) {
    pthread_mutex_lock(&lock);
    used_bytes -= forget(p);
    pthread_mutex_unlock(&lock);
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    CUresult r = ((CUresult(*)(size_t *, CUdevice))real("cuDeviceTotalMem_v2"))(bytes, dev);
    if (r == CUDA_SUCCESS && *bytes > cap_bytes) *bytes = cap_bytes;
    return r;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    CUresult r = ((CUresult(*)(size_t *, size_t *))real("cuMemGetInfo_v2"))(free_bytes, total_bytes);
    if (r != CUDA_SUCCESS) return r;
    pthread_mutex_lock(&lock);
    size_t left = cap_bytes - used_bytes;
    pthread_mutex_unlock(&lock);
    if (*total_bytes > cap_bytes) *total_bytes = cap_bytes;
    if (*free_bytes > left) *free_bytes = left;
    return r;
}

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    if (!reserve(n)) return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = ((CUresult(*)(CUdeviceptr *, size_t))real("cuMemAlloc_v2"))(p, n);
    settle(r, *p, n);
    return r;
}

CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, CUstream s) {
    if (!reserve(n)) return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = ((CUresult(*)(CUdeviceptr *, size_t, CUstream))real("cuMemAllocAsync"))(p, n, s);
    settle(r, *p, n);
    return r;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    release(p);
    return ((CUresult(*)(CUdeviceptr))real("cuMemFree_v2"))(p);
}

CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    release(p);
    return ((CUresult(*)(CUdeviceptr, CUstream))real("cuMemFreeAsync"))(p, s);
}
