//! vLLM's port: whether something other than vLLM holds it before a spawn, and whether the
//! listening socket that answered `/health` belongs to vLLM's process group before `Ready`.
//!
//! Another server on `vllm_port` (a stale vLLM, anything on 8000) answers `/health` 200 while the
//! real child is still importing; without these checks the gateway would report ready and proxy to
//! the stranger. Ownership is read from `/proc/net/tcp{,6}` (the inode of each LISTEN socket on the
//! port) and `/proc/<pid>/fd` (which process holds that inode). Owns no state.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::resources::Exhausted;

/// What binding the port before a spawn found.
#[derive(Debug)]
pub enum PortCheck {
    Free,
    /// Something listens there; the holder, when `/proc` tells.
    Taken(Option<Holder>),
    /// The gateway could not even try, for lack of its own resources.
    Local(Exhausted),
    /// Binding failed otherwise (the spawn goes ahead and vLLM reports its own error).
    Unknown(std::io::Error),
}

/// A process holding a listening socket: its pid and its command name (never its command line,
/// which may hold secrets such as another vLLM's `--api-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub name: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.name)
    }
}

/// Tries to bind `127.0.0.1:port`, where vLLM is told to listen. SO_REUSEADDR (std sets it) keeps
/// the previous vLLM's connections in TIME_WAIT from counting as a holder.
pub fn check_free(port: u16) -> PortCheck {
    match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => PortCheck::Free,
        Err(error) if error.kind() == ErrorKind::AddrInUse => PortCheck::Taken(holder(port)),
        Err(error) => match Exhausted::from_io(&error) {
            Some(exhausted) => PortCheck::Local(exhausted),
            None => PortCheck::Unknown(error),
        },
    }
}

/// The process that holds a socket listening on `port`, if `/proc` tells.
pub fn holder(port: u16) -> Option<Holder> {
    listening_inodes(port).ok()?.into_iter().find_map(holder_of)
}

/// Whether the child whose group `pgid` leads may be declared ready on `port`: the leader is
/// still running, and every socket listening on the port where a connection to 127.0.0.1 lands
/// belongs to a process of the group. `Err` says what is wrong. Where `/proc/net/tcp` cannot be
/// read at all, or the descriptors of a process of the group cannot be (one that made itself
/// non-dumpable), nothing can be told and the probe is trusted.
pub fn group_owns_listener(pgid: u32, port: u16) -> Result<(), String> {
    let pgid = pgid as i32;
    if !running(pgid) {
        return Err("vLLM is no longer running".into());
    }
    let Ok(inodes) = listening_inodes(port) else {
        return Ok(());
    };
    if inodes.is_empty() {
        return Err(format!("nothing listens on port {port}"));
    }
    let members: Vec<i32> = processes().filter(|pid| pgrp(*pid) == Some(pgid)).collect();
    let hidden = members.iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .is_err_and(|error| error.kind() == ErrorKind::PermissionDenied)
    });
    if hidden {
        return Ok(());
    }
    for inode in &inodes {
        if !members.iter().any(|pid| owns_any(*pid, &[*inode])) {
            return Err(match holder_of(*inode) {
                Some(holder) => format!("port {port} is held by {holder}, not by vLLM's group"),
                None => format!("port {port} is held by a process outside vLLM's group"),
            });
        }
    }
    Ok(())
}

fn holder_of(inode: u64) -> Option<Holder> {
    processes().find_map(|pid| {
        owns_any(pid, &[inode]).then(|| Holder {
            pid,
            name: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|name| name.trim().to_string())
                .unwrap_or_else(|_| "?".into()),
        })
    })
}

/// Inodes of the LISTEN sockets on `port` that a connection to 127.0.0.1 reaches: bound to
/// 127.0.0.1 or to the unspecified address (v4, or v6 dual-stack). Err when `/proc/net/tcp` cannot
/// be read at all.
fn listening_inodes(port: u16) -> std::io::Result<Vec<u64>> {
    let v4 = std::fs::read_to_string("/proc/net/tcp")?;
    let v6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    Ok(v4
        .lines()
        .chain(v6.lines())
        .filter_map(|line| parse_listener(line, port))
        .collect())
}

/// One row of `/proc/net/tcp{,6}`: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_listener(line: &str, port: u16) -> Option<u64> {
    const LISTEN: &str = "0A";
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (address, local_port) = fields.get(1)?.split_once(':')?;
    if *fields.get(3)? != LISTEN || u16::from_str_radix(local_port, 16).ok()? != port {
        return None;
    }
    let reaches_loopback = match parse_address(address)? {
        IpAddr::V4(address) => address.is_unspecified() || address == Ipv4Addr::LOCALHOST,
        IpAddr::V6(address) => {
            address.is_unspecified()
                || address
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_unspecified() || v4 == Ipv4Addr::LOCALHOST)
        }
    };
    reaches_loopback
        .then(|| fields.get(9)?.parse().ok())
        .flatten()
}

/// The kernel prints each 32-bit word of the address in host byte order.
fn parse_address(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|index| {
            let word = hex.get(index * 8..index * 8 + 8)?;
            u32::from_str_radix(word, 16).ok().map(u32::to_ne_bytes)
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes).ok()?,
        ))),
        _ => None,
    }
}

/// Every pid in `/proc`.
pub(crate) fn processes() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// Whether `pid` has an open descriptor on one of the socket `inodes`.
fn owns_any(pid: i32, inodes: &[u64]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            target
                .to_str()
                .and_then(|target| target.strip_prefix("socket:["))
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok())
                .is_some_and(|inode| inodes.contains(&inode))
        })
    })
}

/// State, parent and process group of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn stat(pid: i32) -> Option<(char, i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; state, ppid and pgrp follow it.
    let mut fields = stat.rsplit_once(") ")?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, parent, group))
}

fn pgrp(pid: i32) -> Option<i32> {
    stat(pid).map(|(_, _, group)| group)
}

/// Alive and not a zombie.
fn running(pid: i32) -> bool {
    stat(pid).is_some_and(|(state, _, _)| !matches!(state, 'Z' | 'X'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_rows_of_proc_net_tcp_are_matched_by_port_and_address() {
        let loopback = format!(
            "   0: {}:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1",
            hex_v4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(parse_listener(&loopback, 8000), Some(4242));
        assert_eq!(parse_listener(&loopback, 8001), None, "another port");
        let established = loopback.replace(" 0A ", " 01 ");
        assert_eq!(parse_listener(&established, 8000), None, "not listening");
        let elsewhere = loopback.replace(
            &hex_v4(Ipv4Addr::LOCALHOST),
            &hex_v4(Ipv4Addr::new(10, 0, 0, 1)),
        );
        assert_eq!(
            parse_listener(&elsewhere, 8000),
            None,
            "127.0.0.1 does not reach it"
        );
        let any_v6 = "   1: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 77 1";
        assert_eq!(parse_listener(any_v6, 8000), Some(77));
    }

    fn hex_v4(address: Ipv4Addr) -> String {
        format!("{:08X}", u32::from_ne_bytes(address.octets()))
    }

    #[test]
    fn a_port_this_process_listens_on_is_taken_and_held_by_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        match check_free(port) {
            PortCheck::Taken(Some(holder)) => {
                assert_eq!(holder.pid, std::process::id() as i32)
            }
            other => panic!("expected the port to be taken by this process, got {other:?}"),
        }
        drop(listener);
        assert!(matches!(check_free(port), PortCheck::Free));
    }
}
