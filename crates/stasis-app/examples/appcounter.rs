//! A counter using the stasis application interface, the Rust twin of stasis's test
//! program progs/appapi.c (stasis's tests/appapi.rs runs it under stasis).
//!
//! Prints `ready pid=P`, then `tick N H` every 20 ms (H a hash of 0..N kept in
//! memory). Its pre-checkpoint hook (slow: 100 ms) prints `pre n=K` (K hooks so
//! far), its post-restart hook `post n=K pre=J phase=P` (K restarts, J
//! pre-checkpoint hooks so far, P the STASIS_TEST_PHASE of the stasis that
//! restarted it, read with `stasis_app::getenv`). A file `self-ckpt` in the current directory makes it ask
//! for a checkpoint: `self r=continued|restarted tick=N pre=J post=K`. A file `ping`
//! is answered `pong`. At a file `go` it prints `stats pre=J post=K` and
//! `OK ticks=N hash=H`.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const FNV_OFFSET: u64 = 0xcbf29ce484222325;
const FNV_PRIME: u64 = 0x100000001b3;

static PRE: AtomicU32 = AtomicU32::new(0);
static POST: AtomicU32 = AtomicU32::new(0);

/// One line on stdout in one write (the hooks print from another thread).
fn say(line: String) {
    use std::io::Write;
    let _ = std::io::stdout()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}

/// Removes `name` if it exists; true if it did.
fn take_file(name: &str) -> bool {
    Path::new(name).exists() && std::fs::remove_file(name).is_ok()
}

fn main() {
    if !stasis_app::available() {
        say("FAIL not under stasis or its interface is unreachable".into());
        std::process::exit(1);
    }
    let hooks = stasis_app::set_hooks(
        Some(Box::new(|| {
            // Slow: a checkpoint that did not wait for the hook shows in the count.
            std::thread::sleep(Duration::from_millis(100));
            let n = PRE.fetch_add(1, Ordering::SeqCst) + 1;
            say(format!("pre n={n}"));
        })),
        Some(Box::new(|| {
            let n = POST.fetch_add(1, Ordering::SeqCst) + 1;
            let phase = match stasis_app::getenv("STASIS_TEST_PHASE") {
                Ok(Some(p)) => p.to_string_lossy().into_owned(),
                Ok(None) => "unset".into(),
                Err(e) => format!("error:{e}"),
            };
            say(format!(
                "post n={n} pre={} phase={phase}",
                PRE.load(Ordering::SeqCst)
            ));
        })),
    );
    if let Err(e) = hooks {
        say(format!("FAIL set_hooks: {e}"));
        std::process::exit(1);
    }
    say(format!("ready pid={}", std::process::id()));
    let (mut h, mut n) = (FNV_OFFSET, 0u64);
    while !Path::new("go").exists() {
        h = (h ^ n).wrapping_mul(FNV_PRIME);
        say(format!("tick {n} {h:016x}"));
        n += 1;
        if take_file("ping") {
            say("pong".into());
        }
        if take_file("self-ckpt") {
            let r = match stasis_app::checkpoint() {
                Ok(stasis_app::Resumed::Continued) => "continued".to_string(),
                Ok(stasis_app::Resumed::Restarted) => "restarted".to_string(),
                Err(e) => format!("error:{e}"),
            };
            say(format!(
                "self r={r} tick={n} pre={} post={}",
                PRE.load(Ordering::SeqCst),
                POST.load(Ordering::SeqCst)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut h2 = FNV_OFFSET;
    for i in 0..n {
        h2 = (h2 ^ i).wrapping_mul(FNV_PRIME);
    }
    if h2 != h {
        say(format!(
            "FAIL hash in memory {h:016x} != recomputed {h2:016x}"
        ));
        std::process::exit(1);
    }
    say(format!(
        "stats pre={} post={}",
        PRE.load(Ordering::SeqCst),
        POST.load(Ordering::SeqCst)
    ));
    say(format!("OK ticks={n} hash={h:016x}"));
}
