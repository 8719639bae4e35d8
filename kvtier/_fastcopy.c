/* kvtier._fastcopy: a put's copy of a block and its crc32c, in one pass over the bytes, and a
reload's copies of a block's runs into their tensors; large copies with non-temporal stores. For
a block read straight into a prefix's tensors (65 pieces), the crc32c of all its pieces and
whether they can all take an O_DIRECT read, one call each (crc_parts, aligned).
A put of many blocks of one prefix copies them in one call (copy_blocks), reading each tensor's
rows for all of them as one stream rather than one 32 KiB stream per block and tensor.

Why: a put copies each layer of a block into its host slot (or an SSD staging buffer) and
checksums it. From Python that is two passes, a numpy copy and then crc32c over the copied
bytes, and the crc32 instruction (8 bytes a cycle at best) cannot keep up with memory. On this
project's 2-core test machine (python -m kvtier.bench.host_tier, against one numpy copy of the
same bytes): a put of 2 MiB blocks (64 pieces of 32 KiB) with their layer checksums ran at
0.35-0.42x in two passes, 0.55-0.67x here; a 32 MiB block's put at 0.51x in two passes, 1.20x
here (with the streaming stores below).

The checksum is crc32c (Castagnoli), the value crc32c.crc32c gives, computed by folding with
carry-less multiplies (AVX2 + VPCLMULQDQ: x86-64 from Ice Lake and Zen 3 on) while the bytes are
copied. Where the module is not built, or the CPU lacks those instructions (``available`` is 0),
kvtier.block writes blocks in two passes with numpy and the crc32c package: the same bytes.

Non-temporal stores: a copy of ``STREAM_BYTES`` or more (one block) writes its destination with
streaming stores, which do not read the destination's lines into the cache before overwriting
them. An ordinary store does, so copying a block between its slot and 64 tensors moved three
bytes through memory per byte copied, against two: on the 2-core development VM, scattering
256 MiB of 2 MiB blocks into the 64 tensors of a prefix took 21-27 ms with memcpy and 14-18 ms
streamed, a plain numpy copy of the same bytes 20-27 ms. A block is copied once and read much
later (a put) or by the model as a whole (a reload), so nothing is lost by not caching it. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVT_X86 1
#else
#define KVT_X86 0
#endif

#define FOLD_BYTES 256 /* 8 accumulators of 32 bytes: each folds 2048 bits forward */
#define CPU_FEATURES "avx2,pclmul,vpclmulqdq,sse4.2"
#define GIL_FREE_BYTES (256 << 10) /* kvtier.block._GIL_FREE_BYTES (tests/test_fastcopy.py) */
#define STREAM_BYTES (256 << 10)   /* copies of this many bytes or more stream their stores */

static int available = 0;
static uint64_t fold_hi, fold_lo; /* x^(64+2048-1) and x^(2048-1) mod P, reflected */

#if KVT_X86
/* x^n mod P (P the Castagnoli polynomial) as the 64-bit operand of a reflected carry-less
   multiply: the coefficient of x^d at bit 63 - d. */
static uint64_t xpow_reflected(unsigned n) {
    uint64_t r = 1;
    for (unsigned i = 0; i < n; i++) {
        r <<= 1;
        if (r & ((uint64_t)1 << 32)) r ^= 0x11EDC6F41ULL;
    }
    uint64_t k = 0;
    for (int d = 0; d < 32; d++)
        if (r & ((uint64_t)1 << d)) k |= (uint64_t)1 << (63 - d);
    return k;
}

/* Copy n bytes (none where dst is NULL) and return their raw crc state from state c, a word at
   a time: for short runs and the tail of a long one. */
