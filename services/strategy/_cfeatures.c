/* The features core's per-event path in C (issue #13): `SymbolFeatures` of features.py.
 *
 * Same contract, same arithmetic as the pure-Python reference `features.PySymbolFeatures`, which
 * tests/services/strategy/test_cfeatures.py holds it to bit for bit (every FeatureVector equal, not
 * close) and which the module docstring of features.py defines. Why C: inside the strategy process a
 * book arrives to cold caches (the other services ran in between), and there the interpreted core
 * cost 35 us a book where this costs a few; no library computes these windows incrementally per event
 * (numpy's per-call overhead is larger than the whole update).
 *
 * Exactness as in the reference: quantities are integers of 1e-8 (Binance's finest step; the order
 * book's units), window sums are 128-bit integers (no drift), and every ratio of two sums is rounded
 * once, exactly as Python's int / int: directly when both fit in 53 bits, else through Python ints.
 * Floating-point steps are the reference's, in its order; built with -ffp-contract=off (no fused
 * multiply-add), so results are the same doubles.
 *
 * No I/O, no clock: time is an argument. Memory is allocated once, at construction.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef __int128 i128;

#define UNITS 100000000.0                  /* units per 1.0 of quantity */
#define MAX_UNITS 4611686018427387904.0    /* 2**62: a quantity at or above this many units is nonsense */
#define EXACT ((i128)1 << 53)              /* integers below this are exact doubles */

typedef struct {
    int64_t ns;    /* width */
    int64_t tail;  /* sequence number of the oldest event inside */
    int64_t n;     /* events inside */
    i128 s1, s2, s3;
} Window;

typedef struct {
    PyObject_HEAD
    PyObject *params;
    int levels, nw, nh, wmax, hmax;
    long long cap, now, books, trades, dropped, skipped;
    /* book ring: time, mid, e^(1), sum_m e^(m), depth sum (bid + ask over N) */
    int64_t *bt;
    double *bmid;
    i128 *be1, *bem, *bd;
    int64_t bstart, bend;
    Window *bwin, *twin;
    int64_t *hor_ns, *anchor;
    /* trade ring: time, signed volume (+buy, -sell) */
    int64_t *tt, *tv;
    int64_t tstart, tend;
    /* previous (p) and current (c) book's top N: prices (NAN: no such level) and units */
    double *pbp, *pap, *cbp, *cap_;
    int64_t *pbq, *paq, *cbq, *caq;
    int64_t first_ns, last_book_ns, warmup_ns;
    double mid, spread_bps, micro, micro_dev, depth_imb, var, rv, spread_ewma;
    double inv_vol_tau_ns, inv_spread_tau_ns, vol_tau_s;
} SF;

static PyObject *VectorType = NULL; /* features.FeatureVector, handed over by bind() */
static PyObject *SideBuy = NULL, *SideSell = NULL, *WhyNotReady = NULL, *WhyFiltered = NULL, *WhyNone = NULL;
static PyObject *S_bids, *S_asks, *S_qty, *S_maker;

/* ---- exact ratios --------------------------------------------------------------------------- */

static PyObject *long_of(i128 v) {
    PyObject *hi = PyLong_FromLongLong((long long)(v >> 64));
    PyObject *lo = PyLong_FromUnsignedLongLong((unsigned long long)(v & (((i128)1 << 64) - 1)));
    PyObject *sh = PyLong_FromLong(64), *shifted = NULL, *out = NULL;
    if (hi && lo && sh && (shifted = PyNumber_Lshift(hi, sh)) != NULL)
        out = PyNumber_Add(shifted, lo);
    Py_XDECREF(hi);
    Py_XDECREF(lo);
    Py_XDECREF(sh);
    Py_XDECREF(shifted);
    return out;
}

/* num * k / den rounded once, as Python's int / int; den != 0. -1 with an exception on failure. */
static int ratio(i128 num, long long k, i128 den, double *out) {
    i128 prod;
    if (!__builtin_mul_overflow(num, (i128)k, &prod) && prod > -EXACT && prod < EXACT && den > -EXACT
        && den < EXACT) {
        *out = (double)(int64_t)prod / (double)(int64_t)den;  /* both exact: one IEEE division */
        return 0;
    }
    PyObject *a = long_of(num), *b = PyLong_FromLongLong(k), *d = long_of(den), *p = NULL, *q = NULL;
    if (a && b && d && (p = PyNumber_Multiply(a, b)) != NULL && (q = PyNumber_TrueDivide(p, d)) != NULL)
        *out = PyFloat_AsDouble(q);
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(d);
    Py_XDECREF(p);
    Py_XDECREF(q);
    return PyErr_Occurred() ? -1 : 0;
}

