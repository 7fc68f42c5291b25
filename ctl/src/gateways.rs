//! The manager's connections: the credential, one [`Mux`] per instance (each `--gateway`,
//! with every address its name resolves to), and finding the gateway a device is connected
//! to (each is asked in turn; `device_not_connected` means "try the next"). `devices` uses
//! a [`Fleet`] instead, which merges the instances' presence into one view.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use devgate_client::{
    Body, ClientError, ConnectOptions, DevgateStream, ErrorCode, Fleet, FleetOptions, Frame, Mux,
    Role,
};
use serde_json::Value;

/// Limit on one control request or command round trip, a little over the gateway's own
/// request timeout (60 s) so that its `request_timeout` arrives first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(70);

#[derive(Debug, clap::Args)]
pub(crate) struct ConnArgs {
    /// A gateway, HOST:PORT; repeat for several instances of a fleet, or give one name
    /// that resolves to all of them (every address is connected; the device is looked for
    /// where it is, then on each in turn).
    #[arg(
        long = "gateway",
        required = true,
        env = "DEVGATE_GATEWAY",
        value_delimiter = ','
    )]
    gateways: Vec<String>,
    /// A directory with the manager credential as `devgate managers issue --out` writes it
    /// (NAME.pem and NAME.key; the root as root.pem or ca.pem unless --ca is given).
    #[arg(long, env = "DEVGATE_CREDS", conflicts_with_all = ["cert", "key"])]
    creds: Option<PathBuf>,
    /// The manager certificate chain (PEM).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The gateway's root certificate (PEM), e.g. pki/root.pem of its data directory.
    #[arg(long, env = "DEVGATE_CA")]
    ca: Option<PathBuf>,
    /// Reach the gateways through this HTTP proxy (CONNECT), http://[user:pass@]host:port;
    /// default: $HTTPS_PROXY. NO_PROXY bypasses either for the gateways it lists.
    #[arg(long, value_name = "URL")]
    pub(crate) proxy: Option<String>,
}

impl ConnArgs {
    /// The gateways as given (`HOST:PORT`).
    pub(crate) fn labels(&self) -> &[String] {
        &self.gateways
    }
}

/// One connected gateway.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub(crate) label: String,
    pub(crate) mux: Mux,
    next_id: u32,
}

impl Gateway {
    fn next_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    /// Sends a Control request and waits for its reply (JSON).
    pub(crate) async fn control(&mut self, request: &Value) -> Result<Value> {
        let id = self.next_id();
        let payload = request.to_string();
        self.mux
            .sender()
            .send(&Frame::control(id, payload.as_bytes()))
            .await?;
        let reply = self.wait_for(id, true).await?;
        serde_json::from_slice(&reply).context("the gateway's control reply is not JSON")
    }

    /// Sends a Command to `unit`; `Ok(None)` when the device is not connected here.
    pub(crate) async fn command(&mut self, unit: &str, payload: &[u8]) -> Result<Option<Vec<u8>>> {
        let id = self.next_id();
        self.mux
            .sender()
            .send(&Frame::command(unit, id, payload))
            .await?;
        match self.wait_for(id, false).await {
            Ok(reply) => Ok(Some(reply)),
            Err(e) if matches!(e.downcast_ref::<Refused>(), Some(r) if r.0 == ErrorCode::DeviceNotConnected) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn wait_for(&mut self, id: u32, control: bool) -> Result<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let r = tokio::time::timeout_at(deadline, self.mux.next_frame())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("{}: no answer within {REQUEST_TIMEOUT:?}", self.label)
                })??;
            let f = r.frame();
            if f.id != id {
                continue;
            }
            match f.body {
                Body::Control { payload } if control => return Ok(payload.to_vec()),
                Body::Response { payload } if !control => return Ok(payload.to_vec()),
                Body::Error { code, message } => {
                    return Err(anyhow::Error::new(Refused(code, message.to_owned()))
                        .context(format!("{}: {} ({message})", self.label, code.as_str())));
                }
                _ => {}
            }
        }
    }
}

/// An Error frame answering a request.
#[derive(Debug)]
pub(crate) struct Refused(pub(crate) ErrorCode, pub(crate) String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0.as_str(), self.1)
    }
}

impl std::error::Error for Refused {}

/// Every instance the `--gateway` arguments name: each HOST:PORT with every address HOST
/// resolves to (a fleet behind one DNS name), in order, without duplicates.
pub(crate) async fn instances(args: &ConnArgs) -> Result<Vec<ConnectOptions>> {
    let mut out: Vec<ConnectOptions> = Vec::new();
    for g in &args.gateways {
        let (host, port) = split_host_port(g)?;
        for addr in devgate_client::resolve_all(&host, port).await? {
            if !out.iter().any(|o| o.addr == addr) {
                let mut opts = ConnectOptions::new(addr, host.clone(), Role::Manager);
                opts.proxy = devgate_client::Proxy::select(args.proxy.as_deref(), &host, addr)
                    .context("choosing the HTTP proxy")?;
                out.push(opts);
            }
        }
    }
    Ok(out)
}

/// The name ctl prints for an instance: its address, and the name it was given by when
/// that is not the address.
fn label(opts: &ConnectOptions) -> String {
    if opts.server_name == opts.addr.ip().to_string() {
        opts.addr.to_string()
    } else {
        format!("{} ({})", opts.server_name, opts.addr)
    }
}

