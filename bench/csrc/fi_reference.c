/* bench fabric's reference: a plain C libfabric client (no krun code), built by `bench fabric`
 * against the libfabric krun uses and run in the same benchmark.
 *
 *   fi_reference PROVIDER LAT_OPS BW_SECS
 *
 * PROVIDER is "shm" or "tcp;ofi_rxm". Two processes (fork before any libfabric call): the
 * child is the target, which registers a buffer and drives progress (polls its CQ and
 * remote-access path) until told to stop; the parent measures with the same hints and flags as
 * krun's libfabric backend: RDM, RMA|ATOMIC|TAGGED|MSG, FI_MR_PROV_KEY|VIRT_ADDR|ALLOCATED|LOCAL,
 * FI_THREAD_SAFE, writes with FI_DELIVERY_COMPLETE, reads with FI_DELIVERY_COMPLETE on shm.
 * Prints one JSON object per line: {"provider","op","size","lat_p50_us","bw_gbs"}. */
#define _GNU_SOURCE
#include <poll.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BUF (64u << 20)
#define DIE(...) do { fprintf(stderr, "fi_reference: " __VA_ARGS__); fputc('\n', stderr); exit(2); } while (0)
#define CHECK(call) do { long rc_ = (long)(call); if (rc_) DIE("%s: %s", #call, fi_strerror((int)-rc_)); } while (0)

struct ctx {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_cq *cq;
	struct fid_av *av;
	struct fid_ep *ep;
	struct fid_mr *mr;
	char *buf;
	int shm;
};

struct hello { char addr[256]; size_t addrlen; uint64_t key, base; };

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void open_ctx(struct ctx *c, const char *prov)
{
	struct fi_info *hints = fi_allocinfo();
	if (!hints) DIE("fi_allocinfo");
	c->shm = strcmp(prov, "shm") == 0;
	hints->caps = FI_RMA | FI_ATOMIC | FI_TAGGED | FI_READ | FI_WRITE | FI_REMOTE_READ |
		      FI_REMOTE_WRITE | FI_SEND | FI_RECV;
	hints->ep_attr->type = FI_EP_RDM;
	hints->domain_attr->threading = FI_THREAD_SAFE;
	hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
	hints->domain_attr->av_type = FI_AV_TABLE;
	hints->fabric_attr->prov_name = strdup(prov);
	CHECK(fi_getinfo(FI_VERSION(1, 17), c->shm ? NULL : "127.0.0.1", NULL, c->shm ? 0 : FI_SOURCE,
			 hints, &c->info));
	fi_freeinfo(hints);
	CHECK(fi_fabric(c->info->fabric_attr, &c->fabric, NULL));
	CHECK(fi_domain(c->fabric, c->info, &c->domain, NULL));
	struct fi_cq_attr cq_attr = { .size = 1024, .format = FI_CQ_FORMAT_TAGGED, .wait_obj = FI_WAIT_NONE };
	CHECK(fi_cq_open(c->domain, &cq_attr, &c->cq, NULL));
	struct fi_av_attr av_attr = { .type = FI_AV_TABLE };
	CHECK(fi_av_open(c->domain, &av_attr, &c->av, NULL));
	CHECK(fi_endpoint(c->domain, c->info, &c->ep, NULL));
	CHECK(fi_ep_bind(c->ep, &c->cq->fid, FI_TRANSMIT | FI_RECV));
	CHECK(fi_ep_bind(c->ep, &c->av->fid, 0));
	CHECK(fi_enable(c->ep));
	c->buf = aligned_alloc(4096, BUF);
	if (!c->buf) DIE("out of memory");
	memset(c->buf, 0x5a, BUF);
	CHECK(fi_mr_reg(c->domain, c->buf, BUF, FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE,
			0, 0, 0, &c->mr, NULL));
}

