/* One pass over a chunk of a weight and its mask: the reduction of flowscan/reduce.py fused.
 *
 * numpy needs about six passes per chunk (|w|, the mask checks, the bit packing, the product,
 * a float64 sum of float32 values through buffered casts); this loop does them together while
 * the chunk is in cache. It computes, for n elements:
 *   abs_sum  sum of |w| over entries the mask keeps (every entry without a mask), in float64,
 *            summed in 8 lanes (the values summed are numpy's exactly; only the order differs)
 *   ones     entries the mask keeps; nonzero: weights that are not zero (NaN counts)
 *   bits     the kept entries (or the nonzero weights) packed as np.packbits does, MSB first
 * and returns status 0, or 1 when the mask holds anything but 0 and 1 (for a bool mask: a byte
 * other than 0 and 1), or 2 when a weight is NaN or infinite. On a nonzero status the caller
 * redoes the chunk with numpy, whose messages and rules stay the only ones.
 *
 * Two loops compute this: a portable one in GCC/Clang vector extensions (SSE2 on x86-64, NEON on
 * arm64) and, on x86-64, an AVX2 one picked at import when the CPU has it; tests run both.
 * No Python object is touched between the buffer requests, so the loop runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE __forceinline
#endif

enum { W_F32, W_F64, W_F16, W_BF16 };
enum { M_NONE, M_BYTE, M_F32, M_F64, M_F16, M_BF16 };

static const Py_ssize_t ITEM[4] = {4, 8, 2, 2}, MASK_ITEM[6] = {0, 1, 4, 8, 2, 2};
/* 1.0 in the two 16-bit float formats (their zeros: no bits but the sign) */
#define ONE16(mk) ((mk) == M_F16 ? 0x3C00 : 0x3F80)

typedef struct {
    double abs_sum;
    int64_t ones, nonzero;
    int status;
} Sums;

/* Software prefetch on the weights and the mask, as many elements ahead as make PREFETCH_BYTES of
 * weights. The loops do enough work per cache line that the out-of-order core holds few loads in
 * flight: without it a chunk streamed from memory ran at half the speed of the same chunk in cache
 * (bfloat16 x uint8, one thread: 7.6 GB/s without, 13.2 with). The distance is set in bytes of
 * weights, alike for every dtype: analyze -j2 of float32 and bfloat16 rounds against two threads
 * touching the same files, 1 KiB ahead 0.84-0.86 and 0.79-0.82 x, 2 KiB 0.73-0.75 and 0.80-0.86 x,
 * 4 KiB 0.74 and 0.83 x. A prefetch never faults, so reaching past a buffer's end is harmless. */
#define PREFETCH_BYTES 1024
static ALWAYS_INLINE void prefetch(const void *base, Py_ssize_t i, Py_ssize_t ahead, Py_ssize_t item,
                                   Py_ssize_t lines) {
    const char *p = (const char *)base + (i + ahead) * item;
    for (Py_ssize_t k = 0; k < lines; k++) __builtin_prefetch(p + 64 * k, 0, 3);
}

/* The portable loop. GCC/Clang vector extensions: SSE2 everywhere on x86-64, NEON on arm64. Its
 * integer work is done in 32-bit lanes (SSE2 has no 64-bit compares: they would go scalar); only
 * the kept |w| are widened to float64 for the sum. */
typedef double v4d __attribute__((vector_size(32)));
typedef long long v4di __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int v4si __attribute__((vector_size(16)));
typedef unsigned v4u __attribute__((vector_size(16)));
typedef unsigned short v4u16 __attribute__((vector_size(8)));

static ALWAYS_INLINE v4d as_v4d(v4di x) { v4d d; memcpy(&d, &x, sizeof d); return d; }
static ALWAYS_INLINE v4di as_v4di(v4d x) { v4di d; memcpy(&d, &x, sizeof d); return d; }
static ALWAYS_INLINE v4f as_v4f(v4u x) { v4f f; memcpy(&f, &x, sizeof f); return f; }

/* the bits of |w| of elements i..i+3 as float32 (the values numpy's reducer sums), for every weight
 * dtype but float64; NaN and infinity stay above 0x7F7FFFFF (half: exponent 31 becomes infinity) */
