//! Applies one layer blob to a snapshot directory in one pass: decompress, hash the diffID,
//! and write the files, without handing the blob to containerd's Diff service.
//!
//! The result must be what containerd 1.6's applier (`archive.Apply`) writes into the same
//! snapshot, or kubelet would run different files depending on who unpacked them. The rules
//! followed here, entry by entry:
//! - names are cleaned; one that climbs out of the root with `..` is refused (containerd
//!   clamps it to the root instead), as is a hard link whose target does, and any entry
//!   below a symbolic link the layer itself created, or below a second name (hard link) of
//!   one (containerd would follow it);
//! - a missing parent directory is created 0755, taking owner, mode, times and xattrs from
//!   the first lower layer that has it as a directory;
//! - an existing path is replaced unless both it and the entry are directories (then only
//!   the metadata is applied);
//! - whiteouts: on an overlay upper directory `.wh.NAME` becomes a 0/0 character device
//!   owned like the entry and `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr on its
//!   directory; on a plain directory (the first layer) they remove what they name;
//! - regular files, directories, device nodes, fifos, hard and symbolic links; then owner
//!   (lchown), `SCHILY.xattr.*` records (never `trusted.*`), mode with setuid/setgid/sticky
//!   (not on symlinks) and times (atime is the later of atime and mtime; times before 1970
//!   become 1970), without following symlinks; directory times once every entry is written;
//! - the diffID covers the whole decompressed stream, bytes after the tar's end included.
//!
//! Those string checks are the first line. The second is the kernel: the snapshot directory
//! is opened once, and every entry's parent directory is opened from it with `openat2`
//! (`RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`), so any symbolic link on the
//! way (made by this layer, copied from the parent by the native snapshotter, or raced in) is
//! resolved as if the snapshot were `/`, as containerd's own applier resolves it. Every call
//! on the entry itself goes through `/proc/self/fd/<parent>/<name>` and never follows `name`
//! (chmod opens it `O_PATH | O_NOFOLLOW` first and leaves symbolic links alone). Lower layers
//! are only ever read. Without `openat2` (Linux < 5.6) the applier refuses to run.
//!
//! Bounds, each refused with a named [`ApplyError`] that marks the blob bad: the expansion
//! limit counts both the decompressed stream and every file's full size (a sparse entry's
//! holes included; they are written as holes), and entries, name length, path depth, xattr
//! count and xattr size are capped far above what real images use, as are the bytes of
//! paths held for the layer (`MAX_HELD_PATH_BYTES`). Before any of that, the tar stream
//! goes through `lade_oci::tarframe::Framed` (`oci/src/tarframe.rs`), which refuses the headers the tar crate
//! itself would turn into unbounded memory or CPU, before the crate reads them: GNU long
//! names and links over 4608 bytes, PAX headers over 1 MiB, GNU sparse entries with over 64
//! extension blocks, more than 3 meta headers in a row. zstd frames may ask for a window of
//! 32 MiB at most ([`ZSTD_WINDOW_LOG_MAX`]), and an error quotes at most 256 bytes of a name.
//!
//! `tests/apply.rs` applies a set of tricky and hostile layers both ways on real containerd
//! and compares the trees file by file; `tests/attack/applier.rs` aims crafted layers at
//! files outside the snapshot.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::Seek;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use lade_oci::tarframe as frame;

/// Where a layer goes: the snapshot's own directory and, lowest last, the directories of the
/// layers under it.
#[derive(Clone, Debug)]
pub struct Target {
    pub root: PathBuf,
    pub parents: Vec<PathBuf>,
    /// Whiteouts become overlay whiteouts (an overlay upper directory) instead of removals.
    pub overlay: bool,
}

/// What an applied layer was.
#[derive(Debug)]
pub struct Applied {
    /// `sha256:<hex>` of the decompressed stream.
    pub diff_id: String,
    /// Bytes of the decompressed stream.
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("entry {entry:?} {reason}")]
    Escape { entry: String, reason: String },
    #[error("unpacks to more than {limit} bytes (a decompression bomb?)")]
    TooLarge { limit: u64 },
    #[error("entry {entry:?}: {what} {value} is over the applier's limit of {limit}")]
    Limit {
        entry: String,
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("entry {entry:?}: {source}")]
    Entry {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("not a readable layer: {0}")]
    Stream(io::Error),
}

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Symbolic links followed while resolving one path in a lower layer, as Linux allows.
const MAX_LINKS: usize = 40;
/// Bounds on what one layer may ask of the applier, each far above what real images hold
/// (the largest layers seen carry a few hundred thousand entries): they keep a hostile layer
/// from exhausting the node's inodes or the agent's memory (`written` holds every path, and
/// [`MAX_HELD_PATH_BYTES`] bounds what it takes).
const MAX_ENTRIES: u64 = 2_000_000;
const MAX_PATH_BYTES: u64 = 4096;
const MAX_DEPTH: u64 = 256;
const MAX_XATTRS: u64 = 128;
const MAX_XATTR_BYTES: u64 = 64 << 10;
/// Bytes of paths the applier holds for one layer (`written`, `dirs`, `links`), each path
/// charged its length and [`HELD_PATH_OVERHEAD`] so the sum follows the memory it takes: a
/// layer of 300,000 paths of 100 bytes is charged 49 MB, and a hostile one of 2 million
/// 20-byte names, which would have held about 170 MB, is refused at about 800,000.
const MAX_HELD_PATH_BYTES: u64 = 64 << 20;
/// What one held path costs beyond its bytes: its `PathBuf`, its hash-table slot and the
/// allocator's rounding.
const HELD_PATH_OVERHEAD: u64 = 64;
/// The largest zstd window a layer may ask for, as a power of two: 2^25 = 32 MiB, the window
/// of `zstd --ultra -20`. The encoders that build images (klauspost/compress in buildkit,
/// containerd and podman; `zstd` up to level 19) use at most 8 MiB, the size RFC 8878
/// recommends decoders support; zstd's own default limit, 2^27 = 128 MiB (levels 21 and 22,
/// `--long`), would let each of the agent's concurrent unpacks take half its 256 MiB.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 25;
/// Bytes of a name shown in an error: a hostile name of a megabyte stays out of messages.
const SHOWN_NAME_BYTES: usize = 256;

