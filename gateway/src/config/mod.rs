//! The gateway's configuration: a TOML file whose every key has a default, so that
//! `devgate serve --data-dir DIR` runs on embedded defaults alone.
//!
//! Durations are given in milliseconds or seconds (the key says which) rather than as
//! strings: one less parser, and no ambiguity about units in an operator's file.

/// The `[xdp]` section (the guard's settings).
pub mod xdp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Effective configuration of one gateway instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public TLS listener (devices, managers, `/usg/check-status`).
    pub listen: SocketAddr,
    /// This instance's name in status, metrics and the shared store; unset = the host
    /// name and the public port (`host:8443`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Networks of load balancers whose connections to `listen` start with a PROXY
    /// protocol header (v1 or v2), e.g. `["10.0.0.0/8"]`; the client address in the header
    /// is what limits, logs and metrics use. Empty (default): PROXY protocol is off. A
    /// connection from these networks without a header is refused; a header from any
    /// other source fails the TLS handshake.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub proxy_protocol_from: Vec<String>,
    /// Admin listener (`/v1/status`, `/metrics`); keep it on loopback.
    pub admin: SocketAddr,
    /// Who may use the admin listener: `auto` (open on loopback, a bearer token from
    /// `admin_token_file` required on any other address) or `token` (always required).
    pub admin_auth: AdminAuth,
    /// The admin listener's bearer token; unset = `<data_dir>/admin.token` (written
    /// mode 0600 by `devgate init` and `devgate admin-token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// State directory (PKI, later the store).
    pub data_dir: PathBuf,
    /// Data-path worker threads; 0 means one per available core.
    pub workers: usize,
    /// Handshake worker threads: they accept, run TLS handshakes and HTTP requests
    /// (enrollment, check-status) at a lower CPU priority, and hand each session to a
    /// routing worker, so that a flood of handshakes takes only the CPU routing leaves.
    /// `"auto"` = as many as `workers` (one per core with `workers = 0`); 0 = none (the
    /// routing workers accept and handshake themselves).
    pub handshake_workers: HandshakeWorkers,
    /// The handshake workers' CPU priority: `"idle"` (Linux `SCHED_IDLE`: they run only
    /// when no routing thread wants the core, and a routing thread that wakes preempts
    /// them at once) or a nice value 0–19.
    pub handshake_priority: HandshakePriority,
    /// The I/O driver: `auto` (io_uring where the kernel allows it, else epoll),
    /// `io_uring` (fail to start without it) or `epoll`.
    pub data_path: DataPathChoice,
    /// Connection limits and protocol bounds.
    pub limits: Limits,
    /// Keep-alive and dead-peer detection.
    pub keepalive: Keepalive,
    /// Behaviour while no manager is connected.
    pub managers: Managers,
    /// Which client certificates are accepted (`[credentials]`).
    pub credentials: Credentials,
    /// The connection guard: XDP program, per-source limits (`[xdp]`).
    pub xdp: xdp::GuardConfig,
    /// TLS record layer (`[tls]`).
    pub tls: TlsSection,
    /// The credential store (`[store]`).
    pub store: StoreSection,
}

/// The `[store]` section: where keys, the device registry and revocations live.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Unset: the embedded SQLite store in the data dir. `postgres://USER:PASSWORD@HOST:PORT/DB`
    /// (or a libpq key=value string): the PostgreSQL store that several instances share.
    /// `config show` prints it without the password.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_redacted_url"
    )]
    pub url: Option<String>,
}

