//! The checkpoint directory: layout, atomic publication, verification, locking, pruning.
//!
//! ```text
//! DIR/
//!   .lock                  flock(2)ed by whoever writes or prunes checkpoints
//!   checkpoint-000001/     complete, verified on read
//!     manifest.json        checksummed list of the files below with their chunk checksums
//!     checkpoint.json      metadata (crate::model::Checkpoint)
//!     pages-PID.img        page data, page-aligned
//!     file-N.img           contents of files deleted while open
//!   .checkpoint-000002.tmp being written; renamed into place once complete and synced
//! ```
//!
//! Files: `dir` (the directory: creating, locking, listing, pruning), `write`
//! (writing a checkpoint and publishing it), `read` (reading and verifying one);
//! this file holds the errors, the manifest and the checksums they share.

mod dir;
mod read;
#[cfg(test)]
mod tests;
mod write;

pub use dir::{checkpoint_path, depends_on, ensure_dir, list_checkpoints, prune, DirLock};
pub use read::CheckpointReader;
pub use write::{file_chunk_hashes, workers, CheckpointWriter, DataWriter, PositionedFile};

use crate::model::{Checkpoint, InetSocket};
use crate::{CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// Errors of the image store. Each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no complete checkpoint in {0}")]
    NoCheckpoint(PathBuf),
    #[error("{path}: checksum mismatch in bytes {start}..{end}: the image is corrupt or was modified; nothing was restored")]
    Checksum { path: PathBuf, start: u64, end: u64 },
    #[error(
        "{path}: truncated: {found} bytes, the manifest says {expected}; nothing was restored"
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: corrupt image: {msg}; nothing was restored")]
    Corrupt { path: PathBuf, msg: String },
    #[error("{path}: image format version {found} is not supported (this stasis reads version {FORMAT_VERSION})")]
    Version { path: PathBuf, found: u32 },
    /// A fault injected for a test (`STASIS_FAULT_AT`), or the checkpoint was abandoned.
    #[error(transparent)]
    Fault(#[from] stasis_sys::fault::Fault),
    #[error("another checkpoint of {0} is in progress (the lock {0}/.lock is held); try again when it has finished")]
    Busy(PathBuf),
    /// A checkpoint directory or image file that someone else could have planted or
    /// changed: refused.
    #[error("{path}: {msg}; refused")]
    Untrusted { path: PathBuf, msg: String },
}

/// Checks that `path` is safe to read an image from or write one into: not a
/// symbolic link (unless `follow`: the checkpoint directory as the user named it),
/// owned by the caller (any owner for root), and, for a directory, not writable by
/// other users (who could plant files in it).
fn check_trusted(path: &Path, follow: bool) -> ImageResult<()> {
    let md = if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    }
    .map_err(io_err(path))?;
    let untrusted = |msg: String| ImageError::Untrusted {
        path: path.to_path_buf(),
        msg,
    };
    if md.file_type().is_symlink() {
        return Err(untrusted(
            "is a symbolic link, which stasis never creates in a checkpoint".into(),
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me != 0 && md.uid() != me {
        return Err(untrusted(format!(
            "belongs to uid {}, not to you (uid {me})",
            md.uid()
        )));
    }
    if md.is_dir() && md.mode() & 0o022 != 0 && md.mode() & 0o1000 == 0 {
        return Err(untrusted(format!(
            "is writable by other users (mode {:o}), who could plant files in it: `chmod go-w` it",
            md.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Result type of the store.
pub type ImageResult<T> = Result<T, ImageError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file listed in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// xxh3-64 of each CHUNK_SIZE chunk, hex, in order.
    pub chunks: Vec<String>,
    /// A page file: each chunk's checksum is the xxh3-64 of the xxh3-128 (16 bytes,
    /// little-endian) of each of its pages, so that the writer, which hashes every
    /// page anyway, reads the data once (see [`paged_chunk_hashes`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paged: bool,
}

/// Hash of a page in a paged file's checksums.
pub fn page_hash(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// Chunk checksums of a paged file from the hashes of its pages, in order.
pub fn paged_chunk_hashes(page_hashes: &[u128]) -> Vec<String> {
    let per = (CHUNK_SIZE / crate::PAGE_SIZE) as usize;
    page_hashes
        .chunks(per)
        .map(|c| {
            let mut h = Xxh3::new();
            for p in c {
                h.update(&p.to_le_bytes());
            }
            hash_hex(h.digest())
        })
        .collect()
}

/// `manifest.json` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub stasis_version: String,
    pub sequence: u64,
    pub created_unix_ms: u64,
    pub chunk_size: u64,
    pub files: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    checksum: String,
    #[serde(borrow)]
    manifest: &'a serde_json::value::RawValue,
}

const MANIFEST: &str = "manifest.json";
const METADATA: &str = "checkpoint.json";
const LOCK: &str = ".lock";
const PREFIX: &str = "checkpoint-";

fn hash_hex(h: u64) -> String {
    format!("{h:016x}")
}
