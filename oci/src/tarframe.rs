//! A reader between the decompressed layer and `tar::Archive` that follows the tar framing
//! itself and refuses, before the tar crate reads them, the headers the crate would turn into
//! unbounded memory or CPU:
//!
//! - a GNU long name (`L`) or long link (`K`) over [`MAX_LONG_NAME`] bytes (the crate reads
//!   it whole into memory, and its errors quote it);
//! - a PAX header (`x` or `g`) over [`MAX_PAX`] bytes (an `x` is read whole too);
//! - a GNU sparse entry (`S`) with more than [`MAX_SPARSE_EXTENSIONS`] extension blocks (the
//!   crate keeps two readers per region and drops them from the front of a `Vec`, quadratic
//!   in the number of regions);
//! - more than [`MAX_META_HEADERS`] `L`, `K` and `x` headers in a row (each describes the
//!   next real entry).
//!
//! A tar is a run of 512-byte blocks: a header, then `ceil(size / 512)` blocks of data, where
//! a GNU sparse header with `isextended` set is first followed by extension blocks, each with
//! its own `isextended`. This reader walks the same blocks the tar crate (0.4) walks, with
//! the crate's own rules, so the two never disagree about where a header is:
//!
//! - the first all-zero header block ends the archive (the crate stops there and the applier
//!   drains the rest for the diffID): everything after it passes unparsed;
//! - a header whose checksum or size field the crate would refuse is not judged either: the
//!   crate fails on it, and this reader passes the rest through unparsed;
//! - `L`, `K` and `x` are meta headers only with a ustar or GNU magic (as in the crate);
//! - the size is octal text or, with the high bit of its first byte set, base-256 of the
//!   field's last 8 bytes; the `size` record of a pending `x` header replaces it for the next
//!   header that is not itself `L`, `K`, `x` or `g`. That record is found by scanning the PAX
//!   data as it passes, with the crate's parsing (`PaxScan`), never by buffering it.
//!
//! Bytes are passed through unchanged, and only one block is ever held: a header (or a
//! sparse extension) block is read whole, judged, then handed out. Once a bound is crossed
//! every read fails with an `io::Error` carrying a [`Refusal`], which the agent's applier
//! reports as `ApplyError::Limit` and the coordinator's layer check as a bad layer.

use std::fmt;
use std::io::{self, Read};

const BLOCK: usize = 512;

/// Bytes of a GNU long name or long link entry: the applier's name limit (4096 bytes), its
/// terminating NUL and the rest of one block of slack (some writers pad with NULs). A name
/// between 4097 and 4608 bytes passes here and is refused by the applier's own name check.
pub const MAX_LONG_NAME: u64 = 4096 + 512;
/// Bytes of a PAX header's records: Go's `archive/tar`, which containerd unpacks layers
/// with, refuses larger ones (`maxSpecialFileSize`), so no layer containerd accepts needs
/// more. It also bounds what the tar crate holds for one entry's records.
pub const MAX_PAX: u64 = 1 << 20;
/// Extension blocks after one GNU sparse header: 64 blocks of 21 regions plus the 4 in the
/// header make 1348 data regions, far more than a sparse file in an image has (the builders
/// of images do not write sparse entries at all; GNU tar does with `--sparse`), and few
/// enough that the tar crate's quadratic handling of the region list stays in milliseconds.
pub const MAX_SPARSE_EXTENSIONS: u64 = 64;
/// `L`, `K` and `x` headers in a row: one of each describes a real entry, and the tar crate
/// refuses a second of any kind for the same entry.
pub const MAX_META_HEADERS: u64 = 3;

/// A bound crossed: which header (its name field, shortened) and by how much.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The name field of the offending header, at most 100 bytes.
    pub header: String,
    pub what: &'static str,
    pub value: u64,
    pub limit: u64,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "header {:?}: {} {} is over the limit of {}",
            self.header, self.what, self.value, self.limit
        )
    }
}

