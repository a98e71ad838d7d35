/* The training tests' shared parts (train_util.h): the seeded corpus and job spec, workers with
 * a metrics log, the log's lines read back, and checkpoint weights compared per tensor. */
#include "tests/train_util.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "model/safetensors.h"
#include "tests/harness.h"
#include "tests/status_client.h"

const char *const train_util_split_keys[TRAIN_UTIL_NSPLIT] = {
    "t_gemm", "t_attention", "t_routing", "t_elementwise",
    "t_memory", "t_optimizer", "t_exchange", "t_allreduce"};

/* --- files ---------------------------------------------------------------------------------- */

bool train_util_write_corpus(const char *path)
{
    static const char *words[] = {
        "the", "of", "and", "to", "a", "in", "is", "it", "you", "that", "he", "was", "for", "on",
        "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or",
        "had", "by", "hot", "word", "but", "what", "some", "we", "can", "out", "other", "were",
        "all", "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which",
        "do", "their", "time", "if", "will", "way", "about", "many", "then", "them", "write",
        "would", "like", "so", "these", "her", "long", "make", "thing", "see", "him", "two",
        "has", "look", "more", "day", "could", "go", "come", "did", "number", "sound", "no",
        "most", "people", "my", "over", "know", "water", "than", "call", "first", "who", "may",
        "down", "side", "been", "now", "find", "river", "mountain", "garden", "letter", "music"};
    const size_t nw = sizeof words / sizeof words[0];
    size_t cap = 256 * 1024, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return false;
    while (len < 200 * 1024) {
        int sentences = 1 + (int)test_rand_below(5);
        for (int s = 0; s < sentences; s++) {
            int n = 3 + (int)test_rand_below(12);
            for (int i = 0; i < n; i++) {
                /* min of two draws: the common words come up more often, as in English */
                size_t a = test_rand_below(nw), b = test_rand_below(nw);
                const char *w = words[a < b ? a : b];
                len += (size_t)snprintf(buf + len, cap - len, "%s%c%s", i ? " " : "",
                                        i ? w[0] : w[0] - 'a' + 'A', w + 1);
            }
            len += (size_t)snprintf(buf + len, cap - len, "%s", test_rand_below(4) ? ". " : "?\n");
        }
        len += (size_t)snprintf(buf + len, cap - len, "\n%%\n");
    }
    bool ok = proc_write_file(path, buf);
    free(buf);
    return ok;
}