/// The store URL without its password (`config show` output is pasted into tickets).
fn serialize_redacted_url<S: serde::Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let redacted = url.as_deref().map(redact_url);
    redacted.serialize(s)
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; also hides a
/// `password=` value in key=value form.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (auth, tail) = match rest.find('@') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => return url.to_owned(),
        };
        return match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***{tail}"),
            None => url.to_owned(),
        };
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some(("password", _)) => "password=***".to_owned(),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `[tls]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Where records are sealed after the handshake: `auto` (the kernel when its `tls`
    /// ULP and the cipher are there, else rustls) or `off` (always rustls).
    pub offload: TlsOffloadChoice,
    /// Lowest TLS version the public listener accepts: `"1.2"` (default) or `"1.3"`.
    pub min_version: TlsMinVersion,
    /// Cipher suites the public listener offers, by their rustls names (e.g.
    /// `TLS13_AES_128_GCM_SHA256`, `TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384`), in order of
    /// preference; unset = rustls' defaults (AEAD suites only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher_suites: Option<Vec<String>>,
}

/// The lowest TLS version accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsMinVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsSection {
    /// The cipher suites to offer, checked against the crypto provider: every name must
    /// be a suite it has, the list must not be empty, and at least one suite must belong
    /// to a version at or above `min_version`.
    pub fn suites(&self) -> Result<Vec<rustls::SupportedCipherSuite>, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            key: "tls.cipher_suites",
            message,
        };
        let available = rustls::crypto::aws_lc_rs::default_provider().cipher_suites;
        let usable = |s: &rustls::SupportedCipherSuite| {
            self.min_version == TlsMinVersion::Tls12
                || matches!(s, rustls::SupportedCipherSuite::Tls13(_))
        };
        let Some(names) = &self.cipher_suites else {
            return Ok(available.into_iter().filter(usable).collect());
        };
        let name_of = |s: &rustls::SupportedCipherSuite| s.suite().as_str().unwrap_or("?");
        let known = || {
            available
                .iter()
                .map(&name_of)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if names.is_empty() {
            return Err(invalid(format!(
                "is empty: list at least one suite, or remove the key for the defaults (known: {})",
                known()
            )));
        }
        let mut chosen = Vec::with_capacity(names.len());
        for name in names {
            let Some(suite) = available
                .iter()
                .find(|s| name_of(s).eq_ignore_ascii_case(name.trim()))
            else {
                return Err(invalid(format!(
                    "unknown cipher suite {name:?} (known: {})",
                    known()
                )));
            };
            if !chosen.contains(suite) {
                chosen.push(*suite);
            }
        }
        let chosen: Vec<_> = chosen.into_iter().filter(usable).collect();
        if chosen.is_empty() {
            return Err(invalid(
                "lists only TLS 1.2 suites but tls.min_version is \"1.3\": add a TLS13_* suite or lower min_version".to_owned(),
            ));
        }
        Ok(chosen)
    }
}

/// Kernel TLS offload choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsOffloadChoice {
    /// Kernel TLS where the start-up probe passes.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Records always stay in rustls.
    #[serde(rename = "off")]
    Off,
}

/// When the admin listener requires its bearer token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminAuth {
    /// Open on a loopback address (127.0.0.0/8, ::1), token required on any other.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Token required on every address.
    #[serde(rename = "token")]
    Token,
}

/// File name of the admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Which I/O driver runs the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataPathChoice {
    /// io_uring when the probe passes, else epoll (the reason goes to the log and status).
    #[serde(rename = "auto")]
    Auto,
    /// io_uring or refuse to start.
    #[serde(rename = "io_uring")]
    IoUring,
    /// The portable epoll driver.
    #[serde(rename = "epoll")]
    Epoll,
}

impl std::str::FromStr for DataPathChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(Self::IoUring),
            "epoll" => Ok(Self::Epoll),
            other => Err(format!(
                "data path {other:?}: expected auto, io_uring or epoll"
            )),
        }
    }
}

// The sections the routing core reads live in the core crate; re-exported here so that
// the configuration file's types are all found under `config`.
pub use devgate_core::settings::{Credentials, DeviceLimitScope, Keepalive, Limits, Managers};

/// `handshake_workers`: `"auto"` or a number (also as a string, so that the environment
/// override `DEVGATE_HANDSHAKE_WORKERS=0` works).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HandshakeWorkers {
    /// As many as routing workers.
    #[default]
    Auto,
    /// This many (0 = none).
    Count(usize),
}

impl Serialize for HandshakeWorkers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Count(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for HandshakeWorkers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let bad = || serde::de::Error::custom("expected \"auto\" or a number of threads");
        match Raw::deserialize(d)? {
            Raw::Number(n) => usize::try_from(n).map(Self::Count).map_err(|_| bad()),
            Raw::Text(t) if t == "auto" => Ok(Self::Auto),
            Raw::Text(t) => t.trim().parse().map(Self::Count).map_err(|_| bad()),
        }
    }
}

/// `handshake_priority`: `"idle"` or a nice value (also as a string, for the environment
/// override `DEVGATE_HANDSHAKE_PRIORITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HandshakePriority {
    /// `SCHED_IDLE`.
    #[default]
    Idle,
    /// `SCHED_OTHER` at this nice value.
    Nice(i32),
}