impl std::error::Error for Refusal {}

/// What the next byte of the stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The first byte of a header block.
    Header,
    /// The first byte of the `seen + 1`-th sparse extension block of an entry with `size`
    /// bytes of data after the chain.
    SparseExtension { seen: u64, size: u64 },
    /// Entry data (padding included) with `left` bytes to go.
    Data { left: u64 },
    /// Past the end of the archive, or past a header the tar crate fails on: unparsed.
    Through,
}

/// The framing reader; see the module documentation.
pub struct Framed<R> {
    inner: R,
    /// The block being handed out: `block[served..filled]` is still to go.
    block: [u8; BLOCK],
    filled: usize,
    served: usize,
    state: State,
    /// `L`, `K` and `x` headers since the last real entry.
    meta: u64,
    /// The scan of the current `x` header's records, with the bytes of them still to come.
    pax: Option<(PaxScan, u64)>,
    /// The `size` record of the pending `x` header, if it has a valid one.
    pax_size: Option<u64>,
    /// The name of the sparse entry whose extension blocks are being read.
    sparse_name: String,
    refusal: Option<Refusal>,
}

impl<R: Read> Framed<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            block: [0; BLOCK],
            filled: 0,
            served: 0,
            state: State::Header,
            meta: 0,
            pax: None,
            pax_size: None,
            sparse_name: String::new(),
            refusal: None,
        }
    }

    /// The bound this stream crossed, if it did.
    pub fn refusal(&self) -> Option<&Refusal> {
        self.refusal.as_ref()
    }

    fn refused(&self) -> io::Error {
        let r = self.refusal.clone().expect("only called once refused");
        io::Error::new(io::ErrorKind::InvalidData, r)
    }

    /// Reads a whole block (or what is left before the end of the stream) into `block`.
    fn fill_block(&mut self) -> io::Result<()> {
        self.filled = 0;
        self.served = 0;
        while self.filled < BLOCK {
            match self.inner.read(&mut self.block[self.filled..]) {
                Ok(0) => break,
                Ok(n) => self.filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Judges the block just read in `state`, and sets what follows it.
    fn judge(&mut self) -> Result<(), Refusal> {
        self.state = match self.state {
            State::SparseExtension { seen, size } => {
                let seen = seen + 1;
                if seen > MAX_SPARSE_EXTENSIONS {
                    return Err(Refusal {
                        header: std::mem::take(&mut self.sparse_name),
                        what: "GNU sparse extension blocks",
                        value: seen,
                        limit: MAX_SPARSE_EXTENSIONS,
                    });
                }
                if self.block[504] == 1 {
                    State::SparseExtension { seen, size }
                } else {
                    data(size)
                }
            }
            State::Header => self.judge_header()?,
            other => other,
        };
        Ok(())
    }

    fn judge_header(&mut self) -> Result<State, Refusal> {
        let b = &self.block;
        if b.iter().all(|x| *x == 0) {
            return Ok(State::Through);
        }
        let sum = b[..148]
            .iter()
            .chain(&b[156..])
            .map(|x| u32::from(*x))
            .sum::<u32>()
            + 8 * 32;
        if octal(&b[148..156]).map(|c| c as u32) != Some(sum) {
            return Ok(State::Through);
        }
        let Some(size) = size_field(&b[124..136]) else {
            return Ok(State::Through);
        };
        let kind = b[156];
        let (ustar, gnu) = (
            &b[257..265] == b"ustar\x0000",
            &b[257..265] == b"ustar  \x00",
        );
        let extended = b[482] == 1;
        if (ustar || gnu) && matches!(kind, b'L' | b'K' | b'x') {
            self.meta += 1;
            if self.meta > MAX_META_HEADERS {
                return Err(self.refusal_of("meta headers in a row", self.meta, MAX_META_HEADERS));
            }
            let (what, limit) = match kind {
                b'L' => ("GNU long name size", MAX_LONG_NAME),
                b'K' => ("GNU long link size", MAX_LONG_NAME),
                _ => ("PAX header size", MAX_PAX),
            };
            if size > limit {
                return Err(self.refusal_of(what, size, limit));
            }
            if kind == b'x' {
                let mut scan = PaxScan::default();
                if size == 0 {
                    self.pax_size = scan.finish();
                } else {
                    self.pax = Some((scan, size));
                }
            }
            return Ok(data(size));
        }
        // A real entry (or `g`, or an `L`/`K`/`x` without magic, which the crate hands out
        // as entries): it takes the pending PAX records with it.
        let pax_size = self.pax_size.take();
        self.meta = 0;
        if kind == b'g' && size > MAX_PAX {
            return Err(self.refusal_of("PAX global header size", size, MAX_PAX));
        }
        let size = match pax_size {
            Some(s) if !matches!(kind, b'L' | b'K' | b'x' | b'g') => s,
            _ => size,
        };
        if kind == b'S' && gnu && extended {
            self.sparse_name = self.name();
            return Ok(State::SparseExtension { seen: 0, size });
        }
        Ok(data(size))
    }

    /// The name field of the header in `block`, lossily.
    fn name(&self) -> String {
        let name = &self.block[..100];
        let name = &name[..name.iter().position(|x| *x == 0).unwrap_or(100)];
        String::from_utf8_lossy(name).into_owned()
    }

    fn refusal_of(&self, what: &'static str, value: u64, limit: u64) -> Refusal {
        Refusal {
            header: self.name(),
            what,
            value,
            limit,
        }
    }
}

/// Entry data of `size` bytes, padded to whole blocks; a size the crate cannot round up
/// (it fails on it) leaves the rest unparsed.
fn data(size: u64) -> State {
    match size.checked_add(BLOCK as u64 - 1) {
        Some(s) => State::Data {
            left: s & !(BLOCK as u64 - 1),
        },
        None => State::Through,
    }
}

/// An octal numeric field as the tar crate reads it: up to the first NUL, trimmed.
fn octal(field: &[u8]) -> Option<u64> {
    let end = field.iter().position(|x| *x == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// The 12-byte size field: octal, or with the high bit of its first byte set, base-256 of
/// its last 8 bytes (the crate ignores the 3 bytes between).
fn size_field(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        Some(
            field[field.len() - 8..]
                .iter()
                .fold(0u64, |n, x| (n << 8) | u64::from(*x)),
        )
    } else {
        octal(field)
    }
}

impl<R: Read> Read for Framed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.refusal.is_some() {
            return Err(self.refused());
        }
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.served < self.filled {
                let n = buf.len().min(self.filled - self.served);
                buf[..n].copy_from_slice(&self.block[self.served..self.served + n]);
                self.served += n;
                return Ok(n);
            }
            match self.state {
                State::Through => return self.inner.read(buf),
                State::Data { left: 0 } => self.state = State::Header,
                State::Data { left } => {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = self.inner.read(&mut buf[..want])?;
                    self.state = State::Data {
                        left: left - n as u64,
                    };
                    if let Some((scan, pax_left)) = &mut self.pax {
                        let take = n.min(usize::try_from(*pax_left).unwrap_or(usize::MAX));
                        scan.feed(&buf[..take]);
                        *pax_left -= take as u64;
                        if *pax_left == 0 {
                            self.pax_size = scan.finish();
                            self.pax = None;
                        }
                    }
                    return Ok(n);
                }
                State::Header | State::SparseExtension { .. } => {
                    self.fill_block()?;
                    if self.filled == 0 {
                        return Ok(0);
                    }
                    if self.filled < BLOCK {
                        // The stream ends inside a block: the crate fails on it.
                        self.state = State::Through;
                        continue;
                    }
                    if let Err(r) = self.judge() {
                        self.refusal = Some(r);
                        self.filled = 0;
                        return Err(self.refused());
                    }
                }
            }
        }
    }
}