bool train_util_write_job(const char *path, const train_util_job_t *job)
{
    char elastic[192] = "", *e = elastic;
    if (job->min_replicas > 0)
        e += snprintf(e, 48, ", \"min_replicas\": %d", job->min_replicas);
    if (job->threshold > 0)
        e += snprintf(e, 48, ", \"threshold\": %g", job->threshold);
    if (job->window > 0)
        e += snprintf(e, 48, ", \"window\": %d", job->window);
    if (job->patience > 0)
        e += snprintf(e, 48, ", \"patience\": %d", job->patience);
    /* the router knobs: a bias of one %.17g per expert, the aux term off, a frozen gate */
    char router[TRAIN_UTIL_EXPERTS * 32 + 192] = "", *r = router;
    if (job->router_bias) {
        r += snprintf(r, 32, ",\n    \"router_bias\": [");
        for (int i = 0; i < TRAIN_UTIL_EXPERTS; i++)
            r += snprintf(r, 32, "%s%.17g", i ? ", " : "", job->router_bias[i]);
        r += snprintf(r, 8, "]");
    }
    if (job->freeze_router)
        r += snprintf(r, 32, ", \"freeze_router\": true");
    if (job->collectives)
        r += snprintf(r, 48, ", \"collectives\": \"%.12s\"", job->collectives);
    if (job->bf16)
        r += snprintf(r, 48, ", \"precision\": \"bf16\"");
    if (job->a2a_chunks > 0)
        r += snprintf(r, 48, ", \"a2a_chunks\": %d", job->a2a_chunks);
    char text[4 * PATH_MAX];
    int len = snprintf(text, sizeof text,
             "{\n"
             "  \"model\": {\"vocab_size\": %d, \"hidden_size\": %d, \"intermediate_size\": %d,\n"
             "    \"num_hidden_layers\": %d, %s,\n"
             "    \"num_local_experts\": %d, \"num_experts_per_tok\": %d,\n"
             "    \"max_position_embeddings\": 64%s},\n"
             "  \"train\": {\"seq_len\": %d, \"global_batch\": %d, \"micro_batch\": %d,\n"
             "    \"lr\": 1e-3, \"min_lr\": 1e-4, \"warmup_steps\": 2, \"steps\": %d,\n"
             "    \"seed\": %" PRIu64 ", \"checkpoint_dir\": \"%s\", \"checkpoint_interval\": %d,\n"
             "    \"eval_interval\": %d%s},\n"
             "  \"data\": {\"paths\": [\"%s\"], \"heldout_fraction\": 0.1},\n"
             "  \"cluster\": {\"heartbeat_ms\": %d, \"liveness\": %d, \"expected_workers\": %d},\n"
             "  \"elastic\": {%s}\n"
             "}\n",
             TRAIN_UTIL_VOCAB, TRAIN_UTIL_HIDDEN, TRAIN_UTIL_FFN, TRAIN_UTIL_LAYERS,
             job->bf16 ? "\"num_attention_heads\": 2, \"num_key_value_heads\": 1, "
                         "\"head_dim\": 64"
                       : "\"num_attention_heads\": 4, \"num_key_value_heads\": 2",
             TRAIN_UTIL_EXPERTS, job->top_k > 0 ? job->top_k : TRAIN_UTIL_TOPK,
             job->no_aux ? ", \"router_aux_loss_coef\": 0" : "", TRAIN_UTIL_SEQ,
             TRAIN_UTIL_BATCH, TRAIN_UTIL_BATCH, job->steps, job->seed, job->checkpoint_dir,
             job->checkpoint_interval, job->eval_interval, router, job->corpus,
             job->heartbeat_ms > 0 ? job->heartbeat_ms : 200,
             job->liveness > 0 ? job->liveness : 5, job->expected_workers,
             elastic[0] ? elastic + 2 : "");
    return len > 0 && (size_t)len < sizeof text && proc_write_file(path, text);
}

char *train_util_join(char *buf, size_t n, const char *dir, const char *name)
{
    if ((size_t)snprintf(buf, n, "%s/%s", dir, name) >= n) {
        fprintf(stderr, "path too long: %s/%s\n", dir, name);
        exit(2);
    }
    return buf;
}

char *train_util_step_dir(char *buf, const char *root, int step)
{
    char name[32];
    snprintf(name, sizeof name, "step-%08d", step);
    return train_util_join(buf, PATH_MAX, root, name);
}

bool train_util_output_has(const proc_t *p, const char *needle)
{
    bool found = false;
    const char *paths[2] = {proc_out_path(p), proc_err_path(p)};
    for (int i = 0; i < 2 && !found; i++) {
        char *text = proc_read_file(paths[i], NULL);
        found = text && strstr(text, needle);
        free(text);
    }
    return found;
}

/* --- workers and their metrics logs --------------------------------------------------------- */

bool train_util_start_worker(train_util_worker_t *w, const char *prefix, int i,
                             const proc_ports_t *pp)
{
    return train_util_start_worker_on(w, prefix, i, pp, "cpu");
}

