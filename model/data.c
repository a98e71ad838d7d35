/* The data pipeline: reads text files and directories into one byte stream per split (training,
 * held-out; split by document), and hands out each step's global batch, or one rank's rows of
 * it, from a stateless seeded permutation (a Feistel network with cycle walking). */
#include "model/data.h"

#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "actors/log.h"

struct model_data_t {
    uint32_t seq_len, batch;
    uint64_t seed;
    char **files;                /* canonical paths of the text files read, sorted */
    uint64_t n_files, skipped;
    model_data_doc_t *docs;      /* training documents, then held-out, each in stream order */
    uint64_t n_docs;
    uint8_t *stream[2];          /* per split */
    uint64_t len[2], samples[2], split_docs[2];
};

/* ---- hashing ------------------------------------------------------------------------------ */

/* splitmix64's finaliser: a bijective 64-bit mixer. */
static uint64_t s_mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* The held-out draw of a document: uniform in [0, 1) from (seed, the document's text). By
 * content, not by path: the split survives the corpus moving to another host, and a text that
 * occurs twice (fortunes repeats entries across files) lands on one side only, so held-out
 * text never leaks into training. */
static double s_doc_draw(uint64_t seed, const uint8_t *text, uint64_t len)
{
    uint64_t h = 0xCBF29CE484222325ull; /* FNV-1a over the text, then mixed */
    for (uint64_t i = 0; i < len; i++)
        h = (h ^ text[i]) * 0x100000001B3ull;
    h = s_mix(h ^ s_mix(seed ^ 0x68656C646F7574ull));
    h = s_mix(h ^ (len * 0xD6E8FEB86659FD93ull));
    return (double)(h >> 11) / 9007199254740992.0;
}

/* ---- the permutation ---------------------------------------------------------------------- */

#define S_ROUNDS 6

/* Position i of a permutation of [0, n) keyed by (seed, epoch): a balanced Feistel network on
 * the smallest even number of bits covering n, walked until it lands below n (fewer than 4
 * steps on average, since 2^bits < 4n). */
static uint64_t s_permute(uint64_t n, uint64_t seed, uint64_t epoch, uint64_t i)
{
    if (n <= 1)
        return 0;
    unsigned bits = 64 - (unsigned)__builtin_clzll(n - 1);
    bits += bits & 1;
    unsigned half = bits / 2;
    uint64_t mask = (1ull << half) - 1; /* half <= 32 */
    uint64_t keys[S_ROUNDS];
    uint64_t base = s_mix(seed ^ s_mix(epoch ^ 0x7065726D75746Eull));
    for (int r = 0; r < S_ROUNDS; r++)
        keys[r] = s_mix(base + (uint64_t)r * 0x9E3779B97F4A7C15ull);
    uint64_t x = i;
    do {
        uint64_t l = x >> half, rt = x & mask;
        for (int r = 0; r < S_ROUNDS; r++) {
            uint64_t t = l ^ (s_mix(rt ^ keys[r]) & mask);
            l = rt;
            rt = t;
        }
        x = (l << half) | rt;
    } while (x >= n);
    return x;
}

/* ---- collecting files --------------------------------------------------------------------- */

typedef struct {
    char **v;
    size_t n, cap;
} s_strv_t;

static void s_strv_push(s_strv_t *sv, char *s)
{
    if (sv->n == sv->cap) {
        sv->cap = sv->cap ? sv->cap * 2 : 64;
        sv->v = semoe_xrealloc(sv->v, sv->cap * sizeof *sv->v);
    }
    sv->v[sv->n++] = s;
}

static void s_strv_free(s_strv_t *sv)
{
    for (size_t i = 0; i < sv->n; i++)
        free(sv->v[i]);
    free(sv->v);
    sv->v = NULL;
    sv->n = sv->cap = 0;
}

static int s_cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

#define S_MAX_DEPTH 64

/* Adds the regular files at path (a file, or a directory walked recursively, skipping hidden
 * names) to files as canonical paths. top: path was given by the user, so failing to read it is
 * an error; below the top a broken entry is logged and skipped. Directories are canonicalised
 * too, and a directory already seen (through a symlink) is not walked again. */
static semoe_rc s_collect(const char *path, bool top, int depth, s_strv_t *files, s_strv_t *dirs)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        if (top)
            return semoe_err_errno(SEMOE_EINVAL, "data.paths: %s: cannot read", path);
        log_warn("data: skipping %s: %s", path, strerror(errno));
        return SEMOE_OK;
    }
    char *real = realpath(path, NULL);
    if (!real) {
        if (top)
            return semoe_err_errno(SEMOE_EINVAL, "data.paths: %s: cannot resolve", path);
        log_warn("data: skipping %s: %s", path, strerror(errno));
        return SEMOE_OK;
    }
    if (S_ISREG(st.st_mode)) {
        s_strv_push(files, real);
        return SEMOE_OK;
    }
    if (!S_ISDIR(st.st_mode)) {
        log_info("data: skipping %s: not a regular file or directory", real);
        free(real);
        return SEMOE_OK;
    }
    for (size_t i = 0; i < dirs->n; i++)
        if (strcmp(dirs->v[i], real) == 0) {
            free(real);
            return SEMOE_OK;
        }
    if (depth >= S_MAX_DEPTH) {
        log_warn("data: skipping %s: more than %d directories deep", real, S_MAX_DEPTH);
        free(real);
        return SEMOE_OK;
    }
    s_strv_push(dirs, real);
    DIR *dir = opendir(real);
    if (!dir) {
        if (top)
            return semoe_err_errno(SEMOE_EINVAL, "data.paths: %s: cannot open directory", path);
        log_warn("data: skipping %s: %s", real, strerror(errno));
        return SEMOE_OK;
    }
    s_strv_t names = {0};
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (e->d_name[0] == '.') /* hidden, and . and .. */
            continue;
        char *child = NULL;
        if (asprintf(&child, "%s/%s", real, e->d_name) < 0)
            abort();
        s_strv_push(&names, child);
    }
    closedir(dir);
    semoe_rc rc = SEMOE_OK;
    for (size_t i = 0; i < names.n && rc == SEMOE_OK; i++)
        rc = s_collect(names.v[i], false, depth + 1, files, dirs);
    s_strv_free(&names);
    return rc;
}

