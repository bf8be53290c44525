/* Firmware entry and the interactive shell on the serial console. */
#include <stdbool.h>
#include <stdint.h>

#include "bench.h"
#include "blk.h"
#include "fat.h"
#include "ide.h"
#include "lib.h"
#include "pci.h"
#include "platform.h"
#include "serial.h"
#include "tools.h"

#define PROMPT "splitvm> "
#define LINE_MAX 256
#define CMDLINE_MAX 4096 /* vcpu/platform.py CMDLINE_MAX: the broker refuses longer */
#define MAX_ARGS 16

void fw_main(uint64_t cpu_index, uint64_t mb_info);

/* --- line input ---------------------------------------------------- */

/* Set after a '\r' so that the '\n' of a "\r\n" pair is not taken as a
 * second (empty) line.  Piped input ends lines with '\n' alone. */
static bool last_was_cr;

static void read_line(char *buf, unsigned size)
{
	unsigned len = 0;

	for (;;) {
		int c = serial_getc();
		bool skip_lf = last_was_cr && c == '\n';

		last_was_cr = c == '\r';
		if (skip_lf)
			continue;
		if (c == '\r' || c == '\n') {
			serial_putc('\n');
			buf[len] = '\0';
			return;
		}
		if (c == 0x7F || c == 0x08) {
			if (len) {
				len--;
				kputs("\b \b"); /* erase it on the terminal */
			}
			continue;
		}
		if (c < 0x20 || c > 0x7E)
			continue; /* ignore other control bytes */
		if (len + 1 < size) {
			buf[len++] = (char)c;
			serial_putc((char)c); /* echo, like a terminal */
		}
	}
}

/* --- commands ------------------------------------------------------ */

static void cmd_help(int argc, char **argv);

static void cmd_echo(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
		kprintf(i > 1 ? " %s" : "%s", argv[i]);
	kputs("\n");
}

static void cmd_mem(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	/* Round to nearest MiB: multiboot mem_upper may lose a little. */
	kprintf("RAM: %lu MiB\n", (platform_ram_bytes() + (1u << 19)) >> 20);
}

static void cmd_lspci(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	pci_list();
}

static void cmd_info(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	kprintf("platform: %s\n", platform_name());
	kprintf("vCPUs: %u\n", platform_vcpus());
	kprintf("TSC: %u kHz\n", platform_tsc_khz());
}

static void cmd_exit(int argc, char **argv)
{
	uint64_t code = 0;

	if (argc > 2 || (argc == 2 && (!parse_u64(argv[1], &code) ||
				       code > UINT32_MAX))) {
		kputs("usage: exit N\n");
		return;
	}
	platform_exit((uint32_t)code);
}

static void cmd_poweroff(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	platform_poweroff();
}

static void cmd_count(int argc, char **argv)
{
	uint64_t n, width = 6;

	if (argc < 2 || argc > 3 || !parse_u64(argv[1], &n) ||
	    (argc == 3 && (!parse_u64(argv[2], &width) || width > 20))) {
		kputs("usage: count N [WIDTH]  (WIDTH <= 20)\n");
		return;
	}
	for (uint64_t i = 0; i < n; i++)
		kprintf("%0*lu\n", (int)width, i);
}

/* `bench disk ...` lives in blk_bench.c, `bench pio ...` in bench.c. */
static void cmd_bench_any(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "disk"))
		cmd_bench_disk(argc, argv);
	else
		cmd_bench(argc, argv);
}