__attribute__((target(CPU_FEATURES))) static uint32_t copy_words(uint32_t c, const uint8_t *src,
                                                                 uint8_t *dst, size_t n) {
    uint64_t c64 = c, w;
    for (; n >= 8; n -= 8, src += 8) {
        memcpy(&w, src, 8);
        c64 = _mm_crc32_u64(c64, w);
        if (dst) memcpy(dst, &w, 8), dst += 8;
    }
    c = (uint32_t)c64;
    for (; n; n--, src++) {
        c = _mm_crc32_u8(c, *src);
        if (dst) *dst++ = *src;
    }
    return c;
}

/* Copy n bytes from src to dst and return their raw crc state (not inverted) from state c.

   The message is folded 256 bytes at a time into eight 32-byte accumulators: with the state
   XORed into its first four bytes, a message M has raw crc M x^32 mod P, and each 128-bit lane
   of an accumulator, A = H x^64 + L, is carried 2048 bits forward as H x^2111 + L x^2047
   (mod P; a reflected carry-less multiply adds one factor x), XORed into the data 256 bytes on.
   What remains, 256 bytes congruent to everything read, is finished with the crc32
   instruction, then the tail. Every 32 bytes loaded are stored to dst as they are: with
   streaming stores when ``stream`` is 1 (a constant where it is inlined), from dst's first
   32-byte boundary on; nowhere when it is 2 (dst NULL: a checksum alone). */
__attribute__((target(CPU_FEATURES), always_inline)) static inline uint32_t
fold(uint32_t c, const uint8_t *src, uint8_t *dst, size_t n, const int stream) {
    if (n < 2 * FOLD_BYTES + 32) return copy_words(c, src, dst, n);
    if (stream == 1) {
        size_t head = (size_t)(-(uintptr_t)dst) & 31;
        c = copy_words(c, src, dst, head);
        src += head, dst += head, n -= head;
    }
#define STORE(p, v)                                                                   \
    (stream == 2   ? (void)0                                                             \
     : stream == 1 ? _mm256_stream_si256((__m256i *)(p), (v))                            \
                   : _mm256_storeu_si256((__m256i *)(p), (v)))
    const __m256i k = _mm256_set_epi64x((long long)fold_lo, (long long)fold_hi,
                                        (long long)fold_lo, (long long)fold_hi);
    __m256i acc[8];
    for (int j = 0; j < 8; j++) {
        acc[j] = _mm256_loadu_si256((const __m256i *)(src + 32 * j));
        STORE(dst + 32 * j, acc[j]);
    }
    acc[0] = _mm256_xor_si256(acc[0], _mm256_set_epi64x(0, 0, 0, (long long)c));
    src += FOLD_BYTES, n -= FOLD_BYTES;
    if (stream != 2) dst += FOLD_BYTES;
    for (; n >= FOLD_BYTES; n -= FOLD_BYTES, src += FOLD_BYTES, dst += stream == 2 ? 0 : FOLD_BYTES) {
        for (int j = 0; j < 8; j++) {
            __m256i d = _mm256_loadu_si256((const __m256i *)(src + 32 * j));
            STORE(dst + 32 * j, d);
            __m256i t = _mm256_xor_si256(_mm256_clmulepi64_epi128(acc[j], k, 0x00),
                                         _mm256_clmulepi64_epi128(acc[j], k, 0x11));
            acc[j] = _mm256_xor_si256(d, t);
        }
    }
    uint64_t folded[FOLD_BYTES / 8], c64 = 0;
    for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(folded + 4 * j), acc[j]);
    for (int i = 0; i < FOLD_BYTES / 8; i++) c64 = _mm_crc32_u64(c64, folded[i]);
    return copy_words((uint32_t)c64, src, dst, n);
#undef STORE
}

__attribute__((target(CPU_FEATURES))) static uint32_t copy_fold(uint32_t c, const uint8_t *src,
                                                                uint8_t *dst, size_t n, int stream) {
    return stream ? fold(c, src, dst, n, 1) : fold(c, src, dst, n, 0);
}

