//! stasis under a real Slurm: a one-node cluster (munged, slurmctld, slurmd from
//! Debian's packages, started once for this test binary by scripts/slurm/start.sh,
//! every file under one scratch directory, stopped by scripts/slurm/stop.sh when the
//! binary exits, however it exits) runs batch jobs whose script is the one line of
//! docs/SLURM.md:
//!
//! ```sh
//! #SBATCH --time=2 --signal=B:USR1@80 --requeue
//! exec stasis run --checkpoint-on USR1 --requeue --dir DIR -- PROGRAM
//! ```
//!
//! Slurm sends USR1 to the batch shell (stasis) before the time limit; stasis
//! checkpoints the job, stops it and requeues it (`scontrol requeue`); the requeued
//! job runs the same script, which resumes from the checkpoint. The jobs are submitted
//! by a plain user (`stasis-test`) and end by themselves: a counter that counts to N
//! (progs/countto.c: every tick carries a hash of all before it), an OpenMPI job and an
//! MPICH job (the launcher kept on the node, 3 or 2 ranks of progs/mpiring.c, whose every
//! step's sum depends on every message before it). Each test checks that Slurm really restarted the job (its restart
//! count), that every run after the first resumed (no `ready`, no tick printed twice
//! or skipped across the runs) and that the result equals the uninterrupted one.
//!
//! Timing: slurmctld checks time limits every 30 s (fixed in Slurm) and sends the
//! warning once `now >= end - 80 s - 30 s`, so with a 2 minute limit USR1 comes 10 to
//! 40 s into every run; the programs run about 50 s, so the first run is always
//! signalled, and a run that resumes may be signalled again (each requeue costs about
//! 11 s: Slurm starts a requeued job again after cred_expire, 10 s here). The MPI test
//! runs its two jobs at once, and the counting job runs beside them when the tests run
//! at the same time (the default with 2 test threads): about 90 s in all.
//!
//! Needs root (to start the daemons) and the packages munge, slurmctld, slurmd,
//! slurm-client, openmpi-bin, libopenmpi-dev, mpich and libmpich-dev (scripts/test.sh
//! installs them):
//! without them the tests fail, saying what is missing.
mod common;
use common::*;
use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The longest a job may take from submission to its end, requeues included.
const T_JOB: Duration = Duration::from_secs(170);
/// Ticks of the counter job (20 ms apart: about 50 s, longer than the 40 s after
/// which Slurm's warning has surely come).
const COUNT: u64 = 2500;
/// Steps of the MPI job (at least 20 ms each).
const STEPS: u64 = 2500;
/// The job script's Slurm options that give a fast checkpoint/requeue cycle.
const SBATCH_TIMING: &str = "#SBATCH --time=2 --signal=B:USR1@80 --requeue";

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

fn slurm_scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm")
}

struct Cluster {
    /// The scratch directory holding every file of the cluster.
    dir: PathBuf,
    /// Its slurm.conf (`SLURM_CONF` for every Slurm command).
    conf: PathBuf,
}

/// The watchdog that stops the cluster: a shell blocked reading a pipe only this
/// process writes to; when this process ends (the pipe closes), it runs stop.sh.
static WATCHDOG: Mutex<Option<Child>> = Mutex::new(None);

