/* IDE disks (ATA-8 ACS PIO and bus-master DMA) and ATAPI CD-ROMs (PIO).
 *
 * The PIIX3 runs in legacy (compatibility) mode: fixed command blocks at
 * 0x1F0/0x170 and control blocks at 0x3F6/0x376.  BAR4 is the SFF-8038i
 * bus-master block.  No interrupts are used: completion is polled on the
 * alternate status register (which, unlike STATUS, does not acknowledge the
 * interrupt) and on the bus-master status register. */
#include "ide.h"

#include <stdbool.h>
#include <stdint.h>

#include "blk.h"
#include "io.h"
#include "lib.h"
#include "platform.h"
#include "pci.h"

/* Command block offsets (ATA-8 ACS / ATA/ATAPI-6 section 7). */
#define REG_DATA 0
#define REG_ERROR 1 /* read; FEATURES on write */
#define REG_COUNT 2 /* also ATAPI interrupt reason */
#define REG_LBA0 3
#define REG_LBA1 4 /* ATAPI byte count low */
#define REG_LBA2 5 /* ATAPI byte count high */
#define REG_DEVICE 6
#define REG_STATUS 7 /* read; COMMAND on write */

#define ST_ERR 0x01
#define ST_DRQ 0x08
#define ST_DF 0x20
#define ST_BSY 0x80

#define CMD_READ_PIO 0x20
#define CMD_READ_PIO_EXT 0x24
#define CMD_READ_DMA_EXT 0x25
#define CMD_WRITE_PIO 0x30
#define CMD_WRITE_PIO_EXT 0x34
#define CMD_WRITE_DMA_EXT 0x35
#define CMD_PACKET 0xA0
#define CMD_IDENTIFY_PACKET 0xA1
#define CMD_READ_DMA 0xC8
#define CMD_WRITE_DMA 0xCA
#define CMD_FLUSH 0xE7
#define CMD_FLUSH_EXT 0xEA
#define CMD_IDENTIFY 0xEC

/* Bus-master registers (SFF-8038i / PIIX3 datasheet 2.7). */
#define BM_CMD 0
#define BM_STATUS 2
#define BM_PRD 4
#define BMC_START 0x01
#define BMC_READ 0x08 /* direction: device -> memory */
#define BMS_ACTIVE 0x01
#define BMS_ERROR 0x02
#define BMS_IRQ 0x04

#define TIMEOUT_MS 5000
#define PROBE_TIMEOUT_MS 1000
#define ATAPI_BLOCK 2048

struct ide_drive {
	uint16_t base, ctrl, bm; /* bm 0: no bus master */
	uint8_t slave;
	bool atapi, lba48, dma;
	struct blkdev blk;
};

/* One PRD entry per 64 KiB-bounded piece (an entry may not cross one). */
struct prd {
	uint32_t addr;
	uint16_t count; /* 0 means 64 KiB */
	uint16_t flags; /* bit 15: end of table */
};

#define PRD_MAX 8
/* 64-byte aligned, 64 bytes long: never crosses a 64 KiB boundary. */
static struct prd prd_table[2][PRD_MAX] __attribute__((aligned(64)));
static struct ide_drive drives[4];
static uint16_t identify_buf[256];

/* After a device select, a command or a data block, status is valid only 400 ns
 * later (ATA/ATAPI-6 9.5, 9.6: the host waits before reading it).  The TSC times it:
 * the usual four alternate-status reads would be four trapped accesses on splitvm. */
static void delay400(void)
{
	uint64_t end = platform_deadline_ns(400);

	while (!platform_expired(end))
		cpu_relax();
}

static void select_drive(const struct ide_drive *d, uint8_t bits)
{
	outb(d->base + REG_DEVICE, (uint8_t)(0xA0 | bits | (d->slave << 4)));
	delay400();
}

/* Wait for BSY clear (and DRQ set if want_drq). 0, -1 device error, -2 timeout. */
static int wait_ready(const struct ide_drive *d, bool want_drq, uint32_t ms)
{
	uint64_t dl = platform_deadline_ms(ms);

	for (;;) {
		uint8_t s = inb(d->ctrl);
		if (!(s & ST_BSY)) {
			if (s & (ST_ERR | ST_DF))
				return -1;
			if (!want_drq || (s & ST_DRQ))
				return 0;
		}
		if (platform_expired(dl))
			return -2;
	}
}

