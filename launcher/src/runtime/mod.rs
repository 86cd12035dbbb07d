//! The node runtime inside krund.
pub mod agent;
