/* Tests the data pipeline (model/data.c) on random corpora written to a temporary directory:
 * every sample visited once per epoch, batches independent of the worker count, seeded order,
 * a document-level held-out split that is disjoint, stable and near the fraction asked for,
 * epoch boundaries, one-line errors, and (when installed) the Debian fortunes corpus. */
#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "actors/log.h"
#include "model/data.h"
#include "model/job.h"
#include "tests/harness.h"

/* ---- a random corpus on disk, and what it should load to ---------------------------------- */

typedef struct {
    char *text; /* the document's bytes as they should appear in a stream */
    size_t len;
    int file;        /* index into corpus files */
    uint32_t entry;  /* ordinal among the file's non-blank entries */
    int seen;        /* times found among the loaded documents */
} s_doc_t;

typedef struct {
    char dir[256];
    char **files; /* text files written (full paths) */
    int n_files;
    s_doc_t *docs;
    int n_docs, cap_docs;
} s_corpus_t;

static void s_add_doc(s_corpus_t *c, const char *text, size_t len, int file, uint32_t entry)
{
    if (c->n_docs == c->cap_docs) {
        c->cap_docs = c->cap_docs ? c->cap_docs * 2 : 64;
        c->docs = realloc(c->docs, (size_t)c->cap_docs * sizeof *c->docs);
    }
    s_doc_t *d = &c->docs[c->n_docs++];
    d->text = malloc(len + 1);
    memcpy(d->text, text, len);
    d->text[len] = 0;
    d->len = len;
    d->file = file;
    d->entry = entry;
    d->seen = 0;
}

/* Random text with a unique tag "{D<id>}" first; never a line that is "%" alone. Ends with '\n'
 * when nl_end. Returns the length written into buf (which must hold tag + max_body + 2). */
static size_t s_text(char *buf, int id, size_t max_body, bool nl_end)
{
    static const char alpha[] = "abcdefghijklmnopqrstuvwxyz     ETAOIN\n\n.,;'!%\t";
    size_t n = (size_t)sprintf(buf, "{D%06d}", id);
    size_t body = 1 + test_rand_below(max_body);
    for (size_t i = 0; i < body; i++) {
        char ch = alpha[test_rand_below(sizeof alpha - 1)];
        if (ch == '%' && (n == 0 || buf[n - 1] == '\n'))
            ch = 'q';
        buf[n++] = ch;
    }
    if (nl_end && buf[n - 1] != '\n')
        buf[n++] = '\n';
    if (!nl_end && buf[n - 1] == '\n')
        buf[n - 1] = 'z';
    return n;
}

static void s_write(const char *path, const void *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "cannot write %s: %s\n", path, strerror(errno));
        exit(2);
    }
    fwrite(b, 1, n, f);
    fclose(f);
}

/* Writes n_files random text files (fortune format or plain, some in subdirectories), a binary
 * file, a control-byte file, and hidden files that must all be skipped. */
static void s_corpus_make(s_corpus_t *c, int n_files, size_t max_body)
{
    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "/tmp/semoe-test-data-XXXXXX");
    if (!mkdtemp(c->dir)) {
        fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
        exit(2);
    }
    char path[512];
    for (int s = 0; s < 3; s++) {
        snprintf(path, sizeof path, "%s/sub%d", c->dir, s);
        mkdir(path, 0755);
    }
    snprintf(path, sizeof path, "%s/sub1/deeper", c->dir);
    mkdir(path, 0755);
    c->files = calloc((size_t)n_files, sizeof *c->files);
    size_t cap = 1 << 16;
    char *buf = malloc(cap), *one = malloc(max_body + 64);
    for (int f = 0; f < n_files; f++) {
        uint64_t where = test_rand_below(5);
        const char *sub = where == 0 ? "" : where == 1 ? "/sub0" : where == 2 ? "/sub1/deeper"
                                                                              : "/sub2";
        snprintf(path, sizeof path, "%s%s/f%04d%s", c->dir, sub, f, f % 3 ? ".txt" : "");
        c->files[f] = strdup(path);
        c->n_files = f + 1;
        size_t n = 0;
        if (test_rand_below(3) != 0) { /* fortune format */
            int entries = 1 + (int)test_rand_below(12);
            uint32_t entry = 0;
            if (test_rand_below(2))
                n += (size_t)sprintf(buf + n, "%%\n");
            for (int e = 0; e < entries; e++) {
                if (test_rand_below(6) == 0) /* a blank entry, skipped */
                    n += (size_t)sprintf(buf + n, "%s", test_rand_below(2) ? "%\n" : "  \n%\n");
                size_t m = s_text(one, c->n_docs, max_body, true);
                if (n + m + 16 > cap)
                    buf = realloc(buf, cap = (n + m + 16) * 2);
                memcpy(buf + n, one, m);
                n += m;
                s_add_doc(c, one, m, f, entry++);
                if (e + 1 < entries || test_rand_below(2))
                    n += (size_t)sprintf(buf + n, "%%\n");
            }
        } else {
            n = s_text(buf, c->n_docs, max_body * 4 < cap - 64 ? max_body * 4 : cap - 64,
                       test_rand_below(2));
            s_add_doc(c, buf, n, f, 0);
        }
        s_write(path, buf, n);
    }
    /* skipped: binary (NULs), control bytes, hidden file, hidden directory */
    for (size_t i = 0; i < 4096; i++)
        buf[i] = (char)test_rand_below(256);
    buf[100] = 0;
    snprintf(path, sizeof path, "%s/sub0/f0000.dat", c->dir);
    s_write(path, buf, 4096);
    for (size_t i = 0; i < 1000; i++)
        buf[i] = (char)(i % 3 ? 1 + test_rand_below(6) : 'a');
    snprintf(path, sizeof path, "%s/ctrl.bin", c->dir);
    s_write(path, buf, 1000);
    snprintf(path, sizeof path, "%s/.hidden", c->dir);
    s_write(path, "{H000001} hidden text\n", 22);
    snprintf(path, sizeof path, "%s/.git", c->dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/.git/config", c->dir);
    s_write(path, "{H000002} hidden dir\n", 21);
    free(buf);
    free(one);
}