/// The cluster's directory, for the exit handler.
static CLUSTER_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// At exit of the test binary: close the watchdog's pipe and wait until it has stopped
/// the cluster; then remove the cluster's directory unless a test failed.
extern "C" fn stop_cluster_at_exit() {
    let child = WATCHDOG.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(mut c) = child {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    if let Some(dir) = CLUSTER_DIR.lock().unwrap_or_else(|e| e.into_inner()).take() {
        if FAILED.load(Ordering::SeqCst) {
            eprintln!(
                "keeping the Slurm test cluster's files in {}",
                dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Set when a test failed: the cluster's directory (logs, state) is then kept.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Held by every test: notes its failure (a panic) for the exit handler.
struct KeepFilesOnFailure;

impl Drop for KeepFilesOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            FAILED.store(true, Ordering::SeqCst);
        }
    }
}

/// The cluster of this test binary, started on first use. A failure to start fails
/// every test, with start.sh's explanation.
fn cluster() -> &'static Cluster {
    static C: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match C.get_or_init(start_cluster) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn start_cluster() -> Result<Cluster, String> {
    let dir = std::env::temp_dir().join(format!("stasis-slurm-{}", std::process::id()));
    // The watchdog first, so that whatever start.sh starts is stopped however this
    // process ends (also when killed). In a process group of its own and ignoring the
    // terminal's signals, so that a Ctrl-C of the tests does not end it before it acts.
    let stop = slurm_scripts().join("stop.sh");
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(r#"trap '' INT TERM HUP QUIT; read _; exec "$0" "$1" >/dev/null"#)
        .arg(&stop)
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the cluster's watchdog (sh): {e}"))?;
    *WATCHDOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(watchdog);
    *CLUSTER_DIR.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.clone());
    // SAFETY: registers a function without arguments that only touches a static.
    if unsafe { libc::atexit(stop_cluster_at_exit) } != 0 {
        return Err("atexit failed".into());
    }
    let t0 = Instant::now();
    let start = slurm_scripts().join("start.sh");
    let out = Command::new(&start)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", start.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "the Slurm test cluster did not start ({} {} -> {}):\n{}{}",
            start.display(),
            dir.display(),
            status_str(&out.status),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let conf = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SLURM_CONF="))
        .ok_or_else(|| format!("start.sh printed no SLURM_CONF= line: {stdout}"))?;
    eprintln!(
        "Slurm test cluster up in {:.1} s: SLURM_CONF={conf}",
        t0.elapsed().as_secs_f64()
    );
    Ok(Cluster {
        dir,
        conf: PathBuf::from(conf),
    })
}

impl Cluster {
    /// A Slurm client command (`sbatch`, `scontrol`...) for this cluster, run through
    /// `prefix` (e.g. setpriv to a plain user).
    fn cmd(&self, prefix: &[std::ffi::OsString], prog: &str) -> Command {
        let mut c = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(prog);
                c
            }
            None => Command::new(prog),
        };
        c.env("SLURM_CONF", &self.conf).stdin(Stdio::null());
        c
    }

    /// `scontrol show job -o ID` as `key=value` pairs.
    fn job(&self, id: &str) -> Result<HashMap<String, String>, String> {
        let out = self
            .cmd(&[], "scontrol")
            .args(["show", "job", "-o", id])
            .output()
            .map_err(|e| format!("cannot run scontrol: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(fields(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The last lines of the daemons' logs.
    fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| {
                let text = read_lossy(&self.dir.join("log").join(f));
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(20);
                format!("--- {f}:\n{}\n", lines[from..].join("\n"))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

/// A submitted batch job; cancelled when dropped (a test that fails leaves nothing
/// queued or running).
struct Job<'a> {
    c: &'a Cluster,
    id: String,
    /// The job's standard output and error (appended to by every run).
    out: PathBuf,
    err: PathBuf,
    /// When it was submitted.
    t0: Instant,
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        let _ = self
            .c
            .cmd(&[], "scancel")
            .arg(&self.id)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Slurm states in which a job has ended for good (a requeued job goes through
/// COMPLETING and PENDING instead).
const ENDED: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
];

/// The line every run of a job script prints first, on stdout and stderr.
fn run_marker(line: &str) -> Option<u64> {
    line.strip_prefix("slurm run restart=")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

impl Job<'_> {
    /// Submit `script` (in the work dir) with sbatch as the work dir's user.
    fn submit<'a>(c: &'a Cluster, w: &Work, script: &Path) -> Job<'a> {
        let out = c
            .cmd(&w.prefix, "sbatch")
            .arg("--parsable")
            .arg(script)
            .current_dir(&w.dir)
            .output()
            .expect("cannot run sbatch");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "sbatch {} -> {}: {text}{}\n{}",
            script.display(),
            status_str(&out.status),
            String::from_utf8_lossy(&out.stderr),
            c.logs()
        );
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        assert!(
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
            "sbatch printed no job id: {text:?}"
        );
        eprintln!("submitted {} as job {id}", script.display());
        Job {
            c,
            id,
            out: w.path("job.out"),
            err: w.path("job.err"),
            t0: Instant::now(),
        }
    }

    fn diag(&self) -> String {
        let info = self
            .c
            .job(&self.id)
            .map(|m| {
                let mut v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                v.sort();
                v.join(" ")
            })
            .unwrap_or_else(|e| e);
        format!(
            "--- job {}: {info}\n--- {}:\n{}\n--- {}:\n{}\n{}",
            self.id,
            self.out.display(),
            last_lines(&read_lossy(&self.out), 15),
            self.err.display(),
            last_lines(&read_lossy(&self.err), 40),
            self.c.logs()
        )
    }

    /// Poll the job until it has ended for good (at most T_JOB after its submission);
    /// returns its `scontrol show job`.
    fn wait_end(&self) -> HashMap<String, String> {
        let t0 = self.t0;
        let mut last_state = String::new();
        loop {
            let info = self
                .c
                .job(&self.id)
                .unwrap_or_else(|e| panic!("scontrol show job {}: {e}\n{}", self.id, self.diag()));
            let state = info.get("JobState").cloned().unwrap_or_default();
            if state != last_state {
                eprintln!(
                    "job {} at {:.1} s: {state} (restarts {})",
                    self.id,
                    t0.elapsed().as_secs_f64(),
                    info.get("Restarts").map(String::as_str).unwrap_or("?")
                );
                last_state = state.clone();
            }
            if ENDED.contains(&state.as_str()) {
                return info;
            }
            assert!(
                t0.elapsed() < T_JOB,
                "job {} has not ended after {T_JOB:?} (state {state})\n{}",
                self.id,
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The job's stdout split into its runs: (label, text) in order, each run starting
    /// after its marker line. Asserts the runs are numbered 0, 1, 2... as Slurm counts
    /// restarts.
    fn runs(&self) -> Vec<(String, String)> {
        let mut runs: Vec<(String, String)> = vec![];
        for l in complete_lines(&read_lossy(&self.out)) {
            if let Some(r) = run_marker(&l) {
                assert_eq!(
                    r,
                    runs.len() as u64,
                    "run markers out of order in {}\n{}",
                    self.out.display(),
                    self.diag()
                );
                runs.push((format!("job {} run {r}", self.id), String::new()));
            } else {
                let Some(run) = runs.last_mut() else {
                    panic!("output before the first run marker: {l:?}");
                };
                run.1.push_str(&l);
                run.1.push('\n');
            }
        }
        runs
    }

    /// Check how the job went through Slurm and stasis: ended COMPLETED with exit 0,
    /// submitted by `uid`, restarted at least once by Slurm, and every restart was
    /// stasis's doing: each run but the last checkpointed on USR1 and requeued the
    /// job, each run but the first resumed from a checkpoint and printed no `ready`.
    /// Returns the runs' outputs.
    fn check_cycles(&self, info: &HashMap<String, String>, uid: u32) -> Vec<(String, String)> {
        let d = || self.diag();
        assert_eq!(info["JobState"], "COMPLETED", "{}", d());
        assert_eq!(info["ExitCode"], "0:0", "{}", d());
        assert!(
            info["UserId"].ends_with(&format!("({uid})")),
            "job submitted as {}, not uid {uid}",
            info["UserId"]
        );
        let restarts: u64 = info["Restarts"].parse().expect("Restarts=");
        assert!(
            restarts >= 1,
            "Slurm never restarted the job: no USR1 came before the program ended\n{}",
            d()
        );
        let runs = self.runs();
        assert_eq!(
            runs.len() as u64,
            restarts + 1,
            "{} runs for {restarts} restarts\n{}",
            runs.len(),
            d()
        );
        // stderr: per run, what stasis said.
        let mut err_runs: Vec<String> = vec![];
        for l in complete_lines(&read_lossy(&self.err)) {
            if run_marker(&l).is_some() {
                err_runs.push(String::new());
            } else if let Some(e) = err_runs.last_mut() {
                e.push_str(&l);
                e.push('\n');
            }
        }
        assert_eq!(err_runs.len(), runs.len(), "runs on stderr\n{}", d());
        for (i, e) in err_runs.iter().enumerate() {
            let last = i + 1 == err_runs.len();
            assert_eq!(
                e.contains("(on signal 10)"),
                !last,
                "run {i}: the checkpoint on USR1 (there must be one in every run but the last)\n{}",
                d()
            );
            // The requeue itself shows in Slurm's restart count (nothing else requeues
            // the job). stasis's "Slurm job N requeued" is not looked for: slurmstepd's
            // "CANCELLED ... DUE TO JOB REQUEUE", appended to the same file at that
            // moment, can land in the middle of it.
            assert!(
                !e.contains("scontrol requeue"),
                "run {i}: stasis could not requeue the job\n{}",
                d()
            );
            assert_eq!(
                e.contains("resuming from"),
                i > 0,
                "run {i}: resuming from the checkpoint (in every run but the first)\n{}",
                d()
            );
        }
        for (i, (label, text)) in runs.iter().enumerate() {
            let readies = complete_lines(text)
                .iter()
                .filter(|l| l.starts_with("ready"))
                .count();
            assert_eq!(
                readies,
                usize::from(i == 0),
                "{label}: `ready` lines (a resumed run continues, it does not start over)\n{}",
                d()
            );
            assert!(
                !text.contains("FAIL"),
                "{label} printed FAIL:\n{text}\n{}",
                d()
            );
        }
        eprintln!(
            "job {}: {} runs, ticks per run {:?}",
            self.id,
            runs.len(),
            runs.iter().map(|(_, t)| ticks(t).len()).collect::<Vec<_>>()
        );
        runs
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A work dir for a job of the plain test user, with `stasis` and the given
/// programs copied into `bin/` (the build tree need not be readable by that user).
fn job_work(name: &str, progs: &[(&Path, &str)]) -> (Work, u32) {
    let mut w = Work::new(name);
    let (uid, gid, prefix) = unprivileged_user();
    let bin = w.path("bin");
    fs::create_dir(&bin).unwrap();
    fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    w.stasis = install(Path::new(STASIS), &bin, "stasis");
    for (src, name) in progs {
        install(src, &bin, name);
    }
    w.give_to(uid, gid);
    w.prefix = prefix;
    (w, uid)
}

/// Write the job script `job.sh`: Slurm options, the run marker on stdout and stderr,
/// `env` lines, then `exec stasis run --checkpoint-on USR1 --requeue --dir ck -- CMD`.
fn job_script(w: &Work, sbatch: &[&str], env: &[&str], cmd: &str) -> PathBuf {
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(SBATCH_TIMING);
    s.push('\n');
    s.push_str(&format!(
        "#SBATCH --open-mode=append --output={} --error={}\n",
        w.path("job.out").display(),
        w.path("job.err").display()
    ));
    for o in sbatch {
        s.push_str(&format!("#SBATCH {o}\n"));
    }
    s.push_str("marker=\"slurm run restart=${SLURM_RESTART_COUNT:-0} job=$SLURM_JOB_ID\"\n");
    s.push_str("echo \"$marker\"; echo \"$marker\" >&2\n");
    for e in env {
        s.push_str(e);
        s.push('\n');
    }
    s.push_str(&format!(
        "exec {} run --checkpoint-on USR1 --requeue --dir {} -- {cmd}\n",
        w.stasis.display(),
        w.ck.display()
    ));
    let path = w.path("job.sh");
    fs::write(&path, s).unwrap();
    path
}

// ---------------------------------------------------------------------------
// (a) A program that counts
// ---------------------------------------------------------------------------

/// (a) A plain user's job counting to 2500 under `stasis run --checkpoint-on USR1
/// --requeue`: Slurm's warning signal checkpoints it, stasis requeues it, the requeued
/// job resumes from the checkpoint (possibly several times) and the count ends with
/// the uninterrupted count's hash, every tick printed exactly once across the runs.
#[test]
fn requeue_cycle_of_a_counting_job() {
    let _keep = KeepFilesOnFailure;
    let c = cluster();
    let (w, uid) = job_work("slurm_count", &[(&prog("countto"), "countto")]);
    let script = job_script(
        &w,
        &["--job-name=stasis-count", "-n 1"],
        &[],
        &format!("{} {COUNT}", w.path("bin/countto").display()),
    );
    let job = Job::submit(c, &w, &script);
    let info = job.wait_end();
    let runs = job.check_cycles(&info, uid);
    let all = verify_counter(&runs, Some(0));
    assert_eq!(all.len() as u64, COUNT, "ticks across the runs");
    let last = runs
        .last()
        .map(|(_, t)| complete_lines(t))
        .unwrap_or_default();
    let want = format!("OK ticks={COUNT} hash={:016x}", counter_hash(COUNT - 1));
    assert_eq!(
        last.last(),
        Some(&want),
        "the uninterrupted count's result\n{}",
        job.diag()
    );
    assert!(
        !w.checkpoints().is_empty(),
        "no checkpoint in {}",
        w.ck.display()
    );
}

// ---------------------------------------------------------------------------
// (b) An MPI job
// ---------------------------------------------------------------------------

/// mpiring's sum after every step (`tick K sum=X`), computed here: rank r starts
/// with r * 0x9E3779B97F4A7C15 + 1; at step k it sends acc * 6364136223846793005 + k
/// to rank r + 1, mixes in what rank r - 1 sent, (acc ^ in) * 0xBF58476D1CE4E5B9 + r,
/// and the sum over the ranks is printed.
fn mpiring_sums(ranks: u64, steps: u64) -> Vec<u64> {
    let mut acc: Vec<u64> = (0..ranks)
        .map(|r| r.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1))
        .collect();
    let mut sums = Vec::with_capacity(steps as usize);
    for k in 0..steps {
        let sent: Vec<u64> = acc
            .iter()
            .map(|a| a.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(k))
            .collect();
        for r in 0..ranks as usize {
            let from = sent[(r + ranks as usize - 1) % ranks as usize];
            acc[r] = (acc[r] ^ from)
                .wrapping_mul(0xBF58_476D_1CE4_E5B9)
                .wrapping_add(r as u64);
        }
        sums.push(acc.iter().fold(0u64, |s, a| s.wrapping_add(*a)));
    }
    sums
}

/// Check mpiring's output (the runs in order) against `mpiring_sums`: ticks 0..steps
/// consecutive across the runs, each with its step's sum, and the final `OK` line.
fn verify_mpiring(runs: &[(String, String)], ranks: u64, steps: u64) {
    let sums = mpiring_sums(ranks, steps);
    let all = assert_ticks_consecutive(runs, Some(0));
    assert_eq!(all.len() as u64, steps, "steps across the runs");
    for (label, text) in runs {
        for l in complete_lines(text) {
            if let Some((k, rest)) = parse_tick(&l) {
                assert_eq!(
                    field_num(&rest, "sum"),
                    sums[k as usize],
                    "{label}: step {k}'s sum differs from the uninterrupted run's"
                );
            }
        }
    }
    let last = runs
        .last()
        .map(|(_, t)| complete_lines(t))
        .unwrap_or_default();
    let want = format!(
        "OK ranks={ranks} steps={steps} result={}",
        sums[steps as usize - 1]
    );
    assert_eq!(last.last(), Some(&want), "the final line");
}

/// The MPI implementations tested (Debian's packages, side by side).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mpi {
    OpenMpi,
    Mpich,
}

impl Mpi {
    /// Ranks of the job: 3 with OpenMPI, 2 with MPICH (whose ranks and proxy cost more
    /// CPU per step: with 3 the MPICH job, the slowest, took 30 s longer).
    fn ranks(self) -> u64 {
        match self {
            Mpi::OpenMpi => 3,
            Mpi::Mpich => 2,
        }
    }

    fn cc(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "mpicc.openmpi",
            Mpi::Mpich => "mpicc.mpich",
        }
    }

    /// The launcher's command line for `ranks` ranks of `exe` inside a Slurm
    /// allocation under stasis, the launch kept on this node. OpenMPI: no Slurm
    /// launcher, no slots asked from Slurm, more ranks than cores (its session
    /// directory and segments go to the job's private /tmp and /dev/shm). MPICH:
    /// Hydra starts its proxy by fork, not srun, and takes the ranks as given.
    fn launch(self, ranks: u64, exe: &Path, steps: u64) -> String {
        match self {
            Mpi::OpenMpi => format!(
                "mpirun.openmpi --mca plm isolated --mca ras ^slurm --oversubscribe -np {ranks} {e} {steps}",
                e = exe.display()
            ),
            Mpi::Mpich => format!(
                "mpiexec.mpich -launcher fork -rmk user -n {ranks} {} {steps}",
                exe.display()
            ),
        }
    }
}

/// mpiring built with `mpi`'s compiler wrapper (once per test binary).
fn mpiring(mpi: Mpi) -> PathBuf {
    static EXE: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    EXE[mpi as usize]
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stasis-progs");
            fs::create_dir_all(&dir).unwrap();
            let exe = dir.join(format!("mpiring-slurm-{mpi:?}-{}", std::process::id()));
            let out = Command::new(mpi.cc())
                .args(["-O1", "-o"])
                .arg(&exe)
                .arg(progs_src_dir().join("mpiring.c"))
                .output()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {} ({e}): scripts/test.sh installs openmpi-bin, \
                         libopenmpi-dev, mpich and libmpich-dev",
                        mpi.cc()
                    )
                });
            assert!(
                out.status.success(),
                "{} failed:\n{}",
                mpi.cc(),
                String::from_utf8_lossy(&out.stderr)
            );
            exe
        })
        .clone()
}

