//! The operator's safety rails (issue 11, items 8, 9, 11–14), against the real binary: one
//! gateway per data dir and port, no root change that strands devices, paged key control
//! ops, an honest Retry-After, directory modes under `umask 000`, an authenticated admin
//! listener off loopback, and the `[tls]` version and cipher-suite settings.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{Body, ClientError, Connection, Frame, Incoming};
use devgate_pki::PkiPaths;
use devgate_tests::{DataDir, Gateway, binary, devgate};

/// Runs `devgate serve` on `data` with the whole configuration `config` and expects it
/// to refuse to start: returns its stderr. Fails (and kills it) if it is still running
/// after 15 s, which is what a gateway that starts anyway does.
fn serve_expecting_refusal(data: &Path, config: &str) -> Result<String> {
    let cfg = tempfile::NamedTempFile::new()?;
    std::fs::write(cfg.path(), config)?;
    let mut child = Command::new(binary("devgate"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(cfg.path())
        .env("DEVGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the second devgate serve did not refuse to start within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    assert!(!status.success(), "refused start exited 0: {err}");
    Ok(err)
}

fn pidfile(data: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(data.join("devgate.pid"))?
        .trim()
        .to_owned())
}

#[test]
fn a_second_gateway_on_the_same_data_dir_is_refused_and_the_pid_file_kept() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data.path().to_owned();
    assert_eq!(pidfile(&dir)?, gw.pid().to_string());
    let err = serve_expecting_refusal(
        &dir,
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\n",
    )?;
    assert!(
        err.contains(&dir.display().to_string()) && err.contains(&format!("pid {}", gw.pid())),
        "the refusal names neither the data dir nor the pid holding it: {err}"
    );
    assert_eq!(
        pidfile(&dir)?,
        gw.pid().to_string(),
        "the pid file was overwritten"
    );
    // `devgate reload` still reaches the running gateway.
    let (ok, _, err) = devgate(&["reload", "--data-dir", &gw.data_arg()])?;
    assert!(ok, "{err}");
    assert!(
        gw.wait_for_log("SIGHUP", Duration::from_secs(10)),
        "reload did not reach the first gateway"
    );
    Ok(())
}

#[test]
fn a_second_gateway_on_the_same_port_is_refused() -> Result<()> {
    let gw = Gateway::start("")?;
    let other = DataDir::init()?;
    let err = serve_expecting_refusal(
        other.path(),
        &format!(
            "listen = \"{}\"\nadmin = \"127.0.0.1:0\"\nworkers = 1\n",
            gw.addr
        ),
    )?;
    assert!(
        err.contains(&gw.addr.to_string()) && err.contains("already listens"),
        "{err}"
    );
    // The first one still serves.
    assert!(gw.status()?["check_status"].as_str().is_some());
    Ok(())
}

/// `cert create-root` + `cert create-server` in `work`: a chain with a new root.
fn new_chain(work: &Path, tag: &str) -> Result<(String, String)> {
    let p = |f: &str| work.join(format!("{tag}-{f}")).display().to_string();
    let (ok, _, err) = devgate(&[
        "cert",
        "create-root",
        "--cert",
        &p("root.pem"),
        "--key",
        &p("root.key"),
    ])?;
    assert!(ok, "{err}");
    let (ok, _, err) = devgate(&[
        "cert",
        "create-server",
        "--ca-cert",
        &p("root.pem"),
        "--ca-key",
        &p("root.key"),
        "--name",
        "localhost,127.0.0.1",
        "--chain",
        &p("chain.pem"),
        "--key",
        &p("server.key"),
    ])?;
    assert!(ok, "{err}");
    Ok((p("chain.pem"), p("server.key")))
}

#[test]
fn cert_import_of_a_new_root_is_refused_unless_it_is_staged_or_forced() -> Result<()> {
    let data = DataDir::init()?;
    let dir = data.path().display().to_string();
    let paths = PkiPaths::new(data.path());
    let work = tempfile::tempdir()?;
    let (chain, key) = new_chain(work.path(), "a")?;
    let root_before = std::fs::read(paths.root_cert())?;
    let server_before = std::fs::read(paths.server_cert())?;
    let import = |extra: &[&str]| {
        let mut args = vec![
            "cert",
            "import",
            "--data-dir",
            &dir,
            "--chain",
            &chain,
            "--key",
            &key,
        ];
        args.extend_from_slice(extra);
        devgate(&args)
    };

    let (ok, _, err) = import(&[])?;
    assert!(!ok, "a chain with an unstaged new root was installed");
    assert!(
        err.contains("--stage") && err.contains("docs/OPERATIONS.md") && err.contains("--force"),
        "the refusal does not say what to do: {err}"
    );
    assert_eq!(std::fs::read(paths.root_cert())?, root_before);
    assert_eq!(std::fs::read(paths.server_cert())?, server_before);

    // Staged first, the same chain then installs without --force (the activation).
    let (ok, _, err) = import(&["--stage"])?;
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(paths.root_cert())?, root_before);
    let (ok, out, err) = import(&[])?;
    assert!(ok, "the staged root was refused: {err}");
    assert!(out.contains("now active"), "{out}");
    assert_ne!(std::fs::read(paths.root_cert())?, root_before);
    assert!(!paths.dir.join("next").exists(), "pki/next/ left behind");

    // --force installs an unstaged root anyway, with a warning.
    let (chain_b, key_b) = new_chain(work.path(), "b")?;
    let (ok, _, err) = devgate(&[
        "cert",
        "import",
        "--data-dir",
        &dir,
        "--chain",
        &chain_b,
        "--key",
        &key_b,
    ])?;
    assert!(!ok, "{err}");
    let (ok, _, err) = devgate(&[
        "cert",
        "import",
        "--data-dir",
        &dir,
        "--chain",
        &chain_b,
        "--key",
        &key_b,
        "--force",
    ])?;
    assert!(ok && err.contains("warning"), "{err}");
    Ok(())
}

