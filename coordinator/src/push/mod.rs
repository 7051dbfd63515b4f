//! `lade push`: the bundle's images, and its chart, into a registry the cluster pulls from
//! (Harbor, distribution), which `global.imageRegistry` then points at.
//!
//! This module owns the procedure and its report: where each image goes ([`Target`]), which
//! tags may be written (an existing tag is never moved to another digest without `--force`),
//! which blobs the registry lacks, and in what order things are stored. The HTTP protocol is
//! [`registry`]'s, logins come from [`login`], the chart artifact from [`chart`], and the
//! other platforms of multi-platform images from [`platforms`].
//!
//! # Names
//!
//! `--registry HOST[:PORT][/PROJECT]` replaces each image's registry host and puts PROJECT in
//! front of its repository path (after the `--retag` rules): `release.daocloud.io/mspider/api:v1`
//! pushed to `harbor.local/offline` is `harbor.local/offline/mspider/api:v1`, and `busybox` is
//! `harbor.local/offline/library/busybox:latest`. The path is kept whole, even when it already
//! starts with PROJECT, so a chart whose images are `{{ global.imageRegistry }}/{{ repository }}`
//! finds them all with `global.imageRegistry: HOST/PROJECT`. Without PROJECT the path's first
//! component is the Harbor project (`harbor.local/mspider/api:v1`).
//!
//! # Procedure
//!
//! 1. Log in (nothing is written when the login is refused) and check every target tag with
//!    a manifest `HEAD`: a missing tag will be created, one at the image's digest is left
//!    alone, one at another digest is refused (moved with `--force`). An image without a tag
//!    to write sends nothing.
//! 2. `HEAD` every blob in every repository that needs it. A blob the registry holds in one
//!    of them is mounted into the others; a blob it lacks everywhere is uploaded once,
//!    streamed from the bundle and verified on the way, then mounted into the rest.
//! 3. Per image, once its blobs are all in: the platform manifests of a multi-platform image
//!    by digest, then the image's manifest (or index) under each tag. The registry checks
//!    that everything a manifest names is present, so a tag never points at partial content.
//! 4. The chart, the same way, as a helm OCI artifact.
//!
//! A failure (a blob the registry refused, a registry that went away) fails the images that
//! need it, not the others; a re-run skips every blob that arrived whole.

pub mod chart;
pub mod login;
pub mod platforms;
pub mod registry;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use indicatif::HumanBytes;
use serde::Serialize;
use tokio_stream::wrappers::ReceiverStream;

use crate::bundle::{Blob, BlobReader, Bundle, BundleError};
use crate::load::{plan_names, NodeReport, PlanError};
use crate::progress::Progress;
use crate::reference::{Reference, ReferenceError, RetagRule};
use lade_oci::MEDIA_TYPE_OCI_MANIFEST;

use chart::{ChartArtifact, ChartError};
use login::LoginError;
use platforms::PlatformIndex;
use registry::{Access, Registry, RegistryError, Upload};

/// Bytes per chunk streamed from the bundle to the registry.
const CHUNK: usize = 1 << 20;

/// Exit code when some tag was refused or some image could not be pushed.
pub const EXIT_INCOMPLETE: u8 = 1;

