//! The checkpoint directory itself: created with mode 0700, locked with flock(2) by
//! whoever writes or prunes, its checkpoints listed, pruned and named.

use super::*;
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;

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

pub(super) fn fsync_dir(dir: &Path) -> ImageResult<()> {
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

pub(super) fn remove_stale_tmp(root: &Path) -> ImageResult<Vec<PathBuf>> {
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
