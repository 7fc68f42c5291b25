//! `devgate install` / `devgate uninstall`: set the gateway up as a systemd service on a
//! machine without the Debian package (the package does the same with its own files).
//!
//! Both are idempotent: every step first looks at what is there and says what it did
//! ("written", "unchanged", "kept", "removed", "absent"). Operator data is never touched
//! without being asked: an existing config file is kept, state is kept on uninstall
//! unless `--purge`.
//!
//! `--root DIR` stages everything under DIR instead of `/` (for tests and image builds):
//! no user is created and systemd is not called.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The unit file, as packaged (ExecStart=/usr/bin/devgate).
pub const UNIT: &str = include_str!("../../../packaging/devgate.service");
/// The default configuration file, as packaged (every key commented, at its default).
pub const DEFAULT_CONFIG: &str = include_str!("../../../packaging/devgate.toml");
/// The packaged `/etc/default/devgate`.
pub const DEFAULT_ENV: &str = include_str!("../../../packaging/default.env");

/// The service user.
pub const USER: &str = "devgate";
/// Binary path used by the Debian package.
pub const PACKAGED_BIN: &str = "/usr/bin/devgate";
/// Binary path used by `devgate install`.
pub const INSTALLED_BIN: &str = "/usr/local/bin/devgate";
/// Where `devgate install` puts the unit (the package uses /lib/systemd/system).
pub const UNIT_PATH: &str = "/etc/systemd/system/devgate.service";
/// Configuration directory and file.
pub const CONFIG_DIR: &str = "/etc/devgate";
/// Configuration file.
pub const CONFIG_PATH: &str = "/etc/devgate/devgate.toml";
/// State directory.
pub const STATE_DIR: &str = "/var/lib/devgate";
/// Environment file of the unit.
pub const ENV_PATH: &str = "/etc/default/devgate";
/// dpkg's file list of the package: present when the Debian package is installed.
const DPKG_LIST: &str = "/var/lib/dpkg/info/devgate.list";

/// Options of `devgate install`.
#[derive(clap::Args, Debug)]
pub struct InstallOpts {
    /// Also create the PKI in /var/lib/devgate for these host names and IP addresses
    /// (comma-separated), unless one exists.
    #[arg(long, value_delimiter = ',')]
    pub name: Vec<String>,
    /// Install and enable, but do not start (or restart) the service.
    #[arg(long)]
    pub no_start: bool,
    /// Stage under this directory instead of `/` (no user, no systemctl).
    #[arg(long)]
    pub root: Option<PathBuf>,
}

/// Options of `devgate uninstall`.
#[derive(clap::Args, Debug)]
pub struct UninstallOpts {
    /// Also remove the state (/var/lib/devgate: keys and certificates), the configuration
    /// (/etc/devgate, /etc/default/devgate) and the devgate user.
    #[arg(long)]
    pub purge: bool,
    /// Operate under this directory instead of `/` (no user, no systemctl).
    #[arg(long)]
    pub root: Option<PathBuf>,
}

struct Target {
    root: PathBuf,
    staged: bool,
}

impl Target {
    fn new(root: Option<PathBuf>) -> Result<Self> {
        let staged = root.is_some();
        if !staged && !is_root() {
            bail!("must run as root (sudo devgate …), or pass --root DIR to stage the files");
        }
        Ok(Self {
            root: root.unwrap_or_else(|| PathBuf::from("/")),
            staged,
        })
    }

    /// `path` (absolute) under the root.
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn systemd_running(&self) -> bool {
        !self.staged && Path::new("/run/systemd/system").is_dir()
    }
}

