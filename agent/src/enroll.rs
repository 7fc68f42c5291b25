//! `devgate-agent enroll`: first contact as a person does it. Find the gateway (given, or
//! from an e-mail address through DNS TXT), show the root's fingerprint with one group
//! hidden and have the person type it (or compare a full `--fingerprint` for unattended
//! provisioning), then trade the unit ID and key for a certificate. Nothing is stored
//! unless all of that succeeded.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use devgate_client::{FirstContact, ResolverConfigChoice};

use crate::state::{GatewayRef, StateDir};

/// Limit on the first-contact handshake.
const FIRST_CONTACT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, clap::Args)]
pub(crate) struct EnrollArgs {
    /// The gateway, HOST[:PORT] (port 8443 when omitted).
    #[arg(long, conflicts_with = "email", required_unless_present = "email")]
    gateway: Option<String>,
    /// Your e-mail address (or domain): the gateway is found through the DNS TXT record
    /// `_devgate.<domain>`.
    #[arg(long)]
    email: Option<String>,
    /// The DNS server to ask for --email (IP:PORT); default: the system's resolvers.
    #[arg(long, requires = "email")]
    nameserver: Option<SocketAddr>,
    /// The enrollment key from your administrator.
    #[arg(long, env = "DEVGATE_ENROLL_KEY")]
    key: String,
    /// This device's unit ID; default: the host name.
    #[arg(long)]
    unit: Option<String>,
    /// The gateway's full root fingerprint, for unattended provisioning (no prompt).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Where to store the credential.
    #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Reach the gateway through this HTTP proxy (CONNECT), http://[user:pass@]host:port;
    /// default: $HTTPS_PROXY. NO_PROXY bypasses either for the gateways it lists.
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

pub(crate) async fn run(args: EnrollArgs) -> Result<()> {
    let (host, port) = match (&args.gateway, &args.email) {
        (Some(g), _) => split_host_port(g)?,
        (None, Some(email)) => {
            let resolver = match args.nameserver {
                Some(ns) => ResolverConfigChoice::Nameserver(ns),
                None => ResolverConfigChoice::System,
            };
            let found = devgate_client::discover(email, &resolver).await?;
            println!("Found the gateway of {email}: {}", found.url);
            (found.host, found.port)
        }
        (None, None) => bail!("give --gateway HOST[:PORT] or --email ADDRESS"),
    };
    let unit = match args.unit {
        Some(u) => u,
        None => hostname()?,
    };
    let addr = resolve(&host, port).await?;
    let proxy = crate::proxy::select(args.proxy.as_deref(), &host, addr)?;
    let contact =
        devgate_client::fetch_gateway_root_via(proxy.as_ref(), addr, &host, FIRST_CONTACT_TIMEOUT)
            .await?;
    let roots = match &args.fingerprint {
        Some(full) => {
            if !devgate_pki::fingerprint_matches(&contact.fingerprint, full) {
                bail!(
                    "the gateway {host}:{port} presents a root with fingerprint\n  {}\nwhich is \
                     not the --fingerprint given; this may not be your gateway: nothing was \
                     stored",
                    contact.fingerprint
                );
            }
            // The fingerprint matched as a whole; confirm also checks the chain.
            let group = contact.fingerprint.split(' ').next().unwrap_or_default();
            contact.confirm(0, group)?
        }
        None => prompt(&contact, &host, port)?,
    };
    let enrolled =
        devgate_client::enroll_via(proxy.as_ref(), addr, &host, &roots, &unit, &args.key).await?;
    let roots_pem: String = roots
        .iter()
        .map(|r| pem("CERTIFICATE", r.as_ref()))
        .collect();
    let state = StateDir::new(&args.state_dir);
    state.store_enrollment(
        &GatewayRef {
            host: host.clone(),
            port,
            unit: unit.clone(),
        },
        &enrolled.chain_pem,
        &enrolled.key_pem,
        &roots_pem,
    )?;
    println!(
        "Enrolled as unit {unit} with gateway {host}:{port}; credential stored in {}. \
         Start the agent with `devgate-agent run`.",
        args.state_dir.display()
    );
    Ok(())
}

/// Shows the fingerprint with a random group hidden and reads that group from the person.
fn prompt(
    contact: &FirstContact,
    host: &str,
    port: u16,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    let hidden = FirstContact::random_hidden_group();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "The gateway {host}:{port} presents this root certificate fingerprint:\n\n  {}\n\n\
         Compare it with the one your administrator sees (`devgate fingerprint`) and type \
         group {} (the hidden one):",
        contact.challenge(hidden),
        hidden + 1
    )?;
    write!(out, "> ")?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the fingerprint group from the terminal")?;
    contact.confirm(hidden, &line).map_err(|e| {
        anyhow::anyhow!("{e}\nNothing was stored; run `devgate-agent enroll` again to retry.")
    })
}

pub(crate) fn split_host_port(s: &str) -> Result<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, tail) = rest
            .split_once(']')
            .with_context(|| format!("{s:?}: an IPv6 address is written [ADDRESS]:PORT"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => parse_port(s, p)?,
            None => devgate_client::DEFAULT_GATEWAY_PORT,
        };
        return Ok((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => Ok((host.to_owned(), parse_port(s, p)?)),
        _ => Ok((s.to_owned(), devgate_client::DEFAULT_GATEWAY_PORT)),
    }
}

fn parse_port(whole: &str, p: &str) -> Result<u16> {
    p.parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("{whole:?}: the port {p:?} is not a number from 1 to 65535"))
}

pub(crate) async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving the gateway's name {host}"))?
        .next()
        .with_context(|| format!("the gateway's name {host} has no address"))
}

fn hostname() -> Result<String> {
    let name = rustix::system::uname();
    let name = name.nodename().to_string_lossy().trim().to_owned();
    if name.is_empty() {
        bail!("this host has no name; give the unit ID with --unit");
    }
    Ok(name)
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    use std::fmt::Write as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(s, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(s, "-----END {label}-----");
    s
}
