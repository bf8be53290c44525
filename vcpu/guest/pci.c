/* PCI configuration mechanism #1, bus 0 only.
 *
 * pci_init() does what a BIOS would: size each BAR by writing all ones,
 * then hand out I/O space from 0xC000 and memory from 0xE0000000, largest
 * BAR first so that natural alignment wastes little space. */
#include "pci.h"

#include <stdbool.h>
#include <stdint.h>

#include "io.h"
#include "lib.h"

#define PCI_CONFIG_ADDRESS 0xCF8
#define PCI_CONFIG_DATA 0xCFC

#define PCI_VENDOR_ID 0x00
#define PCI_COMMAND 0x04
#define PCI_CLASS_REV 0x08
#define PCI_HEADER_TYPE 0x0C /* byte 2 of this dword */
#define PCI_BAR0 0x10
#define PCI_ROM_TYPE0 0x30
#define PCI_ROM_TYPE1 0x38

#define PCI_CMD_DECODE 0x0007 /* I/O space, memory space, bus master */

#define IO_BASE 0xC000u
#define IO_LIMIT 0x10000u
#define MEM_BASE 0xE0000000u
#define MEM_LIMIT 0xFEC00000u /* IOAPIC, LAPIC and BIOS flash live above */

#define MAX_FUNCS 64
#define MAX_BARS 6

enum bar_kind { BAR_NONE, BAR_IO, BAR_MEM32, BAR_MEM64 };

struct pci_bar {
	enum bar_kind kind;
	uint64_t size;
	uint64_t addr;
	bool assigned;
};

struct pci_func {
	uint8_t dev, fn;
	uint16_t vendor, device;
	uint8_t class_code, subclass;
	uint8_t header_type; /* without the multifunction bit */
	struct pci_bar bar[MAX_BARS];
};

static struct pci_func funcs[MAX_FUNCS];
static unsigned nfuncs;

static uint32_t cfg_addr(const struct pci_func *f, uint8_t reg)
{
	return 0x80000000u | (uint32_t)f->dev << 11 | (uint32_t)f->fn << 8 |
	       (reg & 0xFC);
}

static uint32_t cfg_read(const struct pci_func *f, uint8_t reg)
{
	outl(PCI_CONFIG_ADDRESS, cfg_addr(f, reg));
	return inl(PCI_CONFIG_DATA);
}

static void cfg_write(const struct pci_func *f, uint8_t reg, uint32_t v)
{
	outl(PCI_CONFIG_ADDRESS, cfg_addr(f, reg));
	outl(PCI_CONFIG_DATA, v);
}

/* Write all ones to a BAR and return what sticks. */
static uint32_t bar_probe(const struct pci_func *f, uint8_t reg)
{
	cfg_write(f, reg, 0xFFFFFFFFu);
	return cfg_read(f, reg);
}

static void size_bars(struct pci_func *f)
{
	unsigned nbars = f->header_type == 0 ? 6 : f->header_type == 1 ? 2 : 0;

	for (unsigned i = 0; i < nbars; i++) {
		uint8_t reg = (uint8_t)(PCI_BAR0 + 4 * i);
		struct pci_bar *b = &f->bar[i];
		uint32_t probe = bar_probe(f, reg);

		if (probe == 0) /* unimplemented */
			continue;
		if (probe & 1) {
			/* I/O BAR: devices may implement only 16 address bits. */
			uint32_t mask = (probe & ~3u) | 0xFFFF0000u;
			b->kind = BAR_IO;
			b->size = (uint32_t)(~mask + 1);
		} else if (((probe >> 1) & 3) == 2 && i + 1 < nbars) {
			uint64_t mask = (uint64_t)bar_probe(f, reg + 4) << 32 |
					(probe & ~0xFu);
			b->kind = BAR_MEM64;
			b->size = ~mask + 1;
			i++; /* the upper half occupies the next slot */
		} else {
			b->kind = BAR_MEM32;
			b->size = (uint32_t)(~(probe & ~0xFu) + 1);
		}
		if (b->size == 0)
			b->kind = BAR_NONE;
	}
}

