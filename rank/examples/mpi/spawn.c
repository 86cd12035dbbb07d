/* MPI_Comm_spawn under krun, which does not support it: every rank asks to spawn one
 * copy of this program (errors returned, not fatal) and prints what it got:
 *   spawn: rank R: MPI_Comm_spawn failed: <MPI error string>
 * then finalizes. A spawned copy (there should be none) says so and exits. */
#include <mpi.h>
#include <stdio.h>

int main(int argc, char **argv) {
  int rank = -1;
  MPI_Init(&argc, &argv);
  MPI_Comm parent;
  MPI_Comm_get_parent(&parent);
  if (parent != MPI_COMM_NULL) {
    printf("spawn: a spawned process runs\n");
    MPI_Finalize();
    return 0;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
  MPI_Comm child;
  int errs[1];
  int rc = MPI_Comm_spawn(argv[0], MPI_ARGV_NULL, 1, MPI_INFO_NULL, 0, MPI_COMM_WORLD, &child,
                          errs);
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
