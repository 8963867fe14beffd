// SPSA's fused CPU kernel: key pass, then per-pixel statistics, gate and output in one cache-resident pass.
//
// For x (N, C, H, W), NCHW- or channels_last-contiguous, fp32 or fp64, heads G (groups of Cg = C/G
// contiguous channels). The numerics are those of spsa_nas/attention/spsa.py: per (n, g) the key
// k_c = mean_p x[c, p] (accumulated in double), shift s = mean_c k, scale 1/m with m = max|k - s|
// (1 if 0), centred scaled key uc, its floored norm b; per pixel, over the group's channels, with
// y = (x - s)/m: Σy, Σy·uc, Σy² (accumulated in the statistics' dtype: fp32, fp64 for fp64), then
// r = S/(a·b) with the relative eps floors (r = 0 where a·b is 0 or not finite) and
// out = x · (1 - sigmoid(r))^alpha.
//
// The ablation switches, as runtime flags: `reverse` false gives out = x · sigmoid(r)^alpha (a sign
// on r in the gate: nothing per element); `cosine` (a template parameter, so the default
// correlation's code is unchanged) takes s = 0, m = max|k|, uc = k/m not centred, b = ‖uc‖,
// r = Σy·uc / (a·b) with a = max(‖y‖, eps·b).
//
// Memory traffic: one read of x for the key, one read of x and one write of out for the rest.
// NCHW streams each (n, g)'s channel rows in order (long sequential runs: the prefetcher follows
// them) into per-pixel sums held in L1, for chunks of up to 2048 pixels, with the key taken in the
// same job when there is a group per thread (its rows then come back from L1/L2, not L3); the key's
// row sums are reduced several rows at a time (row_means); a row's last, partial vector of pixels
// (7², 14² maps) is one masked vector (load_first/store_first), not a scalar loop. channels_last
// works on one pixel's channel vector at a time (in L1), with each sample's key taken in the same
// job when there is a sample per thread. out may be x itself.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// SIMD vectors through GCC/Clang vector extensions, as wide as the CPU's registers: 64 bytes with
// AVX-512, 32 with AVX/AVX2, else 16 (a vector wider than the registers is split and spilled to the
// stack by GCC: the whole kernel measured 2.5x slower on an AVX2 CPU); unaligned loads and stores
// through memcpy.
#if defined(__AVX512F__)
constexpr int64_t kVecBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVecBytes = 32;
#else
constexpr int64_t kVecBytes = 16;
#endif

template <typename T>
struct Vec {
  static constexpr int64_t lanes = kVecBytes / sizeof(T);
  typedef T type __attribute__((vector_size(kVecBytes)));
  static type splat(T v) { return type{} + v; }
  static type load(const T* p) { type v; __builtin_memcpy(&v, p, sizeof(type)); return v; }
  static void store(T* p, type v) { __builtin_memcpy(p, &v, sizeof(type)); }
};

// A row's last `count` values (0 < count < lanes) as one vector, the other lanes 0, and its first
// `count` lanes stored back: masked loads and stores (AVX-512, or AVX's vmaskmov; masked-off lanes
// are neither read nor written, so nothing past the row is touched), else lane by lane. Before
// these, a row whose length is not a multiple of the vector (7², 14²: 49 and 196 pixels) ended in
// a scalar loop that cost as much as the vectors before it (196 pixels: +24 % on the whole op).
#if defined(__AVX__) && !defined(__AVX512F__)
// AVX's masks are vectors of lane-wide integers, -1 where a lane is on: lanes [8 - count, 16) of
// this table put `count` ones first (ints for float lanes; the doubles' 4 lanes take pairs of them).
alignas(64) static const int32_t kAvxMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
inline __m256i avx_mask(int64_t count, int64_t lane_ints) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kAvxMaskTable + 8 - count * lane_ints));
}
#endif

template <typename T>
inline typename Vec<T>::type load_first(const T* p, int64_t count) {
  using V = typename Vec<T>::type;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    return reinterpret_cast<V>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p));
  } else {
    return reinterpret_cast<V>(_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << count) - 1), p));
  }
#elif defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) {
    return reinterpret_cast<V>(_mm256_maskload_ps(p, avx_mask(count, 1)));
  } else {
    return reinterpret_cast<V>(_mm256_maskload_pd(p, avx_mask(count, 2)));
  }
