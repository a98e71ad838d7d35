/* Replays the fuzz corpus (tests/fuzz/corpus) and every input that ever crashed the decoder
 * (tests/fuzz/crashes) through the fuzz target, so a fixed crash stays fixed. Run in the
 * sanitizer build too, where a regression aborts. */
#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#include "tests/harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int s_replay_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || strstr(e->d_name, ".md"))
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE *f = fopen(path, "rb");
        if (!f)
            continue;
        static uint8_t buf[1 << 20];
        size_t len = fread(buf, 1, sizeof buf, f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, len); /* aborts on a failed invariant */
        n++;
    }
    closedir(d);
    return n;
}

int main(void)
{
    test_init("test_proto_corpus");
    const char *src = getenv("SEMOE_SRC");
    REQUIRE(src, "SEMOE_SRC is not set");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus", src);
    int corpus = s_replay_dir(dir);
    CHECK(corpus > 10, "corpus %s has %d inputs", dir, corpus);
    snprintf(dir, sizeof dir, "%s/tests/fuzz/crashes", src);
    int crashes = s_replay_dir(dir);
    CHECK(crashes >= 0, "no %s", dir);
    printf("replayed %d corpus inputs and %d past crashes\n", corpus, crashes);
    return test_finish();
}
