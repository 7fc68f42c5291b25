//! A manager's connection to every instance of a fleet ([`Fleet`]).
//!
//! Several gateway instances behind one balancer share their store but not their devices:
//! a device is reachable only through the instance it is connected to. So a manager keeps
//! one connection per instance (a list of addresses, or every address one DNS name
//! resolves to: [`resolve_all`]), and [`Fleet`]
//!
//! - merges the instances' presence into one view ([`PresenceMerge`], the sans-IO part):
//!   [`Fleet::devices`], and [`FleetEvent::Presence`] changes in which a device that moves
//!   appears once;
//! - routes a command ([`Fleet::command`]) or a stream ([`Fleet::open_stream`]) to the
//!   instance that holds the device according to that view, and when that instance answers
//!   `device_not_connected` (the view was behind) or nothing claims the device, asks the
//!   other instances in turn;
//! - answers every request: a reply, a refusal, or an error. A request in flight on an
//!   instance whose connection ends fails at once with [`ClientError::InstanceLost`] (the
//!   device may or may not have acted on it, so it is not sent again elsewhere); one
//!   unanswered for [`FleetOptions::request_timeout`] fails with a timeout;
//! - reconnects to a lost instance with backoff and takes a fresh `list_devices` snapshot
//!   of it each time.

mod merge;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

pub use merge::{InstanceIndex, OfflineCause, PresenceChange, PresenceMerge};

use crate::{Backoff, Body, ClientError, ConnectOptions, DevgateStream, ErrorCode, Frame, Mux};

/// Page size of the `list_devices` snapshot (the gateway's largest).
const LIST_PAGE: u64 = 10_000;

/// How a [`Fleet`] behaves.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// How long a device whose instance stopped claiming it stays shown where it was,
    /// waiting to show up on another instance (see [`PresenceMerge`]). Zero shows it
    /// offline at once. Default 2 s.
    pub settle: Duration,
    /// Limit on waiting for one answer. Default 70 s, a little over the gateway's own
    /// request timeout (60 s) so that its `request_timeout` error arrives first.
    pub request_timeout: Duration,
    /// Reconnect delays to a lost instance (full jitter). Default 100 ms up to 5 s.
    pub reconnect_base: Duration,
    /// The largest reconnect delay.
    pub reconnect_cap: Duration,
    /// Whether [`Fleet::next_event`] gets events. A caller that never reads them turns
    /// them off, or they pile up.
    pub events: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(2),
            request_timeout: Duration::from_secs(70),
            reconnect_base: Duration::from_millis(100),
            reconnect_cap: Duration::from_secs(5),
            events: true,
        }
    }
}

/// What happens in the fleet, in order per instance.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    /// The merged view changed.
    Presence(PresenceChange),
    /// A device sent an Event.
    Event {
        /// The device.
        unit: String,
        /// The instance it came through.
        at: InstanceIndex,
        /// The event's bytes.
        payload: Bytes,
    },
    /// The connection to an instance is up (again) and its devices are in the view.
    InstanceUp(InstanceIndex),
    /// The connection to an instance ended; it is being reconnected.
    InstanceDown {
        /// The instance.
        at: InstanceIndex,
        /// Why.
        error: String,
    },
}

/// An instance's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The device's Response (for a command) or the gateway's Control reply.
    Reply(Bytes),
    /// An Error frame: the request failed with this code.
    Refused {
        /// The error code.
        code: ErrorCode,
        /// The gateway's message.
        message: String,
    },
}

/// A routed request's answer and the instance that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The instance that answered.
    pub at: InstanceIndex,
    /// Its answer.
    pub answer: Answer,
}

/// A request waiting for its answer; `snapshot` marks a `list_devices` whose devices go into
/// the view as the reply is read, before any later presence of the same connection (the
/// task that asked may run only after the read loop has moved on).
struct Pending {
    tx: oneshot::Sender<Result<Answer, ClientError>>,
    snapshot: bool,
}

#[derive(Default)]
struct Slot {
    mux: Option<Arc<Mux>>,
    /// Requests sent on this connection and not yet answered, by id.
    pending: HashMap<u32, Pending>,
}

struct State {
    merge: PresenceMerge,
    slots: Vec<Slot>,
}

