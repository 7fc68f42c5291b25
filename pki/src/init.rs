//! Creating a fresh PKI in `<data_dir>/pki`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

use crate::files::{CERT_MODE, KEY_MODE, pem_encode, sync_dir, write_atomic};
use crate::issue::{SERVER_VALIDITY, ca_params, end_entity_params};
use crate::names::server_sans;
use crate::{ClientCa, PkiError, fingerprint};

/// Where the PKI files live: `<data_dir>/pki/`. The file names are a contract relied on by
/// packaging, documentation and outside checks; do not rename them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    /// `<data_dir>/pki`.
    pub dir: PathBuf,
}

impl PkiPaths {
    /// The PKI directory of a data directory.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("pki"),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `root.pem`: the self-signed root; its fingerprint is what devices check on first contact.
    pub fn root_cert(&self) -> PathBuf {
        self.file("root.pem")
    }
    /// `root.key`.
    pub fn root_key(&self) -> PathBuf {
        self.file("root.key")
    }
    /// `server.pem`: server certificate followed by the root, the chain the gateway presents.
    pub fn server_cert(&self) -> PathBuf {
        self.file("server.pem")
    }
    /// `server.key`.
    pub fn server_key(&self) -> PathBuf {
        self.file("server.key")
    }
    /// `device-ca.pem`: trust anchor for device certificates.
    pub fn device_ca_cert(&self) -> PathBuf {
        self.file("device-ca.pem")
    }
    /// `device-ca.key`.
    pub fn device_ca_key(&self) -> PathBuf {
        self.file("device-ca.key")
    }
    /// `manager-ca.pem`: trust anchor for manager certificates.
    pub fn manager_ca_cert(&self) -> PathBuf {
        self.file("manager-ca.pem")
    }
    /// `manager-ca.key`.
    pub fn manager_ca_key(&self) -> PathBuf {
        self.file("manager-ca.key")
    }
    /// `manager.pem`: the first manager's certificate (CN "manager") followed by the manager CA.
    pub fn manager_cert(&self) -> PathBuf {
        self.file("manager.pem")
    }
    /// `manager.key`.
    pub fn manager_key(&self) -> PathBuf {
        self.file("manager.key")
    }
}

/// What [`init`] creates.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// Host names and IP addresses by which the gateway is reached; the first is the server
    /// certificate's CN. Every one becomes a SAN.
    pub names: Vec<String>,
    /// Replace an existing PKI. Every device and manager then has to enrol again.
    pub force: bool,
}

/// What [`init`] created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// Fingerprint of the new root (see [`fingerprint`](crate::fingerprint())), to show the
    /// operator and the people enrolling devices.
    pub fingerprint: String,
    /// Where the files are.
    pub paths: PkiPaths,
}

/// Name of the first manager certificate `init` issues.
pub const FIRST_MANAGER_NAME: &str = "manager";

/// Creates root, server certificate, device CA, manager CA and a first manager certificate in
/// `<data_dir>/pki`, with keys mode 0600.
///
/// Validates all names before touching the disk. Refuses to run if `root.pem` exists unless
/// `opts.force`. `root.pem` is written last, so an interrupted `init` leaves no `root.pem`
/// behind and can simply be run again.
pub fn init(data_dir: &Path, opts: &InitOptions) -> Result<InitReport, PkiError> {
    let sans = server_sans(&opts.names)?;
    let paths = PkiPaths::new(data_dir);
    let root_path = paths.root_cert();
    match fs::symlink_metadata(&root_path) {
        Ok(_) if !opts.force => {
            return Err(PkiError::AlreadyInitialised {
                dir: paths.dir.clone(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PkiError::Io {
                path: root_path,
                source,
            });
        }
    }
    // Explicit modes: under `umask 000` the directories would otherwise be world-writable.
    crate::files::create_dir_with_mode(data_dir, crate::files::DATA_DIR_MODE)?;
    crate::files::create_dir_with_mode(&paths.dir, crate::files::PRIVATE_DIR_MODE)?;

    // Server chain. pathlen 1 on the root: exactly one CA level (device CA, manager CA) may
    // sit below it.
    let root_key = gen_key("the root")?;
    let root_params = ca_params("devgate root CA", 1)?;
    let root_cert = root_params
        .self_signed(&root_key)
        .map_err(PkiError::rcgen("self-sign the root certificate"))?;
    let root_key_pem = root_key.serialize_pem();
    let root = Issuer::new(root_params, root_key);

    let server_key = gen_key("the server certificate")?;
    let mut server_params = end_entity_params(
        &first_name(&sans),
        SERVER_VALIDITY,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    server_params.subject_alt_names = sans;
    let server_cert = server_params
        .signed_by(&server_key, &root)
        .map_err(PkiError::rcgen("sign the server certificate"))?;

    // Client CAs. pathlen 0: they issue end entities only.
    let (device_ca, device_ca_key_pem) = client_ca("devgate device CA", &root)?;
    let (manager_ca, manager_ca_key_pem) = client_ca("devgate manager CA", &root)?;
    let manager = manager_ca.issue_manager(FIRST_MANAGER_NAME)?;

    let write_cert = |path: PathBuf, ders: &[&[u8]]| {
        let pem = pem_encode("CERTIFICATE", ders.iter().copied());
        write_atomic(&path, pem.as_bytes(), CERT_MODE)
    };
    write_atomic(
        &paths.device_ca_key(),
        device_ca_key_pem.as_bytes(),
        KEY_MODE,
    )?;
    write_cert(paths.device_ca_cert(), &[device_ca.cert_der().as_ref()])?;
    write_atomic(
        &paths.manager_ca_key(),
        manager_ca_key_pem.as_bytes(),
        KEY_MODE,
    )?;
    write_cert(paths.manager_ca_cert(), &[manager_ca.cert_der().as_ref()])?;
    manager.write(&paths.manager_cert(), &paths.manager_key())?;
    write_atomic(
        &paths.server_key(),
        server_key.serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    write_cert(
        paths.server_cert(),
        &[server_cert.der().as_ref(), root_cert.der().as_ref()],
    )?;
    write_atomic(&paths.root_key(), root_key_pem.as_bytes(), KEY_MODE)?;
    // Last: its presence marks a complete PKI.
    write_cert(root_path, &[root_cert.der().as_ref()])?;
    sync_dir(&paths.dir)?;

    Ok(InitReport {
        fingerprint: fingerprint(root_cert.der()),
        paths,
    })
}

fn gen_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(PkiError::rcgen(format!("generate a key for {what}")))
}

fn client_ca(
    common_name: &str,
    root: &Issuer<'_, KeyPair>,
) -> Result<(ClientCa, String), PkiError> {
    let key = gen_key(common_name)?;
    let params = ca_params(common_name, 0)?;
    let cert = params
        .signed_by(&key, root)
        .map_err(PkiError::rcgen(format!(
            "sign the {common_name} certificate"
        )))?;
    let key_pem = key.serialize_pem();
    Ok((
        ClientCa::from_parts(Issuer::new(params, key), cert.into()),
        key_pem,
    ))
}

/// The CN of the server certificate: the first name as given.
fn first_name(sans: &[SanType]) -> String {
    match sans.first() {
        Some(SanType::DnsName(n)) => n.as_str().to_owned(),
        Some(SanType::IpAddress(ip)) => ip.to_string(),
        // server_sans only yields DNS and IP SANs and never an empty list.
        _ => String::new(),
    }
}
