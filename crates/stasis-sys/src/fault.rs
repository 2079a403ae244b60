//! Fault injection for tests: stasis killed, or failing, at a chosen step of a checkpoint.
//!
//! A checkpoint calls [`step`] at each point where it changes something (each injected
//! syscall, each thread parked or resumed, each image file created or finished, the
//! publication...). With `STASIS_FAULT_AT=N` in the environment of the process doing
//! the checkpoint, step N (counted from 1 at the start of each checkpoint, see
//! [`begin`]) SIGKILLs the process (`STASIS_FAULT_MODE=kill`, the default) or makes the
//! checkpoint fail with an error (`STASIS_FAULT_MODE=error`). `STASIS_FAULT_LOG=PATH`
//! appends one line `N what` per step to PATH (with `STASIS_FAULT_AT=0` only that: a
//! normal checkpoint, its steps counted). `stasis checkpoint DIR` passes its own
//! settings on to the `stasis run` init that does the work ([`Plan::from_env`], the
//! one place the environment is read; the init applies them to that checkpoint only).
//!
//! The same hook abandons a checkpoint whose requester went away ([`cancel`]).
//!
//! Unset, a step is one relaxed atomic load.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// What the fault at the chosen step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// SIGKILL of the process at that step.
    Kill,
    /// The step fails with an error.
    Error,
}

/// Which step faults, how, and where the steps are logged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// The step that faults (0: none, only logged).
    pub at: u64,
    pub mode: Mode,
    /// File the steps are appended to.
    pub log: Option<std::path::PathBuf>,
}

impl Plan {
    /// The plan of this process's environment (`STASIS_FAULT_AT`, `STASIS_FAULT_MODE`,
    /// `STASIS_FAULT_LOG`), if any.
    pub fn from_env() -> Option<Plan> {
        let at = std::env::var("STASIS_FAULT_AT").ok()?.trim().parse().ok()?;
        let mode = match std::env::var("STASIS_FAULT_MODE").as_deref() {
            Ok("error") => Mode::Error,
            _ => Mode::Kill,
        };
        let log = std::env::var_os("STASIS_FAULT_LOG").map(Into::into);
        Some(Plan { at, mode, log })
    }
}

/// A step made to fail by the plan, or by a cancellation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Fault {
    #[error("fault injected at step {step} ({what}) by STASIS_FAULT_AT")]
    Injected { step: u64, what: &'static str },
    #[error("abandoned at step {step} ({what}): {why}")]
    Cancelled {
        step: u64,
        what: &'static str,
        why: String,
    },
}

/// Set while a plan is installed or a cancellation is pending: the only thing a step
/// looks at otherwise.
static ARMED: AtomicBool = AtomicBool::new(false);
static COUNTER: AtomicU64 = AtomicU64::new(0);
static STATE: Mutex<State> = Mutex::new(State {
    plan: None,
    cancelled: None,
});

struct State {
    plan: Option<Plan>,
    cancelled: Option<String>,
}

fn rearm(s: &State) {
    ARMED.store(s.plan.is_some() || s.cancelled.is_some(), Ordering::Release);
}

/// Starts counting the steps of a checkpoint from 1 under `plan` (this process's
/// environment's when None is given, see [`Plan::from_env`]); clears a cancellation.
pub fn begin(plan: Option<Plan>) {
    let plan = plan.or_else(Plan::from_env);
    if let Ok(mut s) = STATE.lock() {
        s.plan = plan;
        s.cancelled = None;
        COUNTER.store(0, Ordering::SeqCst);
        rearm(&s);
    }
}

/// Ends the checkpoint's plan (later steps do nothing).
pub fn end() {
    if let Ok(mut s) = STATE.lock() {
        s.plan = None;
        s.cancelled = None;
        rearm(&s);
    }
}

/// Makes the next step fail with [`Fault::Cancelled`] saying `why`.
pub fn cancel(why: String) {
    if let Ok(mut s) = STATE.lock() {
        s.cancelled = Some(why);
        rearm(&s);
    }
}

/// One step of a checkpoint (see the module documentation): counts it, logs it, and
/// faults if it is the chosen one.
#[inline]
pub fn step(what: &'static str) -> Result<(), Fault> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    slow_step(what)
}

/// A step after which failing is no longer possible (the checkpoint is published):
/// counted, logged, and a kill there in kill mode; in error mode nothing happens.
#[inline]
pub fn kill_point(what: &'static str) {
    if ARMED.load(Ordering::Relaxed) {
        let _ = slow_step_inner(what, false);
    }
}

#[cold]
fn slow_step(what: &'static str) -> Result<(), Fault> {
    slow_step_inner(what, true)
}

fn slow_step_inner(what: &'static str, may_fail: bool) -> Result<(), Fault> {
    let Ok(s) = STATE.lock() else {
        return Ok(());
    };
    let n = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
    if let (Some(why), true) = (&s.cancelled, may_fail) {
        return Err(Fault::Cancelled {
            step: n,
            what,
            why: why.clone(),
        });
    }
    let Some(plan) = &s.plan else {
        return Ok(());
    };
    if let Some(path) = &plan.log {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{n} {what}");
        }
    }
    if plan.at != n || (plan.mode == Mode::Error && !may_fail) {
        return Ok(());
    }
    match plan.mode {
        Mode::Kill => {
            // SAFETY: kill has no memory-safety preconditions; this process dies here.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            // The signal is delivered before kill returns to user space; never reached.
            loop {
                std::thread::park();
            }
        }
        Mode::Error => Err(Fault::Injected { step: n, what }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_at_the_chosen_step_only() {
        begin(Some(Plan {
            at: 3,
            mode: Mode::Error,
            log: None,
        }));
        assert!(step("a").is_ok());
        assert!(step("b").is_ok());
        let e = step("c").unwrap_err();
        assert!(e.to_string().contains("step 3 (c)"), "{e}");
        assert!(step("d").is_ok());
        cancel("gone".into());
        assert!(matches!(step("e"), Err(Fault::Cancelled { step: 5, .. })));
        end();
        assert!(step("f").is_ok());
        assert!(!ARMED.load(Ordering::Relaxed));
    }
}
