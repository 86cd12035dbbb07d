//! Whether a node that did not answer a probe is dead, or alive and stalled.
//!
//! A probe (a one-sided fetch-and-add of 0, [`super::watchdog`]) that times out only says
//! the node's fabric did not answer: its process may be stopped (SIGSTOP, a debugger, a
//! swap storm) past the fault timeout and come back. Declaring it dead then would be wrong
//! for good: its requests and barrier arrivals would be dropped as a dead node's, and it
//! would wait forever. So a silent node is declared dead only when its process is found
//! gone, with a check that does not need the process to run:
//! - `shm` (same host): its pid (in its address) no longer exists, or is a zombie;
//! - `tcp`: a TCP connection to its endpoint's listening address is refused (the kernel
//!   answers for a stopped process, whose socket still accepts connections; a dead
//!   process's port is closed), or cannot be made within the check's timeout (its host
//!   is down or cut off: nothing it holds can be reached);
//! - other providers (verbs): no such check; a silent node is dead (as before).
//!
//! A node found alive stays a member: the wait goes on (probed again after another fault
//! timeout), and it is recorded ([`Engine::stalled_nodes`]) with a warning.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use fabric::{EndpointAddress, Provider};

use super::Engine;
use crate::coherence::NodeId;

/// The longest a TCP liveness check waits for a connection.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

/// What the liveness check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// The provider offers no check.
    Unknown,
}

/// Checks the process behind `addr` (see the module doc); `limit` bounds a TCP connect.
pub fn check(addr: &EndpointAddress, limit: Duration) -> Liveness {
    match addr.provider {
        Provider::Shm => match shm_pid(&addr.raw) {
            Some(pid) if process_alive(pid) => Liveness::Alive,
            Some(_) => Liveness::Dead,
            None => Liveness::Unknown,
        },
        Provider::Tcp => match sockaddr(&addr.raw) {
            Some(sa) => match TcpStream::connect_timeout(&sa, limit) {
                Ok(_) => Liveness::Alive,
                // Refused (its port is closed), unreachable, or no answer in time: the
                // process or its host is gone.
                Err(_) => Liveness::Dead,
            },
            None => Liveness::Unknown,
        },
        _ => Liveness::Unknown,
    }
}

/// The process id in a shm address (`fi_shm://PID:...`).
fn shm_pid(raw: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(raw).ok()?.trim_end_matches('\0');
    let rest = text.strip_prefix("fi_shm://")?;
    rest.split(':').next()?.parse().ok()
}

/// True while `pid` exists and is not a zombie (a stopped process is alive).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A `struct sockaddr_in` / `sockaddr_in6` (the tcp provider's address format).
fn sockaddr(raw: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(raw.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(raw.get(2..4)?.try_into().ok()?);
    let ip = match i32::from(family) {
        libc::AF_INET if raw.len() >= 16 => {
            let o: [u8; 4] = raw[4..8].try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(o))
        }
        libc::AF_INET6 if raw.len() >= 28 => {
            let o: [u8; 16] = raw[8..24].try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    (port != 0).then_some(SocketAddr::new(ip, port))
}

impl Engine {
    /// Of `silent` (nodes that did not answer a probe), those whose process is gone (or
    /// cannot be checked); the others are recorded as stalled, with a warning.
    pub(super) fn confirm_dead(&self, silent: Vec<NodeId>) -> Vec<NodeId> {
        let addrs = self
            .members
            .view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().map(|v| v.addrs.clone()))
            .unwrap_or_default();
        let limit = self
            .fault_timeout
            .clamp(Duration::from_millis(100), CONNECT_LIMIT);
        let mut dead = Vec::new();
        for n in silent {
            let live = addrs
                .get(&n)
                .and_then(|b| EndpointAddress::from_bytes(b).ok())
                .map_or(Liveness::Unknown, |a| check(&a, limit));
            if live == Liveness::Alive {
                eprintln!(
                    "krun dsm: rank {}: node {n} answers no probe within {:.1} s, but its \
                     process lives (stalled?): not declared dead",
                    self.me,
                    self.fault_timeout.as_secs_f64()
                );
                if let Ok(mut s) = self.stalled.lock() {
                    s.insert(n);
                }
            } else {
                dead.push(n);
            }
        }
        dead
    }

    /// Probes `node` (a DSM lock's holder that kept it past the fault timeout while others
    /// wait); declares it failed if it is dead, so that its failure's change releases
    /// what it held.
    pub fn probe_holder(self: &std::sync::Arc<Self>, node: NodeId) {
        if self.dead_nodes().contains(&node) {
            return;
        }
        let Some(dead) = self.probe_nodes(&[node]) else {
            return;
        };
        if !dead.is_empty() {
            eprintln!(
                "krun dsm: rank {}: node {node} holds a DSM lock others wait for and does not \
                 answer: declared failed",
                self.me
            );
            if let Err(e) = self.node_failed(&dead, true) {
                self.fail(e.to_string());
            }
        }
    }

    /// Nodes a probe found silent but alive (stalled past the fault timeout) so far.
    pub fn stalled_nodes(&self) -> Vec<NodeId> {
        self.stalled
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sockaddr_in_and_a_shm_address_are_parsed() {
        let mut raw = vec![0u8; 16];
        raw[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        raw[2..4].copy_from_slice(&4242u16.to_be_bytes());
        raw[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(sockaddr(&raw), Some("127.0.0.1:4242".parse().unwrap()));
        assert_eq!(sockaddr(&raw[..8]), None, "a short address is not read");
        assert_eq!(shm_pid(b"fi_shm://1234:0:5\0\0"), Some(1234));
        assert_eq!(shm_pid(b"garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_closed_port_is_dead() {
        assert!(process_alive(std::process::id()));
        let shm = EndpointAddress {
            provider: Provider::Shm,
            token: 0,
            raw: format!("fi_shm://{}:0", std::process::id()).into_bytes(),
        };
        assert_eq!(check(&shm, CONNECT_LIMIT), Liveness::Alive);
        // A listener accepts (alive); once closed, its port refuses (dead).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut raw = vec![0u8; 16];
        raw[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        raw[2..4].copy_from_slice(&port.to_be_bytes());
        raw[4..8].copy_from_slice(&[127, 0, 0, 1]);
        let tcp = EndpointAddress {
            provider: Provider::Tcp,
            token: 0,
            raw,
        };
        assert_eq!(check(&tcp, CONNECT_LIMIT), Liveness::Alive);
        drop(l);
        assert_eq!(check(&tcp, CONNECT_LIMIT), Liveness::Dead);
    }
}
