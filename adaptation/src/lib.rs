//! Adaptation layer (planned): membership with agreed views, a tree-of-cells locator of
//! directory-entry managers, the 4-step entry migration protocol and failure repair by
//! scanning for orphans. Nothing is implemented yet; see the adaptation-layer issue.
