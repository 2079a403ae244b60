//! A checkpointed process's pages (the dump's `Part`): planned from its snapshot (or
//! the frozen process), written into the page files by the snapshot itself or copied
//! from outside, checked and hashed by one thread per part file, compared with the
//! previous checkpoint's, and recorded (page runs, hashes) once the process runs on.

use crate::error::{Error, Result};
use crate::memory;
use crate::proc::ProcDir;
use crate::snapshot::{PartFiles, Snapshot, WriteProgress};
use stasis_image::{CheckpointWriter, Compression, PageFiles, Process};
use std::collections::HashMap;
use std::time::Instant;

/// One process's state, read while frozen; its pages are written by `write_pages`.
pub(crate) struct Part {
    pub(crate) process: Process,
    pub(crate) layout: Vec<memory::Vma>,
    pub(crate) plan: memory::Plan,
    /// The plan (but for `hidden_plan`) is made from the snapshot's pagemap.
    pub(crate) plan_later: bool,
    /// Pages written since the previous checkpoint (dirty tracking), if known.
    pub(crate) written: Option<Vec<(u64, u64)>>,
    pub(crate) hidden_plan: memory::Plan,
    pub(crate) hidden_index: Vec<usize>,
    pub(crate) hidden_buf: Vec<u8>,
    pub(crate) snapshot: Option<Snapshot>,
    /// Time taken to fork the snapshot.
    pub(crate) snapshot_us: u64,
    /// The plan knows which pages were written since the previous checkpoint.
    pub(crate) tracked: bool,
    /// The layout's flags were read before the freeze (to be checked on the snapshot,
    /// or on the process once it runs again).
    pub(crate) early_flags: bool,
    /// The layout has no flags yet: they come from the snapshot's smaps.
    pub(crate) late_flags: bool,
    /// The layout's flags were read from smaps while the process was frozen.
    pub(crate) exact_flags: bool,
    /// The process's flags, read while its pages are copied while frozen.
    pub(crate) frozen_flags: Option<FlagsJob>,
    /// A snapshot could have been taken, but the pages written since the previous
    /// checkpoint were copied while frozen (see `snapshot::worth_taking`).
    pub(crate) frozen_copy: bool,
    /// /proc/PID/mem of a process that is not dumpable, opened while it was made
    /// dumpable for the checkpoint (its pages are copied afterwards).
    pub(crate) mem: Option<std::fs::File>,
    /// Dirty tracking registered mappings the layout's flags do not show as such.
    pub(crate) fresh_registrations: bool,
    /// A `syscall` instruction of the process (and of its snapshot).
    pub(crate) insn: u64,
    /// Its children stopped by job control, and whether it has collected their stops.
    pub(crate) child_waits: Vec<(i32, bool)>,
}

