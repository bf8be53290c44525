/* Shell commands that touch the hardware directly: for poking at devices by hand. */
#include <stdint.h>

#include "io.h"
#include "lib.h"
#include "pci.h"
#include "tools.h"

static void usage(const char *u)
{
	kprintf("usage: %s\n", u);
}

/* peek ADDR: 32-bit read of guest-physical (identity-mapped) memory or MMIO. */
void cmd_peek(int argc, char **argv)
{
	uint64_t addr;

	if (argc != 2 || !parse_num(argv[1], &addr) || addr & 3) {
		usage("peek ADDR (4-byte aligned)");
		return;
	}
	kprintf("0x%08x\n", *(volatile uint32_t *)(uintptr_t)addr);
}

/* poke ADDR VAL: 32-bit write. */
void cmd_poke(int argc, char **argv)
{
	uint64_t addr, val;

	if (argc != 3 || !parse_num(argv[1], &addr) || addr & 3 || !parse_num(argv[2], &val)) {
		usage("poke ADDR VAL (4-byte aligned)");
		return;
	}
	*(volatile uint32_t *)(uintptr_t)addr = (uint32_t)val;
}

/* in PORT [b|w|l] / out PORT VAL [b|w|l]: port I/O. */
static int width(int argc, char **argv, int at)
{
	if (argc <= at)
		return 1;
	if (!strcmp(argv[at], "b"))
		return 1;
	if (!strcmp(argv[at], "w"))
		return 2;
	if (!strcmp(argv[at], "l"))
		return 4;
	return 0;
}

void cmd_in(int argc, char **argv)
{
	uint64_t port;
	int w = width(argc, argv, 2);

	if (argc < 2 || argc > 3 || !parse_num(argv[1], &port) || port > 0xFFFF || !w) {
		usage("in PORT [b|w|l]");
		return;
	}
	uint32_t v = w == 1 ? (uint32_t)inb((uint16_t)port) : w == 2 ? (uint32_t)inw((uint16_t)port) : inl((uint16_t)port);
	kprintf("0x%0*x\n", w * 2, v);
}

void cmd_out(int argc, char **argv)
{
	uint64_t port, val;
	int w = width(argc, argv, 3);

	if (argc < 3 || argc > 4 || !parse_num(argv[1], &port) || port > 0xFFFF || !parse_num(argv[2], &val) || !w) {
		usage("out PORT VAL [b|w|l]");
		return;
	}
	if (w == 1)
		outb((uint16_t)port, (uint8_t)val);
	else if (w == 2)
		outw((uint16_t)port, (uint16_t)val);
	else
		outl((uint16_t)port, (uint32_t)val);
}

/* pcicfg DD.F REG [VAL]: read or write a 32-bit config register on bus 0. */
void cmd_pcicfg(int argc, char **argv)
{
	uint64_t dev, fn, reg, val;
	char *dot = argv[1] ? argv[1] : "";

	while (*dot && *dot != '.')
		dot++;
	if (argc < 3 || argc > 4 || !*dot) {
		usage("pcicfg DD.F REG [VAL]  (hex slot, e.g. pcicfg 01.0 0x10)");
		return;
	}
	*dot = '\0';
	char slot[8] = "0x";
	for (unsigned i = 0; argv[1][i] && i < 4; i++)
		slot[2 + i] = argv[1][i];
	if (!parse_num(slot, &dev) || dev > 31 || !parse_u64(dot + 1, &fn) || fn > 7 || !parse_num(argv[2], &reg) ||
	    reg > 0xFC || reg & 3 || (argc == 4 && !parse_num(argv[3], &val))) {
		usage("pcicfg DD.F REG [VAL]  (hex slot, e.g. pcicfg 01.0 0x10)");
		return;
	}
	if (argc == 4)
		pci_cfg_write32((uint8_t)dev, (uint8_t)fn, (uint8_t)reg, (uint32_t)val);
	else
		kprintf("0x%08x\n", pci_cfg_read32((uint8_t)dev, (uint8_t)fn, (uint8_t)reg));
}
