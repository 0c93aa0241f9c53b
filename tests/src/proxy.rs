//! A TCP proxy in front of a test server that a test can cut off and restore, to
//! make the server unreachable without stopping it for every other test.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// Forwards 127.0.0.1:port to `upstream` while up; refuses connections while down.
#[derive(Debug)]
pub struct CutProxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
    connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let proxy = CutProxy {
            addr,
            upstream,
            accept: Mutex::new(None),
            connections: Arc::default(),
        };
        proxy.serve(listener).await;
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let relay = tokio::spawn(relay(client, upstream));
                if let Ok(mut all) = connections.lock() {
                    all.retain(|task| !task.is_finished());
                    all.push(relay);
                }
            }
        });
        *self.accept.lock().await = Some(task);
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) {
    if let Ok(mut server) = TcpStream::connect(upstream).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }
}

/// Forwards to `upstream` but closes every `nth` connection as soon as it is accepted:
/// a network that drops connections now and then.
#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    resets: Arc<std::sync::atomic::AtomicU32>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr, nth: u32) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let resets = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = resets.clone();
        let task = tokio::spawn(async move {
            let mut accepted = 0u32;
            while let Ok((client, _)) = listener.accept().await {
                accepted += 1;
                if accepted.is_multiple_of(nth) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Closed before a byte is read: the request dies mid-flight.
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, upstream));
            }
        });
        FaultProxy { addr, resets, task }
    }

    /// How many connections were reset so far.
    pub fn resets(&self) -> u32 {
        self.resets.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