impl Part {
    /// Writes the pages (from the snapshot if there is one, else from the frozen
    /// process). What is left to do once the process may run again is in the result.
    pub(crate) fn write_pages(
        mut self,
        writer: &mut CheckpointWriter,
        prev: Option<&memory::PrevPages>,
        compress: Compression,
    ) -> Result<Copied> {
        let pid = self.process.pid;
        let mut steps = Steps::new();
        let t0 = Instant::now();
        self.plan_from_snapshot()?;
        steps.done("pagemap");
        let part_size = memory::part_size(self.plan.bytes);
        let mut files = PageFiles::new(&format!("pages-{pid}"), self.plan.bytes, part_size);
        files.compression = compress;
        let mut plain = Vec::new();
        let mut packed = Vec::new();
        for (k, name) in files.parts.iter().enumerate() {
            let (lo, hi) = files.range(k, self.plan.bytes);
            if compress == Compression::None {
                plain.push(writer.positioned_file(name, hi - lo)?);
            } else {
                packed.push(writer.data_file(name)?);
            }
        }
        let hidden_plan = std::mem::take(&mut self.hidden_plan);
        let hidden_index = std::mem::take(&mut self.hidden_index);
        let hidden_buf = std::mem::take(&mut self.hidden_buf);
        let prefetched = prefetched_runs(&hidden_plan, &hidden_index, &hidden_buf);
        let (src, how) = match &self.snapshot {
            Some(s) => (s.pid, memory::Source::Snapshot),
            None => (pid, memory::Source::Process),
        };
        // The flags: read while a frozen copy runs, or on the snapshot (see
        // Part::flags_job).
        let mut flags_job = self.frozen_flags.take();
        // From a snapshot, the snapshot itself writes what it can (one copy); the
        // rest (unreadable areas, what a fork does not see) is copied from outside.
        // Not when compressing (we must see the data), nor when unchanged pages are
        // found by comparing hashes (we must read them all, and store few).
        let snapshot_writes = compress == Compression::None && (prev.is_none() || self.tracked);
        let mut done = None;
        if snapshot_writes && self.snapshot.is_some() {
            let copied_outside: std::collections::HashSet<usize> =
                hidden_index.iter().copied().collect();
            done = self.write_by_snapshot(
                &plain,
                part_size,
                (&prefetched, &copied_outside),
                prev,
                &mut flags_job,
            )?;
            steps.done("written by the snapshot");
        }
        if flags_job.is_none() {
            flags_job = self.flags_job();
        }
        let one_copy = done.is_some();
        let (zeros, per_part) = match done {
            Some(d) => d,
            None => {
                let outs: Vec<memory::PartOut> = if compress == Compression::None {
                    plain.iter().map(memory::PartOut::Plain).collect()
                } else {
                    packed
                        .iter_mut()
                        .map(|w| memory::PartOut::Compressed(w, compress))
                        .collect()
                };
                memory::write_pages(
                    src,
                    how,
                    &self.plan,
                    &prefetched,
                    outs,
                    part_size,
                    prev,
                    &|_| false,
                    None,
                    self.mem.as_ref(),
                )
                .map_err(|e| blame(e, pid, self.snapshot.as_ref().map(|s| s.pid)))?
            }
        };
        steps.done("checked and completed");
        let checked = match flags_job {
            Some(job) => {
                if let Some(flags) = join_flag_check(job, pid)? {
                    memory::fill_flags(&ProcDir::new(pid), &flags, &mut self.layout)?;
                }
                true
            }
            None => self.exact_flags,
        };
        // Exact flags serve the next checkpoint (see memory::remembered_flags), unless
        // they lack the registrations dirty tracking made since they were read.
        if checked {
            if self.fresh_registrations {
                memory::forget_flags(pid);
            } else {
                memory::remember_flags(pid, &self.layout);
            }
        }
        steps.done("flags checked");
        drop(prefetched);
        drop(hidden_buf);
        // Its pages are saved: it dies now, and is reaped once the checkpoint is
        // published (tearing down a large address space takes a while).
        let snapshot = self.snapshot.take();
        if let Some(s) = &snapshot {
            s.kill();
        }
        steps.done("killed");
        if self.frozen_copy {
            let ns = t0.elapsed().as_nanos() as u64;
            crate::snapshot::note_frozen_copy(pid, self.plan.bytes, ns);
        }
        tracing::debug!("process {pid} pages: {}", steps.report());
        Ok(Copied {
            frozen_copy: self.frozen_copy,
            process: self.process,
            layout: self.layout,
            plan: self.plan,
            files,
            states: zeros,
            per_part,
            plain,
            packed,
            one_copy,
            snapshot,
        })
    }