/// What stops a push before anything is written, naming the input, image or registry.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("invalid --registry {input:?}: {problem}")]
    BadTarget { input: String, problem: String },
    #[error("invalid --chart-repo {input:?}: {problem}")]
    BadChartRepo { input: String, problem: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(
        "{name} would be given to two different images ({first} and {second}); adjust --retag or --registry"
    )]
    NameClash {
        name: String,
        first: String,
        second: String,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Login(#[from] LoginError),
    #[error(transparent)]
    Chart(#[from] ChartError),
}

/// Where images go: `--registry HOST[:PORT][/PROJECT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    /// Path components put in front of every repository; may be empty.
    pub project: Vec<String>,
}

impl FromStr for Target {
    type Err = PushError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |problem: &str| PushError::BadTarget {
            input: s.to_string(),
            problem: problem.to_string(),
        };
        let trimmed = s.trim().trim_end_matches('/');
        if trimmed.contains("://") {
            return Err(bad("write HOST[:PORT]/PROJECT, without a scheme"));
        }
        let (host, project) = trimmed.split_once('/').unwrap_or((trimmed, ""));
        // Parsed as an image name to check host and path with the one grammar lade uses.
        let probe = match project {
            "" => format!("{host}/probe"),
            project => format!("{host}/{project}/probe"),
        };
        let reference = Reference::parse(&probe).map_err(|e| match e {
            ReferenceError::Invalid { reason, .. } => bad(&reason.to_string()),
            other => bad(&other.to_string()),
        })?;
        if reference.domain() != host {
            return Err(bad(
                "it must start with a registry host (with a '.' or a ':PORT', or localhost)",
            ));
        }
        Ok(Target {
            host: host.to_string(),
            project: project
                .split('/')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.host)?;
        for component in &self.project {
            write!(f, "/{component}")?;
        }
        Ok(())
    }
}

impl Target {
    /// The name `reference` (already renamed by the retag rules) gets in this registry.
    pub fn name_for(&self, reference: &Reference) -> Result<Reference, ReferenceError> {
        let mut name = self.to_string();
        name.push('/');
        name.push_str(reference.path());
        match (reference.tag(), reference.digest()) {
            (Some(tag), _) => write!(name, ":{tag}").expect("writing to a String"),
            (None, Some(digest)) => write!(name, "@{digest}").expect("writing to a String"),
            (None, None) => {}
        }
        Reference::parse(&name)
    }
}

/// Where the chart goes: `--chart-repo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChartRepo {
    /// Next to the images: `oci://` + `--registry`.
    WithImages,
    /// `oci://HOST[:PORT][/PATH]`.
    Oci(Target),
    /// `none`: the chart is not pushed.
    Skip,
}

impl FromStr for ChartRepo {
    type Err = PushError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "none" {
            return Ok(ChartRepo::Skip);
        }
        let Some(rest) = s.strip_prefix("oci://") else {
            return Err(PushError::BadChartRepo {
                input: s.to_string(),
                problem: "expected oci://HOST[:PORT]/PATH or none".into(),
            });
        };
        rest.parse().map(ChartRepo::Oci).map_err(|e| match e {
            PushError::BadTarget { problem, .. } => PushError::BadChartRepo {
                input: s.to_string(),
                problem,
            },
            other => other,
        })
    }
}

/// How a push runs.
#[derive(Clone, Debug)]
pub struct PushOptions {
    pub target: Target,
    pub rules: Vec<RetagRule>,
    pub chart_repo: ChartRepo,
    /// How to reach and log in to the registries (the images' and the chart's).
    pub access: Access,
    /// Move tags that point at another digest.
    pub force: bool,
    /// Check and report only; write nothing.
    pub dry_run: bool,
    /// Blobs uploaded at the same time.
    pub parallel: usize,
}

/// What happened to one tag (or, in a dry run, what would).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagOutcome {
    /// The tag did not exist and now points at the image.
    Created,
    /// The tag already pointed at this very digest.
    Unchanged,
    /// The tag pointed at another digest and was moved (`--force`).
    Moved,
    /// The tag points at another digest and was left alone.
    Refused,
    /// The image could not be pushed (see its error); the tag was not written.
    Failed,
}

/// One name of an image in the registry.
#[derive(Clone, Debug, Serialize)]
pub struct TagReport {
    /// `HOST/PROJECT/repository:tag`.
    pub name: String,
    pub outcome: TagOutcome,
    /// The digest the tag pointed at before, if it existed.
    pub previous: Option<String>,
}

/// One image of the bundle.
#[derive(Clone, Debug, Serialize)]
pub struct ImageReport {
    /// The image's name in the bundle.
    pub source: String,
    /// The digest its tags point at: its manifest, or its index for a multi-platform image.
    pub digest: String,
    pub tags: Vec<TagReport>,
    pub error: Option<String>,
}

/// The chart.
#[derive(Clone, Debug, Serialize)]
pub struct ChartReport {
    pub name: String,
    pub version: String,
    pub tag: TagReport,
    pub error: Option<String>,
}

/// Everything a push did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PushReport {
    /// `HOST[/PROJECT]`.
    pub registry: String,
    pub dry_run: bool,
    pub images: Vec<ImageReport>,
    pub chart: Option<ChartReport>,
    pub blobs_pushed: usize,
    pub bytes_pushed: u64,
    /// Blobs the registry already held in the repository that needed them.
    pub blobs_present: usize,
    pub bytes_present: u64,
    /// Blobs linked from another repository of the registry instead of uploaded.
    pub blobs_mounted: usize,
    pub bytes_mounted: u64,
    pub seconds: f64,
    /// Every tag created, unchanged or moved, and nothing failed.
    pub ok: bool,
}

