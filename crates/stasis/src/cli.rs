//! Command-line interface.

use crate::{control, coord, demo, inspect, supervise};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status of `run`/`restart` when the application was stopped by
/// `stasis checkpoint --kill` (EX_TEMPFAIL: "try again later" = restart it).
pub const EXIT_CHECKPOINTED: u8 = 75;

const AFTER_HELP: &str = "\
WORKFLOW
    stasis run --dir /scratch/ckpt -- ./simulation input.dat   # start under stasis
    stasis checkpoint /scratch/ckpt                            # save, keep running
    stasis checkpoint --kill /scratch/ckpt                     # save, then stop
    stasis restart /scratch/ckpt                               # continue where it stopped
    stasis inspect /scratch/ckpt                               # what was saved

No root, kernel module or LD_PRELOAD is needed: stasis runs the application in an
unprivileged user + PID namespace, so a restarted process keeps its PID, and reads
and rebuilds it from outside with ptrace and /proc. Between checkpoints the
application runs at native speed.

Checkpoints and restarts that take more than a second show a spinner on stderr
when it is a terminal (--quiet turns it off; STASIS_PROGRESS_AFTER_MS changes the
delay). Set STASIS_LOG=debug (or use -v) for a trace of what stasis does.";

/// Transparent checkpoint/restart of Linux processes, for HPC jobs, without root.
#[derive(Parser, Debug)]
#[command(name = "stasis", version, about, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    /// Print only errors (no summary, no progress spinner).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more about what stasis does (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command under stasis so that it can be checkpointed.
    ///
    /// CMD runs in a new user and PID namespace, with a small stasis init as PID 1, so
    /// that its PIDs can be given back on restart. stasis stays in the foreground as its
    /// supervisor: Ctrl-C, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are passed on to CMD, and
    /// stasis exits with CMD's exit status (or dies of the same signal). If CMD is stopped
    /// by `stasis checkpoint --kill`, stasis exits with status 75.
    ///
    /// CMD gets stasis's standard input, output and error and its environment, plus
    /// STASIS_API, the address of the application interface through which a program
    /// may ask for checkpoints and have hooks run around them (docs/API.md); other
    /// inherited file descriptors are not passed on.
    ///
    /// DIR is where checkpoints go (created with mode 0700 if missing) and names this
    /// run for `stasis checkpoint DIR`. One run or restart at a time may use a DIR. If
    /// DIR already holds a complete checkpoint, the job is resumed from the newest one
    /// instead of starting CMD (unless --fresh). Checkpoints are taken on request
    /// (`stasis checkpoint DIR`), every --interval, and on the --checkpoint-on signal.
    #[command(
        after_help = "EXAMPLES\n    stasis run --dir $SCRATCH/ckpt -- ./solver --steps 1e6\n    stasis run --dir $SCRATCH/ckpt --interval 30m --incremental -- ./solver\n\n    # a Slurm job script that survives any number of requeues:\n    #SBATCH --signal=B:USR1@300 --requeue\n    exec stasis run --checkpoint-on USR1 --requeue --dir $SCRATCH/ckpt -- mpirun -np 4 ./app"
    )]
    Run {
        /// Checkpoint directory.
        #[arg(long, short = 'd', value_name = "DIR")]
        dir: PathBuf,
        /// The job's network: `host` (the default: the machine's interfaces, as any
        /// program has) or `private`: a network namespace of the job's own with only a
        /// loopback interface. A private network isolates the job's ports from other
        /// jobs on the node (two jobs may listen on the same port), and lets stasis save
        /// its TCP connections exactly (TCP_REPAIR: sequence numbers, unacknowledged
        /// bytes); the job cannot reach other machines. A restart
        /// gives the job a private network again.
        #[arg(long, value_name = "NET", default_value = "host", value_parser = ["host", "private"])]
        network: String,
        /// The job's /tmp and /dev/shm: `private` (the default: an empty tmpfs of the
        /// job's own on each, as Slurm's job_container/tmpfs gives, saved with every
        /// checkpoint and recreated on restart, also on another node) or `host` (the
        /// machine's, shared with everyone; files there are not saved). Two jobs under
        /// stasis use the same PIDs, so names built from PIDs (MPI session directories
        /// and shared-memory segments) collide in the host's. With `private`, DIR may
        /// still be under the host's /tmp (it is opened before the job's own is
        /// mounted); the working directory and CMD may not (refused: start the job from
        /// elsewhere, or use `--tmp host`).
        #[arg(long, value_name = "WHERE", default_value = "private", value_parser = ["private", "host"])]
        tmp: String,
        /// Checkpoint every DURATION while the job runs (e.g. 30m, 2h, 90s; a number
        /// alone is seconds), keeping the newest --keep; the job is paused only while
        /// each is taken. Each one's summary (or the error, the job running on) goes to
        /// standard error.
        #[arg(long, value_name = "DURATION", value_parser = crate::supervise::parse_duration)]
        interval: Option<std::time::Duration>,
        /// Periodic and signal-driven checkpoints store only the memory that changed
        /// since the previous one (see `stasis checkpoint --incremental`).
        #[arg(long)]
        incremental: bool,
        /// Checkpoints to keep in DIR after an automatic one.
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        keep: u32,
        /// On this signal (USR1, USR2, TERM, INT, HUP, QUIT), checkpoint the job, stop
        /// it and exit with status 75, as after `stasis checkpoint --kill`, instead of
        /// passing the signal on. With Slurm's `#SBATCH --signal=B:USR1@300` (five
        /// minutes before the time limit, to the batch shell only) the job script's
        /// line is `exec stasis run --checkpoint-on USR1 --requeue --dir DIR -- CMD`.
        #[arg(long, value_name = "SIGNAL", value_parser = crate::supervise::parse_signal)]
        checkpoint_on: Option<i32>,
        /// After a --checkpoint-on checkpoint, requeue the Slurm job this runs in
        /// (`scontrol requeue $SLURM_JOB_ID`): its next run resumes from it.
        #[arg(long, requires = "checkpoint_on")]
        requeue: bool,
        /// For the checkpoints taken by --interval and --checkpoint-on: what to do with
        /// a TCP connection to a peer outside the job (see `stasis checkpoint
        /// --tcp-external`): `refuse` (that checkpoint fails, the job runs on) or
        /// `reset` (it comes back reset after a restart).
        #[arg(long, value_name = "HOW", default_value = "refuse", value_parser = ["refuse", "reset"])]
        tcp_external: String,
        /// For every checkpoint taken while this command supervises the job (automatic
        /// ones and those asked for with `stasis checkpoint`): what to do with a UNIX
        /// socket connected to a socket outside the job (see `stasis checkpoint
        /// --unix-external`): `refuse` or `reconnect`.
        #[arg(long, value_name = "HOW", default_value = "refuse", value_parser = ["refuse", "reconnect"])]
        unix_external: String,
        /// How long a checkpoint waits for the pre-checkpoint hooks of the programs
        /// that use the stasis application interface (docs/API.md) to return; one that
        /// has not returned by then is checkpointed anyway, with a warning.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::supervise::parse_duration)]
        hook_timeout: std::time::Duration,
        /// Start CMD anew even though DIR holds checkpoints. Without it, `stasis run`
        /// in a directory that holds a complete checkpoint resumes the job from the
        /// newest one (a damaged one is passed over with a warning), so one unchanged
        /// job script line survives any number of requeues.
        #[arg(long)]
        fresh: bool,
        /// Run CMD as this node's part of a job that spans several nodes, checkpointed
        /// only together with the other nodes' parts by the coordinator at ADDR:PORT
        /// (see `stasis agent`, which this is with DIR as the part's local directory):
        /// its checkpoints go to the coordinator's directory, not DIR.
        #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["interval", "incremental", "checkpoint_on", "requeue", "fresh", "network"])]
        coordinator: Option<String>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Save the state of a running application into its checkpoint directory.
    ///
    /// With DIR, asks the stasis supervising that directory (`stasis run` or `stasis
    /// restart`) to checkpoint its application. With --pid, checkpoints a process that
    /// was not started by stasis (it must be yours and not being traced; its descendants are saved with it);
    /// it is then restarted under stasis.
    ///
    /// The application is paused while its state is read, then resumes (or, with --kill,
    /// is killed once the checkpoint is safely on disk). A single process under `stasis
    /// run`/`restart` is paused only until a copy-on-write snapshot of its memory is
    /// taken (tens of milliseconds); its pages are written from the snapshot while it
    /// runs on. A process tree stays paused until its pages are written. A checkpoint appears in DIR as
    /// checkpoint-NNNNNN only once complete and synced; the previous one stays until then.
    /// If anything cannot be saved (an unsupported resource, a full disk, the process
    /// exiting), nothing is published, the application keeps running, and the error names
    /// what failed.
    #[command(
        after_help = "EXAMPLES\n    stasis checkpoint $SCRATCH/ckpt\n    stasis checkpoint --kill $SCRATCH/ckpt            # before the wall-time limit\n    stasis checkpoint --pid 12345 --dir $SCRATCH/ckpt"
    )]
    Checkpoint {
        /// Checkpoint directory of a `stasis run`/`restart` (or with --pid, --dir).
        #[arg(value_name = "DIR", required_unless_present_any = ["pid", "coordinator"])]
        target: Option<PathBuf>,
        /// Take a global checkpoint of the job of the `stasis coordinator` at ADDR:PORT
        /// (every agent's part, published as one checkpoint in the coordinator's DIR);
        /// of the other options only --kill applies.
        #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["target", "pid", "dir"])]
        coordinator: Option<String>,
        /// Checkpoint this process instead (not started by stasis).
        #[arg(long, value_name = "PID", requires = "dir")]
        pid: Option<i32>,
        /// Checkpoint directory for --pid.
        #[arg(long, short = 'd', value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Kill the application once the checkpoint is on disk.
        #[arg(long)]
        kill: bool,
        /// Store only the memory pages that changed since the newest checkpoint in DIR
        /// and refer to earlier checkpoints for the rest. Those are kept (whatever
        /// --keep says) as long as a kept checkpoint needs them. Changed pages are known
        /// from dirty-page tracking when the newest checkpoint was also taken with
        /// --incremental by the same `stasis run`/`restart` (the first one arms it),
        /// otherwise found by comparing content hashes. When few pages changed they are
        /// copied while the application stays frozen, if that pauses it no longer than
        /// forking a snapshot would (the summary says which was done).
        #[arg(long)]
        incremental: bool,
        /// Keep this many newest checkpoints in DIR and remove older ones.
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        keep: u32,
        /// Compress memory pages: zstd (smaller) or lz4 (faster), in parallel on every
        /// core. Worth it when the checkpoint goes to a slow or shared file system;
        /// on local disks and tmpfs compressing usually costs more time than it saves,
        /// so the default is none (zero pages are never stored either way).
        #[arg(long, value_name = "HOW", default_value = "none", value_parser = ["none", "zstd", "lz4"])]
        compress: String,
        /// What to do with a TCP connection to a peer outside the checkpoint (a
        /// database, a license server, a web service). `refuse` (the default): the
        /// checkpoint fails with an error naming the socket and the remote address, and
        /// the application keeps running. `reset`: the checkpoint goes on without
        /// touching the connection; after a restart the application finds it reset
        /// (ECONNRESET on its next use), as after a network failure, and a client that
        /// reconnects goes on. Connections between processes of the job, listening
        /// sockets and UDP sockets are always saved, with the bytes in flight.
        #[arg(long, value_name = "HOW", default_value = "refuse", value_parser = ["refuse", "reset"])]
        tcp_external: String,
        /// What to do with a UNIX domain socket connected to a socket outside the
        /// checkpoint (a local daemon, an X server, a database's socket file).
        /// `refuse` (the default): the checkpoint fails with an error naming the socket
        /// and the application keeps running. `reconnect`: it is saved with the name of
        /// the socket it is connected to, and a restart connects it again to that name
        /// (a path or an abstract name): a new connection, which the server sees as a
        /// new client; the restart fails with a clear error when nothing listens there.
        /// A connection whose outside peer has no name (an accepted client), or that
        /// holds bytes from it the application has not read, is still refused.
        #[arg(long, value_name = "HOW", default_value = "refuse", value_parser = ["refuse", "reconnect"])]
        unix_external: String,
    },
    /// Restart an application from the newest complete checkpoint in DIR.
    ///
    /// The checkpoint is verified (checksums of every file) before anything is created.
    /// The application gets its old PIDs back in a new user and PID namespace and is
    /// supervised as with `stasis run`, so it can be checkpointed again. Its standard
    /// input, output and error that came from outside stasis are bound to this command's
    /// own, so a requeued job writes where its new job script says; files it opened
    /// itself are reopened at the same offsets. Mapped files (the executable, libraries)
    /// must be unchanged since the checkpoint.
    Restart {
        /// Checkpoint directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Restart from this checkpoint (a number or a checkpoint-NNNNNN directory name)
        /// instead of the newest.
        #[arg(long, value_name = "N")]
        from: Option<String>,
        /// How long a checkpoint waits for the pre-checkpoint hooks of the programs
        /// that use the stasis application interface (docs/API.md) to return; one that
        /// has not returned by then is checkpointed anyway, with a warning.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::supervise::parse_duration)]
        hook_timeout: std::time::Duration,
        /// For a process checkpointed with --pid whose standard streams were regular
        /// files (`nohup ./sim >out.log &`): `restore` (the default) reopens them at
        /// their offsets, so it writes on into its log; `inherit` binds them to this
        /// command's standard input, output and error instead. Streams that cannot be
        /// reopened (a terminal, a pipe from outside) and those of a job started by
        /// `stasis run` are always bound to this command's.
        #[arg(long, value_name = "HOW", default_value = "restore", value_parser = ["restore", "inherit"])]
        stdio: String,
        /// Restart a global checkpoint of a job that spans several nodes (DIR: the
        /// coordinator's directory, whose newest checkpoint is taken, or one
        /// checkpoint-NNNNNN in it) through the coordinator at ADDR:PORT: the K-th node
        /// part goes to the K-th node of --nodes, restarted there by the spare agent
        /// (`stasis agent --coordinator ADDR:PORT` without a command) that must run on
        /// it; the first node's part is restarted by this command itself, which must run
        /// on the first node, and whose output is that part's.
        #[arg(long, value_name = "ADDR:PORT", requires = "nodes")]
        coordinator: Option<String>,
        /// The nodes of a multi-node restart, comma-separated, one per node part of
        /// the checkpoint, in part order (see --coordinator). A node may be named
        /// several times (fewer nodes than parts), with as many spare agents started
        /// on it: the parts there share its address, and a listening port two of them
        /// held moves for one (the job's processes still see the old one).
        #[arg(
            long,
            value_name = "HOST,HOST,...",
            value_delimiter = ',',
            requires = "coordinator"
        )]
        nodes: Vec<String>,
        /// With --coordinator: wait up to SECS for the coordinator to listen and for
        /// the spare agent of each node of --nodes to join it (started by the same
        /// job script, they may come a moment later); without, either missing is an
        /// error at once. Default: $STASIS_WAIT_AGENTS, else 0. `stasis
        /// ssh` waits as long as $STASIS_WAIT_AGENTS says.
        #[arg(long, value_name = "SECS", requires = "coordinator")]
        wait_agents: Option<u64>,
    },
    /// Show what the newest checkpoint in DIR holds.
    ///
    /// Verifies the checkpoint and prints its processes, memory mappings with sizes, file
    /// descriptors, signal state and timings; --json prints the full metadata for scripts.
    Inspect {
        /// Checkpoint directory (or one checkpoint-NNNNNN directory in it).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Say whether the job of DIR runs, and list its checkpoints.
    ///
    /// For each checkpoint: when it was taken, its size, how many processes it holds,
    /// how long the job was paused for it, and the earlier checkpoints an incremental
    /// one needs. Reads the files as they are (`stasis verify` checks them); --json
    /// prints the same for scripts.
    Status {
        /// Checkpoint directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that checkpoints are intact, without restoring anything.
    ///
    /// Reads every file of every checkpoint in DIR (or only the newest with --latest) and
    /// checks its size and the checksum of every chunk, and that the metadata parses.
    /// Exits 0 when all checked checkpoints are intact, 1 otherwise (the newest intact
    /// one is named, so that `stasis restart --from N` can use it).
    Verify {
        /// Checkpoint directory (or one checkpoint-NNNNNN directory in it).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Only the newest checkpoint.
        #[arg(long)]
        latest: bool,
    },
    /// Demonstrate stasis: run a built-in counter, checkpoint it, kill it, restart it
    /// and show that it continues where it was.
    Demo {
        /// Directory for the demonstration's checkpoints (default: a temporary one).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Coordinate the checkpoints of a job that spans several nodes.
    ///
    /// Agents (`stasis agent --coordinator ADDR:PORT`, one per node) connect to it;
    /// `stasis checkpoint --coordinator ADDR:PORT` asks it for a global checkpoint:
    /// every agent freezes its part, then every agent writes it into
    /// DIR/checkpoint-NNNNNN/node-K and syncs it, and only then is the checkpoint
    /// published (one rename) and the job resumed (or killed with --kill). If an agent
    /// fails, is lost or does not answer within --timeout in any phase, the checkpoint
    /// is abandoned: every part runs on and nothing is published. A part in a passing
    /// state that cannot be saved yet (a connection from another node not accepted
    /// yet) is tried again while the job runs: after 50 ms, then waits doubling up to
    /// 2 s, 8 tries in all. The protocol is docs/PROTOCOL.md. It serves until SIGTERM, SIGINT or SIGHUP, after which it
    /// finishes the checkpoint in progress (and answers its client) before it exits; a
    /// second signal stops it at once.
    #[command(
        after_help = "EXAMPLES\n    stasis coordinator --listen 0.0.0.0:7070 --dir $SCRATCH/ckpt &\n    stasis agent --coordinator head:7070 --simulate &      # on each node\n    stasis checkpoint --coordinator head:7070"
    )]
    Coordinator {
        /// Address and port to listen on (port 0 picks a free one; the address is printed).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// Where global checkpoints go (created with mode 0700 if missing); it must be
        /// on a file system every agent writes to.
        #[arg(long, short = 'd', value_name = "DIR")]
        dir: PathBuf,
        /// How long every agent has for each phase of a checkpoint.
        #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = crate::supervise::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Take part in the checkpoints of a job that spans several nodes, for this node.
    ///
    /// Connects to the coordinator (retrying for 30 s while it is not listening yet).
    /// With CMD, runs CMD under stasis as this node's part of the job (as `stasis run`
    /// would: its own PID, IPC and user namespaces, private /tmp and /dev/shm unless
    /// `--tmp host`) and exits with its status (75 after `checkpoint --coordinator ...
    /// --kill`). At each global checkpoint the part is frozen, waits until every
    /// node's part is frozen, is written into the node's directory of the global
    /// checkpoint (which must not be under /tmp or /dev/shm with `--tmp private`: the
    /// job sees its own there), waits until every part is written, then runs on or is
    /// killed. --simulate simulates the part instead (a short file written per
    /// checkpoint). Without CMD and without --simulate the agent only offers its node
    /// (a spare), and takes no part in checkpoints until a part runs on it.
    ///
    /// TCP connections between the nodes' parts are saved at both ends (once every byte
    /// sent is acknowledged) and made again at restart between the nodes' new
    /// addresses. Without CMD the agent is a spare: `stasis ssh` (a launcher's remote
    /// shell) starts a part on it, and `stasis restart --coordinator --nodes` restarts
    /// one there.
    #[command(
        after_help = "EXAMPLES\n    stasis coordinator --listen 0.0.0.0:7070 --dir $SCRATCH/ckpt &\n    stasis agent --coordinator head:7070 &          # on every other node (spare)\n    stasis agent --coordinator head:7070 -- mpirun --mca plm_rsh_agent \"stasis ssh\" ./app\n    stasis checkpoint --coordinator head:7070 --kill\n    stasis restart --coordinator head:7070 --nodes n7,n8 $SCRATCH/ckpt   # on n7"
    )]
    Agent {
        /// The coordinator's address.
        #[arg(long, value_name = "ADDR:PORT")]
        coordinator: String,
        /// The node's name (default: the host name).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Simulate this node's part of the job.
        #[arg(long)]
        simulate: bool,
        /// (tests) Make a simulated phase (freeze, dump, resume, kill, abort) take this long.
        #[arg(long, hide = true, value_name = "PHASE=DURATION")]
        simulate_delay: Vec<String>,
        /// (tests) Make a simulated phase fail.
        #[arg(long, hide = true, value_name = "PHASE")]
        simulate_fail: Option<String>,
        /// (tests) Make the first N simulated dumps meet a passing state (the
        /// coordinator tries again).
        #[arg(long, hide = true, value_name = "N", default_value_t = 0)]
        simulate_passing: u32,
        /// (tests) Write the simulated part's state to this file.
        #[arg(long, hide = true, value_name = "FILE")]
        simulate_state: Option<PathBuf>,
        /// (tests) Speak only this protocol version.
        #[arg(long, hide = true, value_name = "N")]
        protocol_version: Option<u32>,
        /// The part's /tmp and /dev/shm, as `stasis run --tmp`.
        #[arg(long, value_name = "WHERE", default_value = "private", value_parser = ["private", "host"])]
        tmp: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// A remote shell for launchers (`mpirun --mca plm_rsh_agent "stasis ssh"`): starts
    /// COMMAND on NODE as a new part of the multi-node job, through the coordinator and
    /// the spare agent that runs on NODE (`stasis agent --coordinator ADDR:PORT` without
    /// a command, as a batch system's prolog would start it).
    ///
    /// Called as ssh is: `stasis ssh [SSH-OPTIONS] NODE COMMAND...`; ssh's options are
    /// accepted and ignored, the words of COMMAND are joined by spaces and run by `bash
    /// -c` in the agent's directory. Like a remote shell whose command detaches, it
    /// returns as soon as COMMAND runs under stasis there (its output goes to that
    /// agent's). The coordinator is --coordinator, else $STASIS_COORDINATOR, which every
    /// part of a multi-node job has in its environment.
    #[command(
        after_help = "EXAMPLES\n    # in a part started by `stasis agent --coordinator head:7070 -- mpirun ...`:\n    mpirun --mca plm_rsh_agent \"stasis ssh\" --host n1,n2,n3 -np 3 ./app"
    )]
    Ssh {
        /// The coordinator's address (default: $STASIS_COORDINATOR).
        #[arg(long, value_name = "ADDR:PORT")]
        coordinator: Option<String>,
        /// [SSH-OPTIONS] NODE COMMAND...
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// The coordinator benchmark (scripts/bench-coord.sh).
    #[command(hide = true, name = "coord-bench")]
    CoordBench {
        /// Numbers of agents, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        agents: Vec<usize>,
        /// Global checkpoints per number of agents.
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// Each agent writes and syncs a 4 KiB part instead of nothing.
        #[arg(long)]
        write: bool,
        /// Scratch directory (default: one in $TMPDIR, removed after).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// The namespace init of `run` and `restart`, executed again by itself in the
    /// namespaces (internal).
    #[command(hide = true, name = "__init")]
    Init {
        /// What it is started with (JSON).
        args: String,
    },
    /// The built-in workload of `stasis demo` (prints a counter).
    #[command(hide = true)]
    DemoWorkload {
        /// Number of ticks to count to.
        #[arg(default_value_t = 40)]
        ticks: u64,
    },
}

/// Runs the parsed command; returns the process exit code.
pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run {
            dir,
            network,
            tmp,
            interval,
            incremental,
            keep,
            checkpoint_on,
            requeue,
            tcp_external,
            unix_external,
            hook_timeout,
            fresh,
            coordinator,
            cmd,
        } => {
            if let Some(addr) = coordinator {
                let sim = coord::Simulation::off();
                let launch = coord::Launch::Run {
                    cmd,
                    dir: Some(dir),
                };
                return coord::agent(
                    &addr,
                    None,
                    tmp == "private",
                    sim,
                    None,
                    Some(launch),
                    cli.quiet,
                );
            }
            let opts = supervise::JobOptions {
                private_network: network == "private",
                private_tmp: tmp == "private",
                stdio_inherit: false,
                interval,
                incremental,
                keep: keep as usize,
                checkpoint_on,
                requeue,
                tcp_external_reset: tcp_external == "reset",
                unix_external_reconnect: unix_external == "reconnect",
                hook_timeout,
            };
            supervise::run(&dir, &cmd, opts, fresh)
        }
        Command::Checkpoint {
            target,
            pid,
            dir,
            kill,
            keep,
            incremental,
            compress,
            tcp_external,
            unix_external,
            coordinator,
        } => {
            if let Some(addr) = coordinator {
                return coord::checkpoint(&addr, kill, cli.quiet);
            }
            let req = control::Request {
                kill,
                keep: keep as usize,
                incremental,
                compress: compress.parse().map_err(anyhow::Error::msg)?,
                tcp_external_reset: tcp_external == "reset",
                unix_external_reconnect: unix_external == "reconnect",
                fault: stasis_sys::fault::Plan::from_env(),
                coordinated: false,
                peers: Vec::new(),
            };
            let report = match pid {
                Some(pid) => {
                    let dir = dir.context("--pid needs --dir")?;
                    if target.is_some() {
                        bail!("give either DIR or --pid with --dir, not both");
                    }
                    control::checkpoint_pid(&dir, pid, &req, !cli.quiet)?
                }
                None => {
                    let dir = target.or(dir).context("missing DIR")?;
                    control::request_checkpoint(&dir, &req, !cli.quiet)?
                }
            };
            if !cli.quiet {
                eprintln!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart {
            dir,
            from,
            coordinator: Some(addr),
            nodes,
            wait_agents,
            ..
        } => coord::restart(
            &addr,
            &nodes,
            &dir,
            from.as_deref(),
            coord::agents_wait(wait_agents),
            cli.quiet,
        ),
        Command::Restart {
            dir,
            from,
            hook_timeout,
            stdio,
            ..
        } => supervise::restart(
            &dir,
            from.as_deref(),
            hook_timeout,
            stdio == "inherit",
            !cli.quiet,
        ),
        Command::Inspect { dir, json } => inspect::inspect(&dir, json).map(|()| ExitCode::SUCCESS),
        Command::Status { dir, json } => {
            crate::status::status(&dir, json).map(|()| ExitCode::SUCCESS)
        }
        Command::Verify { dir, latest } => inspect::verify(&dir, latest),
        Command::Demo { dir } => demo::demo(dir),
        Command::Coordinator {
            listen,
            dir,
            timeout,
        } => coord::coordinator(&listen, &dir, timeout, cli.quiet),
        Command::Agent {
            coordinator,
            node,
            simulate,
            simulate_delay,
            simulate_fail,
            simulate_passing,
            simulate_state,
            protocol_version,
            tmp,
            cmd,
        } => coord::agent(
            &coordinator,
            node,
            tmp == "private",
            coord::Simulation {
                enabled: simulate,
                delays: simulate_delay,
                fail: simulate_fail,
                passing: simulate_passing,
                state_file: simulate_state,
            },
            protocol_version,
            (!cmd.is_empty()).then_some(coord::Launch::Run { cmd, dir: None }),
            cli.quiet,
        ),
        Command::Ssh { coordinator, args } => coord::ssh(coordinator, &args, cli.quiet),
        Command::CoordBench {
            agents,
            rounds,
            write,
            dir,
        } => coord::bench(&agents, rounds, write, dir),
        Command::Init { args } => Ok(supervise::init_resume(&args)),
        Command::DemoWorkload { ticks } => demo::workload(ticks),
    }
}