fn step(what: &str, result: &str) {
    println!("  {what:<44} {result}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Writes `contents` to `path` unless it already holds exactly that; returns whether it
/// wrote. Writes go to a temporary file first so that a crash never leaves half a file.
fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).ok().as_deref() == Some(contents) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("devgate-tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn user_exists() -> bool {
    Command::new("getent")
        .args(["passwd", USER])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The unit as `devgate install` writes it: the packaged one, pointing at `bin`.
pub fn unit_for(bin: &str) -> String {
    UNIT.replace(
        &format!("ExecStart={PACKAGED_BIN} "),
        &format!("ExecStart={bin} "),
    )
}

/// `devgate install`.
pub fn install(opts: &InstallOpts) -> Result<()> {
    let t = Target::new(opts.root.clone())?;
    println!("Installing devgate under {}", t.root.display());
    if !t.staged && Path::new(DPKG_LIST).exists() {
        bail!(
            "devgate is installed by the Debian package here; it already set up the service (use apt to upgrade or remove it)"
        );
    }

    // 1. The binary: this executable, copied to /usr/local/bin.
    let exe = std::env::current_exe().context("locating the running executable")?;
    let bin = t.at(INSTALLED_BIN);
    let same_file = std::fs::canonicalize(&exe).ok() == std::fs::canonicalize(&bin).ok();
    let bin_changed = if same_file {
        step(INSTALLED_BIN, "unchanged (running from it)");
        false
    } else {
        let bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
        let wrote = write_if_changed(&bin, &bytes, 0o755)?;
        step(INSTALLED_BIN, if wrote { "written" } else { "unchanged" });
        wrote
    };

    // 2. The service user.
    if t.staged {
        step(&format!("user {USER}"), "skipped (--root)");
    } else if user_exists() {
        step(&format!("user {USER}"), "exists");
    } else {
        run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--home-dir",
            STATE_DIR,
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "devgate gateway",
            USER,
        ]))?;
        step(&format!("user {USER}"), "created");
    }

    // 3. Configuration: the documented defaults, never overwriting the operator's file.
    let config = t.at(CONFIG_PATH);
    if config.exists() {
        step(CONFIG_PATH, "kept");
    } else {
        write_if_changed(&config, DEFAULT_CONFIG.as_bytes(), 0o644)?;
        step(CONFIG_PATH, "written (defaults)");
    }
    let env = t.at(ENV_PATH);
    if env.exists() {
        step(ENV_PATH, "kept");
    } else {
        write_if_changed(&env, DEFAULT_ENV.as_bytes(), 0o644)?;
        step(ENV_PATH, "written");
    }

    // 4. The unit.
    let unit_changed =
        write_if_changed(&t.at(UNIT_PATH), unit_for(INSTALLED_BIN).as_bytes(), 0o644)?;
    step(
        UNIT_PATH,
        if unit_changed { "written" } else { "unchanged" },
    );

    // 5. State directory and, if asked, the PKI (owned by the service user, which must
    //    read the keys).
    let state = t.at(STATE_DIR);
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750))?;
    }
    let pki = devgate_pki::PkiPaths::new(&state);
    let has_pki = pki.server_cert().exists();
    if has_pki {
        step("PKI", "kept");
    } else if opts.name.is_empty() {
        step("PKI", "none yet (pass --name, or run devgate init)");
    } else {
        let report = devgate_pki::init(
            &state,
            &devgate_pki::InitOptions {
                names: opts.name.clone(),
                force: false,
            },
        )?;
        step("PKI", "created");
        println!("Root fingerprint: {}", report.fingerprint);
    }
    if !t.staged {
        run(Command::new("chown")
            .args(["-R", &format!("{USER}:{USER}")])
            .arg(&state))?;
    }

    // 6. systemd.
    let has_pki = pki.server_cert().exists();
    if !t.systemd_running() {
        step(
            "systemd",
            if t.staged {
                "skipped (--root)"
            } else {
                "not running here: start devgate yourself"
            },
        );
    } else {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        run(Command::new("systemctl").args(["enable", "--quiet", "devgate.service"]))?;
        step("systemctl enable devgate", "done");
        if opts.no_start {
            step("systemctl start devgate", "skipped (--no-start)");
        } else if !has_pki {
            step("systemctl start devgate", "skipped (no PKI yet)");
        } else {
            let active = Command::new("systemctl")
                .args(["is-active", "--quiet", "devgate.service"])
                .status()
                .is_ok_and(|s| s.success());
            if !active {
                run(Command::new("systemctl").args(["start", "devgate.service"]))?;
                step("systemctl start devgate", "started");
            } else if unit_changed || bin_changed {
                // An upgrade: a graceful restart (devices reconnect with backoff).
                run(Command::new("systemctl").args(["restart", "devgate.service"]))?;
                step(
                    "systemctl restart devgate",
                    "restarted (new binary or unit)",
                );
            } else {
                step("systemctl start devgate", "already running");
            }
        }
    }

    println!("\nNext steps:");
    if !has_pki {
        println!(
            "  sudo -u {USER} {INSTALLED_BIN} init --data-dir {STATE_DIR} --name <host name>,<IP address>"
        );
        println!("  sudo systemctl start devgate");
    }
    println!("  devgate status                 # one-screen summary from the admin listener");
    println!("  journalctl -u devgate          # logs");
    println!(
        "  edit {CONFIG_PATH}, then: devgate config check {CONFIG_PATH} && sudo systemctl restart devgate"
    );
    Ok(())
}

