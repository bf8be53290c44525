/* Block device registry and the lsblk / dd / sha256sum / sync commands.
 * Output formats follow the GNU tools (dd record counts, sha256sum lines)
 * so that transcripts can be checked against the host. */
#include "blk.h"

#include "blk_util.h"
#include "ide.h"
#include "io.h"
#include "lib.h"
#include "platform.h"
#include "sha256.h"
#include "virtio_blk.h"

static struct blkdev *devices[BLK_MAX_DEVS];
static unsigned ndevices;

/* One shared I/O area: BLK_MAX_QD buffers of BLK_MAX_IO bytes (bench uses
 * them all, dd and sha256sum the first).  Page-aligned for DMA. */
uint8_t blk_iobuf[BLK_MAX_QD * BLK_MAX_IO] __attribute__((aligned(4096)));

bool blk_register(const struct blkdev *d)
{
	if (ndevices == BLK_MAX_DEVS)
		return false;
	devices[ndevices++] = (struct blkdev *)d;
	return true;
}

struct blkdev *blk_find(const char *name)
{
	for (unsigned i = 0; i < ndevices; i++)
		if (!strcmp(devices[i]->name, name))
			return devices[i];
	return 0;
}

void blk_init(void)
{
	ide_init();
	virtio_blk_init();
}

int blk_read_bytes(struct blkdev *d, uint64_t off, uint32_t len, void *buf)
{
	return d->ops->rw(d, false, off / d->sector_size, len / d->sector_size, buf);
}

int blk_write_bytes(struct blkdev *d, uint64_t off, uint32_t len, void *buf)
{
	return d->ops->rw(d, true, off / d->sector_size, len / d->sector_size, buf);
}

bool parse_size(const char *s, uint64_t *out)
{
	char num[24];
	size_t n = strlen(s);
	uint64_t mul = 1;

	if (n == 0 || n >= sizeof(num))
		return false;
	switch (s[n - 1]) {
	case 'k': case 'K': mul = 1ull << 10; n--; break;
	case 'm': case 'M': mul = 1ull << 20; n--; break;
	case 'g': case 'G': mul = 1ull << 30; n--; break;
	}
	memcpy(num, s, n);
	num[n] = '\0';
	if (!parse_num(num, out) || *out > UINT64_MAX / mul)
		return false;
	*out *= mul;
	return true;
}

/* Value of "key=value" if arg starts with key=, else NULL. */
const char *arg_value(const char *arg, const char *key)
{
	size_t n = strlen(key);
	if (memcmp(arg, key, n) || arg[n] != '=')
		return 0;
	return arg + n + 1;
}

void cmd_lsblk(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	for (unsigned i = 0; i < ndevices; i++) {
		const struct blkdev *d = devices[i];
		kprintf("%s %lu %s %s%s\n", d->name, d->size, d->cdrom ? "cdrom" : "disk", d->driver,
			d->ro ? " ro" : "");
	}
}

void cmd_sync(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	for (unsigned i = 0; i < ndevices; i++)
		if (!devices[i]->ro && devices[i]->ops->flush(devices[i]))
			kprintf("sync: %s: flush failed\n", devices[i]->name);
}

static void dd_usage(void)
{
	kputs("usage: dd if=DEV of=DEV [bs=N] [count=N] [skip=N] [seek=N]  (bs <= 64K)\n");
}

