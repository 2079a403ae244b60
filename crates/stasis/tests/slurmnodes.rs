//! An OpenMPI job across the nodes of a real Slurm allocation, checkpointed, stopped,
//! and restarted by a second batch job on other nodes. The cluster runs on a test bed
//! of 4 network-namespace nodes (common/nodes.rs): scripts/slurm/start-bed.sh starts
//! slurmctld on node 1 and a slurmd on every node (munged in the host), every file
//! under one scratch directory, and scripts/slurm/stop.sh stops it.
//!
//! The job script is docs/SLURM.md's "MPI jobs across nodes in an allocation": a
//! coordinator on the batch node, spare agents on the other nodes of the allocation
//! started with srun, and mpirun (3 ranks of progs/mpiring.c, one per node) under the
//! batch node's agent with its daemons started through `stasis ssh`; when the
//! directory already holds a global checkpoint, the same script restarts it on the
//! nodes of its allocation instead. The first job runs on nodes 1-3, is checkpointed
//! while it runs (from node 4, outside the job) and then with --kill; the second runs
//! on nodes 2-4, so every part moves. Its ticks continue the first job's and its
//! result is an uninterrupted run's.
//!
//! Needs root, iproute2, util-linux, OpenMPI and munge, slurmctld, slurmd,
//! slurm-client (scripts/test.sh installs them); never skipped.
mod common;
use common::nodes::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The cluster on a test bed, stopped (and checked to be gone) when dropped.
struct Cluster {
    dir: PathBuf,
    conf: String,
}

impl Cluster {
    fn start(bed: &Bed) -> Cluster {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("slurm-bed-{}", std::process::id()));
        let out = Command::new(scripts_slurm().join("start-bed.sh"))
            .arg(&dir)
            .arg(&bed.name)
            .output()
            .expect("cannot run scripts/slurm/start-bed.sh");
        assert!(
            out.status.success(),
            "start-bed.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(conf.starts_with("SLURM_CONF="), "{conf}");
        Cluster { dir, conf }
    }