/// One image's content: the blobs its manifests name, and its manifests, children first
/// (the last one is what the tags point at).
struct Content {
    blobs: Vec<Blob>,
    manifests: Vec<Manifest>,
}

struct Manifest {
    digest: String,
    media_type: String,
    bytes: Vec<u8>,
}

/// One image to push: where, and what.
struct Planned {
    source: String,
    targets: Vec<Reference>,
    content: Content,
}

impl Planned {
    fn top(&self) -> &Manifest {
        self.content
            .manifests
            .last()
            .expect("an image has a manifest")
    }
}

/// Pushes `bundle` as `opts` says, reporting progress under the registry's name. Errors are
/// what stops the push before anything is written; failures after that are in the report.
pub async fn push(
    bundle: Arc<Bundle>,
    opts: &PushOptions,
    progress: Arc<dyn Progress>,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let label = opts.target.to_string();
    let planned = plan(&bundle, &opts.target, &opts.rules)?;
    let chart = match (&opts.chart_repo, bundle.chart_files.is_empty()) {
        (ChartRepo::Skip, _) | (_, true) => None,
        _ => Some(chart::package(&bundle)?),
    };
    progress.node_started(&label);
    let registry = Registry::connect(&opts.target.host, &opts.access).await?;
    let chart_registry = match &opts.chart_repo {
        ChartRepo::Oci(target) if target.host != opts.target.host => {
            Some(Registry::connect(&target.host, &opts.access).await?)
        }
        _ => None,
    };

    let mut report = PushReport {
        registry: label.clone(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    // 1. Tags.
    progress.phase(&label, "checking tags");
    for image in &planned {
        report
            .images
            .push(check_tags(&registry, image, opts.force).await);
    }

    // 2. Blobs: which repositories need which blob, and which already hold it.
    progress.phase(&label, "checking blobs");
    let mut needed: BTreeMap<String, (Blob, BTreeSet<String>)> = BTreeMap::new();
    for (image, image_report) in planned.iter().zip(&report.images) {
        for repository in writable_repositories(image, image_report) {
            for blob in &image.content.blobs {
                needed
                    .entry(blob.digest.clone())
                    .or_insert_with(|| (blob.clone(), BTreeSet::new()))
                    .1
                    .insert(repository.clone());
            }
        }
    }
    // Content behind tags that stay as they are is in the registry (a manifest is stored
    // only once everything it names is): counted as present, without asking again.
    let mut untouched = BTreeMap::new();
    for (image, image_report) in planned.iter().zip(&report.images) {
        if image_report.error.is_none() && writable_repositories(image, image_report).is_empty() {
            for blob in image
                .content
                .blobs
                .iter()
                .filter(|b| !needed.contains_key(&b.digest))
            {
                untouched.insert(blob.digest.clone(), blob.size);
            }
        }
    }
    report.blobs_present += untouched.len();
    report.bytes_present += untouched.values().sum::<u64>();
    let checks: Vec<BlobPlan> = futures::stream::iter(needed.into_values())
        .map(|(blob, repositories)| check_blob(&registry, blob, repositories))
        .buffer_unordered(opts.parallel.max(1) * 4)
        .collect()
        .await;
    let to_upload: u64 = checks
        .iter()
        .filter(|c| c.error.is_none() && c.present.is_empty() && !c.missing.is_empty())
        .map(|c| c.blob.size)
        .sum();
    let present: u64 = checks
        .iter()
        .map(|c| c.blob.size * c.present.len() as u64)
        .sum();
    progress.sending(&label, to_upload, report.bytes_present + present);

    let failed_blobs: HashMap<String, String> = if opts.dry_run {
        dry_run_totals(&checks, &mut report);
        checks
            .iter()
            .filter_map(|c| Some((c.blob.digest.clone(), c.error.clone()?)))
            .collect()
    } else {
        let moved: Vec<BlobMoved> = futures::stream::iter(checks)
            .map(|check| {
                place_blob(
                    &registry,
                    bundle.clone(),
                    check,
                    progress.clone(),
                    label.clone(),
                )
            })
            .buffer_unordered(opts.parallel.max(1))
            .collect()
            .await;
        let mut failed = HashMap::new();
        for m in moved {
            report.blobs_present += m.present;
            report.bytes_present += m.present as u64 * m.size;
            report.blobs_mounted += m.mounted;
            report.bytes_mounted += m.mounted as u64 * m.size;
            report.blobs_pushed += m.uploads;
            report.bytes_pushed += m.uploads as u64 * m.size;
            if let Some(e) = m.error {
                failed.insert(m.digest, e);
            }
        }
        failed
    };

    // 3. Manifests and tags.
    progress.phase(&label, "storing manifests and tags");
    for (image, image_report) in planned.iter().zip(report.images.iter_mut()) {
        if image_report.error.is_none() {
            if let Some((digest, reason)) = image
                .content
                .blobs
                .iter()
                .find_map(|b| Some((&b.digest, failed_blobs.get(&b.digest)?)))
            {
                fail(image_report, format!("blob {digest}: {reason}"));
            }
        }
        if image_report.error.is_some() || opts.dry_run {
            continue;
        }
        if let Err(e) = store_manifests(&registry, image, image_report).await {
            fail(image_report, e.to_string());
        }
    }

    // 4. The chart.
    if let Some(artifact) = chart {
        progress.phase(&label, "pushing the chart");
        let (target, registry) = match &opts.chart_repo {
            ChartRepo::Oci(target) => (target, chart_registry.as_ref().unwrap_or(&registry)),
            _ => (&opts.target, &registry),
        };
        report.chart = Some(push_chart(registry, target, &artifact, opts, &mut report).await);
    }

    report.ok = report.images.iter().all(image_ok)
        && report
            .chart
            .as_ref()
            .is_none_or(|c| c.error.is_none() && c.tag.outcome != TagOutcome::Refused);
    report.seconds = started.elapsed().as_secs_f64();
    progress.node_finished(&NodeReport {
        agent: label,
        ok: report.ok,
        ..Default::default()
    });
    Ok(report)
}

fn image_ok(image: &ImageReport) -> bool {
    image.error.is_none()
        && image
            .tags
            .iter()
            .all(|t| !matches!(t.outcome, TagOutcome::Refused | TagOutcome::Failed))
}

fn fail(image: &mut ImageReport, error: String) {
    for tag in &mut image.tags {
        if matches!(tag.outcome, TagOutcome::Created | TagOutcome::Moved) {
            tag.outcome = TagOutcome::Failed;
        }
    }
    image.error = Some(error);
}

/// Every image of the bundle with its names in the registry and its content. Fails on a name
/// that is not valid or would be given to two different images.
fn plan(bundle: &Bundle, target: &Target, rules: &[RetagRule]) -> Result<Vec<Planned>, PushError> {
    let names = plan_names(bundle, rules, false, false)?;
    let indexes = platforms::read(bundle)?;
    let mut owner: HashMap<String, (String, String)> = HashMap::new();
    let mut planned = Vec::with_capacity(names.len());
    for (image, named) in bundle.images.iter().zip(names) {
        let content = content(bundle, image, indexes.get(&image.manifest))?;
        let digest = content.manifests.last().expect("a manifest").digest.clone();
        let mut targets = Vec::new();
        for name in &named.names {
            let pushed = target.name_for(&Reference::parse(name)?)?;
            let key = pushed.to_string();
            if let Some((other, first)) = owner.get(&key) {
                if *other != digest {
                    return Err(PushError::NameClash {
                        name: key,
                        first: first.clone(),
                        second: named.source.clone(),
                    });
                }
            }
            owner.insert(key, (digest.clone(), named.source.clone()));
            if !targets.contains(&pushed) {
                targets.push(pushed);
            }
        }
        planned.push(Planned {
            source: named.source,
            targets,
            content,
        });
    }
    Ok(planned)
}

/// What the registry gets for `image`: its manifest, config and layers, or for a
/// multi-platform image every platform's and the index.
fn content(
    bundle: &Bundle,
    image: &crate::bundle::Image,
    index: Option<&PlatformIndex>,
) -> Result<Content, BundleError> {
    let Some(index) = index else {
        let blob = |digest: &String| bundle.blob(digest).cloned();
        let manifest = blob(&image.manifest)?;
        let bytes = read_whole(bundle, &manifest)?;
        let mut blobs = vec![blob(&image.config)?];
        for layer in &image.layers {
            blobs.push(blob(layer)?);
        }
        return Ok(Content {
            blobs,
            manifests: vec![Manifest {
                digest: manifest.digest,
                media_type: manifest_type(&manifest.media_type),
                bytes,
            }],
        });
    };
    let mut blobs: Vec<Blob> = Vec::new();
    let mut manifests = Vec::new();
    for platform in &index.manifests {
        for blob in &platform.blobs {
            if !blobs.iter().any(|b| b.digest == blob.digest) {
                blobs.push(blob.clone());
            }
        }
        manifests.push(Manifest {
            digest: platform.manifest.digest.clone(),
            media_type: manifest_type(&platform.manifest.media_type),
            bytes: platform.bytes.clone(),
        });
    }
    manifests.push(Manifest {
        digest: index.index.digest.clone(),
        media_type: index.index.media_type.clone(),
        bytes: index.index_bytes.clone(),
    });
    Ok(Content { blobs, manifests })
}

/// An OCI manifest may leave out its media type; the registry needs one.
fn manifest_type(media_type: &str) -> String {
    match media_type {
        "" => MEDIA_TYPE_OCI_MANIFEST.to_string(),
        media_type => media_type.to_string(),
    }
}

/// A small blob, whole (a manifest or an index), its digest verified by the reader.
fn read_whole(bundle: &Bundle, blob: &Blob) -> Result<Vec<u8>, BundleError> {
    if blob.size > lade_oci::MAX_METADATA_BYTES {
        return Err(BundleError::BadArchive {
            archive: bundle.archive_label.clone(),
            reason: format!(
                "{} is larger than {} bytes",
                blob.digest,
                lade_oci::MAX_METADATA_BYTES
            ),
        });
    }
    let mut reader = BlobReader::open(&bundle.path, &bundle.archive_label, blob, 0, true)?;
    let mut bytes = Vec::with_capacity(blob.size as usize);
    while let Some(chunk) = reader.next_chunk(CHUNK)? {
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Where each of `image`'s tags stands, from a manifest `HEAD` per tag.
async fn check_tags(registry: &Registry, image: &Planned, force: bool) -> ImageReport {
    let digest = image.top().digest.clone();
    let mut report = ImageReport {
        source: image.source.clone(),
        digest: digest.clone(),
        tags: Vec::new(),
        error: None,
    };
    for target in &image.targets {
        let reference = tag_or_digest(target);
        let (outcome, previous) = match registry.manifest_digest(target.path(), reference).await {
            Ok(None) => (TagOutcome::Created, None),
            Ok(Some(existing)) if existing == digest => (TagOutcome::Unchanged, Some(existing)),
            Ok(Some(existing)) if force => (TagOutcome::Moved, Some(existing)),
            Ok(Some(existing)) => (TagOutcome::Refused, Some(existing)),
            Err(e) => {
                report.error.get_or_insert(e.to_string());
                (TagOutcome::Failed, None)
            }
        };
        report.tags.push(TagReport {
            name: target.to_string(),
            outcome,
            previous,
        });
    }
    report
}

fn tag_or_digest(target: &Reference) -> &str {
    target
        .tag()
        .or(target.digest())
        .expect("a reference has a tag or a digest")
}

/// The repositories where `image` has a tag to write.
fn writable_repositories(image: &Planned, report: &ImageReport) -> BTreeSet<String> {
    if report.error.is_some() {
        return BTreeSet::new();
    }
    image
        .targets
        .iter()
        .zip(&report.tags)
        .filter(|(_, t)| matches!(t.outcome, TagOutcome::Created | TagOutcome::Moved))
        .map(|(target, _)| target.path().to_string())
        .collect()
}

/// One blob: the repositories that need it, split by whether they hold it.
struct BlobPlan {
    blob: Blob,
    present: Vec<String>,
    missing: Vec<String>,
    error: Option<String>,
}

async fn check_blob(registry: &Registry, blob: Blob, repositories: BTreeSet<String>) -> BlobPlan {
    let mut plan = BlobPlan {
        blob,
        present: Vec::new(),
        missing: Vec::new(),
        error: None,
    };
    for repository in repositories {
        match registry.has_blob(&repository, &plan.blob.digest).await {
            Ok(true) => plan.present.push(repository),
            Ok(false) => plan.missing.push(repository),
            Err(e) => {
                plan.error = Some(e.to_string());
                break;
            }
        }
    }
    plan
}

/// What a dry run would do with the blobs.
fn dry_run_totals(checks: &[BlobPlan], report: &mut PushReport) {
    for check in checks.iter().filter(|c| c.error.is_none()) {
        report.blobs_present += check.present.len();
        report.bytes_present += check.present.len() as u64 * check.blob.size;
        let mut mounts = check.missing.len();
        if check.present.is_empty() && !check.missing.is_empty() {
            report.blobs_pushed += 1;
            report.bytes_pushed += check.blob.size;
            mounts -= 1;
        }
        report.blobs_mounted += mounts;
        report.bytes_mounted += mounts as u64 * check.blob.size;
    }
}

/// How one blob got into every repository that needed it.
struct BlobMoved {
    digest: String,
    size: u64,
    present: usize,
    mounted: usize,
    /// Usually one; more when the registry would not mount it from where it already was.
    uploads: usize,
    error: Option<String>,
}

/// Puts `check`'s blob into every repository that lacks it: mounted from one that holds it,
/// else uploaded into the first and mounted into the rest.
async fn place_blob(
    registry: &Registry,
    bundle: Arc<Bundle>,
    check: BlobPlan,
    progress: Arc<dyn Progress>,
    label: String,
) -> BlobMoved {
    let mut moved = BlobMoved {
        digest: check.blob.digest.clone(),
        size: check.blob.size,
        present: check.present.len(),
        mounted: 0,
        uploads: 0,
        error: check.error,
    };
    if moved.error.is_some() {
        return moved;
    }
    let digest = &check.blob.digest;
    let mut source = check.present.first().cloned();
    for repository in &check.missing {
        let session = match registry
            .start_upload(repository, digest, source.as_deref())
            .await
        {
            Ok(Upload::Mounted) => {
                moved.mounted += 1;
                source = Some(repository.clone());
                continue;
            }
            Ok(Upload::Session(session)) => session,
            Err(e) => {
                moved.error = Some(e.to_string());
                return moved;
            }
        };
        let failure = Arc::new(Mutex::new(None));
        let body = blob_body(
            bundle.clone(),
            check.blob.clone(),
            progress.clone(),
            label.clone(),
            failure.clone(),
        );
        let sent = registry
            .finish_upload(repository, &session, digest, check.blob.size, body)
            .await;
        // A bundle that could not be read explains the failed request better.
        let result = match failure.lock().expect("failure slot").take() {
            Some(bundle_error) => Err(bundle_error.to_string()),
            None => sent.map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            moved.error = Some(e);
            return moved;
        }
        moved.uploads += 1;
        source = Some(repository.clone());
    }
    moved
}

/// The blob's bytes streamed from the bundle on a blocking thread, at most a few chunks
/// ahead of the network; the last chunk is withheld if the digest does not match (see
/// [`BlobReader`]), and the reason is left in `failure`.
fn blob_body(
    bundle: Arc<Bundle>,
    blob: Blob,
    progress: Arc<dyn Progress>,
    label: String,
    failure: Arc<Mutex<Option<BundleError>>>,
) -> reqwest::Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let fail = |e: BundleError| {
            *failure.lock().expect("failure slot") = Some(e);
            let _ = tx.blocking_send(Err(std::io::Error::other("the bundle could not be read")));
        };
        let mut reader = match BlobReader::open(&bundle.path, &bundle.archive_label, &blob, 0, true)
        {
            Ok(reader) => reader,
            Err(e) => return fail(e),
        };
        loop {
            match reader.next_chunk(CHUNK) {
                Ok(Some(chunk)) => {
                    let n = chunk.len() as u64;
                    // The registry hung up: the upload's error says why.
                    if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                        return;
                    }
                    progress.sent(&label, n);
                }
                Ok(None) => return,
                Err(e) => return fail(e),
            }
        }
    });
    reqwest::Body::wrap_stream(ReceiverStream::new(rx))
}

