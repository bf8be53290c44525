/* IDE/ATAPI on the PIIX3 function (8086:7010): hda..hdd. */
#ifndef FW_IDE_H
#define FW_IDE_H

/* Probe the four legacy positions and register what answers. */
void ide_init(void);

/* Shell: `ide pio|dma` switches the ATA disks' transfer mode. */
void cmd_ide(int argc, char **argv);

#endif