/// The model above against a short uninterrupted run of `mpi` (no Slurm, no stasis).
fn check_model(mpi: Mpi) {
    let w = Work::new(&format!("slurm_model_{mpi:?}"));
    w.go();
    let steps = 40;
    let line = mpi.launch(mpi.ranks(), &mpiring(mpi), steps);
    let argv: Vec<&str> = line.split_whitespace().collect();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .current_dir(&w.dir)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let mut p = w.spawn(&format!("{mpi:?}"), cmd, Stdio::null());
    p.expect_exit(0, Duration::from_secs(60));
    verify_mpiring(&[(p.label.clone(), p.stdout())], mpi.ranks(), steps);
}

/// Submit a plain user's job running mpiring under `mpi` with `stasis run
/// --checkpoint-on USR1 --requeue` (`-n RANKS --overcommit`: the tasks on one core).
fn submit_mpi_job<'a>(c: &'a Cluster, mpi: Mpi) -> (Work, u32, Job<'a>) {
    let (w, uid) = job_work(&format!("slurm_{mpi:?}"), &[(&mpiring(mpi), "mpiring")]);
    // mpiring waits for `go` after its last step: there from the start.
    w.go();
    let script = job_script(
        &w,
        &[
            &format!("--job-name=stasis-{mpi:?}"),
            &format!("-n {}", mpi.ranks()),
            "--overcommit",
        ],
        // Nothing for stasis: the plain user's job sees the user's own uid.
        &[],
        &mpi.launch(mpi.ranks(), &w.path("bin/mpiring"), STEPS),
    );
    let job = Job::submit(c, &w, &script);
    (w, uid, job)
}

