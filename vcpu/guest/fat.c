/* `fatlabel DEV`: the volume label of a FAT file system, as Linux's fatlabel prints it.
 *
 * The boot sector (Microsoft FAT specification, "BPB"): FAT12/16 keep the extended
 * boot record at offset 36 (label at 43), FAT32 at 64 (label at 71); a volume is FAT32
 * when BPB_FATSz16 (offset 22) is zero. */
#include <stdint.h>

#include "blk.h"
#include "fat.h"
#include "lib.h"

static uint8_t sector[2048] __attribute__((aligned(16)));

void cmd_fatlabel(int argc, char **argv)
{
	if (argc != 2) {
		kputs("usage: fatlabel DEV\n");
		return;
	}
	struct blkdev *d = blk_find(argv[1]);
	if (!d) {
		kprintf("fatlabel: %s: No such file or directory\n", argv[1]);
		return;
	}
	if (d->sector_size > sizeof(sector) || d->ops->rw(d, false, 0, 1, sector) < 0)
		return;
	if (sector[510] != 0x55 || sector[511] != 0xAA) {
		kprintf("fatlabel: %s: no FAT boot sector\n", argv[1]);
		return;
	}
	bool fat32 = sector[22] == 0 && sector[23] == 0;
	unsigned ebr = fat32 ? 64 : 36;
	if (sector[ebr + 2] != 0x29) { /* extended boot signature: the label field exists */
		kprintf("fatlabel: %s: no volume label field\n", argv[1]);
		return;
	}
	char label[12];
	memcpy(label, &sector[ebr + 7], 11);
	int n = 11;
	while (n > 0 && label[n - 1] == ' ')
		n--;
	label[n] = '\0';
	kprintf("%s\n", label);
}
