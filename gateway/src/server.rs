//! `devgate serve`: loads the TLS material, binds the listeners, starts one data-path
//! worker per core and the control plane (admin listener, signals), and waits for
//! shutdown.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::config::{Config, DataPathChoice};
use crate::daemon::Daemon;
use crate::shared::{DataPath, Shared};
use crate::worker::Worker;

/// Listen backlog; large so that a reconnect storm queues in the kernel, not in SYN drops.
const BACKLOG: i32 = 4096;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Refuses to start on an address another process listens on. The workers' listeners use
/// `SO_REUSEPORT`, with which a second devgate (same user) would bind the same port without
/// an error and silently take half the connections; a probe socket without `SO_REUSEPORT`
/// does get `EADDRINUSE` from any listener there. Port 0 (any free port) needs no probe.
/// What it cannot see: a process that binds the port in the instant between this probe and
/// the real bind (both then share it).
fn ensure_address_free(addr: SocketAddr) -> Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating the listening socket")?;
    // Without SO_REUSEADDR, connections of a previous run in TIME_WAIT would count as "in use".
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    match socket.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "cannot listen on {addr}: another process already listens there (another devgate instance? its listeners share ports with SO_REUSEPORT, so this one refuses to start rather than silently split the connections with it); stop it, or give this instance another `listen` address"
        ),
        Err(e) => Err(e).with_context(|| {
            format!("cannot listen on {addr} (a port below 1024 without CAP_NET_BIND_SERVICE?)")
        }),
    }
}

/// The lock file that makes a data directory belong to one `devgate serve`.
pub fn lockfile(data_dir: &Path) -> PathBuf {
    data_dir.join("devgate.lock")
}

/// An exclusive `flock` on `<data_dir>/devgate.lock`, held while the value lives (the
/// kernel drops it when the process ends, however it ends, so a crash leaves no stale lock).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes the data directory's lock, or says which process holds it. Two gateways on one
/// data dir would both write the pid file (after which `devgate reload` signals the
/// wrong process) and the store.
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = lockfile(data_dir);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let holder = match text.trim().parse::<u32>() {
            Ok(pid) => format!("pid {pid}"),
            Err(_) => "a process that is still starting".to_owned(),
        };
        bail!(
            "data dir {} is in use by another devgate ({holder} holds {}): stop that instance first, or give this one its own --data-dir (the pid file was left alone)",
            data_dir.display(),
            path.display()
        );
    }
    // The holder's pid, for the message above (the pid file stays what `reload` reads).
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(DataDirLock { _file: file })
}

