//! A small TCP proxy owned by a test, for fault injection between a client and a broker
//! (toxiproxy is not available here).
//!
//! * [`TcpProxy::cut`] drops every current connection (both sockets closed) and keeps
//!   accepting new ones: a network blip / broker-side connection kill.
//! * [`TcpProxy::blackhole`] stops moving bytes in both directions, on current and new
//!   connections, without closing anything (bytes are left unread in the kernel buffers):
//!   a silent partition that the peers only notice through heartbeats. New connections
//!   are accepted but not forwarded to the upstream until the black hole is lifted.
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
        conns.push(tokio::spawn(serve(client, upstream, rx)).abort_handle());
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, mut blackhole: watch::Receiver<bool>) {
    // While black-holed, not even the upstream connection is made.
    if blackhole.wait_for(|on| !*on).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // dropping `client` closes it
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // On the first error both directions are dropped, closing both sockets.
    let _ = tokio::try_join!(
        pump(client_read, server_write, blackhole.clone()),
        pump(server_read, client_write, blackhole),
    );
}

/// Copy `from` to `to` until EOF (then half-close `to`), pausing while black-holed.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut blackhole: watch::Receiver<bool>,
) -> io::Result<()> {
    let gone = || io::Error::other("proxy dropped");
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if blackhole.wait_for(|on| !*on).await.is_err() {
            return Err(gone());
        }
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
        if blackhole.wait_for(|on| !*on).await.is_err() {
            return Err(gone());
        }
        to.write_all(&buf[..n]).await?;
    }
}