impl Serialize for HandshakePriority {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Idle => s.serialize_str("idle"),
            Self::Nice(n) => s.serialize_i64(i64::from(*n)),
        }
    }
}

impl<'de> Deserialize<'de> for HandshakePriority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let bad = || serde::de::Error::custom("expected \"idle\" or a nice value from 0 to 19");
        let nice = |n: i64| {
            i32::try_from(n)
                .ok()
                .filter(|n| (0..=19).contains(n))
                .map(Self::Nice)
                .ok_or_else(bad)
        };
        match Raw::deserialize(d)? {
            Raw::Number(n) => nice(n),
            Raw::Text(t) if t == "idle" => Ok(Self::Idle),
            Raw::Text(t) => nice(t.trim().parse().map_err(|_| bad())?),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            proxy_protocol_from: Vec::new(),
            instance_id: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 9180)),
            admin_auth: AdminAuth::Auto,
            admin_token_file: None,
            data_dir: PathBuf::from("/var/lib/devgate"),
            workers: 0,
            handshake_workers: HandshakeWorkers::Auto,
            handshake_priority: HandshakePriority::Idle,
            data_path: DataPathChoice::Auto,
            limits: Limits::default(),
            keepalive: Keepalive::default(),
            managers: Managers::default(),
            credentials: Credentials::default(),
            xdp: Default::default(),
            tls: TlsSection::default(),
            store: StoreSection::default(),
        }
    }
}

/// A configuration problem, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// File that failed.
        path: PathBuf,
        /// What the TOML parser reported (it names the key).
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("config key {key}: {message}")]
    Invalid {
        /// Dotted key name.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// An environment override names no key or has a value of the wrong type.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable, e.g. `DEVGATE_LIMITS__DEVICE_LIMIT`.
        var: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The configuration file read when no `--config` is given and it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/devgate/devgate.toml";

/// Prefix of environment overrides: `DEVGATE_<KEY>` for a top-level key,
/// `DEVGATE_<SECTION>__<KEY>` (two underscores) for a key in a section.
pub const ENV_PREFIX: &str = "DEVGATE_";

/// Where the effective configuration came from.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// Environment variables that overrode keys.
    pub env: Vec<String>,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "defaults")?;
        if let Some(file) = &self.file {
            write!(f, " < {}", file.display())?;
        }
        if !self.env.is_empty() {
            write!(f, " < environment ({})", self.env.join(", "))?;
        }
        Ok(())
    }
}

