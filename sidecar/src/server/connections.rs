//! Serves a router on a listener with the bounds `axum::serve` lacks, so slow or
//! abusive clients cannot starve the others or the process of file descriptors:
//! - at most `max_connections` open at once; one more is answered 503 and closed at once;
//! - a header read timeout, which also closes keep-alive connections left idle;
//! - RFC 9112 §3.2: an HTTP/1.1 request without exactly one `Host` gets 400.
//!
//! hyper itself answers malformed heads (400, 414, 431) and reads a request carrying both
//! Content-Length and Transfer-Encoding by the latter, closing the connection after it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::{Metrics, Port};

/// How many connections a port holds and how long a client may take to send a request head.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// What a connection over the cap is told before it is closed.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\nConnection: close\r\n\r\n\
too many connections\n";

/// Serves `router` until `shutdown` completes, then waits for the open connections to
/// finish their responses (the caller bounds how long).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    port: Port,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of descriptors or a connection reset before accept: back off
                    // briefly instead of spinning; open connections keep being served.
                    tracing::warn!(error = %err, port = port.label(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connection_refused(port);
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |request| handle(router.clone(), request));
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        let open = metrics.connection_opened(port);
        tokio::spawn(async move {
            // An error here is the client's (reset, timeout, malformed request): hyper
            // already answered what could be answered.
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection closed with an error");
            }
            drop((open, permit));
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn handle(router: Router, request: Request<Incoming>) -> Result<Response, Infallible> {
    let headers = request.headers();
    if request.version() == Version::HTTP_11 && headers.get_all(header::HOST).iter().count() != 1 {
        return Ok(bad_request(
            "an HTTP/1.1 request needs exactly one Host header\n",
        ));
    }
    router.oneshot(request.map(Body::new)).await
}

/// 400, and the connection closed: what follows a malformed request cannot be trusted.
fn bad_request(reason: &'static str) -> Response {
    let mut response = (StatusCode::BAD_REQUEST, reason).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Tells a connection over the cap to come back later, without waiting on it for long.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(TOO_MANY)).await;
}
