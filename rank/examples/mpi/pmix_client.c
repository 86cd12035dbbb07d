/* PMIx calls Open MPI makes rarely or not at all, through the PMIx client API directly
 * (OpenPMIx's libpmix, Debian's libpmix-dev), under krun --mpi pmix:
 *   pmix_client group   ranks 0, 1 and size-2 put a key each, fence among themselves
 *                       with data collection (PMIx_Fence with those three procs), and
 *                       read each other's key; the other ranks take no part. Then every
 *                       rank fences with the whole job.
 *   pmix_client spawn   rank 0 asks PMIx to spawn one process (PMIx_Spawn) and prints
 *                       the status it got; then every rank fences with the whole job.
 *   pmix_client peers   each rank prints what PMIx tells it of every rank: host name,
 *                       node id, local and node rank (or the status of the failed get).
 *   pmix_client topology each rank loads the machine's topology through PMIx
 *                       (PMIx_Load_topology, as Open MPI's ranks get theirs), says how the
 *                       server shared it (hwloc shared memory, XML, or not: the rank
 *                       discovered it) and counts its objects; then a whole-job fence.
 * Every rank ends with "pmix_client: rank R of N done". */
#include <hwloc.h>
#include <pmix.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pmix_proc_t me;

static int whole_fence(void) {
  pmix_status_t rc = PMIx_Fence(NULL, 0, NULL, 0);
  if (rc != PMIX_SUCCESS) {
    fprintf(stderr, "pmix_client: rank %u: whole-job fence: %s\n", me.rank,
            PMIx_Error_string(rc));
    return 1;
  }
  return 0;
}

static int group(uint32_t size) {
  pmix_rank_t members[3] = {0, 1, size - 2};
  int member = 0;
  for (int i = 0; i < 3; i++) member |= members[i] == me.rank;
  if (!member) return 0;
  char key[64], value[64];
  snprintf(key, sizeof key, "group.%u", me.rank);
  snprintf(value, sizeof value, "hello from %u", me.rank);
  pmix_value_t v;
  PMIX_VALUE_LOAD(&v, value, PMIX_STRING);
  if (PMIx_Put(PMIX_GLOBAL, key, &v) != PMIX_SUCCESS || PMIx_Commit() != PMIX_SUCCESS) {
    fprintf(stderr, "pmix_client: rank %u: put/commit failed\n", me.rank);
    return 1;
  }
  pmix_proc_t procs[3];
  for (int i = 0; i < 3; i++) PMIX_LOAD_PROCID(&procs[i], me.nspace, members[i]);
  pmix_info_t info;
  bool collect = true;
  PMIX_INFO_LOAD(&info, PMIX_COLLECT_DATA, &collect, PMIX_BOOL);
  pmix_status_t rc = PMIx_Fence(procs, 3, &info, 1);
  if (rc != PMIX_SUCCESS) {
    printf("pmix_client: rank %u: fence over ranks 0,1,%u failed: %s\n", me.rank, size - 2,
           PMIx_Error_string(rc));
    return 1;
  }
  for (int i = 0; i < 3; i++) {
    if (members[i] == me.rank) continue;
    char k[64], want[64];
    snprintf(k, sizeof k, "group.%u", members[i]);
    snprintf(want, sizeof want, "hello from %u", members[i]);
    pmix_value_t *got = NULL;
    rc = PMIx_Get(&procs[i], k, NULL, 0, &got);
    if (rc != PMIX_SUCCESS || got->type != PMIX_STRING || strcmp(got->data.string, want)) {
      printf("pmix_client: rank %u: %s of rank %u: %s\n", me.rank, k, members[i],
             rc == PMIX_SUCCESS ? "wrong value" : PMIx_Error_string(rc));
      return 1;
    }
    PMIX_VALUE_RELEASE(got);
  }
  printf("pmix_client: rank %u got the group's keys after a fence over ranks 0,1,%u\n",
         me.rank, size - 2);
  return 0;
}

static int spawn(void) {
  if (me.rank != 0) return 0;
  pmix_app_t app;
  PMIX_APP_CONSTRUCT(&app);
  app.cmd = strdup("/bin/true");
  app.maxprocs = 1;
  char nspace[PMIX_MAX_NSLEN + 1] = {0};
  pmix_status_t rc = PMIx_Spawn(NULL, 0, &app, 1, nspace);
  free(app.cmd);
  app.cmd = NULL;
  printf("pmix_client: rank 0: PMIx_Spawn returned %s\n", PMIx_Error_string(rc));
  return rc == PMIX_SUCCESS;
}