/* Reads a whole file; *buf is the caller's. */
static semoe_rc s_read_file(const char *path, uint8_t **buf, uint64_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return semoe_err_errno(SEMOE_EIO, "data: %s: cannot open", path);
    size_t cap = 1 << 16, n = 0, r;
    uint8_t *b = semoe_xmalloc(cap);
    while ((r = fread(b + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap)
            b = semoe_xrealloc(b, cap *= 2);
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        return semoe_err(SEMOE_EIO, "data: %s: read failed", path);
    }
    *buf = b;
    *len = n;
    return SEMOE_OK;
}

/* Why a file is not text, or NULL if it is: any NUL byte, or more than 1 in 10 bytes a control
 * byte other than tab, newline, vertical tab, form feed, carriage return, backspace or escape
 * (which text, fortunes included, does use). */
static const char *s_not_text(const uint8_t *b, uint64_t n)
{
    if (n == 0)
        return "empty";
    uint64_t ctrl = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t c = b[i];
        if (c == 0)
            return "binary (NUL bytes)";
        if ((c < 0x20 && c != '\t' && c != '\n' && c != '\v' && c != '\f' && c != '\r' &&
             c != '\b' && c != 0x1b) || c == 0x7f)
            ctrl++;
    }
    if (ctrl * 10 > n)
        return "binary (control bytes)";
    return NULL;
}

/* Whether the line [b, b + n) (no '\n') is a fortune separator: "%" alone (a '\r' allowed). */
static bool s_is_sep(const uint8_t *b, uint64_t n)
{
    return (n == 1 && b[0] == '%') || (n == 2 && b[0] == '%' && b[1] == '\r');
}

