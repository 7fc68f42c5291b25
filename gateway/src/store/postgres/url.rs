//! The store URL: parsing and checking it, `sslrootcert` (which the client does not parse)
//! and the transport it asks for, and a description of it without secrets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{CONNECT_TIMEOUT, TCP_USER_TIMEOUT};

/// A URL's location without secrets: `user@host:port/dbname`.
pub(super) fn describe(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(h, p)| match h {
            postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
            postgres::config::Host::Unix(path) => format!("{}:{p}", path.display()),
        })
        .collect();
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        config.get_dbname().unwrap_or("?")
    )
}

/// Takes `sslrootcert=FILE` out of a URL (`?a=b&sslrootcert=F`) or a keyword string
/// (`host=h sslrootcert=F`): the client parses neither, devgate uses it for TLS.
fn take_root_cert(url: &str) -> (String, Option<PathBuf>) {
    const KEY: &str = "sslrootcert=";
    let mut root = None;
    if let Some((base, query)) = url.split_once('?')
        && (url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| match kv.strip_prefix(KEY) {
                Some(path) => {
                    root = Some(PathBuf::from(path));
                    false
                }
                None => true,
            })
            .collect();
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (url, root);
    }
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|kv| match kv.strip_prefix(KEY) {
            Some(path) => {
                root = Some(PathBuf::from(path));
                false
            }
            None => true,
        })
        .collect();
    (kept.join(" "), root)
}

/// How connections are made: plain, or TLS verified against the URL's `sslrootcert`.
#[derive(Clone)]
pub enum Transport {
    /// No TLS (`sslmode=disable` or `prefer`).
    Plain,
    /// TLS (`sslmode=require`).
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "Plain",
            Self::Tls(_) => "Tls",
        })
    }
}

fn tls_transport(root: &Path) -> Result<Transport, String> {
    let certs = devgate_pki::load_certs(root).map_err(|e| {
        format!("sslrootcert={}: {e} (give the PEM file of the CA that issued the database server's certificate)", root.display())
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("sslrootcert={}: {e}", root.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS to PostgreSQL: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Transport::Tls(
        tokio_postgres_rustls::MakeRustlsConnect::new(config),
    ))
}

/// Parses and checks a store URL (also `config check`'s test of `[store] url`).
pub fn parse_url(url: &str) -> Result<postgres::Config, String> {
    parse_url_tls(url).map(|(config, _)| config)
}

/// [`parse_url`] and the transport its `sslmode` and `sslrootcert` ask for.
pub fn parse_url_tls(url: &str) -> Result<(postgres::Config, Transport), String> {
    let (url, root) = take_root_cert(url);
    let mut config: postgres::Config = url.parse().map_err(|e| {
        format!("not a PostgreSQL URL ({e}); expected postgres://USER:PASSWORD@HOST:PORT/DBNAME")
    })?;
    let transport = match (config.get_ssl_mode(), root) {
        (postgres::config::SslMode::Require, Some(root)) => tls_transport(&root)?,
        (postgres::config::SslMode::Require, None) => {
            return Err(
                "sslmode=require needs sslrootcert=FILE too: the PEM file of the CA that issued the database server's certificate, which devgate verifies (with the host name)".into(),
            );
        }
        (_, Some(_)) => {
            return Err(
                "sslrootcert is given but sslmode is not require: add sslmode=require to use TLS, or drop sslrootcert".into(),
            );
        }
        _ => Transport::Plain,
    };
    if config.get_hosts().is_empty() {
        return Err("the URL names no host (postgres://USER@HOST/DBNAME)".into());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.tcp_user_timeout(TCP_USER_TIMEOUT);
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    if config.get_application_name().is_none() {
        config.application_name("devgate");
    }
    Ok((config, transport))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_of_urls_and_keyword_strings() {
        assert_eq!(
            take_root_cert("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem"),
            (
                "postgres://u@h/db?sslmode=require".to_owned(),
                Some(PathBuf::from("/ca.pem"))
            )
        );
        assert_eq!(
            take_root_cert("postgres://u@h/db?sslrootcert=/ca.pem"),
            (
                "postgres://u@h/db".to_owned(),
                Some(PathBuf::from("/ca.pem"))
            )
        );
        assert_eq!(
            take_root_cert("host=h sslrootcert=/ca.pem sslmode=require"),
            (
                "host=h sslmode=require".to_owned(),
                Some(PathBuf::from("/ca.pem"))
            )
        );
        assert_eq!(
            take_root_cert("postgres://u@h/db"),
            ("postgres://u@h/db".to_owned(), None)
        );
    }

    #[test]
    fn require_without_a_root_and_a_root_without_require_are_refused() {
        let e = parse_url("postgres://u@h/db?sslmode=require").expect_err("no root");
        assert!(e.contains("sslrootcert"), "{e}");
        let e = parse_url("postgres://u@h/db?sslrootcert=/x.pem").expect_err("no require");
        assert!(e.contains("sslmode=require"), "{e}");
        let e = parse_url("postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent.pem")
            .expect_err("no file");
        assert!(e.contains("/nonexistent.pem"), "{e}");
    }
}
