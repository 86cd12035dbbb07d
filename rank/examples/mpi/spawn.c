/* MPI_Comm_spawn under krun, which does not support it (krund answers PMIx_Spawn with
 * PMIX_ERR_NOT_SUPPORTED at once):
 *   spawn fatal   every rank spawns one copy of this program over MPI_COMM_WORLD with the
 *                 default error handler: the failure is fatal, Open MPI aborts the job.
 *   spawn self    every rank spawns over MPI_COMM_SELF with MPI_ERRORS_RETURN and prints
 *                   spawn: rank R: MPI_Comm_spawn failed: <MPI error string>
 *                 then finalizes. (Over a communicator of several ranks with
 *                 MPI_ERRORS_RETURN, Open MPI 4.1's other ranks wait for the root's
 *                 connection info forever: only the root learns of the failure.)
 * A spawned copy (there should be none) says so and exits. */
#include <mpi.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
  int rank = -1;
  setvbuf(stdout, NULL, _IONBF, 0);
  MPI_Init(&argc, &argv);
  MPI_Comm parent;
  MPI_Comm_get_parent(&parent);
  if (parent != MPI_COMM_NULL) {
    printf("spawn: a spawned process runs\n");
    MPI_Finalize();
    return 0;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int self = argc > 1 && strcmp(argv[1], "self") == 0;
  MPI_Comm comm = self ? MPI_COMM_SELF : MPI_COMM_WORLD;
  if (self) MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  MPI_Comm child;
  int errs[1];
  int rc = MPI_Comm_spawn(argv[0], MPI_ARGV_NULL, 1, MPI_INFO_NULL, 0, comm, &child, errs);
  if (rc != MPI_SUCCESS) {
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, s, &len);
    printf("spawn: rank %d: MPI_Comm_spawn failed: %s\n", rank, s);
  } else {
    printf("spawn: rank %d: MPI_Comm_spawn succeeded\n", rank);
  }
  MPI_Finalize();
  return rc == MPI_SUCCESS;
}