#else
  V v = Vec<T>::splat(0);
  for (int64_t l = 0; l < count; ++l) v[l] = p[l];
  return v;
#endif
}

template <typename T>
inline void store_first(T* p, const typename Vec<T>::type& v, int64_t count) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), reinterpret_cast<__m512>(v));
  } else {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << count) - 1), reinterpret_cast<__m512d>(v));
  }
#elif defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) {
    _mm256_maskstore_ps(p, avx_mask(count, 1), reinterpret_cast<__m256>(v));
  } else {
    _mm256_maskstore_pd(p, avx_mask(count, 2), reinterpret_cast<__m256d>(v));
  }
#else
  for (int64_t l = 0; l < count; ++l) p[l] = v[l];
#endif
}

// The sum of a vector's lanes in double, pairwise (a short dependency chain).
template <typename T>
inline double lane_sum(const typename Vec<T>::type& v) {
  double parts[Vec<T>::lanes];
  for (int64_t l = 0; l < Vec<T>::lanes; ++l) parts[l] = static_cast<double>(v[l]);
  for (int64_t width = Vec<T>::lanes / 2; width >= 1; width /= 2)
    for (int64_t l = 0; l < width; ++l) parts[l] += parts[l + width];
  return parts[0];
}

template <typename acc_t>
struct GroupKey {
  acc_t s_inv;    // s / m
  acc_t inv;      // 1 / m
  acc_t sum_uc;   // Σ_c uc_c
  acc_t b;        // floored norm of uc
};

// Per (n, g), for the cosine: s = 0, 1/m with m = max|k| (1 if 0), uc = k/m, b = ‖uc‖.
template <typename acc_t>
GroupKey<acc_t> key_stats_cosine(const double* k, int64_t cg, acc_t* uc) {
  acc_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < cg; ++c) m = std::max(m, std::abs(static_cast<acc_t>(k[c])));
  acc_t inv = static_cast<acc_t>(1) / (m > 0 ? m : static_cast<acc_t>(1));
  acc_t norm2 = 0;
#pragma omp simd reduction(+ : norm2)
  for (int64_t c = 0; c < cg; ++c) {
    uc[c] = static_cast<acc_t>(k[c]) * inv;
    norm2 += uc[c] * uc[c];
  }
  GroupKey<acc_t> key;
  key.s_inv = 0;
  key.inv = inv;
  key.sum_uc = 0;
  key.b = std::sqrt(norm2);
  return key;
}

// Per (n, g): the key statistics from the key k (Cg values, double), and uc written to `uc`.
template <typename acc_t>
GroupKey<acc_t> key_stats(const double* k, int64_t cg, double eps, acc_t* uc) {
  // vectorised reductions (#pragma omp simd: lanes of partial sums, added at the end)
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < cg; ++c) s += k[c];
  s /= static_cast<double>(cg);
  // the reference does these in the statistics' dtype; k is accurate to that dtype's rounding
  acc_t s_a = static_cast<acc_t>(s);
  acc_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < cg; ++c) m = std::max(m, std::abs(static_cast<acc_t>(k[c]) - s_a));
  acc_t inv = static_cast<acc_t>(1) / (m > 0 ? m : static_cast<acc_t>(1));
  acc_t mean_u = 0;
#pragma omp simd reduction(+ : mean_u)
  for (int64_t c = 0; c < cg; ++c) {
    uc[c] = (static_cast<acc_t>(k[c]) - s_a) * inv;
    mean_u += uc[c];
  }
  mean_u /= static_cast<acc_t>(cg);
  acc_t norm2 = 0, knorm2 = 0, sum_uc = 0;
#pragma omp simd reduction(+ : norm2, knorm2, sum_uc)
  for (int64_t c = 0; c < cg; ++c) {
    uc[c] -= mean_u;
    norm2 += uc[c] * uc[c];
    sum_uc += uc[c];
    acc_t kk = static_cast<acc_t>(k[c]) * inv;
    knorm2 += kk * kk;
  }
  acc_t norm_k = std::sqrt(norm2);
  acc_t floor_k = static_cast<acc_t>(eps) * std::sqrt(knorm2);
  GroupKey<acc_t> key;
  key.s_inv = s_a * inv;
  key.inv = inv;
  key.sum_uc = sum_uc;
  key.b = norm_k > floor_k ? norm_k : floor_k;
  return key;
}

