//! Manager connections that come back: file transfers outlive a gateway restart, so a
//! gateway whose connection ended is connected again (at most once a second, by whichever
//! transfer needs it first) while the others keep running on theirs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use devgate_client::{ClientError, DevgateStream, ErrorCode, Mux};
use tokio::time::Instant;

use crate::gateways::{self, Gateway};

/// How long one connection attempt or one stream open may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two connection attempts to one gateway.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Why a stream could not be opened.
#[derive(Debug)]
pub(crate) enum OpenFailure {
    /// The device refused it as not allowed: trying again will not help.
    Refused(String),
    /// Not now (device not connected, gateway away, device busy): worth another try.
    Transient(String),
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(r) | Self::Transient(r) => f.write_str(r),
        }
    }
}

#[derive(Clone)]
struct Live {
    mux: Arc<Mux>,
    /// Set by the task that drains the connection's other frames once it has ended.
    ended: Arc<AtomicBool>,
}

struct Slot {
    label: String,
    state: tokio::sync::Mutex<SlotState>,
}

struct SlotState {
    live: Option<Live>,
    last_try: Option<Instant>,
}

/// Every `--gateway`, each connected again when its connection ends.
pub(crate) struct Link {
    slots: Vec<Slot>,
    tls: Arc<rustls::ClientConfig>,
    /// `--proxy`, for reconnections.
    proxy: Option<String>,
}

impl Link {
    /// Takes over the connections made at start (`connected`) for the gateways `labels`.
    pub(crate) fn new(
        labels: &[String],
        connected: Vec<Gateway>,
        tls: Arc<rustls::ClientConfig>,
        proxy: Option<String>,
    ) -> Self {
        let mut connected: Vec<Option<Gateway>> = connected.into_iter().map(Some).collect();
        let slots = labels
            .iter()
            .map(|label| {
                let gw = connected
                    .iter_mut()
                    .find(|g| g.as_ref().is_some_and(|g| &g.label == label))
                    .and_then(Option::take);
                Slot {
                    label: label.clone(),
                    state: tokio::sync::Mutex::new(SlotState {
                        live: gw.map(live),
                        last_try: None,
                    }),
                }
            })
            .collect();
        Self { slots, tls, proxy }
    }

    /// Opens a stream to `unit` on whichever gateway has it.
    pub(crate) async fn open(
        &self,
        unit: &str,
        params: &str,
    ) -> Result<DevgateStream, OpenFailure> {
        let mut why = Vec::new();
        for slot in &self.slots {
            let Some(conn) = self.connection(slot).await else {
                why.push(format!("{}: not connected", slot.label));
                continue;
            };
            match tokio::time::timeout(OPEN_TIMEOUT, conn.mux.open_stream(unit, params.as_bytes()))
                .await
            {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(ClientError::StreamRefused { code, .. }))
                    if code == u16::from(ErrorCode::DeviceNotConnected) =>
                {
                    why.push(format!("{}: device not connected", slot.label));
                }
                Ok(Err(ClientError::StreamRefused { code, reason }))
                    if code == u16::from(ErrorCode::NotPermitted) =>
                {
                    return Err(OpenFailure::Refused(format!("device refused: {reason}")));
                }
                Ok(Err(ClientError::StreamRefused { code, reason })) => {
                    return Err(OpenFailure::Transient(format!(
                        "{}: {} ({reason})",
                        slot.label,
                        ErrorCode::from(code).as_str()
                    )));
                }
                Ok(Err(e)) => why.push(format!("{}: {e}", slot.label)),
                Err(_) => why.push(format!("{}: no answer within {OPEN_TIMEOUT:?}", slot.label)),
            }
        }
        Err(OpenFailure::Transient(why.join("; ")))
    }

    /// The gateway's connection, connecting again if it ended (not more than once a second).
    async fn connection(&self, slot: &Slot) -> Option<Live> {
        let mut st = slot.state.lock().await;
        if let Some(l) = &st.live
            && !l.ended.load(Ordering::Relaxed)
        {
            return Some(l.clone());
        }
        st.live = None;
        if st.last_try.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
            return None;
        }
        st.last_try = Some(Instant::now());
        match tokio::time::timeout(
            OPEN_TIMEOUT,
            gateways::connect_one(&slot.label, self.tls.clone(), self.proxy.as_deref()),
        )
        .await
        {
            Ok(Ok(gw)) => {
                let l = live(gw);
                st.live = Some(l.clone());
                Some(l)
            }
            Ok(Err(e)) => {
                tracing_line(&format!("gateway {}: {e:#}", slot.label));
                None
            }
            Err(_) => None,
        }
    }
}

fn live(mut gw: Gateway) -> Live {
    let ended = Arc::new(AtomicBool::new(false));
    // Nobody reads the other frames while streams run: drain them so they never back up,
    // and learn from them when the connection has ended.
    let mut frames = gw.mux.frames();
    let flag = ended.clone();
    tokio::spawn(async move {
        while frames.next().await.is_ok() {}
        flag.store(true, Ordering::Relaxed);
    });
    Live {
        mux: Arc::new(gw.mux),
        ended,
    }
}

/// Reconnection trouble goes to stderr only when someone watches (the per-device table
/// says what failed in the end).
fn tracing_line(line: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!("\r\x1b[Kdevgate-ctl: {line}");
    }
}
