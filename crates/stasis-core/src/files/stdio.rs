//! The standard streams of a checkpoint that came from outside stasis (matched by
//! device and inode against the streams stasis itself was given): found at dump time,
//! and at restart bound to the restarting stasis's own streams.

use crate::proc::ProcDir;
use stasis_image::FdKind;
use std::os::unix::fs::MetadataExt;

/// Identity (device, inode) of the stdio streams that came from outside stasis, by
/// index 0, 1, 2.
pub type StdioIds = Vec<(u8, u64, u64)>;

/// Identities of this process's own fds 0, 1 and 2.
pub fn own_stdio_ids() -> StdioIds {
    (0..3u8)
        .filter_map(|i| {
            std::fs::metadata(format!("/proc/self/fd/{i}"))
                .ok()
                .map(|m| (i, m.dev(), m.ino()))
        })
        .collect()
}

/// Identities of fds 0, 1 and 2 of another process (`checkpoint --pid`) that cannot
/// be reopened (a terminal, a pipe or socket from outside: bound to the restart's own
/// streams), and of those that are regular files (`nohup ./sim >out.log`: reopened at
/// their offsets like any file, or bound with `restart --stdio inherit`).
pub fn stdio_ids_of(proc: &ProcDir) -> (StdioIds, StdioIds) {
    let all: Vec<(u8, std::fs::Metadata)> = (0..3u8)
        .filter_map(|i| Some((i, std::fs::metadata(proc.file(&format!("fd/{i}"))).ok()?)))
        .collect();
    let ids = |files: bool| {
        all.iter()
            .filter(|(_, m)| m.is_file() == files)
            .map(|(i, m)| (*i, m.dev(), m.ino()))
            .collect()
    };
    (ids(false), ids(true))
}

/// The standard streams of `meta`'s processes saved as files (from a `--pid` image),
/// as they are on disk now: what the next checkpoint keeps marked.
pub fn stdio_files_of(meta: &stasis_image::Checkpoint) -> StdioIds {
    let mut out: StdioIds = Vec::new();
    for f in meta.processes.iter().flat_map(|p| &p.fds) {
        if let FdKind::File {
            file,
            stdio: Some(index),
            ..
        } = &f.kind
        {
            if let Ok(m) = std::fs::metadata(&file.path) {
                if !out.iter().any(|s| s.1 == m.dev() && s.2 == m.ino()) {
                    out.push((*index, m.dev(), m.ino()));
                }
            }
        }
    }
    out
}

/// The standard streams a `--pid` image reopens as files, that cannot be reopened
/// now (removed, or not writable by the restarting user): bound to the restart's own
/// streams instead. Returns a warning for each.
pub fn inherit_unopenable_stdio(meta: &mut stasis_image::Checkpoint) -> Vec<String> {
    let mut warnings = Vec::new();
    for p in &mut meta.processes {
        for f in &mut p.fds {
            let FdKind::File {
                file,
                flags,
                stdio: Some(index),
                ..
            } = &f.kind
            else {
                continue;
            };
            let index = *index;
            let mut o = std::fs::OpenOptions::new();
            match flags & libc::O_ACCMODE {
                libc::O_WRONLY => o.write(true),
                libc::O_RDWR => o.read(true).write(true),
                _ => o.read(true),
            };
            if let Err(e) = o.open(&file.path) {
                warnings.push(format!(
                    "process {}: fd {} ({}) cannot be reopened ({e}): it gets the restart's own standard stream {index}",
                    p.pid, f.fd, file.path
                ));
                f.kind = FdKind::Stdio { index };
            }
        }
    }
    warnings
}

/// `stasis restart --stdio inherit`: the standard streams a `--pid` image reopens as
/// files are bound to the restart's own streams instead.
pub fn inherit_stdio(meta: &mut stasis_image::Checkpoint) {
    for p in &mut meta.processes {
        for f in &mut p.fds {
            if let FdKind::File {
                stdio: Some(index), ..
            } = f.kind
            {
                f.kind = FdKind::Stdio { index };
            }
        }
    }
}
