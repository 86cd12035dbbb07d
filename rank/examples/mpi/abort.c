/* Rank ABORTER (argv[1], default 1) calls MPI_Abort with code CODE (argv[2], default 7)
 * after MPI_Init; the others wait in a receive that never completes. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int rank, size, x;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int aborter = argc > 1 ? atoi(argv[1]) : 1;
    int code = argc > 2 ? atoi(argv[2]) : 7;
    if (rank == aborter) {
        fprintf(stderr, "rank %d: calling MPI_Abort(%d)\n", rank, code);
        MPI_Abort(MPI_COMM_WORLD, code);
    }
    MPI_Recv(&x, 1, MPI_INT, aborter, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Finalize();
    return 0;
}
