//! What remote-access streams carry (docs/PROTOCOL.md section 11): the open parameters
//! of a StreamOpen (`pty;cols=80;rows=24;term=xterm`, `tcp:127.0.0.1:22`,
//! `file-put;name=…;size=…;sha256=…;offset=…`, `file-get;path=…;offset=…`), the records of
//! a terminal stream (data, window size, exit status) and the headers a device sends first
//! on a file stream (where the bytes start, and a sent file's size and SHA-256).
//!
//! The gateway never looks inside either; they are a contract between `devgate-agent` and
//! `devgate-ctl` (and any other agent or manager tool), so they live here, sans-IO, with
//! golden vectors in `tests/remote_vectors.json`.

use thiserror::Error;

/// Largest body of one terminal record (its length field is a u16).
pub const MAX_RECORD_BODY: usize = u16::MAX as usize;
/// Bytes in front of a record's body: kind (1) and length (2).
pub const RECORD_HEADER: usize = 3;
/// Longest TERM value accepted in `pty` parameters.
const MAX_TERM: usize = 64;

/// Why open parameters or a terminal record could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RemoteError {
    /// The open parameters are not one of the forms of PROTOCOL.md section 11.
    #[error("open parameters {0:?}: {1}")]
    BadParams(String, &'static str),
    /// A terminal record of a known kind has a body of the wrong size.
    #[error("terminal record kind {kind} has a {len}-byte body; it must be {expected} bytes")]
    BadRecord {
        /// The record kind.
        kind: u8,
        /// Its body length.
        len: usize,
        /// What the kind requires.
        expected: usize,
    },
    /// A file stream's header is inconsistent.
    #[error("file stream header: {0}")]
    BadHeader(&'static str),
}

/// Parsed open parameters of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenParams {
    /// A pseudo-terminal running the device's configured shell.
    Pty {
        /// Columns (0: the device's default).
        cols: u16,
        /// Rows (0: the device's default).
        rows: u16,
        /// TERM for the shell (empty: the device's default).
        term: String,
    },
    /// A TCP connection from the device to `host:port`.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A file sent to the device (section 11.5).
    FilePut {
        /// File name inside the device's receive directory, or an absolute path inside one
        /// of its receive directories.
        name: String,
        /// Whole size in bytes.
        size: u64,
        /// SHA-256 of the whole file, 64 lower-case hex digits.
        sha256: String,
        /// The most the device may skip of what it already holds (resume); 0 starts over.
        /// The device answers with where the bytes actually start ([`PutStart`]).
        offset: u64,
    },
    /// A file sent by the device (section 11.5).
    FileGet {
        /// Absolute path on the device.
        path: String,
        /// Where to start (resume); the device answers with [`GetHeader`].
        offset: u64,
    },
}

