//! "Bring your own chain": `validate_server_chain` against real chains made by the `openssl`
//! CLI (as an operator's own CA would make them), and the `create_root`/`create_server` round
//! trip.

#![allow(clippy::unwrap_used, reason = "tests fail loudly by design")]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use devgate_pki::*;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

const ROOT_CA: &str = "basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash";
const INTER_CA: &str = "basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid";
const SERVER: &str = "basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:gw.example.com, IP:10.0.0.1
authorityKeyIdentifier = keyid";

const ROOT_CN: &str = "Example Root";
const INTER_CN: &str = "Example Intermediate";
const SERVER_CN: &str = "gw.example.com";

fn names() -> Vec<String> {
    vec!["gw.example.com".into(), "10.0.0.1".into()]
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// Validity of an issued certificate: days from now, or explicit `YYYYMMDDHHMMSSZ` dates.
#[derive(Clone, Copy)]
enum Validity {
    Days(u32),
    Dates(&'static str, &'static str),
}

/// A scratch directory in which certificates are made with the openssl CLI. Every object is
/// named: `<name>.key`, `<name>.pem`.
struct Openssl {
    dir: tempfile::TempDir,
}

impl Openssl {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("the openssl CLI must be installed");
        assert!(
            out.status.success(),
            "openssl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A PKCS#8 ECDSA P-256 key `<name>.key`.
    fn key(&self, name: &str) {
        let out = format!("{name}.key");
        self.run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &out,
        ]);
    }

    fn csr(&self, name: &str, cn: &str) {
        self.run(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &format!("{name}.csr"),
        ]);
    }

    fn ext_file(&self, name: &str, ext: &str) -> String {
        let file = format!("{name}.ext");
        fs::write(self.path(&file), format!("[v3]\n{ext}\n")).unwrap();
        file
    }

    /// A self-signed `<name>.pem` with a new key, valid for 10 years.
    fn root(&self, name: &str, cn: &str, ext: &str) {
        self.key(name);
        self.csr(name, cn);
        let ext = self.ext_file(name, ext);
        self.run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-signkey",
            &format!("{name}.key"),
            "-days",
            "3650",
            "-set_serial",
            "1",
            "-sha256",
            "-extfile",
            &ext,
            "-extensions",
            "v3",
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// `<name>.pem` with a new key `<name>.key`, signed by `<issuer>.pem`/`<issuer>.key`.
    fn issue(&self, name: &str, cn: &str, issuer: &str, ext: &str, validity: Validity) {
        self.key(name);
        self.issue_for_key(name, cn, issuer, ext, validity);
    }

    /// Like [`issue`](Self::issue) for the existing key `<name>.key`.
    fn issue_for_key(&self, name: &str, cn: &str, issuer: &str, ext: &str, validity: Validity) {
        self.csr(name, cn);
        let ext = self.ext_file(name, ext);
        let (ca_cert, ca_key) = (format!("{issuer}.pem"), format!("{issuer}.key"));
        let (csr, out) = (format!("{name}.csr"), format!("{name}.pem"));
        match validity {
            Validity::Days(days) => self.run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-set_serial",
                &format!("0x{:x}", rand::rng().random::<u64>()),
                "-days",
                &days.to_string(),
                "-sha256",
                "-extfile",
                &ext,
                "-extensions",
                "v3",
                "-out",
                &out,
            ]),
            // `openssl x509` of OpenSSL 3.0 cannot set arbitrary dates (-not_before/-not_after
            // arrived in 3.4), `openssl ca` can: it needs a throwaway database.
            Validity::Dates(start, end) => {
                let db = format!("{name}-db");
                fs::create_dir_all(self.path(&db)).unwrap();
                fs::write(self.path(&format!("{db}/index.txt")), "").unwrap();
                fs::write(self.path(&format!("{db}/serial")), "1000\n").unwrap();
                let cnf = format!("{name}-ca.cnf");
                fs::write(
                    self.path(&cnf),
                    format!(
                        "[ca]\ndefault_ca = ca\n[ca]\ndatabase = {db}/index.txt\n\
                         new_certs_dir = {db}\nserial = {db}/serial\ndefault_md = sha256\n\
                         policy = policy\nunique_subject = no\ncopy_extensions = none\n\
                         [policy]\ncommonName = supplied\n"
                    ),
                )
                .unwrap();
                self.run(&[
                    "ca",
                    "-batch",
                    "-notext",
                    "-config",
                    &cnf,
                    "-cert",
                    &ca_cert,
                    "-keyfile",
                    &ca_key,
                    "-in",
                    &csr,
                    "-out",
                    &out,
                    "-startdate",
                    start,
                    "-enddate",
                    end,
                    "-extfile",
                    &ext,
                    "-extensions",
                    "v3",
                ]);
            }
        }
    }

    fn read(&self, file: &str) -> Vec<u8> {
        fs::read(self.path(file)).unwrap()
    }

    /// The PEM certificates `<name>.pem` of `names`, concatenated in order.
    fn chain(&self, names: &[&str]) -> Vec<u8> {
        names
            .iter()
            .flat_map(|n| self.read(&format!("{n}.pem")))
            .collect()
    }

    /// root → inter → server, all well-formed.
    fn three_level() -> Self {
        let o = Self::new();
        o.root("root", ROOT_CN, ROOT_CA);
        o.issue("inter", INTER_CN, "root", INTER_CA, Validity::Days(1825));
        o.issue("server", SERVER_CN, "inter", SERVER, Validity::Days(365));
        o
    }

    fn validate(&self, chain: &[&str], key: &str) -> ChainReport {
        validate_server_chain(
            &self.chain(chain),
            &self.read(&format!("{key}.key")),
            &names(),
            now(),
        )
    }
}

