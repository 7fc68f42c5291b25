//! Kernel TLS: after rustls finished the handshake, the record layer moves into the kernel
//! (`TCP_ULP "tls"`, then `SOL_TLS`/`TLS_TX` and `TLS_RX` with the traffic keys), and the
//! worker reads and writes plaintext on the socket.
//!
//! What stays in user space is rustls' [`KernelConnection`](rustls::kernel::KernelConnection):
//! it derives the next keys for a TLS 1.3 KeyUpdate. Records that are not application data
//! (alerts, post-handshake handshake messages) reach us through `recvmsg` with a
//! `TLS_GET_RECORD_TYPE` control message; a plain `read` on such a record fails with EIO.
//!
//! Whether the kernel can do any of this is probed once at start-up ([`probe`]): the
//! machines devgate is developed on have no `tls` ULP at all (ENOENT), and a kernel may have
//! the ULP but lack a cipher (`gcm(aes)` not loadable). The result goes to status and
//! metrics; connections whose cipher the kernel cannot do stay in rustls.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

const TCP_ULP: libc::c_int = 31;
const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

pub use devgate_core::kernel_tls::{
    Ciphers, Dir, RECORD_ALERT, RECORD_APPLICATION_DATA, RECORD_HANDSHAKE, TlsOffload,
};