impl OpenParams {
    /// Reads open parameters. Unknown `key=value` members of the `;` forms are ignored,
    /// so that later versions can add some.
    pub fn parse(bytes: &[u8]) -> Result<Self, RemoteError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| bad(&String::from_utf8_lossy(bytes), "not UTF-8"))?;
        if text.chars().any(char::is_control) {
            return Err(bad(text, "control characters are not allowed"));
        }
        if let Some(target) = text.strip_prefix("tcp:") {
            let (host, port) = target
                .rsplit_once(':')
                .ok_or_else(|| bad(text, "a tcp target is tcp:HOST:PORT"))?;
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(text, "the port is not a number from 1 to 65535"))?;
            let host = match host.strip_prefix('[') {
                Some(v6) => v6
                    .strip_suffix(']')
                    .ok_or_else(|| bad(text, "an IPv6 host is written [ADDRESS]"))?,
                None if host.contains(':') => {
                    return Err(bad(text, "an IPv6 host is written [ADDRESS]"));
                }
                None => host,
            };
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(bad(text, "the host is empty or contains spaces"));
            }
            return Ok(Self::Tcp {
                host: host.to_owned(),
                port,
            });
        }
        let mut parts = text.split(';');
        let kind = parts.next().unwrap_or_default();
        let mut members = Vec::new();
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(text, "members are key=value, separated by ';'"))?;
            members.push((k, v));
        }
        let get = |key: &str| members.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let number = |key: &str| -> Result<Option<u64>, RemoteError> {
            get(key)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| bad(text, "a number is not a decimal integer"))
                })
                .transpose()
        };
        match kind {
            "pty" => {
                let dim = |key: &str| -> Result<u16, RemoteError> {
                    number(key)?
                        .map(|n| {
                            u16::try_from(n)
                                .map_err(|_| bad(text, "cols and rows are at most 65535"))
                        })
                        .transpose()
                        .map(Option::unwrap_or_default)
                };
                let term = get("term").unwrap_or_default();
                if term.len() > MAX_TERM
                    || !term
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
                {
                    return Err(bad(
                        text,
                        "term is at most 64 characters of A-Z a-z 0-9 . _ + -",
                    ));
                }
                Ok(Self::Pty {
                    cols: dim("cols")?,
                    rows: dim("rows")?,
                    term: term.to_owned(),
                })
            }
            "file-put" => {
                let name = get("name").filter(|n| !n.is_empty());
                let sha = get("sha256")
                    .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
                match (name, number("size")?, sha) {
                    (Some(name), Some(size), Some(sha)) => Ok(Self::FilePut {
                        name: name.to_owned(),
                        size,
                        sha256: sha.to_ascii_lowercase(),
                        offset: number("offset")?.unwrap_or(0),
                    }),
                    _ => Err(bad(
                        text,
                        "file-put needs name=, size= and sha256= (64 hex digits)",
                    )),
                }
            }
            "file-get" => match get("path").filter(|p| !p.is_empty()) {
                Some(path) => Ok(Self::FileGet {
                    path: path.to_owned(),
                    offset: number("offset")?.unwrap_or(0),
                }),
                None => Err(bad(text, "file-get needs path=")),
            },
            _ => Err(bad(text, "unknown kind (pty, tcp:, file-put, file-get)")),
        }
    }

    /// The canonical text of these parameters (what [`parse`](Self::parse) reads back).
    pub fn encode(&self) -> String {
        match self {
            Self::Pty { cols, rows, term } => {
                let mut s = format!("pty;cols={cols};rows={rows}");
                if !term.is_empty() {
                    s.push_str(";term=");
                    s.push_str(term);
                }
                s
            }
            Self::Tcp { host, port } if host.contains(':') => format!("tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => format!("tcp:{host}:{port}"),
            Self::FilePut {
                name,
                size,
                sha256,
                offset,
            } => format!("file-put;name={name};size={size};sha256={sha256};offset={offset}"),
            Self::FileGet { path, offset } => format!("file-get;path={path};offset={offset}"),
        }
    }
}

/// Device → manager, the first 8 bytes of an accepted `file-put` stream: the offset from
/// which the manager sends the file's bytes (u64 big-endian). It is the smaller of the
/// request's `offset` and what the device already holds of this file (same name, size and
/// SHA-256) from an earlier, dropped transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutStart(pub u64);

impl PutStart {
    /// Bytes on the wire.
    pub const LEN: usize = 8;

    /// The wire form.
    pub fn encode(&self) -> [u8; Self::LEN] {
        self.0.to_be_bytes()
    }

    /// Reads it from the front of `buf`; `None` until all of it is there.
    pub fn decode(buf: &[u8]) -> Option<Self> {
        let b: [u8; Self::LEN] = buf.get(..Self::LEN)?.try_into().ok()?;
        Some(Self(u64::from_be_bytes(b)))
    }
}

/// Device → manager, the first 48 bytes of an accepted `file-get` stream: the file's whole
/// size, the offset its bytes start at (the request's `offset`, at most `size`), and the
/// SHA-256 of the whole file. The bytes from `start` to `size` follow, then the device closes
/// the stream with code 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetHeader {
    /// Whole size in bytes.
    pub size: u64,
    /// Where the bytes that follow start.
    pub start: u64,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
}

impl GetHeader {
    /// Bytes on the wire: size u64, start u64, sha256.
    pub const LEN: usize = 48;

    /// The wire form.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        for (dst, src) in out.iter_mut().zip(
            self.size
                .to_be_bytes()
                .iter()
                .chain(&self.start.to_be_bytes())
                .chain(&self.sha256),
        ) {
            *dst = *src;
        }
        out
    }

    /// Reads it from the front of `buf`: `Ok(None)` until all of it is there; an error when
    /// `start` is past `size`.
    pub fn decode(buf: &[u8]) -> Result<Option<Self>, RemoteError> {
        let Some(b) = buf.get(..Self::LEN) else {
            return Ok(None);
        };
        let (size, rest) = b.split_at(8);
        let (start, sha) = rest.split_at(8);
        let word = |w: &[u8]| <[u8; 8]>::try_from(w).map(u64::from_be_bytes).unwrap_or(0);
        let sha256 = <[u8; 32]>::try_from(sha).unwrap_or([0; 32]);
        let h = Self {
            size: word(size),
            start: word(start),
            sha256,
        };
        if h.start > h.size {
            return Err(RemoteError::BadHeader("start is past the file's size"));
        }
        Ok(Some(h))
    }
}