static const struct command {
	const char *name;
	const char *usage;
	const char *help;
	void (*run)(int argc, char **argv);
} commands[] = {
	{ "help", "help", "list commands", cmd_help },
	{ "echo", "echo ARGS...", "print ARGS separated by spaces", cmd_echo },
	{ "mem", "mem", "show the RAM size", cmd_mem },
	{ "lspci", "lspci", "list PCI functions and their BARs", cmd_lspci },
	{ "info", "info", "show platform, vCPU count and TSC frequency",
	  cmd_info },
	{ "count", "count N [WIDTH]",
	  "print 0..N-1, zero-padded to WIDTH digits (default 6)", cmd_count },
	{ "bench", "bench pio PORT [N] / bench disk DEV ...", "time port reads or disk I/O",
	  cmd_bench_any },
	{ "lsblk", "lsblk", "list block devices: NAME SIZE TYPE DRIVER [ro]", cmd_lsblk },
	{ "dd", "dd if= of= [bs=] [count=] [skip=] [seek=]", "copy blocks between devices",
	  cmd_dd },
	{ "sha256sum", "sha256sum DEV [BYTES]", "SHA-256 of a device (or its first BYTES)",
	  cmd_sha256sum },
	{ "sync", "sync", "flush the write caches of all devices", cmd_sync },
	{ "fatlabel", "fatlabel DEV", "print the volume label of a FAT file system", cmd_fatlabel },
	{ "ide", "ide pio|dma", "transfer mode of the IDE disks", cmd_ide },
	{ "peek", "peek ADDR", "32-bit read of memory or MMIO", cmd_peek },
	{ "poke", "poke ADDR VAL", "32-bit write of memory or MMIO", cmd_poke },
	{ "in", "in PORT [b|w|l]", "read an I/O port", cmd_in },
	{ "out", "out PORT VAL [b|w|l]", "write an I/O port", cmd_out },
	{ "pcicfg", "pcicfg DD.F REG [VAL]", "read or write PCI config space (bus 0)", cmd_pcicfg },
	{ "exit", "exit N", "exit the VM with status N", cmd_exit },
	{ "poweroff", "poweroff", "power off (exit status 0)", cmd_poweroff },
};

#define NCOMMANDS (sizeof(commands) / sizeof(commands[0]))

static void cmd_help(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	for (unsigned i = 0; i < NCOMMANDS; i++)
		kprintf("%-17s %s\n", commands[i].usage, commands[i].help);
}

/* Split `line` in place on spaces/tabs and run the command. */
static void run_command(char *line)
{
	char *argv[MAX_ARGS];
	int argc = 0;

	for (char *p = line; *p;) {
		while (*p == ' ' || *p == '\t')
			*p++ = '\0';
		if (!*p)
			break;
		if (argc == MAX_ARGS) {
			kputs("too many arguments\n");
			return;
		}
		argv[argc++] = p;
		while (*p && *p != ' ' && *p != '\t')
			p++;
	}
	if (argc == 0)
		return;

	for (unsigned i = 0; i < NCOMMANDS; i++)
		if (!strcmp(argv[0], commands[i].name)) {
			commands[i].run(argc, argv);
			return;
		}
	kprintf("unknown command: %s\n", argv[0]);
}

/* Run the boot command line: ';'-separated commands, each shown as if
 * typed at the prompt. */
static void run_boot_commands(char *s)
{
	while (*s) {
		char *cmd = s;
		while (*s && *s != ';')
			s++;
		if (*s)
			*s++ = '\0';
		while (*cmd == ' ' || *cmd == '\t')
			cmd++;
		char *end = cmd + strlen(cmd);
		while (end > cmd && (end[-1] == ' ' || end[-1] == '\t'))
			*--end = '\0';
		if (!*cmd)
			continue;
		kprintf(PROMPT "%s\n", cmd);
		run_command(cmd);
	}
}

/* Called from start.S on both boot paths.  cpu_index is the vCPU number
 * (always 0 under QEMU); mb_info is the multiboot info address or 0. */
void fw_main(uint64_t cpu_index, uint64_t mb_info)
{
	static char cmdline[CMDLINE_MAX];
	static char line[LINE_MAX];

	if (cpu_index != 0)
		platform_park(); /* touches no shared state */

	platform_init(mb_info);
	serial_init();
	if (!platform_is_splitvm())
		kputs("\n"); /* SeaBIOS leaves the cursor after "Booting from ROM.." */
	kputs("splitvm firmware\n");
	pci_init();
	blk_init(); /* IDE and virtio-blk disks */

	if (platform_cmdline(cmdline, sizeof(cmdline)))
		run_boot_commands(cmdline);

	for (;;) {
		kputs(PROMPT);
		read_line(line, sizeof(line));
		run_command(line);
	}
}
