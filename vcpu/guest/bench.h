/* Guest-side benchmarks of the I/O path. */
#ifndef FW_BENCH_H
#define FW_BENCH_H

void cmd_bench(int argc, char **argv);

#endif