    /// With a snapshot, plans its pages from its own pagemap, after the runs of what
    /// a fork does not see (planned while frozen).
    pub(crate) fn plan_from_snapshot(&mut self) -> Result<()> {
        if !self.plan_later {
            return Ok(());
        }
        let pid = self.process.pid;
        let snap = self.snapshot.as_ref().ok_or(Error::Gone { pid })?;
        let mut plan = memory::plan(
            &ProcDir::new(snap.pid),
            &self.layout,
            self.written.as_deref(),
            |v| !memory::invisible_to_fork(v),
        )
        .map_err(|e| blame(e, pid, Some(snap.pid)))?;
        self.hidden_index = memory::append(&mut plan, &self.hidden_plan);
        self.plan = plan;
        Ok(())
    }

    /// The snapshot's flags, read on a thread (smaps is slow): to fill in a layout
    /// read without them (late_flags), or to check those read before the freeze
    /// against. None without a snapshot, or when nothing is to be read.
    pub(crate) fn flags_job(&self) -> Option<FlagsJob> {
        let snap = self.snapshot.as_ref()?;
        let (late, layout) = self.flags_spec()?;
        Some(snapshot_flags_job(snap.pid, late, layout))
    }

    /// What the snapshot's flag job does (see [`snapshot_flags_job`]), if any.
    pub(crate) fn flags_spec(&self) -> Option<(bool, Vec<memory::Vma>)> {
        (self.early_flags || self.late_flags).then(|| (self.late_flags, self.layout.clone()))
    }

    /// The snapshot writes the runs it can while one thread per part follows it,
    /// reading back, hashing and completing what it has written. None when the
    /// snapshot could not write them (the parts are emptied again: the caller copies
    /// the pages itself). Starts the snapshot's flag job once its writers are set up
    /// (reading smaps holds the snapshot's memory map lock, which their setup needs).
    pub(crate) fn write_by_snapshot(
        &mut self,
        plain: &[stasis_image::PositionedFile],
        part_size: u64,
        (prefetched, copied_outside): (&HashMap<usize, &[u8]>, &std::collections::HashSet<usize>),
        prev: Option<&memory::PrevPages>,
        flags_job: &mut Option<FlagsJob>,
    ) -> Result<Option<(memory::ZeroMap, Vec<memory::PartDone>)>> {
        let pid = self.process.pid;
        let job_spec = self.flags_spec();
        let Some(snap) = self.snapshot.as_mut() else {
            return Ok(None);
        };
        let part_files = PartFiles {
            files: plain
                .iter()
                .map(|p| (p.path().to_path_buf(), p.file()))
                .collect(),
            size: part_size,
        };
        let mut in_file = vec![false; self.plan.runs.len()];
        let writes = Snapshot::plan_writes(
            &self.plan,
            part_size,
            |i, r| !r.clean && !r.forced && !copied_outside.contains(&i),
            &mut in_file,
        );
        let progress = WriteProgress::new(plain.len());
        let (plan, chosen, src) = (&self.plan, &in_file, snap.pid);
        let (written, checked) = std::thread::scope(|sc| {
            let checker = sc.spawn(|| {
                memory::write_pages(
                    src,
                    memory::Source::Snapshot,
                    plan,
                    prefetched,
                    plain.iter().map(memory::PartOut::Plain).collect(),
                    part_size,
                    prev,
                    &|i| chosen.get(i).copied().unwrap_or(false),
                    Some(&progress),
                    None,
                )
            });
            let ready = || {
                if let Some((late, layout)) = job_spec {
                    *flags_job = Some(snapshot_flags_job(src, late, layout));
                }
            };
            // Should the writing panic, the checker must not wait for it forever (the
            // scope joins it before the panic goes on).
            let _end = EndOnPanic(&progress);
            let written = snap.write(self.insn, writes, &part_files, &progress, ready);
            progress.end(matches!(written, Ok(true)));
            let checked = checker.join().unwrap_or_else(|_| {
                Err(Error::Restore {
                    pid,
                    msg: "a page checking thread panicked".into(),
                })
            });
            (written, checked)
        });
        if written.map_err(|e| blame(e, pid, Some(src)))? {
            Ok(Some(checked.map_err(|e| blame(e, pid, Some(src)))?))
        } else {
            part_files.empty(pid)?;
            Ok(None)
        }
    }
}

