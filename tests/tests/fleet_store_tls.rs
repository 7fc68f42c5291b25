//! TLS to PostgreSQL (`sslmode=require&sslrootcert=FILE` in `[store] url`) against the
//! test's own server, whose certificate comes from a CA this test makes: the gateway and
//! the CLI connect over TLS (PostgreSQL's `pg_stat_ssl` says so) and work, and a server
//! whose certificate the given CA did not issue is refused.
//!
//! PostgreSQL comes from Debian's `postgresql` (scripts/setup.sh); without it the test is
//! skipped with the reason, unless `DEVGATE_REQUIRE_TOOLS` is set (CI).

use std::process::Command;

use anyhow::{Result, bail, ensure};
use devgate_tests::postgres::Postgres;
use devgate_tests::{Gateway, binary};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA: its certificate (PEM) and what signs with it.
fn ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn devgate_pg(url: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(binary("devgate"))
        .args(args)
        .env("DEVGATE_STORE__URL", url)
        .env_remove("DEVGATE_CONFIG")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_tls_to_postgresql_and_verifies_the_server() -> Result<()> {
    if let Some(why) = Postgres::missing() {
        if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
            bail!("{why}");
        }
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let pg = Postgres::start()?;
    let (ca_pem, issuer) = ca("test PostgreSQL CA")?;
    let server_key = KeyPair::generate()?;
    let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
        .signed_by(&server_key, &issuer)?;
    pg.enable_tls(&server.pem(), &server_key.serialize_pem())?;
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("pg-ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;
    let url = format!(
        "{}?sslmode=require&sslrootcert={}",
        pg.create_db("tls")?,
        ca_file.display()
    );

    let gw = Gateway::start(&format!("[store]\nurl = \"{url}\"\n"))?;
    let status = gw.status()?;
    ensure!(
        status["store"]["kind"] == "postgres" && status["store"]["ok"] == true,
        "store status: {}",
        status["store"]
    );
    let (total, tls) = pg.tls_connections("devgate")?;
    ensure!(
        total >= 1 && tls == total,
        "{tls} of the gateway's {total} connections use TLS"
    );

    // The CLI on the same URL, and an enrollment with the key it made.
    let (ok, keys, err) = devgate_pg(
        &url,
        &[
            "keys",
            "create",
            "--data-dir",
            &gw.data_arg(),
            "--one-time",
            "1",
        ],
    )?;
    ensure!(ok, "keys create over TLS: {err}");
    let key = keys.lines().next().unwrap_or_default().to_owned();
    let roots = devgate_tests::roots(gw.data.path())?;
    devgate_client::enroll(gw.addr, "localhost", &roots, "tls-unit", &key).await?;

    // A root that did not issue the server's certificate: refused, saying why.
    let (other_pem, _) = ca("another CA")?;
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, other_pem)?;
    let wrong = url.replace(
        &ca_file.display().to_string(),
        &other_file.display().to_string(),
    );
    let (ok, _, err) = devgate_pg(
        &wrong,
        &[
            "keys",
            "create",
            "--data-dir",
            &gw.data_arg(),
            "--one-time",
            "1",
        ],
    )?;
    ensure!(!ok, "a server certificate from another CA was accepted");
    ensure!(
        err.to_lowercase().contains("certificate"),
        "the refusal does not say it is the certificate: {err}"
    );
    eprintln!("refused as it should be: {}", err.trim());
    Ok(())
}