static ALWAYS_INLINE v4u abs4(const void *w, const int wk, Py_ssize_t i) {
    if (wk == W_F32) {
        v4u f;
        memcpy(&f, (const float *)w + i, sizeof f);
        return f & 0x7FFFFFFFu;
    }
    v4u16 raw;
    memcpy(&raw, (const uint16_t *)w + i, sizeof raw);
    v4u h = __builtin_convertvector(raw, v4u);
    if (wk == W_BF16) return (h << 16) & 0x7FFFFFFFu;
    /* float16: normal numbers by rebiasing, subnormals by scaling, inf/NaN kept */
    v4u mag = h & 0x7FFFu, exp = mag >> 10;
    v4u normal = (mag << 13) + (112u << 23);
    v4u sub;
    v4f subf = __builtin_convertvector(mag, v4f) * (1.0f / 16777216.0f);
    memcpy(&sub, &subf, sizeof sub);
    v4u is_sub = (v4u)(exp == 0), is_special = (v4u)(exp == 31);
    return (normal & ~is_sub) | (sub & is_sub) | (is_special & 0x7F800000u);
}

/* float mask elements i..i+3: -1 where the mask is exactly 1 (keep) or exactly 0 (zero), else 0 */
static ALWAYS_INLINE void mask4(const void *m, const int mk, Py_ssize_t i, v4si *keep, v4si *zero) {
    if (mk == M_F32) {
        v4f x;
        memcpy(&x, (const float *)m + i, sizeof x);
        *keep = x == 1.0f;
        *zero = x == 0.0f;
    } else if (mk == M_F64) {
        v4d x;
        memcpy(&x, (const double *)m + i, sizeof x);
        *keep = __builtin_convertvector(x == 1.0, v4si);
        *zero = __builtin_convertvector(x == 0.0, v4si);
    } else {   /* float16 or bfloat16 */
        v4u16 raw;
        memcpy(&raw, (const uint16_t *)m + i, sizeof raw);
        v4si x = __builtin_convertvector(raw, v4si);
        *keep = x == ONE16(mk);
        *zero = (x & 0x7FFF) == 0;
    }
}

/* |w| of 4 elements kept by `keep` (32-bit lanes), as float64; a non-finite |w| is noted in `bad`
 * (float64 weights: in `bad64`, compared as doubles, which needs no 64-bit integer compare) */
static ALWAYS_INLINE v4d kept4(const void *w, const int wk, Py_ssize_t i, v4si keep, v4si *bad, v4di *bad64) {
    if (wk == W_F64) {
        const v4di magnitude = {0x7FFFFFFFFFFFFFFFLL, 0x7FFFFFFFFFFFFFFFLL, 0x7FFFFFFFFFFFFFFFLL, 0x7FFFFFFFFFFFFFFFLL};
        const v4d largest = {1.7976931348623157e308, 1.7976931348623157e308, 1.7976931348623157e308, 1.7976931348623157e308};
        v4d x;
        memcpy(&x, (const double *)w + i, sizeof x);
        x = as_v4d(as_v4di(x) & magnitude);
        *bad64 |= ~(x <= largest);   /* NaN and infinity fail x <= DBL_MAX */
        return as_v4d(as_v4di(x) & __builtin_convertvector(keep, v4di));
    }
    v4u a = abs4(w, wk, i);
    *bad |= (v4si)a > 0x7F7FFFFF;
    return __builtin_convertvector(as_v4f(a & (v4u)keep), v4d);
}

/* the nonzero entries of 4 weights (for weights without a mask); NaN counts, as numpy counts it */
static ALWAYS_INLINE v4si nonzero4(const void *w, const int wk, Py_ssize_t i) {
    if (wk == W_F64) {
        v4d x;
        memcpy(&x, (const double *)w + i, sizeof x);
        return __builtin_convertvector(x != 0.0, v4si);
    }
    return abs4(w, wk, i) != 0u;
}

