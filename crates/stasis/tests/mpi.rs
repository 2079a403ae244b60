//! MPI on one node under stasis: an OpenMPI 4 job (mpirun, which is also the local
//! daemon, and its ranks; loopback TCP and UNIX sockets, PMIx shared memory in the
//! session directory, a backing file in /dev/shm deleted while open, ptys for the
//! ranks' output) and an MPICH 4 job (Hydra's mpiexec, its proxy, the ranks) are
//! checkpointed while they run, killed, restarted twice, and end with exactly the
//! result of an uninterrupted run (`progs/mpiring.c`: every message of every step
//! changes the result). On the host network, on a private one (`--network private`:
//! the TCP connections go the TCP_REPAIR way; OpenMPI), and as a plain user.
//!
//! No workaround in the job's command line: a plain user's job runs as the user's own
//! uid inside `stasis run` (mpirun is started without OpenMPI's root allowance, which
//! only root's job gets), and each job has a private /tmp and /dev/shm, where
//! OpenMPI's session directory (saved in the image) and shared-memory segments go.
//! Needs Debian's openmpi-bin, libopenmpi-dev, mpich and
//! libmpich-dev (scripts/test.sh installs them): without them the tests say so and
//! pass, except under CI, where that is a failure.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const RANKS: &str = "3";
const STEPS: &str = "500";

/// The MPI implementations tested (Debian's packages, side by side).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mpi {
    /// OpenMPI 4: mpirun is also the node's daemon; PMIx; TCP and shared memory.
    OpenMpi,
    /// MPICH 4 (ch4): Hydra's mpiexec and its proxy, launched with fork.
    Mpich,
}

impl Mpi {
    fn cc(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "mpicc.openmpi",
            Mpi::Mpich => "mpicc.mpich",
        }
    }

    fn launcher(self) -> &'static str {
        match self {
            Mpi::OpenMpi => "mpirun.openmpi",
            Mpi::Mpich => "mpiexec.mpich",
        }
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

/// mpiring built with `mpi`'s compiler wrapper (once), or None without it.
fn mpiring(mpi: Mpi) -> Option<PathBuf> {
    static EXE: [OnceLock<Option<PathBuf>>; 2] = [OnceLock::new(), OnceLock::new()];
    EXE[mpi as usize].get_or_init(|| {
        let (Some(cc), Some(_)) = (which(mpi.cc()), which(mpi.launcher())) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no {}/{} under CI (scripts/test.sh installs openmpi-bin, libopenmpi-dev, mpich, libmpich-dev)",
                mpi.cc(),
                mpi.launcher()
            );
            eprintln!("SKIPPED: no {} installed", mpi.launcher());
            return None;
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stasis-progs");
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(format!("mpiring-{mpi:?}-{}", std::process::id()));
        let out = Command::new(cc)
            .args(["-O1", "-o"])
            .arg(&exe)
            .arg(progs_src_dir().join("mpiring.c"))
            .output()
            .expect("cannot run the MPI compiler wrapper");
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            mpi.cc(),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(exe)
    })
    .clone()
}

/// The launcher's command line for `exe`, as a user would write it. OpenMPI refuses
/// root without `--allow-run-as-root`: given only to root's jobs; a plain user's runs
/// with OpenMPI's root allowance removed from the environment, so that it would fail
/// if the job saw itself as root.
fn mpirun(mpi: Mpi, exe: &Path, as_user: bool) -> Vec<String> {
    if mpi == Mpi::Mpich {
        // Started by fork (no ssh, no Slurm); its files are deleted while open.
        return vec![
            mpi.launcher().into(),
            "-launcher".into(),
            "fork".into(),
            "-n".into(),
            RANKS.into(),
            exe.display().to_string(),
            STEPS.into(),
        ];
    }
    let mut argv: Vec<String> = if as_user {
        [
            "env",
            "-u",
            "OMPI_ALLOW_RUN_AS_ROOT",
            "-u",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
        ]
        .map(String::from)
        .to_vec()
    } else {
        Vec::new()
    };
    argv.push("mpirun.openmpi".into());
    if !as_user {
        argv.push("--allow-run-as-root".into());
    }
    argv.extend(
        ["--oversubscribe", "-np", RANKS]
            .map(String::from)
            .into_iter()
            .chain([exe.display().to_string(), STEPS.into()]),
    );
    argv
}

