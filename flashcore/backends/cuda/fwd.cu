// FlashCore forward attention in CUDA C++: WMMA + cuda::pipeline.
//
// One block computes BM query rows of one (batch, head). Its warps form FC_KV_GROUPS groups;
// within a group each warp owns a 16-row slice (BM = 16 * FC_NUM_WARPS / FC_KV_GROUPS), and the
// groups split every pipeline stage's keys between them (group g takes columns
// [g * BN, (g + 1) * BN) of each stage), merging their partial softmax states once at the end.
// Groups exist for small problems: with few blocks per SM they multiply the warps that work on
// the same rows. Each warp does its own share of BOTH matrix products with WMMA 16x16x16 (fp16/bf16 in,
// fp32 accumulate): S = Q_w K^T into BN/16 accumulator fragments, then O_w += P V into D/16
// accumulator fragments. S, P and O never leave registers: the online softmax (exp2 domain,
// scale folded into one multiply) and the O rescale work on the accumulator elements directly,
// using the accumulator layout of sm_80/sm_90 (checked at load time by
// flashcore_wmma_layout_probe), and P's matrix_a fragments are built from the S accumulators
// element by element (FC_P_REGS=1). WMMA does not promise that a matrix_a element sits in the
// same lane as the accumulator element with the same (row, col), so the host checks it first
// (flashcore_wmma_a_probe, with the element map FC_PA_MAP) and otherwise compiles FC_P_REGS=0,
// which stages P through a warp-private 16 x BN shared tile.
//
// K/V tiles stream through a FC_STAGES-deep ring in dynamic shared memory, filled with 16-byte
// cp.async copies through a thread-scope cuda::pipeline: every thread is a producer of its share
// of each tile and a consumer of the whole tile, so each consumer_wait() is followed by a block
// barrier before any thread reads the stage (the barrier also frees the stage read in the
// previous iteration for refilling).
//
// Compile-time configuration (-D): FC_NUM_WARPS, FC_BLOCK_N, FC_STAGES, FC_HEAD_DIM, FC_BF16,
// FC_CAUSAL, FC_KV_GROUPS (1, 2 or 4), FC_P_REGS, FC_PA_MAP. Requirements checked on the host: last dim contiguous, other strides multiples of
// 8 elements, 16-byte aligned base pointers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/pipeline>
#include <mma.h>

#ifndef FC_NUM_WARPS
#define FC_NUM_WARPS 4
#endif
#ifndef FC_BLOCK_N
#define FC_BLOCK_N 64
#endif
#ifndef FC_STAGES
#define FC_STAGES 2
#endif
#ifndef FC_HEAD_DIM
#define FC_HEAD_DIM 64
#endif
#ifndef FC_BF16
#define FC_BF16 0
#endif
#ifndef FC_CAUSAL
#define FC_CAUSAL 0
#endif
#ifndef FC_KV_GROUPS
#define FC_KV_GROUPS 1
#endif
#ifndef FC_P_REGS
#define FC_P_REGS 1
#endif
// Element e of a matrix_a fragment = accumulator element (FC_PA_MAP >> 4e) & 15 of the same
// lane (4 bits per element, up to 16 elements). sm_80/sm_90's m16n8k16 operand layout is the
// accumulator's, repeated for the fp16 fragment's upper 8 elements.
#ifndef FC_PA_MAP
#define FC_PA_MAP 0x7654321076543210ull
#endif

namespace wmma = nvcuda::wmma;

// NVRTC has no <math.h>, hence no INFINITY macro.
#define FC_NEG_INF (-__int_as_float(0x7f800000))

