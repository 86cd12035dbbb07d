//! High-availability policies (planned): coordinated checkpoint with a barrier and
//! uncoordinated checkpoint with event logging and a recovery line, built from primitives,
//! described declaratively and plugged or unplugged while applications run.