static int s_rm(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void s_corpus_free(s_corpus_t *c)
{
    nftw(c->dir, s_rm, 16, FTW_DEPTH | FTW_PHYS);
    for (int i = 0; i < c->n_files; i++)
        free(c->files[i]);
    free(c->files);
    for (int i = 0; i < c->n_docs; i++)
        free(c->docs[i].text);
    free(c->docs);
}

/* ---- helpers ------------------------------------------------------------------------------ */

static void s_job(model_job_t *job, char **paths, uint32_t n_paths, uint32_t seq_len,
                  uint32_t batch, uint64_t seed, double frac)
{
    model_job_defaults(job);
    job->data.paths = paths;
    job->data.n_paths = n_paths;
    job->data.heldout_fraction = frac;
    job->train.seq_len = seq_len;
    job->train.global_batch = batch;
    job->train.seed = seed;
}

static model_data_t *s_open(char **paths, uint32_t n_paths, uint32_t seq_len, uint32_t batch,
                            uint64_t seed, double frac)
{
    model_job_t job;
    s_job(&job, paths, n_paths, seq_len, batch, seed, frac);
    model_data_t *d = NULL;
    semoe_rc rc = model_data_open(&job, &d);
    CHECK(rc == SEMOE_OK && d, "open (seq_len %u, batch %u): %s", seq_len, batch,
          semoe_err_msg());
    return d;
}

static bool s_one_line(const char *msg)
{
    return msg && *msg && !strchr(msg, '\n') && !strchr(msg, '\r');
}

/* The whole global batch of step (world 1): tokens (batch, row), ids, epochs. */
static void s_global(const model_data_t *d, uint64_t step, uint32_t batch, uint8_t *tok,
                     uint64_t *ids, uint64_t *epochs)
{
    semoe_rc rc = model_data_batch(d, step, 0, 1, tok, ids, epochs);
    CHECK(rc == SEMOE_OK, "batch step %llu: %s", (unsigned long long)step, semoe_err_msg());
    (void)batch;
}

/* ---- (4) the split: every document once, right bytes, disjoint, near the fraction -------- */

static void test_split(void)
{
    s_corpus_t c;
    s_corpus_make(&c, 300, 200);
    char *paths[] = {c.dir};
    double frac = 0.1 + 0.3 * test_rand_unit();
    model_data_t *d = s_open(paths, 1, 16, 8, test_rand(), frac);
    if (!d) {
        s_corpus_free(&c);
        return;
    }
    model_data_stats_t st;
    model_data_stats(d, &st);
    CHECK(st.files == (uint64_t)c.n_files, "files %llu, wrote %d", (unsigned long long)st.files,
          c.n_files);
    CHECK(st.skipped == 2, "skipped %llu (binary and control-byte files)",
          (unsigned long long)st.skipped);
    CHECK(model_data_documents(d) == (uint64_t)c.n_docs, "documents %llu, wrote %d",
          (unsigned long long)model_data_documents(d), c.n_docs);
    uint64_t len[2];
    const uint8_t *stream[2] = {model_data_stream(d, MODEL_DATA_TRAIN, &len[0]),
                                model_data_stream(d, MODEL_DATA_HELDOUT, &len[1])};
    uint64_t at[2] = {0, 0}, ndocs[2] = {0, 0};
    const char *prev_path = NULL;
    int prev_split = 0;
    uint32_t prev_entry = 0;
    bool order_ok = true, layout_ok = true, bytes_ok = true, ids_ok = true;
    for (uint64_t i = 0; i < model_data_documents(d); i++) {
        const model_data_doc_t *doc = model_data_document(d, i);
        int s = doc->split;
        ndocs[s]++;
        /* stream order: sorted paths, then entries; training documents first */
        if (prev_path && s == prev_split) {
            int cmp = strcmp(prev_path, doc->path);
            if (cmp > 0 || (cmp == 0 && doc->entry <= prev_entry))
                order_ok = false;
        }
        if (s < prev_split)
            order_ok = false;
        prev_path = doc->path, prev_split = s, prev_entry = doc->entry;
        /* back to back, each followed by '\n' */
        if (doc->offset != at[s] || doc->offset + doc->len + 1 > len[s] ||
            stream[s][doc->offset + doc->len] != '\n')
            layout_ok = false;
        at[s] = doc->offset + doc->len + 1;
        const uint8_t *b = stream[s] + doc->offset;
        int id = -1;
        if (doc->len >= 9 && b[0] == '{' && b[1] == 'D')
            id = atoi((const char *)b + 2);
        if (id < 0 || id >= c.n_docs) {
            ids_ok = false;
            continue;
        }
        s_doc_t *e = &c.docs[id];
        e->seen++;
        if (e->len != doc->len || memcmp(e->text, b, e->len) != 0)
            bytes_ok = false;
        char *real = realpath(c.files[e->file], NULL);
        if (!real || strcmp(real, doc->path) != 0 || doc->entry != e->entry)
            ids_ok = false;
        free(real);
        /* disjoint: the tag is nowhere in the other split */
        char tag[16];
        snprintf(tag, sizeof tag, "{D%06d}", id);
        CHECK(!memmem(stream[!s], len[!s], tag, strlen(tag)), "document %d (%s) is in both splits",
              id, s ? "held out" : "training");
    }
    CHECK(order_ok, "documents not in sorted path, entry order");
    CHECK(layout_ok, "streams are not the documents back to back with '\\n'");
    CHECK(bytes_ok, "a document's bytes differ from what was written");
    CHECK(ids_ok, "a document's path or entry index is not the file and entry written");
    CHECK(at[0] == len[0] && at[1] == len[1], "streams hold only documents");
    int once = 0;
    for (int i = 0; i < c.n_docs; i++)
        once += c.docs[i].seen == 1;
    CHECK(once == c.n_docs, "%d of %d documents loaded exactly once", once, c.n_docs);
    for (int s = 0; s < 2; s++)
        CHECK(!memmem(stream[s], len[s], "{H", 2), "a hidden file was read");
    CHECK(st.split[1].documents == ndocs[1] && st.split[0].documents == ndocs[0], "stats docs");
    double got = (double)ndocs[1] / (double)c.n_docs;
    double var = frac * (1 - frac) / c.n_docs, dev = got - frac; /* within 5 sd */
    CHECK(dev * dev < 25 * var, "held out %.3f of %d documents, asked %.3f", got,
          c.n_docs, frac);
    /* samples: seq_len + 1 bytes at offset k * seq_len */
    for (int s = 0; s < 2; s++) {
        uint64_t n = model_data_samples(d, (model_data_split_t)s);
        CHECK(n == (len[s] > 16 ? (len[s] - 1) / 16 : 0), "samples %llu of %llu bytes",
              (unsigned long long)n, (unsigned long long)len[s]);
        CHECK(n == 0 || model_data_sample(d, (model_data_split_t)s, n - 1) ==
                            stream[s] + (n - 1) * 16, "last sample's offset");
        CHECK(model_data_sample(d, (model_data_split_t)s, n) == NULL, "sample out of range");
    }
    char line[512];
    model_data_summary(d, line, sizeof line);
    printf("%s\n", line);
    model_data_destroy(&d);
    CHECK(d == NULL, "destroy nulls");
    model_data_destroy(&d);
    model_data_destroy(NULL);
    s_corpus_free(&c);
}

/* ---- (1) each epoch visits every sample once, (6) across epoch boundaries ----------------- */

static void test_epochs(void)
{
    for (int round = 0; round < 8; round++) {
        s_corpus_t c;
        s_corpus_make(&c, 20 + (int)test_rand_below(60), 300);
        char *paths[] = {c.dir};
        uint32_t seq_len = 1 + (uint32_t)test_rand_below(round < 2 ? 4 : 300);
        uint32_t batch = 1 + (uint32_t)test_rand_below(round % 2 ? 7 : 100);
        uint32_t world = 1 + (uint32_t)test_rand_below(7);
        model_data_t *d = s_open(paths, 1, seq_len, batch, test_rand(), 0.1);
        if (!d) {
            s_corpus_free(&c);
            continue;
        }
        uint64_t n = model_data_samples(d, MODEL_DATA_TRAIN);
        uint32_t row = model_data_row_len(d);
        CHECK(row == seq_len + 1, "row_len");
        /* the permutation of several epochs is a bijection */
        uint8_t *hit = calloc(n, 1);
        bool perm_ok = true;
        for (uint64_t e = 0; e < 3; e++) {
            memset(hit, 0, n);
            for (uint64_t i = 0; i < n; i++) {
                uint64_t id = model_data_sample_index(d, e, i);
                if (id >= n || hit[id]++)
                    perm_ok = false;
            }
        }
        CHECK(perm_ok, "epoch order is not a permutation of %llu samples",
              (unsigned long long)n);
        /* walking steps over 2.5 epochs with `world` ranks: positions in order, epoch p / n,
         * every sample once per epoch, rows the sample's bytes */
        uint64_t total = n * 5 / 2 + 1, steps = (total + batch - 1) / batch;
        uint8_t *count = calloc(n * 3, 1);
        uint8_t *tok = malloc((size_t)batch * row);
        uint64_t *ids = malloc(batch * sizeof *ids), *eps = malloc(batch * sizeof *eps);
        bool pos_ok = true, bytes_ok = true;
        uint64_t crossings = 0;
        for (uint64_t s = 0; s < steps; s++) {
            uint64_t prev_epoch = UINT64_MAX;
            for (uint32_t r = 0; r < world; r++) {
                uint32_t first, cnt;
                model_data_rows(batch, r, world, &first, &cnt);
                semoe_rc rc = model_data_batch(d, s, r, world, tok, ids, eps);
                CHECK(rc == SEMOE_OK, "batch: %s", semoe_err_msg());
                for (uint32_t j = 0; j < cnt; j++) {
                    uint64_t p = s * batch + first + j;
                    if (eps[j] != p / n || ids[j] != model_data_sample_index(d, p / n, p % n))
                        pos_ok = false;
                    if (memcmp(tok + (size_t)j * row, model_data_sample(d, MODEL_DATA_TRAIN,
                                                                        ids[j]), row) != 0)
                        bytes_ok = false;
                    if (p < n * 3 && eps[j] < 3)
                        count[eps[j] * n + ids[j]]++;
                    if (prev_epoch != UINT64_MAX && eps[j] != prev_epoch)
                        crossings++;
                    prev_epoch = eps[j];
                }
            }
        }
        CHECK(pos_ok, "rows are not positions step * batch + j of the epoch order");
        CHECK(bytes_ok, "a row is not its sample's bytes");
        uint64_t full = (steps * batch) / n; /* whole epochs walked */
        bool once = true;
        for (uint64_t e = 0; e < full && e < 3; e++)
            for (uint64_t i = 0; i < n; i++)
                if (count[e * n + i] != 1)
                    once = false;
        CHECK(full >= 2 && once, "epochs 0..%llu do not visit each of %llu samples once",
              (unsigned long long)full, (unsigned long long)n);
        CHECK(n % batch == 0 || batch == 1 || crossings > 0 || n < 2,
              "no batch crossed an epoch boundary (n %llu, batch %u)", (unsigned long long)n,
              batch);
        /* a batch that straddles a boundary explicitly: the step holding position n */
        uint64_t s = n / batch;
        s_global(d, s, batch, tok, ids, eps);
        for (uint32_t j = 0; j < batch; j++) {
            uint64_t p = s * batch + j;
            CHECK(eps[j] == p / n && ids[j] == model_data_sample_index(d, p / n, p % n),
                  "boundary row %u: epoch %llu id %llu", j, (unsigned long long)eps[j],
                  (unsigned long long)ids[j]);
        }
        /* different epochs, different orders (when there is more than a handful of samples) */
        if (n >= 8) {
            bool differ = false;
            for (uint64_t i = 0; i < n && !differ; i++)
                differ = model_data_sample_index(d, 0, i) != model_data_sample_index(d, 1, i);
            CHECK(differ, "epochs 0 and 1 have the same order");
        }
        free(hit);
        free(count);
        free(tok);
        free(ids);
        free(eps);
        model_data_destroy(&d);
        s_corpus_free(&c);
    }
}

/* ---- (2) the union over ranks is the world-1 batch; (3) seeds ----------------------------- */

static void test_ranks_and_seeds(void)
{
    s_corpus_t c;
    s_corpus_make(&c, 60, 300);
    char *paths[] = {c.dir};
    for (int round = 0; round < 6; round++) {
        uint32_t seq_len = 1 + (uint32_t)test_rand_below(200);
        uint32_t batch = 1 + (uint32_t)test_rand_below(round % 2 ? 13 : 64);
        uint64_t seed = test_rand();
        model_data_t *d = s_open(paths, 1, seq_len, batch, seed, 0.2);
        if (!d)
            continue;
        uint32_t row = model_data_row_len(d);
        size_t bytes = (size_t)batch * row;
        uint8_t *want = malloc(bytes), *got = malloc(bytes);
        uint64_t *wid = malloc(batch * sizeof *wid), *gid = malloc(batch * sizeof *gid);
        uint64_t steps[] = {0, 1, 2, test_rand_below(1000), test_rand_below(1ull << 40)};
        for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
            s_global(d, steps[k], batch, want, wid, NULL);
            for (uint32_t world = 1; world <= 7; world++) {
                memset(got, 0xA5, bytes);
                uint32_t covered = 0;
                for (uint32_t r = 0; r < world; r++) {
                    uint32_t first, cnt;
                    model_data_rows(batch, r, world, &first, &cnt);
                    CHECK(first == covered, "rank %u of %u starts at %u, not %u", r, world,
                          first, covered);
                    covered += cnt;
                    semoe_rc rc = model_data_batch(d, steps[k], r, world,
                                                   got + (size_t)first * row, gid + first, NULL);
                    CHECK(rc == SEMOE_OK, "rank %u of %u: %s", r, world, semoe_err_msg());
                }
                CHECK(covered == batch, "ranks of %u cover %u of %u rows", world, covered, batch);
                CHECK(memcmp(got, want, bytes) == 0 && memcmp(gid, wid, batch * sizeof *gid) == 0,
                      "step %llu, world %u (batch %u): ranks' rows differ from the world-1 batch",
                      (unsigned long long)steps[k], world, batch);
            }
        }
        /* the same seed again: the same batches; another seed: another order */
        model_data_t *same = s_open(paths, 1, seq_len, batch, seed, 0.2);
        if (same) {
            for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
                s_global(d, steps[k], batch, want, NULL, NULL);
                s_global(same, steps[k], batch, got, NULL, NULL);
                CHECK(memcmp(got, want, bytes) == 0, "same seed, step %llu differs",
                      (unsigned long long)steps[k]);
            }
            model_data_destroy(&same);
        }
        model_data_destroy(&d);
        free(want), free(got), free(wid), free(gid);
        /* held-out 0 so both seeds have the same samples, and only the order can differ */
        model_data_t *a = s_open(paths, 1, seq_len, batch, seed, 0);
        model_data_t *b = s_open(paths, 1, seq_len, batch, seed + 1, 0);
        if (a && b) {
            uint64_t n = model_data_samples(a, MODEL_DATA_TRAIN);
            CHECK(n == model_data_samples(b, MODEL_DATA_TRAIN), "same corpus, same samples");
            uint64_t diff = 0;
            for (uint64_t i = 0; i < n; i++)
                diff += model_data_sample_index(a, 0, i) != model_data_sample_index(b, 0, i);
            CHECK((n < 8 || diff > 0) && (n < 64 || diff > n / 2), "seeds %llu and %llu: orders differ at only %llu of %llu",
                  (unsigned long long)seed, (unsigned long long)seed + 1,
                  (unsigned long long)diff, (unsigned long long)n);
        }
        model_data_destroy(&a);
        model_data_destroy(&b);
    }
    s_corpus_free(&c);
}