#if FC_BF16
typedef __nv_bfloat16 elem_t;
typedef __nv_bfloat162 elem2_t;
__device__ __forceinline__ elem2_t fc_pack2(float a, float b) { return __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ elem_t fc_elem(float a) { return __float2bfloat16_rn(a); }
__device__ __forceinline__ float fc_float(elem_t a) { return __bfloat162float(a); }
#else
typedef __half elem_t;
typedef __half2 elem2_t;
__device__ __forceinline__ elem2_t fc_pack2(float a, float b) { return __floats2half2_rn(a, b); }
__device__ __forceinline__ elem_t fc_elem(float a) { return __float2half_rn(a); }
__device__ __forceinline__ float fc_float(elem_t a) { return __half2float(a); }
#endif

constexpr int NW = FC_NUM_WARPS;
constexpr int NT = NW * 32;
constexpr int G = FC_KV_GROUPS;
constexpr int NSL = NW / G;    // 16-row slices per block
constexpr int BM = 16 * NSL;
constexpr int BN = FC_BLOCK_N; // keys per warp per stage
constexpr int BT = G * BN;     // keys per pipeline stage
constexpr int D = FC_HEAD_DIM;
constexpr int STAGES = FC_STAGES;
constexpr int LD = D + 8;      // smem pitch of Q/K/V rows (elements): 16 B skew, no bank conflicts
constexpr int LDP = BN + 8;    // smem pitch of a warp's P tile
constexpr int NJ = BN / 16;    // S fragments per warp
constexpr int ND = D / 16;     // O fragments per warp, and k-steps of Q K^T
constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
// Q fragments stay in registers for small head dims; for D = 128 they would cost 64 more
// registers per thread, so they are re-read from shared memory (8 loads per tile).
constexpr bool Q_IN_REGS = D <= 64;
// Unrolling the k-steps of Q K^T fully lets the compiler keep every K fragment of a tile in
// flight: bf16 at D = 128 then needs more than 255 registers and spills. Unroll by 2 there;
// with Q in registers the loop must unroll fully (qf[] indexed by constants only).
constexpr int QK_UNROLL = Q_IN_REGS ? ND : 2;
static_assert(BN % 16 == 0 && D % 16 == 0 && STAGES >= 2, "bad tile configuration");
static_assert(G == 1 || G == 2 || G == 4, "FC_KV_GROUPS must be 1, 2 or 4");
static_assert(NW % G == 0, "FC_NUM_WARPS must be a multiple of FC_KV_GROUPS");
// The group merge reuses the K/V ring: per group > 0, slice and lane, D/2 accumulators + m, l.
constexpr int XW = ND * 8 + 4;
static_assert(G == 1 || (G - 1) * NSL * XW * 32 * 4 <= 2 * STAGES * BT * LD * 2,
              "merge buffer too big");
__device__ __forceinline__ constexpr int fc_pa_idx(int e) { return (int)((FC_PA_MAP >> (4 * e)) & 15ull); }

typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_frag;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, elem_t, wmma::row_major> a_frag;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, elem_t, wmma::col_major> kt_frag;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, elem_t, wmma::row_major> v_frag;

// Accumulator element i (of 8) of a lane sits at (row, col) of the 16x16 tile below: the
// m16n8 C layout of mma.sync, twice (cols 0-7, then 8-15).
__device__ __forceinline__ int fc_acc_row(int lane, int i) { return (lane >> 2) + 8 * ((i >> 1) & 1); }
__device__ __forceinline__ int fc_acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1) + 8 * (i >> 2); }

