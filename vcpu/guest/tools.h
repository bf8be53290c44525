/* Shell commands for poking at devices by hand. */
#ifndef FW_TOOLS_H
#define FW_TOOLS_H

void cmd_peek(int argc, char **argv);
void cmd_poke(int argc, char **argv);
void cmd_in(int argc, char **argv);
void cmd_out(int argc, char **argv);
void cmd_pcicfg(int argc, char **argv);

#endif
