/* SHA-256 (FIPS 180-4). */
#ifndef FW_SHA256_H
#define FW_SHA256_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sha256 {
	uint32_t h[8];
	uint64_t len; /* bytes hashed so far */
	uint8_t buf[64];
	unsigned fill;
};

void sha256_init(struct sha256 *s);
void sha256_update(struct sha256 *s, const void *data, size_t n);
void sha256_final(struct sha256 *s, uint8_t out[32]);

/* Check the FIPS 180-4 / NIST example vectors; true if all match. */
bool sha256_selftest(void);

#endif