static ALWAYS_INLINE Sums fused_portable(const void *w, const int wk, const void *m, const int mk,
                                         uint8_t *bits, Py_ssize_t n) {
    const v4si high = {128, 64, 32, 16}, low = {8, 4, 2, 1}, none = {0, 0, 0, 0};
    v4d sum_lo = {0, 0, 0, 0}, sum_hi = {0, 0, 0, 0};   /* 8 float64 lanes */
    v4si bad = none;
    v4di bad64 = {0, 0, 0, 0};
    int64_t ones = 0, zeros = 0;
    uint64_t seen = 0;   /* byte masks: every 8 bytes ORed (a byte above 1: not 0/1) */
    /* the last n % 8 elements go through the same code from zero-padded copies */
    unsigned char wtail[64] = {0}, mtail[64] = {0};
    Py_ssize_t whole = n - n % 8, pad = n % 8 ? 8 - n % 8 : 0;
    for (Py_ssize_t block = 0; block < n; block += 1 << 24) {   /* 32-bit lane counts flushed per block */
        v4si block_ones = none, block_zeros = none;
        Py_ssize_t stop = n - block > (1 << 24) ? block + (1 << 24) : n;
        for (Py_ssize_t i = block; i < stop; i += 8) {
            if (!(i & 63)) {   /* 64 elements a step of the prefetch: whole lines of every dtype */
                prefetch(w, i, PREFETCH_BYTES / ITEM[wk], ITEM[wk], ITEM[wk]);
                if (mk != M_NONE) prefetch(m, i, PREFETCH_BYTES / ITEM[wk], MASK_ITEM[mk], MASK_ITEM[mk]);
            }
            const void *wp = w, *mp = m;
            Py_ssize_t at = i;
            if (i == whole) {   /* the tail */
                memcpy(wtail, (const char *)w + i * ITEM[wk], (n - i) * ITEM[wk]);
                if (mk != M_NONE) memcpy(mtail, (const char *)m + i * MASK_ITEM[mk], (n - i) * MASK_ITEM[mk]);
                wp = wtail, mp = mtail, at = 0;
            }
            v4si keep_lo, keep_hi, zero_lo, zero_hi;
            if (mk == M_NONE) {
                keep_lo = nonzero4(wp, wk, at), keep_hi = nonzero4(wp, wk, at + 4);
                v4si all = ~none;
                sum_lo += kept4(wp, wk, at, all, &bad, &bad64), sum_hi += kept4(wp, wk, at + 4, all, &bad, &bad64);
            } else {
                if (mk == M_BYTE) {   /* 8 bytes as one word: their bits by one multiplication (SSE2
                                       * would widen 4 bytes to 4 ints one byte at a time) */
                    uint64_t word;
                    memcpy(&word, (const uint8_t *)mp + at, 8);
                    seen |= word;
                    int byte = (int)((word * 0x8040201008040201ULL) >> 56);   /* byte j -> bit 7-j */
                    v4si spread = {byte, byte, byte, byte};
                    keep_lo = (spread & high) != 0, keep_hi = (spread & low) != 0;
                } else {
                    mask4(mp, mk, at, &keep_lo, &zero_lo);
                    mask4(mp, mk, at + 4, &keep_hi, &zero_hi);
                    block_zeros -= zero_lo + zero_hi;
                }
                sum_lo += kept4(wp, wk, at, keep_lo, &bad, &bad64), sum_hi += kept4(wp, wk, at + 4, keep_hi, &bad, &bad64);
            }
            block_ones -= keep_lo + keep_hi;
            if (bits) {
                v4si b = (keep_lo & high) | (keep_hi & low);
                bits[i / 8] = (uint8_t)(b[0] | b[1] | b[2] | b[3]);
            }
        }
        ones += (int64_t)block_ones[0] + block_ones[1] + block_ones[2] + block_ones[3];
        zeros += (int64_t)block_zeros[0] + block_zeros[1] + block_zeros[2] + block_zeros[3];
    }
    Sums s = {0.0, 0, 0, 0};
    s.abs_sum = ((sum_lo[0] + sum_lo[1]) + (sum_lo[2] + sum_lo[3])) + ((sum_hi[0] + sum_hi[1]) + (sum_hi[2] + sum_hi[3]));
    s.ones = mk == M_NONE ? 0 : ones;
    s.nonzero = ones;
    if (mk == M_BYTE) {
        if (seen & 0xFEFEFEFEFEFEFEFEULL) s.status = 1;   /* a byte above 1 */
    } else if (mk != M_NONE && ones + zeros - pad != n) {
        s.status = 1;
    }
    if (!s.status && (bad[0] | bad[1] | bad[2] | bad[3] | bad64[0] | bad64[1] | bad64[2] | bad64[3])) s.status = 2;
    return s;
}

/* The AVX2 loop (x86-64 with GCC or Clang; picked at import when the CPU has AVX2, F16C and POPCNT).
 * It takes 32 elements a step and keeps to in-lane instructions (lane-crossing ones cost 2-4x on
 * some CPUs): 128-bit lane 0 holds elements 0-15 of the step and lane 1 elements 16-31, so weights,
 * masks and their keep bits move between 8-, 16- and 32-bit lanes by unpacking and packing alone.
 * The float64 sum takes no conversion instruction: the bits of |w| as a float32, shifted left by
 * 29 into a 64-bit lane, are a float64 of exactly |w| * 2^-896 (normal and subnormal alike, zero
 * stays zero), so the lanes sum |w| scaled by a power of two and the total is scaled back once.
 * Float64 weights or masks take the portable loop, compiled for AVX2. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2 1
#include <cpuid.h>
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,f16c,popcnt")))
#define STEP 32
/* 16 bytes from p into lane 0 and 16 from p + half (elements) into lane 1 (what GCC 10's
 * _mm256_loadu2_m128i does, spelled for older compilers) */
#define LOAD_LANES(p, half) _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p))), \
                                                    _mm_loadu_si128((const __m128i *)((p) + (half))), 1)

