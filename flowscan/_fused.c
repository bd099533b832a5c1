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

/* The portable loop. GCC/Clang vector extensions: SSE2 everywhere on x86-64, NEON on arm64. */
typedef double v4d __attribute__((vector_size(32)));
typedef long long v4di __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int v4si __attribute__((vector_size(16)));
typedef unsigned v4u __attribute__((vector_size(16)));
typedef unsigned short v4u16 __attribute__((vector_size(8)));
typedef unsigned char v4u8 __attribute__((vector_size(4)));

static ALWAYS_INLINE v4d as_v4d(v4di x) { v4d d; memcpy(&d, &x, sizeof d); return d; }
static ALWAYS_INLINE v4di as_v4di(v4d x) { v4di d; memcpy(&d, &x, sizeof d); return d; }
static ALWAYS_INLINE v4f as_v4f(v4u x) { v4f f; memcpy(&f, &x, sizeof f); return f; }

/* |w| of elements i..i+3 as numpy's reducer sees them (float32 values, float64 for float64
 * weights), widened to float64. NaN and infinity stay non-finite (half: exponent 31). */
static ALWAYS_INLINE v4d abs4(const void *w, const int wk, Py_ssize_t i) {
    const v4di clear_sign = {0x7FFFFFFFFFFFFFFFLL, 0x7FFFFFFFFFFFFFFFLL, 0x7FFFFFFFFFFFFFFFLL,
                             0x7FFFFFFFFFFFFFFFLL};
    v4d d;
    if (wk == W_F64) {
        memcpy(&d, (const double *)w + i, sizeof d);
    } else if (wk == W_F32) {
        v4f f;
        memcpy(&f, (const float *)w + i, sizeof f);
        d = __builtin_convertvector(f, v4d);
    } else {
        v4u16 raw;
        memcpy(&raw, (const uint16_t *)w + i, sizeof raw);
        v4u h = __builtin_convertvector(raw, v4u);
        if (wk == W_BF16) {
            d = __builtin_convertvector(as_v4f(h << 16), v4d);
        } else {   /* float16: normal numbers by rebiasing, subnormals by scaling, inf/NaN kept */
            v4u mag = h & 0x7FFFu, exp = mag >> 10;
            v4u normal = (mag << 13) + (112u << 23);
            v4u sub;
            v4f subf = __builtin_convertvector(mag, v4f) * (1.0f / 16777216.0f);
            memcpy(&sub, &subf, sizeof sub);
            v4u is_sub = (v4u)(exp == 0), is_special = (v4u)(exp == 31);
            v4u bits = (normal & ~is_sub) | (sub & is_sub) | (is_special & 0x7F800000u);
            d = __builtin_convertvector(as_v4f(bits), v4d);
        }
    }
    return as_v4d(as_v4di(d) & clear_sign);
}

/* mask elements i..i+3: -1 where the mask is exactly 1 (keep) or exactly 0 (zero), else 0 */
static ALWAYS_INLINE void mask4(const void *m, const int mk, Py_ssize_t i, v4di *keep, v4di *zero) {
    if (mk == M_BYTE) {
        v4u8 raw;
        memcpy(&raw, (const uint8_t *)m + i, sizeof raw);
        v4si x = __builtin_convertvector(raw, v4si);   /* compared in 32-bit lanes: cheaper */
        *keep = __builtin_convertvector(x == 1, v4di);
        *zero = __builtin_convertvector(x == 0, v4di);
    } else if (mk == M_F32) {
        v4f x;
        memcpy(&x, (const float *)m + i, sizeof x);
        *keep = __builtin_convertvector(x == 1.0f, v4di);
        *zero = __builtin_convertvector(x == 0.0f, v4di);
    } else if (mk == M_F64) {
        v4d x;
        memcpy(&x, (const double *)m + i, sizeof x);
        *keep = x == 1.0;
        *zero = x == 0.0;
    } else {   /* float16 or bfloat16 */
        v4u16 raw;
        memcpy(&raw, (const uint16_t *)m + i, sizeof raw);
        v4si x = __builtin_convertvector(raw, v4si);
        *keep = __builtin_convertvector(x == ONE16(mk), v4di);
        *zero = __builtin_convertvector((x & 0x7FFF) == 0, v4di);
    }
}

