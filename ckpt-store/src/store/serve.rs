//! The store's peer side: the thread that answers other nodes' requests (reserve, commit,
//! lookup, parity contributions and lookups, removals) on this node's fabric endpoint.
use super::*;

impl Inner {
    pub(super) fn serve(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            let msg = match self.ep.recv(STORE_TAG, Duration::from_millis(100)) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let sender = msg
                .peer
                .and_then(|p| self.peers.iter().position(|q| *q == Some(p)));
            let env = match self.chan.open(&msg.data) {
                Ok(e) => e,
                Err(why) => {
                    eprintln!(
                        "krun-store: node {}: dropped a message from {}: {why}",
                        self.cfg.node,
                        sender.map_or("an unknown peer".to_string(), |n| format!("node {n}"))
                    );
                    continue;
                }
            };
            let Some(node) = sender.filter(|&n| n == env.from_node as usize) else {
                eprintln!(
                    "krun-store: node {}: dropped a message claiming node {} from {:?}",
                    self.cfg.node, env.from_node, sender
                );
                continue;
            };
            let body = self
                .handle(node, env.body)
                .unwrap_or_else(|e| Body::Error(e.to_string()));
            let reply = match self.chan.seal(&Envelope {
                request: env.request,
                from_node: self.cfg.node as u32,
                body,
            }) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!(
                        "krun-store: node {}: sealing a reply to node {node}: {e}",
                        self.cfg.node
                    );
                    continue;
                }
            };
            let tag = REPLY_TAG | (env.request & 0xffff_ffff_ffff);
            if let Some(peer) = self.peers[node] {
                if let Err(e) = self.ep.send(peer, tag, &reply) {
                    eprintln!(
                        "krun-store: node {}: replying to node {node}: {e}",
                        self.cfg.node
                    );
                }
            }
        }
    }

    /// Registers `len` bytes of the arena at `offset` on their own, so that a peer given
    /// the remote key reaches that range and nothing else of the arena.
    pub(super) fn register_range(&self, offset: u64, len: u64) -> Result<MemoryRegion> {
        // SAFETY: the view is kept in `held`, `reserved` or `parity`, which drop before
        // `arena_mr` (field order of `Inner`), and the range lies inside the arena.
        let view = unsafe {
            Region::view(
                self.arena_mr.region(),
                offset as usize,
                (len.max(1)) as usize,
            )?
        };
        Ok(self.ep.register(view)?)
    }

    pub(super) fn handle(&self, from: usize, body: Body) -> Result<Body> {
        match body {
            Body::Reserve {
                owner,
                version,
                len,
                kind,
                set: _,
                member: _,
            } => {
                check_owner(&owner)?;
                let key = ((owner.clone(), version), kind);
                if let Some(old) = self.reserved.lock().expect("lock").remove(&key) {
                    let (off, l) = (old.offset, old.len);
                    drop(old);
                    self.arena.lock().expect("lock").release(off, l);
                }
                let offset = self.arena.lock().expect("lock").alloc(len).ok_or_else(|| StoreError::Peer {
                    node: self.cfg.node,
                    what: format!("arena full: no {len} bytes free for {owner} v{version} from node {from}"),
                })?;
                let mr = match self.register_range(offset, len) {
                    Ok(mr) => mr,
                    Err(e) => {
                        self.arena.lock().expect("lock").release(offset, len);
                        return Err(e);
                    }
                };
                let remote = mr.remote().to_bytes().to_vec();
                self.reserved.lock().expect("lock").insert(
                    key,
                    Reservation {
                        offset,
                        len,
                        _key: mr,
                    },
                );
                Ok(Body::Reserved { offset, remote })
            }
            Body::Commit {
                owner,
                version,
                kind,
                set,
                member,
                offset,
                len,
                crc,
            } => {
                let key = ((owner.clone(), version), kind);
                let reserved = self
                    .reserved
                    .lock()
                    .expect("lock")
                    .get(&key)
                    .map(|r| (r.offset, r.len));
                if reserved != Some((offset, len)) {
                    return Err(StoreError::Invalid(format!(
                        "commit of {owner} v{version} without its reservation"
                    )));
                }
                // SAFETY: the writer's RMA writes completed before it sent the commit.
                let got = crc32c::crc32c(unsafe {
                    &self.arena_mr.region().as_slice()[offset as usize..(offset + len) as usize]
                });
                self.reserved.lock().expect("lock").remove(&key);
                if got != crc {
                    self.arena.lock().expect("lock").release(offset, len);
                    return Err(StoreError::Checksum {
                        level: format!("copy landed on node {}", self.cfg.node),
                        owner,
                        version,
                        stored: crc,
                        computed: got,
                    });
                }
                let complete = if kind == 0 {
                    let mr = match self.register_range(offset, len) {
                        Ok(mr) => mr,
                        Err(e) => {
                            self.arena.lock().expect("lock").release(offset, len);
                            return Err(e);
                        }
                    };
                    let old = self.held.lock().expect("lock").insert(
                        (owner, version),
                        Held {
                            offset,
                            len,
                            crc,
                            mr,
                        },
                    );
                    if let Some(old) = old {
                        self.arena
                            .lock()
                            .expect("lock")
                            .release(old.offset, old.len);
                    }
                    true
                } else {
                    self.add_contribution(
                        set,
                        version,
                        member,
                        from as u32,
                        &owner,
                        offset,
                        len,
                        crc,
                    )
                };
                Ok(Body::Ack { complete })
            }
            Body::Lookup { owner, version } => {
                let key = (owner, version);
                if let Some(c) = self.l1.lock().expect("lock").get(&key) {
                    return Ok(Body::Found {
                        level: 1,
                        offset: 0,
                        len: c.len as u64,
                        crc: c.crc,
                        remote: c.mr.remote().to_bytes().to_vec(),
                    });
                }
                if let Some(h) = self.held.lock().expect("lock").get(&key) {
                    // The copy's own registration: the reader reaches this copy alone.
                    return Ok(Body::Found {
                        level: 2,
                        offset: 0,
                        len: h.len,
                        crc: h.crc,
                        remote: h.mr.remote().to_bytes().to_vec(),
                    });
                }
                Ok(Body::NotFound)
            }
            Body::Drop { owner, version } => {
                let key = (owner, version);
                // A copy still being written (a streamed put that failed) gives its range
                // back too; dropping the reservation revokes the writer's key first.
                if let Some(r) = self
                    .reserved
                    .lock()
                    .expect("lock")
                    .remove(&(key.clone(), 0))
                {
                    let (off, len) = (r.offset, r.len);
                    drop(r);
                    self.arena.lock().expect("lock").release(off, len);
                }
                if let Some(h) = self.held.lock().expect("lock").remove(&key) {
                    self.arena.lock().expect("lock").release(h.offset, h.len);
                }
                Ok(Body::Ack { complete: true })
            }
            Body::Parity { set, version } => Ok(self.handle_parity(set, version)),
            other => Err(StoreError::Invalid(format!(
                "unexpected request {}",
                other.name()
            ))),
        }
    }
}
