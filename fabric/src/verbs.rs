//! InfiniBand verbs backend (RC queue pairs). Being written; until then it reports itself
//! unavailable.
use crate::config::FabricConfig;
use crate::error::{FabricError, Result};

pub fn device_names() -> Result<Vec<String>> {
    Ok(Vec::new())
}

pub struct VerbsEndpoint;

impl VerbsEndpoint {
    pub fn open(_config: &FabricConfig) -> Result<crate::loopback::LoopbackEndpoint> {
        Err(FabricError::ProviderUnavailable {
            provider: "verbs".into(),
            reason: "not built yet".into(),
        })
    }
}
