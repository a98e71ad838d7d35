/* The daemons' and the CLI's handling of bad input: each bad job spec or flag makes
 * semoe-coordinator (or semoe-worker) exit 2 with one line on stderr naming the field, the flag
 * or the file; --help prints usage and exits 0; `semoe status` against nothing fails in bounded
 * time; `semoe eval` and `semoe generate` refuse a bad --device (and cuda:N in a build without
 * CUDA, or N past the host's devices). The bad specs are random variations of
 * tests/jobs/small.json written to a temp dir. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "semoe_config.h"
#include "tests/harness.h"
#include "tests/proc.h"

#define RUN_MS 15000 /* a bad config must be refused long before this */

static cJSON *s_base;     /* the valid spec */
static int s_case;        /* numbers the temp files and process labels */

/* True if text holds exactly one non-empty line ending in '\n'. */
static bool s_one_line(const char *text)
{
    size_t n = text ? strlen(text) : 0;
    if (n < 2 || text[n - 1] != '\n')
        return false;
    return memchr(text, '\n', n - 1) == NULL;
}

/* Runs the coordinator with args (NULL-ended) and checks: exit code 2, exactly one line on
 * stderr, which contains every string in needles (NULL-ended). what describes the case. */
static void s_expect_refused(const char *what, const char *bin, const char *const *args,
                             const char *const *needles)
{
    char label[64];
    snprintf(label, sizeof label, "case%02d", ++s_case);
    const char *argv[32];
    int argc = 0;
    for (; args[argc] && argc < 31; argc++)
        argv[argc] = args[argc];
    proc_t *p = proc_startv(label, bin, argc, argv);
    CHECK(p != NULL, "%s: could not start %s", what, bin);
    if (!p)
        return;
    int st = 0;
    bool done = proc_wait(p, RUN_MS, &st);
    CHECK(done, "%s: %s still running after %d ms (log %s)", what, bin, RUN_MS,
          proc_err_path(p));
    if (!done) {
        proc_kill(p);
        return;
    }
    int code = proc_exit_code(st);
    char *err = proc_read_file(proc_err_path(p), NULL);
    CHECK(code == 2, "%s: exit code %d, want 2; stderr: %s", what, code, err ? err : "");
    CHECK(s_one_line(err), "%s: stderr is not exactly one line: [%s]", what, err ? err : "");
    for (int i = 0; needles && needles[i]; i++)
        CHECK(err && strstr(err, needles[i]), "%s: stderr does not name \"%s\": %s", what,
              needles[i], err ? err : "");
    if (err && code == 2 && s_one_line(err))
        fprintf(stderr, "  ok %-28s %s", what, err);
    free(err);
}

/* Writes spec (as JSON) or raw text to a fresh file in the temp dir; returns its path in buf. */
static char *s_write_case(char *buf, size_t n, const cJSON *spec, const char *raw)
{
    char name[64];
    snprintf(name, sizeof name, "job-%02d-%04x.json", s_case + 1,
             (unsigned)test_rand_below(0x10000));
    proc_tmp_path(buf, n, name);
    char *text = spec ? cJSON_Print(spec) : NULL;
    bool ok = proc_write_file(buf, text ? text : raw);
    cJSON_free(text);
    CHECK(ok, "cannot write %s", buf);
    return buf;
}

static void s_coord_refuses(const char *what, const char *job, const char *const *needles)
{
    proc_ports_t pp;
    if (!proc_ports_pick(&pp)) {
        CHECK(false, "no free ports");
        return;
    }
    const char *args[] = {"--config",  job,          "--bind",          pp.control_ep,
                          "--status",  pp.status_ep, "--metrics",       pp.metrics_addr,
                          NULL};
    s_expect_refused(what, PROC_COORDINATOR, args, needles);
}

