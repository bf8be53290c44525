/* Platform abstraction: splitvm paravirtual ports vs. QEMU (multiboot). */
#ifndef FW_PLATFORM_H
#define FW_PLATFORM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Probe the splitvm signature port.  mb_info is the multiboot info address
 * when started through the 32-bit multiboot stub, 0 otherwise. */
void platform_init(uint64_t mb_info);

bool platform_is_splitvm(void);
const char *platform_name(void);
uint64_t platform_ram_bytes(void);
unsigned platform_vcpus(void);
uint32_t platform_tsc_khz(void);
/* The TSC value `ns` nanoseconds from now (rounded up), and whether a deadline has passed:
 * every bounded wait in the firmware, from ATA's 400 ns to a 30 s flush. */
uint64_t platform_deadline_ns(uint64_t ns);
bool platform_expired(uint64_t deadline);
static inline uint64_t platform_deadline_ms(uint32_t ms)
{
	return platform_deadline_ns((uint64_t)ms * 1000000u);
}

/* Copy the boot command line (NUL-terminated, truncated to size-1). */
size_t platform_cmdline(char *buf, size_t size);

/* splitvm: sleep in the VMM until an IRQ line is asserted or usec elapse.
 * Elsewhere it just returns. */
void platform_wait_irq(uint32_t usec);

__attribute__((noreturn)) void platform_exit(uint32_t code);
__attribute__((noreturn)) void platform_poweroff(void);

/* Loop forever sleeping in the VMM: used by secondary vCPUs. */
__attribute__((noreturn)) void platform_park(void);

#endif
