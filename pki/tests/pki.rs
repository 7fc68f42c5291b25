//! End-to-end checks of the PKI: files and modes, chain structure, verification by the same
//! verifier the gateway and clients use (rustls/webpki) and by openssl, fingerprints, peer
//! roles, CSR signing, and issuance throughput.

#![allow(clippy::unwrap_used, reason = "tests fail loudly by design")]

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devgate_pki::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

const NAMES: [&str; 4] = ["gw.example.com", "localhost", "192.0.2.7", "2001:db8::7"];

fn opts(force: bool) -> InitOptions {
    InitOptions {
        names: NAMES.iter().map(|s| s.to_string()).collect(),
        force,
    }
}

fn fresh() -> (tempfile::TempDir, InitReport) {
    let dir = tempfile::tempdir().unwrap();
    let report = init(dir.path(), &opts(false)).unwrap();
    (dir, report)
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn all_files(p: &PkiPaths) -> Vec<(std::path::PathBuf, bool)> {
    vec![
        (p.root_cert(), false),
        (p.root_key(), true),
        (p.server_cert(), false),
        (p.server_key(), true),
        (p.device_ca_cert(), false),
        (p.device_ca_key(), true),
        (p.manager_ca_cert(), false),
        (p.manager_ca_key(), true),
        (p.manager_cert(), false),
        (p.manager_key(), true),
    ]
}

/// The permission bits the umask lets through, found by creating a file asking for 0777.
fn umask_allows(dir: &Path) -> u32 {
    let probe = dir.join("umask-probe");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o777)
        .open(&probe)
        .unwrap();
    let mode = fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    fs::remove_file(probe).unwrap();
    mode
}

fn has_openssl() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("openssl not on PATH; skipping the openssl cross-check");
    }
    ok
}

#[test]
fn init_creates_all_files_with_the_right_modes() {
    let (dir, report) = fresh();
    let paths = &report.paths;
    assert_eq!(paths.dir, dir.path().join("pki"));
    let allowed = umask_allows(dir.path());
    let names: Vec<String> = all_files(paths)
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "root.pem",
            "root.key",
            "server.pem",
            "server.key",
            "device-ca.pem",
            "device-ca.key",
            "manager-ca.pem",
            "manager-ca.key",
            "manager.pem",
            "manager.key"
        ]
    );
    for (path, is_key) in all_files(paths) {
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if is_key {
            assert_eq!(mode, 0o600, "{}", path.display());
            let key = load_key(&path).unwrap();
            assert!(matches!(key, PrivateKeyDer::Pkcs8(_)), "{}", path.display());
            assert!(
                fs::read_to_string(&path)
                    .unwrap()
                    .starts_with("-----BEGIN PRIVATE KEY-----")
            );
        } else {
            assert_eq!(mode, 0o644 & allowed, "{}", path.display());
            assert!(!load_certs(&path).unwrap().is_empty());
        }
    }
    // Nothing but the contract files (no temporary leftovers).
    let mut present: Vec<String> = fs::read_dir(&paths.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(present, expected);

    assert_eq!(load_certs(&paths.server_cert()).unwrap().len(), 2);
    assert_eq!(load_certs(&paths.manager_cert()).unwrap().len(), 2);
    assert_eq!(
        report.fingerprint,
        fingerprint_file(&paths.root_cert()).unwrap()
    );
}

#[test]
fn refuses_reinit_without_force() {
    let (dir, first) = fresh();
    let root_before = fs::read(first.paths.root_cert()).unwrap();

    let err = init(dir.path(), &opts(false)).unwrap_err();
    assert!(matches!(err, PkiError::AlreadyInitialised { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&first.paths.dir.display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("force"), "{msg}");
    assert_eq!(fs::read(first.paths.root_cert()).unwrap(), root_before);

    let second = init(dir.path(), &opts(true)).unwrap();
    assert_ne!(second.fingerprint, first.fingerprint);
    assert_ne!(fs::read(second.paths.root_cert()).unwrap(), root_before);
    assert_eq!(
        fs::metadata(second.paths.device_ca_key())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn interrupted_init_can_be_rerun_without_force() {
    // root.pem is the "complete" marker; without it, init must proceed over leftovers.
    let (dir, first) = fresh();
    fs::remove_file(first.paths.root_cert()).unwrap();
    init(dir.path(), &opts(false)).unwrap();
}

#[test]
fn invalid_names_are_rejected_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, needle) in [
        ("*.example.com", "wildcard"),
        ("gw..example.com", "empty label"),
        ("gw_1.example.com", "'_'"),
        ("10.0.0.300", "IPv4"),
        ("[::1]", "without brackets"),
        ("gw.example.com.", "trailing dot"),
    ] {
        let o = InitOptions {
            names: vec!["ok.example.com".into(), bad.into()],
            force: false,
        };
        let err = init(dir.path(), &o).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PkiError::InvalidName { .. }), "{bad}: {msg}");
        assert!(msg.contains(bad), "{bad}: {msg}");
        assert!(msg.contains(needle), "{bad}: {msg}");
    }
    let err = init(dir.path(), &InitOptions::default()).unwrap_err();
    assert!(matches!(err, PkiError::NoNames), "{err}");
    assert!(!dir.path().join("pki").exists());
}

