//! Checks each layer a load sends once, alongside its upload, and holds back the upload's
//! last chunk until the check has passed.
//!
//! Owns *when* [`Bundle::check_layer`] runs during a load: a blob digest covers the stored
//! bytes only, so what a layer unpacks to (its diffID, how far it expands, where its entries
//! land) is checked here by decompressing it on the coordinator. Only layers some node lacks
//! are checked, each once per load however many nodes receive it, and the check runs while
//! the first upload of the layer streams. A node commits a blob only once it has every byte,
//! so withholding the last chunk of a layer that fails means no node ever holds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::bundle::{Bundle, BundleError, LayerLimits};

type Outcome = Result<u64, Arc<BundleError>>;

/// The layer checks of one load, shared by every node's uploads.
#[derive(Debug)]
pub struct LayerChecks {
    bundle: Arc<Bundle>,
    limits: LayerLimits,
    /// diffID of every layer blob (the first image's, when images disagree; a layer whose
    /// images disagree fails the check against one of them, or at the node).
    diff_ids: HashMap<String, String>,
    done: Mutex<HashMap<String, Arc<OnceLock<Outcome>>>>,
}

impl LayerChecks {
    pub fn new(bundle: Arc<Bundle>, limits: LayerLimits) -> LayerChecks {
        let mut diff_ids = HashMap::new();
        for (layer, diff_id) in super::plan::layer_diff_ids(&bundle) {
            diff_ids
                .entry(layer.clone())
                .or_insert_with(|| diff_id.clone());
        }
        LayerChecks {
            bundle,
            limits,
            diff_ids,
            done: Mutex::new(HashMap::new()),
        }
    }

    /// Whether blob `digest` is a layer (and so gets checked).
    pub fn is_layer(&self, digest: &str) -> bool {
        self.diff_ids.contains_key(digest)
    }

    fn cell(&self, digest: &str) -> Arc<OnceLock<Outcome>> {
        let mut done = self.done.lock().expect("layer check map poisoned");
        done.entry(digest.to_string()).or_default().clone()
    }

    /// Starts checking layer `digest` on a blocking thread, unless it was started already.
    pub fn start(self: &Arc<Self>, digest: &str) {
        if !self.is_layer(digest) {
            return;
        }
        let cell = self.cell(digest);
        if cell.get().is_some() {
            return;
        }
        let (checks, digest) = (self.clone(), digest.to_string());
        tokio::task::spawn_blocking(move || checks.wait(&digest));
    }

    /// Checks `layers` one after another on a blocking thread, in the order they will be
    /// sent, so each is usually done before its upload needs the result. Layers checked or
    /// being checked already are not checked again.
    pub fn prefetch(self: &Arc<Self>, layers: Vec<String>) {
        let checks = self.clone();
        tokio::task::spawn_blocking(move || {
            for digest in layers.iter().filter(|d| checks.is_layer(d)) {
                // A failure is kept for the upload that meets it; nothing to do here.
                let _ = checks.wait(digest);
            }
        });
    }

    /// The check's result for layer `digest` (its uncompressed size), running it here if no
    /// one started it and waiting if another thread is running it. Blocking: call it off the
    /// async workers. Blobs that are not layers pass.
    pub fn wait(&self, digest: &str) -> Result<u64, Arc<BundleError>> {
        let Some(diff_id) = self.diff_ids.get(digest) else {
            return Ok(0);
        };
        let cell = self.cell(digest);
        let outcome = cell.get_or_init(|| {
            self.bundle
                .check_layer(digest, diff_id, &self.limits)
                .map_err(Arc::new)
        });
        outcome.clone()
    }
}