/* ---- construction --------------------------------------------------------------------------- */

static int get_ll(PyObject *params, const char *name, long long *out) {
    PyObject *v = PyObject_GetAttrString(params, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int get_d(PyObject *params, const char *name, double *out) {
    PyObject *v = PyObject_GetAttrString(params, name);
    if (v == NULL)
        return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* A tuple attribute of params as doubles; *n its length (1..16). */
static int get_tuple(PyObject *params, const char *name, double *out, int *n) {
    PyObject *v = PyObject_GetAttrString(params, name);
    if (v == NULL)
        return -1;
    PyObject *seq = PySequence_Fast(v, "FeatureParams: windows and horizons must be sequences");
    Py_DECREF(v);
    if (seq == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    if (len < 1 || len > 16) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "FeatureParams.%s: 1 to 16 values", name);
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        out[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (out[i] == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    *n = (int)len;
    Py_DECREF(seq);
    return 0;
}

/* n zeroed items of `size` bytes, every page written now: a ring that calloc left to be mapped on
 * first touch would take its page faults one by one on the per-book path (a few us each). */
static void *alloc_zero(long long n, size_t size) {
    if (n <= 0 || (size_t)n > PY_SSIZE_T_MAX / size)
        return NULL;
    void *p = PyMem_Malloc((size_t)n * size);
    if (p != NULL)
        memset(p, 0, (size_t)n * size);
    return p;
}

static void sf_free(SF *s) {
    PyMem_Free(s->bt);
    PyMem_Free(s->bmid);
    PyMem_Free(s->be1);
    PyMem_Free(s->bem);
    PyMem_Free(s->bd);
    PyMem_Free(s->bwin);
    PyMem_Free(s->twin);
    PyMem_Free(s->hor_ns);
    PyMem_Free(s->anchor);
    PyMem_Free(s->tt);
    PyMem_Free(s->tv);
    PyMem_Free(s->pbp);
    PyMem_Free(s->pap);
    PyMem_Free(s->cbp);
    PyMem_Free(s->cap_);
    PyMem_Free(s->pbq);
    PyMem_Free(s->paq);
    PyMem_Free(s->cbq);
    PyMem_Free(s->caq);
    s->bt = s->tt = s->tv = s->hor_ns = s->anchor = s->pbq = s->paq = s->cbq = s->caq = NULL;
    s->bmid = s->pbp = s->pap = s->cbp = s->cap_ = NULL;
    s->be1 = s->bem = s->bd = NULL;
    s->bwin = s->twin = NULL;
}

static int SF_init(SF *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"params", NULL};
    PyObject *params = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O:SymbolFeatures", kwlist, &params))
        return -1;
    if (params == Py_None) {  /* the defaults: FeatureParams() */
        PyObject *mod = PyImport_ImportModule("services.strategy.features");
        if (mod == NULL)
            return -1;
        PyObject *cls = PyObject_GetAttrString(mod, "FeatureParams");
        Py_DECREF(mod);
        if (cls == NULL)
            return -1;
        params = PyObject_CallNoArgs(cls);
        Py_DECREF(cls);
        if (params == NULL)
            return -1;
    } else {
        Py_INCREF(params);
    }
    Py_XSETREF(self->params, params);
    sf_free(self);
    long long levels, cap, warmup;
    double wms[16], hs[16], vol_tau, spread_tau;
    int nw, nh;
    if (get_ll(params, "levels", &levels) < 0 || get_ll(params, "capacity", &cap) < 0
        || get_ll(params, "warmup_ns", &warmup) < 0 || get_d(params, "vol_tau_s", &vol_tau) < 0
        || get_d(params, "spread_tau_s", &spread_tau) < 0 || get_tuple(params, "windows_ms", wms, &nw) < 0
        || get_tuple(params, "horizons_s", hs, &nh) < 0)
        return -1;
    if (levels < 1 || levels > 100 || cap < 2 || cap > (1 << 22) || !(vol_tau > 0) || !(spread_tau > 0)) {
        PyErr_SetString(PyExc_ValueError, "FeatureParams: levels 1..100, capacity 2..2**22, positive time constants");
        return -1;
    }
    self->levels = (int)levels;
    self->cap = cap;
    self->nw = nw;
    self->nh = nh;
    self->warmup_ns = warmup;
    self->vol_tau_s = vol_tau;
    self->inv_vol_tau_ns = 1.0 / (vol_tau * 1e9);
    self->inv_spread_tau_ns = 1.0 / (spread_tau * 1e9);
    self->bt = alloc_zero(cap, sizeof(int64_t));
    self->bmid = alloc_zero(cap, sizeof(double));
    self->be1 = alloc_zero(cap, sizeof(i128));
    self->bem = alloc_zero(cap, sizeof(i128));
    self->bd = alloc_zero(cap, sizeof(i128));
    self->tt = alloc_zero(cap, sizeof(int64_t));
    self->tv = alloc_zero(cap, sizeof(int64_t));
    self->bwin = alloc_zero(nw, sizeof(Window));
    self->twin = alloc_zero(nw, sizeof(Window));
    self->hor_ns = alloc_zero(nh, sizeof(int64_t));
    self->anchor = alloc_zero(nh, sizeof(int64_t));
    self->pbp = alloc_zero(levels, sizeof(double));
    self->pap = alloc_zero(levels, sizeof(double));
    self->cbp = alloc_zero(levels, sizeof(double));
    self->cap_ = alloc_zero(levels, sizeof(double));
    self->pbq = alloc_zero(levels, sizeof(int64_t));
    self->paq = alloc_zero(levels, sizeof(int64_t));
    self->cbq = alloc_zero(levels, sizeof(int64_t));
    self->caq = alloc_zero(levels, sizeof(int64_t));
    if (!self->bt || !self->bmid || !self->be1 || !self->bem || !self->bd || !self->tt || !self->tv || !self->bwin
        || !self->twin || !self->hor_ns || !self->anchor || !self->pbp || !self->pap || !self->cbp || !self->cap_
        || !self->pbq || !self->paq || !self->cbq || !self->caq) {
        sf_free(self);
        PyErr_NoMemory();
        return -1;
    }
    double wbest = wms[0], hbest = hs[0];
    self->wmax = self->hmax = 0;
    for (int k = 0; k < nw; k++) {
        if (!(wms[k] > 0)) {
            PyErr_SetString(PyExc_ValueError, "FeatureParams.windows_ms must be positive");
            return -1;
        }
        self->bwin[k].ns = self->twin[k].ns = (int64_t)wms[k] * 1000000;
        if (wms[k] > wbest) {  /* the first of the longest, as list.index(max(...)) */
            wbest = wms[k];
            self->wmax = k;
        }
    }
    for (int k = 0; k < nh; k++) {
        if (!(hs[k] > 0)) {
            PyErr_SetString(PyExc_ValueError, "FeatureParams.horizons_s must be positive");
            return -1;
        }
        self->hor_ns[k] = (int64_t)(hs[k] * 1e9);  /* int(h * 1_000_000_000): truncated */
        if (hs[k] > hbest) {
            hbest = hs[k];
            self->hmax = k;
        }
    }
    for (int m = 0; m < levels; m++)
        self->pbp[m] = self->pap[m] = self->cbp[m] = self->cap_[m] = NAN;
    self->now = self->books = self->trades = self->dropped = self->skipped = 0;
    self->bstart = self->bend = self->tstart = self->tend = 0;
    self->first_ns = self->last_book_ns = 0;
    self->mid = self->spread_bps = self->micro = self->micro_dev = self->depth_imb = 0.0;
    self->var = self->rv = self->spread_ewma = 0.0;
    return 0;
}

static void SF_dealloc(SF *self) {
    sf_free(self);
    Py_XDECREF(self->params);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---- the clock ------------------------------------------------------------------------------ */

static void sf_advance(SF *s, int64_t now_ns) {
    if (now_ns > s->now)
        s->now = now_ns;
    const int64_t now = s->now, cap = s->cap, end = s->bend;
    const int64_t *bt = s->bt;
    for (int k = 0; k < s->nw; k++) {
        Window *w = &s->bwin[k];
        const int64_t cut = now - w->ns;
        while (w->tail < end && bt[w->tail % cap] <= cut) {
            const int64_t i = w->tail % cap;
            w->s1 -= s->be1[i];
            w->s2 -= s->bem[i];
            w->s3 -= s->bd[i];
            w->n -= 1;
            w->tail += 1;
        }
    }
    for (int k = 0; k < s->nh; k++) {
        const int64_t cut = now - s->hor_ns[k];
        int64_t a = s->anchor[k];
        while (a + 1 < end && bt[(a + 1) % cap] <= cut)
            a += 1;
        s->anchor[k] = a;
    }
    const int64_t tend = s->tend;
    for (int k = 0; k < s->nw; k++) {
        Window *w = &s->twin[k];
        const int64_t cut = now - w->ns;
        while (w->tail < tend && s->tt[w->tail % cap] <= cut) {
            const int64_t v = s->tv[w->tail % cap];
            w->s1 -= v;
            w->s2 -= v >= 0 ? v : -v;
            w->n -= 1;
            w->tail += 1;
        }
    }
    /* release what no window or anchor needs (the reference's _release: where a full ring drops) */
    int64_t keep = s->bwin[s->wmax].tail;
    if (s->anchor[s->hmax] < keep)
        keep = s->anchor[s->hmax];
    if (s->bstart < keep)
        s->bstart = keep;
    keep = s->twin[s->wmax].tail;
    if (s->tstart < keep)
        s->tstart = keep;
}

static int parse_now(PyObject *obj, int64_t *now) {
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *now = v;
    return 0;
}

static PyObject *SF_advance(SF *self, PyObject *arg) {
    int64_t now;
    if (parse_now(arg, &now) < 0)
        return NULL;
    sf_advance(self, now);
    Py_RETURN_NONE;
}

/* ---- events --------------------------------------------------------------------------------- */

static inline int units_of(double q, int64_t *u) {
    const double x = q * UNITS;
    if (!(x >= 0.0 && x < MAX_UNITS))
        return -1;
    *u = (int64_t)nearbyint(x);  /* round half to even, as Python's round() */
    return 0;
}

static inline double as_double(PyObject *o) {
    return PyFloat_CheckExact(o) ? PyFloat_AS_DOUBLE(o) : PyFloat_AsDouble(o);
}

/* Side `obj`'s top n levels into (px, units); *l1q the best level's qty as given. 1: used, 0: a bad
 * level (not a finite positive price, or a qty that is negative, not finite or >= 2**62 units),
 * -1: an exception (not a sequence of [price, qty] pairs). */
static int read_side(PyObject *seq, int n, double *px, int64_t *q, double *l1q, i128 *sum) {
    const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    *sum = 0;
    for (int m = 0; m < n; m++) {
        if (m >= len) {
            px[m] = NAN;
            q[m] = 0;
            continue;
        }
        PyObject *lv = PySequence_Fast_GET_ITEM(seq, m);
        PyObject *p, *v;
        if (PyList_CheckExact(lv) && PyList_GET_SIZE(lv) == 2) {
            p = PyList_GET_ITEM(lv, 0);
            v = PyList_GET_ITEM(lv, 1);
        } else if (PyTuple_CheckExact(lv) && PyTuple_GET_SIZE(lv) == 2) {
            p = PyTuple_GET_ITEM(lv, 0);
            v = PyTuple_GET_ITEM(lv, 1);
        } else {
            PyErr_SetString(PyExc_TypeError, "a book level must be a [price, qty] pair");
            return -1;
        }
        const double price = as_double(p), qty = as_double(v);
        if (PyErr_Occurred())
            return -1;
        if (!(price > 0.0 && price < INFINITY) || units_of(qty, &q[m]) < 0)
            return 0;
        px[m] = price;
        if (m == 0)
            *l1q = qty;
        *sum += q[m];
    }
    return 1;
}

static PyObject *side_seq(PyObject *book, PyObject *name, int *empty) {
    PyObject *side = PyObject_GetAttr(book, name);
    if (side == NULL)
        return NULL;
    if (side == Py_None) {
        *empty = 1;
        return side;
    }
    PyObject *seq = PySequence_Fast(side, "book.bids and book.asks must be sequences of [price, qty]");
    Py_DECREF(side);
    if (seq != NULL && PySequence_Fast_GET_SIZE(seq) == 0)
        *empty = 1;
    return seq;
}

static void drop_book(SF *s) {
    const int64_t st = s->bstart, i = st % s->cap;
    for (int k = 0; k < s->nw; k++) {
        Window *w = &s->bwin[k];
        if (w->tail == st) {
            w->s1 -= s->be1[i];
            w->s2 -= s->bem[i];
            w->s3 -= s->bd[i];
            w->n -= 1;
            w->tail = st + 1;
        }
    }
    for (int k = 0; k < s->nh; k++)
        if (s->anchor[k] == st)
            s->anchor[k] = st + 1;  /* now younger than its horizon: approximate, as the reference */
    s->be1[i] = s->bem[i] = s->bd[i] = 0;
    s->bstart = st + 1;
    s->dropped += 1;
}

static PyObject *SF_on_book(SF *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "on_book(book, now_ns)");
        return NULL;
    }
    int64_t now_ns;
    if (parse_now(args[1], &now_ns) < 0)
        return NULL;
    int empty = 0;
    PyObject *bids = side_seq(args[0], S_bids, &empty);
    if (bids == NULL)
        return NULL;
    PyObject *asks = side_seq(args[0], S_asks, &empty);
    if (asks == NULL) {
        Py_DECREF(bids);
        return NULL;
    }
    SF *s = self;
    const int n = s->levels;
    double qb = 0.0, qa = 0.0;
    i128 sb = 0, sa = 0;
    int ok = 0;
    if (!empty) {
        ok = read_side(bids, n, s->cbp, s->cbq, &qb, &sb);
        if (ok == 1)
            ok = read_side(asks, n, s->cap_, s->caq, &qa, &sa);
    }
    Py_DECREF(bids);
    Py_DECREF(asks);
    if (ok < 0)
        return NULL;
    if (ok == 0) {  /* an empty side or a bad level: not used, counted */
        s->skipped += 1;
        Py_RETURN_FALSE;
    }
    sf_advance(s, now_ns);
    const int64_t now = s->now;
    /* OFI per level against the previous book */
    i128 e1 = 0, em = 0;
    if (s->books) {
        for (int m = 0; m < n; m++) {
            i128 e = 0;
            const double b0 = s->pbp[m], b1 = s->cbp[m], a0 = s->pap[m], a1 = s->cap_[m];
            if (isnan(b0))
                e += s->cbq[m];
            else if (isnan(b1))
                e -= s->pbq[m];
            else {
                if (b1 >= b0)
                    e += s->cbq[m];
                if (b1 <= b0)
                    e -= s->pbq[m];
            }
            if (isnan(a0))
                e -= s->caq[m];
            else if (isnan(a1))
                e += s->paq[m];
            else {
                if (a1 <= a0)
                    e -= s->caq[m];
                if (a1 >= a0)
                    e += s->paq[m];
            }
            if (m == 0)
                e1 = e;
            em += e;
        }
    }
    { /* current -> previous */
        double *t;
        int64_t *u;
        t = s->pbp; s->pbp = s->cbp; s->cbp = t;
        t = s->pap; s->pap = s->cap_; s->cap_ = t;
        u = s->pbq; s->pbq = s->cbq; s->cbq = u;
        u = s->paq; s->paq = s->caq; s->caq = u;
    }
    /* L1 metrics (the best levels as given: prices and qtys) */
    const double pb = s->pbp[0], pa = s->pap[0];
    const double mid = (pb + pa) * 0.5;
    const double spread = pa - pb;
    const double spread_bps = mid != 0.0 ? spread / mid * 1e4 : 0.0;
    const double tq = qa + qb;
    if (tq > 0) {
        s->micro = (pb * qa + pa * qb) / tq;
        s->micro_dev = mid != 0.0 ? spread * (qb - qa) / (2.0 * tq) / mid * 1e4 : 0.0;
    } else {
        s->micro = mid;
        s->micro_dev = 0.0;
    }
    const i128 tot = sb + sa;
    if (tot != 0) {
        if (ratio(sb - sa, 1, tot, &s->depth_imb) < 0)
            return NULL;
    } else {
        s->depth_imb = 0.0;
    }
    /* volatilities and the spread's EWMA */
    if (s->books) {
        const double ndt = (double)(-(now - s->last_book_ns));
        const double decay = exp(ndt * s->inv_vol_tau_ns);
        const double prev = s->mid;
        const double r = (mid > 0 && prev > 0) ? log(mid / prev) : 0.0;
        const double r2 = r * r;
        s->var = decay * s->var + (-expm1(ndt * s->inv_vol_tau_ns)) * r2;
        s->rv = decay * s->rv + r2;
        const double x = ndt * s->inv_spread_tau_ns;
        s->spread_ewma = exp(x) * s->spread_ewma - expm1(x) * spread_bps;
    } else {
        s->first_ns = now;
        s->spread_ewma = spread_bps;
    }
    s->mid = mid;
    s->spread_bps = spread_bps;
    s->last_book_ns = now;
    s->books += 1;
    /* ring append (a full ring drops its oldest) */
    if (s->bend - s->bstart >= s->cap)
        drop_book(s);
    const int64_t i = s->bend % s->cap;
    const i128 d = sb + sa;
    s->bt[i] = now;
    s->bmid[i] = mid;
    s->be1[i] = e1;
    s->bem[i] = em;
    s->bd[i] = d;
    s->bend += 1;
    for (int k = 0; k < s->nw; k++) {
        Window *w = &s->bwin[k];
        w->s1 += e1;
        w->s2 += em;
        w->s3 += d;
        w->n += 1;
    }
    Py_RETURN_TRUE;
}

static PyObject *SF_on_trade(SF *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "on_trade(trade, now_ns)");
        return NULL;
    }
    int64_t now_ns;
    if (parse_now(args[1], &now_ns) < 0)
        return NULL;
    SF *s = self;
    PyObject *qty = PyObject_GetAttr(args[0], S_qty);
    if (qty == NULL)
        return NULL;
    PyObject *f = PyNumber_Float(qty);  /* float(trade.qty) */
    Py_DECREF(qty);
    double x = -1.0;
    if (f == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError) && !PyErr_ExceptionMatches(PyExc_TypeError))
            return NULL;
        PyErr_Clear();  /* a qty that is no number (a signalling NaN): not used */
    } else {
        x = PyFloat_AS_DOUBLE(f) * UNITS;
        Py_DECREF(f);
    }
    int64_t q = 0;
    if (x > 0.0 && x < MAX_UNITS)
        q = (int64_t)nearbyint(x);
    if (q <= 0) {
        s->skipped += 1;
        Py_RETURN_FALSE;
    }
    PyObject *maker = PyObject_GetAttr(args[0], S_maker);
    if (maker == NULL)
        return NULL;
    const int sell = PyObject_IsTrue(maker);
    Py_DECREF(maker);
    if (sell < 0)
        return NULL;
    sf_advance(s, now_ns);
    const int64_t v = sell ? -q : q, cap = s->cap;
    if (s->tend - s->tstart >= cap) {
        const int64_t st = s->tstart, old = s->tv[st % cap];
        for (int k = 0; k < s->nw; k++) {
            Window *w = &s->twin[k];
            if (w->tail == st) {
                w->s1 -= old;
                w->s2 -= old >= 0 ? old : -old;
                w->n -= 1;
                w->tail = st + 1;
            }
        }
        s->tv[st % cap] = 0;
        s->tstart = st + 1;
        s->dropped += 1;
    }
    const int64_t i = s->tend % cap;
    s->tt[i] = s->now;
    s->tv[i] = v;
    s->tend += 1;
    for (int k = 0; k < s->nw; k++) {
        Window *w = &s->twin[k];
        w->s1 += v;
        w->s2 += q;
        w->n += 1;
    }
    s->trades += 1;
    Py_RETURN_TRUE;
}

