//! A loopback TCP proxy that can cut a client off a real server (a partition), for fault
//! injection against real backends. Not a mock: bytes go to the real server.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
    task: JoinHandle<()>,
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
        let task = {
            let partitioned = partitioned.clone();
            let requests = requests.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let rx = partitioned.subscribe();
                    let requests = requests.clone();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(target).await {
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            splice(client, server, rx, requests).await;
                        }
                    });
                }
            })
        };
        Ok(Proxy {
            addr,
            partitioned,
            requests,
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

    /// Resumes forwarding.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
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

async fn splice(
    client: TcpStream,
    server: TcpStream,
    partitioned: watch::Receiver<bool>,
    requests: Arc<AtomicU64>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(
        client_read,
        server_write,
        partitioned.clone(),
        Some(requests),
    );
    let down = pump(server_read, client_write, partitioned, None);
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut partitioned: watch::Receiver<bool>,
    requests: Option<Arc<AtomicU64>>,
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
        if partitioned.wait_for(|cut| !*cut).await.is_err() {
            return;
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
}