/// Applies the layer read from `blob` (gzip, zstd or plain tar, sniffed) to `target`,
/// refusing it once it unpacks to more than `limit` bytes.
pub fn apply_layer(blob: impl Read, target: &Target, limit: u64) -> Result<Applied, ApplyError> {
    apply_stored_layer(blob, target, limit, None)
}

/// [`apply_layer`] of a blob whose bytes are known to have the digest `stored` (a blob of
/// containerd's content store, which checked the digest when the blob was committed). When
/// the blob is not compressed, its decompressed stream is those very bytes, so `stored` is
/// the diffID and the stream is not hashed a second time.
pub fn apply_stored_layer(
    blob: impl Read,
    target: &Target,
    limit: u64,
    stored: Option<&str>,
) -> Result<Applied, ApplyError> {
    let mut stored_bytes = BufReader::with_capacity(1 << 20, blob);
    let head = stored_bytes.fill_buf().map_err(ApplyError::Stream)?;
    let (plain, known): (Box<dyn Read>, Option<&str>) = if head.starts_with(&[0x1f, 0x8b]) {
        (
            Box::new(flate2::read::MultiGzDecoder::new(stored_bytes)),
            None,
        )
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        (
            Box::new(zstd_reader(stored_bytes).map_err(ApplyError::Stream)?),
            None,
        )
    } else {
        (Box::new(stored_bytes), stored)
    };
    let mut counted = Counted {
        inner: plain,
        hasher: known.is_none().then(Sha256::new),
        count: 0,
        limit,
    };
    let applier = Applier::new(target, limit).map_err(|source| ApplyError::Entry {
        entry: shown(target.root.as_os_str().as_bytes()),
        source,
    })?;
    let result = applier.run(BufReader::with_capacity(256 << 10, &mut counted));
    if counted.count > limit {
        return Err(ApplyError::TooLarge { limit });
    }
    result?;
    let diff_id = match (known, counted.hasher) {
        (Some(digest), _) => digest.to_string(),
        (None, Some(hasher)) => format!("sha256:{}", hex::encode(hasher.finalize())),
        (None, None) => unreachable!("a stream without a known digest is hashed"),
    };
    Ok(Applied {
        diff_id,
        size: counted.count,
    })
}

/// A zstd decoder of `stored` that refuses a frame asking for a window over
/// 2^[`ZSTD_WINDOW_LOG_MAX`] bytes (an I/O error naming the memory it wants).
pub fn zstd_reader<R: BufRead>(stored: R) -> io::Result<zstd::stream::read::Decoder<'static, R>> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stored)?;
    decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
    Ok(decoder)
}

/// The decompressed stream, hashed (unless its digest is known) and counted as it is read;
/// fails one byte past `limit`.
struct Counted<R> {
    inner: R,
    hasher: Option<Sha256>,
    count: u64,
    limit: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = (self.limit - self.count.min(self.limit)).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other("the layer unpacks past its size limit"));
        }
        Ok(n)
    }
}

struct Applier<'a> {
    target: &'a Target,
    /// The snapshot's own directory, opened once: every path this layer names is resolved
    /// from it by the kernel (`openat2` with `RESOLVE_IN_ROOT`), never by joining strings.
    root: OwnedFd,
    /// The expansion limit, also charged with every file's full size (sparse files included).
    limit: u64,
    /// Bytes of file content the entries so far claim.
    expanded: u64,
    entries: u64,
    /// Directories whose times are set last, as (relative path, atime, mtime).
    dirs: Vec<(PathBuf, Times)>,
    /// What this layer wrote: an opaque marker on a plain directory keeps these.
    written: HashSet<PathBuf>,
    /// Symbolic links this layer created: nothing may be written through them.
    links: HashSet<PathBuf>,
    /// What `dirs`, `written` and `links` hold, as charged by [`Applier::hold`].
    held: u64,
}

#[derive(Clone, Copy, Debug)]
struct Times {
    atime: (i64, i64),
    mtime: (i64, i64),
}

