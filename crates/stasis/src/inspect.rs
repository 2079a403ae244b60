//! `stasis inspect`: what a checkpoint holds, for people and scripts.

use anyhow::{bail, Result};
use stasis_image::{store, CheckpointReader, FdKind, MappingKind};
use std::path::Path;
use std::process::ExitCode;

/// Prints the newest checkpoint of `dir` (or `dir` itself if it is one checkpoint).
pub fn inspect(dir: &Path, json: bool) -> Result<()> {
    let reader = if dir.join("manifest.json").exists() {
        CheckpointReader::open(dir)?
    } else {
        CheckpointReader::open_latest(dir)?
    };
    let meta = &reader.meta;
    // Printing into a closed pipe (`| head`) ends quietly, as other tools do.
    // SAFETY: restoring the default SIGPIPE disposition of this short-lived command.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if json {
        println!("{}", serde_json::to_string_pretty(meta)?);
        return Ok(());
    }
    let all = store::list_checkpoints(dir).unwrap_or_default();
    println!(
        "checkpoint   {} (verified; {} checkpoint(s) in this directory)",
        reader.path().display(),
        all.len().max(1)
    );
    println!(
        "taken on     {} kernel {}, {:?}",
        meta.arch, meta.kernel, meta.origin
    );
    let t = &meta.timings;
    println!(
        "timings      {}; {}; sync {:.1} ms; {:.1} MiB of pages",
        crate::control::pause_summary(t),
        crate::control::copy_summary(t),
        t.sync_us as f64 / 1e3,
        t.pages_bytes as f64 / (1 << 20) as f64
    );
    for o in &meta.shared_memory {
        let what = match &o.deleted {
            Some(d) => format!("deleted file {}", d.path),
            None => format!("{:?}", o.name),
        };
        println!(
            "shared mem   {} {what}: {} (saved once for all processes)",
            o.id,
            human(o.size)
        );
    }
    for z in &meta.zombies {
        println!(
            "zombie       {} (child of {}), wait status {:#x}",
            z.pid, z.ppid, z.status
        );
    }
    for p in &meta.processes {
        println!();
        println!(
            "process {} ({}), parent {}, group {}, session {}",
            p.pid, p.comm, p.ppid, p.pgid, p.sid
        );
        println!("  exe        {}", p.exe.path);
        println!("  cwd        {}", p.cwd);
        println!(
            "  umask      {:04o}   personality {:#x}",
            p.umask, p.personality
        );
        println!(
            "  threads    {}",
            p.threads
                .iter()
                .map(|t| t.tid.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let total: u64 = p.mappings.iter().map(|m| m.len()).sum();
        let saved: u64 = p.mappings.iter().map(|m| m.saved_pages()).sum::<u64>() * meta.page_size;
        println!(
            "  mappings   {} ({:.1} MiB mapped, {:.1} MiB saved)",
            p.mappings.len(),
            mib(total),
            mib(saved)
        );
        let on_disk: u64 = p
            .pages
            .parts
            .iter()
            .filter_map(|name| reader.manifest.files.iter().find(|f| &f.name == name))
            .map(|f| f.size)
            .sum();
        println!(
            "  page files {} part(s), compression {}, {:.1} MiB logical, {:.1} MiB in files",
            p.pages.parts.len(),
            p.pages.compression.name(),
            mib(p.pages.bytes),
            mib(on_disk)
        );
        for m in &p.mappings {
            let prot = format!(
                "{}{}{}{}",
                if m.prot & 1 != 0 { 'r' } else { '-' },
                if m.prot & 2 != 0 { 'w' } else { '-' },
                if m.prot & 4 != 0 { 'x' } else { '-' },
                if m.shared { 's' } else { 'p' }
            );
            let what = match &m.kind {
                MappingKind::Anonymous if m.name.is_empty() => "[anon]".to_string(),
                MappingKind::File { offset, .. } => format!("{} @{offset:#x}", m.name),
                _ => m.name.clone(),
            };
            println!(
                "    {:012x}-{:012x} {prot} {:>10} saved {:>10}  {what}",
                m.start,
                m.end,
                human(m.len()),
                human(m.saved_pages() * meta.page_size)
            );
        }
        match p.fd_table_of {
            Some(parent) => println!(
                "  fds        {} (the table of process {parent}, shared with it)",
                p.fds.len()
            ),
            None => println!("  fds        {}", p.fds.len()),
        }
        for f in &p.fds {
            let what = match &f.kind {
                FdKind::Stdio { index } => {
                    format!("stdio {index} (rebound to the restarting stasis's)")
                }
                FdKind::File {
                    file,
                    pos,
                    flags,
                    stdio,
                } => {
                    let s = stdio.map_or(String::new(), |i| {
                        format!(" (its standard stream {i}; `restart --stdio inherit` binds it to the restart's)")
                    });
                    format!("{} offset {pos} flags {flags:#o}{s}", file.path)
                }
                FdKind::Deleted {
                    path, pos, size, ..
                } => format!("{path} (deleted; {size} bytes saved) offset {pos}"),
                FdKind::Device { path, .. } => path.clone(),
                FdKind::RemovedDir { path, .. } => format!("{path} (a removed directory)"),
                FdKind::Path {
                    path,
                    object,
                    removed_dir,
                    ..
                } => {
                    let gone = if object.is_some() {
                        " (deleted)"
                    } else if removed_dir.is_some() {
                        " (a removed directory)"
                    } else {
                        ""
                    };
                    format!("{path}{gone} (O_PATH)")
                }
                FdKind::Inotify { watches, .. } => format!(
                    "inotify watching {}",
                    watches
                        .iter()
                        .map(|w| w.path.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                FdKind::Pty { pty, master, .. } => format!(
                    "pseudo-terminal {pty} ({})",
                    if *master { "master" } else { "slave" }
                ),
                FdKind::UnixSocket { sock, .. } => {
                    match meta.sockets.iter().find(|x| x.id == *sock) {
                        Some(x) => format!(
                            "UNIX socket {sock} ({}, {}{}; {} bytes queued)",
                            match x.sock_type {
                                1 => "stream",
                                2 => "datagram",
                                _ => "seqpacket",
                            },
                            x.state,
                            if x.name.is_empty() {
                                String::new()
                            } else {
                                format!(" at {}", x.name)
                            },
                            x.messages.iter().sum::<u64>()
                        ),
                        None => format!("UNIX socket {sock}"),
                    }
                }
                FdKind::InetSocket { sock, .. } => {
                    match meta.inet_sockets.iter().find(|x| x.id == *sock) {
                        Some(x) => format!(
                            "{} socket {sock} ({}, {}{}{}; {} bytes queued)",
                            x.protocol.to_uppercase(),
                            x.family,
                            x.state,
                            if x.local.is_empty() {
                                String::new()
                            } else {
                                format!(" at {}", x.local)
                            },
                            if x.remote.is_empty() {
                                String::new()
                            } else {
                                format!(" to {}", x.remote)
                            },
                            x.messages.iter().sum::<u64>()
                        ),
                        None => format!("socket {sock}"),
                    }
                }
                FdKind::AppApi { pre_checkpoint, .. } => format!(
                    "connection to the stasis application interface{} (made again on restart)",
                    if *pre_checkpoint {
                        ", pre-checkpoint hook"
                    } else {
                        ""
                    }
                ),
                FdKind::EventFd { count, .. } => format!("eventfd (count {count})"),
                FdKind::TimerFd {
                    value_ns,
                    interval_ns,
                    ..
                } => {
                    format!(
                        "timerfd ({:.3} s left, interval {:.3} s)",
                        *value_ns as f64 / 1e9,
                        *interval_ns as f64 / 1e9
                    )
                }
                FdKind::SignalFd { mask, .. } => format!("signalfd (mask {mask:#x})"),
                FdKind::Epoll { items, .. } => format!(
                    "epoll watching fds {}",
                    items
                        .iter()
                        .map(|i| match i.desc {
                            Some(_) => format!("{} (closed or reused; its file kept)", i.fd),
                            None => i.fd.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                FdKind::Pidfd { pid, .. } => format!("pidfd of process {pid}"),
                FdKind::ProcFile { path, pos, .. } => format!("{path} offset {pos}"),
                FdKind::SharedMemory { id, pos, .. } => {
                    format!("memfd (shared memory {id}) offset {pos}")
                }
                FdKind::Fifo { path, pipe, .. } => {
                    let held = meta
                        .pipes
                        .iter()
                        .find(|x| x.id == *pipe)
                        .map_or(0, |x| x.len);
                    format!("FIFO {path} ({held} bytes in flight)")
                }
                FdKind::Pipe { pipe, write, .. } => {
                    let held = meta
                        .pipes
                        .iter()
                        .find(|x| x.id == *pipe)
                        .map_or(0, |x| x.len);
                    format!(
                        "pipe {pipe} ({} end; {held} bytes in flight)",
                        if *write { "write" } else { "read" }
                    )
                }
            };
            println!(
                "    {:>4}{} {what}",
                f.fd,
                if f.cloexec { "e" } else { " " }
            );
        }
        let handled: Vec<String> = p
            .signals
            .actions
            .iter()
            .map(|a| {
                let how = match a.handler {
                    0 => "dfl".to_string(),
                    1 => "ign".to_string(),
                    h => format!("{h:#x}"),
                };
                format!("{}={how}", a.signo)
            })
            .collect();
        println!(
            "  signals    {}",
            if handled.is_empty() {
                "all default".into()
            } else {
                handled.join(" ")
            }
        );
        for t in &p.threads {
            println!(
                "  thread {}   blocked {:#x}, {} pending (+{} process-wide), rip {:#x}{}",
                t.tid,
                t.sigmask,
                t.pending.len(),
                p.signals.shared_pending.len(),
                t.regs.rip,
                if t.regs.interrupted_restartable() {
                    ", in a syscall (restarted on restore)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1}G", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1}M", mib(b))
    } else {
        format!("{}K", b / 1024)
    }
}

/// `stasis verify`: checks checkpoints without restoring them.
pub fn verify(dir: &Path, latest: bool) -> Result<ExitCode> {
    let all: Vec<(u64, std::path::PathBuf)> = if dir.join("manifest.json").exists() {
        vec![(0, dir.to_path_buf())]
    } else {
        store::list_checkpoints(dir)?
    };
    if all.is_empty() {
        bail!("no complete checkpoint in {}", dir.display());
    }
    let chosen: Vec<_> = if latest {
        all[all.len() - 1..].to_vec()
    } else {
        all
    };
    let mut newest_ok = None;
    let mut bad = 0;
    for (seq, path) in &chosen {
        let t0 = std::time::Instant::now();
        match CheckpointReader::open(path) {
            Ok(r) => {
                let bytes: u64 = r.manifest.files.iter().map(|f| f.size).sum();
                println!(
                    "ok       {} ({} files, {}, checked in {:.2} s)",
                    path.display(),
                    r.manifest.files.len(),
                    human(bytes),
                    t0.elapsed().as_secs_f64()
                );
                newest_ok = Some(*seq);
            }
            // Pruned by a checkpoint taken meanwhile (--keep): not damage.
            Err(_) if !path.exists() => {
                println!("removed  {} (pruned while it was checked)", path.display());
            }
            Err(e) => {
                bad += 1;
                println!("CORRUPT  {}: {e}", path.display());
            }
        }
    }
    if bad == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    match newest_ok {
        Some(seq) if seq > 0 => eprintln!("stasis: {bad} checkpoint(s) damaged; the newest intact one can be restarted with: stasis restart --from {seq} {}", dir.display()),
        _ => eprintln!("stasis: {bad} checkpoint(s) damaged"),
    }
    Ok(ExitCode::from(1))
}