static int fail(const struct ide_drive *d, const char *what, int rc)
{
	uint8_t st = inb(d->base + REG_STATUS); /* also acknowledges the interrupt */
	if (rc == -2)
		kprintf("%s: %s: timeout (status 0x%02x)\n", d->blk.name, what, st);
	else
		kprintf("%s: %s: error (status 0x%02x error 0x%02x)\n", d->blk.name, what, st,
			inb(d->base + REG_ERROR));
	return -1;
}

/* Device register + LBA/count for a 28-bit or 48-bit command (ATA-8 ACS 4.x):
 * for 48-bit, each register is written twice, high-order byte first. */
static void set_lba(const struct ide_drive *d, bool ext, uint64_t lba, uint32_t count)
{
	uint16_t b = d->base;

	if (ext) {
		outb(b + REG_DEVICE, (uint8_t)(0x40 | (d->slave << 4)));
		outb(b + REG_COUNT, (uint8_t)(count >> 8));
		outb(b + REG_LBA0, (uint8_t)(lba >> 24));
		outb(b + REG_LBA1, (uint8_t)(lba >> 32));
		outb(b + REG_LBA2, (uint8_t)(lba >> 40));
	} else {
		outb(b + REG_DEVICE, (uint8_t)(0xE0 | (d->slave << 4) | ((lba >> 24) & 0xF)));
	}
	outb(b + REG_COUNT, (uint8_t)count); /* 0 = 256 (or 65536 for ext) */
	outb(b + REG_LBA0, (uint8_t)lba);
	outb(b + REG_LBA1, (uint8_t)(lba >> 8));
	outb(b + REG_LBA2, (uint8_t)(lba >> 16));
}

/* Fill the channel's PRD table for buf; false if it cannot be described. */
static bool build_prd(struct prd *t, uintptr_t addr, uint32_t len)
{
	unsigned n = 0;

	if (addr + len > 0x100000000ull || (addr & 1) || (len & 1))
		return false;
	while (len) {
		uint32_t room = 0x10000 - (uint32_t)(addr & 0xFFFF);
		uint32_t piece = len < room ? len : room;
		if (n == PRD_MAX)
			return false;
		t[n].addr = (uint32_t)addr;
		t[n].count = (uint16_t)piece; /* 65536 wraps to 0, as required */
		t[n].flags = 0;
		addr += piece;
		len -= piece;
		n++;
	}
	t[n - 1].flags = 0x8000;
	return true;
}

static int ata_dma(struct ide_drive *d, bool write, uint64_t lba, uint32_t count, void *buf)
{
	struct prd *t = prd_table[d->base == 0x1F0 ? 0 : 1];
	bool ext = d->lba48 && (lba + count > 0x0FFFFFFF || count > 256);
	uint8_t dir = write ? 0 : BMC_READ;
	int rc;

	if (!build_prd(t, (uintptr_t)buf, count * 512))
		return -3; /* caller falls back to PIO */
	select_drive(d, 0);
	if ((rc = wait_ready(d, false, TIMEOUT_MS)))
		return fail(d, "dma", rc);
	outl(d->bm + BM_PRD, (uint32_t)(uintptr_t)t);
	outb(d->bm + BM_CMD, dir);
	outb(d->bm + BM_STATUS, BMS_ERROR | BMS_IRQ); /* write 1 to clear */
	set_lba(d, ext, lba, count);
	outb(d->base + REG_STATUS, write ? (ext ? CMD_WRITE_DMA_EXT : CMD_WRITE_DMA)
					 : (ext ? CMD_READ_DMA_EXT : CMD_READ_DMA));
	outb(d->bm + BM_CMD, dir | BMC_START);

	/* Done when the engine stopped (or raised its interrupt) and the drive
	 * is no longer busy. */
	uint64_t dl = platform_deadline_ms(TIMEOUT_MS);
	uint8_t bms, st;
	for (;;) {
		bms = inb(d->bm + BM_STATUS);
		st = inb(d->ctrl);
		if ((!(bms & BMS_ACTIVE) || (bms & (BMS_IRQ | BMS_ERROR))) && !(st & ST_BSY))
			break;
		if (platform_expired(dl)) {
			outb(d->bm + BM_CMD, dir);
			return fail(d, write ? "write dma" : "read dma", -2);
		}
	}
	outb(d->bm + BM_CMD, dir); /* stop the engine */
	outb(d->bm + BM_STATUS, BMS_ERROR | BMS_IRQ);
	st = inb(d->base + REG_STATUS);
	if ((bms & BMS_ERROR) || (st & (ST_ERR | ST_DF | ST_DRQ)))
		return fail(d, write ? "write dma" : "read dma", -1);
	return 0;
}