/// Parses an environment value as the type the key already has, so that `"5000"` stays a
/// number and `"0.0.0.0:443"` a string without the operator quoting anything.
fn env_value(existing: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    use toml::Value;
    let fragment = || {
        toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
    };
    match existing {
        Some(Value::String(_)) => Ok(Value::String(raw.to_owned())),
        Some(Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        Some(Value::Float(_)) => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("expected a number, got {raw:?}")),
        Some(Value::Boolean(_)) => match raw.trim() {
            "true" | "1" | "yes" | "on" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(Value::Boolean(false)),
            _ => Err(format!("expected true or false, got {raw:?}")),
        },
        Some(Value::Table(_)) => {
            Err("names a section; set its keys with DEVGATE_<SECTION>__<KEY>".to_owned())
        }
        Some(Value::Array(_)) => fragment()
            .filter(Value::is_array)
            .ok_or_else(|| format!("expected a TOML array such as [\"a\", \"b\"], got {raw:?}")),
        // A key without a value in the defaults (an unset option): take the value as TOML
        // if it parses, else as a string; unknown keys fail when the result is read back.
        Some(Value::Datetime(_)) | None => {
            Ok(fragment().unwrap_or_else(|| Value::String(raw.to_owned())))
        }
    }
}

/// `key limits.device_limit (line 3): invalid type: …` — the TOML parser reports a
/// position and a message; operators want the dotted key.
fn parse_error_message(text: &str, e: &toml::de::Error) -> String {
    let fallback = || e.to_string().trim_end().replace('\n', " ");
    let Some(span) = e.span() else {
        return fallback();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let mut section = String::new();
    for line in before.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim_matches(['[', ']', ' ']).to_owned();
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match key {
        Some(k) if section.is_empty() => format!("key {k} (line {line_no}): {}", e.message()),
        Some(k) => format!("key {section}.{k} (line {line_no}): {}", e.message()),
        None => format!("line {line_no}: {}", e.message()),
    }
}

impl Config {
    /// The sections the routing core reads.
    pub fn settings(&self) -> devgate_core::settings::Settings {
        devgate_core::settings::Settings {
            limits: self.limits.clone(),
            keepalive: self.keepalive.clone(),
            managers: self.managers.clone(),
            credentials: self.credentials.clone(),
            proxy_protocol_from: self.proxy_protocol_from.clone(),
        }
    }

    /// The effective configuration of `devgate serve` and `devgate config show`: the
    /// defaults, then `file` (or [`DEFAULT_CONFIG_PATH`] if it exists and no file is
    /// given), then the environment overrides; validated.
    pub fn load_effective(file: Option<&Path>) -> Result<(Self, ConfigSource), ConfigError> {
        let default = Path::new(DEFAULT_CONFIG_PATH);
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| default.exists().then(|| default.to_path_buf()));
        let base = match &file {
            Some(path) => Self::load(path)?,
            None => Self::default(),
        };
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        let (cfg, env) = base.with_env_overrides(vars)?;
        cfg.validate()?;
        Ok((cfg, ConfigSource { file, env }))
    }

    /// Applies `DEVGATE_…` overrides from `vars`; returns the configuration and the
    /// variables used. Single-word variables that are not top-level keys
    /// (`DEVGATE_CONFIG`, `DEVGATE_LOG`) are not configuration and are skipped;
    /// `DEVGATE_<SECTION>__<KEY>` must name a key.
    pub fn with_env_overrides(
        self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        if vars.is_empty() {
            return Ok((self, Vec::new()));
        }
        vars.sort();
        let mut table = match toml::Value::try_from(&self) {
            Ok(toml::Value::Table(t)) => t,
            _ => return Ok((self, Vec::new())),
        };
        let mut cfg = self;
        let mut applied = Vec::new();
        for (var, raw) in vars {
            let err = |message: String| ConfigError::Env {
                var: var.clone(),
                message,
            };
            let path: Vec<String> = var[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            if path.len() == 1 && !table.contains_key(&path[0]) {
                continue;
            }
            let Some((key, sections)) = path.split_last() else {
                continue;
            };
            if path.iter().any(String::is_empty) {
                return Err(err("empty key name (DEVGATE_<SECTION>__<KEY>)".to_owned()));
            }
            let mut t = &mut table;
            for s in sections {
                t = match t.get_mut(s) {
                    Some(toml::Value::Table(inner)) => inner,
                    _ => return Err(err(format!("no section [{s}] in the configuration"))),
                };
            }
            let value = env_value(t.get(key), &raw)
                .map_err(|m| err(format!("key {}: {m}", path.join("."))))?;
            t.insert(key.clone(), value);
            // Read back after each variable so that an error names the variable at fault.
            cfg = toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| err(e.to_string().trim_end().replace('\n', " ")))?;
            applied.push(var);
        }
        Ok((cfg, applied))
    }
}

