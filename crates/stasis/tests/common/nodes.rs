//! Several "nodes" on one machine for the multi-node tests (scripts/nodes/: network
//! namespaces on a bridge, each with its own address, hostname, IPC namespace,
//! /etc/hosts and /dev/shm; `on.sh` starts commands detached on another node as sshd
//! would), and the stasis commands the tests run on them.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nodes")
}

/// A test bed of `n` nodes, torn down (and checked to be gone) when dropped.
pub struct Bed {
    pub name: String,
    pub n: usize,
}

impl Bed {
    pub fn up(tag: &str, n: usize) -> Bed {
        // SAFETY: geteuid takes nothing and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "tests/multinode.rs needs root (network namespaces); CI runs as root"
        );
        let name = format!("{tag}{}", std::process::id() % 100_000);
        let out = Command::new(scripts().join("up.sh"))
            .args([&name, &n.to_string()])
            .output()
            .expect("cannot run scripts/nodes/up.sh");
        assert!(
            out.status.success(),
            "up.sh {name} {n} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Bed { name, n }
    }

    pub fn node(&self, k: usize) -> String {
        format!("{}-{k}", self.name)
    }

    pub fn addr(&self, k: usize) -> String {
        format!("198.18.0.{k}")
    }

    /// `on.sh NODE ARGV...` as a Command.
    pub fn on(&self, k: usize, argv: &[&str]) -> Command {
        let mut c = Command::new(scripts().join("on.sh"));
        c.arg(self.node(k)).args(argv);
        c
    }

    /// The processes in node k's network namespace.
    pub fn pids(&self, k: usize) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.node(k)])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    pub fn comms(&self, k: usize) -> Vec<String> {
        self.pids(k)
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .map(|s| s.trim().to_string())
            .collect()
    }

    /// Tears down and checks that nothing is left.
    pub fn down(&mut self) {
        if self.n == 0 {
            return;
        }
        let pids: Vec<i32> = (1..=self.n).flat_map(|k| self.pids(k)).collect();
        let out = Command::new(scripts().join("down.sh"))
            .arg(&self.name)
            .output()
            .expect("cannot run scripts/nodes/down.sh");
        let n = std::mem::take(&mut self.n);
        assert!(
            out.status.success(),
            "down.sh {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let netns: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for k in 1..=n {
            assert!(
                !netns.contains(&self.node(k)),
                "netns {} left",
                self.node(k)
            );
        }
        assert!(!Path::new("/run/stasis-nodes").join(&self.name).exists());
        let link = Command::new("ip")
            .args(["link", "show", &format!("{}-br", self.name)])
            .output()
            .unwrap();
        assert!(!link.status.success(), "bridge {}-br left", self.name);
        for p in pids {
            assert!(
                !Path::new(&format!("/proc/{p}")).exists()
                    || std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .map(|s| s.contains(") Z "))
                        .unwrap_or(true),
                "process {p} of the test bed is still alive"
            );
        }
        let prefix = format!("ompi.{}-", self.name);
        let left: Vec<String> = std::fs::read_dir("/tmp")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with(&prefix))
            .collect();
        assert!(
            left.is_empty(),
            "OpenMPI session directories left: {left:?}"
        );
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if self.n > 0 {
            let _ = Command::new(scripts().join("down.sh"))
                .arg(&self.name)
                .status();
        }
    }
}

/// `progs/NAME.c` built with OpenMPI's compiler wrapper, once per test binary (tests
/// running at once must not run it while another writes it).
pub fn mpi_prog(name: &str) -> PathBuf {
    mpi_prog_with(name, "mpicc.openmpi")
}

/// `progs/NAME.c` built with MPICH's compiler wrapper (see [`mpi_prog`]).
pub fn mpich_prog(name: &str) -> PathBuf {
    mpi_prog_with(name, "mpicc.mpich")
}

fn mpi_prog_with(name: &str, cc: &str) -> PathBuf {
    static EXES: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let key = format!("{name}-{cc}");
    let mut exes = EXES.lock().unwrap();
    if let Some((_, p)) = exes.iter().find(|(n, _)| *n == key) {
        return p.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stasis-progs");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(format!(
        "{name}-{}-{}",
        cc.rsplit('.').next().unwrap_or(cc),
        std::process::id()
    ));
    let out = Command::new(cc)
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(progs_src_dir().join(format!("{name}.c")))
        .output()
        .unwrap_or_else(|e| panic!("no {cc} (scripts/test.sh installs openmpi and mpich): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exes.push((key, exe.clone()));
    exe
}

pub fn ok_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("OK "))
        .unwrap_or_else(|| panic!("no OK line in:\n{text}"))
        .to_string()
}

/// `bed.on(k, argv)` run in directory `dir`.
pub fn on_in(bed: &Bed, k: usize, dir: &Path, argv: &[&str]) -> Command {
    let mut c = bed.on(k, argv);
    c.current_dir(dir);
    c
}