typedef struct {
    __m256d sum[4];      /* |w| * 2^-896 of kept entries */
    __m256i largest;     /* largest |w| bits seen (32- or 16-bit lanes): above the finite ones = inf/NaN */
    __m256i seen;        /* byte masks: largest byte */
    __m256i valid;       /* float masks: all ones while every entry is exactly 0 or 1 */
    int64_t ones;
} Acc;

/* adds four float32 |w| (bits in the 32-bit lanes of x, kept entries only) to the sums, as above */
static AVX2 ALWAYS_INLINE void add_f32_bits(Acc *acc, __m256i x, int k) {
    const __m256i zero = _mm256_setzero_si256();
    acc->sum[k] = _mm256_add_pd(acc->sum[k], _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_unpacklo_epi32(x, zero), 29)));
    acc->sum[k + 1] = _mm256_add_pd(acc->sum[k + 1], _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_unpackhi_epi32(x, zero), 29)));
}

/* the keep mask of one step as bytes (lane 0: elements 0-15), from the mask itself; 16-bit masks
 * arrive as two vectors in the weights' 16-bit layout, float32 masks as four in the 32-bit one */
static AVX2 ALWAYS_INLINE __m256i keep_bytes(const void *m, const int mk, Py_ssize_t i, Acc *acc,
                                            __m256i keep16[2], __m256i keep32[4]) {
    if (mk == M_BYTE) {
        __m256i x = _mm256_loadu_si256((const __m256i *)((const uint8_t *)m + i));
        acc->seen = _mm256_max_epu8(acc->seen, x);
        return _mm256_cmpeq_epi8(x, _mm256_set1_epi8(1));
    }
    if (mk == M_F32) {
        for (int j = 0; j < 4; j++) {
            __m256 x = _mm256_castsi256_ps(LOAD_LANES((const float *)m + i + 4 * j, 16));
            __m256i one = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_set1_ps(1.0f), _CMP_EQ_OQ));
            __m256i zero = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
            acc->valid = _mm256_and_si256(acc->valid, _mm256_or_si256(one, zero));
            keep32[j] = one;
        }
        keep16[0] = _mm256_packs_epi32(keep32[0], keep32[1]);
        keep16[1] = _mm256_packs_epi32(keep32[2], keep32[3]);
    } else {   /* float16 or bfloat16 */
        for (int j = 0; j < 2; j++) {
            __m256i x = LOAD_LANES((const uint16_t *)m + i + 8 * j, 16);
            __m256i one = _mm256_cmpeq_epi16(x, _mm256_set1_epi16(ONE16(mk)));
            __m256i zero = _mm256_cmpeq_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x7FFF)), _mm256_setzero_si256());
            acc->valid = _mm256_and_si256(acc->valid, _mm256_or_si256(one, zero));
            keep16[j] = one;
        }
    }
    return _mm256_packs_epi16(keep16[0], keep16[1]);
}

