//! CRIU backend (being written).
