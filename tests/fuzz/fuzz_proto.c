/* libFuzzer target for the control-message decoder (`make fuzz`). Beyond not crashing, it
 * checks that whatever decodes re-encodes to the very same bytes and prints without trouble.
 * The same function replays the committed corpus and every crash found in `make test`
 * (tests/test_proto_corpus.c). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    proto_msg_t m;
    if (proto_decode(data, size, &m) != PROTO_OK)
        return 0;
    /* A decoded message is canonical only up to msgpack's choice of integer widths, so compare
     * decode(encode(m)) with m by re-encoding both. */
    msgpack_sbuffer a, b;
    msgpack_sbuffer_init(&a);
    msgpack_sbuffer_init(&b);
    if (proto_encode(&m, &a) != SEMOE_OK) {
        fprintf(stderr, "fuzz_proto: a decoded %s does not re-encode: %s\n",
                proto_type_name(m.hdr.type), semoe_err_msg());
        abort();
    }
    proto_msg_t m2;
    if (proto_decode(a.data, a.size, &m2) != PROTO_OK || proto_encode(&m2, &b) != SEMOE_OK ||
        a.size != b.size || memcmp(a.data, b.data, a.size) != 0) {
        fprintf(stderr, "fuzz_proto: %s does not round-trip\n", proto_type_name(m.hdr.type));
        abort();
    }
    FILE *devnull = fopen("/dev/null", "w");
    if (devnull) {
        proto_print(&m, devnull);
        fclose(devnull);
    }
    msgpack_sbuffer_destroy(&a);
    msgpack_sbuffer_destroy(&b);
    return 0;
}
