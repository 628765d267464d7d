/* The two scans DATA makes over every byte of a message, in one compiled pass each.
 *
 * mailplat.linescan holds the same two functions in Python and documents them; this module
 * replaces them when it could be built. In Python the line checks cost three bytes.count passes
 * plus a search per chunk (about 3 ms per MB on the reactor thread, the bound of large-message
 * throughput); here 16 bytes are compared at once with SSE2 where the compiler offers it.
 * Both versions give the same answers for every input: tests/test_linescan.py compares them.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define LINESCAN_SSE2 1
#else
#define LINESCAN_SSE2 0
#endif

#define MAX_LINE 1000 /* RFC 5321 4.5.3.1.6: a text line, CRLF included */

/* The verdict so far while walking one chunk. line_start is where the current line began,
 * negative when it began in an earlier chunk. */
typedef struct {
    int bare;
    int overlong;
    Py_ssize_t line_start;
} Scan;

/* An LF at position i: was it preceded by CR, and was its line too long? */
static inline void
saw_lf(Scan *scan, Py_ssize_t i, int cr_before)
{
    if (!cr_before)
        scan->bare = 1;
    if (i - scan->line_start >= MAX_LINE)
        scan->overlong = 1;
    scan->line_start = i + 1;
}

/* Bytes [from, n) one at a time: the tail after the 16-byte blocks, or everything without SSE2.
 * *pending_cr says whether the byte before `from` was a CR still waiting for its LF. */
static void
scan_bytes(Scan *scan, const unsigned char *p, Py_ssize_t from, Py_ssize_t n, int *pending_cr)
{
    for (Py_ssize_t i = from; i < n; i++) {
        unsigned char c = p[i];
        if (c == '\n') {
            saw_lf(scan, i, *pending_cr);
            *pending_cr = 0;
        } else {
            if (*pending_cr)
                scan->bare = 1;
            *pending_cr = (c == '\r');
        }
    }
}

#if LINESCAN_SSE2
static inline unsigned
highest_bit(unsigned mask)
{
    return 31u - (unsigned)__builtin_clz(mask);
}

/* Whole 16-byte blocks from the start of p; returns where the blocks ended. */
static Py_ssize_t
scan_blocks(Scan *scan, const unsigned char *p, Py_ssize_t n, int *pending_cr)
{
    const __m128i cr_byte = _mm_set1_epi8('\r'), lf_byte = _mm_set1_epi8('\n');
    Py_ssize_t i = 0;
    unsigned carry = (unsigned)*pending_cr; /* the previous block ended with CR */
    for (; i + 16 <= n; i += 16) {
        __m128i block = _mm_loadu_si128((const __m128i *)(p + i));
        unsigned cr = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(block, cr_byte));
        unsigned lf = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(block, lf_byte));
        if ((cr | lf | carry) == 0)
            continue;
        unsigned after_cr = (cr << 1) | carry; /* bit k: byte k-1 was CR */
        /* An LF not after CR; a CR not before LF (the block's last CR is judged next block). */
        if ((lf & ~after_cr) || (cr & ~(lf >> 1) & 0x7fffu))
            scan->bare = 1;
        /* carry's CR sits before this block: it needed an LF at bit 0. */
        if (carry && !(lf & 1u))
            scan->bare = 1;
        if (lf) {
            Py_ssize_t first = i + __builtin_ctz(lf);
            if (first - scan->line_start >= MAX_LINE)
                scan->overlong = 1;
            scan->line_start = i + highest_bit(lf) + 1;
        }
        carry = (cr >> 15) & 1u;
    }
    *pending_cr = (int)carry;
    return i;
}
#endif

static PyObject *
linescan_check(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t line_length;
    int pending_cr;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*np:check", &data, &line_length, &pending_cr))
        return NULL;
    const unsigned char *p = data.buf;
    Py_ssize_t n = data.len;
    Scan scan = {0, 0, -line_length};
    Py_ssize_t done = 0;
    Py_BEGIN_ALLOW_THREADS
#if LINESCAN_SSE2
    done = scan_blocks(&scan, p, n, &pending_cr);
#endif
    scan_bytes(&scan, p, done, n, &pending_cr);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    /* The chunk's last line so far, CR included: already too long, whatever comes next. */
    if (n - scan.line_start >= MAX_LINE)
        scan.overlong = 1;
    return Py_BuildValue("(OOnO)", scan.bare ? Py_True : Py_False,
                         scan.overlong ? Py_True : Py_False, n - scan.line_start,
                         pending_cr ? Py_True : Py_False);
}

/* Index of the first CR LF "." in p[from, n), or -1. */
static Py_ssize_t
find_line_dot(const unsigned char *p, Py_ssize_t from, Py_ssize_t n)
{
    Py_ssize_t i = from;
#if LINESCAN_SSE2
    const __m128i cr_byte = _mm_set1_epi8('\r'), lf_byte = _mm_set1_epi8('\n'),
                  dot_byte = _mm_set1_epi8('.');
    for (; i + 18 <= n; i += 16) {
        __m128i at0 = _mm_loadu_si128((const __m128i *)(p + i));
        unsigned cr = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(at0, cr_byte));
        if (!cr)
            continue;
        __m128i at1 = _mm_loadu_si128((const __m128i *)(p + i + 1));
        __m128i at2 = _mm_loadu_si128((const __m128i *)(p + i + 2));
        unsigned hit = cr & (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(at1, lf_byte))
                       & (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(at2, dot_byte));
        if (hit)
            return i + __builtin_ctz(hit);
    }
#endif
    for (; i + 3 <= n; i++) {
        const unsigned char *cr = memchr(p + i, '\r', (size_t)(n - 2 - i));
        if (cr == NULL)
            return -1;
        i = cr - p;
        if (p[i + 1] == '\n' && p[i + 2] == '.')
            return i;
    }
    return -1;
}

static PyObject *
linescan_find_line_dot(PyObject *module, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t from = 0;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*|n:find_line_dot", &data, &from))
        return NULL;
    Py_ssize_t found = -1;
    if (from < 0)
        from = 0;
    if (from < data.len)
        found = find_line_dot(data.buf, from, data.len);
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(found);
}

static PyMethodDef linescan_methods[] = {
    {"check", linescan_check, METH_VARARGS,
     "check(data, line_length, pending_cr) -> (bare, overlong, line_length, pending_cr)"},
    {"find_line_dot", linescan_find_line_dot, METH_VARARGS,
     "find_line_dot(data, start=0) -> index of the first CR LF '.', or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef linescan_module = {
    PyModuleDef_HEAD_INIT, "mailplat._linescan",
    "Compiled line checks for message data (see mailplat.linescan).", -1, linescan_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__linescan(void)
{
    return PyModule_Create(&linescan_module);
}