/// Sends a control request and returns the reply: Ok(JSON) or Err(ControlFailed text).
async fn control(
    mgr: &mut Connection,
    id: u32,
    request: &serde_json::Value,
) -> Result<std::result::Result<serde_json::Value, String>> {
    mgr.send(&Frame::control(id, request.to_string().as_bytes()))
        .await?;
    loop {
        let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(20)).await? else {
            bail!("no reply to {request}");
        };
        let frame = r.frame();
        if frame.id != id {
            continue;
        }
        match frame.body {
            Body::Control { payload } => return Ok(Ok(serde_json::from_slice(payload)?)),
            Body::Error { message, .. } => return Ok(Err(message.to_owned())),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_and_create_keys_are_paged_so_replies_fit_a_frame() -> Result<()> {
    let gw = Gateway::start("")?;
    let (ok, _, err) = devgate(&[
        "keys",
        "create",
        "--data-dir",
        &gw.data_arg(),
        "--one-time",
        "2500",
    ])?;
    assert!(ok, "{err}");
    let mut mgr = gw.manager().await?;

    // Pages of at most 1000 (the default), newest first, each key once.
    let mut seen = std::collections::HashSet::new();
    let mut cursor = serde_json::Value::Null;
    let mut pages = 0;
    loop {
        let req = serde_json::json!({"op": "list_keys", "cursor": cursor});
        let page = control(&mut mgr, 10 + pages, &req)
            .await?
            .map_err(anyhow::Error::msg)?;
        let keys = page["keys"].as_array().context("keys")?;
        assert!(keys.len() <= 1000, "a page of {} keys", keys.len());
        for k in keys {
            assert!(seen.insert(k["id"].as_str().context("id")?.to_owned()));
        }
        pages += 1;
        cursor = page["next_cursor"].clone();
        if cursor.is_null() || pages > 10 {
            break;
        }
    }
    assert_eq!((seen.len(), pages), (2500, 3));

    let small = control(
        &mut mgr,
        30,
        &serde_json::json!({"op": "list_keys", "limit": 7}),
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    assert_eq!(small["keys"].as_array().map(Vec::len), Some(7));
    assert!(small["next_cursor"].is_string());
    for (id, bad) in [
        (31, serde_json::json!({"op": "list_keys", "limit": 100_000})),
        (32, serde_json::json!({"op": "list_keys", "limit": 0})),
        (
            33,
            serde_json::json!({"op": "list_keys", "cursor": "nonsense"}),
        ),
    ] {
        let reply = control(&mut mgr, id, &bad).await?;
        assert!(reply.is_err(), "{bad} accepted: {reply:?}");
    }

    // create_keys: at most 1000 per request, refused above with a message that says so.
    let too_many = control(
        &mut mgr,
        40,
        &serde_json::json!({"op": "create_keys", "count": 1001}),
    )
    .await?;
    match too_many {
        Err(msg) => assert!(msg.contains("at most 1000"), "{msg}"),
        Ok(v) => bail!("1001 keys created in one request: {} keys", v["keys"]),
    }
    let created = control(
        &mut mgr,
        41,
        &serde_json::json!({"op": "create_keys", "count": 1000}),
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    assert_eq!(created["keys"].as_array().map(Vec::len), Some(1000));

    // The CLI lists every key, streaming, as text and as one JSON array.
    let (ok, out, err) = devgate(&["keys", "list", "--data-dir", &gw.data_arg()])?;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1 + 3500);
    let (ok, out, err) = devgate(&["keys", "list", "--json", "--data-dir", &gw.data_arg()])?;
    assert!(ok, "{err}");
    let all: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(all.len(), 3500);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_pages_shrink_to_fit_a_small_send_queue() -> Result<()> {
    // 1000 keys are ~150 KB of JSON: one reply would pass this queue's hard limit and
    // get the manager disconnected as a slow consumer.
    let gw = Gateway::start(
        "[limits]\nmax_message_bytes = 65536\nqueue_bytes = 65536\nqueue_hard_bytes = 65536\n",
    )?;
    let (ok, _, err) = devgate(&[
        "keys",
        "create",
        "--data-dir",
        &gw.data_arg(),
        "--one-time",
        "1000",
    ])?;
    assert!(ok, "{err}");
    let mut mgr = gw.manager().await?;
    let (mut total, mut cursor, mut pages) = (0, serde_json::Value::Null, 0);
    loop {
        let req = serde_json::json!({"op": "list_keys", "cursor": cursor});
        let page = control(&mut mgr, 1 + pages, &req)
            .await?
            .map_err(anyhow::Error::msg)?;
        total += page["keys"].as_array().context("keys")?.len();
        pages += 1;
        cursor = page["next_cursor"].clone();
        if cursor.is_null() || pages > 100 {
            break;
        }
    }
    assert_eq!(total, 1000);
    assert!(pages > 1, "one page of 1000 keys for a 64 KiB queue");
    let reply = control(
        &mut mgr,
        500,
        &serde_json::json!({"op": "create_keys", "count": 1000}),
    )
    .await?;
    assert!(reply.is_err(), "1000 keys created into a 64 KiB queue");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_announced_retry_after_is_accepted() -> Result<()> {
    let gw = Gateway::start("")?;
    let roots = devgate_tests::roots(gw.data.path())?;
    let attempt = |i: usize| {
        let roots = roots.clone();
        let addr = gw.addr;
        async move {
            devgate_client::enroll(
                addr,
                "localhost",
                &roots,
                &format!("guess-{i}"),
                "AAAA-BBBB-CCCC-DDDD-EEEE",
            )
            .await
        }
    };
    let mut wait = None;
    for i in 0..30 {
        match attempt(i).await {
            Err(ClientError::RateLimited { retry_after }) => {
                wait = retry_after;
                break;
            }
            Err(ClientError::EnrollmentRefused) => {}
            other => bail!("unexpected: {:?}", other.map(|_| ())),
        }
    }
    let wait = wait.context("never rate-limited, or no Retry-After")?;
    assert!(wait <= Duration::from_secs(60), "Retry-After {wait:?}");
    // Obey it (plus a little for the clock granularity): the retry is heard, not refused
    // with another 429.
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    match attempt(100).await {
        Err(ClientError::EnrollmentRefused) => Ok(()),
        Err(ClientError::RateLimited { retry_after }) => bail!(
            "a retry after the announced {wait:?} got another 429 (Retry-After {retry_after:?})"
        ),
        other => bail!("unexpected: {:?}", other.map(|_| ())),
    }
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(p)?.permissions().mode() & 0o7777)
}

/// Every entry below `dir`, recursively.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        out.push(p.clone());
        if p.is_dir() {
            walk(&p, out)?;
        }
    }
    Ok(())
}

#[test]
fn init_and_issued_credentials_are_private_under_umask_000() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("state").join("devgate");
    let creds = tmp.path().join("creds");
    let sh = |cmd: &str, args: &[&str]| -> Result<()> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("umask 000; exec \"$0\" {cmd} \"$@\""))
            .arg(binary("devgate"))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let d = data.display().to_string();
    let c = creds.display().to_string();
    sh("init", &["--data-dir", &d, "--name", "localhost"])?;
    sh(
        "devices",
        &["issue", "--data-dir", &d, "--unit", "u-1", "--out", &c],
    )?;
    sh(
        "managers",
        &["issue", "--data-dir", &d, "--name", "m-1", "--out", &c],
    )?;
    sh("keys", &["create", "--data-dir", &d, "--one-time", "1"])?;

    assert_eq!(mode(&data)?, 0o750, "data dir");
    assert_eq!(mode(&data.join("pki"))?, 0o700, "pki/");
    assert_eq!(mode(&creds)?, 0o700, "--out folder");
    let mut all = Vec::new();
    walk(&data, &mut all)?;
    walk(&creds, &mut all)?;
    assert!(all.iter().any(|p| p.ends_with("devgate.db")));
    for p in &all {
        let m = mode(p)?;
        assert_eq!(m & 0o002, 0, "{} is world-writable ({m:o})", p.display());
        let name = p.display().to_string();
        if name.ends_with(".key") || name.ends_with("admin.token") || name.ends_with(".db") {
            assert_eq!(m, 0o600, "{name} ({m:o})");
        }
    }
    Ok(())
}