static void hello_of(struct ctx *c, struct hello *h)
{
	memset(h, 0, sizeof *h);
	h->addrlen = sizeof h->addr;
	CHECK(fi_getname(&c->ep->fid, h->addr, &h->addrlen));
	h->key = fi_mr_key(c->mr);
	h->base = (c->info->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? (uint64_t)(uintptr_t)c->buf : 0;
}

static void xfer(int fd, void *p, size_t n, int out)
{
	char *b = p;
	while (n) {
		ssize_t r = out ? write(fd, b, n) : read(fd, b, n);
		if (r <= 0) DIE("pipe to the other process closed");
		b += r, n -= (size_t)r;
	}
}

/* Waits for `n` completions, driving progress. */
static void reap(struct ctx *c, int n)
{
	struct fi_cq_tagged_entry e[16];
	while (n > 0) {
		ssize_t r = fi_cq_read(c->cq, e, n < 16 ? n : 16);
		if (r > 0) {
			n -= (int)r;
		} else if (r == -FI_EAVAIL) {
			struct fi_cq_err_entry err = { 0 };
			fi_cq_readerr(c->cq, &err, 0);
			DIE("operation failed: %s", fi_strerror(err.err));
		} else if (r != -FI_EAGAIN) {
			DIE("fi_cq_read: %s", fi_strerror((int)-r));
		}
	}
}

static void post(struct ctx *c, fi_addr_t peer, const struct hello *h, int write, size_t off, size_t len)
{
	struct iovec iov = { c->buf + off, len };
	void *desc = fi_mr_desc(c->mr);
	struct fi_rma_iov rma = { h->base + off, len, h->key };
	struct fi_msg_rma msg = { &iov, &desc, 1, peer, &rma, 1, NULL, 0 };
	uint64_t flags = FI_COMPLETION | ((write || c->shm) ? FI_DELIVERY_COMPLETE : 0);
	for (;;) {
		ssize_t r = write ? fi_writemsg(c->ep, &msg, flags) : fi_readmsg(c->ep, &msg, flags);
		if (r == 0) return;
		if (r != -FI_EAGAIN) DIE("posting: %s", fi_strerror((int)-r));
		struct fi_cq_tagged_entry e;
		if (fi_cq_read(c->cq, &e, 1) == 1) DIE("unexpected completion while posting");
	}
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double latency(struct ctx *c, fi_addr_t peer, const struct hello *h, int write, size_t len, int ops)
{
	double *t = malloc(sizeof(double) * (size_t)ops);
	if (!t) DIE("out of memory");
	for (int i = 0; i < 200; i++) {
		post(c, peer, h, write, 0, len);
		reap(c, 1);
	}
	for (int i = 0; i < ops; i++) {
		double t0 = now_us();
		post(c, peer, h, write, 0, len);
		reap(c, 1);
		t[i] = now_us() - t0;
	}
	qsort(t, (size_t)ops, sizeof(double), cmp);
	double p50 = t[ops / 2];
	free(t);
	return p50;
}

static double bandwidth(struct ctx *c, fi_addr_t peer, const struct hello *h, int write, size_t len, double secs)
{
	size_t depth = (16u << 20) / len;
	if (depth > 64) depth = 64;
	if (depth < 4) depth = 4;
	size_t posted = 0, done = 0;
	double t0 = now_us(), end = t0 + secs * 1e6;
	while (posted < depth) post(c, peer, h, write, (posted++ % depth) * len, len);
	while (done < posted) {
		reap(c, 1);
		done++;
		if (now_us() < end || posted < 2 * depth) post(c, peer, h, write, (posted++ % depth) * len, len);
	}
	return (double)done * (double)len / ((now_us() - t0) * 1e3);
}

int main(int argc, char **argv)
{
	if (argc != 4) DIE("usage: fi_reference PROVIDER LAT_OPS BW_SECS");
	const char *prov = argv[1];
	int ops = atoi(argv[2]);
	double secs = atof(argv[3]);
	if (ops < 10 || !(secs > 0)) DIE("LAT_OPS >= 10 and BW_SECS > 0");
	int up[2], down[2];
	if (pipe(up) || pipe(down)) DIE("pipe");
	pid_t child = fork();
	if (child < 0) DIE("fork");
	struct ctx c;
	struct hello mine, theirs;
	fi_addr_t peer;
	if (child == 0) {
		close(up[0]), close(down[1]);
		open_ctx(&c, prov);
		hello_of(&c, &mine);
		xfer(up[1], &mine, sizeof mine, 1);
		xfer(down[0], &theirs, sizeof theirs, 0);
		if (fi_av_insert(c.av, theirs.addr, 1, &peer, 0, NULL) != 1) DIE("fi_av_insert");
		char go = 1;
		xfer(up[1], &go, 1, 1);
		/* Serve: drive progress until the parent closes its end of the pipe. */
		struct pollfd p = { down[0], POLLIN, 0 };
		for (unsigned long i = 0;; i++) {
			struct fi_cq_tagged_entry e;
			(void)fi_cq_read(c.cq, &e, 1);
			if ((i & 1023) == 0 && poll(&p, 1, 0) > 0) break;
		}
		_exit(0);
	}
	close(up[1]), close(down[0]);
	open_ctx(&c, prov);
	hello_of(&c, &mine);
	xfer(up[0], &theirs, sizeof theirs, 0);
	xfer(down[1], &mine, sizeof mine, 1);
	if (fi_av_insert(c.av, theirs.addr, 1, &peer, 0, NULL) != 1) DIE("fi_av_insert");
	char go;
	xfer(up[0], &go, 1, 0);
	const char *name = c.shm ? "shm" : "tcp";
	size_t lat_sizes[] = { 8, 4096 };
	for (int s = 0; s < 2; s++)
		for (int w = 1; w >= 0; w--)
			printf("{\"provider\":\"%s\",\"op\":\"%s\",\"size\":%zu,\"lat_p50_us\":%.3f,\"bw_gbs\":null}\n",
			       name, w ? "write" : "read", lat_sizes[s],
			       latency(&c, peer, &theirs, w, lat_sizes[s], ops));
	for (int w = 1; w >= 0; w--)
		printf("{\"provider\":\"%s\",\"op\":\"%s\",\"size\":%u,\"lat_p50_us\":null,\"bw_gbs\":%.3f}\n",
		       name, w ? "write" : "read", 1u << 20, bandwidth(&c, peer, &theirs, w, 1u << 20, secs));
	fflush(stdout);
	close(down[1]);
	int status;
	waitpid(child, &status, 0);
	return 0;
}
