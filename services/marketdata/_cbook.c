/* The order book's hot path in C: exact decimal parsing, a sorted book per side, top-N metrics.
 *
 * Same contract as the pure-Python reference `services.marketdata.book.PyOrderBook` (which the
 * property tests hold it to, level for level and bit for bit): prices and quantities are parsed
 * from Binance's decimal strings into integer units of 1e-8 without ever going through a binary
 * float; a zero quantity removes a level (removing an absent level is normal); anything malformed
 * raises ValueError naming the symbol and the level.
 *
 * Each side is a sorted sequence of (key, qty) in small blocks (a one-level B+tree, as in
 * sortedcontainers): a change costs a binary search over the blocks, one inside the block and a
 * memmove of at most BLOCK entries, wherever in the book it lands. Keys are ordered best first:
 * an ask's key is its price, a bid's is -price. Top-N is a walk from the first block.
 *
 * No I/O, no clock, no global state but the two Python classes handed over by book.py at import
 * (BookMetrics, EmptyBookError).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64                        /* entries per block; split when full */
#define UNITS 100000000LL               /* units per 1.0 */
#define MAX_UNITS ((int64_t)1 << 62)    /* prices and quantities must stay below (4.6e10) */

typedef struct {
    int n;
    int64_t k[BLOCK];
    int64_t q[BLOCK];
} Block;

typedef struct {
    Block **b;       /* blocks in key order, none empty */
    int64_t *last;   /* last[i] = the last (worst) key of block i: searched without touching blocks */
    Py_ssize_t nb;   /* blocks in use */
    Py_ssize_t cap;  /* room in b */
    Py_ssize_t count;
} Side;

typedef struct {
    PyObject_HEAD
    PyObject *symbol;
    long long update_id;
    Side bids;  /* key = -price */
    Side asks;  /* key = price */
} BookObject;

static PyObject *MetricsType = NULL;    /* book.BookMetrics (a NamedTuple) */
static PyObject *EmptyBookError = NULL; /* book.EmptyBookError */

/* ---- one side ------------------------------------------------------------------------------- */

static void side_clear(Side *s) {
    for (Py_ssize_t i = 0; i < s->nb; i++)
        PyMem_Free(s->b[i]);
    s->nb = 0;
    s->count = 0;
}

static void side_free(Side *s) {
    side_clear(s);
    PyMem_Free(s->b);
    PyMem_Free(s->last);
    s->b = NULL;
    s->last = NULL;
    s->cap = 0;
}

/* Index of the block that holds key or should receive it: the first whose last key >= key,
 * else the last block. -1 when there are no blocks. */