#[test]
fn server_cert_has_the_given_names() {
    let (_dir, report) = fresh();
    let chain = load_certs(&report.paths.server_cert()).unwrap();
    let server = parse(&chain[0]);

    let cn: Vec<_> = server
        .subject()
        .iter_common_name()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(cn, ["gw.example.com"]);

    let san = server.subject_alternative_name().unwrap().unwrap().value;
    let mut dns = vec![];
    let mut ips = vec![];
    for n in &san.general_names {
        match n {
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(b) => ips.push(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
                _ => panic!("bad IP SAN length"),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    assert_eq!(dns, ["gw.example.com", "localhost"]);
    assert_eq!(
        ips,
        [
            "192.0.2.7".parse::<IpAddr>().unwrap(),
            "2001:db8::7".parse().unwrap()
        ]
    );

    let eku = server.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let ku = server.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(!server.is_ca());
    let year = server.validity().not_after.timestamp() - server.validity().not_before.timestamp();
    assert_eq!(year, 365 * 86400 + 300);
}

/// Issuer/subject linkage, signatures, BasicConstraints, key usages, serials, validity.
#[test]
fn chains_are_well_formed() {
    let (_dir, report) = fresh();
    let p = &report.paths;
    let root_der = load_certs(&p.root_cert()).unwrap().remove(0);
    let server_chain = load_certs(&p.server_cert()).unwrap();
    let device_ca_der = load_certs(&p.device_ca_cert()).unwrap().remove(0);
    let manager_ca_der = load_certs(&p.manager_ca_cert()).unwrap().remove(0);
    let manager_chain = load_certs(&p.manager_cert()).unwrap();

    let root = parse(&root_der);
    assert_eq!(
        server_chain[1], root_der,
        "server.pem must end with the root"
    );
    assert_eq!(
        manager_chain[1], manager_ca_der,
        "manager.pem must end with the manager CA"
    );
    let server = parse(&server_chain[0]);
    let device_ca = parse(&device_ca_der);
    let manager_ca = parse(&manager_ca_der);
    let manager = parse(&manager_chain[0]);

    // Root: self-signed CA, pathlen 1 (or unconstrained), keyCertSign + cRLSign.
    assert_eq!(root.subject().as_raw(), root.issuer().as_raw());
    root.verify_signature(None).unwrap();
    let cn = |c: &X509Certificate<'_>| {
        c.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(cn(&root), "devgate root CA");
    assert_eq!(cn(&device_ca), "devgate device CA");
    assert_eq!(cn(&manager_ca), "devgate manager CA");
    assert_eq!(cn(&manager), "manager");

    let bc = |c: &X509Certificate<'_>| c.basic_constraints().unwrap().unwrap().value.clone();
    assert!(bc(&root).ca);
    assert!(matches!(bc(&root).path_len_constraint, None | Some(1)));
    for ca in [&root, &device_ca, &manager_ca] {
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign(), "{}", cn(ca));
    }
    for ca in [&device_ca, &manager_ca] {
        assert!(bc(ca).ca);
        assert_eq!(bc(ca).path_len_constraint, Some(0), "{}", cn(ca));
        assert_eq!(ca.issuer().as_raw(), root.subject().as_raw());
        ca.verify_signature(Some(root.public_key())).unwrap();
        // Not signed by itself or the other CA.
        assert!(ca.verify_signature(None).is_err());
    }
    assert_eq!(server.issuer().as_raw(), root.subject().as_raw());
    server.verify_signature(Some(root.public_key())).unwrap();
    assert!(
        server
            .verify_signature(Some(device_ca.public_key()))
            .is_err()
    );
    assert_eq!(manager.issuer().as_raw(), manager_ca.subject().as_raw());
    manager
        .verify_signature(Some(manager_ca.public_key()))
        .unwrap();
    for ee in [&server, &manager] {
        assert!(!bc(ee).ca);
    }

    // ECDSA P-256 keys, ECDSA-with-SHA256 signatures.
    for c in [&root, &server, &device_ca, &manager_ca, &manager] {
        assert_eq!(
            c.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.2"
        );
        assert_eq!(
            c.public_key().algorithm.algorithm.to_id_string(),
            "1.2.840.10045.2.1"
        );
    }

    // Serials: 16 bytes, positive, distinct. notBefore = now - 5 min.
    let now = now_unix();
    let mut serials = vec![];
    for c in [&root, &server, &device_ca, &manager_ca, &manager] {
        let s = c.raw_serial();
        assert_eq!(s.len(), 16, "{}", cn(c));
        assert_eq!(s[0] & 0x80, 0, "serial must be positive");
        serials.push(s.to_vec());
        let nb = c.validity().not_before.timestamp();
        assert!(
            (now - 300 - 5..=now - 300 + 5).contains(&nb),
            "{}: notBefore {nb}",
            cn(c)
        );
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 5);
    let ten_years = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
    assert_eq!(ten_years, 3652 * 86400 + 300);
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(certs: &[&rustls::pki_types::CertificateDer<'static>]) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add((*c).clone()).unwrap();
    }
    Arc::new(store)
}

/// The gateway verifies clients with the two client CAs as trust anchors, and devices and
/// managers verify the gateway with the root: check both with rustls' own verifiers.
#[test]
fn rustls_accepts_the_chains() {
    let (_dir, report) = fresh();
    let p = &report.paths;
    let root = load_certs(&p.root_cert()).unwrap().remove(0);
    let server_chain = load_certs(&p.server_cert()).unwrap();
    let now = UnixTime::now();

    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots(&[&root]), provider())
        .build()
        .unwrap();
    for name in NAMES {
        let name = ServerName::try_from(name).unwrap();
        server_verifier
            .verify_server_cert(&server_chain[0], &server_chain[1..], &name, &[], now)
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
    }
    let wrong = ServerName::try_from("other.example.com").unwrap();
    assert!(
        server_verifier
            .verify_server_cert(&server_chain[0], &[], &wrong, &[], now)
            .is_err()
    );

    let device_ca = ClientCa::load(&p.device_ca_cert(), &p.device_ca_key()).unwrap();
    let manager_ca = ClientCa::load(&p.manager_ca_cert(), &p.manager_ca_key()).unwrap();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(
        roots(&[device_ca.cert_der(), manager_ca.cert_der()]),
        provider(),
    )
    .build()
    .unwrap();
    let device = device_ca.issue_device("unit-0001").unwrap();
    client_verifier
        .verify_client_cert(&device.chain[0], &device.chain[1..], now)
        .unwrap();
    let manager = load_certs(&p.manager_cert()).unwrap();
    client_verifier
        .verify_client_cert(&manager[0], &manager[1..], now)
        .unwrap();
    let issued_manager = manager_ca.issue_manager("ops-2").unwrap();
    client_verifier
        .verify_client_cert(&issued_manager.chain[0], &[], now)
        .unwrap();

    // The server certificate is not a client credential (wrong issuer and EKU).
    assert!(
        client_verifier
            .verify_client_cert(&server_chain[0], &server_chain[1..], now)
            .is_err()
    );
    // A verifier trusting only the manager CA refuses device certificates.
    let managers_only =
        WebPkiClientVerifier::builder_with_provider(roots(&[manager_ca.cert_der()]), provider())
            .build()
            .unwrap();
    assert!(
        managers_only
            .verify_client_cert(&device.chain[0], &[], now)
            .is_err()
    );
}

#[test]
fn openssl_agrees() {
    let (dir, report) = fresh();
    if !has_openssl() {
        return;
    }
    let p = &report.paths;
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(p.root_cert())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let hex: String = stdout.trim().rsplit('=').next().unwrap().replace(':', "");
    assert_eq!(hex.len(), 64, "{stdout}");
    assert_eq!(
        report.fingerprint.replace(' ', ""),
        hex.to_ascii_uppercase()
    );

    let device_ca = ClientCa::load(&p.device_ca_cert(), &p.device_ca_key()).unwrap();
    let device = device_ca.issue_device("unit-42").unwrap();
    let dev_pem = dir.path().join("device.pem");
    let dev_key = dir.path().join("device.key");
    device.write(&dev_pem, &dev_key).unwrap();

    let verify = |purpose: &str, untrusted: &Path, leaf: &Path| {
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(p.root_cert())
            .arg("-untrusted")
            .arg(untrusted)
            .arg(leaf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify {}: {}{}",
            leaf.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    verify("sslserver", &p.root_cert(), &p.server_cert());
    verify("sslclient", &p.device_ca_cert(), &dev_pem);
    verify("sslclient", &p.manager_ca_cert(), &p.manager_cert());

    // The key file holds the key of the certificate.
    let pubkey = |args: &[&str], file: &Path| {
        let out = Command::new("openssl")
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in"], &dev_pem),
        pubkey(&["pkey", "-pubout", "-in"], &dev_key)
    );
}

#[test]
fn fingerprint_format_and_typed_group() {
    let (_dir, report) = fresh();
    let fp = &report.fingerprint;
    // ^([0-9A-F]{16} ){3}[0-9A-F]{16}$
    let groups: Vec<&str> = fp.split(' ').collect();
    assert_eq!(fp.len(), 67, "{fp}");
    assert_eq!(groups.len(), 4, "{fp}");
    for g in &groups {
        assert_eq!(g.len(), 16, "{fp}");
        assert!(
            g.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
            "{fp}"
        );
    }

    for i in 0..4 {
        let with = |typed: &str| {
            let mut shown: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
            shown[i] = typed.to_string();
            shown.join(" ")
        };
        assert!(fingerprint_matches(fp, &with(groups[i])));
        assert!(fingerprint_matches(fp, &with(&groups[i].to_lowercase())));
        assert!(fingerprint_matches(fp, &with(&format!(" {} ", groups[i]))));
        let mut wrong = groups[i].to_string().into_bytes();
        wrong[7] = if wrong[7] == b'0' { b'1' } else { b'0' };
        assert!(!fingerprint_matches(
            fp,
            &with(std::str::from_utf8(&wrong).unwrap())
        ));
        assert!(!fingerprint_matches(fp, &with("")));
    }
}

#[test]
fn classify_device_manager_and_foreign() {
    let (_dir, report) = fresh();
    let p = &report.paths;
    let device_ca = ClientCa::load(&p.device_ca_cert(), &p.device_ca_key()).unwrap();
    let manager_ca = ClientCa::load(&p.manager_ca_cert(), &p.manager_ca_key()).unwrap();
    let classifier = PeerClassifier::new(device_ca.cert_der(), manager_ca.cert_der()).unwrap();

    let device = device_ca.issue_device("unit-0001").unwrap();
    assert_eq!(
        classifier.classify(&device.chain[0]),
        Some(PeerRole::Device {
            unit_id: "unit-0001".into()
        })
    );
    let manager = load_certs(&p.manager_cert()).unwrap();
    assert_eq!(
        classifier.classify(&manager[0]),
        Some(PeerRole::Manager {
            name: "manager".into()
        })
    );
    // A manager CA issuing with "device" methods still yields a manager: the issuer decides.
    let odd = manager_ca.issue_device("unit-0002").unwrap();
    assert_eq!(
        classifier.classify(&odd.chain[0]),
        Some(PeerRole::Manager {
            name: "unit-0002".into()
        })
    );

    // Another gateway's device CA has the same subject DN. Telling it apart is the TLS layer's
    // job (the signature does not verify against our anchor); classify only reads the DN.
    let (_other_dir, other) = fresh();
    let other_ca =
        ClientCa::load(&other.paths.device_ca_cert(), &other.paths.device_ca_key()).unwrap();
    assert_eq!(
        classifier.classify(&other_ca.issue_device("unit-0001").unwrap().chain[0]),
        Some(PeerRole::Device {
            unit_id: "unit-0001".into()
        }),
    );
    // A CA with another name: not ours.
    let foreign_key = KeyPair::generate().unwrap();
    let mut foreign_params = CertificateParams::default();
    foreign_params.distinguished_name = dn("ACME device CA");
    foreign_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let foreign_issuer = Issuer::new(foreign_params, foreign_key);
    let foreign_leaf = leaf("unit-0001", &foreign_issuer);
    assert_eq!(classifier.classify(&foreign_leaf), None);

    // Root-issued (the server certificate) and self-signed root: neither client CA.
    let server = load_certs(&p.server_cert()).unwrap();
    assert_eq!(classifier.classify(&server[0]), None);
    assert_eq!(classifier.classify(&server[1]), None);
    assert_eq!(
        classifier.classify(&rustls::pki_types::CertificateDer::from(vec![1, 2, 3])),
        None
    );

    // Right issuer, unusable CN: too long, with a space, missing.
    let dev_key = load_key(&p.device_ca_key()).unwrap();
    let dev_issuer =
        Issuer::from_ca_cert_der(device_ca.cert_der(), KeyPair::try_from(&dev_key).unwrap())
            .unwrap();
    assert_eq!(
        classifier.classify(&leaf(&"x".repeat(65), &dev_issuer)),
        None
    );
    assert_eq!(classifier.classify(&leaf("unit 1", &dev_issuer)), None);
    let no_cn = {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "x");
        let key = KeyPair::generate().unwrap();
        rustls::pki_types::CertificateDer::from(params.signed_by(&key, &dev_issuer).unwrap())
    };
    assert_eq!(classifier.classify(&no_cn), None);
    assert_eq!(
        classifier.classify(&leaf(&"x".repeat(64), &dev_issuer)),
        Some(PeerRole::Device {
            unit_id: "x".repeat(64)
        })
    );

    // Both CAs with the same name cannot be told apart.
    let err = PeerClassifier::new(device_ca.cert_der(), device_ca.cert_der()).unwrap_err();
    assert!(err.to_string().contains("same subject"), "{err}");
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf(cn: &str, issuer: &Issuer<'_, KeyPair>) -> rustls::pki_types::CertificateDer<'static> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    let key = KeyPair::generate().unwrap();
    params.signed_by(&key, issuer).unwrap().into()
}

#[test]
fn sign_device_csr_takes_only_the_public_key() {
    let (_dir, report) = fresh();
    let p = &report.paths;
    let device_ca = ClientCa::load(&p.device_ca_cert(), &p.device_ca_key()).unwrap();

    // A CSR asking for much more than it will get.
    let device_key = KeyPair::generate().unwrap();
    let mut req = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    req.distinguished_name = dn("root of all evil");
    req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let csr = req.serialize_request(&device_key).unwrap();

    for input in [csr.pem().unwrap().into_bytes(), csr.der().to_vec()] {
        let chain = device_ca.sign_device_csr("unit-7", &input).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], device_ca.cert_der());
        let cert = parse(&chain[0]);
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "unit-7"
        );
        assert!(!cert.is_ca());
        assert_eq!(cert.public_key().raw, spki(&device_key).as_slice());
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            [GeneralName::URI("urn:devgate:device:unit-7")]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        cert.verify_signature(Some(parse(device_ca.cert_der()).public_key()))
            .unwrap();
        let years = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(years, 1826 * 86400 + 300);
    }

    // A CSR whose signature does not match its key (no proof of possession).
    let mut tampered = csr.der().to_vec();
    let last = tampered.len() - 3;
    tampered[last] ^= 0x01;
    let err = device_ca.sign_device_csr("unit-7", &tampered).unwrap_err();
    assert!(matches!(err, PkiError::InvalidCsr { .. }), "{err}");
    assert!(err.to_string().contains("signature"), "{err}");

    let err = device_ca
        .sign_device_csr("unit-7", b"not a csr")
        .unwrap_err();
    assert!(matches!(err, PkiError::InvalidCsr { .. }), "{err}");
    let err = device_ca
        .sign_device_csr(
            "unit-7",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap_err();
    assert!(matches!(err, PkiError::InvalidCsr { .. }), "{err}");
    let err = device_ca
        .sign_device_csr("bad unit", csr.der())
        .unwrap_err();
    assert!(matches!(err, PkiError::InvalidIdentity { .. }), "{err}");
}

fn spki(key: &KeyPair) -> Vec<u8> {
    use rcgen::PublicKeyData as _;
    key.subject_public_key_info()
}

#[test]
fn issued_certs_write_load_and_summarize() {
    let (dir, report) = fresh();
    let p = &report.paths;
    let device_ca = ClientCa::load(&p.device_ca_cert(), &p.device_ca_key()).unwrap();
    let issued = device_ca.issue_device("unit/with%odd#chars").unwrap();
    let cert_path = dir.path().join("d.pem");
    let key_path = dir.path().join("d.key");
    issued.write(&cert_path, &key_path).unwrap();
    assert_eq!(
        fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(load_certs(&cert_path).unwrap(), issued.chain);
    assert_eq!(
        load_key(&key_path).unwrap().secret_der(),
        issued.key.secret_der()
    );
    assert!(
        issued
            .cert_pem()
            .starts_with("-----BEGIN CERTIFICATE-----\n")
    );
    assert!(
        issued
            .key_pem()
            .starts_with("-----BEGIN PRIVATE KEY-----\n")
    );

    let cert = parse(&issued.chain[0]);
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        [GeneralName::URI(
            "urn:devgate:device:unit%2Fwith%25odd%23chars"
        )]
    );

    let s = summarize(&issued.chain[0]).unwrap();
    assert_eq!(s.subject, "unit/with%odd#chars");
    let expected = now_unix() + 1826 * 86400;
    assert!(
        (expected - 5..=expected + 5).contains(&s.not_after_unix),
        "{s:?}"
    );
    assert!(
        s.not_after.ends_with('Z') && s.not_after.contains('T'),
        "{s:?}"
    );

    let short = device_ca
        .issue_device_valid_for("u", Duration::from_secs(3600))
        .unwrap();
    let s = summarize(&short.chain[0]).unwrap();
    assert!((now_unix() + 3600 - s.not_after_unix).abs() <= 5, "{s:?}");

    let root = summarize(&load_certs(&p.root_cert()).unwrap()[0]).unwrap();
    assert_eq!(root.subject, "devgate root CA");

    for bad in ["", "a b", "tab\t", "ü"] {
        let err = device_ca.issue_device(bad).unwrap_err();
        assert!(
            matches!(err, PkiError::InvalidIdentity { .. }),
            "{bad:?}: {err}"
        );
    }
    assert!(device_ca.issue_manager(&"m".repeat(65)).is_err());
}

#[test]
fn client_ca_load_reports_operator_mistakes() {
    let (_dir, report) = fresh();
    let p = &report.paths;
    let err = ClientCa::load(&p.device_ca_cert(), &p.manager_ca_key()).unwrap_err();
    assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("manager-ca.key") && msg.contains("device-ca.pem"),
        "{msg}"
    );

    let err = ClientCa::load(&p.server_cert(), &p.server_key()).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
    assert!(err.to_string().contains("server.pem"), "{err}");

    let err = ClientCa::load(&p.dir.join("missing.pem"), &p.device_ca_key()).unwrap_err();
    assert!(matches!(err, PkiError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    // Key and certificate swapped.
    let err = ClientCa::load(&p.device_ca_key(), &p.device_ca_cert()).unwrap_err();
    assert!(matches!(err, PkiError::Pem { .. }), "{err}");
    assert!(err.to_string().contains("device-ca.key"), "{err}");
}

#[test]
fn client_ca_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ClientCa>();
    check::<PeerClassifier>();
}

/// Not asserted: prints how many device certificates per second one `ClientCa` issues (loadgen
/// issues 10,000 at start). Run with `--nocapture` to see it.
#[test]
fn issue_device_throughput() {
    let (_dir, report) = fresh();
    let p = &report.paths;
    let ca = ClientCa::load(&p.device_ca_cert(), &p.device_ca_key()).unwrap();
    const N: usize = 10_000;

    let start = Instant::now();
    for i in 0..N {
        let issued = ca.issue_device(&format!("unit-{i:05}")).unwrap();
        std::hint::black_box(issued);
    }
    let one = start.elapsed();

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let ca = &ca;
            s.spawn(move || {
                for i in (t..N).step_by(threads) {
                    std::hint::black_box(ca.issue_device(&format!("unit-{i:05}")).unwrap());
                }
            });
        }
    });
    let all = start.elapsed();
    println!(
        "issue_device: {N} certificates in {:.2?} on 1 thread = {:.0}/s; \
         {threads} threads: {:.2?} = {:.0}/s",
        one,
        N as f64 / one.as_secs_f64(),
        all,
        N as f64 / all.as_secs_f64()
    );
}
