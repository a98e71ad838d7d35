/* The training data (DESIGN.md "The model"): byte-tokenised text (token = byte value, vocab 256)
 * cut into samples of seq_len + 1 tokens, visited each epoch in a seeded permutation that any
 * position of can be computed without state, so a batch depends on (seed, step) only: not on the
 * number of workers, which ones, or what ran before (resume and elasticity need exactly that).
 * After model_data_open nothing changes, so every query may be called from any thread. */
#ifndef SEMOE_MODEL_DATA_H
#define SEMOE_MODEL_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/job.h"

/* The corpus is split BY DOCUMENT into training and held-out text. A document is a file, or one
 * entry of a file in fortune format (entries separated by lines holding only "%"). A document is
 * held out when a hash of (train.seed, its canonical path, its entry index) falls below
 * data.heldout_fraction, so the split does not depend on the order the paths are given in, or on
 * whether a directory or its files are given. Each split is one token stream: its documents in
 * sorted-path then entry order, each followed by a '\n'. Sample k of a split is the seq_len + 1
 * bytes at offset k * seq_len (consecutive samples share one byte, so every byte of the stream
 * but the first is a target exactly once); a split of L bytes has (L - 1) / seq_len samples. */
typedef enum { MODEL_DATA_TRAIN = 0, MODEL_DATA_HELDOUT = 1 } model_data_split_t;

typedef struct model_data_t model_data_t;

typedef struct {
    uint64_t documents, bytes, samples; /* bytes: of the stream, separators included */
} model_data_split_stats_t;

typedef struct {
    uint64_t files;                     /* text files read */
    uint64_t skipped;                   /* files skipped: binary, empty, or no entries */
    model_data_split_stats_t split[2];  /* indexed by model_data_split_t */
} model_data_stats_t;

/* One document as loaded: the file it came from (canonical path, owned by the data), its entry
 * index in that file (0 for a plain file; counting non-empty entries of a fortune file), and its
 * bytes in its split's stream: [offset, offset + len) (the '\n' after it not counted). */
typedef struct {
    const char *path;
    uint32_t entry;
    model_data_split_t split;
    uint64_t offset, len;
} model_data_doc_t;

/* Reads job->data.paths (files or directories, recursively; hidden names in directories and
 * files that are not text are skipped and logged) into memory and splits them. Uses
 * train.seq_len, train.global_batch, train.seed and data.heldout_fraction. Fails with a one-line
 * message naming the path on a missing or unreadable path, a corpus with no text, or a training
 * split too small for one sample. On success *out is the caller's (model_data_destroy). */
semoe_rc model_data_open(const model_job_t *job, model_data_t **out);
/* Frees everything; nulls *self_p. NULL and *self_p NULL are fine. */
void model_data_destroy(model_data_t **self_p);

/* Samples in a split (>= 1 for training; 0 for held-out when no document was held out). */
uint64_t model_data_samples(const model_data_t *d, model_data_split_t split);
/* Tokens per sample row: seq_len + 1. */
uint32_t model_data_row_len(const model_data_t *d);
void model_data_stats(const model_data_t *d, model_data_stats_t *out);
/* One line for logs: files, skipped, and documents, bytes and samples per split. Returns what
 * snprintf returns. */
int model_data_summary(const model_data_t *d, char *buf, size_t size);

/* Documents, in load order (all training documents, then held-out, each in stream order). */
uint64_t model_data_documents(const model_data_t *d);
const model_data_doc_t *model_data_document(const model_data_t *d, uint64_t i);
/* A split's whole stream; *len its length. Valid until model_data_destroy. */
const uint8_t *model_data_stream(const model_data_t *d, model_data_split_t split, uint64_t *len);
/* Sample id's row_len tokens in a split (id < model_data_samples), or NULL when out of range. */
const uint8_t *model_data_sample(const model_data_t *d, model_data_split_t split, uint64_t id);

/* The training permutation: the sample id visited at position i (< samples) of epoch. A
 * bijection on [0, samples) for each epoch, from (train.seed, epoch) alone: O(1), no state. */
uint64_t model_data_sample_index(const model_data_t *d, uint64_t epoch, uint64_t i);

/* The rows of a global batch of `batch` sequences that rank of world takes:
 * [rank * batch / world, (rank + 1) * batch / world). */
void model_data_rows(uint32_t batch, uint32_t rank, uint32_t world, uint32_t *first,
                     uint32_t *count);

/* Fills rank's rows of step's global batch (train.global_batch sequences): row j of the batch is
 * global position p = step * global_batch + j of the sample sequence, i.e. position p % samples
 * of epoch p / samples. tokens: (count, row_len) bytes for count from model_data_rows;
 * sample_ids (count) receives each row's sample id, or may be NULL; epochs likewise (each row's
 * epoch, so a cursor can be kept), or NULL. EINVAL on rank >= world or a step past 2^64 samples. */
semoe_rc model_data_batch(const model_data_t *d, uint64_t step, uint32_t rank, uint32_t world,
                          uint8_t *tokens, uint64_t *sample_ids, uint64_t *epochs);
/* The same for rows [first, first + count) of the global batch, as a PLAN's batch slice gives
 * them. EINVAL when the rows are not within the batch. */
semoe_rc model_data_batch_rows(const model_data_t *d, uint64_t step, uint32_t first,
                               uint32_t count, uint8_t *tokens, uint64_t *sample_ids,
                               uint64_t *epochs);

/* Evaluation batches over the held-out split in its own order (no permutation): batch k holds
 * held-out samples (k * global_batch + j) % samples, split by rank as above. Batches
 * [0, model_data_heldout_batches) cover every held-out sample once (the last may wrap round
 * to the first). EINVAL when there is no held-out sample. */
uint64_t model_data_heldout_batches(const model_data_t *d);
semoe_rc model_data_heldout_batch(const model_data_t *d, uint64_t k, uint32_t rank,
                                  uint32_t world, uint8_t *tokens, uint64_t *sample_ids);
semoe_rc model_data_heldout_rows(const model_data_t *d, uint64_t k, uint32_t first,
                                 uint32_t count, uint8_t *tokens, uint64_t *sample_ids);

#endif
