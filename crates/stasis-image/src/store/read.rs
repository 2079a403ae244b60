//! Reading a checkpoint: the manifest and metadata checked, every data file verified
//! against its chunk checksums before anything of it is used.

use super::*;
use std::fs::File;

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

    /// The TCP and UDP sockets of the checkpoint at `path`, from its verified metadata
    /// (without reading the rest: what a restore of another part of a global checkpoint
    /// needs to know of this one).
    pub fn read_inet_sockets(path: &Path) -> ImageResult<Vec<InetSocket>> {
        #[derive(serde::Deserialize)]
        struct Sockets {
            #[serde(default)]
            inet_sockets: Vec<InetSocket>,
        }
        let bytes = Self::read_verified(path, METADATA)?;
        let s: Sockets = serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
            path: path.join(METADATA),
            msg: e.to_string(),
        })?;
        Ok(s.inet_sockets)
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

pub(super) fn verify_file(path: &Path, entry: &FileEntry, chunk: u64) -> ImageResult<()> {
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