impl<'a> Applier<'a> {
    fn new(target: &'a Target, limit: u64) -> io::Result<Self> {
        let root = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&target.root)?;
        Ok(Self {
            target,
            root: root.into(),
            limit,
            expanded: 0,
            entries: 0,
            dirs: Vec::new(),
            written: HashSet::new(),
            links: HashSet::new(),
            held: 0,
        })
    }

    /// Opens the directory `rel` of the snapshot, resolved by the kernel as if the snapshot
    /// were `/`: no symbolic link (made by this layer, copied from a parent by the native
    /// snapshotter, or raced in) and no `..` can lead out of it, nor can a mount point or a
    /// `/proc` magic link.
    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        openat2_in_root(&self.root, rel)
    }

    fn run(mut self, plain: impl Read) -> Result<(), ApplyError> {
        let mut archive = tar::Archive::new(frame::Framed::new(plain));
        let walked = self.walk(&mut archive);
        let mut framed = archive.into_inner();
        // A framing bound crossed surfaces in the tar crate as some I/O error, wherever it
        // was reading: the framer says which bound it was.
        if let Some(r) = framed.refusal() {
            return Err(ApplyError::Limit {
                entry: shown(r.header.as_bytes()),
                what: r.what,
                value: r.value,
                limit: r.limit,
            });
        }
        walked?;
        for (rel, times) in std::mem::take(&mut self.dirs) {
            let io_err = |source| ApplyError::Entry {
                entry: shown(rel.as_os_str().as_bytes()),
                source,
            };
            let parent = self
                .open_dir(rel.parent().unwrap_or(Path::new("")))
                .map_err(io_err)?;
            let base = rel.file_name().unwrap_or_default();
            set_times(&fd_path(&parent).join(base), times).map_err(io_err)?;
        }
        // The diffID covers what follows the end-of-archive blocks too.
        io::copy(&mut framed, &mut io::sink()).map_err(ApplyError::Stream)?;
        Ok(())
    }

    fn walk(&mut self, archive: &mut tar::Archive<impl Read>) -> Result<(), ApplyError> {
        for entry in archive.entries().map_err(ApplyError::Stream)? {
            self.entry(entry.map_err(ApplyError::Stream)?)?;
        }
        Ok(())
    }

    /// Charges one more path held in `written`, `dirs` or `links` (its bytes and
    /// [`HELD_PATH_OVERHEAD`]), refusing the layer past [`MAX_HELD_PATH_BYTES`].
    fn hold(&mut self, rel: &Path, name: &str) -> Result<(), ApplyError> {
        self.held = self
            .held
            .saturating_add(rel.as_os_str().len() as u64 + HELD_PATH_OVERHEAD);
        if self.held > MAX_HELD_PATH_BYTES {
            return Err(ApplyError::Limit {
                entry: name.to_string(),
                what: "bytes of paths held",
                value: self.held,
                limit: MAX_HELD_PATH_BYTES,
            });
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ApplyError> {
        // Names are bytes, not text: a name that is not UTF-8 is written as it is.
        let raw_name = entry.path_bytes().into_owned();
        let name = shown(&raw_name);
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let escape = |reason: &str| ApplyError::Escape {
            entry: name.clone(),
            reason: reason.to_string(),
        };
        let rel = clean(&raw_name).ok_or_else(|| escape("climbs out of the root with '..'"))?;
        let Some(base) = rel.file_name().map(OsStr::to_os_string) else {
            return Ok(()); // the root itself
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if self.through_link(&parent_rel) {
            return Err(escape("is below a symbolic link this layer created"));
        }
        self.entries += 1;
        let depth = rel.components().count() as u64;
        for (what, value, limit) in [
            ("entry count", self.entries, MAX_ENTRIES),
            ("name length", raw_name.len() as u64, MAX_PATH_BYTES),
            ("path depth", depth, MAX_DEPTH),
        ] {
            if value > limit {
                return Err(ApplyError::Limit {
                    entry: name.clone(),
                    what,
                    value,
                    limit,
                });
            }
        }
        let io_err = |source: io::Error| ApplyError::Entry {
            entry: name.clone(),
            source,
        };
        // Every path below is `/proc/self/fd/<parent>/<base>`: the parent was resolved by the
        // kernel inside the snapshot, and each call below acts on `base` itself, never
        // following it if it is a symbolic link.
        let parent_fd = self.make_parent(&parent_rel).map_err(io_err)?;
        let parent = fd_path(&parent_fd);
        let path = parent.join(&base);
        let base = base.as_bytes();
        let meta = Meta::of(&mut entry).map_err(io_err)?;
        if base == WHITEOUT_OPAQUE.as_bytes() {
            if self.target.overlay {
                // `parent/.` names the directory itself, not the /proc link to it.
                lset_xattr(&parent.join("."), OPAQUE_XATTR, b"y").map_err(io_err)?;
            } else {
                self.clear_opaque(&parent.join("."), &parent_rel)
                    .map_err(io_err)?;
            }
            return Ok(());
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if matches!(hidden, b"" | b"." | b"..") {
                return Err(escape("is a whiteout of no file inside its directory"));
            }
            let gone = parent.join(OsStr::from_bytes(hidden));
            if self.target.overlay {
                mknod(&gone, libc::S_IFCHR, 0).map_err(io_err)?;
                lchown(&gone, meta.uid, meta.gid).map_err(io_err)?;
            } else {
                remove_all(&gone).map_err(io_err)?;
            }
            return Ok(());
        }

        if let Ok(old) = fs::symlink_metadata(&path) {
            if !(old.is_dir() && kind == tar::EntryType::Directory) {
                remove_all(&path).map_err(io_err)?;
                // A symlink this layer made and now replaced no longer redirects anything.
                self.links.remove(&rel);
            }
        }
        let mode = meta.mode & 0o7777;
        match kind {
            tar::EntryType::Directory => {
                if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    fs::DirBuilder::new()
                        .mode(mode)
                        .create(&path)
                        .map_err(io_err)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::GNUSparse => {
                // A sparse entry's size is what it expands to, holes included.
                self.expanded = self.expanded.saturating_add(entry.size());
                if self.expanded > self.limit {
                    return Err(ApplyError::TooLarge { limit: self.limit });
                }
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_err)?;
                copy_file(&mut entry, &mut file, kind == tar::EntryType::GNUSparse)
                    .map_err(io_err)?;
            }
            tar::EntryType::Block | tar::EntryType::Char | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Block => libc::S_IFBLK,
                    tar::EntryType::Char => libc::S_IFCHR,
                    _ => libc::S_IFIFO,
                };
                let dev = libc::makedev(meta.dev.0, meta.dev.1);
                mknod(&path, file_type | mode, dev).map_err(io_err)?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target_rel = clean(&target)
                    .ok_or_else(|| escape("is a hard link that climbs out of the root"))?;
                if self.through_link(target_rel.parent().unwrap_or(Path::new(""))) {
                    return Err(escape(
                        "is a hard link below a symbolic link this layer created",
                    ));
                }
                let Some(target_base) = target_rel.file_name() else {
                    return Err(escape("is a hard link to the root"));
                };
                let target_dir = self
                    .open_dir(target_rel.parent().unwrap_or(Path::new("")))
                    .map_err(io_err)?;
                let source = fd_path(&target_dir).join(target_base);
                // linkat without AT_SYMLINK_FOLLOW links a symbolic link itself: the new name
                // is then a symbolic link too, and is tracked as one.
                if fs::symlink_metadata(&source).is_ok_and(|m| m.file_type().is_symlink()) {
                    self.hold(&rel, &name)?;
                    self.links.insert(rel.clone());
                }
                fs::hard_link(&source, &path).map_err(io_err)?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(io_err)?;
                self.hold(&rel, &name)?;
                self.links.insert(rel.clone());
            }
            other => {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("unhandled tar entry type {:?}", other.as_byte() as char),
                )))
            }
        }
        lchown(&path, meta.uid, meta.gid).map_err(io_err)?;
        let largest = meta.xattrs.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        for (what, value, limit) in [
            ("xattr count", meta.xattrs.len() as u64, MAX_XATTRS),
            ("xattr size", largest as u64, MAX_XATTR_BYTES),
        ] {
            if value > limit {
                return Err(ApplyError::Limit {
                    entry: name.clone(),
                    what,
                    value,
                    limit,
                });
            }
        }
        for (key, value) in &meta.xattrs {
            if key.starts_with("trusted.") {
                continue; // containerd refuses admin attributes from an archive
            }
            match lset_xattr(&path, key, value) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EPERM)
                        && key.starts_with("user.")
                        && !matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory) => {
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        set_mode(&path, mode).map_err(io_err)?;
        if kind == tar::EntryType::Directory {
            self.hold(&rel, &name)?;
            self.dirs.push((rel.clone(), meta.times));
        } else {
            set_times(&path, meta.times).map_err(io_err)?;
        }
        if !self.written.contains(&rel) {
            self.hold(&rel, &name)?;
            self.written.insert(rel);
        }
        Ok(())
    }

    /// Whether `rel` is, or is below, a symbolic link this layer created.
    fn through_link(&self, rel: &Path) -> bool {
        !self.links.is_empty() && rel.ancestors().any(|a| self.links.contains(a))
    }

    /// Opens the directory `rel`, first creating what is missing of it, outermost first, each
    /// with the metadata of the same directory in the first lower layer that has one (0755
    /// root:root otherwise). Lower layers are only read.
    fn make_parent(&self, rel: &Path) -> io::Result<OwnedFd> {
        match self.open_dir(rel) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && rel.parent().is_some() => {}
            opened => return opened,
        }
        let up = self.make_parent(rel.parent().unwrap_or(Path::new("")))?;
        let path = fd_path(&up).join(rel.file_name().unwrap_or_default());
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .map_err(|e| match e.kind() {
                // Not found as a directory, yet there: a symbolic link leading nowhere in
                // the snapshot (taken as `/`), typically one aimed at the host.
                io::ErrorKind::AlreadyExists => io::Error::other(format!(
                    "{} is a symbolic link to nothing inside the snapshot",
                    shown(rel.as_os_str().as_bytes())
                )),
                _ => e,
            })?;
        set_mode(&path, 0o755)?;
        for lower in &self.target.parents {
            let Some(found) = resolve_in(lower, rel) else {
                continue;
            };
            match fs::symlink_metadata(&found) {
                Ok(m) if m.is_dir() => {
                    copy_dir_info(&found, &m, &path)?;
                    break;
                }
                Ok(_) => break, // replaced by a non-directory there: keep the defaults
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
        self.open_dir(rel)
    }

    /// An opaque marker on a plain directory: removes what lower entries of this layer did
    /// not write below `dir` (opened at `dir_rel`). Only real directories are descended into.
    fn clear_opaque(&self, dir: &Path, dir_rel: &Path) -> io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let read = match fs::read_dir(&d) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for child in read {
                let child = child?.path();
                let rel = dir_rel.join(child.strip_prefix(dir).unwrap_or(&child));
                if self.written.contains(&rel) {
                    if fs::symlink_metadata(&child)?.is_dir() {
                        stack.push(child);
                    }
                } else {
                    remove_all(&child)?;
                }
            }
        }
        Ok(())
    }
}

