//! Writing a checkpoint: its data files (written in parallel, checksummed by chunk)
//! into a temporary directory, then the manifest and metadata, synced, and published
//! by one rename.

use super::dir::{fsync_dir, remove_stale_tmp};
use super::*;
use std::fs::{File, OpenOptions};

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