bool train_util_start_worker_on(train_util_worker_t *w, const char *prefix, int i,
                                const proc_ports_t *pp, const char *device)
{
    char file[96];
    snprintf(w->id, sizeof w->id, "%s-w%d-%05x", prefix, i, (unsigned)test_rand_below(1u << 20));
    snprintf(file, sizeof file, "%s.metrics.jsonl", w->id);
    proc_tmp_path(w->log, sizeof w->log, file);
    const char *argv[] = {"--coordinator", pp->control_ep, "--id", w->id, "--device", device,
                          "--data-bind", "tcp://127.0.0.1:*", "--threads", "1",
                          "--metrics-log", w->log};
    w->proc = proc_startv(w->id, PROC_WORKER, (int)(sizeof argv / sizeof argv[0]), argv);
    CHECK(w->proc != NULL, "cannot start worker %s", w->id);
    return w->proc != NULL;
}

/* The number after "key": in a line, as printed, into out; false when absent. */
static bool s_raw_num(const char *line, const char *key, char *out, size_t n)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(line, pat);
    if (!p)
        return false;
    p += strlen(pat);
    size_t k = strcspn(p, ",}");
    if (k == 0 || k >= n)
        return false;
    memcpy(out, p, k);
    out[k] = 0;
    return true;
}

static bool s_u64_array(const cJSON *obj, const char *key, long long *out)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != TRAIN_UTIL_LE)
        return false;
    int i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, a)
    {
        if (!cJSON_IsNumber(v) || v->valuedouble < 0)
            return false;
        out[i++] = (long long)v->valuedouble;
    }
    return true;
}

/* The "samples" array of j into l (n_samples -1 when there is none); false when it is not an
 * array of at most TRAIN_UTIL_BATCH ids. */
static bool s_samples(const cJSON *j, train_util_line_t *l)
{
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(j, "samples");
    l->n_samples = -1;
    if (!a)
        return true;
    if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) > TRAIN_UTIL_BATCH)
        return false;
    l->n_samples = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, a)
    {
        if (!cJSON_IsNumber(v) || v->valuedouble < 0)
            return false;
        l->samples[l->n_samples++] = (uint64_t)v->valuedouble;
    }
    return true;
}

/* A number field of j, or NaN. */
static double s_num(const cJSON *j, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* One line of worker id's log into *l: false unless it is a whole metrics line of that worker
 * (step, loss, grad_norm, load and routed there; eval_loss a number if there). */
static bool s_parse(const char *text, const char *id, train_util_line_t *l)
{
    memset(l, 0, sizeof *l);
    l->evalv = NAN;
    cJSON *j = cJSON_Parse(text);
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "step");
    const cJSON *lo = cJSON_GetObjectItemCaseSensitive(j, "loss");
    const cJSON *ev = cJSON_GetObjectItemCaseSensitive(j, "eval_loss");
    const cJSON *gn = cJSON_GetObjectItemCaseSensitive(j, "grad_norm");
    const char *wid = test_status_str(j, "worker");
    bool ok = j && wid && strcmp(wid, id) == 0 && cJSON_IsNumber(st) && cJSON_IsNumber(lo) &&
              cJSON_IsNumber(gn) && s_raw_num(text, "loss", l->loss, sizeof l->loss) &&
              s_raw_num(text, "grad_norm", l->gnorm, sizeof l->gnorm);
    if (ok && ev) {
        ok = cJSON_IsNumber(ev) && s_raw_num(text, "eval_loss", l->eval, sizeof l->eval);
        l->evalv = ok ? ev->valuedouble : NAN;
    }
    if (ok) {
        l->step = (uint64_t)st->valuedouble;
        l->lossv = lo->valuedouble;
        l->gnormv = gn->valuedouble;
        l->rank = test_status_num(j, "rank");
        l->world = test_status_num(j, "world");
        l->generation = (uint64_t)test_status_num(j, "generation");
        l->time = s_num(j, "time");
        l->rows_out = (uint64_t)test_status_num(j, "dispatch_rows_out");
        l->bytes_out = (uint64_t)test_status_num(j, "dispatch_bytes_out");
        l->step_time = s_num(j, "step_time_s");
        l->gemm_flops = s_num(j, "gemm_flops");
        l->tokens = s_num(j, "tokens");
        for (int k = 0; k < TRAIN_UTIL_NSPLIT; k++) {
            double v = s_num(j, train_util_split_keys[k]);
            l->split[k] = v >= 0 ? v : NAN;
        }
        ok = s_u64_array(j, "load", l->load) && s_u64_array(j, "routed", l->routed) &&
             s_samples(j, l);
    }
    cJSON_Delete(j);
    return ok;
}