fn kinds(r: &ChainReport) -> Vec<FaultKind> {
    r.faults.iter().map(|f| f.kind).collect()
}

fn messages(r: &ChainReport) -> Vec<&str> {
    r.faults.iter().map(|f| f.message.as_str()).collect()
}

#[test]
fn good_three_level_chain_passes() {
    let o = Openssl::three_level();
    // The helper's chain is one openssl itself accepts.
    o.run(&[
        "verify",
        "-CAfile",
        "root.pem",
        "-untrusted",
        "inter.pem",
        "server.pem",
    ]);
    let r = o.validate(&["server", "inter", "root"], "server");
    assert!(r.is_ok(), "{r}");
    assert_eq!(
        r.root_fingerprint,
        Some(fingerprint_file(&o.path("root.pem")).unwrap())
    );
    let ee = r.end_entity.unwrap();
    assert_eq!(ee.subject, SERVER_CN);
    assert!(ee.not_after_unix > now() + 364 * 86400);
}

#[test]
fn good_two_level_chain_passes() {
    let o = Openssl::new();
    o.root("root", ROOT_CN, ROOT_CA);
    o.issue("server", SERVER_CN, "root", SERVER, Validity::Days(365));
    let r = o.validate(&["server", "root"], "server");
    assert!(r.is_ok(), "{r}");
    assert!(r.root_fingerprint.is_some());
}

#[test]
fn intermediate_with_ca_false_is_reported() {
    let o = Openssl::new();
    o.root("root", ROOT_CN, ROOT_CA);
    o.issue(
        "inter",
        INTER_CN,
        "root",
        "basicConstraints = critical, CA:false\nkeyUsage = critical, keyCertSign",
        Validity::Days(1825),
    );
    o.issue("server", SERVER_CN, "inter", SERVER, Validity::Days(365));
    let r = o.validate(&["server", "inter", "root"], "server");
    assert_eq!(kinds(&r), [FaultKind::CaNotCa], "{r}");
    assert_eq!(
        r.faults[0].message,
        "certificate 2 (\"Example Intermediate\"): BasicConstraints CA=false, but it issues \
         certificate 1; an issuing certificate must be a CA"
    );

    // Without the extension at all.
    o.issue(
        "inter2",
        INTER_CN,
        "root",
        "keyUsage = keyCertSign",
        Validity::Days(1825),
    );
    o.issue("server2", SERVER_CN, "inter2", SERVER, Validity::Days(365));
    let r = o.validate(&["server2", "inter2", "root"], "server2");
    assert_eq!(kinds(&r), [FaultKind::CaNotCa], "{r}");
    assert!(r.faults[0].message.contains("no BasicConstraints"), "{r}");
}

