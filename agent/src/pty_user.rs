//! Running the terminal's shell as `pty.user`, the way a login does it: the user's uid, its
//! primary group and every supplementary group from the system's user and group databases
//! (NSS: /etc/passwd and /etc/group, LDAP, …), a fresh environment (`HOME`, `USER`,
//! `LOGNAME`, `SHELL`, `PATH`, `TERM`), the home directory as working directory, and the
//! terminal owned by the user (as sshd and login do, so `tty`, `mesg` and programs that
//! reopen the terminal work).

use std::ffi::{CStr, CString};
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rustix::process::{Gid, Uid};

/// PATH for the user's shell (that of Debian's login.defs `ENV_PATH`).
const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games";
/// Environment passed through from the agent: locale and time zone only (the agent's own
/// environment may hold settings that are none of the user's business).
const PASSED_THROUGH: [&str; 3] = ["LANG", "LC_ALL", "TZ"];
/// Largest buffer offered to getpwnam_r/getgrnam_r (entries with huge member lists).
const MAX_ENTRY_BUFFER: usize = 1 << 20;
/// Most supplementary groups taken (Linux's NGROUPS_MAX).
const MAX_GROUPS: usize = 65536;

/// A user from the password database.
#[derive(Debug)]
pub(crate) struct User {
    name: String,
    uid: Uid,
    gid: Gid,
    home: PathBuf,
    /// Every group of the user, the primary one included.
    groups: Vec<Gid>,
}

/// Looks `name` up in the user database, with its groups, and checks that the agent can
/// start a shell as that user.
pub(crate) fn lookup(name: &str) -> Result<User> {
    let user = find(name)?;
    let euid = rustix::process::geteuid();
    if !euid.is_root() && euid != user.uid {
        bail!(
            "pty.user {:?} (uid {}) is another user, and the agent runs as uid {}, not root: \
             run the agent as root (the packaged unit does) or remove pty.user",
            user.name,
            user.uid.as_raw(),
            euid.as_raw()
        );
    }
    Ok(user)
}

fn find(name: &str) -> Result<User> {
    let cname = CString::new(name).with_context(|| format!("pty.user {name:?} has a NUL byte"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    // SAFETY: passwd is a plain C struct; all-zero is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    loop {
        // SAFETY: every pointer is valid for the call; buf's length is passed with it.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < MAX_ENTRY_BUFFER {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc))
                .with_context(|| format!("looking up pty.user {name:?}"));
        }
        break;
    }
    if found.is_null() {
        bail!(
            "pty.user {name:?} does not exist on this device (create it, e.g. `useradd -m \
             {name}`, or change pty.user in the agent's configuration)"
        );
    }
    // SAFETY: on success pw_dir points to a NUL-terminated string inside buf.
    let home = unsafe { CStr::from_ptr(pwd.pw_dir) }
        .to_string_lossy()
        .into_owned();
    let (uid, gid) = (pwd.pw_uid, pwd.pw_gid);
    Ok(User {
        name: name.to_owned(),
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(gid),
        home: PathBuf::from(home),
        groups: group_list(&cname, gid)?,
    })
}

/// The user's groups (getgrouplist: the primary group and every group listing the user).
fn group_list(name: &CStr, gid: libc::gid_t) -> Result<Vec<Gid>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: groups has room for count entries; name is NUL-terminated.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let needed = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(needed);
            return Ok(groups.into_iter().map(Gid::from_raw).collect());
        }
        // -1: too small, and count says how many there are.
        if needed <= groups.len() || needed > MAX_GROUPS {
            bail!(
                "listing the groups of pty.user {:?} failed",
                name.to_string_lossy()
            );
        }
        groups.resize(needed, 0);
    }
}

/// The gid of the group `tty` (terminals are owned by it, mode 0620), if there is one.
fn tty_group() -> Option<Gid> {
    let mut buf: Vec<libc::c_char> = vec![0; 16 * 1024];
    // SAFETY: group is a plain C struct; all-zero is a valid value to be overwritten.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf's length is passed with it.
    let rc = unsafe {
        libc::getgrnam_r(
            c"tty".as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then(|| Gid::from_raw(grp.gr_gid))
}

/// Makes `cmd` (the shell on the terminal `slave`) run as `user` (from [`lookup`]); when
/// `user` is the agent's own, only the environment is set.
///
/// Call it after any other `pre_exec` of `cmd`: the identity changes last, as root until then.
pub(crate) fn run_as(
    cmd: &mut tokio::process::Command,
    slave: impl AsFd,
    user: &User,
    shell: &str,
    term: &str,
) -> Result<()> {
    // lookup checked that the agent is root or already this user.
    let switch = rustix::process::geteuid().is_root() && !user.uid.is_root();
    if switch {
        rustix::fs::fchown(
            &slave,
            Some(user.uid),
            Some(tty_group().unwrap_or(user.gid)),
        )
        .context("giving the terminal to pty.user")?;
        rustix::fs::fchmod(&slave, rustix::fs::Mode::from_raw_mode(0o620))
            .context("setting the terminal's mode")?;
    }
    cmd.env_clear();
    for var in PASSED_THROUGH {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let home = if user.home.is_dir() {
        user.home.clone()
    } else {
        // As login does for a missing home directory.
        tracing::warn!(user = %user.name, home = %user.home.display(), "pty.user's home directory is missing; starting in /");
        PathBuf::from("/")
    };
    cmd.env("TERM", term)
        .env("HOME", &home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", shell)
        .env("PATH", USER_PATH)
        .current_dir(&home);
    if !switch {
        return Ok(());
    }
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: between fork and exec only the setgroups, setresgid and setresuid system calls
    // run, on memory prepared before the fork; nothing allocates. Groups first, then the
    // gid, then the uid: after the uid changes the others can no longer be changed.
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::set_thread_groups(&groups)?;
            rustix::thread::set_thread_res_gid(gid, gid, gid)?;
            rustix::thread::set_thread_res_uid(uid, uid, uid)?;
            Ok(())
        });
    }
    Ok(())
}