    /// A Slurm command run on node 1 (the host has no address on the test bed).
    fn cmd(&self, bed: &Bed, argv: &[&str]) -> String {
        let mut all = vec!["env", self.conf.as_str()];
        all.extend_from_slice(argv);
        let out = bed.on(1, &all).output().unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `scontrol show job ID` as key=value pairs.
    fn job(&self, bed: &Bed, id: &str) -> std::collections::HashMap<String, String> {
        self.cmd(bed, &["scontrol", "-o", "show", "job", id])
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.dir.join("log"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            s.push_str(&format!("\n--- {}:\n", e.path().display()));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ok = Command::new(scripts_slurm().join("stop.sh"))
            .arg(&self.dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if !std::thread::panicking() {
            assert!(
                ok,
                "scripts/slurm/stop.sh left processes of {}",
                self.dir.display()
            );
        }
    }
}

fn scripts_slurm() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm")
}

/// docs/SLURM.md's job script, with this build's stasis and the program to run.
fn job_script(w: &Work, program: &str) -> PathBuf {
    let bin = Path::new(STASIS).parent().unwrap().display().to_string();
    let script = format!(
        r#"#!/bin/bash
#SBATCH --ntasks-per-node=1
export PATH={bin}:$PATH
export STASIS_WAIT_AGENTS=60
head=$(hostname -s)
scontrol show hostnames "$SLURM_JOB_NODELIST" > hosts.$SLURM_JOB_ID
stasis coordinator --listen "$head":7070 --dir "$PWD/ckpt" &
coordinator=$!
srun --overlap -N $((SLURM_NNODES - 1)) -n $((SLURM_NNODES - 1)) --ntasks-per-node=1 \
    --exclude="$head" stasis agent --coordinator "$head":7070 &
if ls "$PWD"/ckpt/checkpoint-*/global.json >/dev/null 2>&1; then
    stasis restart --coordinator "$head":7070 --nodes "$(paste -sd, hosts.$SLURM_JOB_ID)" "$PWD/ckpt"
else
    stasis agent --coordinator "$head":7070 -- \
        mpirun.openmpi --allow-run-as-root --mca plm rsh --mca plm_rsh_agent "stasis ssh" \
            --mca ras ^slurm --hostfile hosts.$SLURM_JOB_ID --map-by node -np $SLURM_NNODES \
            --mca btl tcp,self --mca btl_tcp_if_include 198.18.0.0/24 \
            --mca oob_tcp_if_include 198.18.0.0/24 {program}
fi
rc=$?
kill $coordinator; wait $coordinator     # it answers a checkpoint in progress first
exit $rc
"#
    );
    let p = w.path("job.sh");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    p
}

/// Submits `script` on `nodes`; its output goes to out-JOBID.txt in the work dir.
fn submit(c: &Cluster, bed: &Bed, w: &Work, script: &Path, nodes: &str) -> String {
    let out = c.cmd(
        bed,
        &[
            "sbatch",
            "--parsable",
            "-N",
            "3",
            "-w",
            nodes,
            "-D",
            w.dir.to_str().unwrap(),
            "-o",
            w.path("out-%j.txt").to_str().unwrap(),
            script.to_str().unwrap(),
        ],
    );
    out.trim().to_string()
}

fn output(w: &Work, id: &str) -> String {
    std::fs::read_to_string(w.path(&format!("out-{id}.txt"))).unwrap_or_default()
}

/// Waits until `f` holds of job `id`'s output.
fn wait_output(c: &Cluster, bed: &Bed, w: &Work, id: &str, what: &str, f: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    loop {
        let out = output(w, id);
        if f(&out) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "job {id}: {what} did not come\n{out}\n{:?}{}",
            c.job(bed, id),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until job `id` has ended; returns its state and exit code.
fn wait_end(c: &Cluster, bed: &Bed, id: &str) -> (String, String) {
    let t0 = Instant::now();
    loop {
        let j = c.job(bed, id);
        let state = j.get("JobState").cloned().unwrap_or_default();
        if !matches!(
            state.as_str(),
            "PENDING" | "RUNNING" | "COMPLETING" | "CONFIGURING"
        ) {
            return (state, j.get("ExitCode").cloned().unwrap_or_default());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "job {id} did not end: {j:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn openmpi_job_across_a_slurm_allocation_restarted_by_another_job_on_other_nodes() {
    const STEPS: &str = "600";
    let exe = mpi_prog("mpiring");
    let w = Work::new("slurm_nodes");
    // The reference: an uninterrupted run on one node.
    let want = openmpi_reference(&w, 3, &exe, &[STEPS], &["go"]);

    let mut bed = Bed::up("sn", 4);
    let cluster = Cluster::start(&bed);
    let script = job_script(&w, &format!("{} {STEPS}", exe.display()));
    let first = submit(
        &cluster,
        &bed,
        &w,
        &script,
        &format!("{0}-1,{0}-2,{0}-3", bed.name),
    );
    let ticks_past = |n: u64| move |o: &str| ticks(o).last().is_some_and(|t| *t >= n);
    wait_output(&cluster, &bed, &w, &first, "tick 20", ticks_past(20));
    // From node 4, outside the job, as an operator would.
    let checkpoint = |kill: bool| {
        let mut args = vec![STASIS, "checkpoint", "--coordinator"];
        let addr = format!("{}-1:7070", bed.name);
        args.push(&addr);
        if kill {
            args.push("--kill");
        }
        let r = bed.on(4, &args).output().unwrap();
        assert!(
            r.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&r.stderr),
            output(&w, &first)
        );
    };
    checkpoint(false);
    let t = ticks(&output(&w, &first)).last().copied().unwrap();
    wait_output(
        &cluster,
        &bed,
        &w,
        &first,
        "20 more ticks",
        ticks_past(t + 20),
    );
    checkpoint(true);
    let (state, code) = wait_end(&cluster, &bed, &first);
    assert_eq!(
        (state.as_str(), code.as_str()),
        ("FAILED", "75:0"),
        "the first job ends as `stasis agent` does after checkpoint --kill\n{}",
        output(&w, &first)
    );
    // The restart: nodes 2-4, each part on another node.
    let second = submit(
        &cluster,
        &bed,
        &w,
        &script,
        &format!("{0}-2,{0}-3,{0}-4", bed.name),
    );
    let before = ticks(&output(&w, &first)).last().copied().unwrap();
    wait_output(
        &cluster,
        &bed,
        &w,
        &second,
        "ticks after the restart",
        ticks_past(before + 20),
    );
    w.go();
    wait_output(&cluster, &bed, &w, &second, "the result", |o| {
        o.contains("OK ")
    });
    let (state, code) = wait_end(&cluster, &bed, &second);
    let out2 = output(&w, &second);
    assert_eq!(
        (state.as_str(), code.as_str()),
        ("COMPLETED", "0:0"),
        "{out2}"
    );
    // Part 0 (mpirun's) on the batch node, node 2; the others on nodes 3 and 4.
    for k in [3, 4] {
        assert!(
            out2.contains(&format!("restarted on node {}-{k}", bed.name)),
            "no part restarted on node {k}:\n{out2}"
        );
    }
    assert_ticks_consecutive(
        &[
            ("first job".into(), output(&w, &first)),
            ("second job".into(), out2.clone()),
        ],
        Some(0),
    );
    assert_eq!(
        ok_line(&out2),
        want,
        "the result after a restart by another Slurm job on other nodes differs from an uninterrupted run's"
    );
    drop(cluster);
    bed.down();
}