/* The raw crc state of n bytes from state c, nothing copied. */
__attribute__((target(CPU_FEATURES))) static uint32_t crc_only(uint32_t c, const uint8_t *src, size_t n) {
    return fold(c, src, NULL, n, 2);
}

/* memcpy, with streaming stores from dst's first 16-byte boundary on (SSE2: every x86-64). */
static void copy_stream(uint8_t *dst, const uint8_t *src, size_t n) {
    size_t head = (size_t)(-(uintptr_t)dst) & 15;
    if (head > n) head = n;
    memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    for (; n >= 64; n -= 64, src += 64, dst += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src), b = _mm_loadu_si128((const __m128i *)(src + 16)),
                d = _mm_loadu_si128((const __m128i *)(src + 32)), e = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), d);
        _mm_stream_si128((__m128i *)(dst + 48), e);
    }
    memcpy(dst, src, n);
}
#endif

/* ---- helpers -------------------------------------------------------------------------- */

static int get_index(PyObject *o, Py_ssize_t *out, const char *what) {
    Py_ssize_t v = PyNumber_AsSsize_t(o, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 0, got %zd", what, v);
        return -1;
    }
    *out = v;
    return 0;
}

static void release_all(Py_buffer *views, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) PyBuffer_Release(&views[i]);
}

/* ---- copy_layers ---------------------------------------------------------------------- */

PyDoc_STRVAR(copy_layers_doc,
             "copy_layers(dst, offsets, payloads, row=-1) -> list[int]\n\n"
             "For each layer i, copy the contiguous buffers ``payloads[i]`` one after another into "
             "the writable buffer ``dst`` from ``offsets[i]`` on, and return each layer's crc32c "
             "(``crc32c.crc32c(b''.join(payloads[i]))``), each byte read once. With ``row`` >= 0 "
             "each part is row ``row`` of its buffer, taken as ``shape[0]`` equal rows (a "
             "``[blocks, bytes]`` array: no view to make per block). Everything is checked before "
             "a byte is written. The GIL is released for 256 KiB or more in all (as "
             "kvtier.block.checksum: for less, getting it back costs more than the copy), and "
             "stores stream past the cache from STREAM_BYTES on.");

/* The bytes of part ``v``: all of it, or row ``row`` of its ``shape[0]`` rows (row >= 0). */
static int part_bytes(Py_buffer *v, Py_ssize_t row, Py_ssize_t layer, const uint8_t **at, Py_ssize_t *len) {
    if (row < 0) {
        *at = v->buf, *len = v->len;
        return 0;
    }
    Py_ssize_t rows = v->ndim >= 1 && v->shape ? v->shape[0] : 0;
    if (row >= rows) {
        PyErr_Format(PyExc_ValueError, "layer %zd: row %zd of a part of %zd rows", layer, row, rows);
        return -1;
    }
    *len = v->len / rows;
    *at = (const uint8_t *)v->buf + row * *len;
    return 0;
}

/* Copy ``nb`` blocks: block w (into ``dsts[w]``) is each part whole (rows[w] < 0) or row
   ``rows[w]`` of it. Returns the crcs as a list (nb == 1 and ``flat``) or a list of nb lists.
   Layer by layer, part by part, block by block: the rows of a part for consecutive blocks lie
   one after another, so the source is read as one stream per part, not one per block and part
   (the hardware prefetcher restarts at each new stream; the stores stream to any number of
   destinations at no cost). */