// rows x D tile of src (row stride `stride`) starting at row0 into dst (pitch LD); rows at or
// past `limit` are zero-filled with ordinary stores (they join the next barrier's visibility).
template <int ROWS>
__device__ __forceinline__ void fc_load_tile(elem_t* dst, const elem_t* src, long long stride,
                                             int row0, int limit,
                                             cuda::pipeline<cuda::thread_scope_thread>& pipe) {
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += NT) {
    const int r = c / CHUNKS, ch = c - r * CHUNKS;
    elem_t* d = dst + r * LD + ch * 8;
    const int gr = row0 + r;
    if (gr < limit) {
      cuda::memcpy_async(d, src + gr * stride + ch * 8, cuda::aligned_size_t<16>(16), pipe);
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

extern "C" __global__ void __launch_bounds__(NT, 1)
flashcore_attn_fwd(const elem_t* __restrict__ Q, const elem_t* __restrict__ K,
                   const elem_t* __restrict__ V, elem_t* __restrict__ O, float* __restrict__ LSE,
                   long long sqb, long long sqh, long long sqs,
                   long long skb, long long skh, long long sks,
                   long long svb, long long svh, long long svs,
                   long long sob, long long soh, long long sos,
                   int Hq, int Sq, int Sk, int group, int causal_off, int store_lse,
                   float qk_scale) {
  extern __shared__ __align__(128) unsigned char fc_smem[];
  elem_t* sQ = reinterpret_cast<elem_t*>(fc_smem);
  elem_t* sK = sQ + BM * LD;
  elem_t* sV = sK + STAGES * BT * LD;
#if !FC_P_REGS
  elem_t* sP = sV + STAGES * BT * LD;
#endif

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slice = warp % NSL, grp = warp / NSL;
#if FC_CAUSAL
  // Causal blocks further down see more keys: schedule them first so the tail is short.
  const int mb = gridDim.x - 1 - blockIdx.x;
#else
  const int mb = blockIdx.x;
#endif
  const int bh = blockIdx.y, b = bh / Hq, h = bh - b * Hq, hk = h / group;
  const int m0 = mb * BM;
  const elem_t* q = Q + b * sqb + h * sqh;
  const elem_t* k = K + b * skb + hk * skh;
  const elem_t* v = V + b * svb + hk * svh;
  elem_t* o = O + b * sob + h * soh;

  int hi = Sk;
#if FC_CAUSAL
  hi = min(max(m0 + BM + causal_off, 0), Sk);
#endif
  const int n_tiles = (hi + BT - 1) / BT;
  const int w_row0 = m0 + slice * 16;    // first row of this warp
  const int r_lo = w_row0 + (lane >> 2); // rows of this lane's accumulator elements
  const int r_hi = r_lo + 8;

  float m_lo = FC_NEG_INF, m_hi = FC_NEG_INF, l_lo = 0.f, l_hi = 0.f;
  acc_frag acc_o[ND];
#pragma unroll
  for (int n = 0; n < ND; ++n) wmma::fill_fragment(acc_o[n], 0.f);

  if (n_tiles > 0) {
    cuda::pipeline<cuda::thread_scope_thread> pipe = cuda::make_pipeline();
    // Prologue: Q travels with tile 0; tiles 1 .. STAGES-2 follow, one commit group each.
    pipe.producer_acquire();
    fc_load_tile<BM>(sQ, q, sqs, m0, Sq, pipe);
    fc_load_tile<BT>(sK, k, sks, 0, Sk, pipe);
    fc_load_tile<BT>(sV, v, svs, 0, Sk, pipe);
    pipe.producer_commit();
#pragma unroll
    for (int s = 1; s < STAGES - 1; ++s) {
      pipe.producer_acquire();
      if (s < n_tiles) {
        fc_load_tile<BT>(sK + s * BT * LD, k, sks, s * BT, Sk, pipe);
        fc_load_tile<BT>(sV + s * BT * LD, v, svs, s * BT, Sk, pipe);
      }
      pipe.producer_commit();
    }

    a_frag qf[Q_IN_REGS ? ND : 1];
#if !FC_P_REGS
    elem_t* pw = sP + warp * 16 * LDP;  // this warp's P tile
#endif

    for (int t = 0; t < n_tiles; ++t) {
      pipe.consumer_wait();  // this thread's copies of tile t have landed
      __syncthreads();       // ... and everyone's; everyone is also done with tile t-1
      {
        const int nt = t + STAGES - 1;  // refill the stage tile t-1 used
        const int st = nt % STAGES;
        pipe.producer_acquire();
        if (nt < n_tiles) {
          fc_load_tile<BT>(sK + st * BT * LD, k, sks, nt * BT, Sk, pipe);
          fc_load_tile<BT>(sV + st * BT * LD, v, svs, nt * BT, Sk, pipe);
        }
        pipe.producer_commit();
      }
      if (Q_IN_REGS && t == 0) {
#pragma unroll
        for (int kk = 0; kk < ND; ++kk)
          wmma::load_matrix_sync(qf[Q_IN_REGS ? kk : 0], sQ + slice * 16 * LD + kk * 16, LD);
      }
      const elem_t* kt = sK + (t % STAGES) * BT * LD + grp * BN * LD;
      const elem_t* vt = sV + (t % STAGES) * BT * LD + grp * BN * LD;
      const int n0 = t * BT + grp * BN;  // first key of this warp's columns
#if FC_CAUSAL
      const bool warp_active = n0 < hi && n0 <= w_row0 + 15 + causal_off;
      const bool need_mask = (n0 + BN > Sk) || (n0 + BN - 1 > w_row0 + causal_off);
#else
      const bool warp_active = n0 < hi;
      const bool need_mask = n0 + BN > Sk;
#endif
      if (warp_active) {
        // S = Q_w K^T
        acc_frag s[NJ];
#pragma unroll
        for (int j = 0; j < NJ; ++j) wmma::fill_fragment(s[j], 0.f);
#pragma unroll QK_UNROLL
        for (int kk = 0; kk < ND; ++kk) {
          a_frag qa;
          if (Q_IN_REGS) {
            qa = qf[Q_IN_REGS ? kk : 0];
          } else {
            wmma::load_matrix_sync(qa, sQ + slice * 16 * LD + kk * 16, LD);
          }
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            kt_frag kb;
            wmma::load_matrix_sync(kb, kt + j * 16 * LD + kk * 16, LD);
            wmma::mma_sync(s[j], qa, kb, s[j]);
          }
        }
        // Online softmax on the accumulator elements (two rows per lane).
        float mx_lo = FC_NEG_INF, mx_hi = FC_NEG_INF;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            float x = s[j].x[i] * qk_scale;
            if (need_mask) {
              const int col = n0 + j * 16 + fc_acc_col(lane, i);
              const int row = (i & 2) ? r_hi : r_lo;
              bool ok = col < Sk;
#if FC_CAUSAL
              ok = ok && col <= row + causal_off;
#endif
              (void)row;
              x = ok ? x : FC_NEG_INF;
            }
            s[j].x[i] = x;
            if (i & 2) mx_hi = fmaxf(mx_hi, x); else mx_lo = fmaxf(mx_lo, x);
          }
        }
        // The four lanes of a quad hold the same two rows.
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        // A row with no visible key yet keeps m = -inf: subtract 0 so exp2 gives 0, not nan.
        const float ms_lo = mn_lo == FC_NEG_INF ? 0.f : mn_lo;
        const float ms_hi = mn_hi == FC_NEG_INF ? 0.f : mn_hi;
        const float al_lo = exp2f(m_lo - ms_lo), al_hi = exp2f(m_hi - ms_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float ps_lo = 0.f, ps_hi = 0.f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
          for (int i = 0; i < 8; i += 2) {
            const float ms = (i & 2) ? ms_hi : ms_lo;
            const float p0 = exp2f(s[j].x[i] - ms), p1 = exp2f(s[j].x[i + 1] - ms);
            if (i & 2) ps_hi += p0 + p1; else ps_lo += p0 + p1;
#if FC_P_REGS
            s[j].x[i] = p0;
            s[j].x[i + 1] = p1;
#else
            *reinterpret_cast<elem2_t*>(pw + fc_acc_row(lane, i) * LDP + j * 16 +
                                        fc_acc_col(lane, i)) = fc_pack2(p0, p1);
#endif
          }
        }
        // Per-lane partial row sums; the quad reduction waits until the end.
        l_lo = l_lo * al_lo + ps_lo;
        l_hi = l_hi * al_hi + ps_hi;
#pragma unroll
        for (int n = 0; n < ND; ++n) {
#pragma unroll
          for (int i = 0; i < 8; ++i) acc_o[n].x[i] *= (i & 2) ? al_hi : al_lo;
        }
        // O_w += P V
#if !FC_P_REGS
        __syncwarp();
#endif
#pragma unroll
        for (int kk = 0; kk < NJ; ++kk) {
          a_frag pa;
#if FC_P_REGS
#pragma unroll
          for (int e = 0; e < a_frag::num_elements; ++e) pa.x[e] = fc_elem(s[kk].x[fc_pa_idx(e)]);
#else
          wmma::load_matrix_sync(pa, pw + kk * 16, LDP);
#endif
#pragma unroll
          for (int n = 0; n < ND; ++n) {
            v_frag vb;
            wmma::load_matrix_sync(vb, vt + kk * 16 * LD + n * 16, LD);
            wmma::mma_sync(acc_o[n], pa, vb, acc_o[n]);
          }
        }
#if !FC_P_REGS
        __syncwarp();  // the P tile is rewritten next iteration
#endif
      }
      pipe.consumer_release();
    }
  }

  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