/// An entry's metadata, from its header and PAX records (which win, and carry nanoseconds).
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    dev: (u32, u32),
    times: Times,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Self> {
        let header = entry.header();
        let mut meta = Meta {
            // An all-NUL numeric field reads as 0, as Go's archive/tar reads it.
            mode: header.mode().unwrap_or(0),
            uid: header.uid().unwrap_or(0) as u32,
            gid: header.gid().unwrap_or(0) as u32,
            dev: (
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            ),
            times: Times {
                atime: (0, 0),
                mtime: (header.mtime().unwrap_or(0) as i64, 0),
            },
            xattrs: Vec::new(),
        };
        if let Some(gnu) = header.as_gnu() {
            if let Ok(atime) = gnu.atime() {
                meta.times.atime = (atime as i64, 0);
            }
        }
        if let Some(records) = entry.pax_extensions()? {
            for record in records {
                let record = record?;
                let Ok(key) = record.key() else { continue };
                let value = record.value_bytes();
                let text = std::str::from_utf8(value).unwrap_or("");
                match key {
                    "uid" => meta.uid = text.parse().unwrap_or(meta.uid),
                    "gid" => meta.gid = text.parse().unwrap_or(meta.gid),
                    "mtime" => meta.times.mtime = pax_time(text).unwrap_or(meta.times.mtime),
                    "atime" => meta.times.atime = pax_time(text).unwrap_or(meta.times.atime),
                    k if k.starts_with("SCHILY.xattr.") => meta
                        .xattrs
                        .push((k["SCHILY.xattr.".len()..].to_string(), value.to_vec())),
                    _ => {}
                }
            }
        }
        if meta.times.atime < meta.times.mtime {
            meta.times.atime = meta.times.mtime;
        }
        for t in [&mut meta.times.atime, &mut meta.times.mtime] {
            if t.0 < 0 {
                *t = (0, 0);
            }
        }
        Ok(meta)
    }
}

