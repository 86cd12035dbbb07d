/* Out-of-line wrappers for libfabric's static inline calls, which bindgen cannot bind. */
#ifndef KRUN_FI_SHIM_H
#define KRUN_FI_SHIM_H
#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_atomic.h>
#include <rdma/fi_tagged.h>
#include <rdma/fi_eq.h>

int krun_fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain, void *context);
int krun_fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep, void *context);
int krun_fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq, void *context);
int krun_fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av, void *context);
int krun_fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags);
int krun_fi_enable(struct fid_ep *ep);
int krun_fi_getname(struct fid_ep *ep, void *addr, size_t *addrlen);
int krun_fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr, uint64_t flags, void *context);
int krun_fi_mr_reg(struct fid_domain *domain, const void *buf, size_t len, uint64_t access, uint64_t offset,
                   uint64_t requested_key, uint64_t flags, struct fid_mr **mr, void *context);
uint64_t krun_fi_mr_key(struct fid_mr *mr);
void *krun_fi_mr_desc(struct fid_mr *mr);
int krun_fi_close(struct fid *fid);
int krun_fi_close_ep(struct fid_ep *ep);
int krun_fi_close_cq(struct fid_cq *cq);
int krun_fi_close_av(struct fid_av *av);
int krun_fi_close_mr(struct fid_mr *mr);
int krun_fi_close_domain(struct fid_domain *d);
int krun_fi_close_fabric(struct fid_fabric *f);
ssize_t krun_fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t krun_fi_readmsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t krun_fi_fetch_atomicmsg(struct fid_ep *ep, const struct fi_msg_atomic *msg, struct fi_ioc *resultv,
                                void **result_desc, size_t result_count, uint64_t flags);
ssize_t krun_fi_compare_atomicmsg(struct fid_ep *ep, const struct fi_msg_atomic *msg, const struct fi_ioc *comparev,
                                  void **compare_desc, size_t compare_count, struct fi_ioc *resultv,
                                  void **result_desc, size_t result_count, uint64_t flags);
ssize_t krun_fi_tsend(struct fid_ep *ep, const void *buf, size_t len, void *desc, fi_addr_t dest_addr, uint64_t tag, void *context);
ssize_t krun_fi_trecv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr, uint64_t tag, uint64_t ignore, void *context);
ssize_t krun_fi_cq_read(struct fid_cq *cq, void *buf, size_t count);
ssize_t krun_fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags);
const char *krun_fi_cq_strerror(struct fid_cq *cq, int prov_errno, const void *err_data, char *buf, size_t len);
int krun_fi_cancel(struct fid_ep *ep, void *context);
int krun_fi_cntr_open(struct fid_domain *domain, struct fi_cntr_attr *attr, struct fid_cntr **cntr, void *context);
uint64_t krun_fi_cntr_read(struct fid_cntr *cntr);
int krun_fi_close_cntr(struct fid_cntr *cntr);
#endif
