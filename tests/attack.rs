//! Attacks on the root agent, one test per finding of the red-team review (see SECURITY.md):
//! crafted layers against its applier, hostile names and bundles against the coordinator's and
//! the agent's naming, and hostile callers and peers against its ports and its relay.
//! Each test fails with the defence it exercises disabled.

// The crate root is tests/attack.rs, so its modules would be looked up beside it in tests/.
#[path = "attack/applier.rs"]
mod applier;
#[path = "attack/names.rs"]
mod names;
#[path = "attack/surface.rs"]
mod surface;
