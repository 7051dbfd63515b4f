//! Indexes a tar archive (or a tar nested inside one) by header, without extracting it.
//!
//! Owns: where each member's bytes start in the file, its size and type, and resolving link
//! members to the member that holds the bytes. Does not interpret member contents.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::BundleError;

/// What a member is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    /// Symbolic link; the target is relative to the member's directory.
    Symlink(String),
    /// Hard link; the target is a member name.
    Hardlink(String),
    Other,
}

/// One member of an archive, located by absolute byte offset in the file.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    /// Offset of the member's data from the start of the *file* (not of a nested archive).
    pub offset: u64,
    pub size: u64,
    pub kind: Kind,
}

/// The members of one archive, by normalised name.
#[derive(Debug)]
pub struct TarIndex {
    /// File the offsets refer to, for messages.
    pub file: PathBuf,
    /// How the archive is named in messages (`bundle.tar` or `bundle.tar:images.tar`).
    pub label: String,
    members: HashMap<String, Member>,
    order: Vec<String>,
}

/// A byte range of a file, readable and seekable as if it were a file of its own.
pub struct Section {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Section {
    pub fn open(path: &Path, start: u64, len: u64) -> io::Result<Section> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(start))?;
        Ok(Section {
            file,
            start,
            len,
            pos: 0,
        })
    }
}

impl Read for Section {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A seek may have gone past the end (a header claiming more than the archive holds).
        let left = self.len.saturating_sub(self.pos);
        if left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(left as usize);
        let n = self.file.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Section {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
        };
        if target < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        // Seeking past the end is allowed (reads then return 0), as for files.
        self.pos = target as u64;
        self.file
            .seek(SeekFrom::Start(self.start + self.pos.min(self.len)))?;
        Ok(self.pos)
    }
}

/// Most bytes the tar reader may read between two seeks. It seeks over every member's data,
/// so what it reads is headers plus the data of extension members (GNU long names, PAX
/// records), which it keeps in memory whole: real ones are a few hundred bytes, and this
/// keeps a header claiming gigabytes from becoming an allocation of that size.
const MAX_HEADER_RUN: u64 = 1 << 20;

/// An archive as the tar reader sees it, with [`MAX_HEADER_RUN`] enforced.
pub(crate) struct HeaderReader<R> {
    inner: R,
    since_seek: u64,
}

impl<R> HeaderReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HeaderReader {
            inner,
            since_seek: 0,
        }
    }
}

impl<R: Read> Read for HeaderReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.since_seek >= MAX_HEADER_RUN {
            return Err(io::Error::other(format!(
                "an extension header (long name or PAX record) of more than {MAX_HEADER_RUN} bytes"
            )));
        }
        let want = buf.len().min((MAX_HEADER_RUN - self.since_seek) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.since_seek += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for HeaderReader<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.since_seek = 0;
        self.inner.seek(to)
    }
}

/// Normalises a member name: no leading `./` or `/`, no `.` components, no trailing `/`.
/// Returns None for a name that climbs out of the archive (`..` past the root).
pub fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