static const char *s_base_name(const char *path)
{
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static void s_bad_specs(const char *valid_text)
{
    char path[PATH_MAX];

    /* A file that is not there. */
    char missing[64];
    snprintf(missing, sizeof missing, "missing-%06x.json", (unsigned)test_rand_below(1u << 24));
    proc_tmp_path(path, sizeof path, missing);
    s_coord_refuses("missing file", path, (const char *[]){missing, NULL});

    /* Invalid JSON: the valid text cut short, or with a trailing comma in the top object. */
    size_t len = strlen(valid_text);
    while (len > 0 && strchr(" \t\r\n", valid_text[len - 1]))
        len--;
    char *bad = malloc(len + 8);
    if (!bad)
        abort();
    if (test_rand_below(2) == 0) {
        size_t cut = 1 + (size_t)test_rand_below(len - 2); /* keeps the first '{', drops the last '}' */
        memcpy(bad, valid_text, cut);
        bad[cut] = 0;
    } else {
        memcpy(bad, valid_text, len - 1);
        strcpy(bad + len - 1, ",\n}\n");
    }
    s_write_case(path, sizeof path, NULL, bad);
    free(bad);
    s_coord_refuses("invalid JSON", path, (const char *[]){s_base_name(path), NULL});

    /* An unknown key, at the top or in a random section. */
    cJSON *spec = cJSON_Duplicate(s_base, 1);
    char key[48];
    snprintf(key, sizeof key, "no_such_key_%05x", (unsigned)test_rand_below(1u << 20));
    const char *sections[8];
    int ns = 0;
    const cJSON *sec;
    cJSON_ArrayForEach(sec, spec)
    {
        if (cJSON_IsObject(sec) && ns < 8)
            sections[ns++] = sec->string;
    }
    int pick = (int)test_rand_below((uint64_t)ns + 1);
    cJSON *into = pick == ns ? spec : cJSON_GetObjectItemCaseSensitive(spec, sections[pick]);
    cJSON_AddNumberToObject(into, key, (double)test_rand_below(100));
    s_write_case(path, sizeof path, spec, NULL);
    cJSON_Delete(spec);
    s_coord_refuses("unknown key", path, (const char *[]){key, NULL});

    /* Zero experts. */
    spec = cJSON_Duplicate(s_base, 1);
    cJSON *model = cJSON_GetObjectItemCaseSensitive(spec, "model");
    cJSON_DeleteItemFromObjectCaseSensitive(model, "num_local_experts");
    cJSON_AddNumberToObject(model, "num_local_experts", 0);
    s_write_case(path, sizeof path, spec, NULL);
    cJSON_Delete(spec);
    s_coord_refuses("zero experts", path, (const char *[]){"num_local_experts", NULL});

    /* top-k above the number of experts. */
    spec = cJSON_Duplicate(s_base, 1);
    model = cJSON_GetObjectItemCaseSensitive(spec, "model");
    int experts = 1 + (int)test_rand_below(16);
    int top_k = experts + 1 + (int)test_rand_below(4);
    cJSON_DeleteItemFromObjectCaseSensitive(model, "num_local_experts");
    cJSON_DeleteItemFromObjectCaseSensitive(model, "num_experts_per_tok");
    cJSON_AddNumberToObject(model, "num_local_experts", experts);
    cJSON_AddNumberToObject(model, "num_experts_per_tok", top_k);
    s_write_case(path, sizeof path, spec, NULL);
    cJSON_Delete(spec);
    char what[96];
    snprintf(what, sizeof what, "top-k %d > %d experts", top_k, experts);
    s_coord_refuses(what, path, (const char *[]){"num_experts_per_tok", NULL});

    /* A number given as a string: a random numeric field of the model. */
    spec = cJSON_Duplicate(s_base, 1);
    model = cJSON_GetObjectItemCaseSensitive(spec, "model");
    const char *numeric[64];
    int nn = 0;
    const cJSON *f;
    cJSON_ArrayForEach(f, model)
    {
        if (cJSON_IsNumber(f) && nn < 64)
            numeric[nn++] = f->string;
    }
    CHECK(nn > 0, "small.json's model has no numeric field");
    if (nn > 0) {
        char field[64];
        snprintf(field, sizeof field, "%s", numeric[test_rand_below((uint64_t)nn)]);
        cJSON_DeleteItemFromObjectCaseSensitive(model, field);
        cJSON_AddStringToObject(model, field, "twelve");
        s_write_case(path, sizeof path, spec, NULL);
        snprintf(what, sizeof what, "wrong type (%s)", field);
        s_coord_refuses(what, path, (const char *[]){field, NULL});
    }
    cJSON_Delete(spec);
}

/* Every file of tests/jobs/bad (another engineer's corpus of bad specs, if present): exit 2
 * and one line that starts by naming the file. */
static void s_bad_corpus(void)
{
    char dir[PATH_MAX];
    proc_src_path(dir, sizeof dir, "tests/jobs/bad");
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "  (no %s; skipping the corpus of bad specs)\n", dir);
        return;
    }
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".json") != 0)
            continue;
        char path[PATH_MAX + 512], what[384];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        snprintf(what, sizeof what, "bad/%s", e->d_name);
        s_coord_refuses(what, path, (const char *[]){e->d_name, NULL});
        n++;
    }
    closedir(d);
    CHECK(n > 0, "no bad specs in %s", dir);
}