/* ---- reading -------------------------------------------------------------------------------- */

static int window_values(SF *s, int k, double *ofi_l1, double *ofi_multi, double *flow) {
    const Window *w = &s->bwin[k], *t = &s->twin[k];
    if (ratio(w->s1, 1, (i128)100000000, ofi_l1) < 0)
        return -1;
    *ofi_multi = 0.0;
    if (w->s3 != 0 && ratio(w->s2, 2LL * s->levels * w->n, w->s3, ofi_multi) < 0)
        return -1;
    *flow = 0.0;
    if (t->s2 != 0 && ratio(t->s1, 1, t->s2, flow) < 0)
        return -1;
    return 0;
}

static void now_values(SF *s, double *vol_1s, double *ratio_, int *ready) {
    if (s->books) {
        const double ndt = (double)(-(s->now - s->last_book_ns));
        *vol_1s = sqrt(s->rv * exp(ndt * s->inv_vol_tau_ns) / s->vol_tau_s);
        *ratio_ = s->spread_ewma != 0.0 ? s->spread_bps / s->spread_ewma : 0.0;
        *ready = s->now - s->first_ns >= s->warmup_ns;
    } else {
        *vol_1s = *ratio_ = 0.0;
        *ready = 0;
    }
}

static PyObject *SF_head(SF *self, PyObject *Py_UNUSED(ignored)) {
    double l1, multi, flow, vol_1s, sr;
    int ready;
    if (window_values(self, 0, &l1, &multi, &flow) < 0)
        return NULL;
    now_values(self, &vol_1s, &sr, &ready);
    return Py_BuildValue("(dddddddddO)", self->books ? self->mid : 0.0, l1, multi, flow, self->depth_imb,
                         self->micro_dev, self->spread_bps, vol_1s, sr, ready ? Py_True : Py_False);
}