/// Connects to every instance as one fleet (merged presence, commands routed to the
/// instance holding the device); instances that cannot be reached yet are retried.
pub(crate) async fn connect_fleet(args: &ConnArgs, opts: FleetOptions) -> Result<Fleet> {
    let tls = tls(args)?;
    let instances = instances(args).await?;
    Ok(Fleet::connect(instances, tls, opts).await?)
}

/// Connects to every instance at once; one that cannot be reached is reported and left
/// out, none at all is an error.
pub(crate) async fn connect_all(args: &ConnArgs) -> Result<Vec<Gateway>> {
    let tls = tls(args)?;
    let attempts = instances(args).await?.into_iter().map(|opts| {
        let tls = tls.clone();
        async move {
            let r = devgate_client::connect(&opts, tls).await;
            (label(&opts), r)
        }
    });
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for (label, r) in futures_join(attempts).await {
        match r {
            Ok(conn) => out.push(Gateway {
                label,
                mux: Mux::new(conn),
                next_id: 0,
            }),
            Err(e) => {
                eprintln!("devgate-ctl: gateway {label}: {e:#}");
                failures.push(label);
            }
        }
    }
    if out.is_empty() {
        bail!("could not connect to any gateway ({})", failures.join(", "));
    }
    Ok(out)
}

/// Connects to one gateway, `HOST:PORT` (also to reconnect after it went away).
pub(crate) async fn connect_one(
    label: &str,
    tls: Arc<rustls::ClientConfig>,
    proxy: Option<&str>,
) -> Result<Gateway> {
    let (host, port) = split_host_port(label)?;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let mut opts = ConnectOptions::new(addr, host.clone(), Role::Manager);
    opts.proxy =
        devgate_client::Proxy::select(proxy, &host, addr).context("choosing the HTTP proxy")?;
    let conn = devgate_client::connect(&opts, tls).await?;
    Ok(Gateway {
        label: label.to_owned(),
        mux: Mux::new(conn),
        next_id: 0,
    })
}

async fn futures_join<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Opens a stream to `unit` on whichever gateway has it, trying `first` first. Returns the
/// index of that gateway too.
pub(crate) async fn open_stream(
    gateways: &[Gateway],
    first: usize,
    unit: &str,
    params: &str,
) -> Result<(usize, DevgateStream)> {
    let order = (0..gateways.len()).map(|i| (first + i) % gateways.len());
    for i in order {
        match gateways[i].mux.open_stream(unit, params.as_bytes()).await {
            Ok(s) => return Ok((i, s)),
            Err(ClientError::StreamRefused { code, .. })
                if code == u16::from(ErrorCode::DeviceNotConnected) => {}
            Err(ClientError::StreamRefused { code, reason }) => {
                return Err(
                    anyhow::Error::new(Refused(ErrorCode::from(code), reason.clone()))
                        .context(format!("device {unit} refused {params:?}: {reason}")),
                );
            }
            Err(e) => eprintln!("devgate-ctl: gateway {}: {e}", gateways[i].label),
        }
    }
    bail!(
        "device {unit} is not connected to {}",
        gateways
            .iter()
            .map(|g| g.label.as_str())
            .collect::<Vec<_>>()
            .join(" or ")
    )
}

/// The manager's TLS configuration from the credential arguments.
pub(crate) fn tls(args: &ConnArgs) -> Result<Arc<rustls::ClientConfig>> {
    let (cert, key, dir_ca) = match (&args.creds, &args.cert, &args.key) {
        (Some(dir), _, _) => {
            let (c, k) = find_pair(dir)?;
            let ca = ["root.pem", "ca.pem"]
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.exists());
            (c, k, ca)
        }
        (None, Some(c), Some(k)) => (c.clone(), k.clone(), None),
        _ => bail!("give the manager credential: --creds DIR, or --cert FILE --key FILE"),
    };
    let ca = args.ca.clone().or(dir_ca).context(
        "give the gateway's root certificate with --ca FILE (pki/root.pem of its data directory)",
    )?;
    let roots = devgate_pki::load_certs(&ca)?;
    let chain = devgate_pki::load_certs(&cert)?;
    let key = devgate_pki::load_key(&key)?;
    Ok(devgate_client::tls_config(&roots, Some((chain, key)))?)
}

/// The one NAME.pem + NAME.key pair in a credentials directory.
fn find_pair(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut pairs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "key") {
            let cert = path.with_extension("pem");
            if cert.exists() {
                pairs.push((cert, path));
            }
        }
    }
    match pairs.len() {
        1 => Ok(pairs.remove(0)),
        0 => bail!(
            "{} holds no NAME.pem + NAME.key pair (as `devgate managers issue --out` writes)",
            dir.display()
        ),
        _ => bail!(
            "{} holds several credentials; pick one with --cert and --key",
            dir.display()
        ),
    }
}

pub(crate) fn split_host_port(s: &str) -> Result<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .with_context(|| format!("{s:?}: write an IPv6 gateway as [ADDRESS]:PORT"))?;
        (h, p)
    } else {
        s.rsplit_once(':')
            .with_context(|| format!("{s:?}: a gateway is HOST:PORT"))?
    };
    let port = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("{s:?}: {port:?} is not a port"))?;
    Ok((host.to_owned(), port))
}
