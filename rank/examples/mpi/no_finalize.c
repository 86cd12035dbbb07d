/* Rank QUITTER (argv[1], default 1) leaves with exit(CODE) (argv[2], default 0) without
 * MPI_Finalize: after MPI_Init, or before it when argv[3] is "early" (then it never joins
 * MPI_Init's fence). The others go on to MPI_Finalize. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int rank, size;
    int quitter = argc > 1 ? atoi(argv[1]) : 1;
    int code = argc > 2 ? atoi(argv[2]) : 0;
    int early = argc > 3 && strcmp(argv[3], "early") == 0;
    const char *r = getenv("PMI_RANK");
    if (!r)
        r = getenv("PMIX_RANK"); /* Open MPI under krun --mpi pmix */
    if (early && r && atoi(r) == quitter) {
        fprintf(stderr, "rank %d: leaving before MPI_Init\n", quitter);
        exit(code);
    }
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rank == quitter) {
        fprintf(stderr, "rank %d: leaving without MPI_Finalize\n", rank);
        exit(code);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