static void write_bar(struct pci_func *f, unsigned i)
{
	uint8_t reg = (uint8_t)(PCI_BAR0 + 4 * i);
	struct pci_bar *b = &f->bar[i];
	uint64_t v = b->assigned ? b->addr : 0;

	cfg_write(f, reg, (uint32_t)v);
	if (b->kind == BAR_MEM64)
		cfg_write(f, reg + 4, (uint32_t)(v >> 32));
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) & ~(a - 1);
}

/* Assign every sized BAR, biggest first, each aligned to its size. */
static void assign_bars(void)
{
	static struct pci_bar *order[MAX_FUNCS * MAX_BARS];
	unsigned count = 0;
	uint64_t io_next = IO_BASE, mem_next = MEM_BASE;

	/* Insertion sort by decreasing size: there are only a few dozen. */
	for (unsigned n = 0; n < nfuncs; n++)
		for (unsigned i = 0; i < MAX_BARS; i++) {
			struct pci_bar *b = &funcs[n].bar[i];
			if (b->kind == BAR_NONE)
				continue;
			unsigned j = count++;
			for (; j > 0 && order[j - 1]->size < b->size; j--)
				order[j] = order[j - 1];
			order[j] = b;
		}

	for (unsigned k = 0; k < count; k++) {
		struct pci_bar *b = order[k];
		uint64_t *next = b->kind == BAR_IO ? &io_next : &mem_next;
		uint64_t limit = b->kind == BAR_IO ? IO_LIMIT : MEM_LIMIT;

		/* BARs that do not fit (e.g. >= 4 GiB) stay unassigned. */
		if (b->size > limit)
			continue;
		uint64_t base = align_up(*next, b->size);
		if (base > limit - b->size)
			continue;
		b->addr = base;
		b->assigned = true;
		*next = base + b->size;
	}
}

static void scan_function(uint8_t dev, uint8_t fn, uint32_t id)
{
	if (nfuncs == MAX_FUNCS)
		return;
	struct pci_func *f = &funcs[nfuncs++];
	f->dev = dev;
	f->fn = fn;
	f->vendor = (uint16_t)id;
	f->device = (uint16_t)(id >> 16);

	uint32_t class_rev = cfg_read(f, PCI_CLASS_REV);
	f->class_code = (uint8_t)(class_rev >> 24);
	f->subclass = (uint8_t)(class_rev >> 16);
	f->header_type = (uint8_t)(cfg_read(f, PCI_HEADER_TYPE) >> 16) & 0x7F;

	/* Stop decoding while the BARs hold sizing patterns. */
	uint32_t cmd = cfg_read(f, PCI_COMMAND) & 0xFFFF;
	cfg_write(f, PCI_COMMAND, cmd & ~PCI_CMD_DECODE);
	size_bars(f);
}

void pci_init(void)
{
	nfuncs = 0;
	for (uint8_t dev = 0; dev < 32; dev++) {
		for (uint8_t fn = 0; fn < 8; fn++) {
			struct pci_func probe = { .dev = dev, .fn = fn };
			uint32_t id = cfg_read(&probe, PCI_VENDOR_ID);

			if ((id & 0xFFFF) == 0xFFFF) {
				if (fn == 0)
					break; /* no device in this slot */
				continue;
			}
			scan_function(dev, fn, id);
			if (fn == 0 &&
			    !(cfg_read(&probe, PCI_HEADER_TYPE) & (0x80u << 16)))
				break; /* single-function device */
		}
	}

	assign_bars();

	for (unsigned n = 0; n < nfuncs; n++) {
		struct pci_func *f = &funcs[n];
		for (unsigned i = 0; i < MAX_BARS; i++) {
			if (f->bar[i].kind != BAR_NONE)
				write_bar(f, i);
		}
		/* Expansion ROMs are not assigned: keep them disabled. */
		if (f->header_type == 0)
			cfg_write(f, PCI_ROM_TYPE0, 0);
		else if (f->header_type == 1)
			cfg_write(f, PCI_ROM_TYPE1, 0);
		uint32_t cmd = cfg_read(f, PCI_COMMAND) & 0xFFFF;
		cfg_write(f, PCI_COMMAND, cmd | PCI_CMD_DECODE);
	}
}

