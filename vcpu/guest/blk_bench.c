/* `bench disk DEV [read|write] [bs=N] [size=N] [qd=N]`.
 *
 * Sequential transfer of `size` bytes in `bs` requests with up to qd in
 * flight, then (read mode) 1000 random 4 KiB reads.  Per-request latency
 * is submit-to-completion in TSC cycles; throughput counts the whole run
 * (including the final flush for writes).  MBps uses 10^6 bytes. */
#include <stdint.h>

#include "blk.h"
#include "blk_util.h"
#include "io.h"
#include "lib.h"
#include "platform.h"

#define MAX_SAMPLES 65536
#define RAND_OPS 1000
#define RAND_BS 4096

static uint32_t lat[MAX_SAMPLES];

static void sort_u32(uint32_t *a, unsigned n)
{
	static const unsigned gaps[] = { 8929, 3905, 1750, 701, 301, 132, 57, 23, 10, 4, 1 };

	for (unsigned g = 0; g < sizeof(gaps) / sizeof(gaps[0]); g++)
		for (unsigned i = gaps[g]; i < n; i++) {
			uint32_t v = a[i];
			unsigned j = i;
			for (; j >= gaps[g] && a[j - gaps[g]] > v; j -= gaps[g])
				a[j] = a[j - gaps[g]];
			a[j] = v;
		}
}

/* Recognisable write pattern: every 512 bytes start with "SPVMBNCH" and the
 * little-endian byte offset, then bytes (offset/512 + i) & 0xFF. */
static void fill_pattern(uint8_t *p, uint64_t off, uint32_t len)
{
	for (uint32_t s = 0; s < len; s += 512, off += 512) {
		memcpy(p + s, "SPVMBNCH", 8);
		for (int i = 0; i < 8; i++)
			p[s + 8 + i] = (uint8_t)(off >> (8 * i));
		for (uint32_t i = 16; i < 512; i++)
			p[s + i] = (uint8_t)((off >> 9) + i);
	}
}

struct run {
	struct blkdev *d;
	bool write;
	uint32_t bs, qd;
	uint64_t ops;
	uint64_t seed; /* 0: sequential, else LCG state for random offsets */
	uint64_t cycles;
	unsigned nsamples;
};

static uint64_t next_offset(struct run *r, uint64_t i)
{
	if (!r->seed)
		return i * r->bs;
	/* Knuth's MMIX LCG; the high bits are the random ones. */
	r->seed = r->seed * 6364136223846793005ull + 1442695040888963407ull;
	return ((r->seed >> 33) % (r->d->size / r->bs)) * r->bs;
}

static void sample(struct run *r, uint64_t dt)
{
	if (r->nsamples < MAX_SAMPLES)
		lat[r->nsamples++] = dt > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)dt;
}

static int run_sync(struct run *r)
{
	for (uint64_t i = 0; i < r->ops; i++) {
		uint64_t off = next_offset(r, i);
		if (r->write)
			fill_pattern(blk_iobuf, off, r->bs);
		uint64_t t0 = rdtsc();
		if ((r->write ? blk_write_bytes : blk_read_bytes)(r->d, off, r->bs, blk_iobuf))
			return -1;
		sample(r, rdtsc() - t0);
	}
	return 0;
}

/* Keep qd requests in flight; tag t always uses buffer t. */
static int run_queued(struct run *r)
{
	struct blkdev *d = r->d;
	uint64_t t_sub[BLK_MAX_QD];
	uint32_t free_tags = r->qd == 32 ? 0xFFFFFFFFu : (1u << r->qd) - 1;
	uint64_t issued = 0, done = 0;
	uint32_t sec = d->sector_size;

	while (done < r->ops) {
		while (issued < r->ops && free_tags) {
			unsigned t = (unsigned)__builtin_ctz(free_tags);
			uint8_t *buf = blk_iobuf + (uint64_t)t * BLK_MAX_IO;
			uint64_t off = next_offset(r, issued);
			if (r->write)
				fill_pattern(buf, off, r->bs);
			t_sub[t] = rdtsc();
			if (d->ops->submit(d, r->write, off / sec, r->bs / sec, buf, t))
				return -1;
			free_tags &= ~(1u << t);
			issued++;
		}
		unsigned t;
		int st;
		if (d->ops->reap(d, &t, &st))
			return -1;
		sample(r, rdtsc() - t_sub[t]);
		free_tags |= 1u << t;
		done++;
		if (st) {
			kprintf("%s: request failed (status %d)\n", d->name, st);
			/* drain the rest so the queue is idle for the next command */
			while (~free_tags & ((r->qd == 32) ? 0xFFFFFFFFu : (1u << r->qd) - 1)) {
				if (d->ops->reap(d, &t, &st))
					return -1;
				free_tags |= 1u << t;
			}
			return -1;
		}
	}
	return 0;
}

