//! Applies one crafted layer that aims at the tar crate's own handling of meta headers, and
//! prints how long it took and what came of it: the figures behind the framing bounds of
//! `apply::frame`. Run it under `/usr/bin/time -v` for the peak RSS:
//!
//! ```text
//! cargo build -p lade-agent --example tar_bombs
//! /usr/bin/time -v target/debug/examples/tar_bombs sparse-cpu 1782579
//! /usr/bin/time -v target/debug/examples/tar_bombs sparse-mem 209715200
//! /usr/bin/time -v target/debug/examples/tar_bombs pax 209715200
//! /usr/bin/time -v target/debug/examples/tar_bombs longname 209715200
//! ```
//!
//! `sparse-cpu N`: one GNU sparse entry whose extension blocks (N bytes of them) list
//! thousands of empty regions, consistent, so the entry is read; `sparse-mem N`: the same
//! with a wrong real size, so the crate fails once it has parsed the whole map; `pax N` and
//! `longname N`: a PAX header or GNU long name of N bytes. The layer is generated as it is
//! read, so the RSS is the applier's own.

use std::io::{self, Read};
use std::time::Instant;

use lade_agent::apply::{apply_layer, Target};

fn header(name: &[u8], kind: u8, size: u64, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..name.len()].copy_from_slice(name);
    b[100..107].copy_from_slice(b"0000644");
    b[108..115].copy_from_slice(b"0000000");
    b[116..123].copy_from_slice(b"0000000");
    b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    b[136..147].copy_from_slice(b"00000000000");
    b[156] = kind;
    b[257..265].copy_from_slice(b"ustar  \0");
    edit(&mut b);
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|x| u32::from(*x)).sum();
    b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    b
}

/// Sparse extension blocks, generated as they are read: region `i` is empty at offset `i`.
struct Extensions {
    blocks: u64,
    next: u64,
    pending: Vec<u8>,
}

impl Read for Extensions {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending.is_empty() {
            if self.next == self.blocks {
                return Ok(0);
            }
            let mut b = vec![0u8; 512];
            for r in 0..21u64 {
                let at = (r * 24) as usize;
                let offset = self.next * 21 + r + 1;
                b[at..at + 11].copy_from_slice(format!("{offset:011o}").as_bytes());
                b[at + 12..at + 23].copy_from_slice(b"00000000000");
            }
            self.next += 1;
            b[504] = u8::from(self.next < self.blocks);
            self.pending = b;
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (kind, bytes) = (args[1].as_str(), args[2].parse::<u64>().unwrap());
    let end = || io::Cursor::new(vec![0u8; 1024]);
    let layer: Box<dyn Read> = match kind {
        "sparse-cpu" | "sparse-mem" => {
            let blocks = bytes / 512;
            let real = if kind == "sparse-cpu" { blocks * 21 } else { 1 };
            let h = header(b"sparse", b'S', 0, |b| {
                b[482] = 1;
                b[483..494].copy_from_slice(format!("{real:011o}").as_bytes());
            });
            Box::new(
                io::Cursor::new(h)
                    .chain(Extensions {
                        blocks,
                        next: 0,
                        pending: Vec::new(),
                    })
                    .chain(end()),
            )
        }
        "pax" | "longname" => {
            let flag = if kind == "pax" { b'x' } else { b'L' };
            let pad = (512 - bytes % 512) % 512;
            Box::new(
                io::Cursor::new(header(b"././@LongLink", flag, bytes, |_| {}))
                    .chain(io::repeat(b'\n').take(bytes))
                    .chain(io::repeat(0).take(pad))
                    .chain(io::Cursor::new(header(b"f", b'0', 0, |_| {})))
                    .chain(end()),
            )
        }
        other => panic!("unknown kind {other}"),
    };
    let dir = std::env::temp_dir().join(format!("tar_bombs.{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = Target {
        root: dir.clone(),
        parents: vec![],
        overlay: false,
    };
    let start = Instant::now();
    let result = apply_layer(layer, &target, 1 << 40);
    let took = start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    let shown = match &result {
        Ok(a) => format!("applied, {} bytes", a.size),
        Err(e) => {
            let e = e.to_string();
            let head: String = e.chars().take(200).collect();
            format!("{head} ({} bytes of message)", e.len())
        }
    };
    println!("{kind} {bytes}: {:.2?}: {shown}", took);
}