static void s_bad_flags(const char *job)
{
    proc_ports_t pp;
    if (!proc_ports_pick(&pp)) {
        CHECK(false, "no free ports");
        return;
    }
    char flag[48];
    snprintf(flag, sizeof flag, "--bogus-%04x", (unsigned)test_rand_below(0x10000));
    const char *unknown[] = {"--config", job, "--bind", pp.control_ep, "--status", pp.status_ep,
                             "--metrics", pp.metrics_addr, flag, NULL};
    s_expect_refused("coordinator unknown flag", PROC_COORDINATOR, unknown,
                     (const char *[]){flag, NULL});

    const char *no_config[] = {"--bind", pp.control_ep, "--status", pp.status_ep, "--metrics",
                               pp.metrics_addr, NULL};
    s_expect_refused("coordinator without --config", PROC_COORDINATOR, no_config,
                     (const char *[]){"--config", NULL});

    const char *worker_unknown[] = {"--coordinator", pp.control_ep, flag, NULL};
    s_expect_refused("worker unknown flag", PROC_WORKER, worker_unknown,
                     (const char *[]){flag, NULL});

    const char *bogus_device[] = {"--coordinator", pp.control_ep, "--device", "bogus", NULL};
    s_expect_refused("worker --device bogus", PROC_WORKER, bogus_device,
                     (const char *[]){"device", NULL});
}

/* semoe eval / generate --device: malformed values, --double on a GPU, and a device this build or
 * host cannot give. Every case fails before the checkpoint (which does not exist) is read. */
static void s_bad_device(void)
{
    char ckpt[PATH_MAX];
    proc_tmp_path(ckpt, sizeof ckpt, "no-such-checkpoint");
    static const char *const malformed[] = {"cuda:", "cuda:x", "gpu", "cuda:-1", "cuda:1024",
                                            "CPU", "cuda:0 "};
    for (size_t i = 0; i < sizeof malformed / sizeof malformed[0]; i++) {
        bool gen = test_rand_below(2) == 0;
        const char *eval_args[] = {"eval", "--checkpoint", ckpt, "--text", "ab", "--device",
                                   malformed[i], NULL};
        const char *gen_args[] = {"generate", "--checkpoint", ckpt, "--prompt", "ab",
                                  "--device", malformed[i], NULL};
        char what[64];
        snprintf(what, sizeof what, "%s --device '%s'", gen ? "generate" : "eval", malformed[i]);
        s_expect_refused(what, PROC_CLI, gen ? gen_args : eval_args,
                         (const char *[]){"--device", malformed[i], "cpu or cuda:N", NULL});
    }
    const char *dbl[] = {"eval", "--checkpoint", ckpt, "--text", "ab", "--double", "--device",
                         "cuda:0", NULL};
    s_expect_refused("eval --double --device cuda:0", PROC_CLI, dbl,
                     (const char *[]){"--double", "cpu", NULL});
    /* cuda:1023 is past every host's devices, so it is refused in every build and on every
     * machine: without CUDA the line says how to rebuild, with it gpu_backend_init's message
     * names the device */
    const char *far[] = {"eval", "--checkpoint", ckpt, "--text", "ab", "--device", "cuda:1023",
                         NULL};
    const char *far_gen[] = {"generate", "--checkpoint", ckpt, "--prompt", "ab", "--device",
                             "cuda:1023", NULL};
#if SEMOE_HAVE_CUDA
    const char *const *why = (const char *[]){"--device cuda:1023", "CUDA device", NULL};
#else
    const char *const *why = (const char *[]){"--device cuda:1023", "no CUDA", "-Dcuda=enabled",
                                              NULL};
    const char *zero[] = {"generate", "--checkpoint", ckpt, "--prompt", "ab", "--device",
                          "cuda:0", NULL};
    s_expect_refused("generate --device cuda:0 (no CUDA)", PROC_CLI, zero,
                     (const char *[]){"cuda:0", "no CUDA", "-Dcuda=enabled", NULL});
#endif
    s_expect_refused("eval --device cuda:1023", PROC_CLI, far, why);
    s_expect_refused("generate --device cuda:1023", PROC_CLI, far_gen, why);
}

