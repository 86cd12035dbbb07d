//! Multilevel checkpoint store (planned): L1 local memory, L2 buddy memory written with
//! one-sided RDMA through `fabric`, L3 parity across a cell, L4 io_uring disk images;
//! versioned and checksummed. Nothing is implemented yet.