#[test]
fn path_length_exceeded() {
    let o = Openssl::new();
    o.root(
        "root",
        ROOT_CN,
        "basicConstraints = critical, CA:true, pathlen:0\nkeyUsage = critical, keyCertSign",
    );
    o.issue("inter", INTER_CN, "root", INTER_CA, Validity::Days(1825));
    o.issue("server", SERVER_CN, "inter", SERVER, Validity::Days(365));
    let r = o.validate(&["server", "inter", "root"], "server");
    assert_eq!(kinds(&r), [FaultKind::PathLenExceeded], "{r}");
    assert_eq!(
        r.faults[0].message,
        "certificate 3 (\"Example Root\") allows 0 intermediate CAs below it (pathlen 0) but 1 \
         follows"
    );
    // pathlen 0 on the root is fine when it signs the server certificate directly.
    o.issue("direct", SERVER_CN, "root", SERVER, Validity::Days(365));
    assert!(o.validate(&["direct", "root"], "direct").is_ok());
}

#[test]
fn missing_san_names_each_name() {
    let o = Openssl::three_level();
    let names: Vec<String> = ["gw.example.com", "GW2.example.com", "10.0.0.1", "10.0.0.2"]
        .map(String::from)
        .to_vec();
    let r = validate_server_chain(
        &o.chain(&["server", "inter", "root"]),
        &o.read("server.key"),
        &names,
        now(),
    );
    assert_eq!(
        kinds(&r),
        [FaultKind::SanMissingName, FaultKind::SanMissingName],
        "{r}"
    );
    assert_eq!(
        messages(&r),
        [
            "server certificate (\"gw.example.com\") does not cover the name \"GW2.example.com\": \
             its SANs are gw.example.com, 10.0.0.1",
            "server certificate (\"gw.example.com\") does not cover the name \"10.0.0.2\": its \
             SANs are gw.example.com, 10.0.0.1",
        ]
    );

    // Case-insensitive exact match; a wildcard covers exactly one label; an IP entered as a
    // DNS SAN does not count and gets a hint.
    o.issue(
        "wild",
        SERVER_CN,
        "inter",
        "subjectAltName = DNS:*.Example.com, DNS:10.0.0.9",
        Validity::Days(30),
    );
    let check = |name: &str| {
        validate_server_chain(
            &o.chain(&["wild", "inter", "root"]),
            &o.read("wild.key"),
            &[name.to_owned()],
            now(),
        )
    };
    assert!(check("GW.example.COM").is_ok());
    assert!(check("other.example.com").is_ok());
    assert!(check("example.com").has(FaultKind::SanMissingName));
    assert!(check("a.b.example.com").has(FaultKind::SanMissingName));
    let r = check("10.0.0.9");
    assert_eq!(kinds(&r), [FaultKind::SanMissingName], "{r}");
    assert!(r.faults[0].message.contains("IP SANs"), "{r}");
}