impl TarIndex {
    /// Indexes the archive stored in `file` at `[start, start+len)`.
    pub fn build(file: &Path, label: &str, start: u64, len: u64) -> Result<TarIndex, BundleError> {
        let io_err = |e: io::Error| BundleError::Io {
            path: file.to_path_buf(),
            what: format!("reading the tar headers of {label}"),
            source: e,
        };
        let bad = |reason: String| BundleError::BadArchive {
            archive: label.to_string(),
            reason,
        };
        let unsafe_member = |member: &str, reason: &str| BundleError::UnsafeMember {
            archive: label.to_string(),
            member: member.to_string(),
            reason: reason.to_string(),
        };
        let section = Section::open(file, start, len).map_err(io_err)?;
        let mut archive = tar::Archive::new(HeaderReader::new(section));
        let mut members = HashMap::new();
        let mut order = Vec::new();
        let entries = archive.entries_with_seek().map_err(io_err)?;
        for entry in entries {
            let entry = entry.map_err(|e| bad(format!("corrupt tar header: {e}")))?;
            let raw_name = entry
                .path()
                .map_err(|e| bad(format!("unreadable member name: {e}")))?
                .to_string_lossy()
                .into_owned();
            let header = entry.header();
            let size = entry.size();
            let offset = start + entry.raw_file_position();
            // Checked before anything trusts `size`: it is a header field, up to 2^64 - 1.
            let available = (start + len).saturating_sub(offset);
            if size > available {
                return Err(BundleError::Truncated {
                    archive: label.to_string(),
                    member: raw_name,
                    claimed: size,
                    available,
                });
            }
            let link = || {
                entry
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            let kind = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink(link()),
                tar::EntryType::Link => Kind::Hardlink(link()),
                _ => Kind::Other,
            };
            // No writer of image archives or bundles stores such names (GNU tar strips a
            // leading `/`), so one is a sign of a hand-made archive: refused, not rewritten.
            if raw_name.starts_with('/') {
                return Err(unsafe_member(&raw_name, "is an absolute path"));
            }
            let Some(name) = normalize(&raw_name) else {
                return Err(unsafe_member(&raw_name, "points outside the archive"));
            };
            if name.is_empty() {
                continue;
            }
            if kind == Kind::Dir {
                continue;
            }
            if members.contains_key(&name) {
                // A later duplicate would silently shadow the earlier one in tar semantics;
                // which one a reader sees must not depend on the reader.
                return Err(BundleError::DuplicateMember {
                    archive: label.to_string(),
                    member: name,
                });
            }
            order.push(name.clone());
            members.insert(
                name.clone(),
                Member {
                    name,
                    offset,
                    size,
                    kind,
                },
            );
        }
        Ok(TarIndex {
            file: file.to_path_buf(),
            label: label.to_string(),
            members,
            order,
        })
    }

