/* Platform services.
 *
 * splitvm exposes paravirtual ports at 0x500; under QEMU the same firmware
 * is entered through multiboot and uses multiboot info, isa-debug-exit and
 * ACPI instead.  The signature port tells the two apart: unassigned ports
 * read as all ones on QEMU. */
#include "platform.h"

#include "io.h"
#include "lib.h"

#define SPVM_PORT_SIGNATURE 0x500
#define SPVM_PORT_EXIT 0x504
#define SPVM_PORT_WAIT 0x508 /* out: wait for IRQ (usec); in: IRQ bitmask */
#define SPVM_PORT_INFO_INDEX 0x50C
#define SPVM_PORT_INFO_DATA 0x510
#define SPVM_PORT_CMDLINE 0x514 /* 8-bit: next command-line byte */
#define SPVM_SIGNATURE 0x4D565053u /* "SPVM" */

enum {
	SPVM_INFO_RAM_LO = 0,
	SPVM_INFO_RAM_HI = 1,
	SPVM_INFO_VCPUS = 2,
	SPVM_INFO_TSC_KHZ = 3,
	SPVM_INFO_CMDLINE_LEN = 4, /* selecting it also rewinds the cursor */
};

#define QEMU_DEBUG_EXIT_PORT 0xF4 /* -device isa-debug-exit,iobase=0xf4 */
#define ACPI_PM1A_CNT 0x604       /* SeaBIOS puts the PM base at 0x600 */
#define ACPI_SLP_EN 0x2000        /* SLP_TYP 0 is S5 on QEMU's chipsets */

/* The subset of the multiboot v1 info structure we read. */
struct multiboot_info {
	uint32_t flags;
	uint32_t mem_lower; /* KiB below 1 MiB, valid if flags bit 0 */
	uint32_t mem_upper; /* KiB above 1 MiB, valid if flags bit 0 */
	uint32_t boot_device;
	uint32_t cmdline; /* physical address, valid if flags bit 2 */
};

#define MB_INFO_MEM (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)

static bool on_splitvm;
static const struct multiboot_info *mbi;
static uint32_t tsc_khz_cache;

void platform_init(uint64_t mb_info)
{
	on_splitvm = inl(SPVM_PORT_SIGNATURE) == SPVM_SIGNATURE;
	/* Identity mapping makes the physical address directly usable. */
	mbi = (const struct multiboot_info *)(uintptr_t)mb_info;
}

bool platform_is_splitvm(void)
{
	return on_splitvm;
}

const char *platform_name(void)
{
	return on_splitvm ? "splitvm" : "qemu";
}

static uint32_t spvm_info(uint32_t index)
{
	outl(SPVM_PORT_INFO_INDEX, index);
	return inl(SPVM_PORT_INFO_DATA);
}

uint64_t platform_ram_bytes(void)
{
	if (on_splitvm)
		return ((uint64_t)spvm_info(SPVM_INFO_RAM_HI) << 32) |
		       spvm_info(SPVM_INFO_RAM_LO);
	if (mbi && (mbi->flags & MB_INFO_MEM))
		return ((uint64_t)mbi->mem_upper + 1024) * 1024;
	return 0;
}

unsigned platform_vcpus(void)
{
	/* Under QEMU only the boot CPU runs: APs are never started. */
	return on_splitvm ? spvm_info(SPVM_INFO_VCPUS) : 1;
}

/* Measure the TSC against PIT channel 2 (gated via port 0x61) for 10 ms.
 * Only used under QEMU; splitvm reports the frequency directly. */
static uint32_t calibrate_tsc_khz(void)
{
	const uint16_t ticks = 11932; /* 10 ms at 1.193182 MHz */
	uint8_t ctl = inb(0x61);

	outb(0x61, (uint8_t)((ctl & ~0x02) | 0x01)); /* gate on, speaker off */
	outb(0x43, 0xB0); /* channel 2, lo/hi byte, mode 0 (one-shot) */
	outb(0x42, ticks & 0xFF);
	outb(0x42, ticks >> 8);
	uint64_t t0 = rdtsc();
	while (!(inb(0x61) & 0x20)) /* OUT2 goes high at terminal count */
		cpu_relax();
	uint64_t t1 = rdtsc();
	outb(0x61, ctl);
	return (uint32_t)((t1 - t0) / 10);
}