static PyObject *copy_impl(PyObject *const *dstobjs, Py_ssize_t nb, PyObject *offsets, PyObject *payloads,
                           const Py_ssize_t *rows, int flat) {
    PyObject *offs = PySequence_Fast(offsets, "offsets must be a sequence of ints");
    if (!offs) return NULL;
    PyObject *pays = PySequence_Fast(payloads, "payloads must be a sequence of sequences of buffers");
    if (!pays) {
        Py_DECREF(offs);
        return NULL;
    }
    Py_ssize_t layers = PySequence_Fast_GET_SIZE(pays), nviews = nb, held = 0, total = 0;
    PyObject *result = NULL, **seqs = NULL;
    Py_buffer *views = NULL;
    Py_ssize_t *offset = NULL, *count = NULL, *span = NULL;
    uint32_t *crcs = NULL;
    if (PySequence_Fast_GET_SIZE(offs) != layers) {
        PyErr_Format(PyExc_ValueError, "%zd offsets for %zd layers", PySequence_Fast_GET_SIZE(offs), layers);
        goto done;
    }
    seqs = PyMem_Calloc((size_t)layers + 1, sizeof(PyObject *));
    offset = PyMem_Calloc((size_t)layers + 1, sizeof(Py_ssize_t));
    count = PyMem_Calloc((size_t)layers + 1, sizeof(Py_ssize_t));
    span = PyMem_Calloc((size_t)layers + 1, sizeof(Py_ssize_t));
    crcs = PyMem_Calloc((size_t)(layers * nb) + 1, sizeof(uint32_t));
    if (!seqs || !offset || !count || !span || !crcs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < layers; i++) {
        if (get_index(PySequence_Fast_GET_ITEM(offs, i), &offset[i], "offset") < 0) goto done;
        seqs[i] = PySequence_Fast(PySequence_Fast_GET_ITEM(pays, i), "a layer's payload must be a sequence of buffers");
        if (!seqs[i]) goto done;
        count[i] = PySequence_Fast_GET_SIZE(seqs[i]);
        nviews += count[i];
    }
    views = PyMem_Calloc((size_t)nviews, sizeof(Py_buffer));
    if (!views) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < nb; held++)
        if (PyObject_GetBuffer(dstobjs[held], &views[held], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
    for (Py_ssize_t i = 0; i < layers; i++) {
        for (Py_ssize_t j = 0; j < count[i]; j++, held++) {
            const uint8_t *at;
            Py_ssize_t len = 0;
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seqs[i], j), &views[held], PyBUF_C_CONTIGUOUS) < 0)
                goto done;
            for (Py_ssize_t w = 0; w < nb; w++)
                if (part_bytes(&views[held], rows[w], i, &at, &len) < 0) {
                    held++;
                    goto done;
                }
            span[i] += len; /* a part's rows are equal: the same for every block */
        }
        for (Py_ssize_t w = 0; w < nb; w++)
            if (offset[i] > views[w].len || span[i] > views[w].len - offset[i]) {
                PyErr_Format(PyExc_ValueError, "layer %zd: %zd bytes from offset %zd do not fit a buffer of %zd",
                             i, span[i], offset[i], views[w].len);
                goto done;
            }
        total += span[i] * nb;
    }
#if KVT_X86
    {
        int stream = total >= STREAM_BYTES;
        PyThreadState *released = total >= GIL_FREE_BYTES ? PyEval_SaveThread() : NULL;
        Py_buffer *v = &views[nb];
        for (Py_ssize_t i = 0; i < layers; i++) {
            uint32_t *c = crcs + i * nb;
            for (Py_ssize_t w = 0; w < nb; w++) c[w] = ~0u;
            Py_ssize_t at_layer = offset[i];
            for (Py_ssize_t j = 0, k = count[i]; j < k; j++, v++) {
                const uint8_t *at = NULL;
                Py_ssize_t len = 0;
                for (Py_ssize_t w = 0; w < nb; w++) {
                    part_bytes(v, rows[w], i, &at, &len); /* checked above */
                    c[w] = copy_fold(c[w], at, (uint8_t *)views[w].buf + at_layer, (size_t)len, stream);
                }
                at_layer += len;
            }
            for (Py_ssize_t w = 0; w < nb; w++) c[w] = ~c[w];
        }
        if (stream) _mm_sfence();
        if (released) PyEval_RestoreThread(released);
    }