/* PIO: one `rep insw/outsw` of 256 words per sector (each a single trap). */
static int ata_pio(struct ide_drive *d, bool write, uint64_t lba, uint32_t count, void *buf)
{
	bool ext = d->lba48 && (lba + count > 0x0FFFFFFF || count > 256);
	uint8_t *p = buf;
	int rc;

	select_drive(d, 0);
	if ((rc = wait_ready(d, false, TIMEOUT_MS)))
		return fail(d, "pio", rc);
	set_lba(d, ext, lba, count);
	outb(d->base + REG_STATUS, write ? (ext ? CMD_WRITE_PIO_EXT : CMD_WRITE_PIO)
					 : (ext ? CMD_READ_PIO_EXT : CMD_READ_PIO));
	for (uint32_t i = 0; i < count; i++, p += 512) {
		delay400();
		if ((rc = wait_ready(d, true, TIMEOUT_MS)))
			return fail(d, write ? "write" : "read", rc);
		if (write)
			outsw(d->base + REG_DATA, p, 256);
		else
			insw(d->base + REG_DATA, p, 256);
	}
	delay400();
	if ((rc = wait_ready(d, false, TIMEOUT_MS)))
		return fail(d, write ? "write" : "read", rc);
	(void)inb(d->base + REG_STATUS);
	return 0;
}

static int ata_rw(struct blkdev *b, bool write, uint64_t lba, uint32_t count, void *buf)
{
	struct ide_drive *d = b->priv;

	if (count == 0)
		return 0;
	if (count > 256 || (!d->lba48 && lba + count > 0x10000000)) {
		kprintf("%s: request out of range\n", b->name);
		return -1;
	}
	if (d->dma) {
		int rc = ata_dma(d, write, lba, count, buf);
		if (rc != -3)
			return rc;
	}
	return ata_pio(d, write, lba, count, buf);
}

static int ata_flush(struct blkdev *b)
{
	struct ide_drive *d = b->priv;
	int rc;

	select_drive(d, 0);
	if ((rc = wait_ready(d, false, TIMEOUT_MS)))
		return fail(d, "flush", rc);
	outb(d->base + REG_STATUS, d->lba48 ? CMD_FLUSH_EXT : CMD_FLUSH);
	delay400();
	if ((rc = wait_ready(d, false, 30000)))
		return fail(d, "flush", rc);
	(void)inb(d->base + REG_STATUS);
	return 0;
}

/* ATAPI PACKET command (ATA-8 ACS 7.18, PIO data-in): returns bytes read
 * or -1.  Each DRQ block is moved with one rep insw. */
static int atapi_packet(struct ide_drive *d, const uint8_t pkt[12], void *buf, uint32_t len,
			bool quiet)
{
	uint32_t off = 0;
	const uint16_t limit = 0xF800; /* byte count limit per DRQ block (even) */
	int rc;

	select_drive(d, 0);
	if ((rc = wait_ready(d, false, TIMEOUT_MS)))
		return quiet ? -1 : fail(d, "packet", rc);
	outb(d->base + REG_ERROR, 0); /* FEATURES: PIO, no overlap */
	outb(d->base + REG_LBA1, (uint8_t)limit);
	outb(d->base + REG_LBA2, (uint8_t)(limit >> 8));
	outb(d->base + REG_STATUS, CMD_PACKET);
	delay400();
	if ((rc = wait_ready(d, true, TIMEOUT_MS)))
		return quiet ? -1 : fail(d, "packet", rc);
	outsw(d->base + REG_DATA, pkt, 6);

	uint64_t dl = platform_deadline_ms(TIMEOUT_MS);
	for (;;) {
		delay400();
		uint8_t st = inb(d->ctrl);
		if (st & ST_BSY) {
			if (platform_expired(dl))
				return quiet ? -1 : fail(d, "packet", -2);
			continue;
		}
		if (st & (ST_ERR | ST_DF))
			return quiet ? (inb(d->base + REG_STATUS), -1) : fail(d, "packet", -1);
		if (!(st & ST_DRQ)) {
			/* Interrupt reason I/O=1 C/D=1: command complete. */
			if ((inb(d->base + REG_COUNT) & 3) == 3)
				break;
			if (platform_expired(dl))
				return quiet ? -1 : fail(d, "packet", -2);
			continue;
		}
		uint32_t n = inb(d->base + REG_LBA1) | (uint32_t)inb(d->base + REG_LBA2) << 8;
		if (n == 0 || off + n > len) {
			kprintf("%s: device sent more data than asked\n", d->blk.name);
			return -1;
		}
		insw(d->base + REG_DATA, (uint8_t *)buf + off, (n + 1) / 2);
		off += n;
		dl = platform_deadline_ms(TIMEOUT_MS);
	}
	(void)inb(d->base + REG_STATUS);
	return (int)off;
}

