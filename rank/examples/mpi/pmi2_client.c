/* A PMI-2 client through Slurm's libpmi2 (Debian's libpmi2-0-dev), the way an MPI
 * library built for PMI-2 wires up, under krun with no srun:
 *   PMI2_Init (PMI-1's init asking for version 2, then fullinit), PMI2_Job_GetId,
 *   each rank puts "k<rank>" = "v<rank>;x" (a ';' the wire must escape), a fence, every
 *   rank reads every key, PMI_process_mapping from the job attributes, node attributes
 *   (each local rank puts one, then waits for every local rank's), a second fence,
 *   PMI2_Finalize. Prints "pmi2: rank R of N ok jobid=... mapping=... keys=N local=L".
 * With argv[1] = ABORTER, that rank calls PMI2_Abort after the first fence. */
#include <slurm/pmi2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void die(const char *what, int rc) {
    fprintf(stderr, "pmi2_client: %s failed: %d\n", what, rc);
    exit(2);
}

int main(int argc, char **argv) {
    int spawned, size, rank, appnum, rc;
    char jobid[256], key[64], want[64], value[1024], mapping[1024];
    if ((rc = PMI2_Init(&spawned, &size, &rank, &appnum)) != PMI2_SUCCESS) die("PMI2_Init", rc);
    if ((rc = PMI2_Job_GetId(jobid, sizeof jobid)) != PMI2_SUCCESS) die("PMI2_Job_GetId", rc);
    snprintf(key, sizeof key, "k%d", rank);
    snprintf(want, sizeof want, "v%d;x", rank);
    if ((rc = PMI2_KVS_Put(key, want)) != PMI2_SUCCESS) die("PMI2_KVS_Put", rc);
    if ((rc = PMI2_KVS_Fence()) != PMI2_SUCCESS) die("PMI2_KVS_Fence", rc);
    if (argc > 1 && atoi(argv[1]) == rank) {
        fprintf(stderr, "pmi2_client: rank %d aborts\n", rank);
        PMI2_Abort(1, "pmi2_client asked to abort");
    }
    int keys = 0;
    for (int r = 0; r < size; r++) {
        int len = 0;
        snprintf(key, sizeof key, "k%d", r);
        snprintf(want, sizeof want, "v%d;x", r);
        if ((rc = PMI2_KVS_Get(jobid, r, key, value, sizeof value, &len)) != PMI2_SUCCESS)
            die("PMI2_KVS_Get", rc);
        if (strcmp(value, want) != 0) {
            fprintf(stderr, "pmi2_client: rank %d read %s = %s, not %s\n", rank, key, value, want);
            return 3;
        }
        keys++;
    }
    int found = 0;
    if ((rc = PMI2_Info_GetJobAttr("PMI_process_mapping", mapping, sizeof mapping, &found)) != PMI2_SUCCESS || !found)
        die("PMI2_Info_GetJobAttr(PMI_process_mapping)", rc);
    const char *lid = getenv("MPI_LOCALRANKID"), *ln = getenv("MPI_LOCALNRANKS");
    int local_id = lid ? atoi(lid) : 0, local_n = ln ? atoi(ln) : 1;
    snprintf(key, sizeof key, "attr%d", local_id);
    snprintf(want, sizeof want, "rank%d", rank);
    if ((rc = PMI2_Info_PutNodeAttr(key, want)) != PMI2_SUCCESS) die("PMI2_Info_PutNodeAttr", rc);
    int local = 0;
    for (int l = 0; l < local_n; l++) {
        snprintf(key, sizeof key, "attr%d", l);
        if ((rc = PMI2_Info_GetNodeAttr(key, value, sizeof value, &found, 1)) != PMI2_SUCCESS || !found)
            die("PMI2_Info_GetNodeAttr", rc);
        if (strncmp(value, "rank", 4) == 0) local++;
    }
    if ((rc = PMI2_KVS_Fence()) != PMI2_SUCCESS) die("the second PMI2_KVS_Fence", rc);
    printf("pmi2: rank %d of %d ok jobid=%s mapping=%s keys=%d local=%d\n", rank, size, jobid,
           mapping, keys, local);
    fflush(stdout);
    if ((rc = PMI2_Finalize()) != PMI2_SUCCESS) die("PMI2_Finalize", rc);
    return 0;
}