#[test]
fn expired_and_not_yet_valid() {
    let o = Openssl::new();
    o.root("root", ROOT_CN, ROOT_CA);
    o.issue(
        "server",
        SERVER_CN,
        "root",
        SERVER,
        Validity::Dates("20230101000000Z", "20240501000000Z"),
    );
    let r = o.validate(&["server", "root"], "server");
    assert_eq!(kinds(&r), [FaultKind::Expired], "{r}");
    assert_eq!(
        r.faults[0].message,
        "certificate 1 (\"gw.example.com\") expired on 2024-05-01T00:00:00Z"
    );
    // On 2024-04-30 the server certificate was fine (the root was made today); in 2022
    // neither was valid yet.
    let chain = o.chain(&["server", "root"]);
    let key = o.read("server.key");
    let r = validate_server_chain(&chain, &key, &names(), 1_714_435_200);
    assert_eq!(kinds(&r), [FaultKind::NotYetValid], "{r}");
    assert!(r.faults[0].message.starts_with("certificate 2 "), "{r}");
    let r = validate_server_chain(&chain, &key, &names(), 1_640_995_200);
    assert_eq!(
        kinds(&r),
        [FaultKind::NotYetValid, FaultKind::NotYetValid],
        "{r}"
    );
    assert!(
        r.faults[1]
            .message
            .starts_with("certificate 2 (\"Example Root\") is not valid before")
    );

    o.issue(
        "future",
        SERVER_CN,
        "root",
        SERVER,
        Validity::Dates("20450101000000Z", "20460101000000Z"),
    );
    let r = o.validate(&["future", "root"], "future");
    assert_eq!(kinds(&r), [FaultKind::NotYetValid], "{r}");
    assert!(r.faults[0].message.contains("2045-01-01T00:00:00Z"), "{r}");
}

#[test]
fn mismatched_key() {
    let o = Openssl::three_level();
    o.key("other");
    let r = o.validate(&["server", "inter", "root"], "other");
    assert_eq!(kinds(&r), [FaultKind::KeyMismatch], "{r}");
    assert_eq!(
        r.faults[0].message,
        "private key does not match the server certificate (its public key differs)"
    );
    // The classic mix-up gets named.
    let r = o.validate(&["server", "inter", "root"], "inter");
    assert_eq!(kinds(&r), [FaultKind::KeyMismatch], "{r}");
    assert!(
        r.faults[0]
            .message
            .ends_with("; it is the key of certificate 2 (\"Example Intermediate\")"),
        "{r}"
    );
}

#[test]
fn key_formats_other_than_pkcs8_p256() {
    let o = Openssl::three_level();
    let chain = o.chain(&["server", "inter", "root"]);
    let check = |key: &str| validate_server_chain(&chain, &o.read(key), &names(), now());

    // SEC1 ("BEGIN EC PRIVATE KEY"): rcgen/ring cannot load it, the fallback reads it.
    o.run(&["ec", "-in", "server.key", "-out", "server-sec1.key"]);
    assert!(
        String::from_utf8(o.read("server-sec1.key"))
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    assert!(
        check("server-sec1.key").is_ok(),
        "{}",
        check("server-sec1.key")
    );
    o.run(&["ec", "-in", "inter.key", "-out", "inter-sec1.key"]);
    assert_eq!(kinds(&check("inter-sec1.key")), [FaultKind::KeyMismatch]);

    // Encrypted keys get a precise instruction.
    o.run(&[
        "pkey",
        "-in",
        "server.key",
        "-aes256",
        "-passout",
        "pass:x",
        "-out",
        "enc.key",
    ]);
    let r = check("enc.key");
    assert_eq!(kinds(&r), [FaultKind::KeyUnparsable], "{r}");
    assert!(r.faults[0].message.contains("encrypted"), "{r}");

    // RSA server certificate under the EC intermediate: PKCS#8 (rcgen) and PKCS#1 (fallback).
    o.run(&["genrsa", "-out", "rsa.key", "2048"]);
    o.run(&["rsa", "-in", "rsa.key", "-traditional", "-out", "rsa1.key"]);
    assert!(
        String::from_utf8(o.read("rsa1.key"))
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
    o.issue_for_key("rsa", SERVER_CN, "inter", SERVER, Validity::Days(30));
    let rsa_chain = o.chain(&["rsa", "inter", "root"]);
    for key in ["rsa.key", "rsa1.key"] {
        let r = validate_server_chain(&rsa_chain, &o.read(key), &names(), now());
        assert!(r.is_ok(), "{key}: {r}");
        let r = validate_server_chain(&chain, &o.read(key), &names(), now());
        assert_eq!(kinds(&r), [FaultKind::KeyMismatch], "{key}: {r}");
    }

    // P-521: not loadable by rcgen with ring; its PKCS#8 carries the public point.
    o.run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-521",
        "-out",
        "p521.key",
    ]);
    o.issue_for_key("p521", SERVER_CN, "inter", SERVER, Validity::Days(30));
    let r = validate_server_chain(
        &o.chain(&["p521", "inter", "root"]),
        &o.read("p521.key"),
        &names(),
        now(),
    );
    assert!(r.is_ok(), "{r}");

    // Ed25519 (PKCS#8 v1 without the public key: rcgen derives it).
    o.run(&["genpkey", "-algorithm", "ED25519", "-out", "ed.key"]);
    o.issue_for_key("ed", SERVER_CN, "inter", SERVER, Validity::Days(30));
    let ed_chain = o.chain(&["ed", "inter", "root"]);
    assert!(validate_server_chain(&ed_chain, &o.read("ed.key"), &names(), now()).is_ok());
    let r = validate_server_chain(&ed_chain, &o.read("server.key"), &names(), now());
    assert_eq!(kinds(&r), [FaultKind::KeyMismatch], "{r}");
}