/* Retry a few times, clearing sense (e.g. UNIT ATTENTION after media
 * change, SPC-4 4.5.6) with REQUEST SENSE in between. */
static int atapi_cmd(struct ide_drive *d, const uint8_t pkt[12], void *buf, uint32_t len,
		     bool quiet)
{
	static uint8_t sense[18];
	const uint8_t req_sense[12] = { 0x03, 0, 0, 0, sizeof(sense), 0 };

	for (int tries = 0; tries < 3; tries++) {
		int n = atapi_packet(d, pkt, buf, len, true);
		if (n >= 0)
			return n;
		(void)atapi_packet(d, req_sense, sense, sizeof(sense), true);
	}
	return atapi_packet(d, pkt, buf, len, quiet);
}

static int atapi_rw(struct blkdev *b, bool write, uint64_t lba, uint32_t count, void *buf)
{
	struct ide_drive *d = b->priv;

	if (write) {
		kprintf("%s: read-only device\n", b->name);
		return -1;
	}
	/* READ(10), MMC/SBC: 32-bit LBA, 16-bit block count. */
	const uint8_t pkt[12] = { 0x28, 0, (uint8_t)(lba >> 24), (uint8_t)(lba >> 16),
				  (uint8_t)(lba >> 8), (uint8_t)lba, 0, (uint8_t)(count >> 8),
				  (uint8_t)count, 0, 0, 0 };
	int n = atapi_cmd(d, pkt, buf, count * ATAPI_BLOCK, false);
	if (n < 0)
		return -1;
	if ((uint32_t)n != count * ATAPI_BLOCK) {
		kprintf("%s: short read\n", b->name);
		return -1;
	}
	return 0;
}

static int atapi_flush(struct blkdev *b)
{
	(void)b;
	return 0;
}

static const struct blk_ops ata_ops = { .rw = ata_rw, .flush = ata_flush };
static const struct blk_ops atapi_ops = { .rw = atapi_rw, .flush = atapi_flush };

/* IDENTIFY PACKET DEVICE into identify_buf, for a drive that showed the ATAPI signature. */
static bool identify_packet(struct ide_drive *d)
{
	d->atapi = true;
	outb(d->base + REG_STATUS, CMD_IDENTIFY_PACKET);
	delay400();
	if (wait_ready(d, true, PROBE_TIMEOUT_MS))
		return false;
	insw(d->base + REG_DATA, identify_buf, 256);
	(void)inb(d->base + REG_STATUS);
	return true;
}

/* IDENTIFY (PACKET) DEVICE into identify_buf; false if nothing answers. */
static bool identify(struct ide_drive *d)
{
	select_drive(d, 0);
	uint8_t st = inb(d->ctrl);
	if (st == 0xFF)
		return false; /* floating bus */
	if (st == 0x00) {
		/* Absent (QEMU reads 0), or a packet device after reset: those keep DRDY
		 * clear until IDENTIFY PACKET DEVICE and show their signature (ATA-8 ACS 9.12). */
		uint8_t mid = inb(d->base + REG_LBA1), high = inb(d->base + REG_LBA2);
		if (!((mid == 0x14 && high == 0xEB) || (mid == 0x69 && high == 0x96)))
			return false;
		return identify_packet(d);
	}
	if (wait_ready(d, false, PROBE_TIMEOUT_MS) == -2)
		return false;
	outb(d->base + REG_COUNT, 0);
	outb(d->base + REG_LBA0, 0);
	outb(d->base + REG_LBA1, 0);
	outb(d->base + REG_LBA2, 0);
	outb(d->base + REG_STATUS, CMD_IDENTIFY);
	delay400();
	if (inb(d->ctrl) == 0)
		return false;
	int rc = wait_ready(d, true, PROBE_TIMEOUT_MS);
	if (rc == -1) {
		/* Packet devices abort IDENTIFY DEVICE and leave their signature
		 * 0x14/0xEB (0x69/0x96 for SATA) in LBA mid/high (ATA-8 ACS 9.12). */
		uint8_t mid = inb(d->base + REG_LBA1), high = inb(d->base + REG_LBA2);
		if (!((mid == 0x14 && high == 0xEB) || (mid == 0x69 && high == 0x96)))
			return false;
		return identify_packet(d);
	}
	if (rc)
		return false;
	insw(d->base + REG_DATA, identify_buf, 256);
	(void)inb(d->base + REG_STATUS);
	return true;
}

