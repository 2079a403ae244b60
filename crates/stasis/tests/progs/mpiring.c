/* mpiring: an MPI job whose result depends on every message of every step.
 *
 *   mpiring STEPS
 * Each rank keeps a 64-bit accumulator; every step it sends a value derived from it
 * to the next rank and receives the previous rank's (MPI_Sendrecv around the ring),
 * mixes it in, and all ranks sum their accumulators (MPI_Allreduce); a lost,
 * doubled or reordered message changes the final sum. Steps are ~20 ms apart.
 * Rank 0 prints `ready ranks=N steps=S`, then `tick K sum=X` at every step; after
 * the last step every rank waits for a file `go` in the cwd (checked by rank 0,
 * broadcast), then rank 0 prints `OK ranks=N steps=S result=X`. Built with the MPI
 * implementation's compiler wrapper (mpicc.openmpi), not by the tests' `prog()`. */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long steps = argc > 1 ? atol(argv[1]) : 300;
    uint64_t acc = (uint64_t)rank * 0x9E3779B97F4A7C15ULL + 1, sum = 0;
    if (rank == 0) {
        printf("ready ranks=%d steps=%ld\n", size, steps);
        fflush(stdout);
    }
    for (long k = 0; k < steps; k++) {
        uint64_t out = acc * 6364136223846793005ULL + (uint64_t)k, in = 0;
        MPI_Sendrecv(&out, 1, MPI_UINT64_T, (rank + 1) % size, 7, &in, 1, MPI_UINT64_T,
                     (rank + size - 1) % size, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        acc = (acc ^ in) * 0xBF58476D1CE4E5B9ULL + (uint64_t)rank;
        MPI_Allreduce(&acc, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
        if (rank == 0) {
            printf("tick %ld sum=%llu\n", k, (unsigned long long)sum);
            fflush(stdout);
        }
        usleep(20000);
    }
    int go = 0;
    while (!go) {
        if (rank == 0) go = access("go", F_OK) == 0;
        MPI_Bcast(&go, 1, MPI_INT, 0, MPI_COMM_WORLD);
        if (!go) usleep(20000);
    }
    if (rank == 0) {
        printf("OK ranks=%d steps=%ld result=%llu\n", size, steps, (unsigned long long)sum);
        fflush(stdout);
    }
    MPI_Finalize();
    return 0;
}