/* ---- held-out evaluation batches ---------------------------------------------------------- */

static void test_heldout_batches(void)
{
    s_corpus_t c;
    s_corpus_make(&c, 80, 300);
    char *paths[] = {c.dir};
    uint32_t batch = 1 + (uint32_t)test_rand_below(20), seq_len = 8 + (uint32_t)test_rand_below(50);
    model_data_t *d = s_open(paths, 1, seq_len, batch, test_rand(), 0.3);
    if (d) {
        uint64_t n = model_data_samples(d, MODEL_DATA_HELDOUT), nb = model_data_heldout_batches(d);
        uint32_t row = model_data_row_len(d);
        CHECK(n > 0 && nb == (n + batch - 1) / batch, "held-out batches %llu for %llu samples",
              (unsigned long long)nb, (unsigned long long)n);
        uint8_t *seen = calloc(n ? n : 1, 1), *tok = malloc((size_t)batch * row);
        uint64_t *ids = malloc(batch * sizeof *ids);
        bool ok = true;
        for (uint64_t k = 0; k < nb; k++)
            for (uint32_t world = 1; world <= 4; world++)
                for (uint32_t r = 0; r < world; r++) {
                    uint32_t first, cnt;
                    model_data_rows(batch, r, world, &first, &cnt);
                    if (model_data_heldout_batch(d, k, r, world, tok, ids) != SEMOE_OK) {
                        ok = false;
                        continue;
                    }
                    for (uint32_t j = 0; j < cnt; j++) {
                        uint64_t want = (k * batch + first + j) % n;
                        if (ids[j] != want ||
                            memcmp(tok + (size_t)j * row,
                                   model_data_sample(d, MODEL_DATA_HELDOUT, want), row) != 0)
                            ok = false;
                        if (world == 1)
                            seen[want] = 1;
                    }
                }
        CHECK(ok, "held-out batches are not samples k * batch + j in order");
        uint64_t all = 0;
        for (uint64_t i = 0; i < n; i++)
            all += seen[i];
        CHECK(all == n, "held-out batches cover %llu of %llu samples", (unsigned long long)all,
              (unsigned long long)n);
        free(seen), free(tok), free(ids);
        model_data_destroy(&d);
    }
    /* no held-out fraction: evaluation batches refuse with a message */
    d = s_open(paths, 1, 8, 4, 1, 0);
    if (d) {
        uint8_t tok[64];
        CHECK(model_data_samples(d, MODEL_DATA_HELDOUT) == 0 && model_data_heldout_batches(d) == 0,
              "fraction 0 holds nothing out");
        semoe_rc rc = model_data_heldout_batch(d, 0, 0, 1, tok, NULL);
        CHECK(rc == SEMOE_EINVAL && s_one_line(semoe_err_msg()), "no held-out: %s",
              semoe_err_msg());
        rc = model_data_batch(d, 0, 3, 3, tok, NULL, NULL);
        CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), "rank 3"), "rank >= world: %s",
              semoe_err_msg());
        model_data_destroy(&d);
    }
    s_corpus_free(&c);
}

