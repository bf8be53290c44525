/* Reading FAT boot sectors. */
#ifndef FW_FAT_H
#define FW_FAT_H

void cmd_fatlabel(int argc, char **argv);

#endif