/// Binds one `SO_REUSEPORT` listener per worker on the same address (the first one
/// resolves port 0, so tests can ask for any free port).
pub fn bind_listeners(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .context("creating the listening socket")?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if addr.is_ipv6() {
            let _ = socket.set_only_v6(false);
        }
        socket.bind(&addr.into()).with_context(|| {
            format!("cannot listen on {addr} (in use, or a port below 1024 without CAP_NET_BIND_SERVICE?)")
        })?;
        socket
            .listen(BACKLOG)
            .with_context(|| format!("listen on {addr}"))?;
        let listener: TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Largest direct-descriptor table one io_uring worker registers.
const MAX_FILE_TABLE: u64 = 1 << 20;

/// Picks the I/O driver: io_uring if wanted and the kernel lets us, else epoll.
fn choose_data_path(choice: DataPathChoice) -> Result<DataPath> {
    match choice {
        DataPathChoice::Epoll => Ok(DataPath {
            name: "epoll",
            reason: Some("selected by configuration (data_path = \"epoll\")".into()),
        }),
        DataPathChoice::IoUring => match crate::driver::uring::probe() {
            Ok(()) => Ok(DataPath {
                name: "io_uring",
                reason: None,
            }),
            Err(reason) => bail!(
                "data_path = \"io_uring\" was asked for but {reason}; use data_path = \"auto\" or \"epoll\""
            ),
        },
        DataPathChoice::Auto => match crate::driver::uring::probe() {
            Ok(()) => Ok(DataPath {
                name: "io_uring",
                reason: None,
            }),
            Err(reason) => {
                warn!("io_uring unavailable, using the epoll data path: {reason}");
                Ok(DataPath {
                    name: "epoll",
                    reason: Some(reason),
                })
            }
        },
    }
}

/// Decides where TLS records are sealed after the handshake: the kernel if the config
/// allows it, the probe passes and the driver can hand its sockets over; else rustls.
fn choose_tls_offload(
    choice: crate::config::TlsOffloadChoice,
    data_path: &DataPath,
) -> crate::ktls::TlsOffload {
    use crate::ktls::TlsOffload;
    if choice == crate::config::TlsOffloadChoice::Off {
        return TlsOffload::user("disabled by config ([tls] offload = \"off\")");
    }
    let probed = crate::ktls::probe();
    if !probed.is_kernel() {
        info!(
            "kernel TLS offload unavailable: {}",
            probed.reason.as_deref().unwrap_or("?")
        );
        return probed;
    }
    if data_path.name == "io_uring" && !crate::driver::uring::defers_task_work() {
        let why = "the kernel has kTLS, but its io_uring lacks deferred task work (Linux 6.1), without which the io_uring driver cannot hand a socket over safely; records stay in rustls (data_path = \"epoll\" uses kTLS)";
        warn!("{why}");
        return TlsOffload::user(why);
    }
    info!(ciphers = ?probed.ciphers.names(), "kernel TLS offload on");
    probed
}

/// Runs the gateway until SIGTERM/SIGINT.
pub fn serve(config: Config) -> Result<()> {
    let nofile = raise_nofile_limit();
    let data_path = choose_data_path(config.data_path)?;
    let tls_offload = choose_tls_offload(config.tls.offload, &data_path);
    // rustls hands out traffic secrets only to sessions whose config allows it.
    crate::tls::set_secret_extraction(tls_offload.is_kernel());
    let tls = match crate::tls::load_with(&config.data_dir, &config.tls) {
        Ok(tls) => tls,
        // A data dir with CAs but no usable server chain: keep answering check-status (err).
        Err(e)
            if devgate_pki::PkiPaths::new(&config.data_dir)
                .device_ca_cert()
                .exists() =>
        {
            tracing::error!(
                "no usable server certificate ({e:#}): answering with a temporary self-signed one; check-status says err until a valid chain is installed (devgate cert renew or cert import, then devgate reload)"
            );
            crate::tls::without_server_certificate(&config.data_dir, &config.tls)?
        }
        Err(e) => return Err(e),
    };
    if !tls.server_cert_valid_at(crate::tls::unix_now()) {
        warn!(
            "the server certificate is outside its validity dates: check-status reports err until it is renewed"
        );
    }
    // Each io_uring worker keeps its sockets in its ring's own file table (direct
    // descriptors), which may be as large as RLIMIT_NOFILE; the epoll driver's sockets
    // all share the process's descriptor table.
    let table_size = u32::try_from(nofile.min(MAX_FILE_TABLE)).unwrap_or(u32::MAX);
    let mut workers = config.worker_count();
    if config.workers == 0
        && data_path.name == "io_uring"
        && !tls_offload.is_kernel()
        && config.limits.max_connections > 0
    {
        // Enough rings for the connections asked for, even where RLIMIT_NOFILE is low.
        let rings = config
            .limits
            .max_connections
            .div_ceil(u64::from(table_size.max(1)));
        let rings = usize::try_from(rings).unwrap_or(usize::MAX).min(1024);
        if rings > workers {
            info!(
                "{rings} workers (not {workers}): each holds at most {table_size} connections (RLIMIT_NOFILE) and limits.max_connections is {}",
                config.limits.max_connections
            );
            workers = rings;
        }
    }
    // With kernel TLS the io_uring driver keeps ordinary descriptors (setsockopt needs
    // one), so the process's table bounds it as it does epoll.
    let fd_bound = match data_path.name {
        "io_uring" if !tls_offload.is_kernel() => {
            u64::from(table_size).saturating_mul(workers as u64)
        }
        // Leave headroom for the listeners, the admin listener and files.
        _ => nofile.saturating_sub(64),
    };
    let max_connections = match config.limits.max_connections {
        0 => usize::try_from(fd_bound).unwrap_or(usize::MAX).max(64),
        n => usize::try_from(n).unwrap_or(usize::MAX),
    };
    // Before anything is bound or written: the data dir belongs to one instance.
    let _lock = lock_data_dir(&config.data_dir)?;
    ensure_address_free(config.listen)?;
    let admin_token = crate::admin_token::load_token(&config)?;
    let handshake_workers = config.handshake_worker_count();
    let handshake_priority = config.handshake_priority;
    // The listeners belong to the workers that accept: the handshake workers if there
    // are any, else the routing workers.
    let listeners = bind_listeners(
        config.listen,
        if handshake_workers > 0 {
            handshake_workers
        } else {
            workers
        },
    )?;
    let public = listeners
        .first()
        .map(TcpListener::local_addr)
        .transpose()?
        .context("no listener")?;
    let admin = std::net::TcpListener::bind(config.admin)
        .with_context(|| format!("cannot bind the admin listener on {}", config.admin))?;
    let admin_addr = admin.local_addr()?;

    let guard = crate::guard::build(&config.xdp, &[public.port()]);
    let started = Instant::now();
    let mut shared = Shared::new(
        config.settings(),
        tls,
        workers + handshake_workers,
        max_connections,
        guard,
        started,
        crate::tls::unix_now(),
    );
    shared.routing_workers = workers;
    shared.data_path = data_path.clone();
    shared.instance_id = config.instance_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}:{}", host.trim(), public.port())
    });
    shared.tls_offload = tls_offload.clone();
    crate::daemon::refresh_certificate_validity(&shared);
    let shared = Arc::new(Daemon {
        core: Arc::new(shared),
        config,
        store: std::sync::OnceLock::new(),
    });
    let store = crate::store::open(shared.config.store.url.as_deref(), &shared.config.data_dir)?;
    info!(store = store.kind(), at = %store.location(), "credential store open");
    let _ = shared.store.set(store.clone());
    let jobs = crate::store_thread::start(shared.clone(), store)?;
    let _ = shared.jobs.set(jobs);
    write_pidfile(&shared.config.data_dir);
    crate::reload::load_trust_bundle(&shared)?;
    let now = Instant::now();
    let use_uring = data_path.name == "io_uring";
    let mut threads = Vec::with_capacity(workers + handshake_workers);
    let mut listeners = listeners.into_iter();
    for id in 0..workers {
        let id = u16::try_from(id).context("too many workers")?;
        let worker = Worker::new(id, shared.core.clone(), now);
        let listener = if handshake_workers == 0 {
            listeners.next()
        } else {
            None
        };
        threads.push(spawn_worker(
            format!("devgate-w{id}"),
            worker,
            listener,
            use_uring,
            table_size,
            None,
        )?);
    }
    for (n, listener) in listeners.enumerate() {
        let id = u16::try_from(workers + n).context("too many workers")?;
        let worker = Worker::handshake_worker(id, shared.core.clone(), now);
        // Handshake workers run on epoll whatever the data path: their connections
        // leave as ordinary descriptors, which either driver can take.
        threads.push(spawn_worker(
            format!("devgate-hs{n}"),
            worker,
            Some(listener),
            false,
            table_size,
            Some(handshake_priority),
        )?);
    }
    crate::admin::start(shared.clone(), admin, public, admin_token)?;
    info!(
        listen = %public,
        admin = %admin_addr,
        workers,
        handshake_workers,
        max_connections,
        data_path = data_path.name,
        tls_offload = tls_offload.mode,
        "devgate {} serving",
        env!("CARGO_PKG_VERSION")
    );
    for t in threads {
        let _ = t.join();
    }
    shared.guard.shutdown();
    info!(
        "stopped after {:.1} s",
        shared.started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Starts one data-path worker thread; `nice` lowers its CPU priority first.
fn spawn_worker(
    name: String,
    worker: Worker,
    listener: Option<TcpListener>,
    use_uring: bool,
    table_size: u32,
    priority: Option<crate::config::HandshakePriority>,
) -> Result<std::thread::JoinHandle<()>> {
    let id = worker.id();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let _exit_on_panic = ExitOnPanic(id);
            if let Some(priority) = priority {
                lower_thread_priority(priority);
            }
            let result = if use_uring {
                crate::driver::uring::run(worker, listener, table_size)
            } else {
                crate::driver::epoll::run(worker, listener)
            };
            if let Err(e) = result {
                tracing::error!(worker = id, "data-path worker failed: {e}");
                // A data path without this worker would strand its connections and
                // its listener: stop, and let the service manager restart us.
                std::process::exit(1);
            }
        })
        .context("starting a worker thread")
}

