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
enum { M_NONE, M_BYTE, M_F32, M_F64, M_F16 };

static const Py_ssize_t ITEM[4] = {4, 8, 2, 2}, MASK_ITEM[5] = {0, 1, 4, 8, 2};

typedef struct {
    double abs_sum;
    int64_t ones, nonzero;
    int status;
} Sums;

/* GCC/Clang vector extensions: SSE2 everywhere on x86-64, NEON on arm64, no intrinsics. */
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
    } else {   /* float16: 1.0 is 0x3C00; +-0 have no bits but the sign */
        v4u16 raw;
        memcpy(&raw, (const uint16_t *)m + i, sizeof raw);
        v4si x = __builtin_convertvector(raw, v4si);
        *keep = __builtin_convertvector(x == 0x3C00, v4di);
        *zero = __builtin_convertvector((x & 0x7FFF) == 0, v4di);
    }
}

static ALWAYS_INLINE Sums fused(const void *w, const int wk, const void *m, const int mk,
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

/* The type-specialised loops: the compiler unrolls and vectorises each pair on its own, on x86-64
 * Linux once for AVX2 and once for the baseline (the loader picks one per CPU: 2.5-4x faster). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
#define SPECIALISE(WK, MK) \
    CLONES static Sums fused_##WK##_##MK(const void *w, const void *m, uint8_t *bits, Py_ssize_t n) { \
        return fused(w, WK, m, MK, bits, n);                                                \
    }
#define ALL_MASKS(WK) SPECIALISE(WK, M_NONE) SPECIALISE(WK, M_BYTE) SPECIALISE(WK, M_F32) \
                      SPECIALISE(WK, M_F64) SPECIALISE(WK, M_F16)
ALL_MASKS(W_F32)
ALL_MASKS(W_F64)
ALL_MASKS(W_F16)
ALL_MASKS(W_BF16)

typedef Sums (*Loop)(const void *, const void *, uint8_t *, Py_ssize_t);
#define ROW(WK) {fused_##WK##_M_NONE, fused_##WK##_M_BYTE, fused_##WK##_M_F32, fused_##WK##_M_F64, fused_##WK##_M_F16}
static const Loop LOOPS[4][5] = {ROW(W_F32), ROW(W_F64), ROW(W_F16), ROW(W_BF16)};

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
    return -1;
}


/* reduce(weight, weight_code, mask, mask_code, bits) -> (abs_sum, ones, nonzero, status)
 * weight and mask: C-contiguous buffers of n elements (mask None, code ""); bits: a writable
 * buffer of ceil(n / 8) bytes, or None. Codes: "f4", "f8", "f2", "bf16" (raw uint16); masks
 * "u1", "b1", "f4", "f8", "f2". */
static PyObject *reduce_chunk(PyObject *self, PyObject *args) {
    PyObject *wobj, *mobj, *bobj;
    const char *wc, *mc;
    if (!PyArg_ParseTuple(args, "OsOsO", &wobj, &wc, &mobj, &mc, &bobj)) return NULL;
    int wk = weight_code(wc), mk = mask_code(mc);
    if (wk < 0 || mk < 0) return PyErr_Format(PyExc_ValueError, "unsupported dtypes %s x %s", wc, mc);
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
    s = LOOPS[wk][mk](wb.buf, have_mask ? mb.buf : NULL, have_bits ? (uint8_t *)bb.buf : NULL, n);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("dLLi", s.abs_sum, (long long)s.ones, (long long)s.nonzero, s.status);
done:
    PyBuffer_Release(&wb);
    if (have_mask) PyBuffer_Release(&mb);
    if (have_bits) PyBuffer_Release(&bb);
    return result;
}

static PyMethodDef METHODS[] = {
    {"reduce_chunk", reduce_chunk, METH_VARARGS,
     "reduce_chunk(weight, weight_code, mask, mask_code, bits) -> (abs_sum, ones, nonzero, status)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_fused", "flowscan's fused chunk reduction", -1, METHODS};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&MODULE); }