static bool s_blank(const uint8_t *b, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r' && b[i] != '\v' &&
            b[i] != '\f')
            return false;
    return true;
}

/* A document before the split: file index and its bytes in that file. */
typedef struct {
    uint64_t file;
    uint32_t entry;
    model_data_split_t split;
    uint64_t off, len;
} s_doc_t;

typedef struct {
    s_doc_t *v;
    uint64_t n, cap;
} s_docv_t;

static void s_docv_push(s_docv_t *dv, s_doc_t doc)
{
    if (dv->n == dv->cap) {
        dv->cap = dv->cap ? dv->cap * 2 : 256;
        dv->v = semoe_xrealloc(dv->v, dv->cap * sizeof *dv->v);
    }
    dv->v[dv->n++] = doc;
}

/* Cuts file b[0..n) into documents: its non-blank fortune entries when some line is "%" alone,
 * else the whole file. Returns how many it added. */
static uint64_t s_cut(const uint8_t *b, uint64_t n, uint64_t file, s_docv_t *out)
{
    bool fortune = false;
    for (uint64_t ls = 0; ls < n && !fortune;) {
        const uint8_t *nl = memchr(b + ls, '\n', n - ls);
        uint64_t le = nl ? (uint64_t)(nl - b) : n;
        fortune = s_is_sep(b + ls, le - ls);
        ls = le + 1;
    }
    uint64_t added = 0;
    if (!fortune) {
        if (!s_blank(b, n)) {
            s_docv_push(out, (s_doc_t){.file = file, .entry = 0, .off = 0, .len = n});
            added++;
        }
        return added;
    }
    uint64_t start = 0; /* of the current entry */
    for (uint64_t ls = 0; ls <= n;) {
        const uint8_t *nl = ls < n ? memchr(b + ls, '\n', n - ls) : NULL;
        uint64_t le = nl ? (uint64_t)(nl - b) : n;
        bool sep = s_is_sep(b + ls, le - ls);
        if (sep || le == n) {
            uint64_t end = sep ? ls : n; /* the entry keeps its last '\n' */
            if (end > start && !s_blank(b + start, end - start)) {
                s_docv_push(out, (s_doc_t){.file = file, .entry = (uint32_t)added, .off = start,
                                           .len = end - start});
                added++;
            }
            start = le + 1;
        }
        if (le == n)
            break;
        ls = le + 1;
    }
    return added;
}

/* The paths as given, joined for messages ("a, b, c", cut short). */
static void s_paths_text(const model_job_t *job, char *buf, size_t size)
{
    size_t at = 0;
    buf[0] = 0;
    for (uint32_t i = 0; i < job->data.n_paths && at + 1 < size; i++) {
        int w = snprintf(buf + at, size - at, "%s%s", i ? ", " : "", job->data.paths[i]);
        if (w < 0)
            break;
        at += (size_t)w;
    }
    if (at >= size && size > 4)
        memcpy(buf + size - 4, "...", 4);
}

/* ---- open / destroy ----------------------------------------------------------------------- */

