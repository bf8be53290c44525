/* A user's own freestanding guest for `splitvm -kernel`: it runs in 64-bit long mode
 * at CPL 3 with IOPL 3 (in/out allowed, no hlt/cli/sti), RSP set, RDI = vCPU index.
 * Build: gcc -O2 -ffreestanding -nostdlib -static -fno-pic -no-pie -mno-red-zone \
 *            -Wl,-Ttext=0x200000 -Wl,--build-id=none -o hello.elf hello.c
 */
static inline void outb(unsigned short port, unsigned char v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(unsigned short port, unsigned int v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

void _start(unsigned long cpu)
{
	const char *s = "Hello from my own guest\n";

	if (cpu != 0)
		for (;;)
			outl(0x508, 1000000); /* secondary vCPUs wait (platform port) */
	while (*s)
		outb(0x3f8, *s++); /* COM1 THR: splitvm's 16550 sends it at once */
	outl(0x504, 9);            /* platform exit port: splitvm exits with 9 */
	for (;;)
		;
}