static PyObject *SF_vector(SF *self, PyObject *Py_UNUSED(ignored)) {
    if (VectorType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_cfeatures.bind(FeatureVector) was not called");
        return NULL;
    }
    SF *s = self;
    PyObject *l1 = PyTuple_New(s->nw), *multi = PyTuple_New(s->nw), *flow = PyTuple_New(s->nw);
    PyObject *mom = PyTuple_New(s->nh), *out = NULL;
    if (!l1 || !multi || !flow || !mom)
        goto done;
    for (int k = 0; k < s->nw; k++) {
        double a, b, c;
        if (window_values(s, k, &a, &b, &c) < 0)
            goto done;
        PyTuple_SET_ITEM(l1, k, PyFloat_FromDouble(a));
        PyTuple_SET_ITEM(multi, k, PyFloat_FromDouble(b));
        PyTuple_SET_ITEM(flow, k, PyFloat_FromDouble(c));
    }
    for (int k = 0; k < s->nh; k++) {
        double m = 0.0;
        if (s->books) {
            const int64_t i = s->anchor[k] % s->cap;
            const double then = s->bmid[i];
            if (s->bt[i] <= s->now - s->hor_ns[k] && s->mid > 0 && then > 0)
                m = log(s->mid / then);
        }
        PyTuple_SET_ITEM(mom, k, PyFloat_FromDouble(m));
    }
    double vol_1s, sr;
    int ready;
    now_values(s, &vol_1s, &sr, &ready);
    /* FeatureVector's fields, in order */
    out = PyObject_CallFunction(VectorType, "LLLddOOdddOddOdOLL", (long long)s->now, s->books, s->trades,
                                s->books ? s->mid : 0.0, s->spread_bps, l1, multi, s->depth_imb, s->micro,
                                s->micro_dev, flow, sqrt(s->var), vol_1s, mom, sr, ready ? Py_True : Py_False,
                                s->dropped, s->skipped);
done:
    Py_XDECREF(l1);
    Py_XDECREF(multi);
    Py_XDECREF(flow);
    Py_XDECREF(mom);
    return out;
}