#[test]
fn extension_faults() {
    let o = Openssl::new();
    o.root("root", ROOT_CN, ROOT_CA);
    // A server certificate for clients, not servers, without digitalSignature.
    o.issue(
        "client",
        SERVER_CN,
        "root",
        "basicConstraints = CA:false\nkeyUsage = keyEncipherment\nextendedKeyUsage = \
         clientAuth\nsubjectAltName = DNS:gw.example.com, IP:10.0.0.1",
        Validity::Days(30),
    );
    let r = o.validate(&["client", "root"], "client");
    assert_eq!(
        kinds(&r),
        [FaultKind::KeyUsage, FaultKind::MissingServerAuth],
        "{r}"
    );
    assert!(r.faults[0].message.contains("digitalSignature"), "{r}");
    assert!(r.faults[1].message.contains("serverAuth"), "{r}");

    // No SAN at all.
    o.issue(
        "nosan",
        SERVER_CN,
        "root",
        "basicConstraints = CA:false\nextendedKeyUsage = serverAuth",
        Validity::Days(30),
    );
    let r = o.validate(&["nosan", "root"], "nosan");
    assert_eq!(kinds(&r), [FaultKind::NoSan], "{r}");
    assert!(
        r.faults[0].message.contains("gw.example.com, 10.0.0.1"),
        "{r}"
    );

    // A CA in first position; a CA without keyCertSign; an intermediate restricted to
    // clientAuth.
    o.issue(
        "inter",
        INTER_CN,
        "root",
        "basicConstraints = critical, CA:true\nkeyUsage = digitalSignature, cRLSign\n\
         extendedKeyUsage = clientAuth",
        Validity::Days(30),
    );
    o.issue("server", SERVER_CN, "inter", SERVER, Validity::Days(30));
    let r = o.validate(&["server", "inter", "root"], "server");
    assert_eq!(
        kinds(&r),
        [FaultKind::KeyUsage, FaultKind::MissingServerAuth],
        "{r}"
    );
    assert!(r.faults[0].message.contains("keyCertSign"), "{r}");
    let r = o.validate(&["inter", "root"], "inter");
    assert!(r.has(FaultKind::NotEndEntity), "{r}");
}

#[test]
fn several_faults_are_all_reported() {
    let o = Openssl::new();
    o.root("root", ROOT_CN, ROOT_CA);
    o.issue(
        "inter",
        INTER_CN,
        "root",
        "basicConstraints = critical, CA:false\nkeyUsage = critical, keyCertSign",
        Validity::Days(1825),
    );
    o.issue(
        "server",
        SERVER_CN,
        "inter",
        "basicConstraints = CA:false\nsubjectAltName = DNS:gw.example.com",
        Validity::Dates("20230101000000Z", "20240501000000Z"),
    );
    o.key("other");
    // Root left out, wrong key, expired, CA=false intermediate, IP name not covered.
    let r = o.validate(&["server", "inter"], "other");
    let mut got = kinds(&r);
    got.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        got,
        [
            FaultKind::CaNotCa,
            FaultKind::Expired,
            FaultKind::KeyMismatch,
            FaultKind::SanMissingName,
            FaultKind::UntrustedRoot,
        ],
        "{r}"
    );
}