/* ---- (5) the split does not depend on how the paths are given ----------------------------- */

static bool s_same(const model_data_t *a, const model_data_t *b)
{
    if (!a || !b || model_data_documents(a) != model_data_documents(b))
        return false;
    for (int s = 0; s < 2; s++) {
        uint64_t la, lb;
        const uint8_t *sa = model_data_stream(a, (model_data_split_t)s, &la);
        const uint8_t *sb = model_data_stream(b, (model_data_split_t)s, &lb);
        if (la != lb || memcmp(sa, sb, la) != 0)
            return false;
    }
    return true;
}

static void test_stable(void)
{
    s_corpus_t c;
    s_corpus_make(&c, 120, 200);
    uint64_t seed = test_rand();
    char *dir[] = {c.dir};
    model_data_t *ref = s_open(dir, 1, 16, 4, seed, 0.25);
    /* the files, shuffled, with some given twice */
    int n = c.n_files;
    char **shuf = malloc((size_t)(n + 3) * sizeof *shuf);
    for (int i = 0; i < n; i++)
        shuf[i] = c.files[i];
    for (int i = n - 1; i > 0; i--) {
        int j = (int)test_rand_below((uint64_t)i + 1);
        char *t = shuf[i];
        shuf[i] = shuf[j], shuf[j] = t;
    }
    shuf[n] = c.files[0];
    shuf[n + 1] = c.files[n - 1];
    shuf[n + 2] = c.files[0];
    model_data_t *files = s_open(shuf, (uint32_t)n + 3, 16, 4, seed, 0.25);
    CHECK(s_same(ref, files), "the shuffled file list loads differently from the directory");
    /* subdirectories and top-level files separately, in reverse order, plus the directory */
    char sub[3][512];
    char *mixed[200];
    uint32_t m = 0;
    for (int s = 2; s >= 0; s--) {
        snprintf(sub[s], sizeof sub[s], "%s/sub%d", c.dir, s);
        mixed[m++] = sub[s];
    }
    for (int i = n - 1; i >= 0 && m < 190; i--)
        if (!strstr(c.files[i] + strlen(c.dir), "/sub"))
            mixed[m++] = c.files[i];
    model_data_t *parts = s_open(mixed, m, 16, 4, seed, 0.25);
    CHECK(s_same(ref, parts), "subdirectories and files load differently from the directory");
    mixed[m++] = c.dir;
    model_data_t *dup = s_open(mixed, m, 16, 4, seed, 0.25);
    CHECK(s_same(ref, dup), "a directory given with its own files loads them twice");
    /* a relative spelling of the directory */
    char cwd[4096];
    if (getcwd(cwd, sizeof cwd) && chdir("/tmp") == 0) {
        char relp[512];
        snprintf(relp, sizeof relp, ".%s/./sub0/..", c.dir + strlen("/tmp"));
        char *relv[] = {relp};
        model_data_t *r = s_open(relv, 1, 16, 4, seed, 0.25);
        CHECK(s_same(ref, r), "a relative path loads differently");
        model_data_destroy(&r);
        CHECK(chdir(cwd) == 0, "chdir back");
    }
    model_data_destroy(&ref);
    model_data_destroy(&files);
    model_data_destroy(&parts);
    model_data_destroy(&dup);
    free(shuf);
    s_corpus_free(&c);
}

