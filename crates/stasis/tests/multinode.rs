//! Several "nodes" on one machine (scripts/nodes/: network namespaces on a bridge, each
//! with its own address, hostname, IPC namespace, /etc/hosts and /dev/shm; `rsh`, a
//! remote-shell stand-in that starts commands detached on another node as sshd would):
//!
//! * an OpenMPI job (`progs/mpiring.c`, 3 ranks, one per node, launched through the
//!   stand-in as `--mca plm_rsh_agent`, TCP between the nodes' addresses) runs WITHOUT
//!   stasis and gives exactly the result of an uninterrupted run on one node;
//! * a coordinator on one node and simulated agents started on the others through the
//!   stand-in take a global checkpoint over the bridge (parts named by the nodes'
//!   hostnames) and stop with `--kill`;
//! * tearing the test bed down leaves no namespace, bridge, process, state directory
//!   or OpenMPI session directory behind.
//!
//! Needs root (network namespaces; CI runs as root), iproute2 and util-linux, and
//! OpenMPI (scripts/test.sh installs them); never skipped.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nodes")
}

/// A test bed of `n` nodes, torn down (and checked to be gone) when dropped.
struct Bed {
    name: String,
    n: usize,
}

impl Bed {
    fn up(tag: &str, n: usize) -> Bed {
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

    fn node(&self, k: usize) -> String {
        format!("{}-{k}", self.name)
    }

    fn addr(&self, k: usize) -> String {
        format!("198.18.0.{k}")
    }

    /// `on.sh NODE ARGV...` as a Command.
    fn on(&self, k: usize, argv: &[&str]) -> Command {
        let mut c = Command::new(scripts().join("on.sh"));
        c.arg(self.node(k)).args(argv);
        c
    }

    /// The processes in node k's network namespace.
    fn pids(&self, k: usize) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.node(k)])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn comms(&self, k: usize) -> Vec<String> {
        self.pids(k)
            .iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
            .map(|s| s.trim().to_string())
            .collect()
    }

    /// Tears down and checks that nothing is left.
    fn down(&mut self) {
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

/// progs/mpiring.c built with OpenMPI's compiler wrapper, once per test binary (tests
/// running at once must not run it while another writes it).
fn mpiring() -> PathBuf {
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stasis-progs");
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(format!("mpiring-multinode-{}", std::process::id()));
        let out = Command::new("mpicc.openmpi")
            .args(["-O1", "-o"])
            .arg(&exe)
            .arg(progs_src_dir().join("mpiring.c"))
            .output()
            .expect("no mpicc.openmpi (scripts/test.sh installs openmpi-bin libopenmpi-dev)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
    .clone()
}

const STEPS: &str = "40";

fn ok_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("OK "))
        .unwrap_or_else(|| panic!("no OK line in:\n{text}"))
        .to_string()
}

