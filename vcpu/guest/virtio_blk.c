/* virtio-blk driver using the virtio 1.x PCI transport (spec 4.1) and a
 * split virtqueue (2.7).  Interrupts are suppressed (VIRTQ_AVAIL_F_NO_INTERRUPT)
 * and the used ring is polled.  Each in-flight request owns a fixed slot of
 * three descriptors: header, data, status (5.2.6). */
#include "virtio_blk.h"

#include <stdbool.h>
#include <stdint.h>

#include "blk.h"
#include "io.h"
#include "lib.h"
#include "pci.h"
#include "platform.h"

#define MAX_DEVS 4
#define QSIZE_MAX 256
#define SLOTS BLK_MAX_QD
#define TIMEOUT_MS 5000
#define SPIN_US 1000 /* poll the used ring this long before sleeping */
#define SLEEP_US 1000 /* a sleep ends sooner on the device's interrupt */

/* PCI capability types (4.1.4). */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4

/* Common configuration layout (4.1.4.3). */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0C
#define CC_STATUS 0x14
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_ENABLE 0x1C
#define CC_Q_NOFF 0x1E
#define CC_Q_DESC 0x20
#define CC_Q_AVAIL 0x28
#define CC_Q_USED 0x30

/* Device status bits (2.1). */
#define S_ACK 0x01
#define S_DRIVER 0x02
#define S_DRIVER_OK 0x04
#define S_FEATURES_OK 0x08
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

/* Feature bits (5.2.3, 6). */
#define F_SEG_MAX (1ull << 2)
#define F_RO (1ull << 5)
#define F_BLK_SIZE (1ull << 6)
#define F_FLUSH (1ull << 9)
#define F_VERSION_1 (1ull << 32)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4

#define D_NEXT 1
#define D_WRITE 2 /* device writes this buffer */

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[QSIZE_MAX];
	uint16_t used_event;
};

struct vq_used {
	uint16_t flags;
	uint16_t idx;
	struct {
		uint32_t id;
		uint32_t len;
	} ring[QSIZE_MAX];
	uint16_t avail_event;
};

struct req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

struct vblk {
	volatile uint8_t *common, *isr, *cfg;
	volatile uint16_t *notify;
	uint16_t qsize, avail_idx, used_seen;
	unsigned nslots;
	bool broken;
	struct vq_desc *desc;
	volatile struct vq_avail *avail;
	volatile struct vq_used *used;
	struct req_hdr hdr[SLOTS];
	volatile uint8_t status[SLOTS];
	bool busy[SLOTS];
	struct blkdev blk;
};

/* Alignments from 2.7: desc 16, avail 2, used 4; page-aligned is simpler. */
static struct vq_desc ring_desc[MAX_DEVS][QSIZE_MAX] __attribute__((aligned(4096)));
static struct vq_avail ring_avail[MAX_DEVS] __attribute__((aligned(4096)));
static struct vq_used ring_used[MAX_DEVS] __attribute__((aligned(4096)));
static struct vblk devs[MAX_DEVS];