/// GET on an admin listener with an optional `Authorization` header; returns the status.
fn admin_status_code(admin: SocketAddr, path: &str, auth: Option<&str>) -> Result<u16> {
    let mut s = TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = auth.map_or_else(String::new, |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp.split(' ').nth(1).context("no status")?.parse()?)
}

#[test]
fn an_admin_listener_off_loopback_needs_its_bearer_token() -> Result<()> {
    // Without a token file it refuses to start, naming the file and what to do.
    let data = DataDir::init()?;
    let token_path = data.path().join("admin.token");
    std::fs::remove_file(&token_path)?;
    let err = serve_expecting_refusal(
        data.path(),
        "listen = \"127.0.0.1:0\"\nadmin = \"0.0.0.0:0\"\nworkers = 1\n",
    )?;
    assert!(
        err.contains("admin.token") && err.contains("devgate admin-token"),
        "{err}"
    );
    let (ok, out, err) = devgate(&[
        "admin-token",
        "--data-dir",
        &data.path().display().to_string(),
    ])?;
    assert!(ok && out.contains("admin.token"), "{err}");
    assert_eq!(mode(&token_path)?, 0o600);

    // With it: 401 without or with a wrong token, 200 with the right one.
    let gw = Gateway::start_with_args(data, "", &["--admin", "0.0.0.0:0"])?;
    let admin = SocketAddr::from(([127, 0, 0, 1], gw.admin.port()));
    let token = std::fs::read_to_string(&token_path)?.trim().to_owned();
    for path in ["/v1/status", "/metrics"] {
        assert_eq!(admin_status_code(admin, path, None)?, 401, "{path}");
        assert_eq!(
            admin_status_code(admin, path, Some("Bearer not-the-token-at-all"))?,
            401
        );
        assert_eq!(
            admin_status_code(admin, path, Some(&format!("Bearer {token}")))?,
            200,
            "{path}"
        );
    }
    // `devgate status` sends the data dir's token (or --token-file); without one it says why.
    let a = admin.to_string();
    let (ok, out, err) = devgate(&["status", "--admin", &a, "--data-dir", &gw.data_arg()])?;
    assert!(ok && out.contains("status"), "{out}{err}");
    let (ok, _, err) = devgate(&[
        "status",
        "--admin",
        &a,
        "--token-file",
        &token_path.display().to_string(),
    ])?;
    assert!(ok, "{err}");
    let empty = tempfile::NamedTempFile::new()?;
    let (ok, _, err) = devgate(&[
        "status",
        "--admin",
        &a,
        "--token-file",
        &empty.path().display().to_string(),
    ])?;
    assert!(!ok && err.contains("bearer token"), "{err}");
    Ok(())
}

