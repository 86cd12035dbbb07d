/* Out-of-line wrappers for libfabric's static inline calls (see shim.h). They only call
 * through the function tables of objects libfabric handed out, so this file references no
 * libfabric symbol: the library itself is loaded with dlopen (src/lib.rs). */
#include "shim.h"

int krun_fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain, void *context)
{ return fi_domain(fabric, info, domain, context); }
int krun_fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep, void *context)
{ return fi_endpoint(domain, info, ep, context); }
int krun_fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq, void *context)
{ return fi_cq_open(domain, attr, cq, context); }
int krun_fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av, void *context)
{ return fi_av_open(domain, attr, av, context); }
int krun_fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags) { return fi_ep_bind(ep, bfid, flags); }
int krun_fi_enable(struct fid_ep *ep) { return fi_enable(ep); }
int krun_fi_getname(struct fid_ep *ep, void *addr, size_t *addrlen) { return fi_getname(&ep->fid, addr, addrlen); }
int krun_fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr, uint64_t flags, void *context)
{ return fi_av_insert(av, addr, count, fi_addr, flags, context); }
int krun_fi_mr_reg(struct fid_domain *domain, const void *buf, size_t len, uint64_t access, uint64_t offset,
                   uint64_t requested_key, uint64_t flags, struct fid_mr **mr, void *context)
{ return fi_mr_reg(domain, buf, len, access, offset, requested_key, flags, mr, context); }
uint64_t krun_fi_mr_key(struct fid_mr *mr) { return fi_mr_key(mr); }
void *krun_fi_mr_desc(struct fid_mr *mr) { return fi_mr_desc(mr); }
int krun_fi_close(struct fid *fid) { return fi_close(fid); }
int krun_fi_close_ep(struct fid_ep *ep) { return fi_close(&ep->fid); }
int krun_fi_close_cq(struct fid_cq *cq) { return fi_close(&cq->fid); }
int krun_fi_close_av(struct fid_av *av) { return fi_close(&av->fid); }
int krun_fi_close_mr(struct fid_mr *mr) { return fi_close(&mr->fid); }
int krun_fi_close_domain(struct fid_domain *d) { return fi_close(&d->fid); }
int krun_fi_close_fabric(struct fid_fabric *f) { return fi_close(&f->fid); }
ssize_t krun_fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags) { return fi_writemsg(ep, msg, flags); }
ssize_t krun_fi_readmsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags) { return fi_readmsg(ep, msg, flags); }
ssize_t krun_fi_fetch_atomicmsg(struct fid_ep *ep, const struct fi_msg_atomic *msg, struct fi_ioc *resultv,
                                void **result_desc, size_t result_count, uint64_t flags)
{ return fi_fetch_atomicmsg(ep, msg, resultv, result_desc, result_count, flags); }
ssize_t krun_fi_compare_atomicmsg(struct fid_ep *ep, const struct fi_msg_atomic *msg, const struct fi_ioc *comparev,
                                  void **compare_desc, size_t compare_count, struct fi_ioc *resultv,
                                  void **result_desc, size_t result_count, uint64_t flags)
{ return fi_compare_atomicmsg(ep, msg, comparev, compare_desc, compare_count, resultv, result_desc, result_count, flags); }
ssize_t krun_fi_tsend(struct fid_ep *ep, const void *buf, size_t len, void *desc, fi_addr_t dest_addr, uint64_t tag, void *context)
{ return fi_tsend(ep, buf, len, desc, dest_addr, tag, context); }
ssize_t krun_fi_trecv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr, uint64_t tag, uint64_t ignore, void *context)
{ return fi_trecv(ep, buf, len, desc, src_addr, tag, ignore, context); }
ssize_t krun_fi_cq_read(struct fid_cq *cq, void *buf, size_t count) { return fi_cq_read(cq, buf, count); }
ssize_t krun_fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags) { return fi_cq_readerr(cq, buf, flags); }
const char *krun_fi_cq_strerror(struct fid_cq *cq, int prov_errno, const void *err_data, char *buf, size_t len)
{ return fi_cq_strerror(cq, prov_errno, err_data, buf, len); }
int krun_fi_cancel(struct fid_ep *ep, void *context) { return (int)fi_cancel(&ep->fid, context); }
int krun_fi_cntr_open(struct fid_domain *domain, struct fi_cntr_attr *attr, struct fid_cntr **cntr, void *context)
{ return fi_cntr_open(domain, attr, cntr, context); }
uint64_t krun_fi_cntr_read(struct fid_cntr *cntr) { return fi_cntr_read(cntr); }
int krun_fi_close_cntr(struct fid_cntr *cntr) { return fi_close(&cntr->fid); }
