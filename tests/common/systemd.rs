//! A stand-in for systemd's notify socket: a real datagram socket (a path, or an abstract name)
//! that records every message the gateway sends, one line each.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};

use super::accepts_connections;

/// Collects every datagram, noting for READY=1 whether the proxy port already accepted connections.
pub struct Systemd {
    messages: Arc<Mutex<Vec<String>>>,
    pub socket_env: String,
    _dir: tempfile::TempDir,
}

impl Systemd {
    pub fn listen(abstract_name: bool, proxy_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, socket_env) = if abstract_name {
            let name = format!("gateway-test-{}-{}", std::process::id(), fastrand::u64(..));
            let address =
                SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
            (
                UnixDatagram::bind_addr(&address).expect("bind abstract"),
                format!("@{name}"),
            )
        } else {
            let path = dir.path().join("notify.sock");
            (
                UnixDatagram::bind(&path).expect("bind path"),
                path.to_str().expect("utf-8").to_string(),
            )
        };
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&messages);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(len) = socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..len]).to_string();
                let mut sink = sink.lock().expect("lock");
                for line in text.lines() {
                    if line == "READY=1" && !accepts_connections(proxy_port) {
                        sink.push("READY=1 (before the listener accepted)".into());
                    } else {
                        sink.push(line.to_string());
                    }
                }
            }
        });
        Systemd {
            messages,
            socket_env,
            _dir: dir,
        }
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("lock").clone()
    }

    pub fn count(&self, line: &str) -> usize {
        self.messages()
            .iter()
            .filter(|message| *message == line)
            .count()
    }

    pub fn position(&self, predicate: impl Fn(&str) -> bool) -> Option<usize> {
        self.messages()
            .iter()
            .position(|message| predicate(message))
    }
}
