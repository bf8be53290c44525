/* Helpers shared by blk.c and blk_bench.c (not for drivers). */
#ifndef FW_BLK_UTIL_H
#define FW_BLK_UTIL_H

#include <stdbool.h>
#include <stdint.h>

#include "blk.h"

extern uint8_t blk_iobuf[BLK_MAX_QD * BLK_MAX_IO];

/* Byte offsets/lengths, which must be sector multiples. */
int blk_read_bytes(struct blkdev *d, uint64_t off, uint32_t len, void *buf);
int blk_write_bytes(struct blkdev *d, uint64_t off, uint32_t len, void *buf);

/* Number with optional K/M/G (binary) suffix; decimal or 0x hex. */
bool parse_size(const char *s, uint64_t *out);
/* "key=value" -> value, else NULL. */
const char *arg_value(const char *arg, const char *key);

#endif