/* Asked once: on splitvm each ask is two trapped port accesses (~50 us), and
 * drivers take a deadline for every request they wait on. */
uint32_t platform_tsc_khz(void)
{
	if (!tsc_khz_cache)
		tsc_khz_cache = on_splitvm ? spvm_info(SPVM_INFO_TSC_KHZ) : calibrate_tsc_khz();
	return tsc_khz_cache;
}

size_t platform_cmdline(char *buf, size_t size)
{
	size_t n = 0;
	bool cut = false;

	if (size == 0)
		return 0;
	if (on_splitvm) {
		uint32_t len = spvm_info(SPVM_INFO_CMDLINE_LEN);
		for (uint32_t i = 0; i < len; i++) {
			char c = (char)inb(SPVM_PORT_CMDLINE);
			if (n + 1 < size)
				buf[n++] = c;
			else
				cut = true;
		}
	} else if (mbi && (mbi->flags & MB_INFO_CMDLINE) && mbi->cmdline) {
		/* QEMU passes "KERNEL-FILE ARGS": drop the file name. */
		const char *s = (const char *)(uintptr_t)mbi->cmdline;
		while (*s && *s != ' ')
			s++;
		while (*s == ' ')
			s++;
		while (*s && n + 1 < size)
			buf[n++] = *s++;
		cut = *s != '\0';
	}
	buf[n] = '\0';
	if (cut)
		kprintf("command line cut to its first %lu bytes\n", (unsigned long)n);
	return n;
}

void platform_wait_irq(uint32_t usec)
{
	if (on_splitvm)
		outl(SPVM_PORT_WAIT, usec);
}

/* Last resort when no exit mechanism worked.  No hlt: on splitvm we run at
 * CPL 3, where it would fault. */
static __attribute__((noreturn)) void spin_forever(void)
{
	for (;;)
		cpu_relax();
}

uint64_t platform_deadline_ns(uint64_t ns)
{
	uint64_t khz = platform_tsc_khz();

	return rdtsc() + (ns * (khz ? khz : 1000000) + 999999) / 1000000;
}

bool platform_expired(uint64_t deadline)
{
	return (int64_t)(rdtsc() - deadline) > 0;
}

/* Busy-wait using the (calibrated) TSC. */
static void delay_ms(uint32_t ms)
{
	uint64_t end = platform_deadline_ms(ms);

	while (!platform_expired(end))
		cpu_relax();
}

__attribute__((noreturn)) void platform_park(void)
{
	for (;;)
		outl(SPVM_PORT_WAIT, 1000000);
}

__attribute__((noreturn)) void platform_exit(uint32_t code)
{
	if (on_splitvm) {
		outl(SPVM_PORT_EXIT, code);
		platform_park();
	}
	/* QEMU exits with status (code << 1) | 1. */
	outl(QEMU_DEBUG_EXIT_PORT, code);
	kputs("exit: isa-debug-exit not present, powering off\n");
	outw(ACPI_PM1A_CNT, ACPI_SLP_EN);
	delay_ms(1000);
	kputs("exit: no exit mechanism worked\n");
	spin_forever();
}

__attribute__((noreturn)) void platform_poweroff(void)
{
	if (on_splitvm) {
		outl(SPVM_PORT_EXIT, 0);
		platform_park();
	}
	outw(ACPI_PM1A_CNT, ACPI_SLP_EN);
	/* QEMU acts on the ACPI request asynchronously in its main loop:
	 * give it time before falling back to isa-debug-exit. */
	delay_ms(1000);
	outl(QEMU_DEBUG_EXIT_PORT, 0);
	kputs("poweroff: no exit mechanism worked\n");
	spin_forever();
}