#endif
    result = PyList_New(flat ? layers : nb);
    if (!result) goto done;
    for (Py_ssize_t w = 0; w < (flat ? 1 : nb); w++) {
        PyObject *list = flat ? result : PyList_New(layers);
        if (!list) {
            Py_CLEAR(result);
            goto done;
        }
        if (!flat) PyList_SET_ITEM(result, w, list);
        for (Py_ssize_t i = 0; i < layers; i++) {
            PyObject *crc = PyLong_FromUnsignedLong(crcs[i * nb + w]);
            if (!crc) {
                Py_CLEAR(result);
                goto done;
            }
            PyList_SET_ITEM(list, i, crc);
        }
    }
done:
    if (views) release_all(views, held);
    PyMem_Free(views);
    if (seqs)
        for (Py_ssize_t i = 0; i < layers; i++) Py_XDECREF(seqs[i]);
    PyMem_Free(seqs);
    PyMem_Free(offset);
    PyMem_Free(count);
    PyMem_Free(span);
    PyMem_Free(crcs);
    Py_DECREF(offs);
    Py_DECREF(pays);
    return result;
}

static int check_available(void) {
#if KVT_X86
    if (available) return 0;
#endif
    PyErr_SetString(PyExc_RuntimeError, "kvtier._fastcopy: this CPU lacks AVX2 or VPCLMULQDQ (see available)");
    return -1;
}

static PyObject *copy_layers(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4) {
        PyErr_SetString(PyExc_TypeError, "copy_layers(dst, offsets, payloads, row=-1)");
        return NULL;
    }
    Py_ssize_t row = -1;
    if (nargs == 4) {
        row = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
        if (row == -1 && PyErr_Occurred()) return NULL;
        if (row < 0) row = -1;
    }
    if (check_available() < 0) return NULL;
    return copy_impl(&args[0], 1, args[1], args[2], &row, 1);
}

PyDoc_STRVAR(copy_blocks_doc,
             "copy_blocks(dsts, offsets, payloads, rows) -> list[list[int]]\n\n"
             "``copy_layers(dsts[w], offsets, payloads, rows[w])`` for every w, in one call: each "
             "part is a ``[blocks, bytes]`` array and block w is its row ``rows[w]`` (>= 0). Returns "
             "each block's layer crcs. The parts' rows for consecutive blocks are read as one "
             "stream (a put of many blocks of one prefix reads each tensor once, in order), which "
             "a copy per block cannot do. Everything is checked before a byte is written.");

static PyObject *copy_blocks(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "copy_blocks(dsts, offsets, payloads, rows)");
        return NULL;
    }
    if (check_available() < 0) return NULL;
    PyObject *dsts = PySequence_Fast(args[0], "dsts must be a sequence of writable buffers");
    if (!dsts) return NULL;
    PyObject *rowseq = PySequence_Fast(args[3], "rows must be a sequence of ints");
    PyObject *result = NULL;
    Py_ssize_t *rows = NULL, nb = PySequence_Fast_GET_SIZE(dsts);
    if (!rowseq) goto done;
    if (PySequence_Fast_GET_SIZE(rowseq) != nb) {
        PyErr_Format(PyExc_ValueError, "%zd rows for %zd destinations", PySequence_Fast_GET_SIZE(rowseq), nb);
        goto done;
    }
    rows = PyMem_Calloc((size_t)nb + 1, sizeof(Py_ssize_t));
    if (!rows) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t w = 0; w < nb; w++)
        if (get_index(PySequence_Fast_GET_ITEM(rowseq, w), &rows[w], "row") < 0) goto done;
    result = copy_impl(PySequence_Fast_ITEMS(dsts), nb, args[1], args[2], rows, 0);
done:
    PyMem_Free(rows);
    Py_XDECREF(rowseq);
    Py_DECREF(dsts);
    return result;
}

/* ---- copy_runs ------------------------------------------------------------------------ */