static void probe(struct ide_drive *d, uint16_t base, uint16_t ctrl, uint16_t bm, uint8_t slave,
		  const char *name)
{
	d->base = base;
	d->ctrl = ctrl;
	d->slave = slave;
	if (!identify(d))
		return;

	struct blkdev *b = &d->blk;
	memcpy(b->name, name, 4);
	b->ops = d->atapi ? &atapi_ops : &ata_ops;
	b->priv = d;
	b->max_qd = 1;
	if (d->atapi) {
		/* READ CAPACITY(10): last LBA and block length, big-endian. */
		static uint8_t cap[8];
		const uint8_t pkt[12] = { 0x25 };
		uint64_t blocks = 0;
		if (atapi_cmd(d, pkt, cap, sizeof(cap), true) == 8) /* else: no medium */
			blocks = ((uint64_t)cap[0] << 24 | cap[1] << 16 | cap[2] << 8 | cap[3]) + 1;
		b->sector_size = ATAPI_BLOCK;
		b->size = blocks * ATAPI_BLOCK;
		b->ro = b->cdrom = true;
		b->driver = "atapi";
	} else {
		const uint16_t *w = identify_buf;
		/* Word 83 bit 10: 48-bit feature set (valid when bits 15:14 = 01). */
		d->lba48 = (w[83] & 0xC000) == 0x4000 && (w[83] & (1u << 10));
		uint64_t sectors = d->lba48 ? (uint64_t)w[100] | (uint64_t)w[101] << 16 |
						      (uint64_t)w[102] << 32 | (uint64_t)w[103] << 48
					    : (uint64_t)w[60] | (uint64_t)w[61] << 16;
		/* Word 49 bit 8: DMA supported. */
		d->dma = bm && (w[49] & (1u << 8));
		d->bm = d->dma ? bm : 0; /* kept when `ide pio` turns DMA off */
		b->sector_size = 512;
		b->size = sectors * 512;
		b->driver = d->dma ? "ide-dma" : "ide-pio";
	}
	blk_register(b);
}

void ide_init(void)
{
	struct pci_device pci;
	static const char *const names[4] = { "hda", "hdb", "hdc", "hdd" };

	if (!pci_find(0x8086, 0x7010, 0, &pci))
		return;
	uint16_t bm = pci.bar_is_io[4] && pci.bar[4] ? (uint16_t)pci.bar[4] : 0;
	for (unsigned i = 0; i < 4; i++) {
		bool sec = i >= 2;
		probe(&drives[i], sec ? 0x170 : 0x1F0, sec ? 0x376 : 0x3F6,
		      bm ? (uint16_t)(bm + (sec ? 8 : 0)) : 0, (uint8_t)(i & 1), names[i]);
	}
}

/* `ide pio|dma`: choose the transfer mode of every ATA disk (bench disk compares
 * them on one controller). DMA needs the bus master and IDENTIFY word 49 bit 8. */
void cmd_ide(int argc, char **argv)
{
	if (argc != 2 || (strcmp(argv[1], "pio") && strcmp(argv[1], "dma"))) {
		kputs("usage: ide pio|dma\n");
		return;
	}
	bool want_dma = !strcmp(argv[1], "dma");
	for (unsigned i = 0; i < 4; i++) {
		struct ide_drive *d = &drives[i];
		if (!d->blk.name[0] || d->atapi)
			continue;
		if (want_dma && !d->bm) {
			kprintf("%s: no bus-master DMA, staying on PIO\n", d->blk.name);
			continue;
		}
		d->dma = want_dma;
		d->blk.driver = d->dma ? "ide-dma" : "ide-pio";
	}
}
