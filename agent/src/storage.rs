//! How much room the node has where a load writes, so the coordinator can refuse a load that
//! would fill a disk before it sends anything.
//!
//! Owns measuring directories (`statvfs`) and folding the ones on the same filesystem into
//! one entry, so space shared by the content store and the snapshots is not counted twice.
//! Which directories a runtime writes to is the runtime's business (it asks its daemon).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use lade_proto::Storage;
use tracing::debug;

/// Free and total bytes of the filesystem holding `path`, for an unprivileged writer (what
/// is left after the blocks reserved for root is not counted: containerd runs as root, but
/// an admin expects the reserve to stay free).
// The statvfs field types differ between platforms; on some the casts are no-ops.
#[allow(clippy::unnecessary_cast)]
fn statvfs(path: &Path) -> std::io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points at writable memory of the
    // right type; statvfs fills it on success and we read it only then.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize as u64;
    Ok((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

/// One entry per filesystem among `dirs` (what is written there, directory). A directory the
/// agent cannot see (not mounted into its container) is left out, and logged.
pub fn measure(dirs: &[(&str, &Path)]) -> Vec<Storage> {
    let mut out: Vec<(u64, Storage)> = Vec::new();
    for (holds, dir) in dirs {
        let dev = match std::fs::metadata(dir) {
            Ok(m) => m.dev(),
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot measure free space");
                continue;
            }
        };
        if let Some((_, s)) = out.iter_mut().find(|(d, _)| *d == dev) {
            s.holds.push(holds.to_string());
            continue;
        }
        match statvfs(dir) {
            Ok((free, total)) => out.push((
                dev,
                Storage {
                    holds: vec![holds.to_string()],
                    path: dir.display().to_string(),
                    free_bytes: free,
                    total_bytes: total,
                },
            )),
            Err(e) => debug!(dir = %dir.display(), error = %e, "cannot measure free space"),
        }
    }
    out.into_iter().map(|(_, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_on_one_filesystem_are_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let found = measure(&[("content", &a), ("snapshots", &b)]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].holds, vec!["content", "snapshots"]);
        assert_eq!(found[0].path, a.display().to_string());
        assert!(found[0].total_bytes > 0 && found[0].free_bytes <= found[0].total_bytes);
    }

    #[test]
    fn a_directory_the_agent_cannot_see_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let found = measure(&[
            ("content", &dir.path().join("not-mounted")),
            ("snapshots", dir.path()),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].holds, vec!["snapshots"]);
    }
}
