//! Jobs across several "nodes" on one machine (see common/nodes.rs):
//!
//! * a coordinator on one node and simulated agents started on the others through the
//!   nodes' remote-shell stand-in take a global checkpoint over the bridge (parts named
//!   by the nodes' hostnames) and stop with `--kill`;
//! * real parts (a program under each node's agent) checkpointed together and
//!   restarted on other nodes; a part that cannot be saved abandons the global
//!   checkpoint; a TCP connection between nodes survives restarts onto other nodes;
//! * tearing the test bed down leaves no namespace, bridge, process, state directory
//!   or OpenMPI session directory behind.
//!
//! OpenMPI jobs across nodes are in mpinodes.rs. Needs root (network namespaces; CI
//! runs as root), iproute2 and util-linux; never skipped.
mod common;
use common::nodes::*;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
                agent_on(&bed, k, &w.dir, &addr, &[counter]),
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
        agent_on(
            &bed,
            2,
            &w.dir,
            &addr,
            &[unsupported.to_str().unwrap(), "seccomp"],
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

/// Restarts the tcpnode pair's newest global checkpoint with the server's part on
/// node `at.0` (where the restart runs) and the client's on node `at.1` (through a
/// spare agent there), both in the work dir's `elsewhere`; returns (server, client)
/// once each ran 10 ticks past its previous run (`before`).
fn restart_pair(
    w: &Work,
    bed: &Bed,
    addr: &str,
    at: (usize, usize),
    before: (&Proc, &Proc),
) -> (Proc, Proc) {
    let elsewhere = w.path("elsewhere");
    let mut client = spare_on(w, bed, at.1, &elsewhere, addr, &format!("spare-{}", at.1));
    let nodes = format!("{},{}", bed.node(at.0), bed.node(at.1));
    let mut server = w.spawn_io(
        &format!("restart-server-on-{}", at.0),
        restart_cmd(w, bed, at.0, &elsewhere, addr, &nodes),
        Stdio::null(),
        true,
    );
    server.wait_tick(before.0.last_tick().unwrap() + 10, T_READY);
    client.wait_tick(before.1.last_tick().unwrap() + 10, T_READY);
    (server, client)
}

/// A TCP connection between two nodes' parts (tcpnode.c: numbered records both ways,
/// some always on their way or unread): a global checkpoint settles it and saves both
/// ends (the job runs on), a second with --kill stops both; the parts are restarted on
/// other nodes with other addresses (the server's part on node 3, the client's on node
/// 1), the connection is made again between the new addresses with each end's unread
/// bytes back in its queue, and both ends then check that every record of the other
/// came exactly once, in order. After the restart the client also opens a new
/// connection to the server's old address, which reaches the server at its new one;
/// then the job is checkpointed, killed and restarted on the same nodes in another
/// order (the client's address of the first restart is the server's first one), and
/// once more with both parts on one node, and each time a new connection to the
/// server's first address still reaches it. The first checkpoint is refused while a
/// connection of the client waits in the server's accept queue, and published once
/// the coordinator's retries find it accepted. Before the last of these restarts, the
/// client opens a connection, sends a line and closes it, the server leaving it
/// unread: it comes back on the server's end alone, closed by its peer. A checkpoint of the merged parts cannot be
/// restarted with them on two nodes: refused, naming both. Both ends check
/// every name the kernel gives them (accept, getpeername, getsockname): always the
/// addresses of the job's start.
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
        agent_on(&bed, 1, &w.dir, &addr, &[tcpnode, "server", "7500"]),
        Stdio::null(),
        true,
    );
    wait_joined(&mut server);
    let mut client = w.spawn_io(
        "agent-client",
        agent_on(
            &bed,
            2,
            &w.dir,
            &addr,
            &[tcpnode, "client", &server_at, "7500"],
        ),
        Stdio::null(),
        true,
    );
    wait_joined(&mut client);
    for p in [&mut server, &mut client] {
        p.wait_tick(5, T_READY);
    }
    // A connection from the client that the server has not accepted yet: neither end
    // could be saved (no fd holds the server's, the client's has no peer in any part),
    // so the server's part refuses it as a passing state, naming it. The coordinator
    // lets the job run on and tries again; once the server has let the connection in
    // (and closed it), the same request is published: the first global checkpoint.
    std::fs::write(w.path("deaf"), b"").unwrap();
    std::fs::write(w.path("knock"), b"").unwrap();
    client.wait_line("knocked", T_CMD, |l| l == "knocked");
    let mut first_ck = w.spawn(
        "checkpoint-1",
        bed.on(2, &[STASIS, "checkpoint", "--coordinator", &addr]),
        Stdio::null(),
    );
    let t0 = Instant::now();
    while !coord.stderr().contains("trying again") {
        assert!(
            t0.elapsed() < T_CMD && first_ck.running(),
            "{}\n{}",
            first_ck.diag(),
            coord.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = coord.stderr();
    assert!(
        log.contains(&format!(
            "the TCP listener on 0.0.0.0:7502, has a connection from {}",
            bed.addr(2)
        )) && log.contains("has not accepted yet"),
        "{log}"
    );
    // The job runs between the tries.
    for p in [&mut server, &mut client] {
        p.wait_more_ticks(2, T_CMD);
    }
    std::fs::remove_file(w.path("deaf")).unwrap();
    first_ck.expect_exit(0, T_CMD);
    server.wait_line("let in", T_CMD, |l| l == "let in");
    client.wait_line("answered", T_CMD, |l| l == "answered");
    let left: Vec<String> = std::fs::read_dir(&w.ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        ["checkpoint-000001"],
        "the abandoned tries left something (a part written while its try was abandoned?)"
    );
    for p in [&mut server, &mut client] {
        let t = p.last_tick().unwrap();
        p.wait_tick(t + 5, T_CMD);
    }
    global_checkpoint(&bed, 2, &addr, true, &coord);
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
    let ts = server.last_tick().unwrap();
    let (mut first, mut spare) = restart_pair(&w, &bed, &addr, (3, 1), (&server, &client));
    // A connection the client never had: to the server's old address, which stasis
    // redirects to its new one.
    let says = |p: &mut Proc, line: &str| {
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
    let again = |p: &mut Proc, file: &str, line: &str| {
        std::fs::write(w.path(file), b"").unwrap();
        says(p, line);
    };
    again(&mut spare, "again", "again 1 ok");
    // Once more, the server's part onto node 2 and the client's onto node 3: the same
    // nodes again in another order, so the client's address of this run (node 1's) is
    // the server's first one; a new connection to the server's first address still
    // reaches the server.
    global_checkpoint(&bed, 1, &addr, true, &coord);
    first.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    spare.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let parts = parts_of(&w.ck, 3);
    assert_eq!(
        parts,
        vec![bed.node(3), bed.node(1)],
        "parts keep their order"
    );
    let (mut second, mut spare3) = restart_pair(&w, &bed, &addr, (2, 3), (&first, &spare));
    again(&mut spare3, "again2", "again 2 ok");
    // A connection the client closed at once after sending a line the server has not
    // read yet: when the checkpoint is taken only the server's part holds an end of
    // it, which no part could make again with it; it comes back closed by its peer
    // (the line, then end of file), and nothing waits for it.
    std::fs::write(w.path("hold"), b"").unwrap();
    again(&mut spare3, "parting", "parted");
    says(&mut second, "holding");
    // And both parts onto node 1 (fewer nodes than parts): each end still sees the
    // other's first address (the two parts share one address now).
    global_checkpoint(&bed, 1, &addr, true, &coord);
    second.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    spare3.expect_exit(EXIT_CHECKPOINTED, T_CMD);
    let (mut third, mut spare4) = restart_pair(&w, &bed, &addr, (1, 1), (&second, &spare3));
    std::fs::remove_file(w.path("hold")).unwrap();
    says(&mut third, "parting ok");
    again(&mut spare4, "again3", "again 3 ok");
    // A checkpoint of the merged parts (the job runs on): restarting it with the
    // parts on different nodes again is refused, naming both parts.
    global_checkpoint(&bed, 2, &addr, false, &coord);
    let split = format!("{},{}", bed.node(2), bed.node(3));
    let out = restart_cmd(&w, &bed, 2, &w.path("elsewhere"), &addr, &split)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("parts 0 and 1 ran on one node"),
        "{err}"
    );
    third.wait_more_ticks(3, T_READY);
    w.go();
    for (label, before, p) in [
        ("server", vec![&server, &first, &second], &mut third),
        ("client", vec![&client, &spare, &spare3], &mut spare4),
    ] {
        p.expect_exit(0, T_CMD);
        let mut outs: Vec<(String, String)> = before
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("{label} run {i}"), b.stdout()))
            .collect();
        outs.push((format!("{label} restarted three times"), p.stdout()));
        assert_ticks_consecutive(&outs, Some(0));
        let ok = p
            .lines()
            .into_iter()
            .find(|l| l.starts_with("OK") || l.starts_with("FAIL"))
            .unwrap_or_default();
        assert!(ok.starts_with("OK"), "{label}: {ok:?}\n{}", p.diag());
    }
    // The records went on flowing after the restarts (not only before them).
    let after: u64 = third
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
