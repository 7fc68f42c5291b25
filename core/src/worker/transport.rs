//! Bytes in and out: what the driver hands in (received bytes, EOF, errors), TLS records
//! decrypted and encrypted, output flushed to the socket, slots released.

use super::*;

impl Worker {
    /// Bytes received from the socket of `slot`.
    pub fn on_received(&mut self, slot: u32, data: &[u8], now: Instant) {
        let mut plain = std::mem::take(&mut self.plain_in);
        plain.clear();
        self.on_received_inner(slot, data, &mut plain, now);
        plain.clear();
        if plain.capacity() > 256 * 1024 {
            // One huge burst should not pin memory in an idle worker.
            plain = Vec::new();
        }
        self.plain_in = plain;
        self.run_local(now);
    }

    pub(super) fn on_received_inner(
        &mut self,
        slot: u32,
        data: &[u8],
        plain: &mut Vec<u8>,
        now: Instant,
    ) {
        let after_header;
        let data = if self.conn_ref(slot).is_some_and(|c| c.proxy.is_some()) {
            match self.take_proxy_header(slot, data, now) {
                // Nothing after the header yet: an empty read would look like EOF to TLS.
                Some(rest) if rest.is_empty() => return,
                Some(rest) => {
                    after_header = rest;
                    &after_header[..]
                }
                None => return,
            }
        } else {
            data
        };
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if matches!(conn.phase, Phase::Closing) {
            return;
        }
        conn.last_rx = now;
        conn.ping_sent = None;
        let tls = match &mut conn.tls {
            Tls::User(tls) => tls,
            Tls::Kernel(_) => {
                // The kernel already opened the records: this is plaintext.
                plain.extend_from_slice(data);
                self.read_plaintext(slot, plain, now);
                return;
            }
            Tls::Gone => return,
        };
        let was_handshaking = tls.is_handshaking();
        if let Err(e) = tls.feed(data, plain) {
            let peer = conn.peer;
            if was_handshaking {
                bump(&self.stats().handshakes_failed_tls);
            }
            debug!(%peer, "TLS error: {e}");
            // rustls sealed an alert; let it go out before the socket closes.
            self.mark_dirty(slot);
            self.close(slot, now, Ending::Lost);
            return;
        }
        let handshake_done = was_handshaking && !tls.is_handshaking();
        let resumed = handshake_done && tls.is_resumed();
        let wants_write = tls.wants_write();
        let peer_closed = tls.peer_has_closed();
        if handshake_done {
            bump(&self.stats().handshakes_ok);
        }
        if resumed {
            bump(&self.stats().handshakes_resumed);
        }
        if wants_write {
            self.mark_dirty(slot);
        }
        if !plain.is_empty() {
            self.read_plaintext(slot, plain, now);
        }
        if peer_closed {
            self.close(slot, now, Ending::PeerClosed);
            return;
        }
        self.check_offload(slot);
    }

    /// The peer closed its side of the TCP connection.
    pub fn on_eof(&mut self, slot: u32, now: Instant) {
        self.close(slot, now, Ending::PeerClosed);
        self.run_local(now);
    }

    /// The socket failed.
    pub fn on_error(&mut self, slot: u32, err: &io::Error, now: Instant) {
        if let Some(conn) = self.conn_mut(slot) {
            debug!(peer = %conn.peer, "socket error: {err}");
        }
        self.close(slot, now, Ending::Lost);
        self.run_local(now);
    }

    /// Slots with bytes to send since the last call.
    pub fn take_dirty(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(into, &mut self.dirty);
        for slot in into.iter() {
            if let Some(c) = self
                .slots
                .get_mut(*slot as usize)
                .and_then(|s| s.conn.as_mut())
            {
                c.dirty = false;
            }
        }
    }

    /// Encrypts queued frames and writes them to `sink` until done or it would block.
    pub fn flush_to<W: Write>(&mut self, slot: u32, sink: &mut W) -> io::Result<Flush> {
        let mut plain = std::mem::take(&mut self.record_buf);
        let result = self.flush_inner(slot, sink, &mut plain);
        plain.clear();
        self.record_buf = plain;
        result
    }

