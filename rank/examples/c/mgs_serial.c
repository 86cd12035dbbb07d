/* Serial Modified Gram-Schmidt: the reference for mgs_dsm.
 *   mgs_serial [ROWS [COLS]]     prints "mgs weighted W orthogonality O" */
#include "mgs_common.h"

int main(int argc, char **argv) {
  long rows, cols;
  if (mgs_args(argc, argv, "mgs_serial", &rows, &cols) < 0) return 2;
  double *a = malloc(sizeof(double) * rows * cols);
  if (!a) {
    fprintf(stderr, "mgs_serial: out of memory\n");
    return 1;
  }
  mgs_matrix(a, rows, cols);
  for (long k = 0; k < cols; k++) {
    mgs_normalize(&a[k * rows], rows);
    for (long j = k + 1; j < cols; j++) mgs_project_out(&a[k * rows], &a[j * rows], rows);
  }
  double w, o;
  mgs_summary(a, rows, cols, &w, &o);
  printf("mgs weighted %.17g orthogonality %.3g\n", w, o);
  free(a);
  return 0;
}
