/* Every rank contributes the vector v[i] = rank * N + i; after MPI_Allreduce(SUM) every
 * rank checks each element against the closed form and prints one line. */
#include <mpi.h>
#include <stdio.h>

#define N 4096

int main(int argc, char **argv) {
    int rank, size;
    static double in[N], out[N];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    for (int i = 0; i < N; i++) in[i] = (double)rank * N + i;
    MPI_Allreduce(in, out, N, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    int bad = 0;
    for (int i = 0; i < N; i++) {
        double want = (double)N * size * (size - 1) / 2 + (double)i * size;
        if (out[i] != want) bad++;
    }
    printf("allreduce: rank %d of %d: %d of %d elements wrong\n", rank, size, bad, N);
    MPI_Finalize();
    return bad != 0;
}
