//! Shared by lade's integration tests and by the demo and benchmarks (crate `lade-bench`):
//! deterministic generated test images in every archive form lade reads ([`fixtures`]), real
//! daemons started privately per simulated node ([`harness`], [`cri`], [`nodes`]; [`require`]
//! decides whether they run at all), a recording stand-in for the `helm` CLI ([`helm`]),
//! hostile and broken archives ([`hostile`]), a private container registry ([`registry`]) with
//! its token server ([`token`]) and throwaway TLS material ([`certs`]). Nothing here is used by
//! the product.

pub mod certs;
pub mod cri;
pub mod fixtures;
pub mod harness;
pub mod helm;
pub mod hostile;
pub mod nodes;
pub mod registry;
pub mod require;
pub mod runtimes;
pub mod token;