/// Ends a snapshot's write progress as failed when dropped by a panic: the threads
/// following it give up instead of waiting forever.
pub(crate) struct EndOnPanic<'a>(&'a WriteProgress);

impl Drop for EndOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.end(false);
        }
    }
}

/// The runs copied while frozen (what a fork does not see: `hidden` planned into
/// `buf`, its runs at `index` in the whole plan), by run index.
pub(crate) fn prefetched_runs<'a>(
    hidden: &memory::Plan,
    index: &[usize],
    buf: &'a [u8],
) -> HashMap<usize, &'a [u8]> {
    let mut out = HashMap::new();
    for (sub_i, r) in hidden.runs.iter().enumerate() {
        let (at, len) = (r.offset as usize, r.file_len() as usize);
        if let (Some(&i), Some(data)) = (index.get(sub_i), buf.get(at..at + len)) {
            if !r.clean {
                out.insert(i, data);
            }
        }
    }
    out
}

/// A thread reading a process's mapping flags: Some (the flags) to fill a layout
/// in with, None when it only checked them.
pub(crate) type FlagsJob = std::thread::JoinHandle<Result<Option<memory::FlagCache>>>;

/// Reads the flags of snapshot `snap`: returns them (`late`: the layout has none), or
/// checks `layout`'s against them.
pub(crate) fn snapshot_flags_job(snap: i32, late: bool, layout: Vec<memory::Vma>) -> FlagsJob {
    std::thread::spawn(move || {
        let snap = ProcDir::new(snap);
        if late {
            memory::read_flags(&snap).map(Some)
        } else {
            memory::check_flags(&snap, &layout).map(|()| None)
        }
    })
}

/// A process whose pages are copied: the page files still to complete, and its
/// record (its page runs, the page-hash file), work that needs no frozen process.
pub(crate) struct Copied {
    pub(crate) process: Process,
    pub(crate) layout: Vec<memory::Vma>,
    pub(crate) plan: memory::Plan,
    pub(crate) files: PageFiles,
    pub(crate) states: memory::ZeroMap,
    pub(crate) per_part: Vec<memory::PartDone>,
    pub(crate) plain: Vec<stasis_image::PositionedFile>,
    pub(crate) packed: Vec<stasis_image::DataWriter>,
    /// Pages were written by the snapshot itself.
    pub(crate) one_copy: bool,
    /// The killed snapshot, to reap once the checkpoint is published.
    pub(crate) snapshot: Option<Snapshot>,
    /// Copied while frozen instead of from a snapshot (few pages written).
    pub(crate) frozen_copy: bool,
}

