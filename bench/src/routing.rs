//! Routing workloads: one frame routed by the real sans-IO workers (`gateway::harness`),
//! TLS in and out included. Only the gateway's calls are counted: the harness runs every
//! worker call through a hook, which the measured leg sets to [`icount_gateway`] (the
//! function callgrind toggles on for these workloads) and the unmeasured legs (the other
//! half of the round trip, the clients' own TLS) to a plain call.

use anyhow::{Context, Result, bail, ensure};
use devgate_proto::frame::{Body, Frame};
use gateway::harness::{ClientId, Harness};

/// The routing workloads, in report order.
pub const ROUTING_WORKLOADS: &[&str] = &[
    "route_command_cross_worker",
    "route_response_same_worker",
    "route_response_cross_worker",
];

/// The symbol callgrind counts for the routing workloads (see `devgate-bench icount`).
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "Rust" fn icount_gateway(f: &mut dyn FnMut()) {
    f();
}

fn uncounted(f: &mut dyn FnMut()) {
    f();
}

const UNIT: &str = "00:E0:C5:12:34:56";
static PAYLOAD: [u8; 64] = [0x5a; 64];

/// Which leg of a command round trip is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    Command,
    Response,
}

/// A manager and a device connected to a harness, and the leg to count.
pub struct Routing {
    h: Harness,
    mgr: ClientId,
    dev: ClientId,
    mgr_worker: usize,
    dev_worker: usize,
    leg: Leg,
    next_id: u32,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("leg", &self.leg)
            .finish_non_exhaustive()
    }
}

impl Routing {
    /// Sets up workload `name` (one of [`ROUTING_WORKLOADS`]).
    pub fn new(name: &str) -> Result<Self> {
        let (leg, mgr_worker, dev_worker) = match name {
            "route_command_cross_worker" => (Leg::Command, 0, 1),
            "route_response_same_worker" => (Leg::Response, 0, 0),
            "route_response_cross_worker" => (Leg::Response, 0, 1),
            other => bail!("unknown routing workload {other:?}"),
        };
        let dir = tempfile::tempdir().context("temporary data dir")?;
        let mut h = Harness::new(dir.path(), 2, |_| {})?;
        let mgr = h.manager("bench", mgr_worker)?;
        let dev = h.device(UNIT, dev_worker)?;
        h.take(mgr);
        Ok(Self {
            h,
            mgr,
            dev,
            mgr_worker,
            dev_worker,
            leg,
            next_id: 1,
            _dir: dir,
        })
    }

    /// Gateway side of one frame from `from` on worker `at` to a client on worker `to`.
    fn route(&mut self, from: ClientId, at: usize, to: usize, counted: bool) {
        self.h
            .set_hook(if counted { icount_gateway } else { uncounted });
        self.h.feed(from);
        if to != at {
            self.h.deliver(to);
        }
        self.h.flush(to);
        self.h.set_hook(uncounted);
    }

    /// One command round trip; the leg chosen at set-up is counted.
    pub fn round_trip(&mut self) -> Result<()> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.h.send(
            self.mgr,
            &Frame {
                id,
                unit: UNIT,
                body: Body::Command { payload: &PAYLOAD },
            },
        )?;
        self.route(
            self.mgr,
            self.mgr_worker,
            self.dev_worker,
            self.leg == Leg::Command,
        );
        self.h.absorb(self.dev);
        let got = self.h.take(self.dev);
        let [cmd] = got.as_slice() else {
            bail!(
                "the device got {} messages instead of one command",
                got.len()
            );
        };
        let device_id = cmd.frame()?.id;
        self.h.send(
            self.dev,
            &Frame {
                id: device_id,
                unit: "",
                body: Body::Response { payload: &PAYLOAD },
            },
        )?;
        self.route(
            self.dev,
            self.dev_worker,
            self.mgr_worker,
            self.leg == Leg::Response,
        );
        self.h.absorb(self.mgr);
        let got = self.h.take(self.mgr);
        let [resp] = got.as_slice() else {
            bail!(
                "the manager got {} messages instead of one response",
                got.len()
            );
        };
        let resp = resp.frame()?;
        ensure!(
            resp.id == id && matches!(resp.body, Body::Response { .. }),
            "the manager got {resp:?} for command {id}"
        );
        Ok(())
    }
}
