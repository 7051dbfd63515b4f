//! The `lade` coordinator: reads an offline bundle without extracting it ([`bundle`]), plans
//! per node what is missing, streams blobs to every node's `lade-agent`, has the agents
//! import and name the images, verifies the result and reports per node ([`load`]), then
//! upgrades the module's helm release, once it has proved that every node holds every image
//! the chart will pull ([`upgrade`]). The agents are given by address, or found through the
//! Kubernetes API as the pods of the lade chart ([`discover`]). Where the cluster pulls from
//! a registry instead, the images and the chart are pushed there ([`push`]). Every load leaves
//! a record of the bundle version on each node; [`lifecycle`] reads them back and lets go of
//! old versions.
//!
//! The `lade` binary (`main.rs` and its `cli/` module, outside this library) only parses the
//! command line and wires these parts.

pub mod bundle;
pub mod discover;
pub mod hints;
pub mod inspect;
pub mod lifecycle;
pub mod load;
pub mod progress;
pub mod push;
pub mod reference;
pub mod select;
pub mod status;
pub mod table;
pub mod upgrade;