semoe_rc model_data_open(const model_job_t *job, model_data_t **out)
{
    *out = NULL;
    if (job->data.n_paths == 0)
        return semoe_err(SEMOE_EINVAL, "data.paths: empty: give text files or directories");
    if (job->train.seq_len < 1 || job->train.global_batch < 1)
        return semoe_err(SEMOE_EINVAL, "data: train.seq_len=%u, train.global_batch=%u: need >= 1",
                         job->train.seq_len, job->train.global_batch);
    double frac = job->data.heldout_fraction;
    if (!(frac >= 0 && frac < 1))
        return semoe_err(SEMOE_EINVAL, "data.heldout_fraction=%g: need 0 <= fraction < 1", frac);

    semoe_rc rc = SEMOE_OK;
    s_strv_t files = {0}, dirs = {0}, texts = {0};
    s_docv_t docs = {0};
    uint8_t **bufs = NULL;
    model_data_t *d = NULL;
    char paths[512];
    s_paths_text(job, paths, sizeof paths);

    for (uint32_t i = 0; i < job->data.n_paths; i++)
        SEMOE_CHECK_GOTO(s_collect(job->data.paths[i], true, 0, &files, &dirs), rc, fail);
    if (files.n)
        qsort(files.v, files.n, sizeof *files.v, s_cmp_str);

    /* read each distinct file; keep the text ones */
    bufs = semoe_xcalloc(files.n ? files.n : 1, sizeof *bufs);
    uint64_t skipped = 0;
    char skipped_text[400] = "";
    size_t skipped_at = 0;
    for (size_t i = 0; i < files.n; i++) {
        if (i > 0 && strcmp(files.v[i], files.v[i - 1]) == 0)
            continue;
        uint8_t *b = NULL;
        uint64_t n = 0;
        SEMOE_CHECK_GOTO(s_read_file(files.v[i], &b, &n), rc, fail);
        const char *why = s_not_text(b, n);
        uint64_t fi = texts.n;
        if (!why && s_cut(b, n, fi, &docs) == 0)
            why = "no text in it";
        if (why) {
            log_debug("data: skipping %s: %s", files.v[i], why);
            if (skipped_at + 1 < sizeof skipped_text) {
                int w = snprintf(skipped_text + skipped_at, sizeof skipped_text - skipped_at,
                                 "%s%s", skipped ? ", " : "", files.v[i]);
                skipped_at += w > 0 ? (size_t)w : 0;
            }
            skipped++;
            free(b);
            continue;
        }
        bufs[fi] = b;
        s_strv_push(&texts, semoe_xstrdup(files.v[i]));
    }
    if (skipped) {
        if (skipped_at >= sizeof skipped_text)
            memcpy(skipped_text + sizeof skipped_text - 4, "...", 4);
        log_info("data: skipped %llu files that are not text: %s", (unsigned long long)skipped,
                 skipped_text);
    }
    if (docs.n == 0) {
        rc = semoe_err(SEMOE_EINVAL,
                       "data.paths: %s: no text documents (%llu files, %llu not text); give "
                       "text files or directories holding them",
                       paths, (unsigned long long)files.n, (unsigned long long)skipped);
        goto fail;
    }

    d = semoe_xcalloc(1, sizeof *d);
    d->seq_len = job->train.seq_len;
    d->batch = job->train.global_batch;
    d->seed = job->train.seed;
    d->skipped = skipped;

    /* split, then lay out each split's stream: documents in file then entry order */
    for (uint64_t i = 0; i < docs.n; i++) {
        s_doc_t *doc = &docs.v[i];
        doc->split = s_doc_draw(d->seed, (const uint8_t *)bufs[doc->file] + doc->off, doc->len) < frac
                         ? MODEL_DATA_HELDOUT
                         : MODEL_DATA_TRAIN;
        d->len[doc->split] += doc->len + 1;
        d->split_docs[doc->split]++;
    }
    for (int s = 0; s < 2; s++)
        d->stream[s] = semoe_xmalloc(d->len[s] ? d->len[s] : 1);
    d->docs = semoe_xcalloc(docs.n, sizeof *d->docs);
    d->n_docs = docs.n;
    uint64_t at[2] = {0, 0}, slot[2] = {0, d->split_docs[MODEL_DATA_TRAIN]};
    for (uint64_t i = 0; i < docs.n; i++) {
        const s_doc_t *doc = &docs.v[i];
        int s = doc->split;
        memcpy(d->stream[s] + at[s], bufs[doc->file] + doc->off, doc->len);
        d->docs[slot[s]++] = (model_data_doc_t){.path = texts.v[doc->file], .entry = doc->entry,
                                                .split = doc->split, .offset = at[s],
                                                .len = doc->len};
        at[s] += doc->len;
        d->stream[s][at[s]++] = '\n';
    }
    for (int s = 0; s < 2; s++)
        d->samples[s] = d->len[s] > d->seq_len ? (d->len[s] - 1) / d->seq_len : 0;
    d->files = texts.v;
    d->n_files = texts.n;
    texts = (s_strv_t){0};

    if (d->samples[MODEL_DATA_TRAIN] == 0) {
        rc = semoe_err(SEMOE_EINVAL,
                       "data.paths: %s: training text of %llu bytes (%llu documents, %llu held "
                       "out) is shorter than one sample of train.seq_len + 1 = %llu bytes; add "
                       "text, lower train.seq_len or data.heldout_fraction",
                       paths, (unsigned long long)d->len[MODEL_DATA_TRAIN],
                       (unsigned long long)docs.n,
                       (unsigned long long)d->split_docs[MODEL_DATA_HELDOUT],
                       (unsigned long long)d->seq_len + 1);
        goto fail;
    }
    *out = d;
    d = NULL;

fail:
    if (bufs)
        for (size_t i = 0; i < files.n; i++)
            free(bufs[i]);
    free(bufs);
    free(docs.v);
    s_strv_free(&files);
    s_strv_free(&dirs);
    s_strv_free(&texts);
    model_data_destroy(&d);
    return rc;
}

