/* Block layer: a registry of disks (IDE, ATAPI, virtio-blk) and the shell
 * commands built on it (lsblk, dd, sha256sum, sync, bench disk). */
#ifndef FW_BLK_H
#define FW_BLK_H

#include <stdbool.h>
#include <stdint.h>

#define BLK_MAX_DEVS 12
#define BLK_MAX_IO (64u * 1024) /* largest single request (bs limit) */
#define BLK_MAX_QD 32

struct blkdev;

struct blk_ops {
	/* Synchronous transfer of `count` sectors; 0 on success, <0 on error
	 * (an error message has already been printed). */
	int (*rw)(struct blkdev *d, bool write, uint64_t lba, uint32_t count, void *buf);
	int (*flush)(struct blkdev *d);
	/* Optional queued interface (NULL: the device does qd 1 only).
	 * submit() starts a request under a caller-chosen free tag < max_qd;
	 * reap() waits (bounded) for any request to finish and returns its tag
	 * and status (0 = OK).  Both return <0 on a device failure. */
	int (*submit)(struct blkdev *d, bool write, uint64_t lba, uint32_t count, void *buf,
		      unsigned tag);
	int (*reap)(struct blkdev *d, unsigned *tag, int *status);
};

struct blkdev {
	char name[8];
	uint64_t size;        /* bytes */
	uint32_t sector_size; /* 512 for disks, 2048 for cdroms */
	bool ro;
	bool cdrom;
	const char *driver;   /* "ide-dma", "ide-pio", "atapi", "virtio-blk" */
	unsigned max_qd;      /* 1 unless ops->submit */
	const struct blk_ops *ops;
	void *priv;
};

/* Register a device (the struct must stay alive); false if the table is full. */
bool blk_register(const struct blkdev *d);
struct blkdev *blk_find(const char *name);

/* Probe every driver; call once after pci_init(). */
void blk_init(void);


/* Shell commands. */
void cmd_lsblk(int argc, char **argv);
void cmd_dd(int argc, char **argv);
void cmd_sha256sum(int argc, char **argv);
void cmd_sync(int argc, char **argv);
void cmd_bench_disk(int argc, char **argv); /* argv[0]="bench", argv[1]="disk" */

#endif