static inline void mb(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

static inline uint8_t r8(volatile uint8_t *b, unsigned o) { return b[o]; }
static inline uint16_t r16(volatile uint8_t *b, unsigned o) { return *(volatile uint16_t *)(b + o); }
static inline uint32_t r32(volatile uint8_t *b, unsigned o) { return *(volatile uint32_t *)(b + o); }
static inline void w8(volatile uint8_t *b, unsigned o, uint8_t v) { b[o] = v; }
static inline void w16(volatile uint8_t *b, unsigned o, uint16_t v) { *(volatile uint16_t *)(b + o) = v; }
static inline void w32(volatile uint8_t *b, unsigned o, uint32_t v) { *(volatile uint32_t *)(b + o) = v; }

/* 64-bit fields are written as two 32-bit halves, low first (4.1.3.1). */
static void w64(volatile uint8_t *b, unsigned o, uint64_t v)
{
	w32(b, o, (uint32_t)v);
	w32(b, o + 4, (uint32_t)(v >> 32));
}

static uint8_t cfg_byte(const struct pci_device *p, uint8_t reg)
{
	return (uint8_t)(pci_cfg_read32(p->dev, p->fn, reg & 0xFC) >> (8 * (reg & 3)));
}

static bool check_status(struct vblk *v)
{
	if (v->broken)
		return false;
	uint8_t s = r8(v->common, CC_STATUS);
	if (s & (S_NEEDS_RESET | S_FAILED)) {
		kprintf("%s: device needs reset (status 0x%02x)\n", v->blk.name, s);
		v->broken = true;
		return false;
	}
	return true;
}

static int vblk_submit_req(struct vblk *v, uint32_t type, uint64_t lba, uint32_t count, void *buf,
			   unsigned s)
{
	/* No status read here: it is MMIO, a trap per request on splitvm. A device that
	 * needs a reset is noticed while waiting for completions (vblk_reap). */
	if (v->broken)
		return -1;
	if (s >= v->nslots || v->busy[s]) {
		kprintf("%s: tag %u busy\n", v->blk.name, s);
		return -1;
	}
	/* Sectors are always 512 bytes in the request header (5.2.6). */
	v->hdr[s] = (struct req_hdr){ .type = type, .sector = lba * (v->blk.sector_size / 512) };
	v->status[s] = 0xFF;
	struct vq_desc *d = &v->desc[3 * s];
	uint16_t head = (uint16_t)(3 * s);
	d[0] = (struct vq_desc){ (uintptr_t)&v->hdr[s], sizeof(struct req_hdr), D_NEXT,
				 (uint16_t)(head + 1) };
	if (count) {
		d[1] = (struct vq_desc){ (uintptr_t)buf, count * v->blk.sector_size,
					 (uint16_t)(D_NEXT | (type == T_IN ? D_WRITE : 0)),
					 (uint16_t)(head + 2) };
		d[2] = (struct vq_desc){ (uintptr_t)&v->status[s], 1, D_WRITE, 0 };
	} else {
		d[0].next = (uint16_t)(head + 2);
		d[2] = (struct vq_desc){ (uintptr_t)&v->status[s], 1, D_WRITE, 0 };
	}
	v->busy[s] = true;
	v->avail->ring[v->avail_idx % v->qsize] = head;
	mb(); /* descriptors and ring entry before the index (2.7.13) */
	v->avail->idx = ++v->avail_idx;
	mb();
	/* VIRTQ_USED_F_NO_NOTIFY: the device is busy with the queue and will see this
	 * request without a kick, which would cost a trap (2.7.10). */
	if (!(v->used->flags & 1))
		*v->notify = 0; /* queue index 0 (4.1.4.4) */
	return 0;
}

/* Nothing came during a spin of SPIN_US: sleep until the device interrupts. Enable
 * used-buffer notifications, then look at the used ring again before sleeping: a
 * completion made before the device could see the flag is found here, one made after
 * raises INTx (2.7.7, 2.7.10).  The ISR read that lowers the line (4.1.4.5) is a trap
 * to the device, so it is made only when something completed while interrupts were
 * on; a device that is stalled (stopped, restarting) is not waited for twice. */
static void vblk_sleep(struct vblk *v)
{
	v->avail->flags = 0;
	mb();
	if (v->used->idx == v->used_seen)
		platform_wait_irq(SLEEP_US);
	v->avail->flags = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT again: we poll */
	mb(); /* the flag before the used idx: a later completion sees it, or we see it */
	if (v->used->idx != v->used_seen)
		(void)r8(v->isr, 0);
}

/* Wait for one completion: its slot and virtio status (0 = OK). */
static int vblk_reap(struct blkdev *b, unsigned *tag, int *status)
{
	struct vblk *v = b->priv;
	uint64_t dl = platform_deadline_ms(TIMEOUT_MS);
	uint64_t spin_end = platform_deadline_ns(SPIN_US * 1000u);
	unsigned checks = 0;

	while (v->used->idx == v->used_seen) {
		/* Status is MMIO (a trap on splitvm): check it only now and then. */
		if (++checks % 16384 == 0 && !check_status(v))
			return -1;
		if (platform_expired(dl)) {
			kprintf("%s: timeout\n", b->name);
			check_status(v);
			return -1;
		}
		if (platform_is_splitvm() && platform_expired(spin_end)) {
			vblk_sleep(v);
			spin_end = platform_deadline_ns(SPIN_US * 1000u);
		} else {
			cpu_relax();
		}
	}
	mb();
	uint32_t id = v->used->ring[v->used_seen % v->qsize].id;
	v->used_seen++;
	unsigned s = id / 3;
	if (s >= v->nslots || !v->busy[s]) {
		kprintf("%s: bogus used id %u\n", b->name, id);
		v->broken = true;
		return -1;
	}
	v->busy[s] = false;
	*tag = s;
	*status = v->status[s];
	return 0;
}

static int vblk_submit(struct blkdev *b, bool write, uint64_t lba, uint32_t count, void *buf,
		       unsigned tag)
{
	return vblk_submit_req(b->priv, write ? T_OUT : T_IN, lba, count, buf, tag);
}

static int vblk_sync(struct vblk *v, uint32_t type, uint64_t lba, uint32_t count, void *buf)
{
	unsigned got;
	int st;

	/* Synchronous callers never overlap queued ones: slot 0 is free. */
	if (vblk_submit_req(v, type, lba, count, buf, 0))
		return -1;
	do {
		if (vblk_reap(&v->blk, &got, &st))
			return -1;
	} while (got != 0);
	if (st) {
		kprintf("%s: request failed (virtio status %d)\n", v->blk.name, st);
		return -1;
	}
	return 0;
}

static int vblk_rw(struct blkdev *b, bool write, uint64_t lba, uint32_t count, void *buf)
{
	struct vblk *v = b->priv;

	if (write && b->ro) {
		kprintf("%s: read-only device\n", b->name);
		return -1;
	}
	return count ? vblk_sync(v, write ? T_OUT : T_IN, lba, count, buf) : 0;
}

static int vblk_flush(struct blkdev *b)
{
	return b->ro ? 0 : vblk_sync(b->priv, T_FLUSH, 0, 0, 0);
}

static int vblk_flush_feature(struct blkdev *b)
{
	(void)b;
	return 0; /* no VIRTIO_BLK_F_FLUSH: the device has no volatile cache */
}

static const struct blk_ops ops = {
	.rw = vblk_rw, .flush = vblk_flush, .submit = vblk_submit, .reap = vblk_reap
};
static const struct blk_ops ops_noflush = {
	.rw = vblk_rw, .flush = vblk_flush_feature, .submit = vblk_submit, .reap = vblk_reap
};

/* Walk the capability list for the virtio structures (4.1.4). */
static bool find_caps(struct vblk *v, const struct pci_device *p)
{
	uint32_t notify_mult = 0;
	volatile uint8_t *notify_base = 0;

	if (!(pci_cfg_read32(p->dev, p->fn, 0x04) & (1u << 20)))
		return false; /* status bit 4: no capability list */
	uint8_t ptr = cfg_byte(p, 0x34) & 0xFC;
	for (int guard = 0; ptr && guard < 48; guard++) {
		uint32_t w0 = pci_cfg_read32(p->dev, p->fn, ptr);
		uint8_t next = (uint8_t)(w0 >> 8) & 0xFC;
		if ((w0 & 0xFF) == 0x09) { /* vendor-specific */
			uint8_t type = (uint8_t)(w0 >> 24);
			uint8_t bar = cfg_byte(p, (uint8_t)(ptr + 4));
			uint32_t off = pci_cfg_read32(p->dev, p->fn, (uint8_t)(ptr + 8));
			if (bar < 6 && p->bar[bar] && !p->bar_is_io[bar]) {
				volatile uint8_t *a =
					(volatile uint8_t *)(uintptr_t)(p->bar[bar] + off);
				if (type == CAP_COMMON && !v->common)
					v->common = a;
				else if (type == CAP_NOTIFY && !notify_base) {
					notify_base = a;
					notify_mult = pci_cfg_read32(p->dev, p->fn,
								     (uint8_t)(ptr + 16));
				} else if (type == CAP_ISR && !v->isr)
					v->isr = a;
				else if (type == CAP_DEVICE && !v->cfg)
					v->cfg = a;
			}
		}
		ptr = next;
	}
	if (!v->common || !notify_base || !v->isr || !v->cfg)
		return false;
	w16(v->common, CC_Q_SELECT, 0);
	v->notify = (volatile uint16_t *)(notify_base +
					  (uint32_t)r16(v->common, CC_Q_NOFF) * notify_mult);
	return true;
}

/* Initialisation sequence of 3.1.1. */
static bool setup(struct vblk *v, unsigned idx)
{
	volatile uint8_t *c = v->common;
	uint64_t dl = platform_deadline_ms(1000);

	w8(c, CC_STATUS, 0); /* reset; done when it reads back 0 (4.1.4.3.2) */
	while (r8(c, CC_STATUS)) {
		if (platform_expired(dl))
			return false;
	}
	w8(c, CC_STATUS, S_ACK);
	w8(c, CC_STATUS, S_ACK | S_DRIVER);

	w32(c, CC_DFSELECT, 0);
	uint64_t feat = r32(c, CC_DF);
	w32(c, CC_DFSELECT, 1);
	feat |= (uint64_t)r32(c, CC_DF) << 32;
	if (!(feat & F_VERSION_1)) {
		kprintf("%s: no VIRTIO_F_VERSION_1\n", v->blk.name);
		return false;
	}
	feat &= F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_RO;
	w32(c, CC_GFSELECT, 0);
	w32(c, CC_GF, (uint32_t)feat);
	w32(c, CC_GFSELECT, 1);
	w32(c, CC_GF, (uint32_t)(feat >> 32));
	w8(c, CC_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	if (!(r8(c, CC_STATUS) & S_FEATURES_OK)) {
		kprintf("%s: features not accepted\n", v->blk.name);
		return false;
	}

	w16(c, CC_Q_SELECT, 0);
	uint16_t qs = r16(c, CC_Q_SIZE);
	if (qs == 0)
		return false;
	if (qs > QSIZE_MAX)
		qs = QSIZE_MAX;
	while (qs & (qs - 1)) /* split rings: a power of 2 (2.7) */
		qs &= (uint16_t)(qs - 1);
	if (qs < 3)
		return false;
	v->qsize = qs;
	v->nslots = qs / 3 < SLOTS ? qs / 3 : SLOTS;
	v->desc = ring_desc[idx];
	v->avail = &ring_avail[idx];
	v->used = &ring_used[idx];
	v->avail->flags = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
	w16(c, CC_Q_SIZE, qs);
	w64(c, CC_Q_DESC, (uintptr_t)v->desc);
	w64(c, CC_Q_AVAIL, (uintptr_t)v->avail);
	w64(c, CC_Q_USED, (uintptr_t)v->used);
	w16(c, CC_Q_ENABLE, 1);
	w8(c, CC_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

	/* Device configuration (5.2.4): capacity in 512-byte sectors. */
	uint64_t cap = r32(v->cfg, 0) | (uint64_t)r32(v->cfg, 4) << 32;
	uint32_t bsz = (feat & F_BLK_SIZE) ? r32(v->cfg, 20) : 512;
	if (bsz < 512 || bsz > 4096 || (bsz & (bsz - 1)))
		bsz = 512;
	v->blk.sector_size = bsz;
	v->blk.size = cap * 512;
	v->blk.ro = (feat & F_RO) != 0;
	v->blk.ops = (feat & F_FLUSH) ? &ops : &ops_noflush;
	return check_status(v);
}

void virtio_blk_init(void)
{
	static const uint16_t ids[2] = { 0x1001, 0x1042 };
	struct pci_device found[MAX_DEVS];
	unsigned n = 0;

	/* Collect both IDs, then name them in PCI (bus/device/function) order. */
	for (unsigned k = 0; k < 2; k++)
		for (unsigned i = 0; n < MAX_DEVS && pci_find(0x1AF4, ids[k], i, &found[n]); i++)
			n++;
	for (unsigned i = 1; i < n; i++)
		for (unsigned j = i; j > 0 && (found[j - 1].dev << 3 | found[j - 1].fn) >
						     (found[j].dev << 3 | found[j].fn); j--) {
			struct pci_device t = found[j];
			found[j] = found[j - 1];
			found[j - 1] = t;
		}
	unsigned named = 0;
	for (unsigned i = 0; i < n; i++) {
		struct vblk *v = &devs[i];
		struct blkdev *b = &v->blk;
		b->name[0] = 'v';
		b->name[1] = 'd';
		b->name[2] = (char)('a' + named);
		b->name[3] = '\0';
		b->driver = "virtio-blk";
		b->priv = v;
		if (!find_caps(v, &found[i])) {
			kprintf("virtio-blk at 00:%02x.%u: no modern interface\n", found[i].dev,
				found[i].fn);
			continue;
		}
		if (!setup(v, i)) {
			kprintf("%s: initialisation failed\n", b->name);
			w8(v->common, CC_STATUS, S_FAILED);
			continue;
		}
		b->max_qd = v->nslots;
		blk_register(b);
		named++;
	}
}