#if FC_KV_GROUPS > 1
  // Merge the softmax states of groups 1 .. G-1 into group 0's. The warps of a slice hold the
  // same rows in the same fragment layout, so lane i of one pairs with lane i of the others.
  __syncthreads();  // every warp is done with the K/V ring, which now carries the exchange
  if (grp > 0) {
    float* xw = reinterpret_cast<float*>(sK) + ((grp - 1) * NSL + slice) * XW * 32 + lane;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
      for (int i = 0; i < 8; ++i) xw[(n * 8 + i) * 32] = acc_o[n].x[i];
    }
    xw[(ND * 8 + 0) * 32] = m_lo;
    xw[(ND * 8 + 1) * 32] = m_hi;
    xw[(ND * 8 + 2) * 32] = l_lo;
    xw[(ND * 8 + 3) * 32] = l_hi;
  }
  __syncthreads();
  if (grp > 0) return;  // no block barrier follows
#pragma unroll
  for (int g = 1; g < G; ++g) {
    const float* xr = reinterpret_cast<const float*>(sK) + ((g - 1) * NSL + slice) * XW * 32 + lane;
    const float m2_lo = xr[(ND * 8 + 0) * 32], m2_hi = xr[(ND * 8 + 1) * 32];
    const float mn_lo = fmaxf(m_lo, m2_lo), mn_hi = fmaxf(m_hi, m2_hi);
    const float ms_lo = mn_lo == FC_NEG_INF ? 0.f : mn_lo;
    const float ms_hi = mn_hi == FC_NEG_INF ? 0.f : mn_hi;
    const float a_lo = exp2f(m_lo - ms_lo), b_lo = exp2f(m2_lo - ms_lo);
    const float a_hi = exp2f(m_hi - ms_hi), b_hi = exp2f(m2_hi - ms_hi);
    l_lo = l_lo * a_lo + xr[(ND * 8 + 2) * 32] * b_lo;
    l_hi = l_hi * a_hi + xr[(ND * 8 + 3) * 32] * b_hi;
    m_lo = mn_lo;
    m_hi = mn_hi;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bool hi_row = i & 2;
        acc_o[n].x[i] = acc_o[n].x[i] * (hi_row ? a_hi : a_lo) +
                        xr[(n * 8 + i) * 32] * (hi_row ? b_hi : b_lo);
      }
    }
  }