static int topology(void) {
  pmix_proc_t wild;
  PMIX_LOAD_PROCID(&wild, me.nspace, PMIX_RANK_WILDCARD);
  pmix_info_t opt;
  bool yes = true;
  PMIX_INFO_LOAD(&opt, PMIX_OPTIONAL, &yes, PMIX_BOOL);
  const char *how = "the rank's own discovery";
  pmix_value_t *v = NULL;
  if (PMIx_Get(&wild, PMIX_HWLOC_SHMEM_FILE, &opt, 1, &v) == PMIX_SUCCESS) {
    how = "shared memory";
    PMIX_VALUE_RELEASE(v);
  } else if (PMIx_Get(&wild, PMIX_HWLOC_XML_V2, &opt, 1, &v) == PMIX_SUCCESS) {
    how = "XML";
    PMIX_VALUE_RELEASE(v);
  }
  pmix_topology_t topo;
  memset(&topo, 0, sizeof topo);
  pmix_status_t rc = PMIx_Load_topology(&topo);
  if (rc != PMIX_SUCCESS || topo.topology == NULL) {
    printf("pmix_client: rank %u: PMIx_Load_topology: %s\n", me.rank, PMIx_Error_string(rc));
    return 1;
  }
  hwloc_topology_t t = (hwloc_topology_t)topo.topology;
  printf("pmix_client: rank %u topology from %s: %d PUs, %d cores, %d NUMA nodes, %d bridges, "
         "%d PCI devices, %d OS devices\n",
         me.rank, how, hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PU),
         hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_CORE),
         hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_NUMANODE),
         hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_BRIDGE),
         hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PCI_DEVICE),
         hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_OS_DEVICE));
  return 0;
}

/* What a rank learns of every rank (itself and its peers on other nodes) through PMIx:
 * one line per rank, a value or the status PMIx_Get returned. */
static void show(const char *name, pmix_proc_t *p, const char *key, char *out, size_t n) {
  pmix_value_t *v = NULL;
  pmix_status_t rc = PMIx_Get(p, key, NULL, 0, &v);
  if (rc != PMIX_SUCCESS) {
    snprintf(out, n, "%s %s", name, PMIx_Error_string(rc));
    return;
  }
  if (v->type == PMIX_STRING) snprintf(out, n, "%s %s", name, v->data.string);
  else if (v->type == PMIX_UINT16) snprintf(out, n, "%s %u", name, v->data.uint16);
  else if (v->type == PMIX_UINT32) snprintf(out, n, "%s %u", name, v->data.uint32);
  else snprintf(out, n, "%s (type %u)", name, v->type);
  PMIX_VALUE_RELEASE(v);
}

static int peers(uint32_t size) {
  for (uint32_t r = 0; r < size; r++) {
    pmix_proc_t p;
    PMIX_LOAD_PROCID(&p, me.nspace, r);
    char host[300], id[64], lr[64], nr[64];
    show("host", &p, PMIX_HOSTNAME, host, sizeof host);
    show("node id", &p, PMIX_NODEID, id, sizeof id);
    show("local rank", &p, PMIX_LOCAL_RANK, lr, sizeof lr);
    show("node rank", &p, PMIX_NODE_RANK, nr, sizeof nr);
    printf("pmix_client: rank %u sees rank %u: %s, %s, %s, %s\n", me.rank, r, host, id, lr, nr);
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2 || (strcmp(argv[1], "group") && strcmp(argv[1], "spawn") &&
                    strcmp(argv[1], "topology") && strcmp(argv[1], "peers"))) {
    fprintf(stderr, "usage: pmix_client group|spawn|topology|peers\n");
    return 2;
  }
  pmix_status_t rc = PMIx_Init(&me, NULL, 0);
  if (rc != PMIX_SUCCESS) {
    fprintf(stderr, "pmix_client: PMIx_Init: %s\n", PMIx_Error_string(rc));
    return 1;
  }
  pmix_proc_t wild;
  PMIX_LOAD_PROCID(&wild, me.nspace, PMIX_RANK_WILDCARD);
  pmix_value_t *val = NULL;
  rc = PMIx_Get(&wild, PMIX_JOB_SIZE, NULL, 0, &val);
  if (rc != PMIX_SUCCESS) {
    fprintf(stderr, "pmix_client: rank %u: job size: %s\n", me.rank, PMIx_Error_string(rc));
    return 1;
  }
  uint32_t size = val->data.uint32;
  PMIX_VALUE_RELEASE(val);
  int bad;
  if (strcmp(argv[1], "topology") == 0) {
    bad = topology();
  } else if (strcmp(argv[1], "peers") == 0) {
    bad = peers(size);
  } else {
    bad = size < 4 ? 1 : strcmp(argv[1], "group") == 0 ? group(size) : spawn();
    if (size < 4) fprintf(stderr, "pmix_client: needs 4 ranks or more\n");
  }
  bad |= whole_fence();
  if (!bad) printf("pmix_client: rank %u of %u done\n", me.rank, size);
  PMIx_Finalize(NULL, 0);
  return bad;
}
