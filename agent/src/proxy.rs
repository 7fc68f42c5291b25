//! Which HTTP proxy (CONNECT) the agent reaches its gateway through: `--proxy`, else the
//! configuration's `proxy`, else `HTTPS_PROXY`; `NO_PROXY` bypasses any of them for the
//! gateways it lists (`devgate_client::Proxy::select`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use devgate_client::Proxy;

/// Fails early, at start, on a proxy URL that every connection attempt would reject.
pub(crate) fn check(url: &str, setting: &str) -> Result<()> {
    Proxy::parse(url)
        .map(drop)
        .with_context(|| format!("the {setting} setting is not a usable proxy URL"))
}

/// The proxy for the gateway `host` at `addr`; `None`: connect directly.
pub(crate) fn select(setting: Option<&str>, host: &str, addr: SocketAddr) -> Result<Option<Proxy>> {
    Proxy::select(setting, host, addr).context("choosing the HTTP proxy for the gateway")
}

/// For log lines: "direct" or "proxy HOST:PORT" (never the password).
pub(crate) fn describe(proxy: Option<&Proxy>) -> String {
    proxy.map_or_else(|| "direct".to_owned(), |p| format!("proxy {p}"))
}
