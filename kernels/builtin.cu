// hipvisor's built-in kernels, for real GPUs. One source for both toolchains:
// - HIP: compiled to a code object by `hipcc --genco -x hip` at build time (feature `hip`);
// - CUDA: compiled by NVRTC at run time for the device present (feature `cuda`).
// Semantics match hipvisor_core::kernels (the simulator's CPU implementations): element i
// is handled by the thread with linear global index i, and only i < n is touched.
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#endif

__device__ __forceinline__ unsigned long long hv_global_index() {
    unsigned long long block = ((unsigned long long)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    unsigned long long threads = (unsigned long long)blockDim.x * blockDim.y * blockDim.z;
    unsigned long long thread = ((unsigned long long)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    return block * threads + thread;
}

extern "C" __global__ void fill(unsigned int* out, unsigned int value, unsigned int n) {
    unsigned long long i = hv_global_index();
    if (i < n) out[i] = value;
}

extern "C" __global__ void vector_add(const float* a, const float* b, float* out, unsigned int n) {
    unsigned long long i = hv_global_index();
    if (i < n) out[i] = a[i] + b[i];
}

// One rounding, like f32::mul_add in the reference.
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned int n) {
    unsigned long long i = hv_global_index();
    if (i < n) y[i] = fmaf(a, x[i], y[i]);
}

extern "C" __global__ void scale(float* x, float factor, unsigned int n) {
    unsigned long long i = hv_global_index();
    if (i < n) x[i] = x[i] * factor;
}

// out[0] += sum(data[0..n]), wrapping in 64 bits.
extern "C" __global__ void checksum(const unsigned int* data, unsigned int n, unsigned long long* out) {
    unsigned long long i = hv_global_index();
    if (i < n) atomicAdd(out, (unsigned long long)data[i]);
}

// y[i] = b[i] + sum_j w[i*cols + j] * x[j], one row per thread, row-major w of n rows. The
// terms are added in order of j, each with one rounding (fmaf): the reference's exact bits.
extern "C" __global__ void gemv(const float* w, const float* x, const float* b, float* y, unsigned int n,
                                unsigned int cols) {
    unsigned long long i = hv_global_index();
    if (i >= n) return;
    const float* row = w + i * (unsigned long long)cols;
    float acc = b[i];
    for (unsigned int j = 0; j < cols; ++j) acc = fmaf(row[j], x[j], acc);
    y[i] = acc;
}

// x[i] = x[i] > 0 ? x[i] : 0 (NaN and -0 become +0, as in the reference; not fmaxf, whose
// sign of a zero result is unspecified).
extern "C" __global__ void relu(float* x, unsigned int n) {
    unsigned long long i = hv_global_index();
    if (i < n) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

// Test-only: writes through a pointer into unmapped memory, a sticky illegal-address fault.
extern "C" __global__ void fault_illegal_address() {
    volatile unsigned int* bad = (volatile unsigned int*)0xdead0000000ull;
    *bad = 42u;
}