/// The result of an uninterrupted run, outside stasis.
fn reference(mpi: Mpi, exe: &Path) -> String {
    static R: [OnceLock<String>; 2] = [OnceLock::new(), OnceLock::new()];
    R[mpi as usize]
        .get_or_init(|| {
            let w = Work::new("mpi_reference");
            std::fs::write(w.path("go"), b"").unwrap();
            let argv = mpirun(mpi, exe, false);
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]).current_dir(&w.dir);
            let out = cmd.output().expect("cannot run mpirun.openmpi");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let ok = text
                .lines()
                .find(|l| l.starts_with("OK "))
                .unwrap_or_else(|| {
                    panic!(
                        "the reference run did not finish: {}\n{text}\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            fields(ok)["result"].clone()
        })
        .clone()
}

fn mpi_cycles(mpi: Mpi, name: &str, as_user: bool, private: bool) {
    // One job at a time: 3 ranks and mpirun already oversubscribe the 2 cores.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(exe) = mpiring(mpi) else { return };
    let want = reference(mpi, &exe);
    let mut w = Work::new(name);
    let mut exe_in = exe.clone();
    if as_user {
        let (uid, gid, prefix) = unprivileged_user();
        let bin = w.path("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        w.stasis = install(Path::new(STASIS), &bin, "stasis");
        exe_in = install(&exe, &bin, "mpiring");
        w.give_to(uid, gid);
        w.prefix = prefix;
    }
    if private {
        w.run_opts = vec!["--network".into(), "private".into()];
    }
    let mut s = Session::start(&w, &mpirun(mpi, &exe_in, as_user));
    s.cur().wait_tick(20, T_READY);
    // A checkpoint that leaves the job running, then two kill/restart cycles.
    w.checkpoint_ok(false, s.cur());
    let t = s.cur().wait_more_ticks(10, T_READY);
    eprintln!("{name}: checkpoint at tick {t}, job ran on");
    let meta = w.inspect_json();
    assert_eq!(
        meta["private_network"].as_bool(),
        Some(private),
        "private_network"
    );
    if mpi == Mpi::OpenMpi {
        // Its session directory, in the job's own /tmp, is saved with it.
        let tmp = meta["private_dirs"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["path"] == "/tmp"))
            .expect("no private /tmp in the image");
        let session = tmp["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["path"].as_str())
            .find(|p| p.starts_with("ompi."));
        assert!(
            session.is_some(),
            "no OpenMPI session directory in the saved /tmp: {tmp}"
        );
    }
    let procs = meta["processes"].as_array().unwrap();
    assert!(
        procs.len() > RANKS.parse::<usize>().unwrap(),
        "mpirun and {RANKS} ranks in the image: {} processes",
        procs.len()
    );
    let tcp = meta["inet_sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["protocol"] == "tcp" && x["state"] == "connected")
        .count();
    // OpenMPI's daemon talks to its ranks over loopback TCP (MPICH's fork launcher
    // over inherited UNIX sockets).
    assert!(
        tcp > 0 || mpi == Mpi::Mpich,
        "no TCP connection between mpirun and its ranks"
    );
    if private {
        let repaired = meta["inet_sockets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["repair"].is_object())
            .count();
        assert_eq!(repaired, tcp, "every connection saved with TCP_REPAIR");
    }
    for i in 1..=2 {
        s.checkpoint_kill();
        s.restart(Probe::Ticks);
        let t = s.cur().wait_more_ticks(10, T_READY);
        eprintln!("{name}: restart {i} running at tick {t}");
    }
    // The rest of the steps, then the result.
    let steps: u64 = STEPS.parse().unwrap();
    s.cur()
        .wait_tick(steps - 1, std::time::Duration::from_secs(120));
    let ok = s.finish();
    assert_eq!(
        fields(&ok)["result"],
        want,
        "{name}: the result differs from an uninterrupted run's: {ok}"
    );
    let t = assert_ticks_consecutive(&s.outputs(), Some(0));
    assert_eq!(t.last().copied(), Some(steps - 1), "{name}: steps");
}

/// (1) OpenMPI, 3 ranks, host network, as root: a checkpoint while running and two
/// checkpoint --kill/restart cycles; every step's tick exactly once across the runs,
/// and the final result equals an uninterrupted run's.
#[test]
fn openmpi_job_host_network() {
    mpi_cycles(Mpi::OpenMpi, "mpi_host", false, false);
}

/// (2) The same with `stasis run --network private`: every TCP connection of the job
/// is saved with TCP_REPAIR.
#[test]
fn openmpi_job_private_network() {
    mpi_cycles(Mpi::OpenMpi, "mpi_private", false, true);
}

/// (3) The same as a plain user (host network).
#[test]
fn openmpi_job_as_unprivileged_user() {
    mpi_cycles(Mpi::OpenMpi, "mpi_unpriv", true, false);
}

/// (4) MPICH (Hydra's mpiexec, its proxy and 3 ranks), host network, as root.
#[test]
fn mpich_job_host_network() {
    mpi_cycles(Mpi::Mpich, "mpich_host", false, false);
}

/// (5) MPICH as a plain user.
#[test]
fn mpich_job_as_unprivileged_user() {
    mpi_cycles(Mpi::Mpich, "mpich_unpriv", true, false);
}