/* one step of 32 elements; returns the kept entries' bits, element e at bit e */
static AVX2 ALWAYS_INLINE uint32_t step32(const void *w, const int wk, const void *m, const int mk, Py_ssize_t i,
                                          Acc *acc) {
    __m256i keep8 = _mm256_setzero_si256(), keep16[2], keep32[4], nonzero16[2], nonzero32[4];
    const __m256i ones = _mm256_set1_epi32(-1);
    if (mk != M_NONE) {
        keep8 = keep_bytes(m, mk, i, acc, keep16, keep32);
        if (mk == M_BYTE) {   /* bytes widened to the weights' lanes by unpacking with themselves */
            keep16[0] = _mm256_unpacklo_epi8(keep8, keep8), keep16[1] = _mm256_unpackhi_epi8(keep8, keep8);
        }
        if (wk == W_F32 && mk != M_F32) {
            keep32[0] = _mm256_unpacklo_epi16(keep16[0], keep16[0]), keep32[1] = _mm256_unpackhi_epi16(keep16[0], keep16[0]);
            keep32[2] = _mm256_unpacklo_epi16(keep16[1], keep16[1]), keep32[3] = _mm256_unpackhi_epi16(keep16[1], keep16[1]);
        }
    }
    if (wk == W_F32) {
        for (int j = 0; j < 4; j++) {
            __m256i a = _mm256_and_si256(LOAD_LANES((const float *)w + i + 4 * j, 16), _mm256_set1_epi32(0x7FFFFFFF));
            acc->largest = _mm256_max_epu32(acc->largest, a);
            if (mk == M_NONE) nonzero32[j] = _mm256_xor_si256(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()), ones);
            else a = _mm256_and_si256(a, keep32[j]);
            add_f32_bits(acc, a, 2 * (j & 1));
        }
        if (mk == M_NONE) {
            keep8 = _mm256_packs_epi16(_mm256_packs_epi32(nonzero32[0], nonzero32[1]),
                                       _mm256_packs_epi32(nonzero32[2], nonzero32[3]));
        }
    } else {   /* 16-bit weights, 16 elements a vector */
        for (int j = 0; j < 2; j++) {
            __m256i a = _mm256_and_si256(LOAD_LANES((const uint16_t *)w + i + 8 * j, 16), _mm256_set1_epi16(0x7FFF));
            acc->largest = _mm256_max_epu16(acc->largest, a);
            if (mk == M_NONE) nonzero16[j] = _mm256_xor_si256(_mm256_cmpeq_epi16(a, _mm256_setzero_si256()), ones);
            else a = _mm256_and_si256(a, keep16[j]);
            if (wk == W_BF16) {   /* a bfloat16 is the high half of a float32: its bits, shifted 16 + 29 */
                const __m256i zero = _mm256_setzero_si256();
                __m256i lo = _mm256_unpacklo_epi16(zero, a), hi = _mm256_unpackhi_epi16(zero, a);
                add_f32_bits(acc, lo, 0);
                add_f32_bits(acc, hi, 2);
            } else {   /* float16 widened by F16C (subnormal halves become normal floats) */
                __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(a)), hi = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
                /* lo holds elements 0-7 of lane 0, hi those of lane 1: the sums do not mind the order */
                add_f32_bits(acc, _mm256_castps_si256(lo), 0);
                add_f32_bits(acc, _mm256_castps_si256(hi), 2);
            }
        }
        if (mk == M_NONE) keep8 = _mm256_packs_epi16(nonzero16[0], nonzero16[1]);
    }
    /* packbits order (element 0 in the high bit) by reversing each 8 bytes before taking the bits */
    const __m256i reverse = _mm256_setr_epi8(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8,
                                             7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
    uint32_t kept = (uint32_t)_mm256_movemask_epi8(_mm256_shuffle_epi8(keep8, reverse));
    acc->ones += _mm_popcnt_u32(kept);
    return kept;
}

static AVX2 ALWAYS_INLINE Sums fused_avx2(const void *w, const int wk, const void *m, const int mk,
                                          uint8_t *bits, Py_ssize_t n) {
    Acc acc;
    for (int k = 0; k < 4; k++) acc.sum[k] = _mm256_setzero_pd();
    acc.largest = acc.seen = _mm256_setzero_si256();
    acc.valid = _mm256_set1_epi32(-1);
    acc.ones = 0;
    Py_ssize_t whole = n - n % STEP, i = 0;
    for (; i < whole; i += STEP) {
        if (!(i & 63)) {   /* every other step: 64 elements are whole lines of every dtype */
            prefetch(w, i, PREFETCH_BYTES / ITEM[wk], ITEM[wk], ITEM[wk]);
            if (mk != M_NONE) prefetch(m, i, PREFETCH_BYTES / ITEM[wk], MASK_ITEM[mk], MASK_ITEM[mk]);
        }
        uint32_t kept = step32(w, wk, m, mk, i, &acc);
        if (bits) memcpy(bits + i / 8, &kept, 4);
    }
    if (i < n) {   /* the last n % 32 elements, from zero-padded copies (zeros: pruned, valid) */
        unsigned char wtail[STEP * 4] = {0}, mtail[STEP * 4] = {0};
        memcpy(wtail, (const char *)w + i * ITEM[wk], (n - i) * ITEM[wk]);
        if (mk != M_NONE) memcpy(mtail, (const char *)m + i * MASK_ITEM[mk], (n - i) * MASK_ITEM[mk]);
        uint32_t kept = step32(wtail, wk, mtail, mk, 0, &acc);
        if (bits) memcpy(bits + i / 8, &kept, (n - i + 7) / 8);   /* little-endian: bytes in element order */
    }
    Sums s = {0.0, 0, 0, 0};
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_add_pd(acc.sum[0], acc.sum[1]), _mm256_add_pd(acc.sum[2], acc.sum[3])));
    s.abs_sum = ldexp((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]), 896);
    s.ones = mk == M_NONE ? 0 : acc.ones;
    s.nonzero = acc.ones;
    if (mk == M_BYTE) {
        if (_mm256_movemask_epi8(_mm256_cmpgt_epi8(_mm256_min_epu8(acc.seen, _mm256_set1_epi8(2)), _mm256_set1_epi8(1))))
            s.status = 1;   /* a byte above 1 */
    } else if (mk != M_NONE && _mm256_movemask_epi8(acc.valid) != -1) {
        s.status = 1;
    }
    /* the largest |w| bits against the largest finite ones: 32-bit lanes for float32, else 16-bit */
    uint32_t top[8];
    _mm256_storeu_si256((__m256i *)top, acc.largest);
    for (int k = 0; k < 8 && !s.status; k++) {
        int bad = wk == W_F32 ? top[k] > 0x7F7FFFFFu
                : wk == W_F16 ? ((top[k] & 0xFFFF) > 0x7BFF || (top[k] >> 16) > 0x7BFF)
                              : ((top[k] & 0xFFFF) > 0x7F7F || (top[k] >> 16) > 0x7F7F);
        if (bad) s.status = 2;
    }
    return s;
}
#endif