static const char *class_name(uint8_t cls, uint8_t sub)
{
	static const struct {
		uint16_t code;
		const char *name;
	} names[] = {
		{ 0x0000, "Non-VGA unclassified device" },
		{ 0x0001, "VGA compatible unclassified device" },
		{ 0x0100, "SCSI storage controller" },
		{ 0x0101, "IDE interface" },
		{ 0x0105, "ATA controller" },
		{ 0x0106, "SATA controller" },
		{ 0x0108, "Non-Volatile memory controller" },
		{ 0x0200, "Ethernet controller" },
		{ 0x0300, "VGA compatible controller" },
		{ 0x0380, "Display controller" },
		{ 0x0401, "Multimedia audio controller" },
		{ 0x0403, "Audio device" },
		{ 0x0500, "RAM memory" },
		{ 0x0600, "Host bridge" },
		{ 0x0601, "ISA bridge" },
		{ 0x0604, "PCI bridge" },
		{ 0x0680, "Bridge" },
		{ 0x0700, "Serial controller" },
		{ 0x0780, "Communication controller" },
		{ 0x0880, "System peripheral" },
		{ 0x0C03, "USB controller" },
		{ 0x0C05, "SMBus" },
	};
	/* Fallbacks by base class when the subclass is not in the table. */
	static const char *const classes[] = {
		"Unclassified device", "Mass storage controller",
		"Network controller", "Display controller",
		"Multimedia controller", "Memory controller", "Bridge",
		"Communication controller", "Generic system peripheral",
		"Input device controller", "Docking station", "Processor",
		"Serial bus controller",
	};
	uint16_t code = (uint16_t)(cls << 8 | sub);

	for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (names[i].code == code)
			return names[i].name;
	if (cls < sizeof(classes) / sizeof(classes[0]))
		return classes[cls];
	return "Unclassified device";
}

void pci_list(void)
{
	static const char *const kinds[] = {
		[BAR_IO] = "I/O",
		[BAR_MEM32] = "32-bit memory",
		[BAR_MEM64] = "64-bit memory",
	};

	for (unsigned n = 0; n < nfuncs; n++) {
		const struct pci_func *f = &funcs[n];
		kprintf("00:%02x.%u %02x%02x: %04x:%04x %s\n", f->dev, f->fn,
			f->class_code, f->subclass, f->vendor, f->device,
			class_name(f->class_code, f->subclass));
		for (unsigned i = 0; i < MAX_BARS; i++) {
			const struct pci_bar *b = &f->bar[i];
			if (b->kind == BAR_NONE)
				continue;
			if (b->assigned)
				kprintf("  BAR%u: %s at 0x%lx [size 0x%lx]\n", i,
					kinds[b->kind], b->addr, b->size);
			else
				kprintf("  BAR%u: %s [size 0x%lx] not assigned\n",
					i, kinds[b->kind], b->size);
		}
	}
}

uint32_t pci_cfg_read32(uint8_t dev, uint8_t fn, uint8_t reg)
{
	struct pci_func f = { .dev = dev, .fn = fn };
	return cfg_read(&f, reg);
}

void pci_cfg_write32(uint8_t dev, uint8_t fn, uint8_t reg, uint32_t v)
{
	struct pci_func f = { .dev = dev, .fn = fn };
	cfg_write(&f, reg, v);
}

bool pci_find(uint16_t vendor, uint16_t device, unsigned index, struct pci_device *out)
{
	for (unsigned i = 0; i < nfuncs; i++) {
		const struct pci_func *f = &funcs[i];
		if (f->vendor != vendor || f->device != device)
			continue;
		if (index--)
			continue;
		out->dev = f->dev;
		out->fn = f->fn;
		for (unsigned b = 0; b < MAX_BARS; b++) {
			out->bar[b] = f->bar[b].assigned ? f->bar[b].addr : 0;
			out->bar_is_io[b] = f->bar[b].kind == BAR_IO;
		}
		out->irq_line = (uint8_t)pci_cfg_read32(f->dev, f->fn, 0x3C);
		return true;
	}
	return false;
}
