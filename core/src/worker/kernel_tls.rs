//! The kernel-TLS hand-over and the control records of an offloaded connection (the
//! steps that need a syscall on the connection's own socket).

use super::*;
use crate::kernel_tls::{
    Dir, KernelTlsSocket, RECORD_ALERT, RECORD_APPLICATION_DATA, RECORD_HANDSHAKE,
};

impl Worker {
    /// Slots that need a syscall on their own socket since the last call: hand-over to
    /// kernel TLS, or a close_notify alert on a kTLS socket. The driver calls
    /// [`Self::fd_work`] for each once nothing else is writing to that socket.
    pub fn take_fd_work(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(into, &mut self.fd_pending);
        for slot in into.iter() {
            if let Some(c) = self
                .slots
                .get_mut(*slot as usize)
                .and_then(|s| s.conn.as_mut())
            {
                c.fd_queued = false;
            }
        }
    }

    /// Whether the record layer of `slot` is in the kernel (reads and writes on its
    /// socket are plaintext; EIO on a read means a control record, see
    /// [`Self::on_control_record`]).
    pub fn is_offloaded(&self, slot: u32) -> bool {
        self.conn_ref(slot)
            .is_some_and(|c| matches!(c.tls, Tls::Kernel(_)))
    }

    /// Does the socket work `take_fd_work` listed for `slot`, on its fd. The driver must
    /// call it only when no send on that socket is in flight and no received bytes are
    /// waiting to be handed to [`Self::on_received`].
    pub fn fd_work(&mut self, slot: u32, socket: &mut impl KernelTlsSocket, now: Instant) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        match &mut conn.tls {
            Tls::User(tls)
                if conn.offload_wanted
                    && matches!(conn.phase, Phase::Session(_))
                    && tls.ready_for_kernel() =>
            {
                conn.offload_wanted = false;
                self.offload(slot, socket, now);
            }
            Tls::Kernel(k) if k.close_notify_pending => {
                k.close_notify_pending = false;
                if let Err(e) = socket.send_close_notify() {
                    debug!(peer = %conn.peer, "close_notify on kTLS socket: {e}");
                }
            }
            _ => {}
        }
        self.run_local(now);
    }

    /// A read on the kTLS socket of `slot` failed with EIO: the next record is not
    /// application data (an alert, a KeyUpdate). Reads it with its type and acts on it.
    pub fn on_control_record(
        &mut self,
        slot: u32,
        socket: &mut impl KernelTlsSocket,
        now: Instant,
    ) {
        let mut buf = std::mem::take(&mut self.plain_in);
        buf.clear();
        buf.resize(RECORD_PLAINTEXT + 256, 0);
        let result = socket.recv_record(&mut buf);
        match result {
            Ok((_, 0)) => self.close(slot, now, Ending::PeerClosed),
            Ok((RECORD_APPLICATION_DATA, n)) => {
                let mut data = buf[..n].to_vec();
                self.read_plaintext(slot, &mut data, now);
            }
            Ok((RECORD_ALERT, n)) => {
                let description = if n >= 2 { buf[1] } else { 255 };
                if description == 0 {
                    self.close(slot, now, Ending::PeerClosed);
                } else {
                    if let Some(conn) = self.conn_ref(slot) {
                        debug!(peer = %conn.peer, "TLS alert {description} on kTLS socket");
                    }
                    self.close(slot, now, Ending::Lost);
                }
            }
            Ok((RECORD_HANDSHAKE, n)) => {
                let msg = buf[..n].to_vec();
                self.on_post_handshake(slot, socket, &msg, now);
            }
            Ok((other, _)) => {
                if let Some(conn) = self.conn_ref(slot) {
                    debug!(peer = %conn.peer, "unexpected TLS record type {other} on kTLS socket");
                }
                self.close(slot, now, Ending::Lost);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                if let Some(conn) = self.conn_ref(slot) {
                    debug!(peer = %conn.peer, "kTLS control record: {e}");
                }
                self.close(slot, now, Ending::Lost);
            }
        }
        buf.clear();
        self.plain_in = buf;
        self.run_local(now);
    }

    pub(super) fn queue_fd_work(&mut self, slot: u32) {
        if let Some(conn) = self.conn_mut(slot)
            && !conn.fd_queued
        {
            conn.fd_queued = true;
            self.fd_pending.push(slot);
        }
    }

    /// Queues the kTLS hand-over once a session that wants it is idle in rustls.
    pub(super) fn check_offload(&mut self, slot: u32) {
        if let Some(conn) = self.conn_ref(slot)
            && conn.offload_wanted
            && matches!(conn.phase, Phase::Session(_))
            && matches!(&conn.tls, Tls::User(t) if t.ready_for_kernel())
        {
            self.queue_fd_work(slot);
        }
    }

    /// Moves the record layer of `slot` into the kernel. The ULP goes on first: if the
    /// kernel refuses it, rustls keeps the session. Once rustls has given up its keys,
    /// a failure can only end the connection.
    pub(super) fn offload(&mut self, slot: u32, socket: &mut impl KernelTlsSocket, now: Instant) {
        let ciphers = self.shared.tls_offload.ciphers;
        let stats = &self.shared.stats[usize::from(self.id)];
        let Some(conn) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|s| s.conn.as_mut())
        else {
            return;
        };
        let Tls::User(tls) = &conn.tls else {
            return;
        };
        if !tls.kernel_takes(ciphers) {
            bump(&stats.ktls_not_offloaded);
            return;
        }
        if let Err(e) = socket.attach_ulp() {
            bump(&stats.ktls_not_offloaded);
            crate::warn_limited!(peer = %conn.peer, "kernel refused the tls ULP ({e}); this session stays in rustls");
            return;
        }
        let Tls::User(tls) = std::mem::replace(&mut conn.tls, Tls::Gone) else {
            return;
        };
        let installed = tls
            .into_kernel()
            .map_err(|e| e.to_string())
            .and_then(|(secrets, kc)| {
                socket
                    .install_keys(kc.protocol_version(), &secrets)
                    .map(|()| kc)
                    .map_err(|e| e.to_string())
            });
        match installed {
            Ok(kc) => {
                conn.tls = Tls::Kernel(Box::new(KernelTls {
                    conn: kc,
                    close_notify_pending: false,
                }));
                bump(&stats.ktls_offloaded);
                // Frames queued meanwhile now go out as plaintext.
                self.mark_dirty(slot);
            }
            Err(e) => {
                bump(&stats.ktls_install_failed);
                let peer = conn.peer;
                crate::warn_limited!(%peer, "installing kernel TLS keys failed ({e}); closing the session (the device reconnects; set [tls] offload = \"off\" if this repeats)");
                self.close(slot, now, Ending::Lost);
            }
        }
    }

    /// A post-handshake handshake record on a kTLS socket: a TLS 1.3 KeyUpdate gets new
    /// keys (both directions if the peer asked for ours too); anything else ends it.
    pub(super) fn on_post_handshake(
        &mut self,
        slot: u32,
        socket: &mut impl KernelTlsSocket,
        msg: &[u8],
        now: Instant,
    ) {
        let rekey = self.shared.tls_offload.rekey;
        let stats = &self.shared.stats[usize::from(self.id)];
        let Some(conn) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|s| s.conn.as_mut())
        else {
            return;
        };
        let peer = conn.peer;
        let Tls::Kernel(k) = &mut conn.tls else {
            return;
        };
        // One handshake message per record is what peers send after the handshake.
        let (kind, body) = match msg {
            [kind, a, b, c, body @ ..]
                if body.len()
                    == ((usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c)) =>
            {
                (*kind, body)
            }
            _ => {
                debug!(%peer, "malformed post-handshake message on kTLS socket");
                self.close(slot, now, Ending::Lost);
                return;
            }
        };
        const KEY_UPDATE: u8 = 24;
        match (kind, body) {
            (KEY_UPDATE, [requested]) if *requested <= 1 => {
                if !rekey {
                    bump(&stats.tls_rekey_unsupported);
                    crate::warn_limited!(%peer, "peer sent a TLS KeyUpdate, which this kernel cannot apply to a kTLS socket (needs Linux 6.14+); closing the session (set [tls] offload = \"off\" to keep such peers in rustls)");
                    // The close frame goes out under the old key, then close_notify.
                    self.close(
                        slot,
                        now,
                        Ending::Protocol(
                            1011,
                            "TLS key update not supported by the gateway's kernel",
                        ),
                    );
                    return;
                }
                let version = k.conn.protocol_version();
                let rx = k
                    .conn
                    .update_rx_secret()
                    .map_err(|e| e.to_string())
                    .and_then(|(seq, s)| {
                        socket
                            .set_key(Dir::Rx, version, seq, &s)
                            .map_err(|e| e.to_string())
                    });
                let tx = rx.and_then(|()| {
                    if *requested == 0 {
                        return Ok(());
                    }
                    // Our KeyUpdate goes out under the old key, then the new key is set.
                    socket
                        .send_record(RECORD_HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])
                        .map_err(|e| e.to_string())?;
                    let (seq, s) = k.conn.update_tx_secret().map_err(|e| e.to_string())?;
                    socket
                        .set_key(Dir::Tx, version, seq, &s)
                        .map_err(|e| e.to_string())
                });
                match tx {
                    Ok(()) => bump(&stats.ktls_key_updates),
                    Err(e) => {
                        bump(&stats.tls_rekey_unsupported);
                        crate::warn_limited!(%peer, "applying a TLS KeyUpdate to the kTLS socket failed ({e}); closing the session");
                        self.close(slot, now, Ending::Lost);
                    }
                }
            }
            _ => {
                debug!(%peer, kind, "unexpected post-handshake message on kTLS socket");
                self.close(
                    slot,
                    now,
                    Ending::Protocol(1002, "unexpected TLS handshake message"),
                );
            }
        }
    }
}
