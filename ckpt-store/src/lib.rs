//! Multilevel checkpoint store: L1 local memory, L2 a buddy node's memory written with one-sided
//! RDMA through `fabric`, L3 parity across a group of nodes, L4 disk images written with
//! io_uring; every copy is versioned and checksummed.
pub mod buddy;
pub mod disk;
pub mod error;
pub mod store;
pub mod wire;

pub use buddy::Placement;
pub use error::{Result, StoreError};
pub use store::{
    GetReport, ImageBytes, Level, NewestSafe, NodeInfo, ParityState, PutReport, Ready, Store,
    StoreConfig, Usage, PIPE_CHUNK, PIPE_WINDOW,
};
