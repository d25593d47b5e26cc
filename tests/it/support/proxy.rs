//! A small TCP proxy owned by a test, for fault injection between a client and a broker
//! (toxiproxy is not available here).
//!
//! * [`TcpProxy::cut`] drops every current connection (both sockets closed) and keeps
//!   accepting new ones: a network blip / broker-side connection kill.
//! * [`TcpProxy::blackhole`] stops moving bytes in both directions, on current and new
//!   connections, without closing anything (bytes are left unread in the kernel buffers):
//!   a silent partition that the peers only notice through heartbeats. New connections
//!   are accepted but not forwarded to the upstream until the black hole is lifted.
//! * [`TcpProxy::held_from_clients`] and [`TcpProxy::upstream_connections`] let a test see
//!   that a black hole holds traffic back as a positive event (bytes from a client are
//!   waiting at the proxy; no upstream connection was made) instead of waiting a while to
//!   see that nothing happens.
//!
//! Use a short heartbeat to make lapin notice a black hole quickly:
//! `format!("{}?heartbeat=1", proxy.amqp_url())` (lapin gives up after about 2 intervals).

use anyhow::{Context, Result};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// A TCP proxy from 127.0.0.1:<ephemeral port> to one upstream address.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept_task: AbortHandle,
}

struct Shared {
    accepted: AtomicUsize,
    /// Connections made to the upstream.
    upstream_connects: AtomicUsize,
    /// Connections whose client-to-upstream direction holds bytes back right now.
    held_from_clients: AtomicUsize,
    /// `true` while black-holed.
    blackhole: watch::Sender<bool>,
    /// Tasks of the connections accepted so far (finished ones are pruned now and then).
    conns: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Vec<AbortHandle>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TcpProxy {
    /// Listen on 127.0.0.1:0 and forward every accepted connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy listener")?;
        let addr = listener.local_addr()?;
        let (blackhole, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            accepted: AtomicUsize::new(0),
            upstream_connects: AtomicUsize::new(0),
            held_from_clients: AtomicUsize::new(0),
            blackhole,
            conns: Mutex::new(Vec::new()),
        });
        let accept_task =
            tokio::spawn(accept_loop(listener, upstream, shared.clone())).abort_handle();
        Ok(TcpProxy {
            addr,
            upstream,
            shared,
            accept_task,
        })
    }

    /// The proxy's listening address (127.0.0.1:<port>).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `amqp://guest:guest@127.0.0.1:<proxy port>/%2f` (append `?heartbeat=N` as needed).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.addr.port())
    }

    /// Abort every current connection (tasks aborted, both sockets dropped). New
    /// connections are still accepted and forwarded.
    pub fn cut(&self) {
        let conns = std::mem::take(&mut *self.shared.conns());
        for conn in conns {
            conn.abort();
        }
    }

    /// Black-hole (`true`) or resume (`false`) forwarding on current and new connections.
    /// Nothing is closed; bytes simply stop moving (and are not read) until resumed.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// True while black-holed.
    pub fn is_blackholed(&self) -> bool {
        *self.shared.blackhole.borrow()
    }

    /// Connections accepted so far (including closed and cut ones).
    pub fn connection_count(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections made to the upstream so far (a black-holed new connection makes none
    /// until the black hole is lifted).
    pub fn upstream_connections(&self) -> usize {
        self.shared.upstream_connects.load(Ordering::SeqCst)
    }

    /// Connections whose client has sent bytes that the black hole holds back right now
    /// (left unread in the kernel buffer, or read just as the black hole started and not
    /// forwarded). Such bytes have not reached the upstream: a positive sign that traffic is
    /// held. 0 while not black-holed.
    pub fn held_from_clients(&self) -> usize {
        self.shared.held_from_clients.load(Ordering::SeqCst)
    }

    /// Connections currently open through the proxy.
    pub fn active_connections(&self) -> usize {
        self.shared
            .conns()
            .iter()
            .filter(|c| !c.is_finished())
            .count()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // e.g. EMFILE: back off briefly instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let rx = shared.blackhole.subscribe();
        // Spawn under the lock so that `cut()` sees every connection accepted before it.
        let mut conns = shared.conns();
        conns.retain(|c| !c.is_finished());
        conns.push(tokio::spawn(serve(client, upstream, rx, shared.clone())).abort_handle());
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut blackhole: watch::Receiver<bool>,
    shared: Arc<Shared>,
) {
    let _ = client.set_nodelay(true);
    let (mut client_read, client_write) = client.into_split();
    // While black-holed, not even the upstream connection is made.
    if hold(&mut client_read, &mut blackhole, Some(&shared), false)
        .await
        .is_err()
    {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // dropping the client's halves closes it
    };
    shared.upstream_connects.fetch_add(1, Ordering::SeqCst);
    let _ = server.set_nodelay(true);
    let (server_read, server_write) = server.into_split();
    // On the first error both directions are dropped, closing both sockets.
    let _ = tokio::try_join!(
        pump(client_read, server_write, blackhole.clone(), Some(&shared)),
        pump(server_read, client_write, blackhole, None),
    );
}

fn gone() -> io::Error {
    io::Error::other("proxy dropped")
}

/// Counts one connection in [`Shared::held_from_clients`] while alive (also when the
/// connection's task is aborted by [`TcpProxy::cut`]).
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Held(count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Returns at once when not black-holed; else waits until the black hole is lifted. With
/// `count` (the client-to-upstream direction), the connection is counted as holding bytes
/// back once `from` has an unread byte, or from the start if `pending` (bytes already read
/// and not forwarded).
async fn hold(
    from: &mut OwnedReadHalf,
    blackhole: &mut watch::Receiver<bool>,
    count: Option<&Shared>,
    pending: bool,
) -> io::Result<()> {
    if !*blackhole.borrow_and_update() {
        return Ok(());
    }
    let counter = count.map(|s| &s.held_from_clients);
    // Counted while this guard lives (it is only ever dropped, never read).
    let mut _held = counter.filter(|_| pending).map(Held::new);
    let mut peeked = [0u8; 1];
    // Peek (which consumes nothing) until the first byte arrives. EOF or an error is not a
    // byte: a connection its client just closed is not counted as holding anything.
    let mut peeking = counter.is_some() && !pending;
    loop {
        tokio::select! {
            lifted = blackhole.wait_for(|on| !*on) => {
                return lifted.map(|_| ()).map_err(|_| gone());
            }
            got = from.peek(&mut peeked), if peeking => {
                peeking = false;
                if matches!(got, Ok(n) if n > 0) {
                    _held = counter.map(Held::new);
                }
            }
        }
    }
}

/// Copy `from` to `to` until EOF (then half-close `to`), pausing while black-holed;
/// `count`: see [`hold`].
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut blackhole: watch::Receiver<bool>,
    count: Option<&Shared>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        hold(&mut from, &mut blackhole, count, false).await?;
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            // Stop reading as soon as the black hole starts (read is cancel-safe).
            changed = blackhole.changed() => {
                changed.map_err(|_| gone())?;
                continue;
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        // Bytes read just as the black hole started are held back until it ends.
        hold(&mut from, &mut blackhole, count, true).await?;
        to.write_all(&buf[..n]).await?;
    }
}