/// `name` as an error shows it: lossy UTF-8 of its first [`SHOWN_NAME_BYTES`] bytes, with
/// `…` when cut.
fn shown(name: &[u8]) -> String {
    if name.len() <= SHOWN_NAME_BYTES {
        String::from_utf8_lossy(name).into_owned()
    } else {
        format!("{}…", String::from_utf8_lossy(&name[..SHOWN_NAME_BYTES]))
    }
}

/// A PAX time, `seconds[.fraction]`, as (seconds, nanoseconds).
fn pax_time(text: &str) -> Option<(i64, i64)> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let mut nanos: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    for _ in digits.len()..9 {
        nanos *= 10;
    }
    Some(if secs < 0 && nanos > 0 {
        (secs - 1, 1_000_000_000 - nanos)
    } else {
        (secs, nanos)
    })
}

/// `name` relative to the root, cleaned as Go's `filepath.Clean("/" + name)` would, or `None`
/// when a `..` climbs above the root.
fn clean(name: &[u8]) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(name)).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// `rel` inside the lower layer `root`, following symbolic links there as if `root` were `/`.
fn resolve_in(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = rel
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut followed = 0;
    while let Some(part) = pending.pop() {
        match part.to_str() {
            Some("..") => {
                resolved.pop();
                continue;
            }
            Some(".") | Some("/") => continue,
            _ => {}
        }
        let next = resolved.join(&part);
        match fs::read_link(root.join(&next)) {
            Ok(target) => {
                followed += 1;
                if followed > MAX_LINKS {
                    return None;
                }
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                pending.extend(
                    target
                        .components()
                        .rev()
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            _ => resolved = next,
        }
    }
    Some(root.join(resolved))
}

fn copy_dir_info(src: &Path, meta: &fs::Metadata, dst: &Path) -> io::Result<()> {
    lchown(dst, meta.uid(), meta.gid())?;
    set_mode(dst, meta.mode() & 0o7777)?;
    set_times(
        dst,
        Times {
            atime: (meta.atime(), meta.atime_nsec()),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        },
    )?;
    for key in xattr_names(src)? {
        if key.starts_with("trusted.") {
            continue;
        }
        if let Some(value) = lget_xattr(src, &key)? {
            lset_xattr(dst, &key, &value)?;
        }
    }
    Ok(())
}

/// Copies a file's content; for a sparse entry, runs of zeros (its holes among them) are
/// skipped with a seek, so they take no space on disk.
fn copy_file(from: &mut impl Read, to: &mut fs::File, sparse: bool) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut len = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if sparse && buf[..n].iter().all(|b| *b == 0) {
            to.seek(io::SeekFrom::Current(n as i64))?;
        } else {
            to.write_all(&buf[..n])?;
        }
        len += n as u64;
    }
    if sparse {
        to.set_len(len)?;
    }
    Ok(())
}