/// Lower-case hex of a SHA-256 (as in `file-put` parameters).
pub fn sha256_hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn bad(text: &str, why: &'static str) -> RemoteError {
    RemoteError::BadParams(text.to_owned(), why)
}

/// Record kinds of a terminal stream.
pub mod kind {
    /// Terminal bytes, either direction.
    pub const DATA: u8 = 0;
    /// Manager → device: the window size changed (cols u16, rows u16).
    pub const RESIZE: u8 = 1;
    /// Device → manager: the shell ended (status i32); the device then closes the stream.
    pub const EXIT: u8 = 2;
}

/// One record of a terminal stream: `kind u8 | length u16 | body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtyRecord<'a> {
    /// Terminal bytes (at most [`MAX_RECORD_BODY`]).
    Data(&'a [u8]),
    /// New window size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The shell's exit status: its exit code, or 128 + N when signal N ended it.
    Exit(i32),
    /// A kind this version does not know; receivers skip it.
    Unknown(u8),
}

impl PtyRecord<'_> {
    /// Appends the record to `out`. A `Data` body longer than [`MAX_RECORD_BODY`] is
    /// written as several records (an empty one as one empty record).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match *self {
            Self::Data([]) => out.extend_from_slice(&[kind::DATA, 0, 0]),
            Self::Data(bytes) => {
                for chunk in bytes.chunks(MAX_RECORD_BODY) {
                    out.push(kind::DATA);
                    out.extend_from_slice(&u16::try_from(chunk.len()).unwrap_or(0).to_be_bytes());
                    out.extend_from_slice(chunk);
                }
            }
            Self::Resize { cols, rows } => {
                out.extend_from_slice(&[kind::RESIZE, 0, 4]);
                out.extend_from_slice(&cols.to_be_bytes());
                out.extend_from_slice(&rows.to_be_bytes());
            }
            Self::Exit(status) => {
                out.extend_from_slice(&[kind::EXIT, 0, 4]);
                out.extend_from_slice(&status.to_be_bytes());
            }
            Self::Unknown(k) => out.extend_from_slice(&[k, 0, 0]),
        }
    }

    /// Reads the record at the front of `buf`: `Ok(None)` until all of it is there, else
    /// the record and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(PtyRecord<'_>, usize)>, RemoteError> {
        let [k, hi, lo, rest @ ..] = buf else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(body) = rest.get(..len) else {
            return Ok(None);
        };
        let four = |expected: usize| -> Result<[u8; 4], RemoteError> {
            <[u8; 4]>::try_from(body).map_err(|_| RemoteError::BadRecord {
                kind: *k,
                len,
                expected,
            })
        };
        let record = match *k {
            kind::DATA => PtyRecord::Data(body),
            kind::RESIZE => {
                let [a, b, c, d] = four(4)?;
                PtyRecord::Resize {
                    cols: u16::from_be_bytes([a, b]),
                    rows: u16::from_be_bytes([c, d]),
                }
            }
            kind::EXIT => PtyRecord::Exit(i32::from_be_bytes(four(4)?)),
            other => PtyRecord::Unknown(other),
        };
        Ok(Some((record, RECORD_HEADER + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_anywhere_decode_the_same() {
        let mut wire = Vec::new();
        PtyRecord::Data(b"ls\r").encode_into(&mut wire);
        PtyRecord::Resize {
            cols: 100,
            rows: 30,
        }
        .encode_into(&mut wire);
        PtyRecord::Exit(3).encode_into(&mut wire);
        for cut in 0..wire.len() {
            let (first, _) = wire.split_at(cut);
            if let Ok(Some((_, used))) = PtyRecord::decode(first) {
                assert!(used <= cut);
            }
        }
        let mut at = 0;
        let mut seen = Vec::new();
        while let Some((r, used)) = PtyRecord::decode(&wire[at..]).expect("valid") {
            seen.push(format!("{r:?}"));
            at += used;
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn long_data_is_split_into_records() {
        let big = vec![7u8; MAX_RECORD_BODY + 10];
        let mut wire = Vec::new();
        PtyRecord::Data(&big).encode_into(&mut wire);
        assert_eq!(wire.len(), big.len() + 2 * RECORD_HEADER);
    }

    #[test]
    fn ipv6_targets_round_trip() {
        let p = OpenParams::parse(b"tcp:[::1]:22").expect("valid");
        assert_eq!(p.encode(), "tcp:[::1]:22");
        assert!(OpenParams::parse(b"tcp:::1:22").is_err());
    }
}