/// `stasis coordinator` on node 1, listening on `addr`, checkpoints in the work dir's
/// `ck`, with `timeout` per phase.
pub fn coordinator_on(w: &Work, bed: &Bed, addr: &str, timeout: &str) -> Proc {
    let ck = w.ck.to_str().unwrap();
    let argv = [
        STASIS,
        "coordinator",
        "--listen",
        addr,
        "--dir",
        ck,
        "--timeout",
        timeout,
    ];
    w.spawn("coordinator", bed.on(1, &argv), Stdio::null())
}

/// A spare agent (`stasis agent --coordinator ADDR`, no command) on node `k`, run in
/// `dir`, once it joined.
pub fn spare_on(w: &Work, bed: &Bed, k: usize, dir: &Path, addr: &str, label: &str) -> Proc {
    let argv = [STASIS, "agent", "--coordinator", addr];
    let mut p = w.spawn_io(label, on_in(bed, k, dir, &argv), Stdio::null(), true);
    wait_joined(&mut p);
    p
}

/// `stasis restart --coordinator ADDR --nodes NODES ck` on node `k`, run in `dir`.
pub fn restart_cmd(w: &Work, bed: &Bed, k: usize, dir: &Path, addr: &str, nodes: &str) -> Command {
    let ck = w.ck.to_str().unwrap();
    let argv = [
        STASIS,
        "restart",
        "--coordinator",
        addr,
        "--nodes",
        nodes,
        ck,
    ];
    on_in(bed, k, dir, &argv)
}

/// Waits for an agent to say it joined its coordinator.
pub fn wait_joined(a: &mut Proc) {
    let t0 = Instant::now();
    while !a.stderr().contains("joined") {
        assert!(t0.elapsed() < T_CMD, "the agent did not join\n{}", a.diag());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The node whose part the global checkpoint `n` holds as `node-K`, for each K.
pub fn parts_of(ck: &Path, n: u32) -> Vec<String> {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ck.join(format!("checkpoint-{n:06}/global.json"))).unwrap(),
    )
    .unwrap();
    g["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect()
}

/// `stasis checkpoint --coordinator ADDR [--kill]` run on node `k`; it must succeed
/// (the coordinator's messages are shown otherwise).
pub fn global_checkpoint(bed: &Bed, k: usize, addr: &str, kill: bool, coord: &Proc) {
    let mut args = vec![STASIS, "checkpoint", "--coordinator", addr];
    if kill {
        args.push("--kill");
    }
    let r = bed.on(k, &args).output().unwrap();
    assert!(
        r.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&r.stderr),
        coord.stderr()
    );
}

/// Restarts the newest global checkpoint (run in the work dir) with part K on node
/// `targets[K]`: a spare agent on each node of `targets[1..]`, then `stasis restart
/// --coordinator --nodes` on `targets[0]`. Returns the spares and the restart.
pub fn restart_onto(w: &Work, bed: &Bed, addr: &str, targets: &[usize]) -> (Vec<Proc>, Proc) {
    let spares = targets[1..]
        .iter()
        .map(|&k| spare_on(w, bed, k, &w.dir, addr, &format!("spare-again-{k}")))
        .collect();
    let nodes = targets
        .iter()
        .map(|&k| bed.node(k))
        .collect::<Vec<_>>()
        .join(",");
    let restarted = w.spawn_io(
        "restart",
        restart_cmd(w, bed, targets[0], &w.dir, addr, &nodes),
        Stdio::null(),
        true,
    );
    (spares, restarted)
}

/// `stasis agent --coordinator ADDR -- CMD...` on node `k`, run in `dir`.
pub fn agent_on(bed: &Bed, k: usize, dir: &Path, addr: &str, cmd: &[&str]) -> Command {
    let mut argv = vec![STASIS, "agent", "--coordinator", addr, "--"];
    argv.extend_from_slice(cmd);
    on_in(bed, k, dir, &argv)
}

/// The result line (`OK ...`) of an uninterrupted OpenMPI run of `exe ARGS` with `np`
/// ranks on this node, in the work dir, with the files `gates` (such as `go`) there
/// from the start and removed afterwards.
pub fn openmpi_reference(w: &Work, np: usize, exe: &Path, args: &[&str], gates: &[&str]) -> String {
    for g in gates {
        std::fs::write(w.path(g), b"").unwrap();
    }
    let out = Command::new("mpirun.openmpi")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .arg(exe)
        .args(args)
        .current_dir(&w.dir)
        .output()
        .expect("cannot run mpirun.openmpi");
    for g in gates {
        std::fs::remove_file(w.path(g)).unwrap();
    }
    ok_line(&String::from_utf8_lossy(&out.stdout))
}
