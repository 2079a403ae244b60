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

use crate::model::Checkpoint;
use crate::{CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
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

/// Creates `dir` (mode 0700) if missing, and checks that it is the caller's and not
/// writable by others.
pub fn ensure_dir(dir: &Path) -> ImageResult<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    check_trusted(dir, true)
}

fn fsync_dir(dir: &Path) -> ImageResult<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Exclusive lock on a checkpoint directory, held while writing or pruning.
pub struct DirLock {
    _file: File,
    root: PathBuf,
}

impl DirLock {
    /// Takes the lock without waiting; [`ImageError::Busy`] if someone holds it.
    pub fn acquire(root: &Path) -> ImageResult<DirLock> {
        ensure_dir(root)?;
        let path = root.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        // SAFETY: flock on a valid, owned descriptor.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(ImageError::Busy(root.to_path_buf()));
            }
            return Err(io_err(&path)(e));
        }
        Ok(DirLock {
            _file: file,
            root: root.to_path_buf(),
        })
    }

    /// Takes the lock, waiting up to `timeout` while another checkpoint holds it
    /// (`waiting` is called once if it has to); [`ImageError::Busy`] after that.
    pub fn acquire_waiting(
        root: &Path,
        timeout: std::time::Duration,
        waiting: impl FnOnce(),
    ) -> ImageResult<DirLock> {
        let deadline = std::time::Instant::now() + timeout;
        let mut waiting = Some(waiting);
        loop {
            match DirLock::acquire(root) {
                Err(ImageError::Busy(p)) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(ImageError::Busy(p));
                    }
                    if let Some(w) = waiting.take() {
                        w();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// The locked checkpoint directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Complete checkpoints of `root`, oldest first: (sequence, path).
pub fn list_checkpoints(root: &Path) -> ImageResult<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = fs::read_dir(root).map_err(io_err(root))?;
    for ent in rd {
        let ent = ent.map_err(io_err(root))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name.strip_prefix(PREFIX) {
            if let Ok(seq) = num.parse::<u64>() {
                check_trusted(&ent.path(), false)?;
                out.push((seq, ent.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes all but the newest `keep` checkpoints, and leftovers of interrupted
/// checkpoints. Needs the lock. Returns what was removed.
pub fn prune(lock: &DirLock, keep: usize) -> ImageResult<Vec<PathBuf>> {
    let root = lock.root();
    let mut removed = Vec::new();
    let all = list_checkpoints(root)?;
    let first_kept = all.len().saturating_sub(keep.max(1));
    // Keep the newest `keep` and every checkpoint an incremental one refers to.
    let mut needed: std::collections::HashSet<u64> =
        all[first_kept..].iter().map(|c| c.0).collect();
    for (_, path) in &all[first_kept..] {
        needed.extend(depends_on(path));
    }
    for (seq, path) in all {
        if needed.contains(&seq) {
            continue;
        }
        // Out of the list at once (a leftover of an interrupted removal is removed
        // with the other leftovers), then removed.
        stasis_sys::fault::kill_point("removing an old checkpoint");
        let gone = root.join(format!(".{PREFIX}{seq:06}.removed.tmp"));
        fs::rename(&path, &gone).map_err(io_err(&path))?;
        fs::remove_dir_all(&gone).map_err(io_err(&gone))?;
        removed.push(path);
    }
    removed.extend(remove_stale_tmp(root)?);
    Ok(removed)
}

/// The checkpoints a checkpoint's pages refer to (empty for a full checkpoint or
/// unreadable metadata: such a checkpoint is refused at restore anyway).
pub fn depends_on(path: &Path) -> Vec<u64> {
    #[derive(Deserialize)]
    struct Deps {
        #[serde(default)]
        depends_on: Vec<u64>,
    }
    fs::read(path.join(METADATA))
        .ok()
        .and_then(|b| serde_json::from_slice::<Deps>(&b).ok())
        .map(|d| d.depends_on)
        .unwrap_or_default()
}

/// Path of checkpoint `seq` of the directory `root`.
pub fn checkpoint_path(root: &Path, seq: u64) -> PathBuf {
    root.join(format!("{PREFIX}{seq:06}"))
}

fn remove_stale_tmp(root: &Path) -> ImageResult<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for ent in fs::read_dir(root).map_err(io_err(root))? {
        let ent = ent.map_err(io_err(root))?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".checkpoint-") && name.ends_with(".tmp") {
            let p = ent.path();
            fs::remove_dir_all(&p).map_err(io_err(&p))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// A data file being written into a checkpoint, checksummed chunk by chunk.
pub struct DataWriter {
    file: File,
    name: String,
    path: PathBuf,
    written: u64,
    hasher: Xxh3,
    chunks: Vec<String>,
}

impl DataWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Its path, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `buf`.
    pub fn write_all(&mut self, mut buf: &[u8]) -> ImageResult<()> {
        self.file.write_all(buf).map_err(io_err(&self.path))?;
        while !buf.is_empty() {
            let room = (CHUNK_SIZE - self.written % CHUNK_SIZE) as usize;
            let n = room.min(buf.len());
            self.hasher.update(&buf[..n]);
            self.written += n as u64;
            buf = &buf[n..];
            if self.written.is_multiple_of(CHUNK_SIZE) {
                self.chunks.push(hash_hex(self.hasher.digest()));
                self.hasher.reset();
            }
        }
        Ok(())
    }

    fn finish(mut self) -> ImageResult<FileEntry> {
        if !self.written.is_multiple_of(CHUNK_SIZE) {
            self.chunks.push(hash_hex(self.hasher.digest()));
        }
        self.file.sync_all().map_err(io_err(&self.path))?;
        Ok(FileEntry {
            name: self.name,
            size: self.written,
            chunks: self.chunks,
            paged: false,
        })
    }
}

/// A data file of known size written at given offsets (by several threads, with
/// pwrite); what is never written reads as zeros (a hole). The writer supplies the
/// chunk checksums.
pub struct PositionedFile {
    file: File,
    name: String,
    path: PathBuf,
    size: u64,
}

impl PositionedFile {
    /// The file, for `write_all_at`.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Extends it to `size` bytes (the new part reads as zeros).
    pub fn grow(&mut self, size: u64) -> ImageResult<()> {
        self.file.set_len(size).map_err(io_err(&self.path))?;
        self.size = size;
        Ok(())
    }
}

/// Number of threads to use for bulk work (checksums, copies).
pub fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 64)
}

/// xxh3 checksums of every CHUNK_SIZE chunk of a file of `size` bytes, read with
/// pread by several threads. (Reading rather than mapping: on tmpfs, faulting a hole
/// of a sparse image file through a mapping would allocate it.)
pub fn file_chunk_hashes(file: &File, size: u64, paged: bool) -> io::Result<Vec<String>> {
    use std::os::unix::fs::FileExt;
    let n = size.div_ceil(CHUNK_SIZE) as usize;
    let workers = workers().min(n.max(1));
    let mut out = vec![String::new(); n];
    let per = n.div_ceil(workers).max(1);
    let results: Vec<io::Result<()>> = std::thread::scope(|sc| {
        let handles: Vec<_> = out
            .chunks_mut(per)
            .enumerate()
            .map(|(w, slots)| {
                sc.spawn(move || -> io::Result<()> {
                    let mut buf = vec![0u8; CHUNK_SIZE as usize];
                    for (k, slot) in slots.iter_mut().enumerate() {
                        let start = ((w * per + k) as u64) * CHUNK_SIZE;
                        let len = CHUNK_SIZE.min(size - start) as usize;
                        file.read_exact_at(&mut buf[..len], start)?;
                        *slot = if paged {
                            let pages: Vec<u128> = buf[..len]
                                .chunks(crate::PAGE_SIZE as usize)
                                .map(page_hash)
                                .collect();
                            paged_chunk_hashes(&pages).pop().unwrap_or_default()
                        } else {
                            hash_hex(xxhash_rust::xxh3::xxh3_64(&buf[..len]))
                        };
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a checksum thread panicked")))
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(out)
}

/// A checkpoint being written aside (`.checkpoint-N.tmp`). Dropped without
/// [`CheckpointWriter::commit`], it removes what it wrote: the previous checkpoint
/// stays the newest.
pub struct CheckpointWriter {
    root: PathBuf,
    seq: u64,
    tmp: PathBuf,
    files: Vec<FileEntry>,
    committed: bool,
}

impl CheckpointWriter {
    /// Starts checkpoint number (newest + 1) in the locked directory.
    pub fn begin(lock: &DirLock) -> ImageResult<CheckpointWriter> {
        let root = lock.root().to_path_buf();
        remove_stale_tmp(&root)?;
        let seq = list_checkpoints(&root)?.last().map_or(1, |(s, _)| s + 1);
        let tmp = root.join(format!(".{PREFIX}{seq:06}.tmp"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(CheckpointWriter {
            root,
            seq,
            tmp,
            files: Vec::new(),
            committed: false,
        })
    }

    /// Sequence number this checkpoint will be published under.
    pub fn sequence(&self) -> u64 {
        self.seq
    }

    /// Creates a data file (mode 0600) in the checkpoint.
    pub fn data_file(&self, name: &str) -> ImageResult<DataWriter> {
        stasis_sys::fault::step("creating an image file")?;
        let path = self.tmp.join(name);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(DataWriter {
            file,
            name: name.to_string(),
            path,
            written: 0,
            hasher: Xxh3::new(),
            chunks: Vec::new(),
        })
    }

    /// Creates a data file of `size` bytes (mode 0600) to be written at offsets.
    pub fn positioned_file(&self, name: &str, size: u64) -> ImageResult<PositionedFile> {
        stasis_sys::fault::step("creating an image file")?;
        let path = self.tmp.join(name);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        file.set_len(size).map_err(io_err(&path))?;
        Ok(PositionedFile {
            file,
            name: name.to_string(),
            path,
            size,
        })
    }

    /// Completes a positioned file, given the checksum of each of its chunks: synced
    /// and listed in the manifest.
    /// `paged`: the checksums are those of [`paged_chunk_hashes`].
    pub fn finish_positioned(
        &mut self,
        f: PositionedFile,
        chunks: Vec<String>,
        paged: bool,
    ) -> ImageResult<()> {
        if chunks.len() as u64 != f.size.div_ceil(CHUNK_SIZE) {
            return Err(ImageError::Corrupt {
                path: f.path,
                msg: "chunk checksums do not cover the file".into(),
            });
        }
        stasis_sys::fault::step("finishing an image file")?;
        f.file.sync_all().map_err(io_err(&f.path))?;
        self.files.push(FileEntry {
            name: f.name,
            size: f.size,
            chunks,
            paged,
        });
        Ok(())
    }

    /// Completes a positioned file whose content was written piecemeal: checksummed
    /// by reading it back, synced and listed.
    pub fn finish_positioned_by_reading(&mut self, f: PositionedFile) -> ImageResult<()> {
        let chunks = if f.size == 0 {
            Vec::new()
        } else {
            file_chunk_hashes(&f.file, f.size, false).map_err(io_err(&f.path))?
        };
        self.finish_positioned(f, chunks, false)
    }

    /// Completes a data file: synced and listed in the manifest.
    pub fn finish_data(&mut self, w: DataWriter) -> ImageResult<()> {
        stasis_sys::fault::step("finishing an image file")?;
        let entry = w.finish()?;
        self.files.push(entry);
        Ok(())
    }

    /// Writes the metadata and manifest, syncs, and publishes the checkpoint by
    /// renaming it into place. Returns its path.
    pub fn commit(mut self, meta: &Checkpoint) -> ImageResult<PathBuf> {
        // Compact: an incremental checkpoint of a large process lists many page runs
        // (`stasis inspect --json` pretty-prints it).
        let json = serde_json::to_vec(meta).map_err(|e| ImageError::Corrupt {
            path: self.tmp.join(METADATA),
            msg: e.to_string(),
        })?;
        let mut w = self.data_file(METADATA)?;
        w.write_all(&json)?;
        self.finish_data(w)?;

        let manifest = Manifest {
            format: FORMAT_NAME.to_string(),
            version: FORMAT_VERSION,
            stasis_version: env!("CARGO_PKG_VERSION").to_string(),
            sequence: self.seq,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            chunk_size: CHUNK_SIZE,
            files: self.files.clone(),
        };
        let mpath = self.tmp.join(MANIFEST);
        let body = serde_json::to_string_pretty(&manifest).map_err(|e| ImageError::Corrupt {
            path: mpath.clone(),
            msg: e.to_string(),
        })?;
        let raw =
            serde_json::value::RawValue::from_string(body).map_err(|e| ImageError::Corrupt {
                path: mpath.clone(),
                msg: e.to_string(),
            })?;
        let env = Envelope {
            checksum: hash_hex(xxhash_rust::xxh3::xxh3_64(raw.get().as_bytes())),
            manifest: &raw,
        };
        let text = serde_json::to_vec(&env).map_err(|e| ImageError::Corrupt {
            path: mpath.clone(),
            msg: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&mpath)
            .map_err(io_err(&mpath))?;
        f.write_all(&text).map_err(io_err(&mpath))?;
        f.sync_all().map_err(io_err(&mpath))?;
        fsync_dir(&self.tmp)?;
        stasis_sys::fault::step("publishing the checkpoint")?;
        let fin = self.root.join(format!("{PREFIX}{:06}", self.seq));
        fs::rename(&self.tmp, &fin).map_err(io_err(&fin))?;
        self.committed = true;
        stasis_sys::fault::kill_point("checkpoint published");
        fsync_dir(&self.root)?;
        Ok(fin)
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// A verified checkpoint, ready to restore from.
pub struct CheckpointReader {
    path: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// The metadata.
    pub meta: Checkpoint,
}

impl CheckpointReader {
    /// Opens and fully verifies the newest complete checkpoint of `root`.
    pub fn open_latest(root: &Path) -> ImageResult<CheckpointReader> {
        let all = list_checkpoints(root)?;
        let (_, path) = all
            .last()
            .ok_or_else(|| ImageError::NoCheckpoint(root.to_path_buf()))?;
        Self::open(path)
    }

    /// Opens and fully verifies one checkpoint directory: the manifest's own checksum,
    /// then every file's size and every chunk's checksum.
    pub fn open(path: &Path) -> ImageResult<CheckpointReader> {
        check_trusted(path, false)?;
        let manifest = Self::read_manifest(path)?;
        for entry in &manifest.files {
            verify_file(&path.join(&entry.name), entry, manifest.chunk_size)?;
        }
        let mpath = path.join(METADATA);
        let bytes = fs::read(&mpath).map_err(io_err(&mpath))?;
        let mut meta: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
                path: mpath.clone(),
                msg: e.to_string(),
            })?;
        // Page runs kept in a binary file go back into their mappings.
        for p in &mut meta.processes {
            let Some(name) = p.runs_file.clone() else {
                continue;
            };
            if !manifest.files.iter().any(|f| f.name == name) {
                return Err(ImageError::Corrupt {
                    path: mpath.clone(),
                    msg: format!("metadata refers to {name}, which the manifest does not list"),
                });
            }
            let rpath = path.join(&name);
            let raw = fs::read(&rpath).map_err(io_err(&rpath))?;
            let corrupt = |msg: String| ImageError::Corrupt {
                path: rpath.clone(),
                msg,
            };
            let runs = crate::PageRun::decode_all(&raw)
                .ok_or_else(|| corrupt("not a whole number of page runs".into()))?;
            p.attach_runs(runs).map_err(corrupt)?;
        }
        Ok(CheckpointReader {
            path: path.to_path_buf(),
            manifest,
            meta,
        })
    }

    /// The bytes of data file `name` of the checkpoint at `path`, verified against
    /// its manifest (without verifying the other files).
    pub fn read_verified(path: &Path, name: &str) -> ImageResult<Vec<u8>> {
        let manifest = Self::read_manifest(path)?;
        let entry = manifest
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| ImageError::Corrupt {
                path: path.to_path_buf(),
                msg: format!("the manifest does not list {name}"),
            })?;
        let fpath = path.join(name);
        verify_file(&fpath, entry, manifest.chunk_size)?;
        fs::read(&fpath).map_err(io_err(&fpath))
    }

    fn read_manifest(path: &Path) -> ImageResult<Manifest> {
        let mpath = path.join(MANIFEST);
        check_trusted(&mpath, false)?;
        let text = fs::read(&mpath).map_err(io_err(&mpath))?;
        let corrupt = |msg: String| ImageError::Corrupt {
            path: mpath.clone(),
            msg,
        };
        let env: Envelope = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        let sum = hash_hex(xxhash_rust::xxh3::xxh3_64(env.manifest.get().as_bytes()));
        if sum != env.checksum {
            return Err(ImageError::Checksum {
                path: mpath.clone(),
                start: 0,
                end: text.len() as u64,
            });
        }
        let manifest: Manifest =
            serde_json::from_str(env.manifest.get()).map_err(|e| corrupt(e.to_string()))?;
        if manifest.format != FORMAT_NAME {
            return Err(corrupt(format!(
                "not a stasis image (format {:?})",
                manifest.format
            )));
        }
        if manifest.version != FORMAT_VERSION {
            return Err(ImageError::Version {
                path: mpath,
                found: manifest.version,
            });
        }
        if manifest.chunk_size == 0 || !manifest.files.iter().any(|f| f.name == METADATA) {
            return Err(corrupt("manifest lists no metadata".into()));
        }
        for f in &manifest.files {
            if f.name.contains('/') || f.name.starts_with('.') {
                return Err(corrupt(format!("bad file name {:?}", f.name)));
            }
        }
        Ok(manifest)
    }

    /// Directory of this checkpoint.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of a data file of this checkpoint (verified when opened).
    pub fn data_path(&self, name: &str) -> ImageResult<PathBuf> {
        if !self.manifest.files.iter().any(|f| f.name == name) {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                msg: format!("metadata refers to {name}, which the manifest does not list"),
            });
        }
        Ok(self.path.join(name))
    }
}

fn verify_file(path: &Path, entry: &FileEntry, chunk: u64) -> ImageResult<()> {
    check_trusted(path, false)?;
    let f = File::open(path).map_err(io_err(path))?;
    let found = f.metadata().map_err(io_err(path))?.len();
    if found != entry.size {
        return Err(ImageError::Truncated {
            path: path.to_path_buf(),
            expected: entry.size,
            found,
        });
    }
    let expected_chunks = entry.size.div_ceil(chunk);
    if entry.chunks.len() as u64 != expected_chunks || chunk != CHUNK_SIZE {
        return Err(ImageError::Corrupt {
            path: path.to_path_buf(),
            msg: "chunk list does not match the file size".into(),
        });
    }
    if entry.size == 0 {
        return Ok(());
    }
    let got = file_chunk_hashes(&f, entry.size, entry.paged).map_err(io_err(path))?;
    for (i, (g, want)) in got.iter().zip(&entry.chunks).enumerate() {
        if g != want {
            let start = i as u64 * chunk;
            return Err(ImageError::Checksum {
                path: path.to_path_buf(),
                start,
                end: (start + chunk).min(entry.size),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn meta(seq: u64) -> Checkpoint {
        Checkpoint {
            sequence: seq,
            arch: "x86_64".into(),
            kernel: "test".into(),
            page_size: 4096,
            origin: Origin::Run,
            root_pid: 2,
            processes: vec![],
            zombies: vec![],
            pipes: vec![],
            depends_on: vec![],
            shared_memory: vec![],
            sockets: vec![],
            inet_sockets: vec![],
            private_network: false,
            private_dirs: Vec::new(),
            ptys: vec![],
            sysv: Default::default(),
            timings: Timings::default(),
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("stasis-image-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    /// A property test of the image reader (issue #14): the metadata, the manifest,
    /// page runs and page hashes made of random bytes, or of a valid file with random
    /// changes, are refused or read, never a panic; a checkpoint whose files are
    /// changed at random never opens unless its bytes are intact.
    #[test]
    fn reader_never_panics_on_damaged_input() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let root = tmpdir("fuzz");
        let lock = DirLock::acquire(&root).unwrap();
        let mut w = CheckpointWriter::begin(&lock).unwrap();
        let mut d = w.data_file("runs-2.bin").unwrap();
        d.write_all(&[7u8; 96]).unwrap();
        w.finish_data(d).unwrap();
        let good = w.commit(&meta(1)).unwrap();
        let names = [MANIFEST, METADATA, "runs-2.bin"];
        let originals: Vec<Vec<u8>> = names
            .iter()
            .map(|n| fs::read(good.join(n)).unwrap())
            .collect();
        let mut opened_intact = 0;
        for round in 0..600 {
            let mut bytes: Vec<Vec<u8>> = originals.clone();
            let k = (next() % 3) as usize;
            let b = &mut bytes[k];
            match next() % 5 {
                0 => *b = (0..next() % 300).map(|_| next() as u8).collect(),
                1 if !b.is_empty() => {
                    let n = b.len();
                    b[(next() % n as u64) as usize] = next() as u8;
                }
                2 if !b.is_empty() => b.truncate((next() % b.len() as u64) as usize),
                3 => {
                    // A number in the JSON replaced by a random one.
                    if let Some(i) =
                        (0..b.len()).find(|&i| b[i].is_ascii_digit() && next() % 8 == 0)
                    {
                        let v = next().to_string();
                        b.splice(i..i + 1, v.bytes());
                    }
                }
                _ => b.extend((0..next() % 40).map(|_| next() as u8)),
            }
            for (n, content) in names.iter().zip(&bytes) {
                fs::write(good.join(n), content).unwrap();
            }
            let r = std::panic::catch_unwind(|| CheckpointReader::open(&good).is_ok());
            let ok = r.unwrap_or_else(|_| panic!("round {round}: the reader panicked"));
            if ok {
                assert_eq!(bytes, originals, "round {round}: a changed image opened");
                opened_intact += 1;
            }
            // The decoders alone, on the same bytes.
            let raw = &bytes[k];
            assert!(std::panic::catch_unwind(|| {
                let _ = crate::PageRun::decode_all(raw);
                let _ = crate::PageHashes::decode(raw);
                let _ = serde_json::from_slice::<Checkpoint>(raw);
                let _ = serde_json::from_slice::<Manifest>(raw);
            })
            .is_ok());
        }
        // Runs decoded from random bytes attached to a process never panic either.
        for _ in 0..200 {
            let raw: Vec<u8> = (0..next() % 400).map(|_| next() as u8).collect();
            if let Some(runs) = crate::PageRun::decode_all(&raw) {
                let mut p: Process = serde_json::from_value(serde_json::json!({
                    "pid": 2, "ppid": 1, "comm": "x",
                    "exe": {"path": "/x", "dev": 0, "ino": 0, "size": 0, "mtime_ns": 0},
                    "cwd": "/", "umask": 18, "personality": 0, "rlimits": [],
                    "mm": serde_json::to_value(MmFields::default()).unwrap(),
                    "mappings": [{
                        "start": 0x10000, "end": 0x90000, "prot": 3, "shared": false,
                        "kind": {"type": "anonymous"}, "name": "", "pages": []
                    }],
                    "pages": serde_json::to_value(PageFiles::default()).unwrap(),
                    "fds": [],
                    "signals": serde_json::to_value(Signals::default()).unwrap(),
                    "itimers": [], "threads": []
                }))
                .unwrap();
                assert!(std::panic::catch_unwind(move || {
                    let _ = p.attach_runs(runs);
                })
                .is_ok());
            }
        }
        eprintln!("600 damaged images: none opened but intact ones ({opened_intact})");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn write_verify_tamper_prune() {
        let root = tmpdir("wv");
        let lock = DirLock::acquire(&root).unwrap();
        assert!(matches!(DirLock::acquire(&root), Err(ImageError::Busy(_))));
        for round in 1..=3u64 {
            let mut w = CheckpointWriter::begin(&lock).unwrap();
            assert_eq!(w.sequence(), round);
            let mut d = w.data_file("pages-2.img").unwrap();
            let data: Vec<u8> = (0..(3 * CHUNK_SIZE as usize + 100))
                .map(|i| (i * 7 + round as usize) as u8)
                .collect();
            d.write_all(&data[..5000]).unwrap();
            d.write_all(&data[5000..]).unwrap();
            w.finish_data(d).unwrap();
            w.commit(&meta(round)).unwrap();
        }
        let r = CheckpointReader::open_latest(&root).unwrap();
        assert_eq!(r.meta.sequence, 3);
        let pages = r.data_path("pages-2.img").unwrap();
        let mut bytes = fs::read(&pages).unwrap();
        bytes[2 * CHUNK_SIZE as usize + 3] ^= 1;
        fs::write(&pages, &bytes).unwrap();
        assert!(matches!(
            CheckpointReader::open_latest(&root),
            Err(ImageError::Checksum { .. })
        ));
        bytes.truncate(100);
        fs::write(&pages, &bytes).unwrap();
        assert!(matches!(
            CheckpointReader::open_latest(&root),
            Err(ImageError::Truncated { .. })
        ));
        // An unfinished writer leaves nothing behind.
        drop(CheckpointWriter::begin(&lock).unwrap());
        assert_eq!(list_checkpoints(&root).unwrap().len(), 3);
        prune(&lock, 2).unwrap();
        let left: Vec<u64> = list_checkpoints(&root)
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(left, vec![2, 3]);
        // Tampered manifest.
        let m = root.join("checkpoint-000002").join(MANIFEST);
        let t = fs::read_to_string(&m)
            .unwrap()
            .replace("\"sequence\": 2", "\"sequence\": 9");
        fs::write(&m, t).unwrap();
        assert!(matches!(
            CheckpointReader::open(&root.join("checkpoint-000002")),
            Err(ImageError::Checksum { .. })
        ));
        fs::remove_dir_all(&root).unwrap();
    }
}