void model_data_destroy(model_data_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    model_data_t *d = *self_p;
    for (uint64_t i = 0; i < d->n_files; i++)
        free(d->files[i]);
    free(d->files);
    free(d->docs);
    free(d->stream[0]);
    free(d->stream[1]);
    free(d);
    *self_p = NULL;
}

/* ---- queries ------------------------------------------------------------------------------ */

uint64_t model_data_samples(const model_data_t *d, model_data_split_t split)
{
    return d->samples[split == MODEL_DATA_HELDOUT];
}

uint32_t model_data_row_len(const model_data_t *d) { return d->seq_len + 1; }

void model_data_stats(const model_data_t *d, model_data_stats_t *out)
{
    out->files = d->n_files;
    out->skipped = d->skipped;
    for (int s = 0; s < 2; s++)
        out->split[s] = (model_data_split_stats_t){
            .documents = d->split_docs[s], .bytes = d->len[s], .samples = d->samples[s]};
}

int model_data_summary(const model_data_t *d, char *buf, size_t size)
{
    uint64_t docs = d->split_docs[0] + d->split_docs[1];
    return snprintf(buf, size,
                    "data: %llu text files (%llu skipped), %llu documents; train: %llu "
                    "documents, %llu bytes, %llu samples; held-out: %llu documents (%.1f%%), "
                    "%llu bytes, %llu samples; seq_len %u",
                    (unsigned long long)d->n_files, (unsigned long long)d->skipped,
                    (unsigned long long)docs, (unsigned long long)d->split_docs[0],
                    (unsigned long long)d->len[0], (unsigned long long)d->samples[0],
                    (unsigned long long)d->split_docs[1],
                    docs ? 100.0 * (double)d->split_docs[1] / (double)docs : 0.0,
                    (unsigned long long)d->len[1], (unsigned long long)d->samples[1], d->seq_len);
}

uint64_t model_data_documents(const model_data_t *d) { return d->n_docs; }

const model_data_doc_t *model_data_document(const model_data_t *d, uint64_t i)
{
    return i < d->n_docs ? &d->docs[i] : NULL;
}

const uint8_t *model_data_stream(const model_data_t *d, model_data_split_t split, uint64_t *len)
{
    int s = split == MODEL_DATA_HELDOUT;
    if (len)
        *len = d->len[s];
    return d->stream[s];
}

const uint8_t *model_data_sample(const model_data_t *d, model_data_split_t split, uint64_t id)
{
    int s = split == MODEL_DATA_HELDOUT;
    return id < d->samples[s] ? d->stream[s] + id * d->seq_len : NULL;
}

uint64_t model_data_sample_index(const model_data_t *d, uint64_t epoch, uint64_t i)
{
    return s_permute(d->samples[MODEL_DATA_TRAIN], d->seed, epoch, i);
}

