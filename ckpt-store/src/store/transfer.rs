//! The store's transfers to and from other nodes: a request and its answer over the
//! store's channel ([`Inner::request`]), one-sided RMA writes and reads of images in
//! pipelined chunks, and the fetch of a version's copy from another node's L1 or L2.
use super::*;

impl Inner {
    /// Sends `body` to `node` and waits for its answer (an `Error` answer is an error).
    pub(super) fn request(&self, node: usize, body: Body) -> Result<Body> {
        let peer = self
            .peers
            .get(node)
            .copied()
            .flatten()
            .ok_or_else(|| StoreError::Peer {
                node,
                what: "not a peer of this node".into(),
            })?;
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let what = body.name();
        let msg = self.chan.seal(&Envelope {
            request: id,
            from_node: self.cfg.node as u32,
            body,
        })?;
        self.ep
            .send(peer, STORE_TAG, &msg)
            .map_err(|e| StoreError::Peer {
                node,
                what: format!("sending {what}: {e}"),
            })?;
        let reply = self
            .ep
            .recv(
                REPLY_TAG | (id & 0xffff_ffff_ffff),
                self.cfg.request_timeout,
            )
            .map_err(|e| StoreError::Peer {
                node,
                what: format!(
                    "no answer to {what} within {:?} ({e})",
                    self.cfg.request_timeout
                ),
            })?;
        let env = self.chan.open(&reply.data).map_err(|e| StoreError::Peer {
            node,
            what: format!("bad reply: {e}"),
        })?;
        if env.request != id || env.from_node as usize != node {
            return Err(StoreError::Peer {
                node,
                what: format!(
                    "reply to request {} from node {} where request {id} to node {node} was expected",
                    env.request, env.from_node
                ),
            });
        }
        match env.body {
            Body::Error(text) => Err(StoreError::Peer { node, what: text }),
            body => Ok(body),
        }
    }

    /// Writes `len` bytes of `mr` into `remote` at `offset` with pipelined RMA writes.
    pub(super) fn rma_write(
        &self,
        node: usize,
        mr: &MemoryRegion,
        len: usize,
        remote: &RemoteRegion,
        offset: u64,
    ) -> Result<()> {
        self.rma_write_range(node, mr, 0, len, remote, offset)
    }

