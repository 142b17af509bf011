// Source of ptxas_nvcc_multi_sm80_sm90.txt (see README.md): two kernels, one calling a
// non-inlined device function with a local array.
__device__ __noinline__ float helper(const float* x, int k) { float b[16]; for (int j=0;j<16;++j) b[j]=x[j]; return b[k&15]; }
extern "C" __global__ void k_a(const float* x, float* y, int k) { y[threadIdx.x] = helper(x, k); }
extern "C" __global__ void k_b(const float* x, float* y) { y[threadIdx.x] = x[threadIdx.x] + 1.f; }