#[test]
fn openmpi_job_across_three_nodes_through_the_launch_agent() {
    let exe = mpiring();
    let w = Work::new("multinode_mpi");
    // The reference: an uninterrupted run on one node.
    std::fs::write(w.path("go"), b"").unwrap();
    let out = Command::new("mpirun.openmpi")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3"])
        .arg(&exe)
        .arg(STEPS)
        .current_dir(&w.dir)
        .output()
        .expect("cannot run mpirun.openmpi");
    let want = ok_line(&String::from_utf8_lossy(&out.stdout));
    std::fs::remove_file(w.path("go")).unwrap();

    let mut bed = Bed::up("mn", 3);
    let hostfile = w.path("hosts");
    std::fs::write(
        &hostfile,
        (1..=3)
            .map(|k| format!("{} slots=1\n", bed.node(k)))
            .collect::<String>(),
    )
    .unwrap();
    let rsh = scripts().join("rsh");
    let mut cmd = bed.on(
        1,
        &[
            "mpirun.openmpi",
            "--allow-run-as-root",
            "--map-by",
            "node",
            "--hostfile",
            hostfile.to_str().unwrap(),
            "-np",
            "3",
            "--mca",
            "plm_rsh_agent",
            rsh.to_str().unwrap(),
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            "198.18.0.0/24",
            "--mca",
            "oob_tcp_if_include",
            "198.18.0.0/24",
            exe.to_str().unwrap(),
            STEPS,
        ],
    );
    cmd.current_dir(&w.dir).env("STASIS_NODES", &bed.name);
    let mut job = w.spawn("mpirun", cmd, Stdio::null());
    job.wait_line("the last step", Duration::from_secs(60), |l| {
        l.starts_with(&format!("tick {} ", STEPS.parse::<u64>().unwrap() - 1))
    });
    // Every node runs one rank; nodes 2 and 3 an orted started through the stand-in,
    // not a descendant of mpirun (it runs in a session of its own).
    let mpirun_pid = bed
        .pids(1)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "mpirun.openmpi" || c.trim() == "mpirun")
        })
        .unwrap_or_else(|| panic!("no mpirun on node 1: {:?}", bed.comms(1)));
    for k in 1..=3 {
        let comms = bed.comms(k);
        let ranks = comms.iter().filter(|c| c.starts_with("mpiring")).count();
        assert_eq!(ranks, 1, "node {k} runs {comms:?}");
        if k > 1 {
            assert!(
                comms.iter().any(|c| c == "orted"),
                "node {k} runs {comms:?}"
            );
            for p in bed.pids(k) {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
                assert_ne!(
                    fields.get(1),
                    Some(&mpirun_pid.to_string().as_str()),
                    "{p} on node {k} is mpirun's child"
                );
                assert_ne!(
                    fields.get(3),
                    Some(&fields_session(mpirun_pid).as_str()),
                    "{p} on node {k} is in mpirun's session"
                );
            }
        }
        // Its own hostname, and /etc/hosts naming every node.
        let out = bed
            .on(k, &["sh", "-c", "hostname; cat /etc/hosts"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().next(), Some(bed.node(k).as_str()));
        for j in 1..=3 {
            assert!(
                text.contains(&format!("{} {}", bed.addr(j), bed.node(j))),
                "{text}"
            );
        }
    }
    w.go();
    job.expect_exit(0, Duration::from_secs(30));
    assert_eq!(
        ok_line(&job.stdout()),
        want,
        "the 3-node result differs from one node's"
    );
    bed.down();
}

/// The session id of a process.
fn fields_session(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(") ")
        .next()
        .unwrap_or("")
        .split(' ')
        .nth(3)
        .unwrap_or("")
        .to_string()
}