/* --help: exit 0, usage on stdout that mentions `mention`. */
static void s_help(const char *bin, const char *mention)
{
    proc_t *p = NULL;
    int code = proc_run(&p, RUN_MS, "help", bin, "--help", NULL);
    char *out = p ? proc_read_file(proc_out_path(p), NULL) : NULL;
    CHECK(code == 0, "%s --help: exit code %d, want 0", bin, code);
    CHECK(out && strcasestr(out, "usage"), "%s --help: no usage on stdout: %s", bin,
          out ? out : "");
    CHECK(out && strstr(out, mention), "%s --help: usage does not mention %s", bin, mention);
    free(out);
}

/* `semoe status` against a port nobody listens on: non-zero, a message, bounded time. */
static void s_status_nobody(void)
{
    int port = proc_free_port();
    if (!port) {
        CHECK(false, "no free port");
        return;
    }
    char ep[64];
    snprintf(ep, sizeof ep, "tcp://127.0.0.1:%d", port);
    proc_t *p = NULL;
    int64_t t0 = proc_now_ms();
    int code = proc_run(&p, RUN_MS, "status-nobody", PROC_CLI, "status", "--endpoint", ep,
                        "--timeout-ms", "300", NULL);
    int64_t took = proc_now_ms() - t0;
    char *err = p ? proc_read_file(proc_err_path(p), NULL) : NULL;
    CHECK(code > 0 && code != 128 + 6 && code != 128 + 11, "semoe status (nobody there): exit "
          "code %d, want a plain non-zero exit", code);
    CHECK(took < 5000, "semoe status --timeout-ms 300 took %lld ms", (long long)took);
    CHECK(err && *err && (strstr(err, ep) || strcasestr(err, "time") ||
                          strcasestr(err, "no reply") || strcasestr(err, "no answer")),
          "semoe status (nobody there): stderr does not say what failed: [%s]", err ? err : "");
    if (err && *err)
        fprintf(stderr, "  ok %-28s %s", "status, nobody there", err);
    free(err);
}

int main(void)
{
    test_init("config_cli");
    proc_init("config_cli");

    char job[PATH_MAX];
    proc_src_path(job, sizeof job, "tests/jobs/small.json");
    char *valid = proc_read_file(job, NULL);
    REQUIRE(valid != NULL, "cannot read %s", job);
    s_base = cJSON_Parse(valid);
    REQUIRE(cJSON_IsObject(s_base) &&
                cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(s_base, "model")),
            "%s is not a job spec with a model object", job);

    s_bad_specs(valid);
    s_bad_corpus();
    s_bad_flags(job);
    s_bad_device();
    s_help(PROC_COORDINATOR, "--config");
    s_help(PROC_WORKER, "--coordinator");
    s_help(PROC_CLI, "status");
    s_status_nobody();

    free(valid);
    cJSON_Delete(s_base);
    return test_finish();
}