struct Shared {
    instances: Vec<ConnectOptions>,
    labels: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
    opts: FleetOptions,
    state: Mutex<State>,
    next_id: AtomicU32,
    events: mpsc::UnboundedSender<FleetEvent>,
    /// Wakes the settle timer when a device starts settling.
    timer: Notify,
}

/// How one try of a request ended.
enum Attempt {
    Answered(Answer),
    /// Not sent (the instance is down, or the write failed): safe to try elsewhere.
    NotSent(ClientError),
    /// Sent, then no answer: the device may have acted on it.
    Lost(ClientError),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the view's changes out as events (under the state lock, so that they keep
    /// their order).
    fn drain(&self, st: &mut State) {
        while let Some(change) = st.merge.poll_change() {
            self.emit(FleetEvent::Presence(change));
        }
        if st.merge.poll_timeout().is_some() {
            self.timer.notify_one();
        }
    }

    fn emit(&self, ev: FleetEvent) {
        if self.opts.events {
            let _ = self.events.send(ev);
        }
    }

    fn next_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    /// Sends the frame `build(id)` to instance `at` and waits for its answer.
    async fn request_at<'f>(
        &self,
        at: InstanceIndex,
        snapshot: bool,
        build: impl Fn(u32) -> Frame<'f>,
    ) -> Attempt {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        let mux = {
            let mut st = self.lock();
            let Some(slot) = st.slots.get_mut(at) else {
                return Attempt::NotSent(ClientError::Config(format!(
                    "the fleet has no instance {at}"
                )));
            };
            let Some(mux) = slot.mux.clone() else {
                return Attempt::NotSent(ClientError::Fleet(format!(
                    "instance {} is not connected",
                    self.labels[at]
                )));
            };
            slot.pending.insert(id, Pending { tx, snapshot });
            mux
        };
        if let Err(e) = mux.sender().send(&build(id)).await {
            self.forget(at, id);
            return Attempt::NotSent(e);
        }
        match tokio::time::timeout(self.opts.request_timeout, rx).await {
            Ok(Ok(Ok(answer))) => Attempt::Answered(answer),
            Ok(Ok(Err(e))) => Attempt::Lost(e),
            Ok(Err(_)) => Attempt::Lost(ClientError::InstanceLost {
                instance: self.labels[at].clone(),
                reason: "the fleet connection was closed".to_owned(),
            }),
            Err(_) => {
                self.forget(at, id);
                Attempt::Lost(ClientError::Timeout(
                    "waiting for an answer from a fleet instance",
                ))
            }
        }
    }

    fn forget(&self, at: InstanceIndex, id: u32) {
        if let Some(slot) = self.lock().slots.get_mut(at) {
            slot.pending.remove(&id);
        }
    }

    fn complete(&self, at: InstanceIndex, id: u32, answer: Answer) {
        let mut st = self.lock();
        let Some(pending) = st.slots.get_mut(at).and_then(|s| s.pending.remove(&id)) else {
            return;
        };
        if pending.snapshot
            && let Answer::Reply(bytes) = &answer
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes)
        {
            let page = v["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str());
            st.merge.snapshot(Instant::now(), at, page);
            self.drain(&mut st);
        }
        drop(st);
        let _ = pending.tx.send(Ok(answer));
    }

    /// Instances to try for `unit`: the one holding it first, then the other connected
    /// ones in order.
    fn route(&self, unit: &str) -> Vec<InstanceIndex> {
        let st = self.lock();
        let up = |i: &InstanceIndex| st.slots[*i].mux.is_some();
        let first = st.merge.location(unit).filter(up);
        first
            .into_iter()
            .chain((0..st.slots.len()).filter(|i| Some(*i) != first && up(i)))
            .collect()
    }

    /// A connection to instance `at` came up.
    fn install(&self, at: InstanceIndex, mux: Arc<Mux>) {
        self.lock().slots[at].mux = Some(mux);
    }

    /// The connection to instance `at` ended: every request in flight on it fails, and its
    /// devices leave the view (unless they show up elsewhere within the settle time).
    fn uninstall(&self, at: InstanceIndex, error: &ClientError) {
        let mut st = self.lock();
        let slot = &mut st.slots[at];
        slot.mux = None;
        for (_, pending) in slot.pending.drain() {
            let _ = pending.tx.send(Err(ClientError::InstanceLost {
                instance: self.labels[at].clone(),
                reason: error.to_string(),
            }));
        }
        st.merge.instance_lost(Instant::now(), at);
        self.emit(FleetEvent::InstanceDown {
            at,
            error: error.to_string(),
        });
        self.drain(&mut st);
    }

    /// Reads instance `at`'s frames until its connection ends.
    async fn read_loop(&self, at: InstanceIndex, mux: &Mux) -> ClientError {
        let mut closing: Option<String> = None;
        loop {
            let r = match mux.next_frame().await {
                Ok(r) => r,
                Err(e) => {
                    return match closing {
                        Some(why) => ClientError::Fleet(format!("{why} ({e})")),
                        None => e,
                    };
                }
            };
            let f = r.frame();
            match f.body {
                Body::Presence { online, reason } => {
                    let mut st = self.lock();
                    st.merge
                        .presence(Instant::now(), at, f.unit, online, reason);
                    self.drain(&mut st);
                }
                Body::Event { payload } => self.emit(FleetEvent::Event {
                    unit: f.unit.to_owned(),
                    at,
                    payload: Bytes::copy_from_slice(payload),
                }),
                Body::Response { payload } | Body::Control { payload } if f.id != 0 => {
                    self.complete(at, f.id, Answer::Reply(Bytes::copy_from_slice(payload)));
                }
                Body::Error { code, message } if f.id != 0 => self.complete(
                    at,
                    f.id,
                    Answer::Refused {
                        code,
                        message: message.to_owned(),
                    },
                ),
                Body::Error {
                    code: ErrorCode::ShuttingDown,
                    message,
                } => closing = Some(format!("the instance is shutting down: {message}")),
                _ => {}
            }
        }
    }

    /// Loads instance `at`'s devices into the view with `list_devices`, page by page (the
    /// devices of each page are taken in by [`Shared::complete`]). Pages are by offset, so
    /// a device may be missed when devices leave during a listing of several pages (more
    /// than 10,000 devices on the instance); its next presence puts it right.
    async fn snapshot(&self, at: InstanceIndex) -> Result<(), ClientError> {
        let mut offset = 0u64;
        loop {
            let request =
                format!(r#"{{"op":"list_devices","offset":{offset},"limit":{LIST_PAGE}}}"#);
            let reply = match self
                .request_at(at, true, |id| Frame::control(id, request.as_bytes()))
                .await
            {
                Attempt::Answered(Answer::Reply(bytes)) => bytes,
                Attempt::Answered(Answer::Refused { code, message }) => {
                    return Err(ClientError::Fleet(format!(
                        "list_devices on {}: {} ({message})",
                        self.labels[at],
                        code.as_str()
                    )));
                }
                Attempt::NotSent(e) | Attempt::Lost(e) => return Err(e),
            };
            let v: serde_json::Value = serde_json::from_slice(&reply).map_err(|e| {
                ClientError::Protocol(format!("list_devices reply is not JSON: {e}"))
            })?;
            let n = v["devices"].as_array().map_or(0, Vec::len) as u64;
            offset += n;
            if n == 0 || offset >= v["total"].as_u64().unwrap_or(0) {
                return Ok(());
            }
        }
    }
}