/// Finds the `size` record of PAX data fed in pieces, exactly as the tar crate's
/// `pax_extensions_value(data, "size")` does on the whole: lines split at `\n`, each
/// `LEN KEY=VALUE` with LEN the line's length plus one; the first empty line ends the
/// search, the first malformed line ends it with nothing, and the first `size` key decides
/// (its value a `u64`, or nothing). It holds a few counters, never the data.
struct PaxScan {
    /// The search ended, with this result.
    done: Option<Option<u64>>,
    /// Bytes of the current line so far (its `\n` not counted).
    line: u64,
    phase: Phase,
    /// The length field parsed so far (`None` once it cannot be a `usize`), and its digits.
    len: Option<usize>,
    len_digits: usize,
    /// Bytes of the key so far, and whether they are a prefix of `size`.
    key_len: usize,
    key_is_size: bool,
    /// Where the value starts in the line; the value parsed so far when the key is `size`,
    /// and its digits.
    value_start: u64,
    value: Option<u64>,
    value_digits: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the line's first space.
    Len,
    /// Between the first space and the first `=` after it.
    Key,
    /// After that `=`.
    Value,
}

impl Default for PaxScan {
    fn default() -> Self {
        Self {
            done: None,
            line: 0,
            phase: Phase::Len,
            len: Some(0),
            len_digits: 0,
            key_len: 0,
            key_is_size: false,
            value_start: 0,
            value: Some(0),
            value_digits: 0,
        }
    }
}