void model_data_rows(uint32_t batch, uint32_t rank, uint32_t world, uint32_t *first,
                     uint32_t *count)
{
    if (world == 0 || rank >= world) {
        *first = *count = 0;
        return;
    }
    uint64_t a = (uint64_t)rank * batch / world, b = ((uint64_t)rank + 1) * batch / world;
    *first = (uint32_t)a;
    *count = (uint32_t)(b - a);
}

semoe_rc model_data_batch_rows(const model_data_t *d, uint64_t step, uint32_t first,
                               uint32_t count, uint8_t *tokens, uint64_t *sample_ids,
                               uint64_t *epochs)
{
    if (first > d->batch || count > d->batch - first)
        return semoe_err(SEMOE_EINVAL, "data: rows [%u, %u) of a batch of %u", first,
                         first + count, d->batch);
    if (step > (UINT64_MAX - d->batch) / d->batch)
        return semoe_err(SEMOE_EINVAL, "data: step %llu: past the last sample position",
                         (unsigned long long)step);
    uint64_t n = d->samples[MODEL_DATA_TRAIN], row = d->seq_len + 1;
    for (uint32_t r = 0; r < count; r++) {
        uint64_t p = step * d->batch + first + r;
        uint64_t epoch = p / n, id = s_permute(n, d->seed, epoch, p % n);
        memcpy(tokens + (uint64_t)r * row, d->stream[MODEL_DATA_TRAIN] + id * d->seq_len, row);
        if (sample_ids)
            sample_ids[r] = id;
        if (epochs)
            epochs[r] = epoch;
    }
    return SEMOE_OK;
}

semoe_rc model_data_batch(const model_data_t *d, uint64_t step, uint32_t rank, uint32_t world,
                          uint8_t *tokens, uint64_t *sample_ids, uint64_t *epochs)
{
    if (world == 0 || rank >= world)
        return semoe_err(SEMOE_EINVAL, "data: rank %u of world %u: need rank < world", rank,
                         world);
    uint32_t first, count;
    model_data_rows(d->batch, rank, world, &first, &count);
    return model_data_batch_rows(d, step, first, count, tokens, sample_ids, epochs);
}

uint64_t model_data_heldout_batches(const model_data_t *d)
{
    uint64_t n = d->samples[MODEL_DATA_HELDOUT];
    return (n + d->batch - 1) / d->batch;
}

semoe_rc model_data_heldout_rows(const model_data_t *d, uint64_t k, uint32_t first,
                                 uint32_t count, uint8_t *tokens, uint64_t *sample_ids)
{
    uint64_t n = d->samples[MODEL_DATA_HELDOUT], row = d->seq_len + 1;
    if (n == 0)
        return semoe_err(SEMOE_EINVAL, "data: no held-out samples (data.heldout_fraction too "
                                       "small for this corpus, or 0)");
    if (first > d->batch || count > d->batch - first)
        return semoe_err(SEMOE_EINVAL, "data: rows [%u, %u) of a batch of %u", first,
                         first + count, d->batch);
    uint64_t base = (uint64_t)((unsigned __int128)(k % n) * d->batch % n); /* k * batch mod n */
    for (uint32_t r = 0; r < count; r++) {
        uint64_t id = (base + first + r) % n;
        memcpy(tokens + (uint64_t)r * row, d->stream[MODEL_DATA_HELDOUT] + id * d->seq_len, row);
        if (sample_ids)
            sample_ids[r] = id;
    }
    return SEMOE_OK;
}

semoe_rc model_data_heldout_batch(const model_data_t *d, uint64_t k, uint32_t rank,
                                  uint32_t world, uint8_t *tokens, uint64_t *sample_ids)
{
    if (world == 0 || rank >= world)
        return semoe_err(SEMOE_EINVAL, "data: rank %u of world %u: need rank < world", rank,
                         world);
    uint32_t first, count;
    model_data_rows(d->batch, rank, world, &first, &count);
    return model_data_heldout_rows(d, k, first, count, tokens, sample_ids);
}