static ALWAYS_INLINE Sums fused_portable(const void *w, const int wk, const void *m, const int mk,
                                uint8_t *bits, Py_ssize_t n) {
    const v4di high = {128, 64, 32, 16}, low = {8, 4, 2, 1};
    const v4di inf = {0x7FF0000000000000LL, 0x7FF0000000000000LL, 0x7FF0000000000000LL, 0x7FF0000000000000LL};
    v4d sum_lo = {0, 0, 0, 0}, sum_hi = {0, 0, 0, 0};   /* 8 float64 lanes */
    v4di ones = {0, 0, 0, 0}, zeros = {0, 0, 0, 0}, bad = {0, 0, 0, 0};
    uint64_t seen = 0, byte_ones = 0;   /* byte masks */
    /* the last n % 8 elements go through the same code from zero-padded copies */
    unsigned char wtail[64] = {0}, mtail[64] = {0};
    Py_ssize_t whole = n - n % 8, pad = n % 8 ? 8 - n % 8 : 0;
    for (Py_ssize_t i = 0; i < n; i += 8) {
        const void *wp = w, *mp = m;
        Py_ssize_t at = i;
        if (i == whole) {   /* the tail */
            memcpy(wtail, (const char *)w + i * ITEM[wk], (n - i) * ITEM[wk]);
            if (mk != M_NONE) memcpy(mtail, (const char *)m + i * MASK_ITEM[mk], (n - i) * MASK_ITEM[mk]);
            wp = wtail, mp = mtail, at = 0;
        }
        v4d lo = abs4(wp, wk, at), hi = abs4(wp, wk, at + 4);
        v4di keep_lo, keep_hi, zero_lo, zero_hi;
        bad |= (as_v4di(lo) >= inf) | (as_v4di(hi) >= inf);
        if (mk == M_BYTE) {   /* 8 mask bytes as one word: bits and count by multiplication */
            uint64_t word;
            memcpy(&word, (const uint8_t *)mp + at, 8);
            seen |= word;   /* a byte above 1 anywhere: the mask is not 0/1 */
            unsigned byte = (unsigned)((word * 0x8040201008040201ULL) >> 56);   /* byte j -> bit 7-j */
            byte_ones += (word * 0x0101010101010101ULL) >> 56;                   /* the bytes' sum */
            v4di spread = {byte, byte, byte, byte};
            keep_lo = (spread & high) != 0, keep_hi = (spread & low) != 0;
            sum_lo += as_v4d(as_v4di(lo) & keep_lo), sum_hi += as_v4d(as_v4di(hi) & keep_hi);
            if (bits) bits[i / 8] = (uint8_t)byte;
            continue;
        }
        if (mk == M_NONE) {
            keep_lo = lo != 0.0, keep_hi = hi != 0.0;   /* NaN != 0: kept, as numpy counts it */
            sum_lo += lo, sum_hi += hi;
        } else {
            mask4(mp, mk, at, &keep_lo, &zero_lo);
            mask4(mp, mk, at + 4, &keep_hi, &zero_hi);
            sum_lo += as_v4d(as_v4di(lo) & keep_lo), sum_hi += as_v4d(as_v4di(hi) & keep_hi);
            zeros -= zero_lo + zero_hi;
        }
        ones -= keep_lo + keep_hi;
        if (bits) {
            v4di b = (keep_lo & high) | (keep_hi & low);
            bits[i / 8] = (uint8_t)(b[0] | b[1] | b[2] | b[3]);
        }
    }
    Sums s = {0.0, 0, 0, 0};
    s.abs_sum = ((sum_lo[0] + sum_lo[1]) + (sum_lo[2] + sum_lo[3])) + ((sum_hi[0] + sum_hi[1]) + (sum_hi[2] + sum_hi[3]));
    int64_t kept = ones[0] + ones[1] + ones[2] + ones[3];
    int64_t zero = zeros[0] + zeros[1] + zeros[2] + zeros[3] - (mk == M_NONE ? 0 : pad);
    if (mk == M_BYTE) {   /* every byte 0 or 1: the ones and zeros add up by construction */
        kept = (int64_t)byte_ones;
        zero = n - kept;
        if (seen & 0xFEFEFEFEFEFEFEFEULL) s.status = 1;
    }
    s.ones = mk == M_NONE ? 0 : kept;
    s.nonzero = kept;
    if (mk != M_NONE && kept + zero != n) s.status = 1;
    if (!s.status && (bad[0] | bad[1] | bad[2] | bad[3])) s.status = 2;
    return s;
}

/* The AVX2 loop (x86-64 with GCC or Clang; picked at import when the CPU has AVX2, F16C and POPCNT):
 * the same sums, with what the portable vectors cannot say: float16 widened by F16C, the kept
 * entries read off as a bit mask (movemask) and counted by popcount, two groups of 8 per step. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2 1
#include <cpuid.h>
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,f16c,popcnt")))

static uint8_t REVERSED[256];   /* byte with its bits reversed: movemask is LSB first, packbits MSB */

typedef struct {
    __m256d sum[2];
    __m256i bad;                    /* non-finite |w| seen, 32-bit or 64-bit lanes */
    int64_t ones, zeros;
    uint64_t seen;                  /* byte masks: every byte ORed (a byte above 1: not 0/1) */
} Acc;

