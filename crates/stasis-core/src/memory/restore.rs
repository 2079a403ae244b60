//! Restore of mappings (through [`Injector`]).
//!
//! Each mapping is recreated at its address with `mmap(MAP_FIXED_NOREPLACE)` in the
//! stopped process (file mappings from the descriptors in [`MapFds`]), writable where
//! saved pages go; the pages are then copied in parallel with `process_vm_writev`
//! straight from the mapped page file ([`PageSource`], decompressing frames where
//! the part is compressed); last the final protections, madvise advice and memory
//! locks (mlock, mlock2 MLOCK_ONFAULT) are applied. The vdso/vvar block the kernel gave the new process is moved to where
//! the old one was ([`move_vdso`]).

use super::pages::*;
use super::plan::*;
use crate::error::{Error, Result, SysContext};
use crate::inject::Injector;
use stasis_image::{Compression, Mapping, MappingKind, PageRun, PAGE_SIZE};
use std::collections::HashMap;

/// Key of a shared memory object in [`MapFds::files`].
pub fn shm_key(id: u64) -> String {
    format!("shm:{id}")
}

/// Descriptors the restored process holds for the files its mappings come from, by path
/// (shared memory objects by [`shm_key`]).
pub struct MapFds {
    pub files: HashMap<String, i32>,
}

/// Recreates `mappings` (all but the kernel's special ones) in the stopped process and
/// fills their saved pages from `pages` (the mapped page file): every mapping is
/// created first (writable where pages go), the pages are copied in parallel with
/// process_vm_writev straight from the page cache, then the final protections and
/// madvise flags are applied.
pub fn restore_mappings(
    inj: &Injector,
    pid: i32,
    mappings: &[Mapping],
    fds: &MapFds,
    pages: &HashMap<u64, PageSource>,
) -> Result<()> {
    let restored: Vec<&Mapping> = mappings
        .iter()
        .filter(|m| {
            matches!(
                m.kind,
                MappingKind::Anonymous
                    | MappingKind::File { .. }
                    | MappingKind::SharedMemory { .. }
                    | MappingKind::SysvShm { .. }
            )
        })
        .collect();
    for m in &restored {
        if let MappingKind::SysvShm { shmid } = m.kind {
            let mut flags = if m.prot & libc::PROT_WRITE as u32 == 0 {
                libc::SHM_RDONLY
            } else {
                0
            };
            if m.prot & libc::PROT_EXEC as u32 != 0 {
                flags |= libc::SHM_EXEC;
            }
            let what = format!("shmat of System V segment {shmid} at {:x}", m.start);
            let got = inj.call(
                &what,
                libc::SYS_shmat,
                &[shmid as u64, m.start, flags as u64],
            )?;
            if got != m.start {
                return Err(Error::Restore {
                    pid,
                    msg: format!("{what} landed at {got:x}"),
                });
            }
            continue;
        }
        let (fd, offset) = match &m.kind {
            MappingKind::File { file, offset } => {
                let fd = *fds.files.get(&file.path).ok_or_else(|| Error::Restore {
                    pid,
                    msg: format!("no descriptor for mapped file {}", file.path),
                })?;
                (i64::from(fd), *offset)
            }
            MappingKind::SharedMemory { id, offset } => {
                let fd = *fds.files.get(&shm_key(*id)).ok_or_else(|| Error::Restore {
                    pid,
                    msg: format!("no descriptor for shared memory {id}"),
                })?;
                (i64::from(fd), *offset)
            }
            _ => (-1i64, 0u64),
        };
        let mut flags = if m.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        } | libc::MAP_FIXED_NOREPLACE;
        if fd < 0 {
            flags |= libc::MAP_ANONYMOUS;
        }
        if m.growsdown {
            flags |= libc::MAP_GROWSDOWN;
        }
        let what = format!("mmap of {:x}-{:x} {}", m.start, m.end, m.name);
        let got = inj.call(
            &what,
            libc::SYS_mmap,
            &[
                m.start,
                m.len(),
                u64::from(initial_prot(m)),
                flags as u64,
                fd as u64,
                offset,
            ],
        )?;
        if got != m.start {
            return Err(Error::Restore {
                pid,
                msg: format!("{what} landed at {got:x}"),
            });
        }
    }
    fill_pages(pid, &restored, pages)?;
    for m in &restored {
        let prot0 = initial_prot(m);
        if prot0 != m.prot {
            inj.call(
                &format!("mprotect of {:x}-{:x}", m.start, m.end),
                libc::SYS_mprotect,
                &[m.start, m.len(), u64::from(m.prot)],
            )?;
        }
        for a in &m.advice {
            let what = || format!("{a} of {:x}-{:x} {}", m.start, m.end, m.name);
            // Locks count against RLIMIT_MEMLOCK: a failure is an error.
            match a.as_str() {
                "locked" => {
                    inj.call(&what(), libc::SYS_mlock, &[m.start, m.len()])?;
                    continue;
                }
                "lockonfault" => {
                    inj.call(
                        &what(),
                        libc::SYS_mlock2,
                        &[m.start, m.len(), libc::MLOCK_ONFAULT as u64],
                    )?;
                    continue;
                }
                _ => {}
            }
            let adv = match a.as_str() {
                "dontfork" => libc::MADV_DONTFORK,
                "wipeonfork" => libc::MADV_WIPEONFORK,
                "dontdump" => libc::MADV_DONTDUMP,
                "hugepage" => libc::MADV_HUGEPAGE,
                "nohugepage" => libc::MADV_NOHUGEPAGE,
                "mergeable" => libc::MADV_MERGEABLE,
                "sequential" => libc::MADV_SEQUENTIAL,
                "random" => libc::MADV_RANDOM,
                _ => continue,
            };
            // Advice the kernel refuses (hugepage without THP, mergeable without
            // KSM: a kernel unlike the checkpoint's) is reported, not fatal.
            let r = inj.raw(libc::SYS_madvise, &[m.start, m.len(), adv as u64])?;
            if r < 0 {
                tracing::warn!(
                    "process {pid}: madvise {} failed: {}",
                    what(),
                    std::io::Error::from_raw_os_error(-r as i32)
                );
            }
        }
    }
    Ok(())
}

