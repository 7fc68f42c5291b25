//! Commands a manager runs on the device (PROTOCOL.md section 11.4): only names on the
//! allow-list, run directly from their configured argv (no shell, so nothing the manager
//! sends is interpreted), with a timeout and a cap on the output kept.

use std::process::Stdio;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{CommandSpec, Config};

#[derive(Debug, Deserialize)]
struct Request {
    op: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Vec<String>,
}

/// Answers one Command payload with a Response payload (JSON).
pub(crate) async fn answer(config: &Config, payload: &[u8]) -> Vec<u8> {
    let reply = match serde_json::from_slice::<Request>(payload) {
        Err(e) => refusal(format!(
            "the command is not a devgate-agent request ({e}); expected \
             {{\"op\":\"run\",\"name\":NAME,\"args\":[…]}}"
        )),
        Ok(req) if req.op != "run" => {
            refusal(format!("unknown op {:?}; this agent knows \"run\"", req.op))
        }
        Ok(req) => match config.commands.get(&req.name) {
            None => {
                tracing::warn!(command = %req.name, "refused: command not on the allow-list");
                refusal(format!(
                    "command {:?} is not on this device's allow-list",
                    req.name
                ))
            }
            Some(spec) if !req.args.is_empty() && !spec.allow_args => refusal(format!(
                "command {:?} takes no arguments on this device (allow_args is off)",
                req.name
            )),
            Some(spec) => run(&req.name, spec, &req.args).await,
        },
    };
    reply.to_string().into_bytes()
}

fn refusal(error: String) -> Value {
    json!({"ok": false, "error": error})
}

async fn run(name: &str, spec: &CommandSpec, extra: &[String]) -> Value {
    let Some((program, args)) = spec.argv.split_first() else {
        return refusal(format!("command {name:?} has an empty argv"));
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return refusal(format!("command {name:?}: cannot start {program:?}: {e}")),
    };
    tracing::info!(command = name, "running command");
    let cap = spec.max_output_bytes;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_task = tokio::spawn(read_capped(stdout, cap));
    let err_task = tokio::spawn(read_capped(stderr, cap));
    let status = tokio::time::timeout(spec.timeout(), child.wait()).await;
    let timed_out = status.is_err();
    if timed_out {
        let _ = child.kill().await;
    }
    let (stdout, out_cut) = out_task.await.unwrap_or_default();
    let (stderr, err_cut) = err_task.await.unwrap_or_default();
    let exit_code = match status {
        Ok(Ok(s)) => exit_code(s),
        Ok(Err(e)) => return refusal(format!("command {name:?}: waiting for it failed: {e}")),
        Err(_) => {
            return json!({
                "ok": false,
                "error": format!("command {name:?} timed out after {} s and was killed", spec.timeout_secs),
                "stdout": String::from_utf8_lossy(&stdout),
                "stderr": String::from_utf8_lossy(&stderr),
            });
        }
    };
    json!({
        "ok": true,
        "exit_code": exit_code,
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
        "truncated": out_cut || err_cut,
    })
}

/// Exit code, or 128 + N when signal N ended the process (as a shell reports it).
pub(crate) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Reads everything, keeping the first `cap` bytes (reading on, so the child never blocks
/// on a full pipe).
async fn read_capped<R: AsyncRead + Unpin>(r: Option<R>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut r) = r else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut cut = false;
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
        cut |= n > room;
    }
    (kept, cut)
}
