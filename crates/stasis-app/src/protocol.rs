//! The wire protocol between an application and stasis (version 1), shared by this
//! crate (the client), the C library (`include/stasis.h`, `lib/stasis.c`, which speaks
//! the same lines) and the stasis init (the server). docs/API.md describes it for
//! people; this module is its definition.
//!
//! One stream connection per process to the UNIX socket named by the environment
//! variable [`ENV`] (a name starting with `@` is in the abstract namespace). Every
//! message is one line of at most [`MAX_LINE`] bytes ending in `\n`; words are
//! separated by one space. Receivers ignore empty lines, and clients ignore events
//! they do not know (a later version may add some).

/// The environment variable naming the API socket.
pub const ENV: &str = "STASIS_API";
/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;
/// The longest line either side sends, newline included.
pub const MAX_LINE: usize = 65536;

/// A line from the application to stasis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `hello VERSION [pre-checkpoint]`: the first line of a connection (and again
    /// whenever the application changes its wish): the client's protocol version and
    /// whether it wants `pre-checkpoint` events.
    Hello { version: u32, pre_checkpoint: bool },
    /// `checkpoint`: take a checkpoint of the whole job now.
    Checkpoint,
    /// `ack SEQ`: the pre-checkpoint hook for event SEQ has run.
    Ack(u64),
    /// `getenv NAME`: the value of NAME in the environment of the `stasis run` or
    /// `stasis restart` now supervising the job (after a restart: the new one's, e.g.
    /// the new batch job's). NAME is [`encode`]d.
    Getenv(Vec<u8>),
    /// `sync SEQ`: answered `ok sync SEQ` once every request sent before it is
    /// answered (after a restart, a client tells with it whether a request waiting for
    /// its answer went to the previous stasis, and was lost, or to the new one).
    Sync(u64),
}

/// A line from stasis to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `ok hello VERSION`: the version stasis speaks on this connection.
    Hello { version: u32 },
    /// `ok checkpoint PATH`: the checkpoint asked for was taken (the application
    /// continues after it, not restarted).
    Checkpointed { path: String },
    /// `ok getenv VALUE`: the value asked for ([`encode`]d).
    Value(Vec<u8>),
    /// `ok sync SEQ`: every request sent before `sync SEQ` is answered.
    Synced(u64),
    /// `error VERB MESSAGE`: the request VERB failed.
    Error { verb: String, message: String },
    /// `event pre-checkpoint SEQ`: a checkpoint is about to be taken; answer `ack SEQ`
    /// once buffers are flushed.
    PreCheckpoint(u64),
    /// `event restarted PATH`: the job was restarted from the checkpoint PATH; the
    /// first line of each re-made connection, preceded by an empty line.
    Restarted { path: String },
    /// A line this version does not know.
    Unknown(String),
}

const PRE: &str = "pre-checkpoint";

impl Request {
    /// The line, newline included.
    pub fn line(&self) -> String {
        let pre = |p: bool| if p { format!(" {PRE}") } else { String::new() };
        match self {
            Request::Hello {
                version,
                pre_checkpoint,
            } => format!("hello {version}{}\n", pre(*pre_checkpoint)),
            Request::Checkpoint => "checkpoint\n".to_string(),
            Request::Ack(seq) => format!("ack {seq}\n"),
            Request::Getenv(name) => format!("getenv {}\n", encode(name)),
            Request::Sync(seq) => format!("sync {seq}\n"),
        }
    }

    /// Parses a line (without its newline). Err names what is wrong, for the reply.
    pub fn parse(line: &str) -> Result<Request, (String, String)> {
        let mut words = line.split(' ');
        let verb = words.next().unwrap_or_default().to_string();
        let bad = |what: &str| (verb.clone(), what.to_string());
        let version = |w: Option<&str>| {
            w.and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| bad("expects a protocol version"))
        };
        match verb.as_str() {
            "hello" => {
                let version = version(words.next())?;
                // Other words: options of a later version, ignored.
                let pre_checkpoint = words.any(|w| w == PRE);
                Ok(Request::Hello {
                    version,
                    pre_checkpoint,
                })
            }
            "checkpoint" => Ok(Request::Checkpoint),
            "getenv" => Ok(Request::Getenv(decode(words.next().unwrap_or_default()))),
            "ack" | "sync" => {
                let seq = words
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("expects a number"))?;
                Ok(if verb == "ack" {
                    Request::Ack(seq)
                } else {
                    Request::Sync(seq)
                })
            }
            _ => Err(bad("unknown request")),
        }
    }
}

impl Reply {
    /// The line, newline included (a `restarted` event starts with an empty line, which
    /// ends whatever line the previous connection left unfinished).
    pub fn line(&self) -> String {
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        match self {
            Reply::Hello { version } => format!("ok hello {version}\n"),
            Reply::Checkpointed { path } => format!("ok checkpoint {}\n", one_line(path)),
            Reply::Value(v) => format!("ok getenv {}\n", encode(v)),
            Reply::Synced(seq) => format!("ok sync {seq}\n"),
            Reply::Error { verb, message } => {
                format!("error {} {}\n", one_line(verb), one_line(message))
            }
            Reply::PreCheckpoint(seq) => format!("event {PRE} {seq}\n"),
            Reply::Restarted { path } => format!("\nevent restarted {}\n", one_line(path)),
            Reply::Unknown(l) => format!("{}\n", one_line(l)),
        }
    }