bool train_util_read_log(train_util_worker_t *w, const char *run)
{
    train_util_free_log(w);
    char *text = proc_read_file(w->log, NULL);
    CHECK(text != NULL, "%s: %s: cannot read its metrics log %s", run, w->id, w->log);
    if (!text)
        return false;
    size_t cap = 1;
    for (const char *p = text; *p; p++)
        cap += *p == '\n';
    w->line = semoe_xcalloc(cap, sizeof *w->line);
    /* a last line without its newline is one a kill -9 cut short (the kernel stops a write at
     * a page boundary once the signal is pending): not a line the worker finished */
    char *cut = strrchr(text, '\n');
    cut = cut ? cut + 1 : text;
    if (*cut) {
        fprintf(stderr, "  %s: %s: its last line was cut short (%zu bytes): dropped\n", run, w->id,
                strlen(cut));
        *cut = '\0';
    }
    bool ok = true;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line && ok;
         line = strtok_r(NULL, "\n", &save)) {
        ok = s_parse(line, w->id, &w->line[w->n]);
        CHECK(ok, "%s: %s: line %d of %s is not a whole metrics line of this worker: %.200s",
              run, w->id, w->n + 1, w->log, line);
        w->n += ok;
    }
    free(text);
    return ok;
}

const train_util_line_t *train_util_find_step(const train_util_worker_t *w, uint64_t step)
{
    for (int k = w->n - 1; k >= 0; k--)
        if (w->line[k].step == step)
            return &w->line[k];
    return NULL;
}

void train_util_free_log(train_util_worker_t *w)
{
    free(w->line);
    w->line = NULL;
    w->n = 0;
}

/* --- checkpoints ---------------------------------------------------------------------------- */

/* Tensor t of f as floats (caller frees), or NULL. */
static float *s_tensor(const model_st_file_t *f, const model_st_info_t *t)
{
    float *x = semoe_xmalloc((t->numel ? t->numel : 1) * sizeof *x);
    if (model_st_read_f32(f, t, x, t->numel) != SEMOE_OK) {
        fprintf(stderr, "%s\n", semoe_err_msg());
        free(x);
        return NULL;
    }
    return x;
}

bool train_util_compare_weights(const char *a_dir, const char *b_dir,
                                train_util_weights_diff_t *out)
{
    memset(out, 0, sizeof *out);
    char pa[PATH_MAX], pb[PATH_MAX];
    train_util_join(pa, sizeof pa, a_dir, MODEL_ST_SINGLE);
    train_util_join(pb, sizeof pb, b_dir, MODEL_ST_SINGLE);
    model_st_file_t *a = NULL, *b = NULL;
    bool ok = model_st_open(pa, &a) == SEMOE_OK && model_st_open(pb, &b) == SEMOE_OK;
    CHECK(ok, "cannot open %s and %s: %s", pa, pb, semoe_err_msg());
    ok = ok && model_st_count(a) == model_st_count(b);
    CHECK(!a || !b || ok, "%s holds %zu tensors, %s %zu", pa, model_st_count(a), pb,
          model_st_count(b));
    double all_diff2 = 0, all_norm2 = 0;
    for (size_t i = 0; ok && i < model_st_count(a); i++) {
        const model_st_info_t *ta = model_st_at(a, i);
        const model_st_info_t *tb = model_st_find(b, ta->name);
        ok = tb && tb->ndim == ta->ndim && tb->numel == ta->numel &&
             memcmp(tb->shape, ta->shape, ta->ndim * sizeof ta->shape[0]) == 0;
        CHECK(ok, "tensor %s of %s: %s in %s", ta->name, pa, tb ? "another shape" : "missing",
              pb);
        float *xa = ok ? s_tensor(a, ta) : NULL, *xb = ok ? s_tensor(b, tb) : NULL;
        ok = xa && xb;
        double diff2 = 0, norm2 = 0;
        for (uint64_t k = 0; ok && k < ta->numel; k++) {
            double d = (double)xa[k] - (double)xb[k];
            diff2 += d * d;
            norm2 += (double)xa[k] * xa[k];
            d = fabs(d);
            out->max_abs = d > out->max_abs || isnan(d) ? d : out->max_abs;
        }
        all_diff2 += diff2;
        all_norm2 += norm2;
        double rel = norm2 > 0 ? sqrt(diff2 / norm2) : sqrt(diff2);
        if (ok && (rel > out->max_rel_norm || isnan(rel) || out->tensors == 0)) {
            out->max_rel_norm = rel;
            snprintf(out->worst, sizeof out->worst, "%s", ta->name);
        }
        out->tensors += ok;
        free(xa);
        free(xb);
    }
    out->rel_norm = all_norm2 > 0 ? sqrt(all_diff2 / all_norm2) : sqrt(all_diff2);
    model_st_close(&a);
    model_st_close(&b);
    return ok;
}

