//! The link from a rank to its local krund.
//!
//! Contract:
//! - When `KRUN_NODE_SOCKET` names a Unix socket, the rank connects to it at init and keeps
//!   the connection for its life; when unset, the library works without a node link.
//! - The rank sends [`RankToNode::Hello`] at init, [`RankToNode::Checkpointed`] after every
//!   checkpoint that is complete on every rank (the image file is complete), and
//!   [`RankToNode::Exiting`] at finalize.
//! - krund answers every message with exactly one [`NodeToRank`]: `Ack`, or `Refused(why)`,
//!   which the rank's call reports as an error naming `why`.
//! - Framing (until the job's `fabric::wire` session carries it): each message is a
//!   little-endian `u32` length followed by that many bytes of the postcard encoding of the
//!   enum; frames above [`MAX_FRAME`] bytes are refused. Both sides give up on a peer that
//!   does not answer within [`IO_TIMEOUT`].
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{RankError, Result};

/// Largest frame on the node link.
pub const MAX_FRAME: usize = 64 * 1024;
/// Longest a write or an answer may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a rank tells its krund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankToNode {
    Hello {
        rank: u32,
        pid: u32,
    },
    Checkpointed {
        rank: u32,
        version: u64,
        image: PathBuf,
        bytes: u64,
    },
    Exiting {
        rank: u32,
        code: i32,
    },
}

/// krund's answer to every [`RankToNode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeToRank {
    Ack,
    Refused(String),
}

/// Writes one frame holding `msg`.
pub fn write_frame<T: Serialize>(stream: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let bytes = postcard::to_stdvec(msg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if bytes.len() > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {} bytes exceeds {MAX_FRAME}", bytes.len()),
        ));
    }
    stream.write_all(&(bytes.len() as u32).to_le_bytes())?;
    stream.write_all(&bytes)
}

/// Reads one frame and decodes it.
pub fn read_frame<T: DeserializeOwned>(stream: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf)?;
    postcard::from_bytes(&buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A rank's connection to its krund.
pub struct NodeLink {
    stream: UnixStream,
    socket: PathBuf,
}

impl NodeLink {
    pub fn connect(socket: &Path) -> Result<NodeLink> {
        let fail = |reason: String| RankError::NodeLink {
            socket: socket.to_path_buf(),
            reason,
        };
        let stream = UnixStream::connect(socket).map_err(|e| fail(format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| fail(format!("setting timeouts: {e}")))?;
        Ok(NodeLink {
            stream,
            socket: socket.to_path_buf(),
        })
    }

    /// Sends `msg` and waits for krund's answer; `Refused` is an error naming the reason.
    pub fn report(&mut self, msg: &RankToNode) -> Result<()> {
        let fail = |reason: String| RankError::NodeLink {
            socket: self.socket.clone(),
            reason,
        };
        write_frame(&mut self.stream, msg).map_err(|e| fail(format!("sending {msg:?}: {e}")))?;
        match read_frame::<NodeToRank>(&mut self.stream)
            .map_err(|e| fail(format!("no answer to {msg:?}: {e}")))?
        {
            NodeToRank::Ack => Ok(()),
            NodeToRank::Refused(why) => Err(fail(format!("krund refused {msg:?}: {why}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn rank_reports_reach_a_node_socket_and_refusals_are_errors() {
        let dir = std::env::temp_dir().join(format!("krun-node-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            for answer in [
                NodeToRank::Ack,
                NodeToRank::Ack,
                NodeToRank::Refused("rank 3 is not on this node".into()),
            ] {
                seen.push(read_frame::<RankToNode>(&mut s).unwrap());
                write_frame(&mut s, &answer).unwrap();
            }
            seen
        });
        let mut link = NodeLink::connect(&path).unwrap();
        let msgs = [
            RankToNode::Hello { rank: 3, pid: 42 },
            RankToNode::Checkpointed {
                rank: 3,
                version: 7,
                image: PathBuf::from("/dev/shm/krun-ghost/job/rank3/0000000007.kgi"),
                bytes: 65536,
            },
            RankToNode::Exiting { rank: 3, code: 0 },
        ];
        link.report(&msgs[0]).unwrap();
        link.report(&msgs[1]).unwrap();
        let err = link.report(&msgs[2]).unwrap_err();
        assert!(err.to_string().contains("not on this node"), "{err}");
        assert_eq!(server.join().unwrap(), msgs.to_vec());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let mut huge = (MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        let err = read_frame::<RankToNode>(&mut huge.as_slice()).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(read_frame::<RankToNode>(&mut garbage.as_slice()).is_err());
    }
}