    /// Parses a line (without its newline).
    pub fn parse(line: &str) -> Reply {
        let unknown = || Reply::Unknown(line.to_string());
        let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
        match head {
            "ok" => {
                let (verb, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                match verb {
                    "hello" => arg
                        .parse()
                        .map(|version| Reply::Hello { version })
                        .unwrap_or_else(|_| unknown()),
                    "checkpoint" => Reply::Checkpointed {
                        path: arg.to_string(),
                    },
                    "getenv" => Reply::Value(decode(arg)),
                    "sync" => arg.parse().map(Reply::Synced).unwrap_or_else(|_| unknown()),
                    _ => unknown(),
                }
            }
            "error" => {
                let (verb, message) = rest.split_once(' ').unwrap_or((rest, ""));
                Reply::Error {
                    verb: verb.to_string(),
                    message: message.to_string(),
                }
            }
            "event" => {
                let (what, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                match what {
                    PRE => arg
                        .parse()
                        .map(Reply::PreCheckpoint)
                        .unwrap_or_else(|_| unknown()),
                    "restarted" => Reply::Restarted {
                        path: arg.to_string(),
                    },
                    _ => unknown(),
                }
            }
            _ => unknown(),
        }
    }
}

/// Encodes bytes as one word of a line: printable ASCII other than `%` as it is,
/// every other byte (space included) as `%XX` (two hexadecimal digits).
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Decodes what [`encode`] made (a `%` not followed by two hexadecimal digits is
/// taken as it is).
pub fn decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Takes the first complete, non-empty line off the front of `buf` (bytes read so
/// far), if there is one. A line too long for the protocol is cut at [`MAX_LINE`]
/// (and will not parse); bytes beyond [`MAX_LINE`] without a line end are dropped.
pub fn take_line(buf: &mut Vec<u8>) -> Option<String> {
    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=nl).take(nl.min(MAX_LINE)).collect();
        if !line.is_empty() {
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
    }
    if buf.len() >= MAX_LINE {
        buf.clear();
    }
    None
}

/// Every complete line of `buf` (see [`take_line`]).
pub fn take_lines(buf: &mut Vec<u8>) -> Vec<String> {
    std::iter::from_fn(|| take_line(buf)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Hello {
                version: 1,
                pre_checkpoint: true,
            },
            Request::Hello {
                version: 1,
                pre_checkpoint: false,
            },
            Request::Checkpoint,
            Request::Ack(42),
            Request::Getenv(b"SLURM_JOB_ID".to_vec()),
            Request::Getenv(b"odd name\n%".to_vec()),
            Request::Sync(3),
        ] {
            let l = r.line();
            assert_eq!(Request::parse(l.trim_end_matches('\n')), Ok(r));
        }
        assert!(Request::parse("frobnicate").is_err());
        assert!(Request::parse("hello").is_err());
        assert_eq!(
            Request::parse("hello 2 pre-checkpoint colour=blue"),
            Ok(Request::Hello {
                version: 2,
                pre_checkpoint: true
            })
        );
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Hello { version: 1 },
            Reply::Checkpointed {
                path: "/scratch/ck/checkpoint-000003".into(),
            },
            Reply::Error {
                verb: "checkpoint".into(),
                message: "checkpoint failed: no space".into(),
            },
            Reply::PreCheckpoint(9),
            Reply::Synced(4),
            Reply::Value(b"a b\nc%d\xff".to_vec()),
            Reply::Value(Vec::new()),
            Reply::Restarted {
                path: "/a b/checkpoint-000001".into(),
            },
        ] {
            let mut buf = r.line().into_bytes();
            let lines = take_lines(&mut buf);
            assert_eq!(lines.len(), 1, "{r:?}");
            assert_eq!(Reply::parse(&lines[0]), r);
        }
        assert_eq!(
            Reply::parse("event tea-time 3"),
            Reply::Unknown("event tea-time 3".into())
        );
    }

    #[test]
    fn an_unfinished_line_is_ended_by_a_restart() {
        let mut buf = b"ok checkp".to_vec();
        assert!(take_lines(&mut buf).is_empty());
        buf.extend_from_slice(Reply::Restarted { path: "/c".into() }.line().as_bytes());
        let lines = take_lines(&mut buf);
        assert_eq!(lines.len(), 2);
        assert_eq!(Reply::parse(&lines[0]), Reply::Unknown("ok checkp".into()));
        assert_eq!(
            Reply::parse(&lines[1]),
            Reply::Restarted { path: "/c".into() }
        );
        assert!(buf.is_empty());
    }
}