impl Config {
    /// Reads and validates a TOML file; keys not given keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_error_message(&text, &e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks value ranges that the type system cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let l = &self.limits;
        if l.handshake_timeout_ms < 100 {
            return Err(invalid(
                "limits.handshake_timeout_ms",
                "must be at least 100 ms",
            ));
        }
        if !(1024..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&l.max_message_bytes) {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if l.queue_bytes < l.max_message_bytes {
            return Err(invalid(
                "limits.queue_bytes",
                "must be at least limits.max_message_bytes so that one largest frame fits",
            ));
        }
        if l.queue_hard_bytes < l.queue_bytes {
            return Err(invalid(
                "limits.queue_hard_bytes",
                "must be at least limits.queue_bytes",
            ));
        }
        if l.max_pending_requests == 0 {
            return Err(invalid("limits.max_pending_requests", "must be at least 1"));
        }
        if l.request_timeout_ms < 100 {
            return Err(invalid(
                "limits.request_timeout_ms",
                "must be at least 100 ms",
            ));
        }
        if l.stream_window_cap < 1024 {
            return Err(invalid("limits.stream_window_cap", "must be at least 1024"));
        }
        if l.session_reserve_percent > 90 {
            return Err(invalid(
                "limits.session_reserve_percent",
                "must be at most 90 (unauthenticated connections need room to become sessions)",
            ));
        }
        if self.keepalive.ping_interval_ms < 100 {
            return Err(invalid(
                "keepalive.ping_interval_ms",
                "must be at least 100 ms",
            ));
        }
        self.tls.suites()?;
        self.xdp.validate()?;
        crate::proxy_proto::Networks::parse(&self.proxy_protocol_from)
            .map_err(|m| invalid("proxy_protocol_from", m))?;
        if self.limits.device_limit_scope == DeviceLimitScope::Fleet && self.store.url.is_none() {
            return Err(invalid(
                "limits.device_limit_scope",
                "\"fleet\" needs the shared PostgreSQL store ([store] url); the SQLite store belongs to one instance",
            ));
        }
        if let Some(url) = &self.store.url {
            crate::store::postgres::parse_url(url).map_err(|m| invalid("store.url", m))?;
        }
        if self.workers > 1024 {
            return Err(invalid(
                "workers",
                "must be at most 1024 (0 = one per core)",
            ));
        }
        if matches!(self.handshake_workers, HandshakeWorkers::Count(n) if n > 1024) {
            return Err(invalid(
                "handshake_workers",
                "must be at most 1024 (0 = handshakes on the routing workers; unset = as many as workers)",
            ));
        }
        Ok(())
    }

