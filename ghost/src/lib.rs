//! Ghost processes (planned): capture a process into an image, restore it as a new process,
//! roll a live one back, or migrate it, behind one checkpointer API over several
//! checkpointers (CRIU for transparent capture, a native one for runtime-registered memory).
//! Nothing is implemented yet; see the ghost/checkpoint-store issue.
