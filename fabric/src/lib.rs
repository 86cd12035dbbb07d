//! krun's fabric layer: one-sided RDMA (write, read, 64-bit fetch-add and compare-swap) and
//! tagged two-sided messages, with identical semantics over several backends:
//!
//! - [`ofi`]: libfabric, providers `tcp;ofi_rxm`, `shm` and `verbs;ofi_rxm`;
//! - [`verbs`]: InfiniBand verbs directly (RC queue pairs);
//! - [`loopback`]: in-process, for unit tests.
//!
//! ```
//! use fabric::{open, FabricConfig, Provider, Region};
//! let a = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
//! let b = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
//! let target = b.register(Region::new(4096).unwrap()).unwrap();
//! let peer = a.connect(&b.address()).unwrap();
//! assert_eq!(a.fetch_add(peer, &target.remote(), 0, 5).unwrap(), 0);
//! assert_eq!(target.atomic_u64(0).unwrap().load(std::sync::atomic::Ordering::SeqCst), 5);
//! ```
pub mod bootstrap;
pub mod completion;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod fuzz;
pub mod loopback;
pub mod memory;
pub mod ofi;
mod ops;
pub mod secret;
pub mod verbs;
pub mod wire;

pub use completion::{wait_all, Completion};
pub use config::{FabricConfig, Provider, ProviderChoice};
pub use endpoint::{Endpoint, EndpointAddress, Message, PeerId};
pub use error::{FabricError, Result};
pub use memory::{MemoryRegion, Region, RemoteRegion};

/// Opens an endpoint on the configured provider. `auto` picks verbs when an RDMA device is
/// present, else libfabric's tcp.
pub fn open(config: &FabricConfig) -> Result<Box<dyn Endpoint>> {
    let provider = match config.provider {
        ProviderChoice::Exactly(p) => p,
        ProviderChoice::Auto => {
            if verbs::device_names()
                .map(|d| !d.is_empty())
                .unwrap_or(false)
            {
                Provider::Verbs
            } else {
                Provider::Tcp
            }
        }
    };
    Ok(match provider {
        Provider::Loopback => Box::new(loopback::LoopbackEndpoint::open(config)?),
        Provider::Tcp | Provider::Shm | Provider::VerbsOfi => {
            Box::new(ofi::OfiEndpoint::open(provider, config)?)
        }
        Provider::Verbs => Box::new(verbs::VerbsEndpoint::open(config)?),
    })
}

/// A random 64-bit token identifying an endpoint instance, from the kernel's random source
/// (fails rather than fall back to anything guessable).
pub(crate) fn random_token() -> Result<u64> {
    random_u64()
}

/// A random 64-bit value from the kernel (nonces, tokens); fails if the random source does.
pub fn random_u64() -> Result<u64> {
    let mut buf = [0u8; 8];
    secret::fill_random(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}