/* The type-specialised loops: the compiler unrolls and vectorises each pair on its own. */
#define SPECIALISE(ISA, ATTR, WK, MK)                                                               \
    ATTR static Sums ISA##_##WK##_##MK(const void *w, const void *m, uint8_t *bits, Py_ssize_t n) { \
        return fused_##ISA(w, WK, m, MK, bits, n);                                                   \
    }
#define ALL_MASKS(ISA, ATTR, WK) SPECIALISE(ISA, ATTR, WK, M_NONE) SPECIALISE(ISA, ATTR, WK, M_BYTE) \
    SPECIALISE(ISA, ATTR, WK, M_F32) SPECIALISE(ISA, ATTR, WK, M_F64) SPECIALISE(ISA, ATTR, WK, M_F16) \
    SPECIALISE(ISA, ATTR, WK, M_BF16)
#define ALL_PAIRS(ISA, ATTR) ALL_MASKS(ISA, ATTR, W_F32) ALL_MASKS(ISA, ATTR, W_F64) \
    ALL_MASKS(ISA, ATTR, W_F16) ALL_MASKS(ISA, ATTR, W_BF16)
#define ROW(ISA, WK) {ISA##_##WK##_M_NONE, ISA##_##WK##_M_BYTE, ISA##_##WK##_M_F32, ISA##_##WK##_M_F64, \
                      ISA##_##WK##_M_F16, ISA##_##WK##_M_BF16}
#define TABLE(ISA) {ROW(ISA, W_F32), ROW(ISA, W_F64), ROW(ISA, W_F16), ROW(ISA, W_BF16)}

typedef Sums (*Loop)(const void *, const void *, uint8_t *, Py_ssize_t);
ALL_PAIRS(portable, )
static const Loop PORTABLE[4][6] = TABLE(portable);
#ifdef HAVE_AVX2
/* float64 weights or masks: the portable loop, compiled for AVX2 */
#define fused_avx2_or_portable(w, wk, m, mk, bits, n) \
    ((wk) == W_F64 || (mk) == M_F64 ? fused_portable(w, wk, m, mk, bits, n) : fused_avx2(w, wk, m, mk, bits, n))
ALL_PAIRS(avx2_or_portable, AVX2)
static const Loop AVX2_LOOPS[4][6] = TABLE(avx2_or_portable);
#endif
static const Loop (*LOOPS)[6] = PORTABLE;   /* the fastest the CPU runs: set at import */
static const char *ISA_NAME = "portable";

static int weight_code(const char *c) {
    if (!strcmp(c, "f4")) return W_F32;
    if (!strcmp(c, "f8")) return W_F64;
    if (!strcmp(c, "f2")) return W_F16;
    if (!strcmp(c, "bf16")) return W_BF16;
    return -1;
}

static int mask_code(const char *c) {
    if (!strcmp(c, "")) return M_NONE;
    if (!strcmp(c, "u1") || !strcmp(c, "b1")) return M_BYTE;
    if (!strcmp(c, "f4")) return M_F32;
    if (!strcmp(c, "f8")) return M_F64;
    if (!strcmp(c, "f2")) return M_F16;
    if (!strcmp(c, "bf16")) return M_BF16;
    return -1;
}


static const Loop (*loops_named(const char *isa))[6] {
    if (!isa || !*isa) return LOOPS;
    if (!strcmp(isa, "portable")) return PORTABLE;
#ifdef HAVE_AVX2
    if (!strcmp(isa, "avx2") && LOOPS == AVX2_LOOPS) return AVX2_LOOPS;
#endif
    return NULL;
}

/* reduce_chunk(weight, weight_code, mask, mask_code, bits[, isa]) -> (abs_sum, ones, nonzero, status)
 * weight and mask: C-contiguous buffers of n elements (mask None, code ""); bits: a writable
 * buffer of ceil(n / 8) bytes, or None. Codes: "f4", "f8", "f2", "bf16" (raw uint16); masks
 * "u1", "b1", "f4", "f8", "f2", "bf16". isa: one of ISAS (tests run each), default the fastest. */