#[test]
fn missing_root() {
    let o = Openssl::three_level();
    let r = o.validate(&["server", "inter"], "server");
    assert_eq!(kinds(&r), [FaultKind::UntrustedRoot], "{r}");
    assert_eq!(
        r.faults[0].message,
        "certificate 2 (\"Example Intermediate\") is not self-signed: the chain ends at an \
         intermediate issued by \"Example Root\"; append the root certificate (the one devices \
         pin)"
    );
    assert_eq!(r.root_fingerprint, None);
    let r = o.validate(&["server"], "server");
    assert_eq!(kinds(&r), [FaultKind::UntrustedRoot], "{r}");
    assert!(
        r.faults[0]
            .message
            .starts_with("the chain ends at the server certificate")
    );
}

#[test]
fn wrong_order() {
    let o = Openssl::three_level();
    let r = o.validate(&["server", "root", "inter"], "server");
    // Only the order is reported: no path-length or missing-root noise from the positions.
    assert_eq!(
        kinds(&r),
        [FaultKind::WrongOrder, FaultKind::WrongOrder],
        "{r}"
    );
    assert_eq!(
        r.faults[1].message,
        "certificate 2 (\"Example Root\") is self-signed (a root), but certificate 3 \
         (\"Example Intermediate\") follows it; the root must be the last certificate of the \
         chain"
    );
    assert!(
        r.faults[0].message.starts_with(
            "certificate 1 (\"gw.example.com\") is issued by \"Example Intermediate\", not by \
             the next one, certificate 2 (\"Example Root\"); its issuer is certificate 3"
        ),
        "{r}"
    );

    // Root first: the first certificate is a CA and nothing links.
    let r = o.validate(&["root", "inter", "server"], "server");
    assert!(r.has(FaultKind::WrongOrder), "{r}");
    assert!(r.has(FaultKind::NotEndEntity), "{r}");
}

#[test]
fn forged_issuer_is_a_bad_signature() {
    // Same subject name as the real intermediate, different key.
    let o = Openssl::three_level();
    o.issue("impostor", INTER_CN, "root", INTER_CA, Validity::Days(1825));
    let r = o.validate(&["server", "impostor", "root"], "server");
    assert_eq!(kinds(&r), [FaultKind::BadSignature], "{r}");
    assert!(
        r.faults[0]
            .message
            .contains("does not verify with the key of certificate 2")
    );
}

