//! The store's flush: the background thread that takes each version `put` left at L1 to
//! L2 (the buddy), L3 (the parity holder) and L4 (disk), one version at a time.
use super::*;

impl Inner {
    /// Sends one copy to `node`: reserve, RMA write, commit (verified there).
    pub(super) fn send_copy(
        &self,
        node: usize,
        key: &Key,
        kind: u8,
        set: u32,
        member: u32,
    ) -> Result<bool> {
        if self.is_down(node) {
            return Err(self.down_error(node));
        }
        if node == self.cfg.node {
            return Err(StoreError::Invalid(
                "no other node is up to hold the copy".into(),
            ));
        }
        let (mr, len, crc) = {
            let l1 = self.l1.lock().expect("lock");
            let c = l1.get(key).ok_or_else(|| StoreError::NotFound {
                owner: key.0.clone(),
                version: key.1,
            })?;
            (c.mr.clone(), c.len, c.crc)
        };
        let reply = self.request(
            node,
            Body::Reserve {
                owner: key.0.clone(),
                version: key.1,
                len: len as u64,
                kind,
                set,
                member,
            },
        )?;
        let Body::Reserved { offset, remote } = reply else {
            return Err(unexpected(node, "Reserve", &reply));
        };
        // The key covers the reserved range alone: the copy goes at its start.
        let remote = RemoteRegion::from_bytes(&remote)?;
        self.rma_write(node, &mr, len, &remote, 0)?;
        let ack = self.request(
            node,
            Body::Commit {
                owner: key.0.clone(),
                version: key.1,
                kind,
                set,
                member,
                offset,
                len: len as u64,
                crc,
            },
        )?;
        match ack {
            Body::Ack { complete } => Ok(complete),
            other => Err(unexpected(node, "Commit", &other)),
        }
    }

    pub(super) fn flush_loop(self: Arc<Self>, jobs: mpsc::Receiver<Key>) {
        let mut pending_l3: Vec<(Key, u32, usize, Instant)> = Vec::new();
        loop {
            let job = match jobs.recv_timeout(Duration::from_millis(20)) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Some(key) = job {
                self.flush(&key, &mut pending_l3);
            }
            self.reprotect();
            // Parity sets complete when the other members have contributed.
            pending_l3.retain(|(key, set, holder, since)| {
                match self.parity_lookup(*holder, *set, key.1) {
                    Ok(Some(p)) if p.members.iter().any(|m| m.2 == key.0) => {
                        self.mark_safe_at(key, Level::L3, *holder);
                        false
                    }
                    _ if since.elapsed() < Duration::from_secs(600) => true,
                    _ => {
                        let why = format!("the parity set at node {holder} never completed");
                        self.plan_parity(key, Err(why));
                        false
                    }
                }
            });
        }
    }

    pub(super) fn flush(&self, key: &Key, pending_l3: &mut Vec<(Key, u32, usize, Instant)>) {
        let n = self.cfg.nodes.len();
        // A streamed put (`store/streamed.rs`) made it safe at L2 already.
        let at_l2 = self
            .safe
            .lock()
            .expect("lock")
            .get(key)
            .is_some_and(|s| s[Level::L2 as usize]);
        if n > 1 && !at_l2 {
            let buddy = self.buddy_of(self.cfg.node);
            match self.send_copy(buddy, key, 0, 0, 0) {
                Ok(_) => {
                    self.mark_safe_at(key, Level::L2, buddy);
                    self.retain(&key.0, Level::L2);
                }
                Err(e) => self.fail(key, format!("L2 at node {buddy}: {e}")),
            }
        }
        match self.parity_target(key) {
            Some((set, member, holder)) => {
                self.plan_parity(key, Ok(Some(holder)));
                let sent = if holder == self.cfg.node {
                    self.contribute_locally(key, set, member)
                } else {
                    self.send_copy(holder, key, 1, set, member)
                };
                match sent {
                    Ok(true) => self.mark_safe_at(key, Level::L3, holder),
                    Ok(false) => pending_l3.push((key.clone(), set, holder, Instant::now())),
                    Err(e) => {
                        let why = format!("L3 at node {holder}: {e}");
                        self.plan_parity(key, Err(why.clone()));
                        self.fail(key, why);
                    }
                }
            }
            None => self.plan_parity(key, Ok(None)),
        }
        if let Some(disk) = &self.disk {
            let copy = self
                .l1
                .lock()
                .expect("lock")
                .get(key)
                .map(|c| (c.mr.clone(), c.len));
            if let Some((mr, len)) = copy {
                // SAFETY: L1 copies are write-once.
                let data = unsafe { &mr.region().as_slice()[..len] };
                match disk.write(&key.0, key.1, data) {
                    Ok(_) => {
                        self.mark_safe(key, Level::L4);
                        self.retain(&key.0, Level::L4);
                    }
                    Err(e) => self.fail(key, format!("L4: {e}")),
                }
            }
        }
    }
}
