//! A TCP proxy in front of a test server that a test can cut off and restore, to
//! make the server unreachable without stopping it for every other test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

/// Forwards 127.0.0.1:port (or another address of this host) to `upstream` while up;
/// refuses connections while down.
/// Counts the bytes clients send upstream, so a test can prove no request was made.
#[derive(Debug)]
pub struct CutProxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
    connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    sent_upstream: Arc<AtomicU64>,
    downstream: Arc<Downstream>,
}

/// What the server sends back: counted, and held once a test's limit is reached or,
/// while GETs are held, on every connection that has carried a GET.
#[derive(Debug)]
struct Downstream {
    sent: AtomicU64,
    /// The first line of each request forwarded, as far as one read of it shows.
    requests: std::sync::Mutex<Vec<String>>,
    limit: watch::Sender<u64>,
    gets_held: watch::Sender<bool>,
}

impl Default for Downstream {
    fn default() -> Downstream {
        Downstream {
            sent: AtomicU64::new(0),
            requests: std::sync::Mutex::default(),
            limit: watch::channel(u64::MAX).0,
            gets_held: watch::channel(false).0,
        }
    }
}

impl Downstream {
    /// Waits while the limit is reached.
    async fn wait_open(&self) {
        let mut limit = self.limit.subscribe();
        let _ = limit
            .wait_for(|limit| self.sent.load(Ordering::SeqCst) < *limit)
            .await;
    }

    /// Waits while GETs are held, if this connection has carried one.
    async fn wait_gets_released(&self, carried_get: &AtomicBool) {
        if carried_get.load(Ordering::SeqCst) {
            let _ = self.gets_held.subscribe().wait_for(|held| !held).await;
        }
    }
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        CutProxy::start_on(std::net::Ipv4Addr::LOCALHOST.into(), upstream).await
    }

    /// A proxy listening on `ip` (e.g. the test cluster's node address, for pods).
    pub async fn start_on(ip: std::net::IpAddr, upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let proxy = CutProxy {
            addr,
            upstream,
            accept: Mutex::new(None),
            connections: Arc::default(),
            sent_upstream: Arc::default(),
            downstream: Arc::default(),
        };
        proxy.serve(listener).await;
        proxy
    }

    /// A proxy in front of one of the test S3 servers.
    pub async fn in_front_of(server: &crate::S3Server) -> CutProxy {
        CutProxy::start(server.socket_addr()).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes clients have sent to the upstream server so far.
    pub fn sent_upstream(&self) -> u64 {
        self.sent_upstream.load(Ordering::SeqCst)
    }

    /// Forwards the server's answers only until about `bytes` more have passed, then
    /// holds them: a transfer stalls mid-way, at a point the test chose.
    pub fn stall_after(&self, bytes: u64) {
        let sent = self.downstream.sent.load(Ordering::SeqCst);
        self.downstream
            .limit
            .send_replace(sent.saturating_add(bytes));
    }

    /// Holds the answer to every GET from now on while HEADs pass: reads that start
    /// meanwhile learn their revision, then wait for their bytes.
    pub fn hold_gets(&self) {
        self.downstream.gets_held.send_replace(true);
    }

    /// Lets every answer through again, the held ones first.
    pub fn release(&self) {
        self.downstream.limit.send_replace(u64::MAX);
        self.downstream.gets_held.send_replace(false);
    }

    /// The request line of every request that has passed to the server so far.
    pub fn requests(&self) -> Vec<String> {
        self.downstream
            .requests
            .lock()
            .map(|requests| requests.clone())
            .unwrap_or_default()
    }

    /// GET requests that have passed to the server so far.
    pub fn gets_forwarded(&self) -> u64 {
        let gets = self
            .requests()
            .iter()
            .filter(|line| line.starts_with("GET "))
            .count();
        u64::try_from(gets).unwrap_or(u64::MAX)
    }

    /// Bytes the server has sent back through the proxy so far.
    pub fn sent_downstream(&self) -> u64 {
        self.downstream.sent.load(Ordering::SeqCst)
    }

    /// Closes the listener and every open connection: the server looks gone.
    pub async fn cut(&self) {
        if let Some(task) = self.accept.lock().await.take() {
            task.abort();
            let _ = task.await;
        }
        for task in self
            .connections
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
        {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind proxy port");
        self.serve(listener).await;
    }

    async fn serve(&self, listener: TcpListener) {
        let upstream = self.upstream;
        let connections = self.connections.clone();
        let sent = self.sent_upstream.clone();
        let downstream = self.downstream.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let relay = tokio::spawn(relay(client, upstream, sent.clone(), downstream.clone()));
                if let Ok(mut all) = connections.lock() {
                    all.retain(|task| !task.is_finished());
                    all.push(relay);
                }
            }
        });
        *self.accept.lock().await = Some(task);
    }
}

/// Relays both ways, adding every byte the client sends to `sent` as it passes, and
/// holding the server's bytes past `downstream`'s limit.
async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    sent: Arc<AtomicU64>,
    downstream: Arc<Downstream>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set before a GET is forwarded; the client reads one answer before the next request.
    let carried_get = AtomicBool::new(false);
    let to_server = async {
        let mut buffer = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = client_read.read(&mut buffer).await {
            sent.fetch_add(n as u64, Ordering::SeqCst);
            if let Some(line) = request_line(&buffer[..n]) {
                if line.starts_with("GET ") {
                    carried_get.store(true, Ordering::SeqCst);
                }
                if let Ok(mut requests) = downstream.requests.lock() {
                    requests.push(line);
                }
            }
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let to_client = async {
        let mut buffer = vec![0; 16 * 1024];
        loop {
            downstream.wait_open().await;
            let Ok(n @ 1..) = server_read.read(&mut buffer).await else {
                break;
            };
            downstream.wait_gets_released(&carried_get).await;
            downstream.sent.fetch_add(n as u64, Ordering::SeqCst);
            if client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(to_server, to_client);
}

/// The request line that `read` starts with, when it starts with one (a method in
/// capitals, then a space), not with a body's bytes.
fn request_line(read: &[u8]) -> Option<String> {
    let line = read.split(|&b| b == b'\r').next()?;
    let method = line.split(|&b| b == b' ').next()?;
    let is_method = !method.is_empty()
        && method.len() < line.len()
        && method.iter().all(u8::is_ascii_uppercase);
    is_method.then(|| String::from_utf8_lossy(line).into_owned())
}

/// Forwards to `upstream` but closes every `nth` connection as soon as it is accepted:
/// a network that drops connections now and then.
#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    resets: Arc<AtomicU32>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr, nth: u32) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let resets = Arc::new(AtomicU32::new(0));
        let counter = resets.clone();
        let task = tokio::spawn(async move {
            let mut accepted = 0u32;
            while let Ok((client, _)) = listener.accept().await {
                accepted += 1;
                if accepted.is_multiple_of(nth) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    // Closed before a byte is read: the request dies mid-flight.
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, upstream, Arc::default(), Arc::default()));
            }
        });
        FaultProxy { addr, resets, task }
    }

    /// How many connections were reset so far.
    pub fn resets(&self) -> u32 {
        self.resets.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
