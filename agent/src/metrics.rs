//! The agent's Prometheus metrics, declared in one place. The registry is passed in (no
//! globals), so tests and the HTTP endpoint see exactly the metrics of one agent.
//!
//! Names follow `lade_agent_<thing>_<unit>`.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric the agent exports.
#[derive(Clone)]
pub struct Metrics {
    /// Blob bytes taken from PutBlob streams.
    pub received_bytes: IntCounter,
    /// Blobs verified and stored.
    pub blobs_committed: IntCounter,
    /// Blobs asked for (Have or PutBlob) that the node already held.
    pub blobs_present: IntCounter,
    /// Wall time of one image's import (unpack + naming).
    pub image_import_seconds: Histogram,
    /// Wall time of applying one layer.
    pub layer_unpack_seconds: Histogram,
    /// Failed requests by reason (the gRPC status code name).
    pub failures: IntCounterVec,
    /// PutBlob streams in progress.
    pub inflight_uploads: IntGauge,
    /// Constant 1, labelled with the agent version and runtime.
    pub build_info: IntGaugeVec,
    /// Blob bytes passed on to other agents (relay).
    pub relay_bytes: IntCounter,
    /// Blob bytes this agent fetched from peers (Fetch).
    pub fetched_bytes: IntCounter,
    /// Blob bytes peers read from this agent (ReadBlob).
    pub served_bytes: IntCounter,
    /// Images of held bundle versions by state after the last keep-present pass:
    /// `present`, `incomplete`, `missing`.
    pub held_images: IntGaugeVec,
    /// What keep-present passes put back, by kind (`name`, `pin`, `unpack`, `content`).
    pub repairs: IntCounterVec,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let seconds = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]))
        };
        let m = Metrics {
            received_bytes: IntCounter::new(
                "lade_agent_received_bytes_total",
                "Blob bytes received from the coordinator.",
            )?,
            blobs_committed: IntCounter::new(
                "lade_agent_blobs_committed_total",
                "Blobs verified against their digest and stored.",
            )?,
            blobs_present: IntCounter::new(
                "lade_agent_blobs_already_present_total",
                "Blobs the node already held when asked for them.",
            )?,
            image_import_seconds: seconds(
                "lade_agent_image_import_duration_seconds",
                "Time to unpack and name one image.",
            )?,
            layer_unpack_seconds: seconds(
                "lade_agent_layer_unpack_duration_seconds",
                "Time to apply one layer into the snapshotter.",
            )?,
            failures: IntCounterVec::new(
                Opts::new("lade_agent_failures_total", "Failed requests by reason."),
                &["reason"],
            )?,
            inflight_uploads: IntGauge::new(
                "lade_agent_inflight_uploads",
                "Blob uploads in progress.",
            )?,
            build_info: IntGaugeVec::new(
                Opts::new(
                    "lade_agent_build_info",
                    "Agent version and runtime; always 1.",
                ),
                &["version", "runtime"],
            )?,
            relay_bytes: IntCounter::new(
                "lade_agent_relay_bytes_total",
                "Blob bytes forwarded to other agents (relay).",
            )?,
            fetched_bytes: IntCounter::new(
                "lade_agent_fetched_bytes_total",
                "Blob bytes fetched from peer agents.",
            )?,
            served_bytes: IntCounter::new(
                "lade_agent_served_bytes_total",
                "Blob bytes peer agents read from this agent.",
            )?,
            held_images: IntGaugeVec::new(
                Opts::new(
                    "lade_agent_held_images",
                    "Images of held bundle versions after the last keep-present pass, by state.",
                ),
                &["state"],
            )?,
            repairs: IntCounterVec::new(
                Opts::new(
                    "lade_agent_repairs_total",
                    "What keep-present passes put back, by kind.",
                ),
                &["kind"],
            )?,
        };
        registry.register(Box::new(m.received_bytes.clone()))?;
        registry.register(Box::new(m.blobs_committed.clone()))?;
        registry.register(Box::new(m.blobs_present.clone()))?;
        registry.register(Box::new(m.image_import_seconds.clone()))?;
        registry.register(Box::new(m.layer_unpack_seconds.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.inflight_uploads.clone()))?;
        registry.register(Box::new(m.build_info.clone()))?;
        registry.register(Box::new(m.relay_bytes.clone()))?;
        registry.register(Box::new(m.fetched_bytes.clone()))?;
        registry.register(Box::new(m.served_bytes.clone()))?;
        registry.register(Box::new(m.held_images.clone()))?;
        registry.register(Box::new(m.repairs.clone()))?;
        Ok(m)
    }

    /// Counts a failed request under its gRPC code name (`data_loss`, `unavailable`, ...).
    pub fn failed(&self, status: &tonic::Status) {
        let reason = format!("{:?}", status.code());
        self.failures.with_label_values(&[&snake(&reason)]).inc();
    }
}

fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn metrics_are_exported_under_their_names() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        m.received_bytes.inc_by(42);
        m.relay_bytes.inc_by(7);
        m.failed(&tonic::Status::data_loss("x"));
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("lade_agent_received_bytes_total 42"),
            "{text}"
        );
        assert!(text.contains("lade_agent_relay_bytes_total 7"), "{text}");
        assert!(
            text.contains("lade_agent_failures_total{reason=\"data_loss\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn registering_twice_in_one_registry_is_an_error() {
        let registry = Registry::new();
        Metrics::new(&registry).unwrap();
        assert!(Metrics::new(&registry).is_err());
    }
}
