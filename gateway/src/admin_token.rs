//! The admin listener's bearer token: reading it at start, creating and rotating the file
//! (`devgate admin-token`), and checking a request's `Authorization` header.

use std::sync::Arc;

use anyhow::{Context, Result};

/// The admin listener's bearer token (never logged or shown).
#[derive(Clone)]
pub struct AdminToken(Arc<[u8]>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

/// Shortest token accepted from a file (the generated ones have 64 characters).
const MIN_TOKEN_LEN: usize = 16;

impl AdminToken {
    /// Whether a request head carries `Authorization: Bearer <this token>`. The comparison
    /// takes the same time wherever the first difference is, so response timing does not
    /// reveal the token a character at a time.
    pub fn authorizes(&self, head: &[u8]) -> bool {
        let Some(presented) = bearer_token(head) else {
            return false;
        };
        let expected: &[u8] = &self.0;
        let mut diff = u8::from(presented.len() != expected.len());
        for (i, e) in expected.iter().enumerate() {
            diff |= e ^ presented.get(i).copied().unwrap_or(!e);
        }
        diff == 0
    }
}

/// The token of an `Authorization: Bearer …` header in a request head.
fn bearer_token(head: &[u8]) -> Option<&[u8]> {
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len());
    head[..end].split(|&b| b == b'\n').skip(1).find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if !name.eq_ignore_ascii_case(b"authorization") {
            return None;
        }
        let value = value.trim_ascii();
        let scheme = value.get(..7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| value[7..].trim_ascii())
    })
}

/// The token the admin listener requires, or `None` where it needs none (loopback with
/// `admin_auth = "auto"`). Refuses to start a listener that needs a token without one.
pub fn load_token(config: &crate::config::Config) -> Result<Option<AdminToken>> {
    if !config.admin_requires_token() {
        return Ok(None);
    }
    let path = config.admin_token_path();
    let why = if config.admin.ip().is_loopback() {
        "admin_auth = \"token\"".to_owned()
    } else {
        format!("{} is not a loopback address", config.admin.ip())
    };
    let create = format!(
        "create one with `devgate admin-token --data-dir {}` (then give it to Prometheus and `devgate status`), or bind admin to 127.0.0.1",
        config.data_dir.display()
    );
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "the admin listener {} needs a bearer token ({why}) and there is none at {}: {create}",
            config.admin,
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "the admin listener {} needs its bearer token ({why}): cannot read {}",
                    config.admin,
                    path.display()
                )
            });
        }
    };
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN || token.bytes().any(|b| !b.is_ascii_graphic()) {
        anyhow::bail!(
            "the admin listener {} needs a bearer token ({why}) but {} does not hold one (at least {MIN_TOKEN_LEN} printable characters, no spaces): {create}",
            config.admin,
            path.display()
        );
    }
    Ok(Some(AdminToken(Arc::from(token.as_bytes()))))
}

/// Writes a new random admin token to `path` (mode 0600) unless one is there and `rotate`
/// is false; returns whether it wrote one.
pub fn create_token(path: &std::path::Path, rotate: bool) -> Result<bool> {
    if path.exists() && !rotate {
        return Ok(false);
    }
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    devgate_pki::write_file(path, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing the admin token {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_compared_whole() {
        let t = AdminToken(Arc::from(&b"0123456789abcdef"[..]));
        let req = |auth: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
        assert!(t.authorizes(req("Authorization: Bearer 0123456789abcdef").as_bytes()));
        assert!(t.authorizes(req("authorization:   bearer 0123456789abcdef  ").as_bytes()));
        for bad in [
            "Authorization: Bearer 0123456789abcdeX",
            "Authorization: Bearer 0123456789abcde",
            "Authorization: Bearer 0123456789abcdef0",
            "Authorization: Basic 0123456789abcdef",
            "Authorization: Bearer ",
            "X-Other: 1",
        ] {
            assert!(!t.authorizes(req(bad).as_bytes()), "{bad}");
        }
    }
}