#endif
  // Rows with no visible key end with l = 0: output 0 and lse -inf.
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
  const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
#pragma unroll
  for (int n = 0; n < ND; ++n) {
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      const int row = (i & 2) ? r_hi : r_lo;
      const float inv = (i & 2) ? inv_hi : inv_lo;
      if (row < Sq) {
        *reinterpret_cast<elem2_t*>(o + row * sos + n * 16 + fc_acc_col(lane, i)) =
            fc_pack2(acc_o[n].x[i] * inv, acc_o[n].x[i + 1] * inv);
      }
    }
  }
  if (store_lse && (lane & 3) == 0) {
    const float ln2 = 0.6931471805599453f;
    if (r_lo < Sq) LSE[(long long)bh * Sq + r_lo] = l_lo > 0.f ? (m_lo + log2f(l_lo)) * ln2 : FC_NEG_INF;
    if (r_hi < Sq) LSE[(long long)bh * Sq + r_hi] = l_hi > 0.f ? (m_hi + log2f(l_hi)) * ln2 : FC_NEG_INF;
  }
}

// Writes, for each lane and accumulator element, the (row, col) it holds after loading the
// 16x16 matrix M[r][c] = 16 r + c: the host compares with fc_acc_row / fc_acc_col.
static_assert(acc_frag::num_elements == 8, "unexpected WMMA accumulator size");

extern "C" __global__ void flashcore_wmma_layout_probe(int* out) {
  __shared__ float m[256];
  for (int i = threadIdx.x; i < 256; i += 32) m[i] = (float)i;
  __syncwarp();
  acc_frag f;
  wmma::load_matrix_sync(f, m, 16, wmma::mem_row_major);
  const int lane = threadIdx.x;
  for (int i = 0; i < f.num_elements; ++i) {
    const int val = (int)f.x[i];
    out[lane * 8 + i] = (val >> 4) == fc_acc_row(lane, i) && (val & 15) == fc_acc_col(lane, i);
  }
}

// For each lane and matrix_a element e, whether loading M[r][c] = 16 r + c (row-major, exact in
// fp16 and bf16) puts at element e the (row, col) that accumulator element fc_pa_idx(e) of the
// same lane holds: the host then builds P's operand from the S registers (FC_P_REGS=1).
extern "C" __global__ void flashcore_wmma_a_probe(int* out) {
  __shared__ __align__(32) elem_t m[256];
  for (int i = threadIdx.x; i < 256; i += 32) m[i] = fc_elem((float)i);
  __syncwarp();
  a_frag f;
  wmma::load_matrix_sync(f, m, 16);
  const int lane = threadIdx.x;
  for (int e = 0; e < 16; ++e) {
    int ok = 1;
    if (e < f.num_elements) {
      const int val = (int)fc_float(f.x[e]), idx = fc_pa_idx(e);
      ok = (val >> 4) == fc_acc_row(lane, idx) && (val & 15) == fc_acc_col(lane, idx);
    }
    out[lane * 16 + e] = ok;
  }
}