/* |w| of 8 elements as float32: exact for float32/16 and bfloat16, NaN and infinity kept */
static AVX2 ALWAYS_INLINE __m256 abs8(const void *w, const int wk, Py_ssize_t i) {
    __m256 x;
    if (wk == W_F32) {
        x = _mm256_loadu_ps((const float *)w + i);
    } else if (wk == W_F16) {
        x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    } else {   /* bfloat16: the high half of a float32 */
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
        x = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
}

/* mask elements i..i+7 in 32-bit lanes: all ones where the mask is exactly 1 (*keep) or 0 (*zero;
 * float masks only: a byte mask is checked by its bytes, `seen`) */
static AVX2 ALWAYS_INLINE void mask8(const void *m, const int mk, Py_ssize_t i, __m256i *keep, __m256i *zero,
                                    uint64_t *seen) {
    if (mk == M_BYTE) {
        __m128i raw = _mm_loadl_epi64((const __m128i *)((const uint8_t *)m + i));
        *seen |= (uint64_t)_mm_cvtsi128_si64(raw);
        *keep = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(raw), _mm256_set1_epi32(1));
    } else if (mk == M_F32) {
        __m256 x = _mm256_loadu_ps((const float *)m + i);
        *keep = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_set1_ps(1.0f), _CMP_EQ_OQ));
        *zero = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ));
    } else if (mk == M_F16 || mk == M_BF16) {
        __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)m + i)));
        *keep = _mm256_cmpeq_epi32(x, _mm256_set1_epi32(ONE16(mk)));
        *zero = _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFF)), _mm256_setzero_si256());
    } else {   /* float64: compared in 64-bit lanes, narrowed to 32 */
        const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        __m256d lo = _mm256_loadu_pd((const double *)m + i), hi = _mm256_loadu_pd((const double *)m + i + 4);
        __m256i k[2] = {_mm256_castpd_si256(_mm256_cmp_pd(lo, _mm256_set1_pd(1.0), _CMP_EQ_OQ)),
                        _mm256_castpd_si256(_mm256_cmp_pd(hi, _mm256_set1_pd(1.0), _CMP_EQ_OQ))};
        __m256i z[2] = {_mm256_castpd_si256(_mm256_cmp_pd(lo, _mm256_setzero_pd(), _CMP_EQ_OQ)),
                        _mm256_castpd_si256(_mm256_cmp_pd(hi, _mm256_setzero_pd(), _CMP_EQ_OQ))};
        *keep = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(k[0], evens),
                                          _mm256_permutevar8x32_epi32(k[1], evens), 0x20);
        *zero = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(z[0], evens),
                                          _mm256_permutevar8x32_epi32(z[1], evens), 0x20);
    }
}

/* one group of 8 elements: sums into acc, the kept entries' bits returned (element j: bit j) */
static AVX2 ALWAYS_INLINE int group8(const void *w, const int wk, const void *m, const int mk, Py_ssize_t i,
                                     Acc *acc) {
    __m256i keep, zero = _mm256_setzero_si256();
    if (wk == W_F64) {   /* float64 weights: 64-bit lanes throughout */
        const __m256d magnitude = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
        __m256d lo = _mm256_and_pd(_mm256_loadu_pd((const double *)w + i), magnitude);
        __m256d hi = _mm256_and_pd(_mm256_loadu_pd((const double *)w + i + 4), magnitude);
        const __m256i finite = _mm256_set1_epi64x(0x7FEFFFFFFFFFFFFFLL);
        acc->bad = _mm256_or_si256(acc->bad, _mm256_or_si256(_mm256_cmpgt_epi64(_mm256_castpd_si256(lo), finite),
                                                             _mm256_cmpgt_epi64(_mm256_castpd_si256(hi), finite)));
        __m256d klo, khi;
        if (mk == M_NONE) {
            klo = _mm256_cmp_pd(lo, _mm256_setzero_pd(), _CMP_NEQ_UQ);   /* NaN != 0: kept, as numpy counts */
            khi = _mm256_cmp_pd(hi, _mm256_setzero_pd(), _CMP_NEQ_UQ);
        } else {
            mask8(m, mk, i, &keep, &zero, &acc->seen);
            klo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(keep)));
            khi = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(keep, 1)));
        }
        acc->sum[0] = _mm256_add_pd(acc->sum[0], _mm256_and_pd(lo, klo));
        acc->sum[1] = _mm256_add_pd(acc->sum[1], _mm256_and_pd(hi, khi));
        if (mk == M_NONE) return _mm256_movemask_pd(klo) | _mm256_movemask_pd(khi) << 4;
    } else {
        __m256 a = abs8(w, wk, i);
        acc->bad = _mm256_or_si256(acc->bad, _mm256_cmpgt_epi32(_mm256_castps_si256(a), _mm256_set1_epi32(0x7F7FFFFF)));
        if (mk == M_NONE) keep = _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_UQ));
        else mask8(m, mk, i, &keep, &zero, &acc->seen);
        __m256 kept = _mm256_and_ps(a, _mm256_castsi256_ps(keep));
        acc->sum[0] = _mm256_add_pd(acc->sum[0], _mm256_cvtps_pd(_mm256_castps256_ps128(kept)));
        acc->sum[1] = _mm256_add_pd(acc->sum[1], _mm256_cvtps_pd(_mm256_extractf128_ps(kept, 1)));
    }
    if (mk != M_NONE && mk != M_BYTE) acc->zeros += _mm_popcnt_u32((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(zero)));
    return _mm256_movemask_ps(_mm256_castsi256_ps(keep));
}