PyDoc_STRVAR(copy_runs_doc,
             "copy_runs(dsts, src, plan) -> None\n\n"
             "Copy runs of the buffer ``src`` into the writable buffers ``dsts``: ``plan`` is int64 "
             "rows of (destination index, destination offset, source offset, length), e.g. a numpy "
             "array of shape (runs, 4). Every row is checked (in bounds, not overlapping its "
             "source) before a byte is written. The GIL is released for 256 KiB or more in all, "
             "and stores stream past the cache from STREAM_BYTES on. Works on any CPU.");

static PyObject *copy_runs(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy_runs(dsts, src, plan)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "dsts must be a sequence of writable buffers");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), held = 0, total = 0;
    PyObject *result = NULL;
    Py_buffer src, plan;
    int have_src = 0, have_plan = 0;
    Py_buffer *views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    if (!views) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (; held < n; held++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, held), &views[held], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto done;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_C_CONTIGUOUS) < 0) goto done;
    have_src = 1;
    if (PyObject_GetBuffer(args[2], &plan, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    have_plan = 1;
    const char *fmt = plan.format ? plan.format + (strchr("<=@", plan.format[0]) && plan.format[0]) : "B";
    if (plan.itemsize != 8 || !strchr("ql", fmt[0]) || !fmt[0] || fmt[1] || plan.len % 32) {
        PyErr_Format(PyExc_ValueError, "plan must be int64 rows of 4, got format %s, %zd bytes", fmt, plan.len);
        goto done;
    }
    const int64_t *row = plan.buf;
    Py_ssize_t runs = plan.len / 32;
    for (Py_ssize_t r = 0; r < runs; r++, row += 4) {
        int64_t d = row[0], doff = row[1], soff = row[2], len = row[3];
        if (d < 0 || d >= n || doff < 0 || soff < 0 || len < 0 || doff > views[d].len ||
            len > views[d].len - doff || soff > src.len || len > src.len - soff) {
            PyErr_Format(PyExc_ValueError,
                         "run %zd (destination %lld at %lld, source at %lld, %lld bytes) is out of bounds",
                         r, (long long)d, (long long)doff, (long long)soff, (long long)len);
            goto done;
        }
        const uint8_t *to = (const uint8_t *)views[d].buf + doff, *from = (const uint8_t *)src.buf + soff;
        if (len && to < from + len && from < to + len) {
            PyErr_Format(PyExc_ValueError, "run %zd overlaps its source", r);
            goto done;
        }
        total += (Py_ssize_t)len;
    }
    {
        int stream = total >= STREAM_BYTES;
        (void)stream; /* memcpy alone where there are no streaming stores */
        PyThreadState *released = total >= GIL_FREE_BYTES ? PyEval_SaveThread() : NULL;
        row = plan.buf;
        for (Py_ssize_t r = 0; r < runs; r++, row += 4) {
            uint8_t *to = (uint8_t *)views[row[0]].buf + row[1];
            const uint8_t *from = (const uint8_t *)src.buf + row[2];
#if KVT_X86
            if (stream) {
                copy_stream(to, from, (size_t)row[3]);
                continue;
            }
#endif
            memcpy(to, from, (size_t)row[3]);
        }
#if KVT_X86
        if (stream) _mm_sfence();
#endif
        if (released) PyEval_RestoreThread(released);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    release_all(views, held);
    PyMem_Free(views);
    if (have_src) PyBuffer_Release(&src);
    if (have_plan) PyBuffer_Release(&plan);
    Py_DECREF(seq);
    return result;
}

/* ---- crc_parts ------------------------------------------------------------------------ */

PyDoc_STRVAR(crc_parts_doc,
             "crc_parts(parts, value=0) -> int\n\n"
             "The crc32c of the buffers ``parts`` laid end to end, continuing from ``value`` "
             "(``crc32c.crc32c(b''.join(parts), value)``), in one call: the GIL released for 256 KiB "
             "or more in all. Why: a reload checks a 2 MiB block read into the 64 tensors of a "
             "prefix in 65 pieces, and a Python call per piece cost more than its checksum.");

static PyObject *crc_parts(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc_parts(parts, value=0)");
        return NULL;
    }
    if (check_available() < 0) return NULL;
    uint32_t value = 0;
    if (nargs == 2) {
        unsigned long long v = PyLong_AsUnsignedLongLong(args[1]);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
        if (v > 0xffffffffULL) {
            PyErr_Format(PyExc_ValueError, "value must be a crc32c (< 2**32), got %llu", v);
            return NULL;
        }
        value = (uint32_t)v;
    }
    PyObject *seq = PySequence_Fast(args[0], "parts must be a sequence of buffers");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), held = 0, total = 0;
    PyObject *result = NULL;
    Py_buffer *views = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    if (!views) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < n; held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, held), &views[held], PyBUF_C_CONTIGUOUS) < 0) goto done;
        total += views[held].len;
    }
