//! `pty.user`: the agent (as root) runs the terminal's shell as the configured user, as a
//! login would: that uid, its primary and supplementary groups, HOME/USER/LOGNAME/SHELL, the
//! home directory, the terminal owned by the user. The user is one the test creates
//! (useradd); without root the test is skipped, or fails under DEVGATE_REQUIRE_TOOLS.

mod remote_common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};
use remote_common::{Remote, text};

/// A user and a supplementary group made with useradd/groupadd; removed when dropped.
struct TestUser {
    name: String,
    group: String,
}

impl TestUser {
    fn create() -> Result<Self> {
        let id = std::process::id();
        let user = Self {
            name: format!("dgpty{id}"),
            group: format!("dgptyg{id}"),
        };
        // Left over from a run that was killed before it could clean up.
        let _ = Command::new("userdel")
            .args(["--remove", &user.name])
            .output();
        let _ = Command::new("groupdel").arg(&user.group).output();
        run(Command::new("groupadd").arg(&user.group))?;
        run(Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--groups"])
            .args([&user.group, &user.name]))?;
        Ok(user)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel")
            .args(["--remove", &self.name])
            .output();
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {:?}", text(&out));
    Ok(())
}

/// Whether the test can create users and the agent can switch to them.
fn running_as_root() -> Result<bool> {
    if is_root() {
        return Ok(true);
    }
    if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
        bail!("the pty.user test must run as root (it creates a user and switches to it)");
    }
    eprintln!("SKIPPED: not root: the pty.user test creates a user and switches to it");
    Ok(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `devgate-ctl shell UNIT` with `input` as its (non-terminal) standard input.
fn shell(r: &Remote, input: &str) -> Result<Output> {
    let mut child = r
        .ctl(&["shell", &r.unit])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[test]
fn the_shell_runs_as_the_configured_user_with_its_groups_and_environment() -> Result<()> {
    if !running_as_root()? {
        return Ok(());
    }
    let user = TestUser::create()?;
    let r = Remote::start(&format!(
        "[pty]\nshell = \"/bin/sh\"\nuser = \"{}\"\n",
        user.name
    ))?;
    // Each answer is tagged, so that the terminal's echo of the typed line (which shows the
    // commands, not their output) cannot match.
    let out = shell(
        &r,
        "echo \"U=$(id -un) G=$(id -gn)\"; echo \"S=$(id -Gn)\"; \
         echo \"E=$HOME:$USER:$LOGNAME:$SHELL\"; echo \"D=$(pwd)\"; \
         echo \"T=$(stat -c %U \"$(tty)\")\"; exit 0\n",
    )?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.success(), "shell: {:?} {stderr}", out.status);
    let home = format!("/home/{}", user.name);
    for want in [
        format!("U={} G={}", user.name, user.name),
        format!("E={home}:{0}:{0}:/bin/sh", user.name),
        format!("D={home}"),
        format!("T={}", user.name),
    ] {
        ensure!(
            stdout.lines().any(|l| l.trim_end() == want),
            "the shell did not print {want:?}:\n{stdout}"
        );
    }
    let groups = stdout
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("S="))
        .context(format!("no groups line:\n{stdout}"))?;
    ensure!(
        groups.split(' ').any(|g| g == user.group) && !groups.split(' ').any(|g| g == "root"),
        "the shell's groups are {groups:?}, expected {} and not root",
        user.group
    );
    Ok(())
}

#[test]
fn a_pty_user_that_does_not_exist_is_refused_with_the_reason() -> Result<()> {
    let r = Remote::start("[pty]\nshell = \"/bin/sh\"\nuser = \"no-such-user-dg\"\n")?;
    let out = shell(&r, "id\n")?;
    let (stdout, stderr) = text(&out);
    ensure!(
        out.status.code() == Some(255) && stderr.contains("\"no-such-user-dg\" does not exist"),
        "shell as a missing user: {:?} {stdout:?} {stderr}",
        out.status
    );
    Ok(())
}