/// The kernel's `tls12_crypto_info_*` structures, laid out as `<linux/tls.h>` has them.
#[repr(C)]
#[derive(Clone, Copy)]
struct Aes128 {
    version: u16,
    cipher: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Aes256 {
    version: u16,
    cipher: u16,
    iv: [u8; 8],
    key: [u8; 32],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Chacha {
    version: u16,
    cipher: u16,
    iv: [u8; 12],
    key: [u8; 32],
    rec_seq: [u8; 8],
}

enum CryptoInfo {
    Aes128(Aes128),
    Aes256(Aes256),
    Chacha(Chacha),
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        // Key material should not linger on the stack longer than needed.
        match self {
            Self::Aes128(c) => c.key = [0; 16],
            Self::Aes256(c) => c.key = [0; 32],
            Self::Chacha(c) => c.key = [0; 32],
        }
    }
}

impl CryptoInfo {
    fn new(
        version: ProtocolVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> io::Result<Self> {
        let version = match version {
            ProtocolVersion::TLSv1_2 => TLS_1_2_VERSION,
            ProtocolVersion::TLSv1_3 => TLS_1_3_VERSION,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel TLS does not do {other:?}"),
                ));
            }
        };
        let rec_seq = seq.to_be_bytes();
        let short = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "traffic secret of unexpected size",
            )
        };
        Ok(match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                let iv = iv.as_ref();
                Self::Aes128(Aes128 {
                    version,
                    cipher: TLS_CIPHER_AES_GCM_128,
                    iv: iv
                        .get(4..12)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(short)?,
                    key: key.as_ref().try_into().map_err(|_| short())?,
                    salt: iv
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(short)?,
                    rec_seq,
                })
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let iv = iv.as_ref();
                Self::Aes256(Aes256 {
                    version,
                    cipher: TLS_CIPHER_AES_GCM_256,
                    iv: iv
                        .get(4..12)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(short)?,
                    key: key.as_ref().try_into().map_err(|_| short())?,
                    salt: iv
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(short)?,
                    rec_seq,
                })
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Self::Chacha(Chacha {
                version,
                cipher: TLS_CIPHER_CHACHA20_POLY1305,
                iv: iv.as_ref().try_into().map_err(|_| short())?,
                key: key.as_ref().try_into().map_err(|_| short())?,
                rec_seq,
            }),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "cipher suite not supported by kernel TLS",
                ));
            }
        })
    }

    fn set(&self, fd: RawFd, dir: Dir) -> io::Result<()> {
        let opt = match dir {
            Dir::Tx => TLS_TX,
            Dir::Rx => TLS_RX,
        };
        let (ptr, len) = match self {
            Self::Aes128(c) => (
                std::ptr::from_ref(c).cast::<libc::c_void>(),
                size_of::<Aes128>(),
            ),
            Self::Aes256(c) => (
                std::ptr::from_ref(c).cast::<libc::c_void>(),
                size_of::<Aes256>(),
            ),
            Self::Chacha(c) => (
                std::ptr::from_ref(c).cast::<libc::c_void>(),
                size_of::<Chacha>(),
            ),
        };
        let len = libc::socklen_t::try_from(len).map_err(io::Error::other)?;
        // SAFETY: `ptr` points at a live `#[repr(C)]` struct of `len` bytes.
        let rc = unsafe { libc::setsockopt(fd, SOL_TLS, opt, ptr, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Attaches the `tls` upper-layer protocol to an established TCP socket.
pub fn attach_ulp(fd: BorrowedFd<'_>) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: `name` is a live buffer of the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Installs one direction's key (also used for a KeyUpdate: sequence 0, new secrets).
pub fn set_key(
    fd: BorrowedFd<'_>,
    dir: Dir,
    version: ProtocolVersion,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> io::Result<()> {
    CryptoInfo::new(version, seq, secrets)?.set(fd.as_raw_fd(), dir)
}

/// Installs both directions' keys on a socket that has the `tls` ULP.
pub fn install_keys(
    fd: BorrowedFd<'_>,
    version: ProtocolVersion,
    secrets: &rustls::ExtractedSecrets,
) -> io::Result<()> {
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    set_key(fd, Dir::Tx, version, *tx_seq, tx)?;
    set_key(fd, Dir::Rx, version, *rx_seq, rx)
}

/// Sends one record of type `record_type` (e.g. an alert) on a kTLS socket.
pub fn send_record(fd: BorrowedFd<'_>, record_type: u8, payload: &[u8]) -> io::Result<usize> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one cmsg with one byte of data (CMSG_SPACE(1)).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        if cmsg.is_null() {
            return Err(io::Error::other(
                "no room for the record-type control message",
            ));
        }
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = record_type;
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &raw const msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Sends a close_notify alert on a kTLS socket.
pub fn send_close_notify(fd: BorrowedFd<'_>) -> io::Result<()> {
    send_record(fd, RECORD_ALERT, &[1, 0]).map(drop)
}

/// Receives one record on a kTLS socket with its type (after a read failed with EIO, the
/// next record is not application data). Returns `(type, bytes)`; 0 bytes = EOF.
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let mut record_type = RECORD_APPLICATION_DATA;
    // SAFETY: the kernel filled `msg_control`; the CMSG macros walk it within its length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((record_type, n))
}

/// Probes, on a connected loopback socket pair per cipher, whether the kernel takes the
/// `tls` ULP and TX/RX keys. Never fails: a kernel without kTLS is normal.
pub fn probe() -> TlsOffload {
    let mut ciphers = 0u8;
    let mut rekey = false;
    let mut first_error: Option<String> = None;
    for (bit, name) in [
        (Ciphers::AES128, "AES-128-GCM"),
        (Ciphers::AES256, "AES-256-GCM"),
        (Ciphers::CHACHA, "CHACHA20-POLY1305"),
    ] {
        match probe_one(test_info(bit)) {
            Ok(again) => {
                ciphers |= bit;
                rekey |= again;
            }
            Err(Step::Ulp(e)) => {
                let why = match e.raw_os_error() {
                    Some(libc::ENOENT) => {
                        "kernel has no tls ULP (ENOENT); records stay in rustls".to_owned()
                    }
                    _ => format!("kernel refused the tls ULP ({e}); records stay in rustls"),
                };
                return TlsOffload::user(why);
            }
            Err(Step::Key(e)) => {
                first_error.get_or_insert_with(|| format!("{name}: {e}"));
            }
            Err(Step::Setup(e)) => {
                return TlsOffload::user(format!(
                    "cannot probe kernel TLS on a loopback socket pair ({e}); records stay in rustls"
                ));
            }
        }
    }
    if ciphers == 0 {
        return TlsOffload::user(format!(
            "kernel has the tls ULP but takes no cipher ({}); records stay in rustls",
            first_error.unwrap_or_default()
        ));
    }
    TlsOffload {
        mode: "kernel",
        reason: None,
        ciphers: Ciphers(ciphers),
        rekey,
    }
}

enum Step {
    Setup(io::Error),
    Ulp(io::Error),
    Key(io::Error),
}

/// A throwaway TLS 1.3 key of the cipher `bit`, for the probe only.
fn test_info(bit: u8) -> CryptoInfo {
    let version = TLS_1_3_VERSION;
    match bit {
        Ciphers::AES128 => CryptoInfo::Aes128(Aes128 {
            version,
            cipher: TLS_CIPHER_AES_GCM_128,
            iv: [7; 8],
            key: [1; 16],
            salt: [3; 4],
            rec_seq: [0; 8],
        }),
        Ciphers::AES256 => CryptoInfo::Aes256(Aes256 {
            version,
            cipher: TLS_CIPHER_AES_GCM_256,
            iv: [7; 8],
            key: [1; 32],
            salt: [3; 4],
            rec_seq: [0; 8],
        }),
        _ => CryptoInfo::Chacha(Chacha {
            version,
            cipher: TLS_CIPHER_CHACHA20_POLY1305,
            iv: [7; 12],
            key: [1; 32],
            rec_seq: [0; 8],
        }),
    }
}

/// Returns whether the socket also took a second key in both directions (rekey).
fn probe_one(info: CryptoInfo) -> Result<bool, Step> {
    use std::os::fd::AsFd;
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(Step::Setup)?;
    let addr = listener.local_addr().map_err(Step::Setup)?;
    let client = TcpStream::connect(addr).map_err(Step::Setup)?;
    let (_server, _) = listener.accept().map_err(Step::Setup)?;
    attach_ulp(client.as_fd()).map_err(Step::Ulp)?;
    for dir in [Dir::Tx, Dir::Rx] {
        info.set(client.as_raw_fd(), dir).map_err(Step::Key)?;
    }
    let rekey = [Dir::Tx, Dir::Rx]
        .into_iter()
        .all(|dir| info.set(client.as_raw_fd(), dir).is_ok());
    Ok(rekey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_layouts_match_linux_tls_h() {
        assert_eq!(size_of::<Aes128>(), 40);
        assert_eq!(size_of::<Aes256>(), 56);
        assert_eq!(size_of::<Chacha>(), 56);
    }

    #[test]
    fn probe_never_panics_and_explains_user_mode() {
        let p = probe();
        if p.mode == "user" {
            assert!(p.reason.as_deref().is_some_and(|r| !r.is_empty()));
        } else {
            assert!(!p.ciphers.names().is_empty());
        }
    }
}

/// A connection's socket as the core's [`KernelTlsSocket`](devgate_core::kernel_tls::KernelTlsSocket): the system calls above, on its fd.
#[derive(Debug, Clone, Copy)]
pub struct FdSocket<'a>(pub BorrowedFd<'a>);

impl devgate_core::kernel_tls::KernelTlsSocket for FdSocket<'_> {
    fn attach_ulp(&mut self) -> io::Result<()> {
        attach_ulp(self.0)
    }

    fn set_key(
        &mut self,
        dir: Dir,
        version: ProtocolVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> io::Result<()> {
        set_key(self.0, dir, version, seq, secrets)
    }

    fn send_record(&mut self, record_type: u8, payload: &[u8]) -> io::Result<usize> {
        send_record(self.0, record_type, payload)
    }

    fn recv_record(&mut self, buf: &mut [u8]) -> io::Result<(u8, usize)> {
        recv_record(self.0, buf)
    }
}