// The gate of one pixel from its sums (the same formula as composite.pixel_correlation).
// `sign` is 1 for the reverse gate 1 - sigmoid(r) = 1/(1 + e^r), -1 for sigmoid(r) = 1/(1 + e^-r).
template <bool Cos, typename acc_t>
inline acc_t pixel_gate(acc_t sy, acc_t syu, acc_t syy, const GroupKey<acc_t>& key, acc_t cg,
                        acc_t eps, double alpha, acc_t sign) {
  acc_t s_xk, var_x, floor_x;
  if constexpr (Cos) {
    s_xk = syu;
    var_x = syy;
    floor_x = eps * key.b;
  } else {
    s_xk = syu - sy * key.sum_uc / cg;
    var_x = std::max(syy - sy * sy / cg, static_cast<acc_t>(0));
    floor_x = eps * std::sqrt(syy);
  }
  acc_t a = var_x > floor_x * floor_x ? std::sqrt(var_x) : floor_x;
  acc_t d = a * key.b;
  acc_t r = (std::isfinite(d) && d > std::numeric_limits<acc_t>::min()) ? s_xk / d : static_cast<acc_t>(0);
  acc_t g = static_cast<acc_t>(1) / (static_cast<acc_t>(1) + std::exp(sign * r));  // 1 - sigmoid(r) for sign 1
  if (alpha == 1.0) return g;
  if (alpha == 2.0) return g * g;
  return static_cast<acc_t>(std::pow(static_cast<double>(g), alpha));
}

