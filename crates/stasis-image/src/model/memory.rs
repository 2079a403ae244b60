//! Memory in the image: mappings and their kinds, runs of saved pages, page files and
//! page hashes; shared memory objects and files deleted while open, saved once each.

use super::*;
use serde::{Deserialize, Serialize};

/// A shared memory object (shmem inode), with its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedObject {
    /// Identifier the mappings refer to (the inode number at checkpoint time).
    pub id: u64,
    /// memfd name, or empty.
    pub name: String,
    /// Size in bytes (the largest extent mapped).
    pub size: u64,
    /// Data file with the content (pages no process had populated are holes).
    pub data_file: String,
    /// Permission bits (st_mode & 07777), when some process held the object as an fd
    /// (older images: none, the object keeps the mode it is created with).
    #[serde(default)]
    pub mode: Option<u32>,
    /// A memfd's seals (F_GET_SEALS; F_SEAL_SEAL alone for one created without
    /// MFD_ALLOW_SEALING), when some process held it as an fd. None: created without
    /// sealing, as older images were.
    #[serde(default)]
    pub seals: Option<u32>,
    /// Set when the object is a regular file deleted while open (not a memfd or an
    /// anonymous region): it is recreated as an unnamed file (O_TMPFILE) on the
    /// filesystem it was on, with its owner and times.
    #[serde(default)]
    pub deleted: Option<DeletedFile>,
}

/// What a regular file deleted while open had besides its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedFile {
    /// The path it had (without " (deleted)"); its directory is where it is recreated
    /// (or the nearest ancestor still there).
    pub path: String,
    /// Owner and group (restored where the restarting user may), and access and
    /// modification times as (seconds, nanoseconds): known when some process held
    /// the file as an fd (a file only mapped cannot be stat'ed without privilege).
    #[serde(default)]
    pub owner: Option<(u32, u32)>,
    #[serde(default)]
    pub atime: Option<(i64, i64)>,
    #[serde(default)]
    pub mtime: Option<(i64, i64)>,
}

/// Identity of a file at checkpoint time, to detect that it changed before restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
}

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MappingKind {
    /// Anonymous memory (including `[heap]` and `[stack]`).
    Anonymous,
    /// A mapping of a regular file.
    File {
        file: FileId,
        /// Offset in the file, bytes.
        offset: u64,
    },
    /// Memory of an object with no file name left: MAP_SHARED|MAP_ANONYMOUS, a memfd,
    /// or a regular file deleted while open (also in /dev/shm). `id` is an object of
    /// `Checkpoint::shared_memory`, mapped from `offset`, MAP_SHARED or (memfds and
    /// deleted files) MAP_PRIVATE as `shared` says; a private one has its
    /// copied-on-write pages in `pages`.
    SharedMemory { id: u64, offset: u64 },
    /// An attached System V shared memory segment (`Checkpoint::sysv`).
    SysvShm { shmid: i32 },
    /// `[vdso]`: placed by the kernel, moved into place at restore.
    Vdso,
    /// `[vvar]`.
    Vvar,
    /// `[vvar_vclock]`.
    VvarVclock,
    /// `[vsyscall]`: fixed by the kernel, nothing to do.
    Vsyscall,
}

/// One memory mapping (one line of `/proc/PID/maps`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits.
    pub prot: u32,
    /// MAP_SHARED (true) or MAP_PRIVATE (false).
    pub shared: bool,
    pub kind: MappingKind,
    /// The name column of `/proc/PID/maps` (`[heap]`, `[stack]`, a path, or empty).
    pub name: String,
    /// VM_GROWSDOWN (`gd` in smaps VmFlags): the stack grows into the gap below.
    #[serde(default)]
    pub growsdown: bool,
    /// madvise(2) advice to re-apply: `dontfork`, `wipeonfork`, `dontdump`,
    /// `hugepage`, `nohugepage`.
    #[serde(default)]
    pub advice: Vec<String>,
    /// Saved pages: runs of consecutive pages and where they are in the page file.
    /// Stored in the process's `runs_file` (not in the JSON) by this release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageRun>,
    /// For a small shared file mapping: the data file holding the file's content at
    /// checkpoint time, used to recreate the file if it is missing at restore (e.g. the
    /// JVM's /tmp/hsperfdata_USER/PID on another node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_file: Option<String>,
}

impl Mapping {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range (never produced by the kernel).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Number of saved pages.
    pub fn saved_pages(&self) -> u64 {
        self.pages.iter().map(|r| r.npages).sum()
    }
}

