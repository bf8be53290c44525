/* Freestanding helpers.  Built with -fno-tree-loop-distribute-patterns so
 * gcc does not turn the loops below into calls to themselves. */
#include "lib.h"
#include "serial.h"

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d < s)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return (unsigned char)*a - (unsigned char)*b;
}

bool parse_u64(const char *s, uint64_t *out)
{
	uint64_t v = 0;

	if (!*s)
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return false;
		if (v > (UINT64_MAX - (uint64_t)(*s - '0')) / 10)
			return false;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return true;
}

void kputs(const char *s)
{
	serial_write(s, strlen(s));
}

/* Emit `len` chars of `s` padded to `width`. */
static void emit_padded(const char *s, size_t len, int width, bool left, char pad)
{
	int fill = width > (int)len ? width - (int)len : 0;

	if (!left)
		while (fill-- > 0)
			serial_putc(pad);
	serial_write(s, len);
	if (left)
		while (fill-- > 0)
			serial_putc(' ');
}

void kvprintf(const char *fmt, va_list ap)
{
	static const char lower[] = "0123456789abcdef";
	static const char upper[] = "0123456789ABCDEF";

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		fmt++;

		bool left = false;
		char pad = ' ';
		for (;; fmt++) {
			if (*fmt == '-')
				left = true;
			else if (*fmt == '0')
				pad = '0';
			else
				break;
		}

		int width = 0;
		if (*fmt == '*') {
			width = va_arg(ap, int);
			fmt++;
		} else {
			while (*fmt >= '0' && *fmt <= '9')
				width = width * 10 + (*fmt++ - '0');
		}

		int lng = 0;
		while (*fmt == 'l' || *fmt == 'z') {
			lng = 1;
			fmt++;
		}

		char buf[24];
		char *end = buf + sizeof(buf), *p = end;
		uint64_t u;
		bool neg = false;
		unsigned base = 10;
		const char *digits = lower;

		switch (*fmt) {
		case '\0':
			return;
		case '%':
			serial_putc('%');
			continue;
		case 'c':
			buf[0] = (char)va_arg(ap, int);
			emit_padded(buf, 1, width, left, ' ');
			continue;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			emit_padded(s, strlen(s), width, left, ' ');
			continue;
		}
		case 'd':
		case 'i': {
			int64_t v = lng ? va_arg(ap, long) : va_arg(ap, int);
			neg = v < 0;
			u = neg ? -(uint64_t)v : (uint64_t)v;
			break;
		}
		case 'u':
			u = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
			break;
		case 'X':
			digits = upper;
			/* fall through */
		case 'x':
			base = 16;
			u = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
			break;
		case 'p':
			base = 16;
			u = (uintptr_t)va_arg(ap, void *);
			serial_write("0x", 2);
			break;
		default:
			/* Unknown conversion: print it verbatim so bugs are visible. */
			serial_putc('%');
			serial_putc(*fmt);
			continue;
		}

		do {
			*--p = digits[u % base];
			u /= base;
		} while (u);
		if (neg) {
			/* Sign goes before zero padding: "-0042". */
			if (pad == '0' && !left) {
				serial_putc('-');
				width--;
			} else {
				*--p = '-';
			}
		}
		emit_padded(p, (size_t)(end - p), width, left, left ? ' ' : pad);
	}
}

void kprintf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kvprintf(fmt, ap);
	va_end(ap);
}

/* Decimal, or hex with a 0x prefix. */
bool parse_num(const char *s, uint64_t *out)
{
	uint64_t v = 0;

	if (s[0] != '0' || (s[1] != 'x' && s[1] != 'X'))
		return parse_u64(s, out);
	s += 2;
	if (!*s)
		return false;
	for (; *s; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (*s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (*s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return false;
		if (v >> 60)
			return false;
		v = v << 4 | d;
	}
	*out = v;
	return true;
}