/// (b) Two plain users' MPI jobs at once, each `-n RANKS --overcommit` with its
/// launcher and its ranks of mpiring kept on the node (3 for OpenMPI, 2 for MPICH): OpenMPI (mpirun, also the node's daemon)
/// and MPICH (Hydra's mpiexec and its proxy), each under `stasis run --checkpoint-on
/// USR1 --requeue`: checkpointed on Slurm's warning, requeued, resumed, and every
/// step's sum and the result equal an uninterrupted run's (computed by
/// `mpiring_sums`, itself checked against short uninterrupted runs of both while the
/// jobs run).
#[test]
fn requeue_cycle_of_mpi_jobs() {
    let _keep = KeepFilesOnFailure;
    let c = cluster();
    let (_w1, uid1, openmpi) = submit_mpi_job(c, Mpi::OpenMpi);
    let (_w2, uid2, mpich) = submit_mpi_job(c, Mpi::Mpich);
    check_model(Mpi::OpenMpi);
    check_model(Mpi::Mpich);
    for (mpi, job, uid) in [(Mpi::OpenMpi, &openmpi, uid1), (Mpi::Mpich, &mpich, uid2)] {
        let info = job.wait_end();
        eprintln!("checking the {mpi:?} job");
        let runs = job.check_cycles(&info, uid);
        verify_mpiring(&runs, mpi.ranks(), STEPS);
    }
}