#if KVT_X86
    {
        PyThreadState *released = total >= GIL_FREE_BYTES ? PyEval_SaveThread() : NULL;
        uint32_t c = ~value;
        for (Py_ssize_t i = 0; i < n; i++) c = crc_only(c, views[i].buf, (size_t)views[i].len);
        if (released) PyEval_RestoreThread(released);
        result = PyLong_FromUnsignedLong(~c);
    }
#endif
done:
    if (views) release_all(views, held);
    PyMem_Free(views);
    Py_DECREF(seq);
    return result;
}

/* ---- aligned ---------------------------------------------------------------------------- */

PyDoc_STRVAR(aligned_doc,
             "aligned(parts, align) -> bool\n\n"
             "Whether every buffer in ``parts`` starts on an ``align`` boundary and is a whole number "
             "of ``align`` bytes long (what an O_DIRECT read into them needs). Why: a block read "
             "straight into a prefix's tensors is 65 pieces, and asking each one's address from "
             "Python took about 1 us a piece.");

static PyObject *aligned(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "aligned(parts, align)");
        return NULL;
    }
    Py_ssize_t align;
    if (get_index(args[1], &align, "align") < 0) return NULL;
    if (align == 0) {
        PyErr_SetString(PyExc_ValueError, "align must be > 0");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "parts must be a sequence of buffers");
    if (!seq) return NULL;
    int ok = 1;
    for (Py_ssize_t i = 0, n = PySequence_Fast_GET_SIZE(seq); i < n && ok; i++) {
        Py_buffer v;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &v, PyBUF_C_CONTIGUOUS) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        ok = (uintptr_t)v.buf % (uintptr_t)align == 0 && v.len % align == 0;
        PyBuffer_Release(&v);
    }
    Py_DECREF(seq);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"aligned", (PyCFunction)(void (*)(void))aligned, METH_FASTCALL, aligned_doc},
    {"crc_parts", (PyCFunction)(void (*)(void))crc_parts, METH_FASTCALL, crc_parts_doc},
    {"copy_layers", (PyCFunction)(void (*)(void))copy_layers, METH_FASTCALL, copy_layers_doc},
    {"copy_blocks", (PyCFunction)(void (*)(void))copy_blocks, METH_FASTCALL, copy_blocks_doc},
    {"copy_runs", (PyCFunction)(void (*)(void))copy_runs, METH_FASTCALL, copy_runs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvtier._fastcopy",
                                    "A block's copies: into its slot with its crc32c in one pass, and out into tensors; "
                                    "the crc32c of a block read in pieces.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastcopy(void) {
#if KVT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("vpclmulqdq")) {
        fold_hi = xpow_reflected(64 + 2048 - 1);
        fold_lo = xpow_reflected(2048 - 1);
        available = 1;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "available", available) < 0 ||
              PyModule_AddIntConstant(m, "gil_free_bytes", GIL_FREE_BYTES) < 0 ||
              PyModule_AddIntConstant(m, "stream_bytes", STREAM_BYTES) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
