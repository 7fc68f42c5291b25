//! TLS session ticket keys kept in the data dir, so that devices resume their sessions
//! (an abbreviated handshake: no signature, no certificate checks) after a gateway
//! restart or reload, when they all reconnect at once.
//!
//! rustls' own ticketer keeps its keys in memory, so every restart made every ticket
//! useless and turned a fleet's reconnect into a storm of full handshakes. This one keeps
//! two AES-256-GCM keys in `<data_dir>/pki/ticket-keys` (mode 0600, beside the CA keys,
//! which are worth more): the current key seals new tickets, the previous one still opens
//! the tickets it sealed. Keys rotate every [`ROTATE_SECS`]; a ticket thus opens for
//! between one and two rotation periods and never after its key is erased, which is what
//! bounds the damage to forward secrecy of a stolen key file.
//!
//! Ticket format: key id (8 bytes) ‖ nonce (12) ‖ AES-256-GCM ciphertext and tag.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use rustls::server::ProducesTickets;

/// Seconds between key rotations (and the ticket lifetime announced to clients).
pub const ROTATE_SECS: u64 = 6 * 3600;
/// The key file's name under `<data_dir>/pki`.
pub const FILE_NAME: &str = "ticket-keys";
const KEY_LEN: usize = 32;
const ID_LEN: usize = 8;

struct Key {
    id: [u8; ID_LEN],
    secret: [u8; KEY_LEN],
    created: u64,
    aead: RandomizedNonceKey,
}

impl Key {
    fn new(id: [u8; ID_LEN], secret: [u8; KEY_LEN], created: u64) -> Result<Self> {
        let aead = RandomizedNonceKey::new(&AES_256_GCM, &secret)
            .map_err(|_| anyhow::anyhow!("cannot set up an AES-256-GCM ticket key"))?;
        Ok(Self {
            id,
            secret,
            created,
            aead,
        })
    }

    fn generate(created: u64) -> Result<Self> {
        let mut bytes = [0u8; ID_LEN + KEY_LEN];
        aws_lc_rs::rand::fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("no randomness for a ticket key"))?;
        let (id, secret) = bytes.split_at(ID_LEN);
        Self::new(id.try_into()?, secret.try_into()?, created)
    }

    fn line(&self) -> String {
        format!("{} {} {}\n", self.created, hex(&self.id), hex(&self.secret))
    }
}

struct Keys {
    current: Key,
    previous: Option<Key>,
}

/// Session tickets sealed with keys from the data dir (see the module docs).
pub struct PersistentTicketer {
    path: PathBuf,
    keys: RwLock<Keys>,
}

impl std::fmt::Debug for PersistentTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentTicketer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn parse(text: &str) -> Result<Vec<Key>> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [created, id, secret] = fields[..] else {
            bail!("line {}: expected `CREATED ID KEY`", n + 1);
        };
        let created = created
            .parse()
            .with_context(|| format!("line {}: bad creation time", n + 1))?;
        let (Some(id), Some(secret)) = (unhex(id), unhex(secret)) else {
            bail!("line {}: bad key id or key (hex)", n + 1);
        };
        keys.push(Key::new(id, secret, created)?);
    }
    Ok(keys)
}

