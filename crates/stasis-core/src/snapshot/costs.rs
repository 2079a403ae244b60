//! Whether a snapshot is worth forking: what a fork and a copy while frozen cost,
//! learnt per process from its checkpoints.

/// What a snapshot and a copy while frozen cost, learnt per process from its
/// checkpoints (see [`worth_taking`]).
#[derive(Debug, Clone, Copy)]
struct Costs {
    /// Nanoseconds the fork takes per MiB of the process's resident memory.
    fork_ns_per_mib: f64,
    /// Nanoseconds a copy while frozen takes per MiB copied.
    copy_ns_per_mib: f64,
}

impl Default for Costs {
    fn default() -> Costs {
        // Measured on the machines stasis is developed on: a fork copies page tables
        // at 10-20 ms per GiB; copying pages into tmpfs while frozen runs at about
        // 0.5 GB/s per core (page allocation bound), up to 8 cores.
        let cores = stasis_image::store::workers().clamp(1, 8) as f64;
        Costs {
            fork_ns_per_mib: 20_000.0,
            copy_ns_per_mib: 2_000_000.0 / cores,
        }
    }
}

static COSTS: std::sync::Mutex<std::collections::BTreeMap<i32, Costs>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Extra pause a copy while frozen may cost over a snapshot fork: the snapshot's
/// writer threads, read-back and flag check cost far more time after the pause.
const FROZEN_COPY_SLACK_NS: f64 = 2e6;

/// Whether forking a snapshot of process `pid` (`rss` bytes resident) pauses it for
/// clearly less time than copying the `dirty` bytes written since the last
/// checkpoint while it stays frozen. A copy while frozen needs no fork, no writer
/// threads and nothing read back, so it is the faster checkpoint overall; it is
/// chosen when it pauses the process at most 2 ms longer than the fork would.
pub fn worth_taking(pid: i32, rss: u64, dirty: u64) -> bool {
    let c = COSTS
        .lock()
        .ok()
        .and_then(|m| m.get(&pid).copied())
        .unwrap_or_default();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let fork = mib(rss) * c.fork_ns_per_mib;
    let copy = mib(dirty) * c.copy_ns_per_mib;
    tracing::debug!(
        "process {pid}: snapshot fork ~{:.1} ms, copy while frozen ~{:.1} ms",
        fork / 1e6,
        copy / 1e6
    );
    copy > fork + FROZEN_COPY_SLACK_NS
}

/// Records how long a snapshot fork of `pid` took (`rss` bytes resident).
pub fn note_fork(pid: i32, rss: u64, ns: u64) {
    if rss >= 64 << 20 {
        update(pid, |c| c.fork_ns_per_mib = ns as f64 / (rss >> 20) as f64);
    }
}

/// Records how long copying `bytes` of `pid` while frozen took.
pub fn note_frozen_copy(pid: i32, bytes: u64, ns: u64) {
    if bytes >= 4 << 20 {
        update(pid, |c| {
            c.copy_ns_per_mib = ns as f64 / (bytes >> 20) as f64
        });
    }
}

/// Forgets what was learnt about `pid`.
pub fn forget_costs(pid: i32) {
    if let Ok(mut m) = COSTS.lock() {
        m.remove(&pid);
    }
}

fn update(pid: i32, f: impl FnOnce(&mut Costs)) {
    if let Ok(mut m) = COSTS.lock() {
        f(m.entry(pid).or_default());
    }
}