/// One connection per instance of a fleet, with merged presence and routing (see the
/// module docs). Dropping it closes every connection.
#[derive(Debug)]
pub struct Fleet {
    shared: Arc<Shared>,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<FleetEvent>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("instances", &self.labels)
            .finish_non_exhaustive()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Every address `host` resolves to (A and AAAA), each with `port`, without duplicates.
pub async fn resolve_all(host: &str, port: u16) -> Result<Vec<SocketAddr>, ClientError> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ClientError::Fleet(format!("resolving {host}: {e}")))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(ClientError::Fleet(format!("{host} has no address")));
    }
    Ok(addrs)
}

impl Fleet {
    /// Connects to every instance (each [`ConnectOptions`] should have [`Role::Manager`]
    /// (crate::Role::Manager)) and loads their devices into the view. Returns once each
    /// instance has connected and been listed, or failed its first try; instances that
    /// failed are retried in the background. Fails only if none could be reached.
    pub async fn connect(
        instances: Vec<ConnectOptions>,
        tls: Arc<rustls::ClientConfig>,
        opts: FleetOptions,
    ) -> Result<Self, ClientError> {
        if instances.is_empty() {
            return Err(ClientError::Config(
                "a fleet needs at least one instance".into(),
            ));
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let labels = instances.iter().map(label).collect();
        let n = instances.len();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                merge: PresenceMerge::new(opts.settle),
                slots: (0..n).map(|_| Slot::default()).collect(),
            }),
            instances,
            labels,
            tls,
            opts,
            next_id: AtomicU32::new(1),
            events: events_tx,
            timer: Notify::new(),
        });
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let mut tasks: Vec<JoinHandle<()>> = (0..n)
            .map(|i| tokio::spawn(run_instance(shared.clone(), i, ready_tx.clone())))
            .collect();
        tasks.push(tokio::spawn(settle_timer(shared.clone())));
        drop(ready_tx);
        let fleet = Self {
            shared,
            events: tokio::sync::Mutex::new(events_rx),
            tasks,
        };
        let mut first: Vec<Option<Result<(), String>>> = vec![None; n];
        while first.iter().any(Option::is_none) {
            let Some((i, r)) = ready_rx.recv().await else {
                break;
            };
            if let Some(slot @ None) = first.get_mut(i) {
                *slot = Some(r);
            }
        }
        if !first.iter().any(|r| matches!(r, Some(Ok(())))) {
            let why: Vec<String> = first
                .iter()
                .enumerate()
                .map(|(i, r)| match r {
                    Some(Err(e)) => format!("{}: {e}", fleet.shared.labels[i]),
                    _ => fleet.shared.labels[i].clone(),
                })
                .collect();
            return Err(ClientError::Fleet(format!(
                "could not connect to any instance ({})",
                why.join("; ")
            )));
        }
        Ok(fleet)
    }

    /// Instance `at`'s name (its address, and the server name when that is not the
    /// address).
    pub fn label(&self, at: InstanceIndex) -> &str {
        self.shared.labels.get(at).map_or("?", String::as_str)
    }

    /// How many instances the fleet was built from.
    pub fn len(&self) -> usize {
        self.shared.labels.len()
    }

    /// Whether the fleet has no instances (never: [`Fleet::connect`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.shared.labels.is_empty()
    }

    /// Whether the connection to instance `at` is up.
    pub fn is_up(&self, at: InstanceIndex) -> bool {
        self.shared
            .lock()
            .slots
            .get(at)
            .is_some_and(|s| s.mux.is_some())
    }

    /// The merged view: every device online and its instance, sorted by unit ID.
    pub fn devices(&self) -> Vec<(String, InstanceIndex)> {
        let mut v: Vec<_> = self
            .shared
            .lock()
            .merge
            .online()
            .map(|(u, i)| (u.to_owned(), i))
            .collect();
        v.sort();
        v
    }

    /// The merged view, like [`Fleet::devices`], with every event queued so far discarded:
    /// [`Fleet::next_event`] continues exactly after this view (a watcher prints the view,
    /// then the changes, and sees each device once).
    pub async fn devices_then_events(&self) -> Vec<(String, InstanceIndex)> {
        let mut events = self.events.lock().await;
        // Events are queued under the state lock: none slips between the two.
        let st = self.shared.lock();
        while events.try_recv().is_ok() {}
        let mut v: Vec<_> = st.merge.online().map(|(u, i)| (u.to_owned(), i)).collect();
        drop(st);
        v.sort();
        v
    }

    /// Where the view has `unit`.
    pub fn location(&self, unit: &str) -> Option<InstanceIndex> {
        self.shared.lock().merge.shown(unit)
    }

    /// The next event (presence changes, device events, instances up and down). Cancel-safe.
    /// `None` only after the fleet's tasks ended.
    pub async fn next_event(&self) -> Option<FleetEvent> {
        self.events.lock().await.recv().await
    }

    /// Sends a Command to `unit` through the instance that holds it, or, if that one does
    /// not have it (or nothing claims it), through the others in turn. `Ok` carries the
    /// device's Response or the Error frame that ended the command (`device_not_connected`
    /// from the last instance asked when no instance has it). `Err` when it could not be
    /// sent anywhere, or the instance it was sent to was lost or did not answer in time.
    pub async fn command(&self, unit: &str, payload: &[u8]) -> Result<Routed, ClientError> {
        let mut last: Result<Routed, ClientError> = Err(ClientError::Fleet(
            "no instance of the fleet is connected".to_owned(),
        ));
        for at in self.shared.route(unit) {
            match self
                .shared
                .request_at(at, false, |id| Frame::command(unit, id, payload))
                .await
            {
                Attempt::Answered(answer) => {
                    let not_here = matches!(
                        answer,
                        Answer::Refused {
                            code: ErrorCode::DeviceNotConnected,
                            ..
                        }
                    );
                    last = Ok(Routed { at, answer });
                    if !not_here {
                        break;
                    }
                }
                Attempt::NotSent(e) => {
                    if last.is_err() {
                        last = Err(e);
                    }
                }
                Attempt::Lost(e) => return Err(e),
            }
        }
        last
    }

    /// Sends a Control request (JSON) to instance `at` and returns its reply.
    pub async fn control(&self, at: InstanceIndex, request: &str) -> Result<Answer, ClientError> {
        match self
            .shared
            .request_at(at, false, |id| Frame::control(id, request.as_bytes()))
            .await
        {
            Attempt::Answered(a) => Ok(a),
            Attempt::NotSent(e) | Attempt::Lost(e) => Err(e),
        }
    }

    /// Opens a stream to `unit` where the view has it, falling back to the other instances
    /// in turn when one answers `device_not_connected`.
    pub async fn open_stream(
        &self,
        unit: &str,
        params: &[u8],
    ) -> Result<(InstanceIndex, DevgateStream), ClientError> {
        let mut last = ClientError::Fleet("no instance of the fleet is connected".to_owned());
        for at in self.shared.route(unit) {
            let Some(mux) = self.shared.lock().slots[at].mux.clone() else {
                continue;
            };
            match mux.open_stream(unit, params).await {
                Ok(s) => return Ok((at, s)),
                Err(e @ ClientError::StreamRefused { code, .. })
                    if code == u16::from(ErrorCode::DeviceNotConnected) =>
                {
                    last = e;
                }
                Err(e @ ClientError::StreamRefused { .. }) => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

fn label(opts: &ConnectOptions) -> String {
    let addr = opts.addr.to_string();
    if opts.server_name == opts.addr.ip().to_string() {
        addr
    } else {
        format!("{} ({addr})", opts.server_name)
    }
}

/// Keeps instance `at` connected for as long as the fleet lives.
async fn run_instance(
    shared: Arc<Shared>,
    at: InstanceIndex,
    ready: mpsc::UnboundedSender<(InstanceIndex, Result<(), String>)>,
) {
    let mut backoff = Backoff::new(shared.opts.reconnect_base, shared.opts.reconnect_cap);
    loop {
        match crate::connect(&shared.instances[at], shared.tls.clone()).await {
            Ok(conn) => {
                backoff.reset();
                let mux = Arc::new(Mux::new(conn));
                shared.install(at, mux.clone());
                // The snapshot's replies come through the read loop below.
                let lister = {
                    let (shared, ready) = (shared.clone(), ready.clone());
                    tokio::spawn(async move {
                        let r = shared.snapshot(at).await;
                        if r.is_ok() {
                            shared.emit(FleetEvent::InstanceUp(at));
                        }
                        let _ = ready.send((at, r.map_err(|e| e.to_string())));
                    })
                };
                let error = shared.read_loop(at, &mux).await;
                lister.abort();
                shared.uninstall(at, &error);
                let _ = ready.send((at, Err(error.to_string())));
            }
            Err(e) => {
                let _ = ready.send((at, Err(e.to_string())));
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Shows offline the devices whose settle time passed.
async fn settle_timer(shared: Arc<Shared>) {
    loop {
        let due = shared.lock().merge.poll_timeout();
        match due {
            Some(t) => {
                tokio::select! {
                    () = tokio::time::sleep_until(t.into()) => {
                        let mut st = shared.lock();
                        st.merge.handle_timeout(Instant::now());
                        shared.drain(&mut st);
                    }
                    () = shared.timer.notified() => {}
                }
            }
            None => shared.timer.notified().await,
        }
    }
}