fn initial_prot(m: &Mapping) -> u32 {
    if m.pages.is_empty() {
        m.prot
    } else {
        m.prot | libc::PROT_WRITE as u32
    }
}

/// A checkpoint's page file as mapped for restore: its parts, in logical order.
pub struct PageSource<'a> {
    pub files: &'a stasis_image::PageFiles,
    pub parts: Vec<&'a [u8]>,
}

/// Pages to copy into the process: `len` bytes at `addr` from logical `offset` of the
/// page file of checkpoint `from`.
#[derive(Clone, Copy)]
struct RestorePiece {
    addr: u64,
    from: u64,
    offset: u64,
    len: u64,
}

/// A unit of restore work: pieces that lie in one frame of a compressed part (which
/// is decompressed once for all), or one piece of a plain part.
type Unit = Vec<RestorePiece>;

impl PageSource<'_> {
    /// Whether the parts are compressed.
    fn compressed(&self) -> bool {
        self.files.compression != Compression::None
    }

    /// Where logical `offset` lies: (part, offset in the part).
    fn locate(&self, offset: u64) -> (usize, u64) {
        let size = self.files.part_size.max(1);
        ((offset / size) as usize, offset % size)
    }

    /// The bytes a piece of a plain part refers to.
    fn plain(&self, p: &RestorePiece) -> Option<&[u8]> {
        let (k, local) = self.locate(p.offset);
        self.parts
            .get(k)?
            .get(local as usize..(local + p.len) as usize)
    }

    /// Decompresses the frame that holds logical `offset` into `out`; returns the
    /// logical offset where the frame starts.
    fn frame(&self, offset: u64, out: &mut Vec<u8>) -> std::result::Result<u64, String> {
        let (k, local) = self.locate(offset);
        let chunk = stasis_image::CHUNK_SIZE;
        let idx = (local / chunk) as usize;
        let ends = self
            .files
            .frames
            .get(k)
            .ok_or("no frame list for the part")?;
        let end = *ends.get(idx).ok_or("frame beyond the frame list")?;
        let start = if idx == 0 { 0 } else { ends[idx - 1] };
        let data = self.parts.get(k).ok_or("missing part")?;
        let frame = data
            .get(start as usize..end as usize)
            .ok_or("frame beyond the end of the part file")?;
        let part_len = self.files.range(k, self.files.bytes);
        let len = (part_len.1 - part_len.0)
            .saturating_sub(idx as u64 * chunk)
            .min(chunk);
        self.files
            .compression
            .decompress(frame, len as usize, out)
            .map_err(|e| format!("part {k}, frame {idx}: {e}"))?;
        Ok(offset - (local - idx as u64 * chunk))
    }
}