/// Stores `image`'s manifests in every repository with a tag to write: platform manifests
/// by digest, then the top manifest under each tag.
async fn store_manifests(
    registry: &Registry,
    image: &Planned,
    report: &mut ImageReport,
) -> Result<(), RegistryError> {
    let top = image.top();
    let children = &image.content.manifests[..image.content.manifests.len() - 1];
    let mut stored_children = BTreeSet::new();
    for (target, tag) in image.targets.iter().zip(report.tags.iter_mut()) {
        if !matches!(tag.outcome, TagOutcome::Created | TagOutcome::Moved) {
            continue;
        }
        let repository = target.path();
        if stored_children.insert(repository.to_string()) {
            for child in children {
                registry
                    .put_manifest(repository, &child.digest, &child.media_type, &child.bytes)
                    .await?;
            }
        }
        registry
            .put_manifest(
                repository,
                tag_or_digest(target),
                &top.media_type,
                &top.bytes,
            )
            .await?;
    }
    Ok(())
}

/// Pushes the chart artifact to `target`/NAME:VERSION.
async fn push_chart(
    registry: &Registry,
    target: &Target,
    artifact: &ChartArtifact,
    opts: &PushOptions,
    report: &mut PushReport,
) -> ChartReport {
    let mut repository = target.project.join("/");
    if !repository.is_empty() {
        repository.push('/');
    }
    repository.push_str(&artifact.name);
    let tag = artifact.tag();
    let mut chart = ChartReport {
        name: artifact.name.clone(),
        version: artifact.version.clone(),
        tag: TagReport {
            name: format!("oci://{}/{repository}:{tag}", target.host),
            outcome: TagOutcome::Failed,
            previous: None,
        },
        error: None,
    };
    let result: Result<(), RegistryError> = async {
        let digest = artifact.digest();
        let (outcome, previous) = match registry.manifest_digest(&repository, &tag).await? {
            None => (TagOutcome::Created, None),
            Some(existing) if existing == digest => (TagOutcome::Unchanged, Some(existing)),
            Some(existing) if opts.force => (TagOutcome::Moved, Some(existing)),
            Some(existing) => (TagOutcome::Refused, Some(existing)),
        };
        chart.tag.outcome = outcome;
        chart.tag.previous = previous;
        if !matches!(outcome, TagOutcome::Created | TagOutcome::Moved) {
            return Ok(());
        }
        for bytes in [&artifact.config, &artifact.content] {
            let digest = lade_oci::sha256_digest(bytes);
            let size = bytes.len() as u64;
            if registry.has_blob(&repository, &digest).await? {
                report.blobs_present += 1;
                report.bytes_present += size;
                continue;
            }
            report.blobs_pushed += 1;
            report.bytes_pushed += size;
            if opts.dry_run {
                continue;
            }
            let Upload::Session(session) =
                registry.start_upload(&repository, &digest, None).await?
            else {
                unreachable!("an upload without a mount source is a session")
            };
            registry
                .finish_upload(&repository, &session, &digest, size, bytes.clone().into())
                .await?;
        }
        if !opts.dry_run {
            registry
                .put_manifest(
                    &repository,
                    &tag,
                    MEDIA_TYPE_OCI_MANIFEST,
                    &artifact.manifest,
                )
                .await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        chart.tag.outcome = TagOutcome::Failed;
        chart.error = Some(e.to_string());
    }
    chart
}

impl PushReport {
    /// The summary: one line per tag, the chart, the bytes, then every problem and what to
    /// do about it.
    pub fn to_text(&self) -> String {
        let verb = |outcome: TagOutcome| match (outcome, self.dry_run) {
            (TagOutcome::Created, false) => "created",
            (TagOutcome::Created, true) => "would be created",
            (TagOutcome::Moved, false) => "moved (--force)",
            (TagOutcome::Moved, true) => "would be moved (--force)",
            (TagOutcome::Unchanged, _) => "unchanged",
            (TagOutcome::Refused, _) => "REFUSED",
            (TagOutcome::Failed, _) => "FAILED",
        };
        let mut rows = vec![[
            "IMAGE".to_string(),
            "PUSHED AS".to_string(),
            "TAG".to_string(),
        ]];
        for image in &self.images {
            for tag in &image.tags {
                rows.push([
                    image.source.clone(),
                    tag.name.clone(),
                    verb(tag.outcome).into(),
                ]);
            }
        }
        if let Some(chart) = &self.chart {
            rows.push([
                format!("chart {} {}", chart.name, chart.version),
                chart.tag.name.clone(),
                verb(chart.tag.outcome).into(),
            ]);
        }
        let mut widths = [0usize; 3];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        let would = if self.dry_run { "would push" } else { "pushed" };
        let _ = writeln!(
            out,
            "\n{would} {} ({} blobs); already in the registry: {} ({} blobs), mounted from another repository: {} ({} blobs); {:.1}s",
            HumanBytes(self.bytes_pushed),
            self.blobs_pushed,
            HumanBytes(self.bytes_present),
            self.blobs_present,
            HumanBytes(self.bytes_mounted),
            self.blobs_mounted,
            self.seconds
        );
        let mut refused = false;
        for image in &self.images {
            if let Some(e) = &image.error {
                let _ = writeln!(out, "{}: {e}", image.source);
            }
            for tag in image
                .tags
                .iter()
                .filter(|t| t.outcome == TagOutcome::Refused)
            {
                refused = true;
                let _ = writeln!(
                    out,
                    "{}: already points at {}, not at {} ({})",
                    tag.name,
                    tag.previous.as_deref().unwrap_or("?"),
                    image.digest,
                    image.source
                );
            }
        }
        if let Some(chart) = &self.chart {
            if let Some(e) = &chart.error {
                let _ = writeln!(out, "chart {}: {e}", chart.name);
            }
            if chart.tag.outcome == TagOutcome::Refused {
                refused = true;
                let _ = writeln!(
                    out,
                    "{}: already holds another chart ({})",
                    chart.tag.name,
                    chart.tag.previous.as_deref().unwrap_or("?")
                );
            }
        }
        if refused {
            let _ = writeln!(
                out,
                "tags are never moved to another image without --force; re-run with --force to move them"
            );
        }
        if self.ok && !self.dry_run && !self.images.is_empty() {
            let _ = writeln!(
                out,
                "\nthe cluster pulls these with global.imageRegistry={0}: lade upgrade BUNDLE \
                 --release NAME -n NAMESPACE --image-registry {0}",
                self.registry
            );
        }
        if !self.ok && self.images.iter().any(|i| i.error.is_some()) {
            let _ = writeln!(
                out,
                "re-run the same command to retry: what the registry already holds is not sent again"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_targets_parse_host_and_project() {
        let t: Target = "harbor.local/offline".parse().unwrap();
        assert_eq!(
            (t.host.as_str(), t.project.clone()),
            ("harbor.local", vec!["offline".to_string()])
        );
        let t: Target = "10.16.10.111:5000/a/b/".parse().unwrap();
        assert_eq!(t.to_string(), "10.16.10.111:5000/a/b");
        let t: Target = "localhost:5000".parse().unwrap();
        assert!(t.project.is_empty());
        for bad in [
            "offline/project",
            "https://harbor.local/x",
            "harbor.local/UPPER",
            "harbor.local//x",
            "",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn names_keep_the_path_and_get_the_project_in_front() {
        let name = |target: &str, image: &str| {
            let target: Target = target.parse().unwrap();
            target
                .name_for(&Reference::parse(image).unwrap())
                .unwrap()
                .to_string()
        };
        assert_eq!(
            name("harbor.local/offline", "release.daocloud.io/mspider/api:v1"),
            "harbor.local/offline/mspider/api:v1"
        );
        // The path is kept whole, even when it starts with the project.
        assert_eq!(
            name("harbor.local/mspider", "release.daocloud.io/mspider/api:v1"),
            "harbor.local/mspider/mspider/api:v1"
        );
        assert_eq!(
            name("10.16.10.111", "release.daocloud.io/mspider/api:v1"),
            "10.16.10.111/mspider/api:v1"
        );
        assert_eq!(name("h.io/p", "busybox"), "h.io/p/library/busybox:latest");
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            name("h.io/p", &format!("x.io/a/b@{digest}")),
            format!("h.io/p/a/b@{digest}")
        );
    }

    #[test]
    fn chart_repositories_parse() {
        assert_eq!("none".parse::<ChartRepo>().unwrap(), ChartRepo::Skip);
        assert_eq!(
            "oci://h.io:5000/charts".parse::<ChartRepo>().unwrap(),
            ChartRepo::Oci("h.io:5000/charts".parse().unwrap())
        );
        let err = "h.io/charts".parse::<ChartRepo>().unwrap_err();
        assert!(err.to_string().contains("oci://"), "{err}");
        let err = "oci://charts".parse::<ChartRepo>().unwrap_err();
        assert!(err.to_string().contains("--chart-repo"), "{err}");
    }

    #[test]
    fn the_summary_names_refused_tags_and_the_way_to_move_them() {
        let report = PushReport {
            registry: "h.io/p".into(),
            images: vec![ImageReport {
                source: "release.daocloud.io/demo/app:v1".into(),
                digest: "sha256:new".into(),
                tags: vec![TagReport {
                    name: "h.io/p/demo/app:v1".into(),
                    outcome: TagOutcome::Refused,
                    previous: Some("sha256:old".into()),
                }],
                error: None,
            }],
            bytes_present: 3 << 20,
            blobs_present: 2,
            ..Default::default()
        };
        let text = report.to_text();
        assert!(text.contains("h.io/p/demo/app:v1  REFUSED"), "{text}");
        assert!(
            text.contains("h.io/p/demo/app:v1: already points at sha256:old, not at sha256:new"),
            "{text}"
        );
        assert!(text.contains("--force"), "{text}");
        assert!(
            text.contains("already in the registry: 3.00 MiB (2 blobs)"),
            "{text}"
        );
    }
}