/// One more character of a decimal number as Rust's `parse` takes it (a leading `+`, then
/// digits): `None` once it cannot be one, or it overflows.
fn digit<T>(so_far: Option<T>, first: bool, b: u8, step: impl Fn(T, u8) -> Option<T>) -> Option<T> {
    match b {
        b'+' if first => so_far,
        b'0'..=b'9' => so_far.and_then(|v| step(v, b - b'0')),
        _ => None,
    }
}

impl PaxScan {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done.is_some() {
                return;
            }
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if b == b'\n' {
            self.end_line();
            return;
        }
        let at = self.line;
        self.line += 1;
        match self.phase {
            Phase::Len if b == b' ' => self.phase = Phase::Key,
            Phase::Len => {
                self.len = digit(self.len, at == 0, b, |v, d| {
                    v.checked_mul(10)?.checked_add(usize::from(d))
                });
                self.len_digits += usize::from(b.is_ascii_digit());
            }
            Phase::Key if b == b'=' => {
                self.key_is_size = self.key_is_size && self.key_len == 4;
                self.value_start = self.line;
                self.phase = Phase::Value;
            }
            Phase::Key => {
                self.key_is_size = self.key_len < 4
                    && b"size"[self.key_len] == b
                    && (self.key_len == 0 || self.key_is_size);
                self.key_len += 1;
            }
            Phase::Value if self.key_is_size => {
                self.value = digit(self.value, at == self.value_start, b, |v, d| {
                    v.checked_mul(10)?.checked_add(u64::from(d))
                });
                self.value_digits += usize::from(b.is_ascii_digit());
            }
            Phase::Value => {}
        }
    }

    /// The end of a line (at its `\n`, or the end of the data).
    fn end_line(&mut self) {
        let len_ok = self.len_digits > 0
            && self.len.and_then(|l| u64::try_from(l).ok()) == Some(self.line + 1);
        self.done = if self.line == 0 || !len_ok || self.phase != Phase::Value {
            // An empty line ends the records; a malformed one ends the search.
            Some(None)
        } else if self.key_is_size {
            Some(self.value.filter(|_| self.value_digits > 0))
        } else {
            None
        };
        *self = Self {
            done: self.done,
            ..Self::default()
        };
    }

    /// The `size` record's value, once all the data has been fed.
    fn finish(&mut self) -> Option<u64> {
        if self.done.is_none() {
            self.end_line();
        }
        self.done.flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block built by hand: `name`, type flag `kind`, `size` (octal, or base-256
    /// when `base256`), GNU or ustar magic, and a correct checksum.
    fn header(name: &[u8], kind: u8, size: u64, gnu: bool) -> Vec<u8> {
        header_with(name, kind, size, gnu, |_| {})
    }

    fn header_with(
        name: &[u8],
        kind: u8,
        size: u64,
        gnu: bool,
        edit: impl FnOnce(&mut [u8]),
    ) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[..name.len()].copy_from_slice(name);
        b[100..107].copy_from_slice(b"0000644");
        b[108..115].copy_from_slice(b"0000000");
        b[116..123].copy_from_slice(b"0000000");
        b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        b[136..147].copy_from_slice(b"00000000000");
        b[156] = kind;
        b[257..265].copy_from_slice(if gnu { b"ustar  \0" } else { b"ustar\x0000" });
        edit(&mut b);
        seal(&mut b);
        b
    }

    /// Writes the checksum of a header block.
    fn seal(b: &mut [u8]) {
        b[148..156].fill(b' ');
        let sum: u32 = b.iter().map(|x| u32::from(*x)).sum();
        b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    /// `len` bytes of data padded to whole blocks.
    fn body(len: usize, fill: u8) -> Vec<u8> {
        let mut d = vec![fill; len];
        d.resize(len.div_ceil(BLOCK) * BLOCK, 0);
        d
    }

    fn end() -> Vec<u8> {
        vec![0u8; 2 * BLOCK]
    }

    /// Reads `tar` through the framer in `chunk`-byte reads.
    fn read_in(tar: &[u8], chunk: usize) -> Result<Vec<u8>, Refusal> {
        let mut f = Framed::new(tar);
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => {
                    let r = e
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<Refusal>())
                        .cloned()
                        .expect("a refusal");
                    assert_eq!(f.refusal(), Some(&r));
                    return Err(r);
                }
            }
        }
    }

    /// Reads `tar` whole, checking it passes unchanged in reads of any size.
    fn passes(tar: &[u8]) {
        for chunk in [1, 7, 512, 4096, 1 << 20] {
            assert_eq!(read_in(tar, chunk).as_deref(), Ok(tar), "chunk {chunk}");
        }
    }

    fn refused(tar: &[u8]) -> Refusal {
        let r = read_in(tar, 512).unwrap_err();
        assert_eq!(read_in(tar, 7), Err(r.clone()));
        r
    }

    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    /// A PAX record `LEN key=value\n`.
    fn record(key: &str, value: &str) -> String {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    }

    #[test]
    fn an_ordinary_tar_passes_unchanged_and_the_crate_reads_it() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        let long = "d/".repeat(200) + "f";
        b.append_data(&mut h.clone(), &long, &b"abc"[..]).unwrap();
        b.append_pax_extensions([("SCHILY.xattr.user.a", &b"v"[..])])
            .unwrap();
        b.append_data(&mut h, "g", &b"xyz"[..]).unwrap();
        let mut tar = b.into_inner().unwrap();
        tar.extend_from_slice(b"trailing bytes after the end");
        passes(&tar);
        let mut a = tar::Archive::new(Framed::new(&tar[..]));
        let names: Vec<_> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path_bytes().into_owned())
            .collect();
        assert_eq!(names, vec![long.into_bytes(), b"g".to_vec()]);
    }

    #[test]
    fn long_names_and_links_are_bounded() {
        for kind in [b'L', b'K'] {
            let at = MAX_LONG_NAME as usize;
            passes(&cat(&[
                header(b"././@LongLink", kind, at as u64, true),
                body(at, b'a'),
                header(b"f", b'0', 0, true),
                end(),
            ]));
            let over = cat(&[
                header(b"././@LongLink", kind, at as u64 + 1, true),
                body(at + 1, b'a'),
                header(b"f", b'0', 0, true),
                end(),
            ]);
            let r = refused(&over);
            assert_eq!((r.value, r.limit), (MAX_LONG_NAME + 1, MAX_LONG_NAME));
            assert_eq!(r.header, "././@LongLink");
        }
    }

    #[test]
    fn pax_headers_are_bounded() {
        for kind in [b'x', b'g'] {
            let at = MAX_PAX as usize;
            passes(&cat(&[
                header(b"PaxHeaders/f", kind, at as u64, false),
                body(at, b'\n'),
                header(b"f", b'0', 0, false),
                end(),
            ]));
            let r = refused(&cat(&[
                header(b"PaxHeaders/f", kind, at as u64 + 1, false),
                body(at + 1, b'\n'),
                end(),
            ]));
            assert_eq!((r.value, r.limit), (MAX_PAX + 1, MAX_PAX));
        }
    }

    /// A GNU sparse entry with `extensions` extension blocks and no data.
    fn sparse(extensions: u64) -> Vec<u8> {
        let mut tar = header_with(b"s", b'S', 0, true, |b| {
            b[482] = u8::from(extensions > 0);
            b[483..494].copy_from_slice(b"00000000000");
        });
        for i in 1..=extensions {
            let mut ext = vec![0u8; BLOCK];
            ext[504] = u8::from(i < extensions);
            tar.extend(ext);
        }
        tar.extend(header(b"after", b'0', 0, true));
        tar.extend(end());
        tar
    }

    #[test]
    fn sparse_extension_chains_are_bounded() {
        passes(&sparse(0));
        passes(&sparse(MAX_SPARSE_EXTENSIONS));
        let r = refused(&sparse(MAX_SPARSE_EXTENSIONS + 1));
        assert_eq!(r.what, "GNU sparse extension blocks");
        assert_eq!(
            (r.value, r.limit),
            (MAX_SPARSE_EXTENSIONS + 1, MAX_SPARSE_EXTENSIONS)
        );
        assert_eq!(r.header, "s");
        // The crate reads the chain the same way: the entry after it is found.
        let tar = sparse(MAX_SPARSE_EXTENSIONS);
        let mut a = tar::Archive::new(Framed::new(&tar[..]));
        let names: Vec<_> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path_bytes().into_owned())
            .collect();
        assert_eq!(names, vec![b"s".to_vec(), b"after".to_vec()]);
    }

    #[test]
    fn meta_headers_in_a_row_are_bounded() {
        let meta = |kind: u8| cat(&[header(b"m", kind, 1, true), body(1, b'a')]);
        passes(&cat(&[
            meta(b'L'),
            meta(b'K'),
            meta(b'x'),
            header(b"f", b'0', 0, true),
            meta(b'L'),
            header(b"f", b'0', 0, true),
            end(),
        ]));
        let r = refused(&cat(&[
            meta(b'L'),
            meta(b'K'),
            meta(b'x'),
            meta(b'L'),
            header(b"f", b'0', 0, true),
            end(),
        ]));
        assert_eq!((r.what, r.value, r.limit), ("meta headers in a row", 4, 3));
        // Without a ustar or GNU magic they are plain entries to the crate, and here.
        let old = |kind: u8| {
            cat(&[
                header_with(b"m", kind, 1, false, |b| b[257..265].fill(0)),
                body(1, b'a'),
            ])
        };
        passes(&cat(&[old(b'L'), old(b'L'), old(b'L'), old(b'L'), end()]));
    }

    /// Data that looks like a GNU long name header far over the bound.
    fn decoy() -> Vec<u8> {
        header(b"decoy", b'L', (1 << 33) - 1, true)
    }

    #[test]
    fn the_end_of_the_archive_ends_parsing() {
        passes(&cat(&[
            header(b"f", b'0', 0, true),
            vec![0u8; BLOCK],
            decoy(),
        ]));
        // Nor is a header with a bad checksum judged: the crate fails on it.
        let mut bad = decoy();
        bad[0] ^= 1;
        passes(&cat(&[bad, decoy()]));
        // A stream that stops inside a block.
        passes(&decoy()[..100]);
    }

    #[test]
    fn data_is_skipped_by_the_size_the_crate_uses() {
        // Octal size: the decoy is data.
        passes(&cat(&[header(b"f", b'0', 512, true), decoy(), end()]));
        // Base-256 size (only the last 8 bytes count, as in the crate).
        let big = header_with(b"f", b'0', 0, true, |b| {
            b[124..136].copy_from_slice(&[0x80, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 2, 0]);
        });
        passes(&cat(&[big, decoy(), end()]));
        // A PAX `size` record replaces the header's size of the next real entry, not of the
        // meta headers between.
        for size in ["512", "+512"] {
            let records = record("path", "f") + &record("size", size);
            passes(&cat(&[
                header(b"p", b'x', records.len() as u64, true),
                body(0, 0),
                {
                    let mut d = records.clone().into_bytes();
                    d.resize(BLOCK, 0);
                    d
                },
                header(b"././@LongLink", b'L', 2, true),
                body(2, b'f'),
                header(b"f", b'0', 0, true),
                decoy(),
                end(),
            ]));
        }
        // Where the crate finds no valid `size` record, the header's size stands, and the
        // decoy is a header.
        for records in [
            record("size", "12x"),
            record("size", ""),
            "5 size=512\n".to_string(),
            record("a", "b") + "\n" + &record("size", "512"),
            "no space\n".to_string() + &record("size", "512"),
        ] {
            let tar = cat(&[
                header(b"p", b'x', records.len() as u64, true),
                body(records.len(), 0)
                    .iter()
                    .enumerate()
                    .map(|(i, z)| *records.as_bytes().get(i).unwrap_or(z))
                    .collect(),
                header(b"f", b'0', 0, true),
                decoy(),
                end(),
            ]);
            let r = refused(&tar);
            assert_eq!(r.header, "decoy", "{records:?}");
        }
    }

    #[test]
    fn pax_scan_matches_the_crate() {
        let cases: Vec<String> = vec![
            record("size", "7"),
            record("sizes", "7"),
            record("siz", "7"),
            record("path", "a=b") + &record("size", "9"),
            record("size", "18446744073709551615"),
            record("size", "18446744073709551616"),
            record("size", "-1"),
            "007 a=b\n".to_string() + &record("size", "3"),
            "+7 a=b\n".to_string() + &record("size", "3"),
            "7 a=b".to_string(),
            "6 size=4".to_string(),
            "7 size=4".to_string(),
            String::new(),
            "\n".to_string(),
            "10 size=4\n".to_string(),
        ];
        for data in cases {
            let whole = {
                let mut s = PaxScan::default();
                s.feed(data.as_bytes());
                s.finish()
            };
            // The crate's own answer, through an archive: header size 0, PAX size decides.
            let tar = cat(&[
                header(b"p", b'x', data.len() as u64, true),
                body(data.len(), 0)
                    .iter()
                    .enumerate()
                    .map(|(i, z)| *data.as_bytes().get(i).unwrap_or(z))
                    .collect(),
                header(b"f", b'0', 0, true),
                vec![b'z'; BLOCK],
                end(),
            ]);
            let mut a = tar::Archive::new(&tar[..]);
            let crate_size = a
                .entries()
                .unwrap()
                .next()
                .map(|e| e.map(|e| e.size()).unwrap_or(u64::MAX));
            let expected = match crate_size {
                Some(0) | None => None,
                Some(n) => Some(n),
            };
            assert_eq!(whole, expected, "{data:?}");
            let mut bytewise = PaxScan::default();
            for b in data.as_bytes() {
                bytewise.feed(&[*b]);
            }
            assert_eq!(bytewise.finish(), whole, "{data:?}");
        }
    }
}