    /// Writes bytes `from..from + len` of `mr` into `remote` at `offset` with pipelined RMA
    /// writes.
    pub(super) fn rma_write_range(
        &self,
        node: usize,
        mr: &MemoryRegion,
        from: usize,
        len: usize,
        remote: &RemoteRegion,
        offset: u64,
    ) -> Result<()> {
        let peer = self.peers[node].expect("remote node");
        let mut inflight = std::collections::VecDeque::new();
        let mut at = 0;
        while at < len || !inflight.is_empty() {
            while at < len && inflight.len() < RMA_WINDOW {
                let n = RMA_CHUNK.min(len - at);
                // SAFETY: the L1 region is not written while it is being flushed (copies are
                // write-once; a streamed file's ranges are final once reported); the remote
                // range was reserved for this copy alone.
                let c = unsafe {
                    self.ep
                        .post_write(peer, mr, from + at, n, remote, offset + at as u64)?
                };
                inflight.push_back(c);
                at += n;
            }
            if let Some(c) = inflight.pop_front() {
                c.wait().map_err(|e| StoreError::Peer {
                    node,
                    what: format!("RMA write: {e}"),
                })?;
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `remote` on `node`.
    pub(super) fn rma_read(
        &self,
        node: usize,
        remote: &RemoteRegion,
        offset: u64,
        len: usize,
    ) -> Result<ImageBytes> {
        let mr = self.take_region(len)?;
        let result = self.rma_read_into(node, remote, offset, len, &mr, |_| {});
        let bytes = ImageBytes::Pooled(Some(mr), len, self.pool.clone());
        result.map(|()| bytes)
    }

    /// Reads `len` bytes at `offset` of `remote` on `node` into the start of `mr` (pipelined
    /// RMA reads); every read posted has completed or failed when this returns. `landed`
    /// sees each chunk's range of `mr` once its read completed, in order, while later
    /// reads are still in flight (the caller checksums it meanwhile).
    pub(super) fn rma_read_into(
        &self,
        node: usize,
        remote: &RemoteRegion,
        offset: u64,
        len: usize,
        mr: &MemoryRegion,
        mut landed: impl FnMut(std::ops::Range<usize>),
    ) -> Result<()> {
        let peer = self.peers[node].expect("remote node");
        let mut inflight = std::collections::VecDeque::new();
        let mut at = 0;
        let result = (|| {
            while at < len || !inflight.is_empty() {
                while at < len && inflight.len() < RMA_WINDOW {
                    let n = RMA_CHUNK.min(len - at);
                    // SAFETY: `mr` is the caller's alone until every read completed.
                    let c = unsafe {
                        self.ep
                            .post_read(peer, mr, at, n, remote, offset + at as u64)?
                    };
                    inflight.push_back((c, at..at + n));
                    at += n;
                }
                if let Some((c, range)) = inflight.pop_front() {
                    c.wait().map_err(|e| StoreError::Peer {
                        node,
                        what: format!("RMA read: {e}"),
                    })?;
                    landed(range);
                }
            }
            Ok(())
        })();
        for (c, _) in inflight {
            let _ = c.wait();
        }
        result
    }

    /// Asks `node` for a copy and reads it: (data, level there).
    pub(super) fn fetch_remote(
        &self,
        node: usize,
        owner: &str,
        version: u64,
    ) -> Result<Option<(ImageBytes, Level)>> {
        let reply = self.request(
            node,
            Body::Lookup {
                owner: owner.to_string(),
                version,
            },
        )?;
        let (level, offset, len, crc, remote) = match reply {
            Body::NotFound => return Ok(None),
            Body::Found {
                level,
                offset,
                len,
                crc,
                remote,
            } => (level, offset, len, crc, remote),
            other => return Err(unexpected(node, "Lookup", &other)),
        };
        let level = if level == 1 { Level::L1 } else { Level::L2 };
        let len = usize::try_from(len).map_err(|_| StoreError::Peer {
            node,
            what: format!("a copy of {len} bytes does not fit this machine"),
        })?;
        let remote = RemoteRegion::from_bytes(&remote)?;
        let data = self.rma_read(node, &remote, offset, len)?;
        let got = crc32c::crc32c(&data);
        if got != crc {
            return Err(StoreError::Checksum {
                level: format!("{level} on node {node}"),
                owner: owner.to_string(),
                version,
                stored: crc,
                computed: got,
            });
        }
        Ok(Some((data, level)))
    }

    /// A member's image from its home node or its buddy (or this node), else from any node
    /// still up (its L2 copy may sit on a buddy of an earlier placement).
    pub(super) fn fetch_any(&self, owner: &str, version: u64, home: usize) -> Result<Vec<u8>> {
        if let Some((d, _)) = self.local_l1(owner, version) {
            return Ok(d.to_vec());
        }
        let mut last = None;
        let first = [home, self.buddy_of(home)];
        let others = (0..self.cfg.nodes.len()).filter(|n| !first.contains(n));
        let mut tried = std::collections::BTreeSet::new();
        for node in first.into_iter().chain(others) {
            if !tried.insert(node) {
                continue;
            }
            if node == self.cfg.node {
                if let Some(h) = self.held_copy(owner, version) {
                    return Ok(h);
                }
                continue;
            }
            if self.is_down(node) {
                last = Some(self.down_error(node));
                continue;
            }
            match self.fetch_remote(node, owner, version) {
                Ok(Some((d, _))) => return Ok(d.to_vec()),
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(StoreError::NotFound {
            owner: owner.to_string(),
            version,
        }))
    }
}
