//! Page-based distributed shared memory (planned).
//!
//! Will hold: page faults trapped with userfaultfd, pages moved by one-sided reads through
//! `fabric`, and a directory of page owners kept by managers located by `adaptation`
//! (single writer / multiple readers coherence, as in IVY and Kerrighed containers).
//! Nothing is implemented yet; the crate exists so the workspace shows the architecture.