static inline Py_ssize_t side_block(const Side *s, int64_t key) {
    Py_ssize_t lo = 0, hi = s->nb - 1;
    if (hi < 0)
        return -1;
    const int64_t *last = s->last;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (last[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static inline int block_find(const Block *blk, int64_t key) {
    int lo = 0, hi = blk->n;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (blk->k[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int side_insert_block(Side *s, Py_ssize_t at, Block *blk) {
    if (s->nb == s->cap) {
        Py_ssize_t cap = s->cap ? s->cap * 2 : 16;
        Block **nb = PyMem_Realloc(s->b, (size_t)cap * sizeof(Block *));
        if (nb == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        s->b = nb;
        int64_t *nl = PyMem_Realloc(s->last, (size_t)cap * sizeof(int64_t));
        if (nl == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        s->last = nl;
        s->cap = cap;
    }
    memmove(s->b + at + 1, s->b + at, (size_t)(s->nb - at) * sizeof(Block *));
    memmove(s->last + at + 1, s->last + at, (size_t)(s->nb - at) * sizeof(int64_t));
    s->b[at] = blk;
    s->last[at] = blk->n ? blk->k[blk->n - 1] : 0;  /* set again by the caller once filled */
    s->nb++;
    return 0;
}

/* Set key's quantity (qty > 0), inserting the level if absent. 0 or -1 (MemoryError). */
static int side_set(Side *s, int64_t key, int64_t qty) {
    Py_ssize_t bi = side_block(s, key);
    Block *blk;
    if (bi < 0) {
        blk = PyMem_Malloc(sizeof(Block));
        if (blk == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        blk->n = 0;
        if (side_insert_block(s, 0, blk) < 0) {
            PyMem_Free(blk);
            return -1;
        }
        bi = 0;
    }
    blk = s->b[bi];
    int i = block_find(blk, key);
    if (i < blk->n && blk->k[i] == key) {
        blk->q[i] = qty;
        return 0;
    }
    if (blk->n == BLOCK) {  /* split in halves, then insert into the right one */
        Block *right = PyMem_Malloc(sizeof(Block));
        if (right == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        int half = BLOCK / 2;
        right->n = BLOCK - half;
        memcpy(right->k, blk->k + half, (size_t)right->n * sizeof(int64_t));
        memcpy(right->q, blk->q + half, (size_t)right->n * sizeof(int64_t));
        if (side_insert_block(s, bi + 1, right) < 0) {
            PyMem_Free(right);
            return -1;
        }
        blk->n = half;
        s->last[bi] = blk->k[half - 1];
        if (i > half) {
            blk = right;
            i -= half;
            bi++;
        }
    }
    memmove(blk->k + i + 1, blk->k + i, (size_t)(blk->n - i) * sizeof(int64_t));
    memmove(blk->q + i + 1, blk->q + i, (size_t)(blk->n - i) * sizeof(int64_t));
    blk->k[i] = key;
    blk->q[i] = qty;
    blk->n++;
    if (i == blk->n - 1)
        s->last[bi] = key;
    s->count++;
    return 0;
}

/* Remove key's level if present (absent is normal). */
static void side_remove(Side *s, int64_t key) {
    Py_ssize_t bi = side_block(s, key);
    if (bi < 0)
        return;
    Block *blk = s->b[bi];
    int i = block_find(blk, key);
    if (i >= blk->n || blk->k[i] != key)
        return;
    blk->n--;
    memmove(blk->k + i, blk->k + i + 1, (size_t)(blk->n - i) * sizeof(int64_t));
    memmove(blk->q + i, blk->q + i + 1, (size_t)(blk->n - i) * sizeof(int64_t));
    s->count--;
    if (blk->n == 0) {
        PyMem_Free(blk);
        s->nb--;
        memmove(s->b + bi, s->b + bi + 1, (size_t)(s->nb - bi) * sizeof(Block *));
        memmove(s->last + bi, s->last + bi + 1, (size_t)(s->nb - bi) * sizeof(int64_t));
    } else if (i == blk->n) {
        s->last[bi] = blk->k[i - 1];
    }
}

/* ---- parsing -------------------------------------------------------------------------------- */

static const int64_t SCALE[9] = {100000000, 10000000, 1000000, 100000, 10000, 1000, 100, 10, 1};
#define MAX_WHOLE (MAX_UNITS / UNITS)  /* whole parts above this cannot be below MAX_UNITS */

/* The decimal at [p, end): an optional '-', ASCII digits, optionally '.' and 1..8 ASCII digits,
 * below MAX_UNITS in magnitude. Sets *out (in units of 1e-8) and returns where the decimal ends
 * (the caller checks what follows: the string's end, or its closing quote), or NULL if there is
 * no such decimal there. No exponent, '+', space or '_': exactly parse_units' grammar. */
static inline const char *decimal(const char *p, const char *end, int64_t *out) {
    int neg = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    const char *start = p;
    uint64_t whole = 0;
    while (p < end && (unsigned)(*p - '0') < 10) {
        if (whole <= MAX_WHOLE)  /* past it, stop adding (no wrap); the value is refused below */
            whole = whole * 10 + (uint64_t)(*p - '0');
        p++;
    }
    if (p == start || whole > MAX_WHOLE)
        return NULL;
    uint64_t frac = 0;
    if (p < end && *p == '.') {
        const char *fs = ++p;
        while (p < end && (unsigned)(*p - '0') < 10 && p - fs < 8)  /* a 9th digit is left over */
            frac = frac * 10 + (uint64_t)(*p++ - '0');
        if (p == fs)
            return NULL;
        frac *= (uint64_t)SCALE[p - fs];
    }
    uint64_t v = whole * (uint64_t)UNITS + frac;
    if (v >= (uint64_t)MAX_UNITS)
        return NULL;
    *out = neg ? -(int64_t)v : (int64_t)v;
    return p;
}

/* Parse a decimal string as parse_units does (see decimal); values whose magnitude reaches
 * MAX_UNITS are refused too (nothing real is that big, and they would not fit). Returns 0 and
 * sets *out, or -1 without setting an exception (the caller names the level). */
static inline int parse_units(PyObject *o, int64_t *out) {
    if (!PyUnicode_CheckExact(o) || !PyUnicode_IS_COMPACT_ASCII(o))
        return -1;
    const char *p = (const char *)PyUnicode_DATA(o);
    const char *end = p + PyUnicode_GET_LENGTH(o);
    return decimal(p, end, out) == end ? 0 : -1;
}

/* ---- parsed depth levels ------------------------------------------------------------------- */

/* One side's changes of a depth event, parsed and checked once by parse_depth_frame: n pairs of
 * (price units > 0, qty units >= 0), both < MAX_UNITS. apply_diff takes it where it takes a list. */
typedef struct {
    PyObject_VAR_HEAD
    int64_t pq[1];  /* 2 * ob_size values: price, qty, price, qty, ... */
} LevelsObject;

static PyTypeObject LevelsType;

static Py_ssize_t Levels_len(LevelsObject *self) {
    return Py_SIZE(self);
}

static PyObject *Levels_units(LevelsObject *self, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t n = Py_SIZE(self);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(LL)", (long long)self->pq[2 * i], (long long)self->pq[2 * i + 1]);
        if (t == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static PyObject *Levels_repr(LevelsObject *self) {
    return PyUnicode_FromFormat("Levels(%zd changes)", Py_SIZE(self));
}

static PySequenceMethods Levels_as_sequence = {
    .sq_length = (lenfunc)Levels_len,
};

static PyMethodDef Levels_methods[] = {
    {"units", (PyCFunction)Levels_units, METH_NOARGS, "[(price units, qty units), ...] in the event's order."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LevelsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "services.marketdata._cbook.Levels",
    .tp_doc = PyDoc_STR("One side's [price, qty] changes of a depth event, parsed to integer units."),
    .tp_basicsize = offsetof(LevelsObject, pq),
    .tp_itemsize = 2 * sizeof(int64_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_repr = (reprfunc)Levels_repr,
    .tp_as_sequence = &Levels_as_sequence,
    .tp_methods = Levels_methods,
};

/* ---- the depth frame scanner ----------------------------------------------------------------- */

/* parse_depth_frame(frame) reads a combined-stream diff-depth message,
 *   {"stream":"<symbol>@depth...","data":{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":2,"u":3,
 *    "b":[["price","qty"],...],"a":[...]}}
 * into the dict orjson would give, except that "b" and "a" are Levels. It returns None for
 * anything outside that narrow, strict shape (another stream, escapes or non-ASCII in a string, a
 * float, a nested object, a duplicate key, a level that is not two decimal strings parse_units
 * accepts, malformed JSON...): the caller then parses the frame with orjson, which gives the
 * general result or the error. So it never accepts what orjson would refuse, and never produces
 * a different event. */

typedef struct {
    const char *p;
    const char *end;
} Scan;

static inline void skip_ws(Scan *sc) {
    while (sc->p < sc->end && (*sc->p == ' ' || *sc->p == '\t' || *sc->p == '\n' || *sc->p == '\r'))
        sc->p++;
}

static inline int expect(Scan *sc, char c) {
    if (sc->p < sc->end && *sc->p == c) {  /* Binance sends no whitespace */
        sc->p++;
        return 1;
    }
    skip_ws(sc);
    if (sc->p < sc->end && *sc->p == c) {
        sc->p++;
        return 1;
    }
    return 0;
}

/* A JSON string of printable ASCII without escapes: sets [*s, *s + *n). 0 if anything else. */
static inline int scan_string(Scan *sc, const char **s, Py_ssize_t *n) {
    skip_ws(sc);
    if (sc->p >= sc->end || *sc->p != '"')
        return 0;
    const char *start = ++sc->p;
    while (sc->p < sc->end) {
        unsigned char c = (unsigned char)*sc->p;
        if (c == '"') {
            *s = start;
            *n = sc->p - start;
            sc->p++;
            return 1;
        }
        if (c < 0x20 || c >= 0x7f || c == '\\')
            return 0;
        sc->p++;
    }
    return 0;
}

/* A JSON integer of at most 18 digits, not followed by a fraction or exponent. */
static inline int scan_int(Scan *sc, long long *out) {
    skip_ws(sc);
    int neg = 0;
    if (sc->p < sc->end && *sc->p == '-') {
        neg = 1;
        sc->p++;
    }
    const char *start = sc->p;
    long long v = 0;
    while (sc->p < sc->end && (unsigned)(*sc->p - '0') < 10) {
        v = v * 10 + (*sc->p - '0');
        sc->p++;
        if (sc->p - start > 18)
            return 0;
    }
    Py_ssize_t len = sc->p - start;
    if (len == 0 || (len > 1 && *start == '0'))
        return 0;
    if (sc->p < sc->end && (*sc->p == '.' || *sc->p == 'e' || *sc->p == 'E'))
        return 0;
    *out = neg ? -v : v;
    return 1;
}

/* A JSON string holding a decimal that parse_units accepts, parsed in the same pass: the grammar
 * has only '-', digits and '.', so no escape or other character can be part of it. */
static inline int scan_units(Scan *sc, int64_t *out) {
    skip_ws(sc);
    if (sc->p >= sc->end || *sc->p != '"')
        return 0;
    const char *q = decimal(sc->p + 1, sc->end, out);
    if (q == NULL || q >= sc->end || *q != '"')
        return 0;
    sc->p = q + 1;
    return 1;
}

/* [["p","q"],...] into a new Levels, every price > 0 and quantity >= 0; NULL (no exception) if
 * not exactly that, NULL with MemoryError set if out of memory. */
static PyObject *scan_levels(Scan *sc) {
    if (!expect(sc, '['))
        return NULL;
    /* Pairs go to a scratch buffer (kept between calls: the GIL serialises them), then into a
     * Levels of the exact size. */
    static int64_t *scratch = NULL;
    static Py_ssize_t room = 0;  /* pairs */
    Py_ssize_t n = 0;
    if (!expect(sc, ']')) {
        for (;;) {
            int64_t price, qty;
            if (!expect(sc, '[') || !scan_units(sc, &price) || !expect(sc, ',') || !scan_units(sc, &qty) ||
                !expect(sc, ']') || price <= 0 || qty < 0)
                return NULL;
            if (n == room) {
                Py_ssize_t grown = room ? room * 2 : 1024;
                int64_t *more = PyMem_Realloc(scratch, (size_t)grown * 2 * sizeof(int64_t));
                if (more == NULL)
                    return PyErr_NoMemory();
                scratch = more;
                room = grown;
            }
            scratch[2 * n] = price;
            scratch[2 * n + 1] = qty;
            n++;
            if (expect(sc, ']'))
                break;
            if (!expect(sc, ','))
                return NULL;
        }
    }
    LevelsObject *lv = PyObject_NewVar(LevelsObject, &LevelsType, n);
    if (lv == NULL)
        return NULL;
    if (n)
        memcpy(lv->pq, scratch, (size_t)n * 2 * sizeof(int64_t));
    if (room > 65536) {  /* an outsized frame: do not keep its buffer */
        PyMem_Free(scratch);
        scratch = NULL;
        room = 0;
    }
    return (PyObject *)lv;
}

static int has_depth(const char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i + 6 <= n; i++)
        if (memcmp(s + i, "@depth", 6) == 0)
            return 1;
    return 0;
}

/* The "data" object; NULL (no exception) if outside the shape. */
static PyObject *scan_data(Scan *sc) {
    if (!expect(sc, '{'))
        return NULL;
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    if (expect(sc, '}'))
        return d;
    for (;;) {
        const char *ks;
        Py_ssize_t kn;
        if (!scan_string(sc, &ks, &kn) || !expect(sc, ':'))
            goto fail;
        PyObject *key = PyUnicode_FromStringAndSize(ks, kn);
        if (key == NULL)
            goto fail;
        skip_ws(sc);
        PyObject *val = NULL;
        int levels = kn == 1 && (*ks == 'b' || *ks == 'a');  /* must be level arrays, nothing else */
        if (levels) {
            val = scan_levels(sc);
        } else if (sc->p < sc->end && *sc->p == '"') {
            const char *vs;
            Py_ssize_t vn;
            if (scan_string(sc, &vs, &vn))
                val = PyUnicode_FromStringAndSize(vs, vn);
        } else if (sc->p < sc->end && *sc->p != '[') {
            long long v;
            if (scan_int(sc, &v))
                val = PyLong_FromLongLong(v);
        }
        /* A duplicate key would make "last one wins" matter: leave such frames to orjson. */
        int dup = val != NULL ? PyDict_Contains(d, key) : 0;
        if (val == NULL || dup != 0 || PyDict_SetItem(d, key, val) < 0) {
            Py_DECREF(key);
            Py_XDECREF(val);
            goto fail;
        }
        Py_DECREF(key);
        Py_DECREF(val);
        if (expect(sc, '}'))
            return d;
        if (!expect(sc, ','))
            goto fail;
    }
fail:
    Py_DECREF(d);
    return NULL;
}

static PyObject *mod_parse_depth_frame(PyObject *Py_UNUSED(m), PyObject *frame) {
    Scan sc;
    if (PyBytes_Check(frame)) {
        sc.p = PyBytes_AS_STRING(frame);
        sc.end = sc.p + PyBytes_GET_SIZE(frame);
    } else if (PyUnicode_Check(frame) && PyUnicode_IS_COMPACT_ASCII(frame)) {
        sc.p = (const char *)PyUnicode_DATA(frame);
        sc.end = sc.p + PyUnicode_GET_LENGTH(frame);
    } else {
        Py_RETURN_NONE;
    }
    const char *ks, *ss;
    Py_ssize_t kn, sn;
    /* {"stream": "...@depth...", "data": {...}} in that order, nothing else. */
    if (!expect(&sc, '{') || !scan_string(&sc, &ks, &kn) || kn != 6 || memcmp(ks, "stream", 6) != 0 ||
        !expect(&sc, ':') || !scan_string(&sc, &ss, &sn) || !has_depth(ss, sn) || !expect(&sc, ',') ||
        !scan_string(&sc, &ks, &kn) || kn != 4 || memcmp(ks, "data", 4) != 0 || !expect(&sc, ':'))
        Py_RETURN_NONE;
    PyObject *data = scan_data(&sc);
    if (data == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!expect(&sc, '}')) {
        Py_DECREF(data);
        Py_RETURN_NONE;
    }
    skip_ws(&sc);
    if (sc.p != sc.end) {
        Py_DECREF(data);
        Py_RETURN_NONE;
    }
    return Py_BuildValue("{s:s#,s:N}", "stream", ss, sn, "data", data);
}

/* ---- the type ------------------------------------------------------------------------------- */

static PyObject *Book_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    BookObject *self = (BookObject *)PyType_GenericNew(type, args, kwds);
    if (self != NULL) {
        self->symbol = PyUnicode_FromString("");  /* never NULL, even before __init__ */
        if (self->symbol == NULL) {
            Py_DECREF(self);
            return NULL;
        }
    }
    return (PyObject *)self;
}

static int Book_init(BookObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"symbol", NULL};
    PyObject *symbol;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U", kwlist, &symbol))
        return -1;
    Py_INCREF(symbol);
    Py_XSETREF(self->symbol, symbol);
    side_clear(&self->bids);
    side_clear(&self->asks);
    self->update_id = 0;
    return 0;
}

static void Book_dealloc(BookObject *self) {
    side_free(&self->bids);
    side_free(&self->asks);
    Py_XDECREF(self->symbol);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void book_clear(BookObject *self) {
    side_clear(&self->bids);
    side_clear(&self->asks);
    self->update_id = 0;
}

static PyObject *Book_clear(BookObject *self, PyObject *Py_UNUSED(ignored)) {
    book_clear(self);
    Py_RETURN_NONE;
}

/* Apply one side's [price, qty] changes. 0, or -1 with ValueError (or MemoryError) set. */
static int apply_side(BookObject *self, PyObject *levels, int is_bid) {
    const char *name = is_bid ? "bid" : "ask";
    Side *side = is_bid ? &self->bids : &self->asks;
    if (Py_IS_TYPE(levels, &LevelsType)) {  /* parsed and checked by parse_depth_frame */
        const int64_t *pq = ((LevelsObject *)levels)->pq;
        Py_ssize_t n = Py_SIZE(levels);
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t key = is_bid ? -pq[2 * i] : pq[2 * i], qty = pq[2 * i + 1];
            if (qty == 0)
                side_remove(side, key);
            else if (side_set(side, key, qty) < 0)
                return -1;
        }
        return 0;
    }
    if (!PyList_Check(levels) && !PyTuple_Check(levels)) {
        PyErr_Format(PyExc_ValueError, "%U: %s levels are not a list: %.80R", self->symbol, name, levels);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(levels);
    PyObject **items = PySequence_Fast_ITEMS(levels);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *lv = items[i];
        if ((!PyList_Check(lv) && !PyTuple_Check(lv)) || PySequence_Fast_GET_SIZE(lv) != 2) {
            PyErr_Format(PyExc_ValueError, "%U: %s level is not a [price, qty] pair: %.80R",
                         self->symbol, name, lv);
            return -1;
        }
        PyObject **pq = PySequence_Fast_ITEMS(lv);
        int64_t price, qty;
        if (parse_units(pq[0], &price) < 0 || parse_units(pq[1], &qty) < 0) {
            PyErr_Format(PyExc_ValueError, "%U: bad %s level %.80R: not a decimal string with at most 8 "
                         "decimals below 2**62 units", self->symbol, name, lv);
            return -1;
        }
        if (price <= 0) {
            PyErr_Format(PyExc_ValueError, "%U: bad %s price in %.80R", self->symbol, name, lv);
            return -1;
        }
        if (qty < 0) {
            PyErr_Format(PyExc_ValueError, "%U: negative %s quantity in %.80R", self->symbol, name, lv);
            return -1;
        }
        int64_t key = is_bid ? -price : price;
        if (qty == 0)
            side_remove(side, key);
        else if (side_set(side, key, qty) < 0)
            return -1;
    }
    return 0;
}

static PyObject *Book_apply_diff(BookObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "apply_diff(bids, asks, update_id)");
        return NULL;
    }
    long long uid = PyLong_AsLongLong(args[2]);
    if (uid == -1 && PyErr_Occurred())
        return NULL;
    if (apply_side(self, args[0], 1) < 0 || apply_side(self, args[1], 0) < 0)
        return NULL;
    self->update_id = uid;
    Py_RETURN_NONE;
}

static PyObject *Book_apply_snapshot(BookObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "apply_snapshot(last_update_id, bids, asks)");
        return NULL;
    }
    long long last = PyLong_AsLongLong(args[0]);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    book_clear(self);
    if (apply_side(self, args[1], 1) < 0 || apply_side(self, args[2], 0) < 0) {
        book_clear(self);
        if (PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            PyErr_Format(PyExc_ValueError, "%U: bad snapshot %lld: %S", self->symbol, last, value);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
        return NULL;
    }
    self->update_id = last;
    Py_RETURN_NONE;
}

static PyObject *level_tuple(int64_t price, int64_t qty) {
    PyObject *t = PyTuple_New(2);
    if (t == NULL)
        return NULL;
    PyObject *p = PyLong_FromLongLong(price), *q = PyLong_FromLongLong(qty);
    if (p == NULL || q == NULL) {
        Py_XDECREF(p);
        Py_XDECREF(q);
        Py_DECREF(t);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, p);
    PyTuple_SET_ITEM(t, 1, q);
    return t;
}

static PyObject *best(const Side *s, int is_bid) {
    if (s->nb == 0)
        Py_RETURN_NONE;
    const Block *blk = s->b[0];
    return level_tuple(is_bid ? -blk->k[0] : blk->k[0], blk->q[0]);
}

static PyObject *Book_best_bid(BookObject *self, PyObject *Py_UNUSED(ignored)) {
    return best(&self->bids, 1);
}

static PyObject *Book_best_ask(BookObject *self, PyObject *Py_UNUSED(ignored)) {
    return best(&self->asks, 0);
}

/* Up to n levels of a side, best first, as a list of (price units, qty units) tuples. */
static PyObject *side_top(const Side *s, Py_ssize_t n, int is_bid) {
    if (n > s->count)
        n = s->count;
    if (n < 0)
        n = 0;
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    Py_ssize_t j = 0;
    for (Py_ssize_t bi = 0; bi < s->nb && j < n; bi++) {
        const Block *blk = s->b[bi];
        for (int i = 0; i < blk->n && j < n; i++) {
            PyObject *t = level_tuple(is_bid ? -blk->k[i] : blk->k[i], blk->q[i]);
            if (t == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            PyList_SET_ITEM(out, j++, t);
        }
    }
    return out;
}

/* The optional level count of top(n=10) and metrics(n=10): 0, or -1 with an exception set. */
static int optional_n(PyObject *const *args, Py_ssize_t nargs, const char *usage, Py_ssize_t *n) {
    *n = 10;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (nargs == 1) {
        *n = PyNumber_AsSsize_t(args[0], NULL);  /* clamps huge values */
        if (*n == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static PyObject *Book_top(BookObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t n;
    if (optional_n(args, nargs, "top(n=10)", &n) < 0)
        return NULL;
    PyObject *b = side_top(&self->bids, n, 1);
    if (b == NULL)
        return NULL;
    PyObject *a = side_top(&self->asks, n, 0);
    if (a == NULL) {
        Py_DECREF(b);
        return NULL;
    }
    return Py_BuildValue("(NN)", b, a);
}

static PyObject *Book_depth(BookObject *self, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("(nn)", self->bids.count, self->asks.count);
}

static PyObject *side_dict(const Side *s, int is_bid) {
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (Py_ssize_t bi = 0; bi < s->nb; bi++) {
        const Block *blk = s->b[bi];
        for (int i = 0; i < blk->n; i++) {
            PyObject *p = PyLong_FromLongLong(is_bid ? -blk->k[i] : blk->k[i]);
            PyObject *q = PyLong_FromLongLong(blk->q[i]);
            if (p == NULL || q == NULL || PyDict_SetItem(d, p, q) < 0) {
                Py_XDECREF(p);
                Py_XDECREF(q);
                Py_DECREF(d);
                return NULL;
            }
            Py_DECREF(p);
            Py_DECREF(q);
        }
    }
    return d;
}

static PyObject *Book_levels(BookObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *b = side_dict(&self->bids, 1);
    if (b == NULL)
        return NULL;
    PyObject *a = side_dict(&self->asks, 0);
    if (a == NULL) {
        Py_DECREF(b);
        return NULL;
    }
    return Py_BuildValue("(NN)", b, a);
}

/* The top-n float levels of a side ([[price, qty], ...]) and the exact sum of their quantities. */
static PyObject *float_levels(const Side *s, Py_ssize_t n, int is_bid, __int128 *sum) {
    if (n > s->count)
        n = s->count;
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    __int128 total = 0;  /* exact: n quantities of < 2**62 each */
    Py_ssize_t j = 0;
    for (Py_ssize_t bi = 0; bi < s->nb && j < n; bi++) {
        const Block *blk = s->b[bi];
        for (int i = 0; i < blk->n && j < n; i++) {
            int64_t price = is_bid ? -blk->k[i] : blk->k[i], qty = blk->q[i];
            total += qty;
            PyObject *lv = PyList_New(2);
            PyObject *p = PyFloat_FromDouble((double)price / 1e8);
            PyObject *q = PyFloat_FromDouble((double)qty / 1e8);
            if (lv == NULL || p == NULL || q == NULL) {
                Py_XDECREF(lv);
                Py_XDECREF(p);
                Py_XDECREF(q);
                Py_DECREF(out);
                return NULL;
            }
            PyList_SET_ITEM(lv, 0, p);
            PyList_SET_ITEM(lv, 1, q);
            PyList_SET_ITEM(out, j++, lv);
        }
    }
    *sum = total;
    return out;
}

static PyObject *Book_metrics(BookObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t n;
    if (optional_n(args, nargs, "metrics(n=10)", &n) < 0)
        return NULL;
    if (n < 1)
        return PyErr_Format(PyExc_ValueError, "metrics needs n >= 1, got %zd", n);
    if (self->bids.nb == 0 || self->asks.nb == 0)
        return PyErr_Format(EmptyBookError, "%U: empty side at update %lld (%zd bids, %zd asks)",
                            self->symbol, self->update_id, self->bids.count, self->asks.count);
    __int128 sb, sa;
    PyObject *bids = float_levels(&self->bids, n, 1, &sb);
    if (bids == NULL)
        return NULL;
    PyObject *asks = float_levels(&self->asks, n, 0, &sa);
    if (asks == NULL) {
        Py_DECREF(bids);
        return NULL;
    }
    const Block *bb = self->bids.b[0], *ab = self->asks.b[0];
    int64_t b0 = -bb->k[0], a0 = ab->k[0], bq0 = bb->q[0], aq0 = ab->q[0];
    /* The same IEEE operations, in the same order, as PyOrderBook.metrics: exact integer sums and
     * differences, each rounded once to a double (correctly, as Python's float(int) does). */
    double mid = (double)(b0 + a0) / 2e8;
    double spread = (double)(a0 - b0) / 1e8;
    double spread_bps = spread / mid * 1e4;
    double imbalance = (double)(sb - sa) / (double)(sb + sa);
    double micro = ((double)b0 * (double)aq0 + (double)a0 * (double)bq0) / ((double)(bq0 + aq0) * 1e8);
    PyObject *t = Py_BuildValue("(NNddddd)", bids, asks, mid, spread, spread_bps, imbalance, micro);
    if (t == NULL)
        return NULL;
    PyObject *pack = PyTuple_Pack(1, t);  /* tuple.__new__(BookMetrics, (values,)): no Python code */
    Py_DECREF(t);
    if (pack == NULL)
        return NULL;
    PyObject *m = PyTuple_Type.tp_new((PyTypeObject *)MetricsType, pack, NULL);
    Py_DECREF(pack);
    return m;
}

/* Verify the invariants in O(levels): keys strictly increasing within and across blocks, no
 * empty or overfull block, counts right, every price and quantity in (0, 2**62). */
static PyObject *Book_check(BookObject *self, PyObject *Py_UNUSED(ignored)) {
    for (int side_i = 0; side_i < 2; side_i++) {
        const Side *s = side_i == 0 ? &self->bids : &self->asks;
        const char *name = side_i == 0 ? "bid" : "ask";
        Py_ssize_t count = 0;
        int have_prev = 0;
        int64_t prev = 0;
        for (Py_ssize_t bi = 0; bi < s->nb; bi++) {
            const Block *blk = s->b[bi];
            if (blk->n < 1 || blk->n > BLOCK)
                return PyErr_Format(PyExc_ValueError, "%U: %s block %zd holds %d levels", self->symbol,
                                    name, bi, blk->n);
            if (s->last[bi] != blk->k[blk->n - 1])
                return PyErr_Format(PyExc_ValueError, "%U: %s block %zd: stale last key", self->symbol,
                                    name, bi);
            for (int i = 0; i < blk->n; i++) {
                int64_t price = side_i == 0 ? -blk->k[i] : blk->k[i];
                if (have_prev && blk->k[i] <= prev)
                    return PyErr_Format(PyExc_ValueError, "%U: %s levels out of order at %lld",
                                        self->symbol, name, (long long)price);
                if (price <= 0 || price >= MAX_UNITS || blk->q[i] <= 0 || blk->q[i] >= MAX_UNITS)
                    return PyErr_Format(PyExc_ValueError, "%U: bad %s level %lld: %lld", self->symbol,
                                        name, (long long)price, (long long)blk->q[i]);
                prev = blk->k[i];
                have_prev = 1;
                count++;
            }
        }
        if (count != s->count)
            return PyErr_Format(PyExc_ValueError, "%U: %s count %zd, levels %zd", self->symbol, name,
                                s->count, count);
    }
    Py_RETURN_NONE;
}

static PyObject *Book_repr(BookObject *self) {
    PyObject *bb = best(&self->bids, 1), *ba = best(&self->asks, 0);
    if (bb == NULL || ba == NULL) {
        Py_XDECREF(bb);
        Py_XDECREF(ba);
        return NULL;
    }
    PyObject *r = PyUnicode_FromFormat("OrderBook(%R, update_id=%lld, bid=%R, ask=%R, depth=(%zd, %zd))",
                                       self->symbol, self->update_id, bb, ba, self->bids.count,
                                       self->asks.count);
    Py_DECREF(bb);
    Py_DECREF(ba);
    return r;
}

static PyMethodDef Book_methods[] = {
    {"clear", (PyCFunction)Book_clear, METH_NOARGS, "Empty both sides and reset update_id to 0."},
    {"apply_snapshot", (PyCFunction)(void (*)(void))Book_apply_snapshot, METH_FASTCALL,
     "apply_snapshot(last_update_id, bids, asks): replace the book with a REST snapshot; zero\n"
     "quantities are skipped. Raises ValueError ('bad snapshot N') on a malformed level, leaving\n"
     "the book empty."},
    {"apply_diff", (PyCFunction)(void (*)(void))Book_apply_diff, METH_FASTCALL,
     "apply_diff(bids, asks, update_id): apply one diff-depth event's [price, qty] changes and set\n"
     "update_id. Raises ValueError naming the symbol on a malformed level; the book is then\n"
     "partially updated and must be discarded (BookSync does so)."},
    {"best_bid", (PyCFunction)Book_best_bid, METH_NOARGS, "(price units, qty units) of the best bid, or None."},
    {"best_ask", (PyCFunction)Book_best_ask, METH_NOARGS, "(price units, qty units) of the best ask, or None."},
    {"top", (PyCFunction)(void (*)(void))Book_top, METH_FASTCALL,
     "top(n=10) -> (bids, asks): up to n (price units, qty units) per side, best first."},
    {"depth", (PyCFunction)Book_depth, METH_NOARGS, "(number of bid levels, number of ask levels)."},
    {"levels", (PyCFunction)Book_levels, METH_NOARGS, "({bid price: qty}, {ask price: qty}) in units, copies."},
    {"metrics", (PyCFunction)(void (*)(void))Book_metrics, METH_FASTCALL,
     "metrics(n=10) -> BookMetrics of the top n. Raises EmptyBookError if a side is empty,\n"
     "ValueError if n < 1. A crossed book is reported as it is (negative spread)."},
    {"check", (PyCFunction)Book_check, METH_NOARGS,
     "Verify the internal invariants in O(levels); raises ValueError. For tests and debugging."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Book_members[] = {
    {"symbol", T_OBJECT_EX, offsetof(BookObject, symbol), READONLY, "The book's symbol."},
    {"update_id", T_LONGLONG, offsetof(BookObject, update_id), 0,
     "The update id the book is at (the snapshot's lastUpdateId, then each event's u)."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "services.marketdata._cbook.OrderBook",
    .tp_doc = PyDoc_STR("OrderBook(symbol): one symbol's limit order book in exact integer units\n"
                        "(1e-8), implemented in C; see services/marketdata/book.py."),
    .tp_basicsize = sizeof(BookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Book_new,
    .tp_init = (initproc)Book_init,
    .tp_dealloc = (destructor)Book_dealloc,
    .tp_repr = (reprfunc)Book_repr,
    .tp_methods = Book_methods,
    .tp_members = Book_members,
};

static PyObject *mod_bind(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *metrics, *empty;
    if (!PyArg_ParseTuple(args, "OO", &metrics, &empty))
        return NULL;
    if (!PyType_Check(metrics) || !PyType_IsSubtype((PyTypeObject *)metrics, &PyTuple_Type))
        return PyErr_Format(PyExc_TypeError, "metrics type must be a tuple subclass");
    if (!PyExceptionClass_Check(empty))
        return PyErr_Format(PyExc_TypeError, "EmptyBookError must be an exception class");
    Py_INCREF(metrics);
    Py_XSETREF(MetricsType, metrics);
    Py_INCREF(empty);
    Py_XSETREF(EmptyBookError, empty);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind", mod_bind, METH_VARARGS, "bind(BookMetrics, EmptyBookError): the Python classes results use."},
    {"parse_depth_frame", mod_parse_depth_frame, METH_O,
     "parse_depth_frame(frame: bytes | str) -> dict | None: a combined-stream diff-depth message as\n"
     "orjson.loads would give it, with \"b\" and \"a\" as Levels; None for any other frame, which\n"
     "the caller then parses with orjson (see _cbook.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cbook", "The order book's hot path in C (see book.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__cbook(void) {
    if (PyType_Ready(&BookType) < 0 || PyType_Ready(&LevelsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BookType);
    if (PyModule_AddObject(m, "OrderBook", (PyObject *)&BookType) < 0) {
        Py_DECREF(&BookType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LevelsType);
    if (PyModule_AddObject(m, "Levels", (PyObject *)&LevelsType) < 0) {
        Py_DECREF(&LevelsType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
