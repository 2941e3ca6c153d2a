// llava-rs's own CUDA kernels (crates/llava-model/src/cuda_kernels.rs), compiled by NVRTC when
// a model loads onto a GPU. Values are read and written in the tensor's dtype and computed in
// f32, so that every result is the one candle's composite ops give, bit for bit.

struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
struct BF16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(unsigned short x) {
    return __uint_as_float(((unsigned int)x) << 16);
  }
  // Round to nearest even, as candle's (and torch's) conversion.
  static __device__ __forceinline__ unsigned short store(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
  }
};
struct F16 {
  typedef unsigned short T;
  static __device__ __forceinline__ float load(unsigned short x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f;
  }
  static __device__ __forceinline__ unsigned short store(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
  }
};

// ---- Attention softmax --------------------------------------------------------------------

// Every lane of the warp gets the result.
template <bool MAX>
__device__ __forceinline__ float warp_reduce(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  return v;
}

// A warp per row, each lane taking every 32nd key: the order of candle's softmax kernel, so the
// sums, and so the probabilities, are those of the composite path. Row r of x is query r % s of
// batch r / (s * heads). With `causal` it sees keys 0..=past + query; `keys` ([batch, t],
// 0 = padding) masks others. A key past the diagonal is not read: score + (-1e30) is -1e30 in
// f32 for any score of a sane size. The row is read three times (max, sum, write), the second
// and third from L1; holding it in registers instead measured no faster.
template <typename D>
__device__ void softmax_rows(const typename D::T* x, typename D::T* y,
                             const unsigned char* keys, long long rows, int t, int s,
                             int heads, int past, int causal) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const typename D::T* xr = x + row * t;
  typename D::T* yr = y + row * t;
  const int last = causal ? past + (int)(row % s) : t - 1;
  const unsigned char* kr = keys ? keys + (row / ((long long)s * heads)) * t : 0;
#define SCORE(j) ((j) > last ? -1e30f : D::load(xr[j]) + ((kr && kr[j] == 0) ? -1e30f : 0.0f))
  float m = __int_as_float(0xff800000);
  for (int j = lane; j < t; j += 32) m = fmaxf(m, SCORE(j));
  m = warp_reduce<true>(m);
  float sum = 0.0f;
  for (int j = lane; j < t; j += 32) sum += expf(SCORE(j) - m);
  const float inv = 1.0f / warp_reduce<false>(sum);
  for (int j = lane; j < t; j += 32) yr[j] = D::store(expf(SCORE(j) - m) * inv);
#undef SCORE
}

#define SOFTMAX(NAME, D)                                                                   \
  extern "C" __global__ void NAME(const D::T* x, D::T* y, const unsigned char* keys,       \
                                  long long rows, int t, int s, int heads, int past,       \
                                  int causal) {                                            \
    softmax_rows<D>(x, y, keys, rows, t, s, heads, past, causal);                          \
  }
SOFTMAX(llava_softmax_f32, F32)
SOFTMAX(llava_softmax_bf16, BF16)
SOFTMAX(llava_softmax_f16, F16)

// ---- Bias add -----------------------------------------------------------------------------

// y = x + bias over rows of n: a block of columns (grid y) of one row (grid x) per block, so
// no thread divides.
// candle's broadcast add finds each bias element through the strided-index path, which cost
// more than the vision tower's GEMMs themselves. The f32 sum of two bf16 (or f16) values
// rounds to the correctly rounded bf16 (f16) sum, as candle's native add gives.
template <typename D>
__device__ void bias_rows(const typename D::T* x, const typename D::T* bias,
                          typename D::T* y, int n) {
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (col >= n) return;
  const long long i = (long long)blockIdx.x * n + col;
  y[i] = D::store(D::load(x[i]) + D::load(bias[col]));
}

#define BIAS(NAME, D)                                                                      \
  extern "C" __global__ void NAME(const D::T* x, const D::T* bias, D::T* y, int n) {       \
    bias_rows<D>(x, bias, y, n);                                                           \
  }
BIAS(llava_bias_f32, F32)
BIAS(llava_bias_bf16, BF16)
BIAS(llava_bias_f16, F16)