static int run(struct run *r)
{
	int rc;

	r->nsamples = 0;
	uint64_t t0 = rdtsc();
	rc = r->qd > 1 ? run_queued(r) : run_sync(r);
	if (!rc && r->write && r->d->ops->flush(r->d))
		rc = -1;
	r->cycles = rdtsc() - t0;
	return rc;
}

static void report(const struct run *r, const char *mode)
{
	uint64_t khz = platform_tsc_khz();
	uint64_t cyc = r->cycles ? r->cycles : 1;
	uint64_t bytes = r->ops * r->bs;

	if (!khz)
		khz = 1000000;
	sort_u32(lat, r->nsamples);
	/* MB/s x10 = bytes * (khz*1000) / cycles / 10^6 * 10 */
	uint64_t mbps10 = bytes * khz / cyc / 100;
	uint64_t iops = r->ops * khz * 1000 / cyc;
	uint64_t med = r->nsamples ? (uint64_t)lat[r->nsamples / 2] * 1000 / khz : 0;
	uint64_t p99 = r->nsamples ? (uint64_t)lat[(uint64_t)r->nsamples * 99 / 100] * 1000 / khz : 0;
	kprintf("bench disk %s mode=%s bs=%u size=%lu qd=%u MBps=%lu.%lu iops=%lu "
		"lat_median_us=%lu lat_p99_us=%lu\n",
		r->d->name, mode, r->bs, bytes, r->qd, mbps10 / 10, mbps10 % 10, iops, med, p99);
}

static void usage(void)
{
	kputs("usage: bench disk DEV [read|write] [bs=N] [size=N] [qd=N]\n");
}

void cmd_bench_disk(int argc, char **argv)
{
	uint64_t bs = 64 * 1024, size = 4 * 1024 * 1024, qd = 1;
	bool write = false;
	const char *v;

	if (argc < 3) {
		usage();
		return;
	}
	struct blkdev *d = blk_find(argv[2]);
	if (!d) {
		kprintf("bench disk: %s: No such device\n", argv[2]);
		return;
	}
	for (int i = 3; i < argc; i++) {
		if (!strcmp(argv[i], "read"))
			write = false;
		else if (!strcmp(argv[i], "write"))
			write = true;
		else if (!((v = arg_value(argv[i], "bs")) && parse_size(v, &bs)) &&
			 !((v = arg_value(argv[i], "size")) && parse_size(v, &size)) &&
			 !((v = arg_value(argv[i], "qd")) && parse_size(v, &qd))) {
			usage();
			return;
		}
	}
	if (bs == 0 || bs > BLK_MAX_IO || bs % d->sector_size || qd == 0 || qd > BLK_MAX_QD) {
		kprintf("bench disk: need bs a multiple of %u up to %u, qd 1..%u\n", d->sector_size,
			BLK_MAX_IO, BLK_MAX_QD);
		return;
	}
	if (write && d->ro) {
		kprintf("bench disk: %s: Read-only file system\n", d->name);
		return;
	}
	if (qd > d->max_qd || !d->ops->submit)
		qd = d->ops->submit ? d->max_qd : 1; /* IDE: one command at a time */
	if (size > d->size)
		size = d->size;
	struct run r = { .d = d, .write = write, .bs = (uint32_t)bs, .qd = (uint32_t)qd,
			 .ops = size / bs };
	if (r.ops == 0) {
		kprintf("bench disk: %s is smaller than bs\n", d->name);
		return;
	}
	if (run(&r)) {
		kprintf("bench disk: %s: I/O error\n", d->name);
		return;
	}
	report(&r, write ? "write" : "read");
	if (write || d->size < RAND_BS || RAND_BS % d->sector_size)
		return;
	r = (struct run){ .d = d, .bs = RAND_BS, .qd = (uint32_t)qd, .ops = RAND_OPS,
			  .seed = 0x5350564D };
	if (run(&r)) {
		kprintf("bench disk: %s: I/O error\n", d->name);
		return;
	}
	report(&r, "randread");
}