    /// Where the admin listener's bearer token is read from.
    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(ADMIN_TOKEN_FILE))
    }

    /// Whether the admin listener requires the bearer token.
    pub fn admin_requires_token(&self) -> bool {
        self.admin_auth == AdminAuth::Token || !self.admin.ip().is_loopback()
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Handshake worker threads to start (see `handshake_workers`).
    pub fn handshake_worker_count(&self) -> usize {
        match self.handshake_workers {
            HandshakeWorkers::Auto => self.worker_count(),
            HandshakeWorkers::Count(n) => n,
        }
    }

    /// The configuration as TOML, for `devgate config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_url_and_proxy_networks_are_checked_and_the_password_never_shown() {
        let mut c = Config::default();
        c.store.url = Some("postgres://dg:s3cret@db.example:5432/devgate".into());
        c.proxy_protocol_from = vec!["10.0.0.0/8".into()];
        c.validate().expect("valid");
        let shown = c.to_toml();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://dg:***@db.example:5432/devgate"),
            "{shown}"
        );
        assert_eq!(
            redact_url("host=db password=x user=dg"),
            "host=db password=*** user=dg"
        );
        c.store.url = Some("mysql://nope".into());
        assert!(
            c.validate()
                .expect_err("invalid")
                .to_string()
                .contains("store.url")
        );
        c.store.url = Some("postgres://dg@db/devgate?sslmode=require".into());
        assert!(
            c.validate()
                .expect_err("invalid")
                .to_string()
                .contains("sslrootcert")
        );
        c.store.url = Some("postgres://dg@db/devgate?sslrootcert=/nonexistent.pem".into());
        assert!(
            c.validate()
                .expect_err("invalid")
                .to_string()
                .contains("sslmode")
        );
        c.store.url = None;
        c.proxy_protocol_from = vec!["10.0.0.0/40".into()];
        assert!(
            c.validate()
                .expect_err("invalid")
                .to_string()
                .contains("proxy_protocol_from")
        );
    }

    #[test]
    fn defaults_are_valid_and_roundtrip() {
        let cfg = Config::default();
        cfg.validate().expect("defaults valid");
        let back: Config = toml::from_str(&cfg.to_toml()).expect("roundtrip");
        assert_eq!(back.listen, cfg.listen);
        assert_eq!(back.limits.queue_bytes, cfg.limits.queue_bytes);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml::from_str::<Config>("[limits]\ndevice_limt = 3\n").expect_err("typo");
        assert!(err.to_string().contains("device_limt"), "{err}");
    }

    #[test]
    fn file_errors_name_the_dotted_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "workers = 2\n\n[limits]\ndevice_limit = \"x\"\n").expect("write");
        let err = Config::load(&path).expect_err("wrong type").to_string();
        assert!(err.contains("key limits.device_limit (line 4)"), "{err}");
        std::fs::write(&path, "[keepalive]\nping_intervl_ms = 5\n").expect("write");
        let err = Config::load(&path).expect_err("typo").to_string();
        assert!(err.contains("keepalive.ping_intervl_ms"), "{err}");
    }

    #[test]
    fn environment_overrides_keys_by_type_and_names_the_variable_at_fault() {
        let vars = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let (cfg, used) = Config::default()
            .with_env_overrides(vars(&[
                ("DEVGATE_LIMITS__DEVICE_LIMIT", "50000"),
                ("DEVGATE_LISTEN", "0.0.0.0:443"),
                ("DEVGATE_LOG", "debug"),
                ("DEVGATE_CONFIG", "/x.toml"),
                ("OTHER", "1"),
            ]))
            .expect("valid overrides");
        assert_eq!(cfg.limits.device_limit, 50_000);
        assert_eq!(cfg.listen.port(), 443);
        assert_eq!(used, ["DEVGATE_LIMITS__DEVICE_LIMIT", "DEVGATE_LISTEN"]);
        for (var, value, needle) in [
            (
                "DEVGATE_LIMITS__DEVICE_LIMIT",
                "many",
                "expected an integer",
            ),
            ("DEVGATE_LIMITS__DEVICE_LIMT", "1", "device_limt"),
            ("DEVGATE_NOPE__X", "1", "no section [nope]"),
            ("DEVGATE_LIMITS", "1", "section"),
            ("DEVGATE_LISTEN", "not an address", "DEVGATE_LISTEN"),
        ] {
            let err = Config::default()
                .with_env_overrides(vars(&[(var, value)]))
                .map(|_| ())
                .expect_err(var)
                .to_string();
            assert!(err.contains(var) && err.contains(needle), "{var}: {err}");
        }
    }

    #[test]
    fn out_of_range_value_names_key() {
        let mut cfg = Config::default();
        cfg.keepalive.ping_interval_ms = 1;
        let err = cfg.validate().expect_err("too small");
        assert!(
            err.to_string().contains("keepalive.ping_interval_ms"),
            "{err}"
        );
    }
}