/// Copies every saved page into the stopped process, with as many threads as cores.
fn fill_pages(pid: i32, mappings: &[&Mapping], pages: &HashMap<u64, PageSource>) -> Result<()> {
    let beyond = |r: &PageRun| Error::Restore {
        pid,
        msg: format!(
            "pages of {:x} lie beyond the end of the page file (of checkpoint {})",
            r.addr, r.from
        ),
    };
    // Pieces of at most 4 MiB that never straddle a part (or a compressed frame),
    // so that the threads share the work evenly.
    let mut plain: Vec<Unit> = Vec::new();
    let mut framed: std::collections::BTreeMap<(u64, usize, u64), Unit> = Default::default();
    for m in mappings {
        for r in &m.pages {
            let src = pages.get(&r.from).ok_or_else(|| beyond(r))?;
            let limit = if src.compressed() {
                stasis_image::CHUNK_SIZE
            } else {
                BATCH_PAGES * PAGE_SIZE
            };
            let (mut done, total) = (0, r.npages * PAGE_SIZE);
            while done < total {
                let offset = r.offset + done;
                let (k, local) = src.locate(offset);
                let room = (src.files.part_size - local).min(limit - local % limit);
                let p = RestorePiece {
                    addr: r.addr + done,
                    from: r.from,
                    offset,
                    len: (total - done).min(room),
                };
                if src.compressed() {
                    framed
                        .entry((r.from, k, local / limit))
                        .or_default()
                        .push(p);
                } else {
                    src.plain(&p).ok_or_else(|| beyond(r))?;
                    plain.push(vec![p]);
                }
                done += p.len;
            }
        }
    }
    let mut work = plain;
    work.extend(framed.into_values());
    let workers = stasis_image::store::workers().min(work.len().max(1));
    let results: Vec<Result<()>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let work = &work;
                sc.spawn(move || -> Result<()> {
                    let mut buf = Vec::new();
                    for unit in work.iter().skip(w).step_by(workers) {
                        let Some(first) = unit.first() else { continue };
                        let Some(src) = pages.get(&first.from) else {
                            continue;
                        };
                        let frame_start = if src.compressed() {
                            src.frame(first.offset, &mut buf)
                                .map_err(|msg| Error::Restore {
                                    pid,
                                    msg: format!(
                                        "page file of checkpoint {} is damaged: {msg}",
                                        first.from
                                    ),
                                })?
                        } else {
                            0
                        };
                        for p in unit {
                            let data = if src.compressed() {
                                let at = (p.offset - frame_start) as usize;
                                buf.get(at..at + p.len as usize)
                            } else {
                                src.plain(p)
                            };
                            let data = data.ok_or_else(|| Error::Restore {
                                pid,
                                msg: format!("pages of {:x} lie beyond their frame", p.addr),
                            })?;
                            stasis_sys::vm::write(pid, p.addr, data).ctx(pid, || {
                                format!("writing {} bytes of memory at {:x}", data.len(), p.addr)
                            })?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        join_all(handles, pid)
    });
    results.into_iter().collect()
}

/// The kernel's special mappings of a layout: (kind, start, end).
pub fn special_areas(mappings: &[Mapping]) -> Vec<(MappingKind, u64, u64)> {
    mappings
        .iter()
        .filter(|m| {
            matches!(
                m.kind,
                MappingKind::Vdso | MappingKind::Vvar | MappingKind::VvarVclock
            )
        })
        .map(|m| (m.kind.clone(), m.start, m.end))
        .collect()
}

/// Puts the kernel's special mappings (`[vvar]`, `[vvar_vclock]`, `[vdso]`) of the
/// restored process, at `current`, where `target` (the image) says: each moved to its
/// saved address (a process may have moved them, together or apart), and those the
/// process had unmapped unmapped. `free_at` is an address with room for the current
/// block that neither layout uses (the moves go through it, so that none overlaps a
/// range still occupied).
pub fn move_vdso(
    inj: &Injector,
    pid: i32,
    current: &[(MappingKind, u64, u64)],
    target: &[(MappingKind, u64, u64)],
    free_at: u64,
) -> Result<()> {
    let mismatch = || {
        Error::Restore {
        pid,
        msg: format!(
            "the vdso of this kernel ({}) differs from the image's ({}); restoring on a different kernel is not supported yet",
            describe(current),
            describe(target)
        ),
    }
    };
    let mut moves = Vec::new();
    for t in target {
        let c = current.iter().find(|c| c.0 == t.0).ok_or_else(mismatch)?;
        if c.2 - c.1 != t.2 - t.1 {
            return Err(mismatch());
        }
        if c.1 != t.1 {
            moves.push((c.1, t.1, t.2 - t.1));
        }
    }
    for c in current
        .iter()
        .filter(|c| !target.iter().any(|t| t.0 == c.0))
    {
        inj.call(
            &format!("munmap of the {:?} the process had unmapped", c.0),
            libc::SYS_munmap,
            &[c.1, c.2 - c.1],
        )?;
    }
    let Some(cbase) = moves.iter().map(|m| m.0).min() else {
        return Ok(());
    };
    let mremap = |from: u64, to: u64, len: u64| -> Result<()> {
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        let got = inj.call(
            &format!("mremap of the vdso block {from:x} -> {to:x}"),
            libc::SYS_mremap,
            &[from, len, len, flags, to],
        )?;
        if got != to {
            return Err(Error::Restore {
                pid,
                msg: format!("vdso moved to {got:x} instead of {to:x}"),
            });
        }
        Ok(())
    };
    for &(c, _, len) in &moves {
        mremap(c, free_at + (c - cbase), len)?;
    }
    for &(c, t, len) in &moves {
        mremap(free_at + (c - cbase), t, len)?;
    }
    Ok(())
}

fn describe(areas: &[(MappingKind, u64, u64)]) -> String {
    areas
        .iter()
        .map(|(k, s, e)| format!("{k:?} {} bytes", e - s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds `len` bytes of address space that overlap none of `used` (sorted or not),
/// above `min`, page aligned, with a guard page on each side.
pub fn find_free(used: &[(u64, u64)], len: u64, min: u64) -> Option<u64> {
    let mut v: Vec<(u64, u64)> = used.to_vec();
    v.sort();
    let limit = 0x7fff_ffff_f000u64;
    let mut candidate = min;
    for (s, e) in v {
        if candidate + len + PAGE_SIZE <= s {
            return Some(candidate);
        }
        candidate = candidate.max(e + PAGE_SIZE);
    }
    (candidate + len <= limit).then_some(candidate)
}