void cmd_dd(int argc, char **argv)
{
	const char *in_name = 0, *out_name = 0, *v;
	uint64_t bs = 512, count = UINT64_MAX, skip = 0, seek = 0;

	for (int i = 1; i < argc; i++) {
		if ((v = arg_value(argv[i], "if")))
			in_name = v;
		else if ((v = arg_value(argv[i], "of")))
			out_name = v;
		else if (((v = arg_value(argv[i], "bs")) && parse_size(v, &bs)) ||
			 ((v = arg_value(argv[i], "count")) && parse_size(v, &count)) ||
			 ((v = arg_value(argv[i], "skip")) && parse_size(v, &skip)) ||
			 ((v = arg_value(argv[i], "seek")) && parse_size(v, &seek)))
			continue;
		else {
			kprintf("dd: invalid operand '%s'\n", argv[i]);
			dd_usage();
			return;
		}
	}
	if (!in_name || !out_name || bs == 0 || bs > BLK_MAX_IO) {
		dd_usage();
		return;
	}
	struct blkdev *in = blk_find(in_name), *out = blk_find(out_name);
	if (!in) {
		kprintf("dd: failed to open '%s': No such file or directory\n", in_name);
		return;
	}
	if (!out) {
		kprintf("dd: failed to open '%s': No such file or directory\n", out_name);
		return;
	}
	if (out->ro) {
		kprintf("dd: failed to open '%s': Read-only file system\n", out_name);
		return;
	}
	if (bs % in->sector_size || bs % out->sector_size) {
		kprintf("dd: bs=%lu is not a multiple of the sector size (%s %u, %s %u)\n", bs,
			in->name, in->sector_size, out->name, out->sector_size);
		return;
	}
	if (skip > in->size / bs) {
		kprintf("dd: '%s': cannot skip to specified offset\n", in_name);
		return;
	}
	if (seek > out->size / bs) {
		kprintf("dd: '%s': cannot seek: Invalid argument\n", out_name);
		return;
	}

	uint64_t in_off = skip * bs, out_off = seek * bs;
	uint64_t full_in = 0, part_in = 0, full_out = 0, part_out = 0;
	for (uint64_t n = 0; n < count && in_off < in->size; n++) {
		uint64_t left = in->size - in_off;
		uint32_t len = (uint32_t)(left < bs ? left : bs);
		if (blk_read_bytes(in, in_off, len, blk_iobuf)) {
			kprintf("dd: error reading '%s': Input/output error\n", in_name);
			break;
		}
		in_off += len;
		if (len == bs)
			full_in++;
		else
			part_in++;
		uint64_t room = out->size - out_off;
		uint32_t wlen = (uint32_t)(room < len ? room : len);
		wlen -= wlen % out->sector_size;
		if (wlen && blk_write_bytes(out, out_off, wlen, blk_iobuf)) {
			kprintf("dd: error writing '%s': Input/output error\n", out_name);
			break;
		}
		out_off += wlen;
		if (wlen == bs)
			full_out++;
		else if (wlen)
			part_out++;
		if (wlen < len) {
			kprintf("dd: error writing '%s': No space left on device\n", out_name);
			break;
		}
	}
	if (out->ops->flush(out))
		kprintf("dd: fsync failed for '%s': Input/output error\n", out_name);
	kprintf("%lu+%lu records in\n%lu+%lu records out\n", full_in, part_in, full_out, part_out);
}

void cmd_sha256sum(int argc, char **argv)
{
	static const char hex[] = "0123456789abcdef";
	uint64_t len;
	struct sha256 s;
	uint8_t digest[32];
	char out[65];

	if (argc == 2 && !strcmp(argv[1], "--selftest")) {
		kputs(sha256_selftest() ? "sha256: selftest OK\n" : "sha256: selftest FAILED\n");
		return;
	}
	if (argc < 2 || argc > 3 || (argc == 3 && !parse_size(argv[2], &len))) {
		kputs("usage: sha256sum DEV [BYTES] | sha256sum --selftest\n");
		return;
	}
	struct blkdev *d = blk_find(argv[1]);
	if (!d) {
		kprintf("sha256sum: %s: No such file or directory\n", argv[1]);
		return;
	}
	if (argc == 2)
		len = d->size;
	else if (len > d->size) {
		kprintf("sha256sum: %s: only %lu bytes\n", d->name, d->size);
		return;
	}
	sha256_init(&s);
	for (uint64_t off = 0; off < len;) {
		uint64_t want = len - off;
		uint32_t chunk = want < BLK_MAX_IO ? (uint32_t)want : BLK_MAX_IO;
		/* Whole sectors from the device; hash only the bytes asked for. */
		uint32_t rd = (chunk + d->sector_size - 1) / d->sector_size * d->sector_size;
		if (blk_read_bytes(d, off, rd, blk_iobuf)) {
			kprintf("sha256sum: %s: Input/output error\n", d->name);
			return;
		}
		sha256_update(&s, blk_iobuf, chunk);
		off += chunk;
	}
	sha256_final(&s, digest);
	for (int i = 0; i < 32; i++) {
		out[2 * i] = hex[digest[i] >> 4];
		out[2 * i + 1] = hex[digest[i] & 15];
	}
	out[64] = '\0';
	kprintf("%s  %s\n", out, d->name);
}