/// Lowers the calling thread's CPU priority (Linux scheduling policy and nice value are
/// per thread). Lowering one's own priority needs no privilege; a failure only costs the
/// isolation, and says so.
fn lower_thread_priority(priority: crate::config::HandshakePriority) {
    use crate::config::HandshakePriority;
    let result = match priority {
        HandshakePriority::Idle => {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: pid 0 is the calling thread; `param` outlives the call.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) }
        }
        HandshakePriority::Nice(nice) => {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            match libc::id_t::try_from(tid) {
                // SAFETY: setpriority only reads its integer arguments.
                Ok(who) => unsafe { libc::setpriority(libc::PRIO_PROCESS, who, nice) },
                Err(_) => -1,
            }
        }
    };
    if result != 0 {
        warn!(
            "cannot lower the handshake worker's priority to {priority:?}: {}; handshakes compete with routing at normal priority",
            std::io::Error::last_os_error()
        );
    }
}

/// The file `devgate reload` reads the gateway's pid from.
pub fn pidfile(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("devgate.pid")
}

fn write_pidfile(data_dir: &std::path::Path) {
    // 0644 whatever the umask: `devgate reload` signals whatever pid this file names.
    let pid = format!("{}\n", std::process::id());
    if let Err(e) = devgate_pki::write_file(&pidfile(data_dir), pid.as_bytes(), 0o644) {
        warn!(
            "cannot write {}: {e} (`devgate reload` will not find this process)",
            pidfile(data_dir).display()
        );
    }
}

/// Ends the process when a data-path worker panics: its connections and listener would
/// otherwise be stranded while status still says the gateway serves. The service
/// manager restarts it; devices reconnect.
struct ExitOnPanic(u16);

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                worker = self.0,
                "data-path worker panicked; stopping the gateway"
            );
            std::process::exit(1);
        }
    }
}