static AVX2 ALWAYS_INLINE Sums fused_avx2(const void *w, const int wk, const void *m, const int mk,
                                          uint8_t *bits, Py_ssize_t n) {
    Acc acc[2];   /* two groups per step, each with its own sums: the adds do not wait on each other */
    for (int k = 0; k < 2; k++) {
        acc[k].sum[0] = acc[k].sum[1] = _mm256_setzero_pd();
        acc[k].bad = _mm256_setzero_si256();
        acc[k].ones = acc[k].zeros = 0;
        acc[k].seen = 0;
    }
    Py_ssize_t whole = n - n % 8, i = 0;
    for (; i + 16 <= whole; i += 16) {
        for (int k = 0; k < 2; k++) {
            int kept = group8(w, wk, m, mk, i + 8 * k, &acc[k]);
            acc[k].ones += _mm_popcnt_u32((unsigned)kept);
            if (bits) bits[(i >> 3) + k] = REVERSED[kept];
        }
    }
    /* the last groups, and the last n % 8 elements from zero-padded copies */
    unsigned char wtail[64] = {0}, mtail[64] = {0};
    for (; i < n; i += 8) {
        const void *wp = w, *mp = m;
        Py_ssize_t at = i;
        if (i == whole) {
            memcpy(wtail, (const char *)w + i * ITEM[wk], (n - i) * ITEM[wk]);
            if (mk != M_NONE) memcpy(mtail, (const char *)m + i * MASK_ITEM[mk], (n - i) * MASK_ITEM[mk]);
            wp = wtail, mp = mtail, at = 0;
        }
        int kept = group8(wp, wk, mp, mk, at, &acc[0]);
        acc[0].ones += _mm_popcnt_u32((unsigned)kept);
        if (bits) bits[i >> 3] = REVERSED[kept];
    }
    Sums s = {0.0, 0, 0, 0};
    __m256d sum = _mm256_add_pd(_mm256_add_pd(acc[0].sum[0], acc[0].sum[1]), _mm256_add_pd(acc[1].sum[0], acc[1].sum[1]));
    double lanes[4];
    _mm256_storeu_pd(lanes, sum);
    s.abs_sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    int64_t kept = acc[0].ones + acc[1].ones, pad = n % 8 ? 8 - n % 8 : 0;
    s.ones = mk == M_NONE ? 0 : kept;
    s.nonzero = kept;
    if (mk == M_BYTE) {
        if ((acc[0].seen | acc[1].seen) & 0xFEFEFEFEFEFEFEFEULL) s.status = 1;
    } else if (mk != M_NONE && kept + acc[0].zeros + acc[1].zeros - pad != n) {
        s.status = 1;
    }
    if (!s.status && !_mm256_testz_si256(_mm256_or_si256(acc[0].bad, acc[1].bad), _mm256_or_si256(acc[0].bad, acc[1].bad)))
        s.status = 2;
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
ALL_PAIRS(avx2, AVX2)
static const Loop AVX2_LOOPS[4][6] = TABLE(avx2);
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

static PyMethodDef METHODS[] = {
    {"reduce_chunk", reduce_chunk, METH_VARARGS,
     "reduce_chunk(weight, weight_code, mask, mask_code, bits[, isa]) -> (abs_sum, ones, nonzero, status)"},
    {"count_both", count_both, METH_VARARGS, "count_both(a, b) -> bits set in both byte buffers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_fused", "flowscan's fused chunk reduction", -1, METHODS};

PyMODINIT_FUNC PyInit__fused(void) {
#ifdef HAVE_AVX2
    for (int b = 0; b < 256; b++) {
        int r = 0;
        for (int j = 0; j < 8; j++) r |= ((b >> j) & 1) << (7 - j);
        REVERSED[b] = (uint8_t)r;
    }
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