/// `/proc/self/fd/N` for an open directory: a path prefix the kernel resolves to exactly
/// that directory, whatever happens to the names above it.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens directory `rel` below `root` with `openat2`, resolving as if `root` were `/`.
fn openat2_in_root(root: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let p = c_path(rel)?;
    // SAFETY: open_how is plain data; zeroed is a valid value that is then filled in.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    // SAFETY: a valid dirfd, NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "openat2 is not available (Linux 5.6 or later is needed for the agent to \
                 unpack layers safely; run it with --unpack containerd)",
            ));
        }
        return Err(e);
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// chmod of `path` itself: a symbolic link (whose mode Linux ignores) is left alone, and no
/// link is ever followed to the file it names.
fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if file.metadata()?.file_type().is_symlink() {
        return Ok(());
    }
    let fd: OwnedFd = file.into();
    fs::set_permissions(fd_path(&fd), fs::Permissions::from_mode(mode))
}

fn remove_all(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let p = c_path(path)?;
    // SAFETY: `p` is a valid NUL-terminated path.
    check(unsafe { libc::mknod(p.as_ptr(), mode, dev) })
}

fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

fn set_times(path: &Path, t: Times) -> io::Result<()> {
    let p = c_path(path)?;
    let spec = |(s, ns): (i64, i64)| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: ns as _,
    };
    let times = [spec(t.atime), spec(t.mtime)];
    // SAFETY: `p` is a valid path and `times` holds the two timespecs utimensat reads.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn lset_xattr(path: &Path, key: &str, value: &[u8]) -> io::Result<()> {
    let (p, k) = (c_path(path)?, CString::new(key)?);
    // SAFETY: valid NUL-terminated strings and a buffer of `value.len()` bytes.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// The value of xattr `key` on `path` (not following a symlink), `None` if it has none.
