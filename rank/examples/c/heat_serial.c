/* Serial reference of heat.c: heat_serial NX NY STEPS; prints the same checksum line. */
#include <stdio.h>
#include "heat_common.h"

int main(int argc, char **argv) {
  long nx = heat_arg(argc, argv, 1, 64), ny = heat_arg(argc, argv, 2, 64);
  long steps = heat_arg(argc, argv, 3, 100);
  if (nx < 3 || ny < 3 || steps < 0) {
    fprintf(stderr, "usage: heat_serial NX NY STEPS (NX, NY >= 3)\n");
    return 2;
  }
  double *u = malloc(sizeof(double) * nx * ny), *v = malloc(sizeof(double) * nx * ny);
  if (!u || !v) return 1;
  for (long i = 0; i < nx; i++)
    for (long j = 0; j < ny; j++) u[i * ny + j] = heat_initial(i, j, nx, ny);
  memcpy(v, u, sizeof(double) * nx * ny);
  for (long s = 0; s < steps; s++) {
    for (long i = 1; i < nx - 1; i++)
      for (long j = 1; j < ny - 1; j++)
        v[i * ny + j] = heat_update(u[i * ny + j], u[(i - 1) * ny + j], u[(i + 1) * ny + j],
                                    u[i * ny + j - 1], u[i * ny + j + 1]);
    memcpy(u, v, sizeof(double) * nx * ny);
  }
  uint64_t sum = 0;
  for (long i = 0; i < nx; i++) sum += heat_row_term(&u[i * ny], ny, i);
  printf("heat %ldx%ld steps %ld checksum %016llx\n", nx, ny, steps, (unsigned long long)sum);
  return 0;
}