// One contiguous row of p values summed into one vector: four independent vector accumulators (each
// lane sums <= p / (4 lanes) + 1 values), combined pairwise; `*done` is how many values it took
// (the rest, fewer than a vector, are added to its lane sum one by one).
template <typename scalar_t>
inline typename Vec<scalar_t>::type row_vector_sum(const scalar_t* src, int64_t p, int64_t* done) {
  using V = typename Vec<scalar_t>::type;
  constexpr int64_t lanes = Vec<scalar_t>::lanes;
  V acc[4] = {Vec<scalar_t>::splat(0), Vec<scalar_t>::splat(0), Vec<scalar_t>::splat(0), Vec<scalar_t>::splat(0)};
  int64_t i = 0;
  for (; i + 4 * lanes <= p; i += 4 * lanes)
    for (int a = 0; a < 4; ++a) acc[a] += Vec<scalar_t>::load(src + i + a * lanes);
  for (int a = 0; i + lanes <= p; i += lanes, ++a) acc[a] += Vec<scalar_t>::load(src + i);  // short rows: 4x4 maps
  *done = i;
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// The mean of one contiguous row of p values, in double: its vector sum (row_vector_sum), the lanes
// of that in double (lane_sum), then the leftover values.
template <typename scalar_t>
inline double row_mean(const scalar_t* src, int64_t p) {
  int64_t i = 0;
  double total = lane_sum<scalar_t>(row_vector_sum(src, p, &i));
  for (; i < p; ++i) total += static_cast<double>(src[i]);
  return total / static_cast<double>(p);
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SPSA_ROWS_TRANSPOSED 1
// Several rows' lane sums at once, in exactly lane_sum's order. A double vector holds D lanes; D
// rows' lane vectors are reduced together: each level of lane_sum's pairwise tree (lanes l and
// l + w added, w halving) is, for two vectors that each hold whole rows' partial sums in groups of
// 2w lanes, one shuffle of the groups' low halves, one of their high halves, and one add - which
// also packs the two vectors' rows into one. After log2(D) levels one vector holds the D rows' sums.
constexpr int64_t kDLanes = kVecBytes / static_cast<int64_t>(sizeof(double));
typedef double DVec __attribute__((vector_size(kVecBytes)));

// Lane j of a level's result takes, from the pair (X, Y) (Y's lanes numbered from D), the low
// (`high` false) or high element of group j / w of X (j < D/2) or of Y.
constexpr int64_t level_index(int64_t j, int64_t w, bool high) {
  const int64_t half = kDLanes / 2;
  const int64_t source = j < half ? 0 : kDLanes;
  const int64_t jj = j % half;
  return source + (jj / w) * 2 * w + jj % w + (high ? w : 0);
}

template <int64_t W, size_t... J>
inline DVec level(DVec x, DVec y, std::index_sequence<J...>) {
  return __builtin_shufflevector(x, y, level_index(J, W, false)...) +
         __builtin_shufflevector(x, y, level_index(J, W, true)...);
}

// The levels from width W down: the `count` vectors v[0..count) reduced in pairs at width W (into
// count / 2 vectors), then the next level; the last leaves one vector.
template <int64_t W>
inline DVec reduce_levels(DVec* v, int64_t count) {
  for (int64_t r = 0; r < count / 2; ++r)
    v[r] = level<W>(v[2 * r], v[2 * r + 1], std::make_index_sequence<kDLanes>{});
  if constexpr (W > 1) {
    return reduce_levels<W / 2>(v, count / 2);
  } else {
    return v[0];
  }
}

// The first level of a row's lane vector in double: a float vector's low and high halves converted
// and added (lanes l and l + D), or a double vector as it is (its tree starts at the next level).
template <size_t... J>
inline DVec float_halves(const Vec<float>::type& v, std::index_sequence<J...>) {
  typedef float Half __attribute__((vector_size(kVecBytes / 2)));
  const Half low = __builtin_shufflevector(v, v, static_cast<int>(J)...);
  const Half high = __builtin_shufflevector(v, v, static_cast<int>(J + kDLanes)...);
  return __builtin_convertvector(low, DVec) + __builtin_convertvector(high, DVec);
}

template <typename scalar_t>
inline DVec first_level(const typename Vec<scalar_t>::type& v) {
  if constexpr (std::is_same<scalar_t, double>::value) {
    return v;
  } else {
    return float_halves(v, std::make_index_sequence<kDLanes>{});
  }
}
#endif

// The means of `rows` consecutive contiguous rows of p values each, into out: the same values as
// row_mean of each (the same sums in the same order), with kDLanes rows' lane sums taken together.
template <typename scalar_t>
inline void row_means(const scalar_t* src, int64_t p, int64_t rows, double* out) {
  int64_t row = 0;
#ifdef SPSA_ROWS_TRANSPOSED
  constexpr bool is_float = std::is_same<scalar_t, float>::value;
  static_assert(is_float || std::is_same<scalar_t, double>::value, "float or double rows");
  const double count = static_cast<double>(p);
  for (; row + kDLanes <= rows; row += kDLanes) {
    DVec v[kDLanes];
    int64_t done = 0;
    for (int64_t r = 0; r < kDLanes; ++r)
      v[r] = first_level<scalar_t>(row_vector_sum(src + (row + r) * p, p, &done));
    const DVec totals = reduce_levels<kDLanes / 2>(v, kDLanes);
    for (int64_t r = 0; r < kDLanes; ++r) {
      const scalar_t* tail = src + (row + r) * p;
      double total = totals[r];
      for (int64_t i = done; i < p; ++i) total += static_cast<double>(tail[i]);
      out[row + r] = total / count;
    }
  }
#endif
  for (; row < rows; ++row) out[row] = row_mean(src + row * p, p);
}

// channels_last key sums: pixels in chunks of up to 64 Ki values, each chunk's per-channel sums in
// double (added to `acc`), the chunks' sums then added in order.
inline int64_t cl_key_chunk(int64_t c, int64_t p) {
  return std::max<int64_t>(1, std::min<int64_t>(p, 65536 / std::max<int64_t>(c, 1)));
}

template <typename scalar_t>
inline void cl_chunk_sums(const scalar_t* src, int64_t c, int64_t pixels, double* acc) {
  for (int64_t q = 0; q < pixels; ++q, src += c) {
#pragma omp simd
    for (int64_t ch = 0; ch < c; ++ch) acc[ch] += static_cast<double>(src[ch]);
  }
}

// The key k (N, C) in double: mean over the pixels of each channel.
template <typename scalar_t>
std::vector<double> channel_means(const scalar_t* x, int64_t n, int64_t c, int64_t p, bool channels_last) {
  std::vector<double> k(n * c, 0.0);
  if (!channels_last) {
    at::parallel_for(0, n * c, 16, [&](int64_t begin, int64_t end) {
      row_means(x + begin * p, p, end - begin, k.data() + begin);
    });
    return k;
  }
  // channels_last: pixels are rows of C; split each sample's pixels into chunks, reduce after
  const int64_t chunk = cl_key_chunk(c, p);
  const int64_t chunks = (p + chunk - 1) / chunk;
  std::vector<double> partial(n * chunks * c, 0.0);
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      int64_t i = job / chunks, j = job % chunks;
      int64_t p0 = j * chunk, p1 = std::min(p, p0 + chunk);
      cl_chunk_sums(x + (i * p + p0) * c, c, p1 - p0, partial.data() + job * c);
    }
  });
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < chunks; ++j) {
      const double* acc = partial.data() + (i * chunks + j) * c;
      for (int64_t ch = 0; ch < c; ++ch) k[i * c + ch] += acc[ch];
    }
  for (auto& v : k) v /= static_cast<double>(p);
  return k;
}

