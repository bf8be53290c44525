/* 16550 UART driver.
 *
 * On splitvm every port access is a trap into the VMM, so the driver keeps
 * them few: it checks LSR only once per 16 transmitted bytes (the FIFO depth)
 * and sleeps in the VMM's "wait for IRQ" port instead of polling for input. */
#include "serial.h"

#include <stdbool.h>
#include <stdint.h>

#include "io.h"
#include "platform.h"

#define COM1 0x3F8
#define UART_THR (COM1 + 0) /* transmit holding register (DLAB=0) */
#define UART_RBR (COM1 + 0) /* receive buffer (DLAB=0) */
#define UART_DLL (COM1 + 0) /* divisor low (DLAB=1) */
#define UART_IER (COM1 + 1)
#define UART_DLM (COM1 + 1) /* divisor high (DLAB=1) */
#define UART_FCR (COM1 + 2)
#define UART_LCR (COM1 + 3)
#define UART_MCR (COM1 + 4)
#define UART_LSR (COM1 + 5)

#define LSR_DR 0x01   /* receive data ready */
#define LSR_THRE 0x20 /* transmit FIFO empty */
#define UART_FIFO_SIZE 16

/* Bytes we may still write before the FIFO could be full.  Only refreshed
 * when it reaches zero, by waiting for THRE (FIFO completely empty). */
static unsigned tx_room;

void serial_init(void)
{
	outb(UART_IER, 0x00);
	outb(UART_LCR, 0x80); /* DLAB on to program the baud divisor */
	outb(UART_DLL, 0x01); /* divisor 1 = 115200 baud */
	outb(UART_DLM, 0x00);
	outb(UART_LCR, 0x03); /* 8N1, DLAB off */
	outb(UART_FCR, 0x07); /* enable and clear both FIFOs */
	outb(UART_MCR, 0x0B); /* DTR, RTS, OUT2 (OUT2 gates the IRQ line) */
	outb(UART_IER, 0x01); /* IRQ on received data: wakes the VMM wait */
	tx_room = 0;
}

static void put_raw(char c)
{
	if (tx_room == 0) {
		while (!(inb(UART_LSR) & LSR_THRE))
			cpu_relax();
		tx_room = UART_FIFO_SIZE;
	}
	outb(UART_THR, (uint8_t)c);
	tx_room--;
}

void serial_putc(char c)
{
	if (c == '\n')
		put_raw('\r');
	put_raw(c);
}

void serial_write(const char *s, size_t len)
{
	while (len--)
		serial_putc(*s++);
}

int serial_getc(void)
{
	bool sleep = platform_is_splitvm();

	while (!(inb(UART_LSR) & LSR_DR)) {
		if (sleep)
			platform_wait_irq(100000); /* at most 100 ms, returns on IRQ 4 */
		else
			cpu_relax();
	}
	return inb(UART_RBR);
}