static PyMethodDef SF_methods[] = {
    {"on_book", (PyCFunction)(void (*)(void))SF_on_book, METH_FASTCALL,
     "on_book(book, now_ns) -> bool: feed one book seen at now_ns; False when not used (an empty side "
     "or a bad level, counted in skipped)."},
    {"on_trade", (PyCFunction)(void (*)(void))SF_on_trade, METH_FASTCALL,
     "on_trade(trade, now_ns) -> bool: feed one trade; False when not used (qty not positive: skipped)."},
    {"advance", (PyCFunction)SF_advance, METH_O, "advance(now_ns): move the clock (never back); windows expire."},
    {"head", (PyCFunction)SF_head, METH_NOARGS,
     "(mid, ofi_l1[0], ofi_multi[0], trade_flow[0], depth_imbalance, microprice_dev_bps, spread_bps, vol_1s, "
     "spread_ratio, ready): what a per-book decision reads, equal to vector()'s values."},
    {"vector", (PyCFunction)SF_vector, METH_NOARGS, "The features as of the latest event: a FeatureVector."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SF_members[] = {
    {"params", T_OBJECT, offsetof(SF, params), READONLY, "the FeatureParams"},
    {"capacity", T_LONGLONG, offsetof(SF, cap), READONLY, "events per ring"},
    {"books", T_LONGLONG, offsetof(SF, books), READONLY, "books used"},
    {"trades", T_LONGLONG, offsetof(SF, trades), READONLY, "trades used"},
    {"dropped", T_LONGLONG, offsetof(SF, dropped), READONLY, "events a full ring dropped"},
    {"skipped", T_LONGLONG, offsetof(SF, skipped), READONLY, "events not used (empty side, bad level, bad qty)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SFType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "services.strategy._cfeatures.SymbolFeatures",
    .tp_doc = "SymbolFeatures(params=None): one symbol's features (services/strategy/features.py), in C.",
    .tp_basicsize = sizeof(SF),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SF_init,
    .tp_dealloc = (destructor)SF_dealloc,
    .tp_methods = SF_methods,
    .tp_members = SF_members,
};

/* ---- the score (scoring.py's Scorer, read straight from the features) ----------------------- */

typedef struct {
    PyObject_HEAD
    double w_ofi, w_l1, w_flow, w_depth, w_micro, wsum, ofi_scale, l1_scale, entry, max_spread_ratio, vol_min,
        vol_max;
} ScorerObject;

static int Scorer_init(ScorerObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"scorer", NULL};
    PyObject *py;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Scorer", kwlist, &py))
        return -1;
    static const char *names[] = {"w_ofi", "w_l1", "w_flow", "w_depth", "w_micro", "wsum", "ofi_scale", "l1_scale",
                                  "entry", "max_spread_ratio", "vol_min", "vol_max"};
    double *out[] = {&self->w_ofi, &self->w_l1, &self->w_flow, &self->w_depth, &self->w_micro, &self->wsum,
                     &self->ofi_scale, &self->l1_scale, &self->entry, &self->max_spread_ratio, &self->vol_min,
                     &self->vol_max};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (get_d(py, names[i], out[i]) < 0)
            return -1;
    return 0;
}

/* score(features) -> (score, side, confidence, why, mid, vol_1s): Scorer.__call__(features.head())
 * and the head's mid and vol_1s, without building the head. */
static PyObject *Scorer_score(ScorerObject *self, PyObject *arg) {
    if (!PyObject_TypeCheck(arg, &SFType)) {
        PyErr_SetString(PyExc_TypeError, "score(features): a SymbolFeatures");
        return NULL;
    }
    if (SideBuy == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_cfeatures.bind_score(...) was not called");
        return NULL;
    }
    SF *s = (SF *)arg;
    double l1, multi, flow, vol_1s, sr;
    int ready;
    if (window_values(s, 0, &l1, &multi, &flow) < 0)
        return NULL;
    now_values(s, &vol_1s, &sr, &ready);
    const double spread = s->spread_bps, mid = s->books ? s->mid : 0.0;
    double micro = spread > 0 ? s->micro_dev / (0.5 * spread) : 0.0;
    if (micro > 1.0)
        micro = 1.0;
    else if (micro < -1.0)
        micro = -1.0;
    const double score = (self->w_ofi * tanh(multi / self->ofi_scale) + self->w_l1 * tanh(l1 / self->l1_scale)
                          + self->w_flow * flow + self->w_depth * s->depth_imb + self->w_micro * micro) / self->wsum;
    PyObject *side = Py_None, *why = WhyNone;
    double confidence = 0.0;
    if (!ready) {
        why = WhyNotReady;
    } else {
        const double vol_bps = vol_1s * 1e4;
        if (sr > self->max_spread_ratio || !(self->vol_min <= vol_bps && vol_bps <= self->vol_max)) {
            why = WhyFiltered;
        } else if (score >= self->entry) {
            side = SideBuy;
            confidence = score < 1.0 ? score : 1.0;
        } else if (score <= -self->entry) {
            side = SideSell;
            confidence = -score < 1.0 ? -score : 1.0;
        }
    }
    return Py_BuildValue("(dOdOdd)", score, side, confidence, why, mid, vol_1s);
}

static PyMethodDef Scorer_methods[] = {
    {"score", (PyCFunction)Scorer_score, METH_O,
     "score(features) -> (score, side, confidence, why, mid, vol_1s): the Python Scorer's answer for "
     "features.head(), with the head's mid and vol_1s."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScorerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "services.strategy._cfeatures.Scorer",
    .tp_doc = "Scorer(scorer): scoring.Scorer's weights and filters, applied in C to a SymbolFeatures.",
    .tp_basicsize = sizeof(ScorerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scorer_init,
    .tp_methods = Scorer_methods,
};

static PyObject *mod_bind(PyObject *Py_UNUSED(m), PyObject *cls) {
    Py_INCREF(cls);
    Py_XSETREF(VectorType, cls);
    Py_RETURN_NONE;
}

static PyObject *mod_bind_score(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *buy, *sell, *not_ready, *filtered;
    if (!PyArg_ParseTuple(args, "OOUU:bind_score", &buy, &sell, &not_ready, &filtered))
        return NULL;
    PyObject **slots[] = {&SideBuy, &SideSell, &WhyNotReady, &WhyFiltered};
    PyObject *values[] = {buy, sell, not_ready, filtered};
    for (int i = 0; i < 4; i++) {
        Py_INCREF(values[i]);
        Py_XSETREF(*slots[i], values[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"bind", mod_bind, METH_O, "bind(FeatureVector): the class vector() returns."},
    {"bind_score", mod_bind_score, METH_VARARGS,
     "bind_score(Side.BUY, Side.SELL, NOT_READY, FILTERED): what Scorer.score() answers with."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cfeatures", "The features core's per-event path in C (see features.py).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cfeatures(void) {
    if (PyType_Ready(&SFType) < 0 || PyType_Ready(&ScorerType) < 0)
        return NULL;
    WhyNone = PyUnicode_InternFromString("");
    if (WhyNone == NULL)
        return NULL;
    S_bids = PyUnicode_InternFromString("bids");
    S_asks = PyUnicode_InternFromString("asks");
    S_qty = PyUnicode_InternFromString("qty");
    S_maker = PyUnicode_InternFromString("buyer_is_maker");
    if (!S_bids || !S_asks || !S_qty || !S_maker)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SFType);
    if (PyModule_AddObject(m, "SymbolFeatures", (PyObject *)&SFType) < 0) {
        Py_DECREF(&SFType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ScorerType);
    if (PyModule_AddObject(m, "Scorer", (PyObject *)&ScorerType) < 0) {
        Py_DECREF(&ScorerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