impl PersistentTicketer {
    /// Loads the keys from `<data_dir>/pki/ticket-keys`, creating or rotating them as
    /// their age asks. An unreadable file is replaced (a warning says so): tickets are a
    /// cache, and a device without a usable one does a full handshake.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let path = devgate_pki::PkiPaths::new(data_dir).dir.join(FILE_NAME);
        let now = unix_now();
        let mut loaded = match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: {e:#}; starting with new ticket keys (devices do one full handshake)",
                    path.display()
                );
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let current = match loaded.is_empty() {
            true => Key::generate(now)?,
            false => loaded.remove(0),
        };
        let previous = loaded.into_iter().next();
        let ticketer = Self {
            path,
            keys: RwLock::new(Keys { current, previous }),
        };
        {
            let mut keys = ticketer
                .keys
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            ticketer.rotate_if_due(&mut keys, now)?;
        }
        ticketer.save()?;
        Ok(ticketer)
    }

    /// Rotates (more than once if the gateway was down for long) while the current key
    /// is older than a period; the key two periods old is erased.
    fn rotate_if_due(&self, keys: &mut Keys, now: u64) -> Result<bool> {
        let mut rotated = false;
        while now >= keys.current.created.saturating_add(ROTATE_SECS) {
            let fresh = Key::generate(now)?;
            keys.previous = Some(std::mem::replace(&mut keys.current, fresh));
            if now
                >= keys
                    .previous
                    .as_ref()
                    .map_or(0, |p| p.created)
                    .saturating_add(2 * ROTATE_SECS)
            {
                keys.previous = None;
            }
            rotated = true;
        }
        Ok(rotated)
    }

    fn save(&self) -> Result<()> {
        let text = {
            let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            let mut text = keys.current.line();
            if let Some(p) = &keys.previous {
                text.push_str(&p.line());
            }
            text
        };
        devgate_pki::write_file(&self.path, text.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Rotates if the current key has served its period (checked when a ticket is made).
    fn maybe_rotate(&self) {
        let now = unix_now();
        let due = {
            let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
            now >= keys.current.created.saturating_add(ROTATE_SECS)
        };
        if !due {
            return;
        }
        let rotated = {
            let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
            self.rotate_if_due(&mut keys, now)
        };
        match rotated.and_then(|r| if r { self.save() } else { Ok(()) }) {
            Ok(()) => {}
            Err(e) => crate::warn_limited!("ticket key rotation: {e:#}"),
        }
    }
}

impl ProducesTickets for PersistentTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(ROTATE_SECS).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.maybe_rotate();
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let key = &keys.current;
        let mut sealed = plain.to_vec();
        let nonce = key
            .aead
            .seal_in_place_append_tag(Aad::from(key.id), &mut sealed)
            .ok()?;
        let mut ticket = Vec::with_capacity(ID_LEN + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&key.id);
        ticket.extend_from_slice(nonce.as_ref());
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = ticket.split_at_checked(ID_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let key = [Some(&keys.current), keys.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(key.id), &mut buf)
            .ok()?;
        let len = plain.len();
        buf.truncate(len);
        Some(buf)
    }
}

/// The process's ticketer for `data_dir`: opened once, shared by every TLS configuration
/// a reload builds, so that a reload keeps tickets valid too.
pub fn for_data_dir(data_dir: &Path) -> Result<Arc<dyn ProducesTickets>> {
    type Opened = Vec<(PathBuf, Arc<PersistentTicketer>)>;
    static TICKETERS: OnceLock<Mutex<Opened>> = OnceLock::new();
    let all = TICKETERS.get_or_init(|| Mutex::new(Vec::new()));
    let mut all = all.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, t)) = all.iter().find(|(p, _)| p == data_dir) {
        return Ok(t.clone());
    }
    let t = Arc::new(PersistentTicketer::open(data_dir)?);
    all.push((data_dir.to_path_buf(), t.clone()));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("pki")).expect("pki dir");
        dir
    }

    #[test]
    fn a_ticket_opens_after_the_keys_are_read_again_and_not_when_tampered() {
        let dir = data_dir();
        let a = PersistentTicketer::open(dir.path()).expect("open");
        let ticket = a.encrypt(b"session state").expect("seal");
        let b = PersistentTicketer::open(dir.path()).expect("reopen");
        assert_eq!(b.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        let mut bad = ticket.clone();
        if let Some(last) = bad.last_mut() {
            *last ^= 1;
        }
        assert_eq!(b.decrypt(&bad), None);
        assert_eq!(b.decrypt(&ticket[..10]), None);
        assert_eq!(b.decrypt(&[]), None);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("pki").join(FILE_NAME))
                .expect("key file")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rotation_keeps_one_previous_key_and_erases_older_ones() {
        let dir = data_dir();
        let t = PersistentTicketer::open(dir.path()).expect("open");
        let first = t.encrypt(b"one").expect("seal");
        let now = unix_now();
        {
            let mut keys = t.keys.write().expect("lock");
            assert!(
                t.rotate_if_due(&mut keys, now + ROTATE_SECS)
                    .expect("rotate")
            );
        }
        assert_eq!(t.decrypt(&first).as_deref(), Some(&b"one"[..]));
        {
            let mut keys = t.keys.write().expect("lock");
            assert!(
                t.rotate_if_due(&mut keys, now + 2 * ROTATE_SECS)
                    .expect("rotate")
            );
        }
        assert_eq!(
            t.decrypt(&first),
            None,
            "a key two periods old still opens tickets"
        );
    }

    #[test]
    fn a_damaged_key_file_is_replaced() {
        let dir = data_dir();
        let path = dir.path().join("pki").join(FILE_NAME);
        std::fs::write(&path, "not keys\n").expect("write");
        let t = PersistentTicketer::open(dir.path()).expect("open");
        let ticket = t.encrypt(b"x").expect("seal");
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"x"[..]));
        assert!(parse(&std::fs::read_to_string(&path).expect("read")).is_ok());
    }
}
