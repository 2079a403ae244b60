/* mpilazy: ranks that first talk to each other after a restart.
 *
 *   mpilazy STEPS1 STEPS2        (4 or more ranks)
 * OpenMPI's TCP transport connects two ranks when one first sends to the other, to
 * the address the peer published at start-up. Phase 1 (STEPS1 steps, ~20 ms apart):
 * each rank exchanges a value with its ring neighbours only (MPI_Sendrecv to rank+1,
 * from rank-1; no collectives), so ranks two apart never connect. Then rank 0 waits
 * for a file `cross` in the cwd (printing `parked` once), the others wait for its
 * next ring message. Phase 2 (STEPS2 steps): each rank also exchanges a value with
 * rank+2 / rank-2: new connections. Every value is mixed into a 64-bit accumulator,
 * so a lost, doubled or reordered message changes the result. Rank 0 prints `ready
 * ranks=N`, `tick K acc=X` at every step of both phases (K consecutive); at the end
 * the accumulators are summed (MPI_Allreduce), every rank waits for a file `go`
 * (rank 0 checks, around the ring), and rank 0 prints `OK ranks=N result=X`. Built
 * with mpicc.openmpi, not by the tests' `prog()`. */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int rank, size;

/* Exchange with the ranks `d` ahead and behind; the value received is mixed in. */
static uint64_t swap(uint64_t acc, long k, int d) {
    uint64_t out = acc * 6364136223846793005ULL + (uint64_t)k + (uint64_t)d, in = 0;
    MPI_Sendrecv(&out, 1, MPI_UINT64_T, (rank + d) % size, d, &in, 1, MPI_UINT64_T,
                 (rank + size - d) % size, d, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    return (acc ^ in) * 0xBF58476D1CE4E5B9ULL + (uint64_t)rank;
}

/* Rank 0 waits until `file` exists; the others wait for its word around the ring. */
static void wait_file(const char *file, const char *say) {
    int word = 0, said = 0;
    if (rank == 0) {
        while (access(file, F_OK) != 0) {
            if (say && !said) {
                printf("%s\n", say);
                fflush(stdout);
                said = 1;
            }
            usleep(20000);
        }
        word = 1;
        MPI_Send(&word, 1, MPI_INT, 1, 99, MPI_COMM_WORLD);
        MPI_Recv(&word, 1, MPI_INT, size - 1, 99, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else {
        MPI_Recv(&word, 1, MPI_INT, rank - 1, 99, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Send(&word, 1, MPI_INT, (rank + 1) % size, 99, MPI_COMM_WORLD);
    }
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long s1 = argc > 1 ? atol(argv[1]) : 30, s2 = argc > 2 ? atol(argv[2]) : 30, k = 0;
    if (size < 4) {
        if (rank == 0) fprintf(stderr, "mpilazy: needs 4 ranks or more\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    uint64_t acc = (uint64_t)rank * 0x9E3779B97F4A7C15ULL + 1, sum = 0;
    if (rank == 0) {
        printf("ready ranks=%d\n", size);
        fflush(stdout);
    }
    for (; k < s1 + s2; k++) {
        if (k == s1) wait_file("cross", "parked");
        acc = swap(acc, k, 1);
        if (k >= s1) acc = swap(acc, k, 2);
        if (rank == 0) {
            printf("tick %ld acc=%llu\n", k, (unsigned long long)acc);
            fflush(stdout);
        }
        usleep(20000);
    }
    MPI_Allreduce(&acc, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    wait_file("go", NULL);
    if (rank == 0) {
        printf("OK ranks=%d result=%llu\n", size, (unsigned long long)sum);
        fflush(stdout);
    }
    MPI_Finalize();
    return 0;
}
