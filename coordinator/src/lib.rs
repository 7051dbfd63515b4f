//! The `lade` coordinator: reads an offline bundle without extracting it ([`bundle`]), plans
//! per node what is missing, streams blobs to every node's `lade-agent`, has the agents
//! import and name the images, verifies the result and reports per node ([`load`]).
//!
//! `main.rs` only parses the command line and wires these parts.

pub mod bundle;
pub mod hints;
pub mod inspect;
pub mod load;
pub mod progress;
pub mod reference;
