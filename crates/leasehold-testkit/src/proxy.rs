//! A loopback TCP proxy that can cut a client off a real server (a partition that holds the
//! bytes back, or a blackhole that silently drops them), for fault injection against real
//! backends. Not a mock: bytes go to the real server.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use leasehold_core::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on a free loopback port, forwarding to `target` until partitioned.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    partitioned: watch::Sender<bool>,
    requests: Arc<AtomicU64>,
    holes: Arc<Blackholes>,
    /// Cuts only the server-to-client direction (requests still arrive, replies are held back).
    replies_cut: watch::Sender<bool>,
    /// Added one-way delay per chunk, in microseconds, in both directions.
    latency_us: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// Which connections are blackholed: those opened before the latest
/// [`blackhole`](Proxy::blackhole) (epoch), and those opened while it lasts.
#[derive(Debug, Default)]
struct Blackholes {
    epoch: AtomicU64,
    active: AtomicBool,
}

/// One connection's view of [`Blackholes`].
#[derive(Debug, Clone)]
struct Fate {
    holes: Arc<Blackholes>,
    born: u64,
    born_dead: bool,
}

impl Fate {
    fn new(holes: &Arc<Blackholes>) -> Self {
        Self {
            holes: holes.clone(),
            born: holes.epoch.load(Ordering::SeqCst),
            born_dead: holes.active.load(Ordering::SeqCst),
        }
    }

    fn dead(&self) -> bool {
        self.born_dead || self.holes.epoch.load(Ordering::SeqCst) > self.born
    }
}

impl Proxy {
    /// Starts a proxy to `target`.
    ///
    /// # Errors
    ///
    /// When no loopback port can be bound.
    pub async fn start(target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (partitioned, _) = watch::channel(false);
        let requests = Arc::new(AtomicU64::new(0));
        let holes = Arc::new(Blackholes::default());
        let (replies_cut, _) = watch::channel(false);
        let latency_us = Arc::new(AtomicU64::new(0));
        let task = {
            let partitioned = partitioned.clone();
            let replies_cut = replies_cut.clone();
            let requests = requests.clone();
            let holes = holes.clone();
            let latency_us = latency_us.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let cuts = Cuts {
                        both: partitioned.subscribe(),
                        replies: replies_cut.subscribe(),
                        latency_us: latency_us.clone(),
                    };
                    let requests = requests.clone();
                    let fate = Fate::new(&holes);
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(target).await {
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            splice(client, server, cuts, requests, fate).await;
                        }
                    });
                }
            })
        };
        Ok(Proxy {
            addr,
            partitioned,
            requests,
            holes,
            replies_cut,
            latency_us,
            task,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding in both directions: calls hang, as on a network partition. Data sent
    /// meanwhile is held back and delivered after [`heal`](Self::heal), like TCP retransmits.
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    /// Resumes forwarding; ends a [`blackhole`](Self::blackhole) for connections opened from
    /// now on (the blackholed ones stay dead).
    pub fn heal(&self) {
        self.holes.active.store(false, Ordering::SeqCst);
        self.replies_cut.send_replace(false);
        self.partitioned.send_replace(false);
    }

    /// A one-way partition: requests still reach the server (and take effect there), but its
    /// replies are held back until [`heal`](Self::heal), so the client times out on calls that
    /// succeeded.
    pub fn partition_replies(&self) {
        self.replies_cut.send_replace(true);
    }

    /// Adds `one_way` of delay before each chunk is forwarded, in both directions (zero ends
    /// it). Chunks of one connection stay in order.
    pub fn set_latency(&self, one_way: Duration) {
        let us = u64::try_from(one_way.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(us, Ordering::SeqCst);
    }

    /// Silently kills every connection open now, for good, and every connection opened until
    /// [`heal`](Self::heal): their bytes are read and thrown away in both directions while both
    /// sockets stay open (no FIN, no RST), as when a firewall or NAT on the path lost the
    /// connections' state. Only a peer's own timeout (keep-alive, deadline) can tell them dead.
    pub fn blackhole(&self) {
        self.holes.active.store(true, Ordering::SeqCst);
        self.holes.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Chunks the clients have sent so far (a count of requests, roughly one per command).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What holds a connection's bytes back: the partition (both ways), the cut of replies (one
/// way), and the added latency.
struct Cuts {
    both: watch::Receiver<bool>,
    replies: watch::Receiver<bool>,
    latency_us: Arc<AtomicU64>,
}

async fn splice(
    client: TcpStream,
    server: TcpStream,
    cuts: Cuts,
    requests: Arc<AtomicU64>,
    fate: Fate,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(
        client_read,
        server_write,
        vec![cuts.both.clone()],
        cuts.latency_us.clone(),
        Some(requests),
        fate.clone(),
    );
    let down = pump(
        server_read,
        client_write,
        vec![cuts.both, cuts.replies],
        cuts.latency_us,
        None,
        fate,
    );
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cuts: Vec<watch::Receiver<bool>>,
    latency_us: Arc<AtomicU64>,
    requests: Option<Arc<AtomicU64>>,
    fate: Fate,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(requests) = &requests {
            requests.fetch_add(1, Ordering::Relaxed);
        }
        let delay = latency_us.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        for cut in &mut cuts {
            if cut.wait_for(|cut| !*cut).await.is_err() {
                return;
            }
        }
        if fate.dead() {
            // Blackholed: swallow the bytes, keep both sockets open.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The [`FaultSwitch`](crate::FaultSwitch) of a client that talks through a [`Proxy`].
pub struct ProxyFaults {
    proxy: Arc<Proxy>,
    count_requests: bool,
}

impl ProxyFaults {
    /// Fault switches that also report the proxy's chunk count as requests (RESP: one chunk per
    /// command).
    pub fn counting(proxy: Arc<Proxy>) -> Self {
        Self {
            proxy,
            count_requests: true,
        }
    }

    /// Fault switches without a request count (HTTP/2 and gRPC clients send flow-control frames
    /// that are not requests).
    pub fn uncounted(proxy: Arc<Proxy>) -> Self {
        Self {
            proxy,
            count_requests: false,
        }
    }
}

#[async_trait]
impl crate::FaultSwitch for ProxyFaults {
    async fn partition(&self) {
        self.proxy.partition();
    }
    async fn heal(&self) {
        self.proxy.heal();
    }
    fn requests(&self) -> Option<u64> {
        self.count_requests.then(|| self.proxy.requests())
    }
    async fn partition_replies(&self) -> bool {
        self.proxy.partition_replies();
        true
    }
    async fn blackhole(&self) -> bool {
        self.proxy.blackhole();
        true
    }
    async fn set_latency(&self, one_way: Duration) -> bool {
        self.proxy.set_latency(one_way);
        true
    }
}
