//! The coordinator's threads that accept connections and read their messages, each
//! passing what it reads to the state machine as an [`Event`].

use crate::protocol::{self, Msg, Role};
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::Sender;
use std::time::Duration;
use tracing::warn;

pub(super) enum Event {
    Joined {
        conn: u64,
        role: Role,
        node: String,
        pid: u32,
        part: Option<u32>,
        /// Its node's addresses (what it said, and where it connects from).
        addresses: Vec<String>,
        version: u32,
        writer: TcpStream,
    },
    Msg {
        conn: u64,
        msg: Msg,
    },
    Closed {
        conn: u64,
        why: String,
    },
    /// Asked to stop (SIGTERM): once the checkpoints asked for are done.
    Stop,
}

pub(super) fn accept_loop(listener: TcpListener, tx: Sender<Event>, hello_timeout: Duration) {
    let mut next = 0u64;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!("coordinator: accept: {e}");
                continue;
            }
        };
        next += 1;
        let conn = next;
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("coord-conn-{conn}"))
            .spawn(move || connection(conn, stream, tx, hello_timeout));
        if let Err(e) = spawned {
            warn!("coordinator: cannot start a thread for a new connection: {e}");
        }
    }
}

/// Reads one connection: the handshake (answered here when refused), then every
/// message, forwarded to the state machine.
fn connection(conn: u64, stream: TcpStream, tx: Sender<Event>, hello_timeout: Duration) {
    let peer_ip = stream.peer_addr().ok().map(|a| a.ip().to_string());
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("coordinator: connection from {peer}: {e}");
            return;
        }
    };
    let _ = writer.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_read_timeout(Some(hello_timeout));
    let mut reader = BufReader::new(stream);
    let hello = match protocol::recv(&mut reader, &format!("connection from {peer}")) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(e) => {
            warn!("coordinator: {e:#}");
            return;
        }
    };
    let Msg::Hello {
        version,
        min_version,
        role,
        node,
        pid,
        part,
        addresses,
    } = hello
    else {
        let reason = format!("the first message must be hello, not {}", hello.kind());
        warn!("coordinator: connection from {peer}: {reason}");
        let _ = protocol::send(&mut writer, &Msg::Refused { reason });
        return;
    };
    let who = format!("the {role:?} on node {node} (pid {pid}, {peer})").to_lowercase();
    let version = match protocol::negotiate(
        (min_version, version),
        (protocol::MIN_VERSION, protocol::VERSION),
        &who,
    ) {
        Ok(v) => v,
        Err(reason) => {
            warn!("coordinator: {reason}");
            let _ = protocol::send(&mut writer, &Msg::Refused { reason });
            return;
        }
    };
    let _ = reader.get_ref().set_read_timeout(None);
    if tx
        .send(Event::Joined {
            conn,
            role,
            node,
            pid,
            part,
            addresses: {
                let mut a = addresses;
                a.extend(peer_ip);
                a
            },
            version,
            writer,
        })
        .is_err()
    {
        return;
    }
    let why = loop {
        match protocol::recv(&mut reader, &who) {
            Ok(Some(msg)) => {
                if tx.send(Event::Msg { conn, msg }).is_err() {
                    return;
                }
            }
            Ok(None) => break "closed the connection".to_string(),
            Err(e) => break format!("{e:#}"),
        }
    };
    let _ = tx.send(Event::Closed { conn, why });
}