#[test]
fn garbage_is_unparsable() {
    let o = Openssl::three_level();
    let key = o.read("server.key");
    let check = |chain: &[u8]| validate_server_chain(chain, &key, &names(), now());

    let r = check(b"this is not a certificate\n");
    assert_eq!(kinds(&r), [FaultKind::Unparsable], "{r}");
    let r = check(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
    assert_eq!(kinds(&r), [FaultKind::Unparsable], "{r}");
    let r = check(b"-----BEGIN CERTIFICATE-----\nMIIB\n");
    assert_eq!(kinds(&r), [FaultKind::Unparsable], "{r}");
    let r = check(b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n");
    assert_eq!(kinds(&r), [FaultKind::Unparsable], "{r}");
    assert!(
        r.faults[0]
            .message
            .starts_with("certificate 1: not a valid X.509"),
        "{r}"
    );

    o.run(&[
        "x509",
        "-in",
        "server.pem",
        "-outform",
        "der",
        "-out",
        "server.der",
    ]);
    let r = check(&o.read("server.der"));
    assert_eq!(kinds(&r), [FaultKind::Unparsable], "{r}");
    assert!(r.faults[0].message.contains("DER"), "{r}");

    assert_eq!(kinds(&check(b"")), [FaultKind::Empty]);
    let r = check(&key);
    assert_eq!(kinds(&r), [FaultKind::Empty], "{r}");
    assert!(r.faults[0].message.contains("swapped"), "{r}");

    // A bad key next to a bad chain: both reported.
    let r = validate_server_chain(b"junk", b"junk", &names(), now());
    assert_eq!(
        kinds(&r),
        [FaultKind::Unparsable, FaultKind::KeyUnparsable],
        "{r}"
    );
    let r = validate_server_chain(
        &o.chain(&["server", "inter", "root"]),
        &o.read("server.pem"),
        &names(),
        now(),
    );
    assert_eq!(kinds(&r), [FaultKind::KeyUnparsable], "{r}");
}

#[test]
fn files_name_their_paths() {
    let o = Openssl::three_level();
    fs::write(o.path("chain.pem"), o.chain(&["server", "inter"])).unwrap();
    let r = validate_server_chain_files(
        &o.path("chain.pem"),
        &o.path("missing.key"),
        &names(),
        now(),
    );
    assert_eq!(
        kinds(&r),
        [FaultKind::Unreadable, FaultKind::UntrustedRoot],
        "{r}"
    );
    let missing = o.path("missing.key").display().to_string();
    assert!(
        r.faults[0]
            .message
            .starts_with(&format!("{missing}: file not found")),
        "{r}"
    );
    let chain = o.path("chain.pem").display().to_string();
    assert!(
        r.faults[1]
            .message
            .starts_with(&format!("{chain}: certificate 2")),
        "{r}"
    );

    fs::write(o.path("good.pem"), o.chain(&["server", "inter", "root"])).unwrap();
    let r =
        validate_server_chain_files(&o.path("good.pem"), &o.path("server.key"), &names(), now());
    assert!(r.is_ok(), "{r}");
    let r = validate_server_chain_files(&o.path("nope.pem"), &o.path("inter.key"), &names(), now());
    assert_eq!(kinds(&r), [FaultKind::Unreadable], "{r}");
}

#[test]
fn create_root_and_server_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f);
    let fp = create_root(
        &p("root.pem"),
        &p("root.key"),
        "Example Corp root",
        DEFAULT_ROOT_DAYS,
    )
    .unwrap();
    assert_eq!(fp, fingerprint_file(&p("root.pem")).unwrap());
    let names: Vec<String> = [
        "gw.example.com",
        "gw2.example.com",
        "192.0.2.7",
        "2001:db8::7",
    ]
    .map(String::from)
    .to_vec();
    create_server(
        &p("root.pem"),
        &p("root.key"),
        &names,
        DEFAULT_SERVER_DAYS,
        &p("server.pem"),
        &p("server.key"),
    )
    .unwrap();
    let r = validate_server_chain_files(&p("server.pem"), &p("server.key"), &names, now());
    assert!(r.is_ok(), "{r}");
    assert_eq!(r.root_fingerprint.as_deref(), Some(fp.as_str()));
    assert_eq!(r.end_entity.unwrap().subject, "gw.example.com");
    for key in ["root.key", "server.key"] {
        let mode = fs::metadata(p(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    // openssl agrees.
    let out = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "root.pem",
            "-purpose",
            "sslserver",
            "server.pem",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // The root key is never overwritten.
    let e = create_root(&p("root.pem"), &p("new.key"), "x", 1).unwrap_err();
    assert!(matches!(e, PkiError::WouldOverwrite { .. }), "{e}");
    assert!(e.to_string().contains("root.pem"), "{e}");
    assert!(!p("new.key").exists());
    let e = create_root(&p("new.pem"), &p("root.key"), "x", 1).unwrap_err();
    assert!(matches!(e, PkiError::WouldOverwrite { .. }), "{e}");

    // Bad inputs are refused before anything is written.
    let e = create_server(
        &p("root.pem"),
        &p("server.key"),
        &names,
        30,
        &p("x.pem"),
        &p("x.key"),
    )
    .unwrap_err();
    assert!(matches!(e, PkiError::KeyMismatch { .. }), "{e}");
    let e = create_server(
        &p("root.pem"),
        &p("root.key"),
        &["*.example".into()],
        30,
        &p("x.pem"),
        &p("x.key"),
    )
    .unwrap_err();
    assert!(matches!(e, PkiError::InvalidName { .. }), "{e}");
    let e = create_server(
        &p("root.pem"),
        &p("root.key"),
        &names,
        0,
        &p("x.pem"),
        &p("x.key"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("0 days"), "{e}");
    assert!(!p("x.pem").exists() && !p("x.key").exists());
}

#[test]
fn create_server_under_an_openssl_ca() {
    // An operator's existing CA made with openssl, signing via an intermediate whose file also
    // holds the root.
    let o = Openssl::three_level();
    fs::write(o.path("issuer.pem"), o.chain(&["inter", "root"])).unwrap();
    create_server(
        &o.path("issuer.pem"),
        &o.path("inter.key"),
        &names(),
        90,
        &o.path("new.pem"),
        &o.path("new.key"),
    )
    .unwrap();
    let r = validate_server_chain_files(&o.path("new.pem"), &o.path("new.key"), &names(), now());
    assert!(r.is_ok(), "{r}");
    assert_eq!(load_certs(&o.path("new.pem")).unwrap().len(), 3);

    // Without the root in the issuer file the chain would be unusable: refused.
    let e = create_server(
        &o.path("inter.pem"),
        &o.path("inter.key"),
        &names(),
        90,
        &o.path("bad.pem"),
        &o.path("bad.key"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("append the root certificate"), "{e}");
    assert!(!o.path("bad.pem").exists());
}

/// Replaces random base64 characters inside the PEM bodies: random bit damage to the DER.
fn mutate_pem(pem: &[u8], rng: &mut StdRng, edits: usize) -> Vec<u8> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = pem.to_vec();
    let body: Vec<usize> = {
        let mut idx = Vec::new();
        let mut line_start = 0;
        for (i, &b) in pem.iter().enumerate() {
            if b == b'\n' {
                if pem[line_start] != b'-' {
                    idx.extend(line_start..i);
                }
                line_start = i + 1;
            }
        }
        idx
    };
    for _ in 0..edits {
        let at = body[rng.random_range(0..body.len())];
        out[at] = B64[rng.random_range(0..B64.len())];
    }
    out
}

#[test]
fn random_input_never_panics() {
    let o = Openssl::three_level();
    let chain = o.chain(&["server", "inter", "root"]);
    let key = o.read("server.key");
    let mut rng = StdRng::seed_from_u64(0x5eed_d0e6);
    let names = names();
    let mut seen = std::collections::HashSet::new();
    for round in 0..3000 {
        let (c, k) = match round % 4 {
            0 => {
                let len = rng.random_range(0..2048);
                let mut junk = vec![0u8; len];
                rng.fill(junk.as_mut_slice());
                (junk.clone(), junk)
            }
            1 => {
                // Random bytes inside a well-formed PEM frame, for the X.509 and key parsers.
                let len = rng.random_range(0..600);
                let mut der = vec![0u8; len];
                rng.fill(der.as_mut_slice());
                if let Some(first) = der.first_mut() {
                    *first = 0x30;
                }
                let b64 = base64(&der);
                (
                    format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
                        .into_bytes(),
                    format!(
                        "-----BEGIN EC PRIVATE KEY-----\n{b64}\n-----END EC PRIVATE KEY-----\n"
                    )
                    .into_bytes(),
                )
            }
            _ => {
                let edits = rng.random_range(1..8);
                (
                    mutate_pem(&chain, &mut rng, edits),
                    mutate_pem(&key, &mut rng, edits),
                )
            }
        };
        // Half the time at the present (the undamaged chain is valid), half at any instant.
        let at = if round % 2 == 0 { now() } else { rng.random() };
        seen.extend(kinds(&validate_server_chain(&c, &k, &names, at)));
        // Truncations too.
        let cut = rng.random_range(0..=chain.len());
        let _ = validate_server_chain(&chain[..cut], &k[..cut.min(k.len())], &names, now());
    }
    // The damage reached every layer, not just the PEM reader.
    for kind in [
        FaultKind::Unparsable,
        FaultKind::BadSignature,
        FaultKind::KeyUnparsable,
        FaultKind::KeyMismatch,
        FaultKind::Expired,
    ] {
        assert!(seen.contains(&kind), "{kind:?} never seen: {seen:?}");
    }
}

fn base64(data: &[u8]) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