static PyObject *reduce_chunk(PyObject *self, PyObject *args) {
    PyObject *wobj, *mobj, *bobj;
    const char *wc, *mc, *isa = "";
    if (!PyArg_ParseTuple(args, "OsOsO|s", &wobj, &wc, &mobj, &mc, &bobj, &isa)) return NULL;
    int wk = weight_code(wc), mk = mask_code(mc);
    if (wk < 0 || mk < 0) return PyErr_Format(PyExc_ValueError, "unsupported dtypes %s x %s", wc, mc);
    const Loop (*loops)[6] = loops_named(isa);
    if (!loops) return PyErr_Format(PyExc_ValueError, "no loop for %s on this CPU", isa);
    Py_buffer wb, mb = {0}, bb = {0};
    if (PyObject_GetBuffer(wobj, &wb, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = wb.len / ITEM[wk];
    PyObject *result = NULL;
    int have_mask = 0, have_bits = 0;
    if (wb.len % ITEM[wk]) { PyErr_SetString(PyExc_ValueError, "weight buffer is not whole elements"); goto done; }
    if (mk != M_NONE) {
        if (mobj == Py_None) { PyErr_SetString(PyExc_ValueError, "mask code without a mask"); goto done; }
        if (PyObject_GetBuffer(mobj, &mb, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_mask = 1;
        if (mb.len != n * MASK_ITEM[mk]) { PyErr_SetString(PyExc_ValueError, "mask and weight sizes differ"); goto done; }
    }
    if (bobj != Py_None) {
        if (PyObject_GetBuffer(bobj, &bb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
        have_bits = 1;
        if (bb.len != (n + 7) / 8) { PyErr_SetString(PyExc_ValueError, "bits buffer has the wrong size"); goto done; }
    }
    Sums s;
    Py_BEGIN_ALLOW_THREADS
    s = loops[wk][mk](wb.buf, have_mask ? mb.buf : NULL, have_bits ? (uint8_t *)bb.buf : NULL, n);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("dLLi", s.abs_sum, (long long)s.ones, (long long)s.nonzero, s.status);
done:
    PyBuffer_Release(&wb);
    if (have_mask) PyBuffer_Release(&mb);
    if (have_bits) PyBuffer_Release(&bb);
    return result;
}

/* bits set in both of n bytes, 8 bytes at a time (with POPCNT where the CPU has it) */
#define COUNT_BOTH(NAME, ATTR)                                                        \
    ATTR static long long NAME(const uint8_t *a, const uint8_t *b, Py_ssize_t n) {      \
        long long count = 0;                                                          \
        Py_ssize_t i = 0;                                                             \
        for (; i + 8 <= n; i += 8) {                                                  \
            uint64_t x, y;                                                            \
            memcpy(&x, a + i, 8), memcpy(&y, b + i, 8);                               \
            count += __builtin_popcountll(x & y);                                     \
        }                                                                             \
        for (; i < n; i++) count += __builtin_popcount(a[i] & b[i]);                  \
        return count;                                                                 \
    }
COUNT_BOTH(count_both_portable, )
static long long (*count_both_loop)(const uint8_t *, const uint8_t *, Py_ssize_t) = count_both_portable;
#ifdef HAVE_AVX2
COUNT_BOTH(count_both_popcnt, __attribute__((target("popcnt"))))
#endif

/* count_both(a, b) -> the bits set in both of two equal-sized byte buffers (survival between two
 * rounds' packed masks), in one pass without the temporary of popcount(a & b) */
static PyObject *count_both(PyObject *self, PyObject *args) {
    PyObject *aobj, *bobj;
    if (!PyArg_ParseTuple(args, "OO", &aobj, &bobj)) return NULL;
    Py_buffer a, b;
    if (PyObject_GetBuffer(aobj, &a, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (PyObject_GetBuffer(bobj, &b, PyBUF_C_CONTIGUOUS) < 0) { PyBuffer_Release(&a); return NULL; }
    PyObject *result = NULL;
    if (a.len != b.len) {
        PyErr_SetString(PyExc_ValueError, "the two bit buffers differ in size");
    } else {
        long long count;
        Py_BEGIN_ALLOW_THREADS
        count = count_both_loop(a.buf, b.buf, a.len);
        Py_END_ALLOW_THREADS
        result = PyLong_FromLongLong(count);
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

/* Memory maps that may shrink. A file truncated while it is mapped (a copy still in progress, a
 * sync tool) turns every read of its lost pages into SIGBUS, which kills the process. A guarded
 * map's lost pages are replaced by zero pages in the signal handler, the map is marked hit, and
 * the reader turns the mark into that file's named error (io/arrays.py). A fault anywhere else
 * goes to the handler that was there before. */
#if defined(__unix__) || defined(__APPLE__)
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#define GUARD_SLOTS 4096
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif
typedef struct { volatile uintptr_t start, end; volatile sig_atomic_t hit; } Guard;
static Guard guards[GUARD_SLOTS];
static struct sigaction previous_bus;
static int bus_handler_installed = 0;
static uintptr_t page_bytes = 4096;

static void on_bus(int sig, siginfo_t *info, void *context) {
    uintptr_t at = (uintptr_t)info->si_addr, page = at & ~(page_bytes - 1), end = 0;
    (void)sig, (void)context;
    /* every slot that covers the address is marked: a map being closed is unguarded just after
     * its unmapping, so a new map at the same addresses may briefly share them */
    for (int i = 0; i < GUARD_SLOTS; i++) {
        uintptr_t slot_start = guards[i].start, slot_end = guards[i].end;
        if (slot_start && slot_start <= at && at < slot_end) {
            guards[i].hit = 1;
            end = slot_end > end ? slot_end : end;
        }
    }
    if (end && mmap((void *)page, end - page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED)
        return;   /* the read is done again, on zeros */
    sigaction(SIGBUS, &previous_bus, NULL);   /* not ours: it faults again under the previous handler */
}

/* guard(buffer) -> slot (-1: no slot free) for a memory map's bytes */
static PyObject *guard(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uintptr_t start = (uintptr_t)view.buf, end = start + (uintptr_t)view.len;
    PyBuffer_Release(&view);
    if (!bus_handler_installed) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = on_bus;
        action.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&action.sa_mask);
        page_bytes = (uintptr_t)sysconf(_SC_PAGESIZE);
        if (sigaction(SIGBUS, &action, &previous_bus) != 0) return PyErr_SetFromErrno(PyExc_OSError);
        bus_handler_installed = 1;
    }
    for (int i = 0; i < GUARD_SLOTS; i++) {   /* the GIL is held: no other thread takes slots */
        if (!guards[i].start && start) {
            guards[i].hit = 0;
            guards[i].end = end;
            guards[i].start = start;
            return PyLong_FromLong(i);
        }
    }
    return PyLong_FromLong(-1);
}

static int slot_arg(PyObject *arg) {
    long slot = PyLong_AsLong(arg);
    if (slot == -1 && PyErr_Occurred()) return -1;
    if (slot < 0 || slot >= GUARD_SLOTS) { PyErr_SetString(PyExc_ValueError, "no such guard slot"); return -1; }
    return (int)slot;
}

/* guard_hit(slot) -> whether the map lost pages since it was guarded */
static PyObject *guard_hit(PyObject *self, PyObject *arg) {
    int slot = slot_arg(arg);
    if (slot < 0) return NULL;
    return PyBool_FromLong(guards[slot].hit);
}

/* unguard(slot): the map is about to be unmapped; its addresses may be reused */
static PyObject *unguard(PyObject *self, PyObject *arg) {
    int slot = slot_arg(arg);
    if (slot < 0) return NULL;
    guards[slot].start = 0;
    guards[slot].end = 0;
    guards[slot].hit = 0;
    Py_RETURN_NONE;
}
#define GUARD_METHODS \
    {"guard", guard, METH_O, "guard(buffer) -> slot: lost pages of this memory map read as zeros, marked"}, \
    {"guard_hit", guard_hit, METH_O, "guard_hit(slot) -> whether the guarded map lost pages"}, \
    {"unguard", unguard, METH_O, "unguard(slot): stop guarding (before the map is closed)"},
#else
#define GUARD_METHODS
#endif

static PyMethodDef METHODS[] = {
    GUARD_METHODS
    {"reduce_chunk", reduce_chunk, METH_VARARGS,
     "reduce_chunk(weight, weight_code, mask, mask_code, bits[, isa]) -> (abs_sum, ones, nonzero, status)"},
    {"count_both", count_both, METH_VARARGS, "count_both(a, b) -> bits set in both byte buffers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_fused", "flowscan's fused chunk reduction", -1, METHODS};

PyMODINIT_FUNC PyInit__fused(void) {
#ifdef HAVE_AVX2
    unsigned eax, ebx, ecx, edx;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("popcnt")) count_both_loop = count_both_popcnt;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
        __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C)) {
        LOOPS = AVX2_LOOPS, ISA_NAME = "avx2";
    }
#endif
    PyObject *module = PyModule_Create(&MODULE);
    if (!module) return NULL;
    PyObject *isas = LOOPS == PORTABLE ? Py_BuildValue("(s)", "portable") : Py_BuildValue("(ss)", ISA_NAME, "portable");
    if (PyModule_AddStringConstant(module, "ISA", ISA_NAME) < 0 || PyModule_AddObject(module, "ISAS", isas) < 0) {
        Py_XDECREF(isas);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