#[test]
fn config_check_names_the_tls_key_at_fault() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (body, needle) in [
        ("[tls]\nmin_version = \"1.1\"\n", "tls.min_version"),
        ("[tls]\ncipher_suites = []\n", "tls.cipher_suites"),
        (
            "[tls]\ncipher_suites = [\"TLS_RSA_WITH_RC4_128_MD5\"]\n",
            "tls.cipher_suites",
        ),
        (
            "[tls]\nmin_version = \"1.3\"\ncipher_suites = [\"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\n",
            "tls.cipher_suites",
        ),
    ] {
        let file = dir.path().join("c.toml");
        std::fs::write(&file, body)?;
        let (ok, out, err) = devgate(&["config", "check", &file.display().to_string()])?;
        assert!(!ok, "{body:?} accepted: {out}");
        assert!(err.contains(needle), "{body:?}: {err}");
    }
    let file = dir.path().join("ok.toml");
    std::fs::write(
        &file,
        "[tls]\nmin_version = \"1.3\"\ncipher_suites = [\"TLS13_AES_256_GCM_SHA384\", \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\n",
    )?;
    let (ok, _, err) = devgate(&["config", "check", &file.display().to_string()])?;
    assert!(ok, "{err}");
    Ok(())
}

/// A TLS handshake (no client certificate) with a client limited to `versions` and
/// `suites` (all of the provider's if empty); returns the negotiated suite's name.
fn handshake(
    gw: &Gateway,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: &[rustls::CipherSuite],
) -> Result<String> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if !suites.is_empty() {
        provider
            .cipher_suites
            .retain(|s| suites.contains(&s.suite()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for r in gw.client_roots() {
        roots.add(r.clone())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), "localhost".try_into()?)?;
    let mut sock = TcpStream::connect(gw.addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.is_handshaking() {
        if Instant::now() > deadline {
            bail!("handshake did not finish in 10 s");
        }
        conn.complete_io(&mut sock)?;
    }
    Ok(conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("?")
        .to_owned())
}

#[test]
fn tls_min_version_and_cipher_suites_apply_to_the_public_listener() -> Result<()> {
    let gw = Gateway::start(
        "[tls]\nmin_version = \"1.3\"\ncipher_suites = [\"TLS13_CHACHA20_POLY1305_SHA256\", \"TLS13_AES_128_GCM_SHA256\"]\n",
    )?;
    let refused = handshake(&gw, &[&rustls::version::TLS12], &[]);
    assert!(refused.is_err(), "a TLS 1.2-only client got {refused:?}");
    // The client prefers AES-256-GCM (its default order) but the gateway offers neither it
    // nor AES-256: the negotiated suite is one of the configured ones.
    let suite = handshake(&gw, &[&rustls::version::TLS13], &[])?;
    assert!(
        ["TLS13_CHACHA20_POLY1305_SHA256", "TLS13_AES_128_GCM_SHA256"].contains(&suite.as_str()),
        "{suite}"
    );
    let only_256 = handshake(
        &gw,
        &[&rustls::version::TLS13],
        &[rustls::CipherSuite::TLS13_AES_256_GCM_SHA384],
    );
    assert!(
        only_256.is_err(),
        "a suite not configured was negotiated: {only_256:?}"
    );

    // The defaults still take a TLS 1.2 client.
    let gw = Gateway::start("")?;
    let suite = handshake(&gw, &[&rustls::version::TLS12], &[])?;
    assert!(suite.starts_with("TLS_ECDHE_"), "{suite}");
    Ok(())
}