#[test]
fn coordinator_and_agents_across_nodes() {
    let w = Work::new("multinode_coord");
    let mut bed = Bed::up("mc", 3);
    let addr = format!("{}:7070", bed.addr(1));
    let mut coord = coordinator_on(&w, &bed, &addr, "10s");
    // One agent per node; those of nodes 2 and 3 started through the stand-in.
    let mut local = w.spawn(
        "agent-1",
        bed.on(1, &[STASIS, "agent", "--coordinator", &addr, "--simulate"]),
        Stdio::null(),
    );
    for k in 2..=3 {
        let line = format!(
            "exec {STASIS} agent --coordinator {addr} --simulate --simulate-state {} 2>{}",
            w.path(&format!("agent-{k}.state")).display(),
            w.path(&format!("agent-{k}.err")).display()
        );
        let st = Command::new(scripts().join("rsh"))
            .args(["-x", &bed.node(k), &line])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let t0 = Instant::now();
    while !(2..=3).all(|k| w.read(&format!("agent-{k}.err")).contains("joined"))
        || !local.stderr().contains("joined")
    {
        assert!(
            t0.elapsed() < T_CMD,
            "agents did not join\n{}\n{}",
            coord.diag(),
            local.diag()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut r = w.spawn(
        "checkpoint",
        bed.on(3, &[STASIS, "checkpoint", "--coordinator", &addr, "--kill"]),
        Stdio::null(),
    );
    r.expect_exit(0, T_CMD);
    let global: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(w.ck.join("checkpoint-000001/global.json")).unwrap(),
    )
    .unwrap();
    let mut nodes: Vec<String> = global["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        (1..=3).map(|k| bed.node(k)).collect::<Vec<_>>(),
        "{global}"
    );
    local.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    for k in 2..=3 {
        let t0 = Instant::now();
        while w.read(&format!("agent-{k}.state")).trim() != "killed 1" {
            assert!(
                t0.elapsed() < T_CMD,
                "agent on node {k}: {}",
                w.read(&format!("agent-{k}.err"))
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert!(coord.running(), "{}", coord.diag());
    bed.down();
    coord.wait(T_CMD);
}

/// `bed.on(k, argv)` run in directory `dir`.
fn on_in(bed: &Bed, k: usize, dir: &Path, argv: &[&str]) -> Command {
    let mut c = bed.on(k, argv);
    c.current_dir(dir);
    c
}

/// `stasis coordinator` on node 1, listening on `addr`, checkpoints in the work dir's
/// `ck`, with `timeout` per phase.
fn coordinator_on(w: &Work, bed: &Bed, addr: &str, timeout: &str) -> Proc {
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
fn spare_on(w: &Work, bed: &Bed, k: usize, dir: &Path, addr: &str, label: &str) -> Proc {
    let argv = [STASIS, "agent", "--coordinator", addr];
    let mut p = w.spawn_io(label, on_in(bed, k, dir, &argv), Stdio::null(), true);
    wait_joined(&mut p);
    p
}

/// `stasis restart --coordinator ADDR --nodes NODES ck` on node `k`, run in `dir`.
fn restart_cmd(w: &Work, bed: &Bed, k: usize, dir: &Path, addr: &str, nodes: &str) -> Command {
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
fn wait_joined(a: &mut Proc) {
    let t0 = Instant::now();
    while !a.stderr().contains("joined") {
        assert!(t0.elapsed() < T_CMD, "the agent did not join\n{}", a.diag());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The node whose part the global checkpoint `n` holds as `node-K`, for each K.
fn parts_of(ck: &Path, n: u32) -> Vec<String> {
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

/// Real parts (not simulated): a counter on each of nodes 1 and 2, each under its
/// node's agent (`stasis agent -- counter`, which runs it under `stasis run`). A global
/// checkpoint leaves both running; a second with --kill stops both (agents exit 75);
/// `stasis restart --coordinator --nodes` then puts the parts on other nodes (part 0
/// on node 3, where the command runs, part 1 on node 1 through the spare agent there;
/// a missing node and a wrong count are refused clearly first), a third global
/// checkpoint includes the restarted parts, and both counters continue from their
/// saved state: ticks consecutive across the restart, their in-memory hash and pid
/// checked by the counters themselves.
#[test]
fn real_parts_checkpointed_together_and_restarted_on_other_nodes() {
    let w = Work::new("multinode_parts");
    let mut bed = Bed::up("mp", 3);
    let addr = format!("{}:7071", bed.addr(1));
    let mut coord = coordinator_on(&w, &bed, &addr, "30s");
    let counter = prog("counter");
    let counter = counter.to_str().unwrap();
    let mut agents: Vec<Proc> = (1..=2)
        .map(|k| {
            w.spawn_io(
                &format!("agent-{k}"),
                on_in(
                    &bed,
                    k,
                    &w.dir,
                    &[STASIS, "agent", "--coordinator", &addr, "--", counter],
                ),
                Stdio::null(),
                true,
            )
        })
        .collect();
    for a in agents.iter_mut() {
        a.wait_tick(3, T_READY);
        wait_joined(a);
    }
    let mut r = w.spawn(
        "checkpoint-1",
        bed.on(2, &[STASIS, "checkpoint", "--coordinator", &addr]),
        Stdio::null(),
    );
    r.expect_exit(0, T_CMD);
    for a in agents.iter_mut() {
        let t = a.last_tick().unwrap();
        a.wait_tick(t + 3, T_CMD);
    }
    let mut r = w.spawn(
        "checkpoint-2",
        bed.on(3, &[STASIS, "checkpoint", "--coordinator", &addr, "--kill"]),
        Stdio::null(),
    );
    r.expect_exit(0, T_CMD);
    for a in agents.iter_mut() {
        a.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    }
    let parts = parts_of(&w.ck, 2);
    assert_eq!(parts.len(), 2, "{parts:?}");
    // Each node's part is a checkpoint directory of its own.
    for k in 0..2 {
        let d =
            w.ck.join(format!("checkpoint-000002/node-{k}/checkpoint-000001"));
        assert!(
            d.join("meta.json").exists() || d.is_dir(),
            "{} missing",
            d.display()
        );
    }
    // The parts go elsewhere: part 0 to node 3 (restarted by `stasis restart
    // --coordinator` itself, run there), part 1 to node 1 (by the spare agent there).
    let mut spare = spare_on(&w, &bed, 1, &w.path("elsewhere"), &addr, "spare-1");
    // A node without a spare agent: a clear error, nothing restarted.
    let nodes_bad = format!("{},{}-9", bed.node(3), bed.name);
    let out = restart_cmd(&w, &bed, 3, &w.path("elsewhere"), &addr, &nodes_bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "restart onto a missing node succeeded: {err}"
    );
    assert!(err.contains("no spare agent on node"), "{err}");
    // The right count of nodes is asked for.
    let out = restart_cmd(&w, &bed, 3, &w.path("elsewhere"), &addr, &bed.node(3))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("2 node part(s)"),
        "{err}"
    );
    let nodes = format!("{},{}", bed.node(3), bed.node(1));
    let mut first = w.spawn_io(
        "restart-coordinated",
        restart_cmd(&w, &bed, 3, &w.path("elsewhere"), &addr, &nodes),
        Stdio::null(),
        true,
    );
    // Which agent each part came from.
    let from: Vec<usize> = (0..2)
        .map(|k| (1..=2).find(|&n| parts[k] == bed.node(n)).unwrap())
        .collect();
    let before: Vec<u64> = from
        .iter()
        .map(|&n| agents[n - 1].last_tick().unwrap())
        .collect();
    first.wait_tick(before[0] + 3, T_READY);
    spare.wait_tick(before[1] + 3, T_READY);
    wait_joined(&mut first);
    // The restarted parts take part in the next global checkpoint.
    let mut r = w.spawn(
        "checkpoint-3",
        bed.on(2, &[STASIS, "checkpoint", "--coordinator", &addr]),
        Stdio::null(),
    );
    r.expect_exit(0, T_CMD);
    let mut now = parts_of(&w.ck, 3);
    now.sort();
    assert_eq!(now, vec![bed.node(1), bed.node(3)]);
    let t = first.last_tick().unwrap();
    first.wait_tick(t + 3, T_CMD);
    w.go();
    for (k, p) in [&mut first, &mut spare].into_iter().enumerate() {
        p.expect_exit(0, T_CMD);
        let outs = vec![
            (format!("agent {}", from[k]), agents[from[k] - 1].stdout()),
            (format!("part {k} restarted"), p.stdout()),
        ];
        let t = assert_ticks_consecutive(&outs, Some(0));
        let ok = p
            .lines()
            .into_iter()
            .find(|l| l.starts_with("OK"))
            .unwrap_or_default();
        assert!(
            ok.starts_with(&format!("OK ticks={}", t.last().unwrap() + 1)),
            "part {k}: {ok:?}\n{}",
            p.diag()
        );
    }
    assert!(coord.running(), "{}", coord.diag());
    coord.kill();
    bed.down();
}

/// A part that cannot be saved (a seccomp filter installed by the program) makes the
/// whole global checkpoint fail: nothing is published, and both parts run on (one
/// started by `stasis agent`, the other by `stasis run --coordinator --dir`).
#[test]
fn a_part_that_cannot_be_saved_abandons_the_global_checkpoint() {
    let w = Work::new("multinode_refused");
    let mut bed = Bed::up("mr", 2);
    let addr = format!("{}:7072", bed.addr(1));
    let mut coord = coordinator_on(&w, &bed, &addr, "30s");
    let counter = prog("counter");
    let unsupported = prog("unsupported");
    // The first node's part through `stasis run --coordinator` (an agent with a local
    // directory of the user's choice).
    let local = w.path("part-1");
    let mut good = w.spawn_io(
        "run-1",
        on_in(
            &bed,
            1,
            &w.dir,
            &[
                STASIS,
                "run",
                "--coordinator",
                &addr,
                "--dir",
                local.to_str().unwrap(),
                "--",
                counter.to_str().unwrap(),
            ],
        ),
        Stdio::null(),
        true,
    );
    let mut bad = w.spawn_io(
        "agent-2",
        on_in(
            &bed,
            2,
            &w.dir,
            &[
                STASIS,
                "agent",
                "--coordinator",
                &addr,
                "--",
                unsupported.to_str().unwrap(),
                "seccomp",
            ],
        ),
        Stdio::null(),
        true,
    );
    good.wait_tick(3, T_READY);
    bad.wait_tick(3, T_READY);
    wait_joined(&mut good);
    wait_joined(&mut bad);
    let r = bed
        .on(1, &[STASIS, "checkpoint", "--coordinator", &addr, "--kill"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "the checkpoint succeeded: {err}");
    assert!(
        err.contains("seccomp"),
        "the error does not name what could not be saved: {err}"
    );
    assert!(
        !w.ck.join("checkpoint-000001").exists(),
        "a failed global checkpoint was published"
    );
    for p in [&mut good, &mut bad] {
        let t = p.last_tick().unwrap();
        p.wait_tick(t + 5, T_CMD);
        assert!(p.running(), "{}", p.diag());
    }
    coord.kill();
    good.kill();
    bad.kill();
    bed.down();
}

/// A TCP connection between two nodes' parts (tcpnode.c: numbered records both ways,
/// some always on their way or unread): a global checkpoint settles it and saves both
/// ends (the job runs on), a second with --kill stops both; the parts are restarted on
/// other nodes with other addresses (the server's part on node 3, the client's on node
/// 1), the connection is made again between the new addresses with each end's unread
/// bytes back in its queue, and both ends then check that every record of the other
/// came exactly once, in order. After the restart the client also opens a new
/// connection to the server's old address, which reaches the server at its new one;
/// then the job is checkpointed, killed and restarted onto other nodes once more, and
/// a new connection to the server's first address still reaches it.
#[test]
fn tcp_connection_between_nodes_survives_a_restart_on_other_nodes() {
    let w = Work::new("multinode_tcp");
    let mut bed = Bed::up("mt", 3);
    let addr = format!("{}:7073", bed.addr(1));
    let ck = w.ck.to_str().unwrap().to_string();
    let mut coord = coordinator_on(&w, &bed, &addr, "30s");
    let tcpnode = prog("tcpnode");
    let tcpnode = tcpnode.to_str().unwrap();
    let server_at = bed.addr(1);
    let mut server = w.spawn_io(
        "agent-server",
        on_in(
            &bed,
            1,
            &w.dir,
            &[
                STASIS,
                "agent",
                "--coordinator",
                &addr,
                "--",
                tcpnode,
                "server",
                "7500",
            ],
        ),
        Stdio::null(),
        true,
    );
    wait_joined(&mut server);
    let mut client = w.spawn_io(
        "agent-client",
        on_in(
            &bed,
            2,
            &w.dir,
            &[
                STASIS,
                "agent",
                "--coordinator",
                &addr,
                "--",
                tcpnode,
                "client",
                &server_at,
                "7500",
            ],
        ),
        Stdio::null(),
        true,
    );
    wait_joined(&mut client);
    for p in [&mut server, &mut client] {
        p.wait_tick(5, T_READY);
    }
    let r = bed
        .on(2, &[STASIS, "checkpoint", "--coordinator", &addr])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for p in [&mut server, &mut client] {
        let t = p.last_tick().unwrap();
        p.wait_tick(t + 5, T_CMD);
    }
    let r = bed
        .on(2, &[STASIS, "checkpoint", "--coordinator", &addr, "--kill"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for p in [&mut server, &mut client] {
        p.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    }
    let parts = parts_of(&w.ck, 2);
    assert_eq!(
        parts,
        vec![bed.node(1), bed.node(2)],
        "part order is join order"
    );
    // Each end is saved as a connection to another node, with its addresses.
    for (k, (local, remote)) in [(bed.addr(1), bed.addr(2)), (bed.addr(2), bed.addr(1))]
        .into_iter()
        .enumerate()
    {
        let part = format!("{ck}/checkpoint-000002/node-{k}");
        let out = w
            .stasis_cmd(&["inspect".as_ref(), "--json".as_ref(), part.as_ref()])
            .output()
            .unwrap();
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let conns: Vec<&serde_json::Value> = meta["inet_sockets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "remote")
            .collect();
        assert_eq!(conns.len(), 1, "part {k}: {}", meta["inet_sockets"]);
        assert!(
            conns[0]["local"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{local}:"))
                && conns[0]["remote"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{remote}:")),
            "part {k}: {}",
            conns[0]
        );
    }
    let mut spare = spare_on(&w, &bed, 1, &w.path("elsewhere"), &addr, "spare-1");
    let nodes = format!("{},{}", bed.node(3), bed.node(1));
    let mut first = w.spawn_io(
        "restart-server-on-3",
        restart_cmd(&w, &bed, 3, &w.path("elsewhere"), &addr, &nodes),
        Stdio::null(),
        true,
    );
    let ts = server.last_tick().unwrap();
    let tc = client.last_tick().unwrap();
    first.wait_tick(ts + 10, T_READY);
    spare.wait_tick(tc + 10, T_READY);
    // A connection the client never had: to the server's old address, which stasis
    // redirects to its new one.
    let again = |p: &mut Proc, file: &str, line: &str| {
        std::fs::write(w.path(file), b"").unwrap();
        let t0 = Instant::now();
        while !p.stdout().contains(line) {
            assert!(
                !p.stdout().contains("FAIL") && t0.elapsed() < T_CMD,
                "{}",
                p.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    again(&mut spare, "again", "again 1 ok");
    // Once more, onto other nodes again (server on node 2, client on node 3): a new
    // connection to the server's first address still reaches it.
    let r = bed
        .on(1, &[STASIS, "checkpoint", "--coordinator", &addr, "--kill"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    first.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    spare.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let parts = parts_of(&w.ck, 3);
    assert_eq!(
        parts,
        vec![bed.node(3), bed.node(1)],
        "parts keep their order"
    );
    let mut spare3 = spare_on(&w, &bed, 3, &w.path("elsewhere"), &addr, "spare-3");
    let nodes = format!("{},{}", bed.node(2), bed.node(3));
    let mut second = w.spawn_io(
        "restart-server-on-2",
        restart_cmd(&w, &bed, 2, &w.path("elsewhere"), &addr, &nodes),
        Stdio::null(),
        true,
    );
    let ts1 = first.last_tick().unwrap();
    let tc1 = spare.last_tick().unwrap();
    second.wait_tick(ts1 + 10, T_READY);
    spare3.wait_tick(tc1 + 10, T_READY);
    again(&mut spare3, "again2", "again 2 ok");
    w.go();
    for (label, before, p) in [
        ("server", vec![&server, &first], &mut second),
        ("client", vec![&client, &spare], &mut spare3),
    ] {
        p.expect_exit(0, T_CMD);
        let mut outs: Vec<(String, String)> = before
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("{label} run {i}"), b.stdout()))
            .collect();
        outs.push((format!("{label} restarted twice"), p.stdout()));
        assert_ticks_consecutive(&outs, Some(0));
        let ok = p
            .lines()
            .into_iter()
            .find(|l| l.starts_with("OK") || l.starts_with("FAIL"))
            .unwrap_or_default();
        assert!(ok.starts_with("OK"), "{label}: {ok:?}\n{}", p.diag());
    }
    // The records went on flowing after the restarts (not only before them).
    let after: u64 = second
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("OK sent="))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        after > 3 * (ts + 10),
        "the server sent only {after} records"
    );
    assert!(coord.running(), "{}", coord.diag());
    coord.kill();
    bed.down();
}

/// An OpenMPI job across three nodes run under stasis: mpirun under the agent of node
/// 1, its daemons on nodes 2 and 3 started through `stasis ssh` as parts of the job by
/// the spare agents there. Checkpointed globally while the ranks talk over TCP between
/// the nodes (the job runs on), then with --kill, restarted on the same nodes with
/// `stasis restart --coordinator --nodes`, and its result compared with an
/// uninterrupted run's.
#[test]
fn openmpi_job_across_nodes_checkpointed_and_restarted() {
    openmpi_across_nodes("multinode_mpi_cr", false);
}

/// The same, restarted on other nodes (each part on the next node, so every node's
/// address changes): the connections between the ranks and daemons are made again
/// between the new addresses.
#[test]
fn openmpi_job_across_nodes_restarted_on_other_nodes() {
    openmpi_across_nodes("multinode_mpi_moved", true);
}

fn openmpi_across_nodes(name: &str, rotate: bool) {
    const STEPS_LONG: &str = "400";
    let exe = mpiring();
    let w = Work::new(name);
    std::fs::write(w.path("go"), b"").unwrap();
    let out = Command::new("mpirun.openmpi")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3"])
        .arg(&exe)
        .arg(STEPS_LONG)
        .current_dir(&w.dir)
        .output()
        .expect("cannot run mpirun.openmpi");
    let want = ok_line(&String::from_utf8_lossy(&out.stdout));
    std::fs::remove_file(w.path("go")).unwrap();

    let mut bed = Bed::up(if rotate { "mo" } else { "mm" }, 3);
    let addr = format!("{}:7074", bed.addr(1));
    let mut coord = coordinator_on(&w, &bed, &addr, "60s");
    let _first_spares: Vec<Proc> = (2..=3)
        .map(|k| spare_on(&w, &bed, k, &w.dir, &addr, &format!("spare-{k}")))
        .collect();
    let hostfile = w.path("hosts");
    std::fs::write(
        &hostfile,
        (1..=3)
            .map(|k| format!("{} slots=1\n", bed.node(k)))
            .collect::<String>(),
    )
    .unwrap();
    let rsh = format!("{STASIS} ssh");
    let mut job = w.spawn_io(
        "agent-mpirun",
        on_in(
            &bed,
            1,
            &w.dir,
            &[
                STASIS,
                "agent",
                "--coordinator",
                &addr,
                "--",
                "mpirun.openmpi",
                "--allow-run-as-root",
                "--map-by",
                "node",
                "--hostfile",
                hostfile.to_str().unwrap(),
                "-np",
                "3",
                "--mca",
                "plm_rsh_agent",
                &rsh,
                "--mca",
                "btl",
                "tcp,self",
                "--mca",
                "btl_tcp_if_include",
                "198.18.0.0/24",
                "--mca",
                "oob_tcp_if_include",
                "198.18.0.0/24",
                exe.to_str().unwrap(),
                STEPS_LONG,
            ],
        ),
        Stdio::null(),
        true,
    );
    job.wait_tick(20, Duration::from_secs(90));
    let checkpoint = |kill: bool| {
        let mut args = vec![STASIS, "checkpoint", "--coordinator", addr.as_str()];
        if kill {
            args.push("--kill");
        }
        let r = bed.on(2, &args).output().unwrap();
        assert!(
            r.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&r.stderr),
            coord.stderr()
        );
    };
    checkpoint(false);
    assert_eq!(parts_of(&w.ck, 1).len(), 3, "a part per node");
    let t = job.last_tick().unwrap();
    job.wait_tick(t + 20, T_CMD);
    checkpoint(true);
    job.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let nodes = (1..=3).map(|k| bed.node(k)).collect::<Vec<_>>().join(",");
    // mpirun's part first (it was an agent before the daemons' parts were started).
    let parts = parts_of(&w.ck, 2);
    assert_eq!(parts[0], bed.node(1), "{parts:?}");
    let mut sorted = parts.clone();
    sorted.sort();
    assert_eq!(sorted.join(","), nodes, "{parts:?}");
    // Where each part goes: the node it ran on, or the next one.
    let k_of = |n: &str| (1..=3).find(|&k| bed.node(k) == n).unwrap();
    let targets: Vec<usize> = parts
        .iter()
        .map(|n| if rotate { k_of(n) % 3 + 1 } else { k_of(n) })
        .collect();
    let _second_spares: Vec<Proc> = targets[1..]
        .iter()
        .map(|&k| spare_on(&w, &bed, k, &w.dir, &addr, &format!("spare-again-{k}")))
        .collect();
    let nodes_in_order = targets
        .iter()
        .map(|&k| bed.node(k))
        .collect::<Vec<_>>()
        .join(",");
    let mut restarted = w.spawn_io(
        "restart",
        restart_cmd(&w, &bed, targets[0], &w.dir, &addr, &nodes_in_order),
        Stdio::null(),
        true,
    );
    let before = job.last_tick().unwrap();
    restarted.wait_tick(before + 20, Duration::from_secs(90));
    w.go();
    restarted.expect_exit(0, Duration::from_secs(60));
    assert_ticks_consecutive(
        &[
            ("before".into(), job.stdout()),
            ("restarted".into(), restarted.stdout()),
        ],
        Some(0),
    );
    assert_eq!(
        ok_line(&restarted.stdout()),
        want,
        "the checkpointed and restarted 3-node result differs from an uninterrupted run's"
    );
    assert!(coord.running(), "{}", coord.diag());
    coord.kill();
    bed.down();
}
