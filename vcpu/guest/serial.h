/* 16550 UART console on COM1. */
#ifndef FW_SERIAL_H
#define FW_SERIAL_H

#include <stddef.h>

void serial_init(void);
/* Write one character; "\n" goes out as "\r\n". */
void serial_putc(char c);
void serial_write(const char *s, size_t len);
/* Block until a byte is received and return it. */
int serial_getc(void);

#endif