impl Copied {
    /// Completes the page files and the process's record. Returns it and the bytes
    /// of pages stored.
    pub(crate) fn finish(
        mut self,
        writer: &mut CheckpointWriter,
        prev: Option<&memory::PrevPages>,
    ) -> Result<Finished> {
        let pid = self.process.pid;
        let mut steps = Steps::new();
        for (part, done) in self.plain.into_iter().zip(&self.per_part) {
            writer.finish_positioned(part, done.sums.clone(), true)?;
        }
        for w in self.packed {
            writer.finish_data(w)?;
        }
        if self.files.compression != Compression::None {
            self.files.frames = self.per_part.iter().map(|d| d.frames.clone()).collect();
        }
        steps.done("parts finished");
        let (mappings, bytes) = memory::finish_pages(&self.layout, &self.plan, &self.states, prev);
        steps.done("runs");
        // The hash of every page of the page file, in its order: each part's.
        let name = format!("page-hashes-{pid}.bin");
        let mut w = writer.data_file(&name)?;
        let mut failed = Ok(());
        for d in &self.per_part {
            stasis_image::PageHashes::encode_into(&d.hashes, &mut |b| {
                if failed.is_ok() {
                    failed = w.write_all(b);
                }
            });
        }
        failed?;
        writer.finish_data(w)?;
        steps.done("hashes");
        // The page runs (many when scattered pages changed) go to a binary file, not
        // into the JSON.
        let mut mappings = mappings;
        let mut sources: Vec<u64> = mappings
            .iter()
            .flat_map(|m| m.pages.iter().map(|r| r.from))
            .filter(|&f| f != 0)
            .collect();
        sources.sort_unstable();
        sources.dedup();
        let runs_name = format!("runs-{pid}.bin");
        let mut w = writer.data_file(&runs_name)?;
        w.write_all(&stasis_image::PageRun::encode_all(
            mappings.iter().flat_map(|m| m.pages.iter()),
        ))?;
        writer.finish_data(w)?;
        for m in &mut mappings {
            m.pages = Vec::new();
        }
        steps.done("runs file");
        self.process.pages = self.files;
        self.process.page_hashes = Some(name);
        self.process.runs_file = Some(runs_name);
        self.process.mappings = mappings;
        tracing::debug!("process {pid} finished: {}", steps.report());
        Ok(Finished {
            process: self.process,
            sources,
            bytes,
            one_copy: self.one_copy,
            snapshot: self.snapshot,
        })
    }
}

/// A process's record, complete.
pub(crate) struct Finished {
    pub(crate) process: Process,
    /// The earlier checkpoints its page runs refer to.
    pub(crate) sources: Vec<u64>,
    /// Bytes of pages stored.
    pub(crate) bytes: u64,
    /// Written by its snapshot.
    pub(crate) one_copy: bool,
    /// The killed snapshot, to reap once the checkpoint is published.
    pub(crate) snapshot: Option<Snapshot>,
}

/// Waits for a mapping flag check (see `memory::check_flags`) of process `pid`, or
/// for the flags read from its snapshot.
pub(crate) fn join_flag_check<T>(check: std::thread::JoinHandle<Result<T>>, pid: i32) -> Result<T> {
    let r = check.join().unwrap_or_else(|_| {
        Err(Error::Restore {
            pid,
            msg: "the mapping flag check panicked".into(),
        })
    });
    r.map_err(|e| name_process(e, pid))
}

/// An error of the page writer of process `pid`: when its snapshot `snap` has died
/// (killed by someone), that process is gone and the checkpoint starts over; else the
/// process is named (not its snapshot).
pub(crate) fn blame(e: Error, pid: i32, snap: Option<i32>) -> Error {
    match snap {
        Some(s) if !matches!(e, Error::Fault(_)) && crate::snapshot::is_dead(s) => {
            tracing::debug!("snapshot {s} of process {pid} died ({e})");
            Error::Gone { pid: s }
        }
        _ => name_process(e, pid),
    }
}

/// Names the process (not its snapshot) in an error of the page writer.
pub(crate) fn name_process(e: Error, pid: i32) -> Error {
    match e {
        Error::Io {
            source, context, ..
        } => Error::Io {
            pid,
            context,
            source,
        },
        Error::Sys {
            source, context, ..
        } => Error::Sys {
            pid,
            context,
            source,
        },
        Error::Transient { what, .. } => Error::Transient { pid, what },
        e => e,
    }
}

/// Time taken by each step of a dump, for the debug log.
pub(crate) struct Steps {
    pub(crate) last: Instant,
    pub(crate) steps: Vec<(&'static str, std::time::Duration)>,
}

impl Steps {
    pub(crate) fn new() -> Steps {
        Steps {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    pub(crate) fn done(&mut self, what: &'static str) {
        let now = Instant::now();
        self.steps.push((what, now - self.last));
        self.last = now;
    }

    pub(crate) fn report(&self) -> String {
        self.steps
            .iter()
            .map(|(w, d)| format!("{w} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
