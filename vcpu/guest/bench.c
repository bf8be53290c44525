/* `bench pio PORT [N] [SIZE]`: the guest-visible cost of one trapped port read.
 *
 * Each read is timed with rdtsc around the single `in` instruction, so the figure is
 * the whole round trip a driver sees (exit, routing, backend, resume). Printed in
 * nanoseconds from the TSC frequency the platform reports. */
#include <stdint.h>

#include "bench.h"
#include "io.h"
#include "lib.h"
#include "platform.h"

#define MAX_SAMPLES 65536

static uint32_t samples[MAX_SAMPLES];

/* Shell sort: no recursion, no allocation, fast enough for 64 Ki samples. */
static void sort_u32(uint32_t *a, unsigned n)
{
	static const unsigned gaps[] = { 8929, 3905, 1750, 701, 301, 132, 57, 23, 10, 4, 1 };

	for (unsigned g = 0; g < sizeof(gaps) / sizeof(gaps[0]); g++) {
		unsigned gap = gaps[g];
		for (unsigned i = gap; i < n; i++) {
			uint32_t v = a[i];
			unsigned j = i;
			for (; j >= gap && a[j - gap] > v; j -= gap)
				a[j] = a[j - gap];
			a[j] = v;
		}
	}
}

static uint64_t cycles_to_ns(uint64_t cycles, uint64_t khz)
{
	return khz ? cycles * 1000000 / khz : cycles;
}

void cmd_bench(int argc, char **argv)
{
	uint64_t port, n = 10000, size = 1;
	uint64_t khz = platform_tsc_khz();

	if (argc < 3 || strcmp(argv[1], "pio") || !parse_num(argv[2], &port) || port > 0xFFFF ||
	    (argc > 3 && (!parse_u64(argv[3], &n) || n == 0 || n > MAX_SAMPLES)) ||
	    (argc > 4 && (!parse_u64(argv[4], &size) || (size != 1 && size != 4)))) {
		kputs("usage: bench pio PORT [N<=65536] [SIZE 1|4]\n");
		return;
	}
	uint64_t start = rdtsc();
	for (uint64_t i = 0; i < n; i++) {
		uint64_t t0 = rdtsc();
		if (size == 4)
			(void)inl((uint16_t)port);
		else
			(void)inb((uint16_t)port);
		uint64_t dt = rdtsc() - t0;
		samples[i] = dt > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)dt;
	}
	uint64_t total = rdtsc() - start;
	sort_u32(samples, (unsigned)n);
	kprintf("bench pio port=0x%x n=%lu median_ns=%lu p99_ns=%lu total_us=%lu\n", (unsigned)port, n,
		cycles_to_ns(samples[n / 2], khz), cycles_to_ns(samples[n * 99 / 100], khz),
		cycles_to_ns(total, khz) / 1000);
}