    pub(super) fn flush_inner<W: Write>(
        &mut self,
        slot: u32,
        sink: &mut W,
        plain: &mut Vec<u8>,
    ) -> io::Result<Flush> {
        let Some(conn) = self.conn_mut(slot) else {
            return Ok(Flush::Done);
        };
        let tls = match &mut conn.tls {
            Tls::User(tls) => tls,
            Tls::Kernel(k) => {
                let k = &mut **k;
                return Self::flush_plain(&mut conn.out, &mut conn.notify_on_drain, k, sink, plain)
                    .map(|(flush, fd_work)| {
                        if fd_work {
                            self.queue_fd_work(slot);
                        }
                        flush
                    });
            }
            Tls::Gone => return Ok(Flush::Done),
        };
        loop {
            if conn.offload_wanted
                && matches!(conn.phase, Phase::Session(_))
                && tls.ready_for_kernel()
            {
                // Hand over before sealing more: the queue then goes out as plaintext.
                self.queue_fd_work(slot);
                return Ok(Flush::Done);
            }
            if !tls.wants_write() && !conn.out.is_empty() && !tls.is_handshaking() {
                plain.clear();
                conn.out.drain_into(plain, RECORD_PLAINTEXT);
                tls.encrypt(plain)
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
            }
            if conn.out.is_empty() && conn.notify_on_drain {
                conn.notify_on_drain = false;
                tls.send_close_notify();
            }
            if !tls.wants_write() {
                return Ok(Flush::Done);
            }
            match tls.write_to(sink) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes queued frames as plaintext to a kTLS socket (the kernel seals them). Returns
    /// whether fd work (close_notify) is wanted.
    pub(super) fn flush_plain<W: Write>(
        out: &mut OutQueue,
        notify_on_drain: &mut bool,
        k: &mut KernelTls,
        sink: &mut W,
        plain: &mut Vec<u8>,
    ) -> io::Result<(Flush, bool)> {
        while !out.is_empty() {
            plain.clear();
            out.drain_into(plain, RECORD_PLAINTEXT);
            let mut done = 0;
            while done < plain.len() {
                match sink.write(&plain[done..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        out.push_front(Bytes::copy_from_slice(&plain[done..]));
                        return Ok((Flush::Blocked, false));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if *notify_on_drain {
            *notify_on_drain = false;
            k.close_notify_pending = true;
            return Ok((Flush::Done, true));
        }
        Ok((Flush::Done, false))
    }

    /// Slots whose sockets the driver should close now (after a last flush).
    pub fn take_released(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(into, &mut self.to_release);
    }

    /// The driver closed the socket of `slot`; the slot may be reused.
    pub fn release(&mut self, slot: u32) {
        if let Some(entry) = self.slots.get_mut(slot as usize)
            && let Some(conn) = entry.conn.take()
        {
            entry.generation = entry.generation.wrapping_add(1);
            self.free.push(slot);
            self.live -= 1;
            self.shared.connection_count.fetch_sub(1, Ordering::AcqRel);
            if std::mem::take(&mut entry.unauthenticated) {
                self.shared.unauthenticated.remove(conn.peer.ip());
            }
            // A balancer's connection refused before its header was admitted counted nothing.
            if conn.proxy.is_none() {
                self.shared.guard.closed(conn.peer.ip());
            }
        }
    }

    /// Whether `slot` holds a connection that still reads (not closing).
    pub fn is_active(&self, slot: u32) -> bool {
        self.conn_ref(slot)
            .is_some_and(|c| !c.leaving && !matches!(c.phase, Phase::Closing))
    }

    /// Whether `slot` holds an established session (a device or manager past its TLS
    /// handshake and upgrade). Drivers serve these first: a handshake costs a hundred
    /// routed frames, and handshakes (honest or a flood's) must not delay the fleet.
    pub fn is_established(&self, slot: u32) -> bool {
        self.conn_ref(slot)
            .is_some_and(|c| matches!(c.phase, Phase::Session(_)))
    }

    /// True when shutdown is under way and every connection is gone.
    pub fn finished(&self) -> bool {
        self.shutdown_started && self.live == 0
    }

    // ----- internals --------------------------------------------------------------------

    /// Handles plaintext rustls has just decrypted. Complete frames are handled straight
    /// from the worker's buffer; only a trailing partial frame is copied into the
    /// connection's own buffer, which is freed again once it has been consumed.
    pub(super) fn read_plaintext(&mut self, slot: u32, plain: &mut [u8], now: Instant) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if conn.inbuf.is_empty() {
            let used = self.consume(slot, plain, now);
            if used < plain.len()
                && let Some(conn) = self.conn_mut(slot)
                && !matches!(conn.phase, Phase::Closing)
            {
                conn.inbuf.extend_from_slice(&plain[used..]);
            }
        } else {
            let mut inbuf = std::mem::take(&mut conn.inbuf);
            inbuf.extend_from_slice(plain);
            let used = self.consume(slot, &mut inbuf, now);
            if let Some(conn) = self.conn_mut(slot) {
                inbuf.drain(..used.min(inbuf.len()));
                conn.inbuf = if inbuf.is_empty() { Vec::new() } else { inbuf };
            }
        }
    }

    /// Consumes complete units (HTTP head, WebSocket frames) from `buf`; returns bytes used.
    pub(super) fn consume(&mut self, slot: u32, buf: &mut [u8], now: Instant) -> usize {
        let mut used = 0;
        loop {
            let Some(conn) = self.conn_mut(slot) else {
                return buf.len();
            };
            if conn.leaving {
                return used;
            }
            match conn.phase {
                // Nothing more is read from a closing connection or one whose request is
                // with the control plane (HTTP/1.1 without pipelining).
                Phase::Closing | Phase::Waiting => return buf.len(),
                Phase::Handshake => match self.on_http(slot, &buf[used..], now) {
                    Some(n) if n > 0 => used += n,
                    _ => return used,
                },
                Phase::Session(_) => {
                    return used + self.on_websocket(slot, &mut buf[used..], now);
                }
            }
        }
    }

    // ----- HTTP -------------------------------------------------------------------------
}