pub fn lget_xattr(path: &Path, key: &str) -> io::Result<Option<Vec<u8>>> {
    let (p, k) = (c_path(path)?, CString::new(key)?);
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: valid strings; `buf` has `buf.len()` writable bytes.
        let n =
            unsafe { libc::lgetxattr(p.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

/// The names of the xattrs on `path` (not following a symlink).
pub fn xattr_names(path: &Path) -> io::Result<Vec<String>> {
    let p = c_path(path)?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: valid string; `buf` has `buf.len()` writable bytes.
        let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|k| !k.is_empty())
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_climbing_out_is_refused() {
        assert_eq!(clean(b"./a/b/../c"), Some(PathBuf::from("a/c")));
        assert_eq!(clean(b"/etc/passwd"), Some(PathBuf::from("etc/passwd")));
        assert_eq!(clean(b"a/../.."), None);
        assert_eq!(clean(b"../x"), None);
        assert_eq!(clean(b"./"), Some(PathBuf::new()));
        // Not UTF-8: kept byte for byte.
        assert_eq!(
            clean(b"lib/caf\xe9"),
            Some(PathBuf::from(OsStr::from_bytes(b"lib/caf\xe9")))
        );
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        assert_eq!(pax_time("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(pax_time("12"), Some((12, 0)));
        assert_eq!(pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time("x"), None);
    }

    #[test]
    fn a_lower_symlink_is_followed_inside_its_layer() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", dir.path().join("lib")).unwrap();
        std::os::unix::fs::symlink("../../..", dir.path().join("usr/up")).unwrap();
        assert_eq!(
            resolve_in(dir.path(), Path::new("lib")),
            Some(dir.path().join("usr/lib"))
        );
        // `..` never leaves the layer's root.
        assert_eq!(
            resolve_in(dir.path(), Path::new("usr/up/etc")),
            Some(dir.path().join("etc"))
        );
    }

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn entry(
        b: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Directory {
            h.set_mode(0o755);
        }
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        b.append_data(&mut h, name, data).unwrap();
    }

    fn target(dir: &Path) -> Target {
        Target {
            root: dir.to_path_buf(),
            parents: vec![],
            overlay: false,
        }
    }

    #[test]
    fn the_diff_id_covers_the_whole_stream_and_files_land() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = layer(|b| {
            entry(b, tar::EntryType::Directory, "etc/", "", b"");
            entry(
                b,
                tar::EntryType::Regular,
                "etc/hosts",
                "",
                b"127.0.0.1 localhost\n",
            );
            entry(b, tar::EntryType::Symlink, "hosts", "etc/hosts", b"");
        });
        let applied = apply_layer(&bytes[..], &target(dir.path()), 1 << 20).unwrap();
        assert_eq!(applied.size, bytes.len() as u64);
        assert_eq!(
            applied.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            fs::metadata(dir.path().join("etc/hosts")).unwrap().mtime(),
            1_600_000_000
        );
    }

    #[test]
    fn a_stored_digest_is_the_diff_id_of_an_uncompressed_layer_only() {
        let bytes = layer(|b| {
            entry(b, tar::EntryType::Regular, "a", "", b"some content\n");
        });
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        // Not hashed again: whatever digest the store vouches for is the diffID.
        let vouched = format!("sha256:{}", "ab".repeat(32));
        let dir = tempfile::tempdir().unwrap();
        let applied =
            apply_stored_layer(&bytes[..], &target(dir.path()), 1 << 20, Some(&vouched)).unwrap();
        assert_eq!(applied.diff_id, vouched);
        assert_eq!(applied.size, bytes.len() as u64);
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"some content\n");
        // Compressed, the diffID is the hash of what it decompresses to, whatever the store says.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        let gz = gz.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let applied =
            apply_stored_layer(&gz[..], &target(dir.path()), 1 << 20, Some(&vouched)).unwrap();
        assert_eq!(applied.diff_id, digest);
    }

    #[test]
    fn writing_through_a_symlink_of_the_same_layer_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bytes = layer(|b| {
            entry(
                b,
                tar::EntryType::Symlink,
                "evil",
                outside.path().to_str().unwrap(),
                b"",
            );
            entry(b, tar::EntryType::Regular, "evil/owned", "", b"x");
        });
        let err = apply_layer(&bytes[..], &target(dir.path()), 1 << 20).unwrap_err();
        assert!(matches!(err, ApplyError::Escape { .. }), "{err}");
        assert!(!outside.path().join("owned").exists());
    }

    #[test]
    fn a_symlink_replaced_by_a_directory_no_longer_counts_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = layer(|b| {
            entry(b, tar::EntryType::Symlink, "d", "/tmp", b"");
            entry(b, tar::EntryType::Directory, "d/", "", b"");
            entry(b, tar::EntryType::Regular, "d/x", "", b"x");
        });
        apply_layer(&bytes[..], &target(dir.path()), 1 << 20).unwrap();
        assert!(fs::symlink_metadata(dir.path().join("d")).unwrap().is_dir());
        assert_eq!(fs::read(dir.path().join("d/x")).unwrap(), b"x");
    }

    #[test]
    fn climbing_names_and_hard_links_out_are_refused() {
        for (kind, name, link) in [
            (tar::EntryType::Regular, "../escaped", ""),
            (tar::EntryType::Link, "inside", "../../etc/shadow"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            // Written raw: the tar crate's builder refuses `..` itself.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend([0u8; 1024]);
            let err = apply_layer(&bytes[..], &target(dir.path()), 1 << 20).unwrap_err();
            assert!(matches!(err, ApplyError::Escape { .. }), "{name}: {err}");
        }
    }

    #[test]
    fn a_stream_past_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = layer(|b| entry(b, tar::EntryType::Regular, "big", "", &vec![0u8; 100_000]));
        let err = apply_layer(&bytes[..], &target(dir.path()), 50_000).unwrap_err();
        assert!(
            matches!(err, ApplyError::TooLarge { limit: 50_000 }),
            "{err}"
        );
    }

    #[test]
    fn plain_whiteouts_remove_and_opaque_keeps_only_this_layers_entries() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("d/old")).unwrap();
        fs::write(dir.path().join("gone"), "x").unwrap();
        let bytes = layer(|b| {
            entry(b, tar::EntryType::Regular, "d/new", "", b"n");
            entry(b, tar::EntryType::Regular, "d/.wh..wh..opq", "", b"");
            entry(b, tar::EntryType::Regular, ".wh.gone", "", b"");
        });
        apply_layer(&bytes[..], &target(dir.path()), 1 << 20).unwrap();
        assert!(dir.path().join("d/new").exists());
        assert!(!dir.path().join("d/old").exists());
        assert!(!dir.path().join("gone").exists());
        assert!(!dir.path().join(".wh.gone").exists());
    }

    /// A scratch "outside" directory holding one file, to aim escapes at.
    fn outside() -> (tempfile::TempDir, PathBuf) {
        let out = tempfile::tempdir().unwrap();
        let victim = out.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        (out, victim)
    }

    fn apply_raw(members: &[lade_testkit::hostile::Member], t: &Target) -> Result<(), ApplyError> {
        let bytes = lade_testkit::hostile::raw_tar(members);
        apply_layer(&bytes[..], t, 1 << 30).map(|_| ())
    }

    #[test]
    fn a_hard_link_to_a_symlink_is_a_symlink_and_changes_nothing_it_points_at() {
        use lade_testkit::hostile::Member;
        let (out, victim) = outside();
        let dir = tempfile::tempdir().unwrap();
        let v = victim.to_str().unwrap();
        let o = out.path().to_str().unwrap();
        // chmod through the second name: the victim keeps its mode.
        apply_raw(
            &[
                Member::symlink("s", v),
                Member::hardlink("h", "s").with_mode(0o4777),
            ],
            &target(dir.path()),
        )
        .unwrap();
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o644);
        assert!(fs::symlink_metadata(dir.path().join("h"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Writing or whiting out below the second name is refused, on both kinds of target.
        for overlay in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let t = Target {
                overlay,
                ..target(dir.path())
            };
            for below in ["h/owned", "h/.wh.victim"] {
                let err = apply_raw(
                    &[
                        Member::symlink("s", o),
                        Member::hardlink("h", "s"),
                        Member::file(below, "x"),
                    ],
                    &t,
                )
                .unwrap_err();
                assert!(matches!(err, ApplyError::Escape { .. }), "{below}: {err}");
            }
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_already_in_the_snapshot_is_resolved_inside_it() {
        use lade_testkit::hostile::Member;
        // What the native snapshotter leaves: the parent's files, symlinks included, copied in.
        let (out, victim) = outside();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(out.path(), dir.path().join("x")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("v")).unwrap();
        fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", dir.path().join("lib")).unwrap();
        // Each its own layer: a refusal of one must not hide what another did.
        for member in [
            Member::file("x/sub/owned", "x"),
            Member::file("x/.wh.victim", ""),
            Member::dir("x/d").with_mode(0o4777),
            Member::file("v", "overwritten").with_mode(0o4777),
        ] {
            let _ = apply_raw(&[member], &target(dir.path()));
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);
        // A link that resolves inside the snapshot is followed there, as containerd does.
        apply_raw(&[Member::file("lib/libc.so", "c")], &target(dir.path())).unwrap();
        assert_eq!(fs::read(dir.path().join("usr/lib/libc.so")).unwrap(), b"c");
    }

    #[test]
    fn a_sparse_entry_is_charged_its_full_size_and_written_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let bomb = lade_testkit::hostile::sparse_tar("big", 64 << 20, b"end");
        let err = apply_layer(&bomb[..], &target(dir.path()), 1 << 20).unwrap_err();
        assert!(matches!(err, ApplyError::TooLarge { .. }), "{err}");
        assert!(!dir.path().join("big").exists());

        apply_layer(&bomb[..], &target(dir.path()), 1 << 30).unwrap();
        let m = fs::metadata(dir.path().join("big")).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
        let mut f = fs::File::open(dir.path().join("big")).unwrap();
        f.seek(io::SeekFrom::End(-512)).unwrap();
        let mut tail = [0u8; 3];
        f.read_exact(&mut tail).unwrap();
        assert_eq!(&tail, b"end");
    }

    #[test]
    fn names_too_deep_or_long_and_too_many_xattrs_are_refused_by_name() {
        let deep = "d/".repeat(MAX_DEPTH as usize + 1) + "f";
        let bytes = layer(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(0);
            b.append_data(&mut h, &deep, &b""[..]).unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let err = apply_layer(&bytes[..], &target(dir.path()), 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::Limit {
                    what: "path depth",
                    ..
                }
            ),
            "{err}"
        );

        let bytes = layer(|b| {
            let records: Vec<(String, Vec<u8>)> = (0..=MAX_XATTRS)
                .map(|i| (format!("SCHILY.xattr.user.k{i}"), b"v".to_vec()))
                .collect();
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), &v[..])))
                .unwrap();
            entry(b, tar::EntryType::Regular, "f", "", b"");
        });
        let dir = tempfile::tempdir().unwrap();
        let err = apply_layer(&bytes[..], &target(dir.path()), 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::Limit {
                    what: "xattr count",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_framing_bound_is_a_limit_and_names_in_errors_are_shortened() {
        // A GNU long name far over the bound, refused before the tar crate reads it.
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(1 << 30);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend(vec![b'a'; 1 << 20]);
        let dir = tempfile::tempdir().unwrap();
        let err = apply_layer(&bytes[..], &target(dir.path()), 1 << 40).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::Limit {
                    what: "GNU long name size",
                    value: 1_073_741_824,
                    ..
                }
            ),
            "{err}"
        );

        // A PAX path of 100 KB passes the framer; the name check refuses it, quoting 256
        // bytes of it.
        let long = "a".repeat(100_000);
        let bytes = layer(|b| {
            b.append_pax_extensions([("path", long.as_bytes())])
                .unwrap();
            entry(b, tar::EntryType::Regular, "short", "", b"");
        });
        let err = apply_layer(&bytes[..], &target(dir.path()), 1 << 40).unwrap_err();
        let ApplyError::Limit { entry, what, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(*what, "name length");
        assert_eq!(*entry, "a".repeat(SHOWN_NAME_BYTES) + "…");
        assert!(err.to_string().len() < 400, "{err}");
        assert_eq!(shown(b"short"), "short");
        assert_eq!(
            shown(&[b'x'; SHOWN_NAME_BYTES]),
            "x".repeat(SHOWN_NAME_BYTES)
        );
    }

    #[test]
    fn the_paths_held_are_bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path());
        let mut applier = Applier::new(&t, 1 << 20).unwrap();
        let each = 4096 - HELD_PATH_OVERHEAD as usize;
        let path = PathBuf::from("p".repeat(each));
        for _ in 0..MAX_HELD_PATH_BYTES / 4096 {
            applier.hold(&path, "p").unwrap();
        }
        assert_eq!(applier.held, MAX_HELD_PATH_BYTES);
        let err = applier.hold(Path::new(""), "q").unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::Limit {
                    what: "bytes of paths held",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_zstd_window_over_the_bound_is_refused() {
        let tar = layer(|b| entry(b, tar::EntryType::Regular, "f", "", b"zstd"));
        let compress = |window_log: u32| {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            e.window_log(window_log).unwrap();
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let applied = apply_layer(
            &compress(ZSTD_WINDOW_LOG_MAX)[..],
            &target(dir.path()),
            1 << 20,
        )
        .unwrap();
        assert_eq!(applied.size, tar.len() as u64);
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"zstd");
        let dir = tempfile::tempdir().unwrap();
        let err = apply_layer(
            &compress(ZSTD_WINDOW_LOG_MAX + 1)[..],
            &target(dir.path()),
            1 << 20,
        )
        .unwrap_err();
        assert!(matches!(err, ApplyError::Stream(_)), "{err}");
        assert!(err.to_string().contains("memory"), "{err}");
    }
}