uint64_t train_util_begin(char *corpus)
{
    uint64_t seed = 1 + test_rand_below(1000000000);
    fprintf(stderr, "  train.seed %" PRIu64 "\n", seed);
    proc_tmp_path(corpus, PATH_MAX, "corpus.txt");
    REQUIRE(train_util_write_corpus(corpus), "cannot write the corpus");
    return seed;
}

bool train_util_check_uninterrupted(const char *run, const train_util_worker_t *w, int n,
                                    int steps)
{
    bool ok = true;
    for (int i = 0; i < n && ok; i++) {
        CHECK(w[i].n == steps, "%s: %s logged %d lines, want %d", run, w[i].id, w[i].n, steps);
        ok = w[i].n == steps;
        for (int k = 0; ok && k < w[i].n; k++) {
            ok = w[i].line[k].step == (uint64_t)k + 1 &&
                 strcmp(w[i].line[k].loss, w[0].line[k].loss) == 0;
            CHECK(ok, "%s: %s line %d: step %" PRIu64 " loss %s, %s: loss %s", run, w[i].id,
                  k + 1, w[i].line[k].step, w[i].line[k].loss, w[0].id, w[0].line[k].loss);
        }
    }
    return ok;
}

bool train_util_start_run(const char *run, const char *job_path, const train_util_job_t *job,
                          proc_ports_t *pp, proc_t **coord, train_util_worker_t *w, int n,
                          int *started)
{
    *started = 0;
    CHECK(train_util_write_job(job_path, job), "%s: cannot write %s", run, job_path);
    cJSON *st = test_status_start_coordinator(job_path, pp, coord);
    CHECK(st != NULL, "%s: no coordinator answering on its status socket", run);
    cJSON_Delete(st);
    if (!st)
        return false;
    for (int i = 0; i < n; i++) {
        if (!train_util_start_worker(&w[i], run, i, pp))
            return false;
        (*started)++;
    }
    return true;
}

void train_util_progress(const train_util_worker_t *w, int n, uint64_t *step, uint64_t *gen)
{
    *step = *gen = 0;
    for (int i = 0; i < n; i++) {
        char *text = proc_read_file(w[i].log, NULL);
        for (char *line = text, *end; line && (end = strchr(line, '\n')); line = end + 1) {
            *end = 0;
            const char *s = strstr(line, "\"step\":"), *g = strstr(line, "\"generation\":");
            uint64_t sv = s ? strtoull(s + 7, NULL, 10) : 0;
            uint64_t gv = g ? strtoull(g + 13, NULL, 10) : 0;
            *step = sv > *step ? sv : *step;
            *gen = gv > *gen ? gv : *gen;
        }
        free(text);
    }
}