// One channels_last sample's key, in one job: the same chunks, sums and order as channel_means.
template <typename scalar_t>
void cl_sample_means(const scalar_t* sample, int64_t c, int64_t p, double* k, double* partial) {
  const int64_t chunk = cl_key_chunk(c, p);
  std::fill(k, k + c, 0.0);
  for (int64_t p0 = 0; p0 < p; p0 += chunk) {
    std::fill(partial, partial + c, 0.0);
    cl_chunk_sums(sample + p0 * c, c, std::min(p, p0 + chunk) - p0, partial);
    for (int64_t ch = 0; ch < c; ++ch) k[ch] += partial[ch];
  }
  for (int64_t ch = 0; ch < c; ++ch) k[ch] /= static_cast<double>(p);
}

template <bool Cos, typename scalar_t, typename acc_t>
void spsa_kernel(const scalar_t* x, scalar_t* out, int64_t n, int64_t c, int64_t p, int64_t heads,
                 double alpha, double eps, bool channels_last, bool reverse) {
  const int64_t cg = c / heads;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // NCHW with at least one (n, g) per thread: each job takes its group's key itself, right before
  // the statistics, so that the group's rows are still in L1/L2 for them (one trip less to L3)
  // (channels_last: with at least one sample per thread, each job takes its sample's key itself)
  const bool key_in_job = channels_last ? n >= threads : n * heads >= threads;
  std::vector<GroupKey<acc_t>> keys(n * heads);
  std::vector<acc_t> uc(n * c);
  auto group_key = [&](int64_t ng, const double* k) {
    keys[ng] = Cos ? key_stats_cosine<acc_t>(k, cg, uc.data() + ng * cg)
                   : key_stats<acc_t>(k, cg, eps, uc.data() + ng * cg);
  };
  if (!key_in_job) {
    std::vector<double> k = channel_means(x, n, c, p, channels_last);
    at::parallel_for(0, n * heads, 64, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) group_key(ng, k.data() + ng * cg);
    });
  }
  const acc_t cg_a = static_cast<acc_t>(cg), eps_a = static_cast<acc_t>(eps);
  const acc_t sign = reverse ? static_cast<acc_t>(1) : static_cast<acc_t>(-1);

  if (channels_last) {
    // jobs: one per sample (its key, then all its pixels) or one per (sample, chunk of pixels)
    const int64_t chunk = key_in_job ? p : std::max<int64_t>(1, std::min<int64_t>(p, 16384 / std::max<int64_t>(c, 1)));
    const int64_t chunks = (p + chunk - 1) / chunk;
    at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> k(key_in_job ? 2 * c : 0);
      for (int64_t job = begin; job < end; ++job) {
        int64_t i = job / chunks, p0 = (job % chunks) * chunk, p1 = std::min(p, p0 + chunk);
        if (key_in_job) {
          cl_sample_means(x + i * p * c, c, p, k.data(), k.data() + c);
          for (int64_t g = 0; g < heads; ++g) group_key(i * heads + g, k.data() + g * cg);
        }
        for (int64_t q = p0; q < p1; ++q) {
          const scalar_t* src = x + (i * p + q) * c;
          scalar_t* dst = out + (i * p + q) * c;
          for (int64_t g = 0; g < heads; ++g) {
            const GroupKey<acc_t>& key = keys[i * heads + g];
            const acc_t* u = uc.data() + (i * heads + g) * cg;
            const scalar_t* xs = src + g * cg;
            const acc_t inv = key.inv, s_inv = key.s_inv;
            acc_t sy = 0, syu = 0, syy = 0;
#pragma omp simd reduction(+ : sy, syu, syy)
            for (int64_t ch = 0; ch < cg; ++ch) {
              acc_t y = static_cast<acc_t>(xs[ch]) * inv - s_inv;
              sy += y;
              syu += y * u[ch];
              syy += y * y;
            }
            const scalar_t gate = static_cast<scalar_t>(pixel_gate<Cos>(sy, syu, syy, key, cg_a, eps_a, alpha, sign));
            scalar_t* ds = dst + g * cg;
#pragma omp simd
            for (int64_t ch = 0; ch < cg; ++ch) ds[ch] = xs[ch] * gate;
          }
        }
      }
    });
    return;
  }

  // NCHW: per (n, g) and chunk of pixels, the group's channel rows are streamed in order, each a
  // contiguous run of the chunk's pixels (sequential reads the hardware prefetcher follows; short
  // strided runs defeat it), four rows at a time into the three per-pixel sums, which stay in L1
  // (3 x chunk values); then the chunk's gates; then a second sweep down the rows writes x · gate
  // (the chunk's rows come back from L2/L3). Chunks: up to 2048 pixels, more of them where there
  // are fewer (n, g) than threads.
  using V = typename Vec<scalar_t>::type;
  constexpr int64_t lanes = Vec<scalar_t>::lanes;
  static_assert(std::is_same<scalar_t, acc_t>::value, "the NCHW path accumulates in the input's dtype");
  int64_t chunks = (p + 2047) / 2048;
  while (!key_in_job && n * heads * chunks < threads && (p + chunks) / (chunks + 1) >= 4 * lanes) ++chunks;
  const int64_t chunk = std::min<int64_t>(p, ((p + chunks - 1) / chunks + lanes - 1) / lanes * lanes);
  chunks = (p + chunk - 1) / chunk;
  // jobs: one per (n, g) (its key, then its chunks) or one per (n, g, chunk)
  // the per-pixel buffers are whole vectors long: a chunk's last, partial vector is worked on whole
  // (its lanes past the chunk hold values never read)
  const int64_t stride = (chunk + lanes - 1) / lanes * lanes;
  at::parallel_for(0, key_in_job ? n * heads : n * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(4 * stride, static_cast<acc_t>(0));
    std::vector<double> k(key_in_job ? cg : 0);
    for (int64_t job = begin; job < end; ++job) {
      int64_t first = job, last = job + 1;
      if (key_in_job) {
        const scalar_t* group = x + job * cg * p;
        row_means(group, p, cg, k.data());
        group_key(job, k.data());
        first = job * chunks;
        last = first + chunks;
      }
      for (int64_t part = first; part < last; ++part) {
        const int64_t ng = part / chunks, p0 = (part % chunks) * chunk, len = std::min(chunk, p - p0);
        const GroupKey<acc_t>& key = keys[ng];
        const acc_t* u = uc.data() + ng * cg;
        const scalar_t* base = x + ng * cg * p + p0;
        scalar_t* obase = out + ng * cg * p + p0;
        acc_t* sy = buffer.data();
        acc_t* syu = sy + stride;
        acc_t* syy = syu + stride;
        acc_t* gates = syy + stride;
        std::fill(sy, sy + 3 * stride, static_cast<acc_t>(0));
        const acc_t inv = key.inv, s_inv = key.s_inv;
        const V vinv = Vec<scalar_t>::splat(inv), vs_inv = Vec<scalar_t>::splat(s_inv);
        const int64_t vec_end = len / lanes * lanes, rest = len - vec_end;
        int64_t ch = 0;
        for (; ch + 4 <= cg; ch += 4) {
          const scalar_t* r0 = base + ch * p;
          const scalar_t* r1 = r0 + p;
          const scalar_t* r2 = r1 + p;
          const scalar_t* r3 = r2 + p;
          const V u0 = Vec<scalar_t>::splat(u[ch]), u1 = Vec<scalar_t>::splat(u[ch + 1]);
          const V u2 = Vec<scalar_t>::splat(u[ch + 2]), u3 = Vec<scalar_t>::splat(u[ch + 3]);
          // the four rows' terms of the per-pixel sums at pixels [q, q + lanes), each row read by `load`
          auto add_rows = [&](int64_t q, auto load) {
            V a = Vec<scalar_t>::load(sy + q), b = Vec<scalar_t>::load(syu + q), c2 = Vec<scalar_t>::load(syy + q);
            V y = load(r0 + q) * vinv - vs_inv;
            a += y; b += y * u0; c2 += y * y;
            y = load(r1 + q) * vinv - vs_inv;
            a += y; b += y * u1; c2 += y * y;
            y = load(r2 + q) * vinv - vs_inv;
            a += y; b += y * u2; c2 += y * y;
            y = load(r3 + q) * vinv - vs_inv;
            a += y; b += y * u3; c2 += y * y;
            Vec<scalar_t>::store(sy + q, a);
            Vec<scalar_t>::store(syu + q, b);
            Vec<scalar_t>::store(syy + q, c2);
          };
          for (int64_t q = 0; q < vec_end; q += lanes)
            add_rows(q, [](const scalar_t* row) { return Vec<scalar_t>::load(row); });
          if (rest > 0)  // the last, partial vector of pixels
            add_rows(vec_end, [rest](const scalar_t* row) { return load_first(row, rest); });
        }
        for (; ch < cg; ++ch) {
          const scalar_t* row = base + ch * p;
          const acc_t uch = u[ch];
          for (int64_t q = 0; q < len; ++q) {
            acc_t y = static_cast<acc_t>(row[q]) * inv - s_inv;
            sy[q] += y;
            syu[q] += y * uch;
            syy[q] += y * y;
          }
        }
        for (int64_t q = 0; q < len; ++q)
          gates[q] = pixel_gate<Cos, acc_t>(sy[q], syu[q], syy[q], key, cg_a, eps_a, alpha, sign);
        for (ch = 0; ch < cg; ++ch) {
          const scalar_t* row = base + ch * p;
          scalar_t* orow = obase + ch * p;
          int64_t q = 0;
          for (; q < vec_end; q += lanes)
            Vec<scalar_t>::store(orow + q, Vec<scalar_t>::load(row + q) * Vec<scalar_t>::load(gates + q));
          if (rest > 0) store_first(orow + q, load_first(row + q, rest) * Vec<scalar_t>::load(gates + q), rest);
        }
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& out, int64_t heads) {
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "spsa_cpu: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 4, "spsa_cpu: expected a 4-D input, got ", x.dim(), "-D");
  TORCH_CHECK(heads >= 1 && x.size(1) % heads == 0 && x.size(1) / heads >= 2,
              "spsa_cpu: heads=", heads, " must divide channels=", x.size(1), " leaving >= 2 each");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "spsa_cpu: expected float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(out.sizes() == x.sizes() && out.strides() == x.strides() && out.scalar_type() == x.scalar_type(),
              "spsa_cpu: out must have x's shape, strides and dtype");
}

// out = SPSA(x); x and out NCHW- or channels_last-contiguous with the same strides (out may be x).
void spsa_forward_out(const at::Tensor& x, at::Tensor& out, double alpha, int64_t heads, double eps,
                      bool reverse, bool cosine) {
  check(x, out, heads);
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), "spsa_cpu: x must be NCHW- or channels_last-contiguous");
  const int64_t n = x.size(0), c = x.size(1), p = x.size(2) * x.size(3);
  if (x.numel() == 0) return;
  auto run = [&](auto cos) {
    constexpr bool Cos = decltype(cos)::value;
    if (x.scalar_type() == at::kFloat) {
      spsa_kernel<Cos, float, float>(x.data_ptr<float>(), out.data_ptr<float>(), n, c, p, heads, alpha, eps,
                                     channels_last, reverse);
    } else {
      spsa_kernel<Cos, double, double>(x.data_ptr<double>(), out.data_ptr<double>(), n, c, p, heads, alpha,
                                       eps, channels_last, reverse);
    }
  };
  if (cosine) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

at::Tensor spsa_forward(const at::Tensor& x, double alpha, int64_t heads, double eps, bool reverse,
                        bool cosine) {
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor src = channels_last ? x : x.contiguous();
  at::Tensor out = at::empty_like(src);
  spsa_forward_out(src, out, alpha, heads, eps, reverse, cosine);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &spsa_forward, "SPSA forward (fused CPU kernel)", pybind11::arg("x"), pybind11::arg("alpha"),
        pybind11::arg("heads"), pybind11::arg("eps"), pybind11::arg("reverse") = true,
        pybind11::arg("cosine") = false);
  m.def("forward_out", &spsa_forward_out, "SPSA forward into out (which may be x)", pybind11::arg("x"),
        pybind11::arg("out"), pybind11::arg("alpha"), pybind11::arg("heads"), pybind11::arg("eps"),
        pybind11::arg("reverse") = true, pybind11::arg("cosine") = false);
}
