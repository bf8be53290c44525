/* Minimal freestanding C library: memory/string helpers and kprintf. */
#ifndef FW_LIB_H
#define FW_LIB_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* gcc may emit calls to these even in freestanding code (struct copies). */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* Parse a non-negative decimal number; false on empty/garbage/overflow. */
bool parse_u64(const char *s, uint64_t *out);

/* Decimal, or hexadecimal with a 0x prefix. */
bool parse_num(const char *s, uint64_t *out);

/* printf subset: %% %c %s %d %i %u %x %X %p, flags '0' '-', width (digits
 * or '*'), length modifiers l ll z.  Output goes to the serial console. */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void kvprintf(const char *fmt, va_list ap);
void kputs(const char *s);

#endif
