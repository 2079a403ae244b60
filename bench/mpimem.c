/* Benchmark workload: an MPI job whose ranks each hold SIZE MiB of random memory
 * (MAP_PRIVATE|MAP_ANONYMOUS, 4 KiB pages) and run an MPI_Allreduce every 10 ms,
 * reading one page of it each time, forever. Rank 0 prints `ready` once every rank
 * has filled its memory.
 *
 *   mpirun -np 4 ./mpimem SIZE */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    size_t n = strtoull(argv[1], 0, 10) << 20;
    uint64_t *m = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t x = 88172645463325252ull + rank;
    for (size_t i = 0; i < n / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; m[i] = x; }
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) { printf("ready\n"); fflush(stdout); }
    uint64_t acc = 0, sum = 0;
    for (long k = 0;; k++) {
        acc += m[(k * 4096 / 8) % (n / 8)];
        MPI_Allreduce(&acc, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
        usleep(10000);
    }
}
