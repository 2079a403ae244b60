/* stasis application interface (protocol version 1; see docs/API.md).
 *
 * For programs that want to cooperate with stasis (transparent checkpoint/restart):
 * ask for a checkpoint now, run code just before every checkpoint (flush buffers)
 * and just after every restart (reopen connections, read the new environment).
 * Programs that do not use it need nothing: stasis checkpoints them all the same.
 *
 * Build: compile lib/stasis.c with your program and link with -pthread, e.g.
 *     cc -I stasis/include app.c stasis/lib/stasis.c -pthread
 *
 * Under `stasis run` or `stasis restart` the environment variable STASIS_API names
 * the interface's socket; elsewhere every call fails (errno ENOENT) and
 * stasis_available() returns 0, so the same program runs with and without stasis.
 * Nothing happens before the first call: no connection, no thread. The first call
 * connects (one connection per process) and starts one thread, with every signal
 * blocked, that reads the connection and runs the hooks. Calls may come from any
 * thread. A hook may call stasis_getenv() (a post-restart hook typically does), not
 * stasis_checkpoint() or stasis_set_hooks() (they fail with EDEADLK). After fork()
 * the child has no connection and no hooks; its first call makes its own. */
#ifndef STASIS_H
#define STASIS_H

#ifdef __cplusplus
extern "C" {
#endif

/* The protocol version this header and lib/stasis.c speak. */
#define STASIS_API_VERSION 1

/* What stasis_checkpoint() returns. */
#define STASIS_CONTINUED 0 /* the checkpoint is on disk; the job continues */
#define STASIS_RESTARTED 1 /* the job was restarted from that checkpoint (or a later one) */

/* A hook, called with the `arg` given to stasis_set_hooks(). */
typedef void (*stasis_hook)(void *arg);

/* 1 if the program runs under stasis with the interface reachable (connects on the
 * first call), else 0. */
int stasis_available(void);

/* Asks for a checkpoint of the whole job now and waits until it is taken (after the
 * pre-checkpoint hooks of every process that set one, this one's included).
 * Returns STASIS_CONTINUED once it is on disk, STASIS_RESTARTED when returning in a
 * job restarted from it, or -1 with errno set (stasis_last_error() says why: the
 * checkpoint failed, not under stasis...). */
int stasis_checkpoint(void);

/* Sets the hooks (NULL: none). `pre_checkpoint` runs before every checkpoint of the
 * job, whoever asks for it (stasis, the command line, a timer, a program): stasis
 * waits until it returns, up to `--hook-timeout` (10 s by default), then checkpoints
 * anyway with a warning. `post_restart` runs once after every restart, before a
 * waiting stasis_checkpoint() returns STASIS_RESTARTED. Both run on the interface's
 * thread, concurrently with the program's threads. Replaces earlier hooks. Returns
 * 0, or -1 with errno set. */
int stasis_set_hooks(stasis_hook pre_checkpoint, stasis_hook post_restart, void *arg);

/* The value of `name` in the environment of the `stasis run` or `stasis restart`
 * supervising the job now: after a restart, the new one's (e.g. the new batch job's
 * SLURM_JOB_ID), where getenv() still gives the environment the program started
 * with. Returns a string to free(), or NULL with errno ENOENT when it is not set
 * there (or another errno on failure). */
char *stasis_getenv(const char *name);

/* Why the calling thread's last failed call failed (never NULL). */
const char *stasis_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
