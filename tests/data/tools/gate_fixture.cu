// Fixture for the resource gate's CUDA path (tests/test_gate.py); not part of FlashCore.
// FC_FIXTURE_MODE selects what ptxas will report, so one source yields a clean kernel and two
// that break a budget:
//   0: clean (a handful of registers, no stack, no spills)
//   1: a local array indexed at run time: ptxas must place it in local memory (stack frame)
//   2: 64 live values under __launch_bounds__(128, 16), which caps ptxas at 32 registers per
//      thread, so it spills
// FC_STATIC_SMEM adds a static __shared__ buffer of that many floats (the gate adds static and
// dynamic shared memory).
#ifndef FC_FIXTURE_MODE
#define FC_FIXTURE_MODE 0
#endif
#ifndef FC_STATIC_SMEM
#define FC_STATIC_SMEM 0
#endif

#if FC_FIXTURE_MODE == 2
#define FC_MIN_BLOCKS 16
#else
#define FC_MIN_BLOCKS 1
#endif

extern "C" __global__ void __launch_bounds__(128, FC_MIN_BLOCKS)
fixture_kernel(const float* __restrict__ x, float* __restrict__ y, int n, int k) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float r = 0.0f;
#if FC_FIXTURE_MODE == 0
    r = 2.0f * x[i];
#elif FC_FIXTURE_MODE == 1
    float buf[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) buf[j] = x[(i + j) % n];
    r = buf[k & 63];  // run-time index: buf cannot live in registers
#else
    float v[64];
#pragma unroll
    for (int j = 0; j < 64; ++j) v[j] = x[(i + j * k) % n];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
#pragma unroll
        for (int j = 0; j < 64; ++j) v[j] = v[j] * v[(j + t + 1) & 63] + v[(j * 7 + t) & 63];
    }
#pragma unroll
    for (int j = 0; j < 64; ++j) r += v[j];
#endif
#if FC_STATIC_SMEM > 0
    __shared__ float stage[FC_STATIC_SMEM];
    stage[threadIdx.x % FC_STATIC_SMEM] = r;
    __syncthreads();
    r += stage[(threadIdx.x + 1) % FC_STATIC_SMEM];
#endif
    y[i] = r;
}