/// A run of consecutive saved pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Virtual address of the first page.
    pub addr: u64,
    /// Number of pages.
    pub npages: u64,
    /// Byte offset of the first page in the page file (page-aligned).
    pub offset: u64,
    /// Sequence number of the (earlier) checkpoint whose page file holds these pages,
    /// for an incremental checkpoint; 0: this checkpoint.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub from: u64,
}

impl PageRun {
    /// Size of one encoded run.
    pub const SIZE: usize = 32;

    /// Encodes runs, little-endian: addr, npages, offset, from (8 bytes each).
    pub fn encode_all<'a>(runs: impl IntoIterator<Item = &'a PageRun>) -> Vec<u8> {
        let mut out = Vec::new();
        for r in runs {
            for v in [r.addr, r.npages, r.offset, r.from] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a runs file; None when its size is not a whole number of runs.
    pub fn decode_all(b: &[u8]) -> Option<Vec<PageRun>> {
        if !b.len().is_multiple_of(Self::SIZE) {
            return None;
        }
        let u = |c: &[u8], k: usize| {
            u64::from_le_bytes(c[k * 8..k * 8 + 8].try_into().unwrap_or_default())
        };
        Some(
            b.chunks_exact(Self::SIZE)
                .map(|c| PageRun {
                    addr: u(c, 0),
                    npages: u(c, 1),
                    offset: u(c, 2),
                    from: u(c, 3),
                })
                .collect(),
        )
    }
}

/// A `page-hashes-PID.bin` file: the xxh3-128 hash of each page of a checkpoint's
/// (logical) page file, in page-file order, 16 bytes little-endian (low half first)
/// per page. Pages that are holes (zero, or referred to in an earlier checkpoint)
/// have the hash of a zero page. Its size grows with the pages the checkpoint stores,
/// not with the process.
pub struct PageHashes;

impl PageHashes {
    /// Size of one encoded hash.
    pub const SIZE: usize = 16;

    /// Encodes hashes, in page-file order.
    pub fn encode(hashes: &[u128]) -> Vec<u8> {
        let mut out = Vec::with_capacity(hashes.len() * Self::SIZE);
        for h in hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        out
    }

    /// Appends the encoding of `hashes` to `out` without a copy per hash where the
    /// machine is little-endian (the encoding is then the memory layout).
    pub fn encode_into(hashes: &[u128], out: &mut impl FnMut(&[u8])) {
        if cfg!(target_endian = "little") {
            // SAFETY: u128 has no padding and every byte pattern is a valid u8; the
            // slice covers exactly the memory of `hashes`, which outlives it.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    hashes.as_ptr().cast::<u8>(),
                    std::mem::size_of_val(hashes),
                )
            };
            out(bytes);
        } else {
            for chunk in hashes.chunks(4096) {
                out(&Self::encode(chunk));
            }
        }
    }

    /// Decodes a file (a trailing partial record is ignored).
    pub fn decode(b: &[u8]) -> Vec<u128> {
        b.chunks_exact(Self::SIZE)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect()
    }
}

/// Where a process's saved pages are: one logical page file (the `offset` of every
/// [`PageRun`]) stored as consecutive part files, so that each part can be written by
/// its own thread without contending for one file's lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageFiles {
    /// Logical bytes in all.
    #[serde(default)]
    pub bytes: u64,
    /// Logical bytes each part holds; every part but the last is exactly this long.
    pub part_size: u64,
    /// Names of the part files, in logical order.
    pub parts: Vec<String>,
    /// How the parts are compressed (see [`crate::codec`]).
    #[serde(default)]
    pub compression: crate::Compression,
    /// Compressed parts only: for each part, the end offset of each of its frames
    /// (one frame per CHUNK_SIZE logical bytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<Vec<u64>>,
}

impl PageFiles {
    /// Parts of `part_size` bytes covering `total` bytes, named `{stem}.{k}.img`.
    pub fn new(stem: &str, total: u64, part_size: u64) -> PageFiles {
        let part_size = part_size.max(1);
        let n = total.div_ceil(part_size).max(1);
        PageFiles {
            bytes: total,
            part_size,
            parts: (0..n).map(|k| format!("{stem}.{k}.img")).collect(),
            compression: crate::Compression::None,
            frames: Vec::new(),
        }
    }

    /// Logical range `[start, end)` of part `k`, for a logical file of `total` bytes.
    pub fn range(&self, k: usize, total: u64) -> (u64, u64) {
        let start = (k as u64 * self.part_size).min(total);
        (start, (start + self.part_size).min(total))
    }
}