fn remove_file(t: &Target, path: &str) -> Result<()> {
    let p = t.at(path);
    match std::fs::remove_file(&p) {
        Ok(()) => step(path, "removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => step(path, "absent"),
        Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
    }
    Ok(())
}

fn remove_dir(t: &Target, path: &str) -> Result<()> {
    let p = t.at(path);
    match std::fs::remove_dir_all(&p) {
        Ok(()) => step(path, "removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => step(path, "absent"),
        Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
    }
    Ok(())
}

/// `devgate uninstall`.
pub fn uninstall(opts: &UninstallOpts) -> Result<()> {
    let t = Target::new(opts.root.clone())?;
    println!("Uninstalling devgate under {}", t.root.display());
    if !t.staged && Path::new(DPKG_LIST).exists() {
        bail!(
            "devgate is installed by the Debian package here: use `apt remove devgate` (keeps state) or `apt purge devgate`"
        );
    }
    let unit = t.at(UNIT_PATH);
    if t.systemd_running() && unit.exists() {
        // Stops it gracefully (SIGTERM: sessions are closed with "going away").
        run(Command::new("systemctl").args(["disable", "--now", "--quiet", "devgate.service"]))?;
        step("systemctl disable --now devgate", "done");
    }
    remove_file(&t, UNIT_PATH)?;
    if t.systemd_running() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    remove_file(&t, INSTALLED_BIN)?;
    if opts.purge {
        remove_dir(&t, STATE_DIR)?;
        remove_dir(&t, CONFIG_DIR)?;
        remove_file(&t, ENV_PATH)?;
        if t.staged {
            step(&format!("user {USER}"), "skipped (--root)");
        } else if user_exists() {
            run(Command::new("userdel").arg(USER))?;
            step(&format!("user {USER}"), "removed");
        } else {
            step(&format!("user {USER}"), "absent");
        }
    } else {
        step(STATE_DIR, "kept (--purge removes it)");
        step(CONFIG_DIR, "kept (--purge removes it)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_for_rewrites_only_exec_start() {
        let unit = unit_for(INSTALLED_BIN);
        assert!(unit.contains("ExecStart=/usr/local/bin/devgate serve"));
        assert!(!unit.contains("ExecStart=/usr/bin/devgate"));
        assert_eq!(unit.lines().count(), UNIT.lines().count());
    }

    #[test]
    fn packaged_config_is_valid_and_at_the_defaults() {
        let cfg: crate::config::Config = toml::from_str(DEFAULT_CONFIG).expect("parses");
        assert_eq!(cfg.to_toml(), crate::config::Config::default().to_toml());
    }

    #[test]
    fn packaged_config_documents_every_key() {
        let defaults = crate::config::Config::default().to_toml();
        for line in defaults.lines() {
            let Some((key, value)) = line.split_once(" = ") else {
                continue;
            };
            let documented = format!("#{key} = {value}");
            assert!(
                DEFAULT_CONFIG.contains(&documented),
                "packaging/devgate.toml lacks `{documented}`"
            );
        }
    }
}