    /// The member named `name` exactly, links not followed.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.members.get(name)
    }

    /// Members in archive order.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.order.iter().filter_map(|n| self.members.get(n))
    }

    /// The regular-file member that holds `name`'s bytes, following symbolic and hard links
    /// (at most 16 hops). Errors name the member and say why it cannot be used.
    pub fn resolve(&self, name: &str) -> Result<&Member, BundleError> {
        let bad = |reason: String| BundleError::BadArchive {
            archive: self.label.clone(),
            reason,
        };
        let outside = |member: &str, reason: String| BundleError::UnsafeMember {
            archive: self.label.clone(),
            member: member.to_string(),
            reason,
        };
        let mut current = normalize(name)
            .ok_or_else(|| outside(name, "points outside the archive".to_string()))?;
        for _ in 0..16 {
            let member = self
                .members
                .get(&current)
                .ok_or_else(|| BundleError::MissingMember {
                    archive: self.label.clone(),
                    member: current.clone(),
                    image: None,
                })?;
            let next = match &member.kind {
                Kind::File => return Ok(member),
                Kind::Symlink(target) => {
                    if target.starts_with('/') {
                        return Err(outside(
                            &current,
                            format!("is a symlink to the absolute path {target}; only links inside the archive are followed"),
                        ));
                    }
                    let dir = current.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    normalize(&format!("{dir}/{target}")).ok_or_else(|| {
                        outside(
                            &current,
                            format!("is a symlink to {target}, which points outside the archive"),
                        )
                    })?
                }
                Kind::Hardlink(target) => normalize(target).ok_or_else(|| {
                    outside(
                        &current,
                        format!("is a hard link to {target}, which points outside the archive"),
                    )
                })?,
                Kind::Dir | Kind::Other => {
                    return Err(bad(format!("member {current} is not a regular file")))
                }
            };
            current = next;
        }
        Err(bad(format!("member {name}: too many levels of links")))
    }

    /// Reads a small member whole (manifests, configs, hints), refusing anything over `limit`.
    pub fn read_small(&self, name: &str, limit: u64) -> Result<Vec<u8>, BundleError> {
        let member = self.resolve(name)?;
        if member.size > limit {
            return Err(BundleError::BadArchive {
                archive: self.label.clone(),
                reason: format!(
                    "member {name} is {} bytes; more than the {limit} such a file may have",
                    member.size
                ),
            });
        }
        let mut buf = Vec::with_capacity(member.size as usize);
        Section::open(&self.file, member.offset, member.size)
            .and_then(|mut s| s.read_to_end(&mut buf))
            .map_err(|e| BundleError::Io {
                path: self.file.clone(),
                what: format!("reading {} in {}", name, self.label),
                source: e,
            })?;
        Ok(buf)
    }

    /// Reads up to `n` bytes from the start of a member (for magic-byte sniffing).
    pub fn head(&self, member: &Member, n: usize) -> Result<Vec<u8>, BundleError> {
        let mut buf = vec![0u8; n.min(member.size as usize)];
        Section::open(&self.file, member.offset, member.size)
            .and_then(|mut s| s.read_exact(&mut buf))
            .map_err(|e| BundleError::Io {
                path: self.file.clone(),
                what: format!("reading {} in {}", member.name, self.label),
                source: e,
            })?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_dots_and_refuses_escapes() {
        assert_eq!(normalize("./a/b/").as_deref(), Some("a/b"));
        assert_eq!(normalize("/a/./b").as_deref(), Some("a/b"));
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("../etc/passwd"), None);
        assert_eq!(normalize("a/../../b"), None);
    }

    fn archive(members: &[(&str, &[u8])], links: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        for (name, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, name, target).unwrap();
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b.into_inner().unwrap()).unwrap();
        f
    }

    #[test]
    fn offsets_point_at_member_bytes() {
        let f = archive(&[("a.txt", b"hello"), ("dir/b.bin", b"world!")], &[]);
        let len = std::fs::metadata(f.path()).unwrap().len();
        let idx = TarIndex::build(f.path(), "t.tar", 0, len).unwrap();
        assert_eq!(idx.read_small("dir/b.bin", 100).unwrap(), b"world!");
        assert_eq!(idx.read_small("./a.txt", 100).unwrap(), b"hello");
        let names: Vec<_> = idx.members().map(|m| m.name.clone()).collect();
        assert_eq!(names, ["a.txt", "dir/b.bin"]);
    }

    #[test]
    fn symlinks_resolve_inside_and_refuse_outside() {
        let f = archive(
            &[("one/layer.tar", b"L1")],
            &[
                ("two/layer.tar", "../one/layer.tar"),
                ("evil", "../../etc/passwd"),
            ],
        );
        let len = std::fs::metadata(f.path()).unwrap().len();
        let idx = TarIndex::build(f.path(), "t.tar", 0, len).unwrap();
        assert_eq!(idx.resolve("two/layer.tar").unwrap().name, "one/layer.tar");
        let err = idx.resolve("evil").unwrap_err().to_string();
        assert!(err.contains("evil") && err.contains("outside"), "{err}");
    }

    #[test]
    fn nested_archive_offsets_are_absolute() {
        let inner = archive(&[("x", b"nested bytes")], &[]);
        let inner_bytes = std::fs::read(inner.path()).unwrap();
        let outer = archive(&[("pad", &[7u8; 700]), ("images.tar", &inner_bytes)], &[]);
        let len = std::fs::metadata(outer.path()).unwrap().len();
        let idx = TarIndex::build(outer.path(), "o.tar", 0, len).unwrap();
        let m = idx.resolve("images.tar").unwrap().clone();
        let nested = TarIndex::build(outer.path(), "o.tar:images.tar", m.offset, m.size).unwrap();
        assert_eq!(nested.read_small("x", 100).unwrap(), b"nested bytes");
        assert!(nested.get("x").unwrap().offset > m.offset);
    }

    #[test]
    fn a_section_read_after_seeking_past_its_end_is_empty() {
        // The tar reader seeks by header sizes; a lying header once made this underflow.
        let f = archive(&[("a", b"abc")], &[]);
        let mut s = Section::open(f.path(), 0, 10).unwrap();
        s.seek(SeekFrom::Start(1 << 40)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn oversized_small_read_is_refused_with_member_name() {
        let f = archive(&[("manifest.json", &[b' '; 64])], &[]);
        let len = std::fs::metadata(f.path()).unwrap().len();
        let idx = TarIndex::build(f.path(), "t.tar", 0, len).unwrap();
        let err = idx.read_small("manifest.json", 10).unwrap_err().to_string();
        assert!(err.contains("manifest.json"), "{err}");
    }
}
