//! A stand-in for systemd's notify socket: a real datagram socket (a path, or an abstract name)
//! that records every message the gateway sends, one line each.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DEADLINE, accepts_connections};

/// Collects every datagram, noting for READY=1 whether the proxy port already accepted connections.
pub struct Systemd {
    messages: Arc<Mutex<Vec<String>>>,
    /// The gateway's proxy port, known only once the gateway (started after this socket, which it
    /// is given) reports it; 0 until then.
    proxy_port: Arc<AtomicU16>,
    pub socket_env: String,
    _dir: tempfile::TempDir,
}

impl Systemd {
    /// Binds the socket to give the gateway as `$NOTIFY_SOCKET`; once the gateway has reported
    /// its proxy port, the test passes it to [`Systemd::set_proxy_port`].
    pub fn listen(abstract_name: bool) -> Self {
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
        let proxy_port = Arc::new(AtomicU16::new(0));
        let port = Arc::clone(&proxy_port);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(len) = socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..len]).to_string();
                let mut sink = sink.lock().expect("lock");
                for line in text.lines() {
                    if line == "READY=1" && !accepts_connections(known_port(&port)) {
                        sink.push("READY=1 (before the listener accepted)".into());
                    } else {
                        sink.push(line.to_string());
                    }
                }
            }
        });
        Systemd {
            messages,
            proxy_port,
            socket_env,
            _dir: dir,
        }
    }

    /// The gateway's proxy port, which READY=1 must find accepting connections.
    pub fn set_proxy_port(&self, port: u16) {
        self.proxy_port.store(port, Ordering::SeqCst);
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

    /// Waits until `line` has come `count` times; on timeout the panic shows every message.
    pub fn wait_count(&self, line: &str, count: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.count(line) != count {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {line} x{count}: {:?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn position(&self, predicate: impl Fn(&str) -> bool) -> Option<usize> {
        self.messages()
            .iter()
            .position(|message| predicate(message))
    }
}

/// The proxy port once the test has set it. READY=1 comes only after vLLM is ready, long after the
/// gateway reports its port, so this waits only on a test that has not set it yet; the listener,
/// once open, stays open while the gateway serves, so a check made a little late sees the same.
fn known_port(port: &AtomicU16) -> u16 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let known = port.load(Ordering::SeqCst);
        if known != 0 || Instant::now() > deadline {
            return known;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