/* ---- tiny corpora: one sample, batches larger than the corpus ----------------------------- */

static void test_tiny(void)
{
    char dir[] = "/tmp/semoe-test-data-XXXXXX";
    if (!mkdtemp(dir))
        return;
    char path[512];
    snprintf(path, sizeof path, "%s/one.txt", dir);
    s_write(path, "abcdefgh", 8); /* + '\n': 9 bytes, one sample of seq_len 8 */
    char *paths[] = {path};
    model_data_t *d = s_open(paths, 1, 8, 5, 7, 0);
    if (d) {
        CHECK(model_data_samples(d, MODEL_DATA_TRAIN) == 1, "one sample");
        uint8_t tok[5 * 9];
        uint64_t ids[5], eps[5];
        CHECK(model_data_batch(d, 3, 0, 1, tok, ids, eps) == SEMOE_OK, "%s", semoe_err_msg());
        for (int j = 0; j < 5; j++)
            CHECK(ids[j] == 0 && eps[j] == 15 + (uint64_t)j &&
                      memcmp(tok + j * 9, "abcdefgh\n", 9) == 0,
                  "row %d of a batch over five epochs", j);
        CHECK(model_data_batch(d, UINT64_MAX / 2, 0, 1, tok, NULL, NULL) == SEMOE_EINVAL,
              "a step past 2^64 positions is refused");
        model_data_destroy(&d);
    }
    /* a few samples and a batch that spans several epochs, every epoch a permutation */
    snprintf(path, sizeof path, "%s/few.txt", dir);
    s_write(path, "0123456789abcdefghijklmnopqrstuvwxyz", 36); /* 37 bytes, seq_len 4: 9 */
    d = s_open(paths, 1, 4, 23, 99, 0);
    if (d) {
        uint64_t n = model_data_samples(d, MODEL_DATA_TRAIN);
        CHECK(n == 9, "samples %llu", (unsigned long long)n);
        uint8_t tok[23 * 5];
        uint64_t ids[23], eps[23];
        uint32_t seen[8][9] = {{0}};
        for (uint64_t s = 0; s < 3; s++) {
            CHECK(model_data_batch(d, s, 0, 1, tok, ids, eps) == SEMOE_OK, "%s", semoe_err_msg());
            for (int j = 0; j < 23; j++)
                if (eps[j] < 8 && ids[j] < 9)
                    seen[eps[j]][ids[j]]++;
        }
        bool once = true; /* 69 positions: epochs 0..6 whole */
        for (int e = 0; e < 7; e++)
            for (int i = 0; i < 9; i++)
                once = once && seen[e][i] == 1;
        CHECK(once, "each of 7 epochs visits each sample once");
        model_data_destroy(&d);
    }
    /* text that fortunes do hold is text: overstrike backspaces, escapes; CRLF separators */
    snprintf(path, sizeof path, "%s/ov.txt", dir);
    static const char ov[] = "_\bU_\bn_\bd_\be_\br \x1b[1mbold\x1b[0m\r\n%\r\nsecond entry\r\n";
    s_write(path, ov, sizeof ov - 1);
    d = s_open(paths, 1, 4, 2, 5, 0);
    if (d) {
        CHECK(model_data_documents(d) == 2, "CRLF fortune file: %llu documents, want 2",
              (unsigned long long)model_data_documents(d));
        const model_data_doc_t *second = model_data_document(d, 1);
        uint64_t len;
        const uint8_t *b = model_data_stream(d, MODEL_DATA_TRAIN, &len);
        CHECK(second && second->entry == 1 && second->len == 14 &&
                  memcmp(b + second->offset, "second entry\r\n", 14) == 0,
              "second CRLF entry");
        model_data_destroy(&d);
    }
    nftw(dir, s_rm, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- (7) errors: one line, naming the path ------------------------------------------------ */

static void s_expect_error(char **paths, uint32_t n, uint32_t seq_len, const char *name,
                           const char *what)
{
    model_job_t job;
    s_job(&job, paths, n, seq_len, 4, 1, 0.1);
    model_data_t *d = NULL;
    semoe_rc rc = model_data_open(&job, &d);
    const char *msg = semoe_err_msg();
    CHECK(rc == SEMOE_EINVAL && d == NULL, "%s: rc %d", what, rc);
    CHECK(s_one_line(msg) && strstr(msg, name), "%s: message '%s' does not name %s", what, msg,
          name);
    printf("  %s: %s\n", what, msg);
    model_data_destroy(&d);
}

static void test_errors(void)
{
    char dir[] = "/tmp/semoe-test-data-XXXXXX";
    if (!mkdtemp(dir))
        return;
    char missing[512], empty[512], bin[512], small[512], binf[1024], blank[1024];
    snprintf(missing, sizeof missing, "%s/no-such-file", dir);
    char *p1[] = {missing};
    s_expect_error(p1, 1, 8, missing, "missing path");
    snprintf(empty, sizeof empty, "%s/empty", dir);
    mkdir(empty, 0755);
    char *p2[] = {empty};
    s_expect_error(p2, 1, 8, empty, "empty directory");
    snprintf(bin, sizeof bin, "%s/bin", dir);
    mkdir(bin, 0755);
    snprintf(binf, sizeof binf, "%s/x.dat", bin);
    s_write(binf, "\0\1\2\3abc\0\0", 10);
    snprintf(blank, sizeof blank, "%s/blank", bin);
    s_write(blank, "%\n  \n%\n\n", 8);
    char *p3[] = {bin};
    s_expect_error(p3, 1, 8, bin, "directory of binary and blank files");
    snprintf(small, sizeof small, "%s/small.txt", dir);
    s_write(small, "short\n", 6);
    char *p4[] = {small};
    s_expect_error(p4, 1, 64, small, "corpus smaller than one sample");
    char *p5[] = {small, missing};
    s_expect_error(p5, 2, 8, missing, "second path missing");
    s_expect_error(p5, 0, 8, "data.paths", "no paths");
    nftw(dir, s_rm, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- the real corpus ---------------------------------------------------------------------- */

static void test_fortunes(void)
{
    const char *dir = "/usr/share/games/fortunes";
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        printf("fortunes: %s not installed, skipped\n", dir);
        return;
    }
    char *paths[] = {(char *)dir};
    log_init("test_data", LOG_INFO); /* shows the skipped .dat index files */
    model_data_t *d = s_open(paths, 1, 128, 32, 1234, 0.05);
    if (!d)
        return;
    char line[512];
    model_data_summary(d, line, sizeof line);
    printf("fortunes: %s\n", line);
    model_data_stats_t s;
    model_data_stats(d, &s);
    CHECK(s.files > 0 && s.split[0].samples > 100, "fortunes: too little text");
    uint64_t docs = s.split[0].documents + s.split[1].documents;
    double got = (double)s.split[1].documents / (double)docs;
    CHECK(docs > 1000 && got > 0.04 && got < 0.06, "fortunes: held out %.3f of %llu documents",
          got, (unsigned long long)docs);
    for (int sp = 0; sp < 2; sp++) {
        uint64_t len;
        const uint8_t *b = model_data_stream(d, (model_data_split_t)sp, &len);
        CHECK(!memchr(b, 0, len), "fortunes: a NUL byte in the text (a .dat file was read?)");
    }
    uint8_t *tok = malloc(32 * 129);
    CHECK(model_data_batch(d, 0, 0, 1, tok, NULL, NULL) == SEMOE_OK, "fortunes batch");
    free(tok);
    model_data_destroy(&d);
}

/* The split is by content: copies of one text, in several files and places, all land on the
 * same side, so held-out text never appears in training. */
static void test_duplicates(void)
{
    char dir[] = "/tmp/semoe-test-data-XXXXXX";
    if (!mkdtemp(dir))
        return;
    enum { FILES = 4, TEXTS = 40 };
    char *paths[FILES], text[64];
    char body[FILES * TEXTS * 80];
    for (int f = 0; f < FILES; f++) {
        size_t n = 0;
        for (int t = 0; t < TEXTS; t++) { /* every text in every file, in a file's own order */
            int id = (t * (2 * f + 1) + f) % TEXTS;
            n += (size_t)snprintf(body + n, sizeof body - n, "text %d\n%%\n", id);
        }
        paths[f] = malloc(512);
        snprintf(paths[f], 512, "%s/copy%d", dir, f);
        s_write(paths[f], body, n);
    }
    model_data_t *d = s_open(paths, FILES, 4, 2, test_rand(), 0.5);
    if (d) {
        int side[TEXTS];
        for (int t = 0; t < TEXTS; t++)
            side[t] = -1;
        bool same = true;
        uint64_t n_docs = model_data_documents(d);
        for (uint64_t i = 0; i < n_docs; i++) {
            const model_data_doc_t *doc = model_data_document(d, i);
            const uint8_t *stream = model_data_stream(d, doc->split, NULL);
            int id = -1;
            snprintf(text, sizeof text, "%.*s", (int)(doc->len < 63 ? doc->len : 63),
                     (const char *)stream + doc->offset);
            if (sscanf(text, "text %d", &id) != 1 || id < 0 || id >= TEXTS)
                continue;
            if (side[id] < 0)
                side[id] = (int)doc->split;
            same &= side[id] == (int)doc->split;
        }
        CHECK(n_docs == FILES * TEXTS, "documents %llu", (unsigned long long)n_docs);
        CHECK(same, "copies of one text landed in both splits");
        model_data_destroy(&d);
    }
    for (int f = 0; f < FILES; f++) {
        unlink(paths[f]);
        free(paths[f]);
    }
    rmdir(dir);
}

int main(void)
{
    test_init("test_data");
    log_init("test_data", LOG_WARN); /* the random corpora's skipped files are expected */
    test_split();
    test_epochs();
    test_ranks_and_seeds();
    test_heldout_batches();
    test_stable();
    test_duplicates();
    test_tiny();
    test_errors();
    test_fortunes();
    return test_finish();
}
