//! The HTTP endpoints (probes, metrics, the leak report) on hyper's HTTP/1 server: GET and HEAD,
//! one request per connection, optionally behind TLS (the metrics listener when the operator
//! configures `TLS_CRT_PATH`/`TLS_KEY_PATH`; see `tls`).
//!
//! Owns: the accept loop, the per-connection deadline and the four routes.
//! Must not: block on the GC loop (it reads only what [`Shared`] already holds).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::Shared;

/// Requests are a request line and a few headers; anything larger is not one of our clients
/// (hyper's smallest allowed read buffer is 8 KiB).
const MAX_REQUEST: usize = 16 * 1024;
/// A connection (TLS handshake, request and answer) that takes longer than this is dropped, so
/// idle or slow sockets cannot pile up.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Serves every route on `listener`; through `tls` when given.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (shared, tls) = (shared.clone(), tls.clone());
                tokio::spawn(async move {
                    let connection = async move {
                        match tls {
                            None => serve_connection(stream, shared).await,
                            Some(acceptor) => match acceptor.accept(stream).await {
                                Ok(stream) => serve_connection(stream, shared).await,
                                // A plain-HTTP scrape of the TLS port, no or a refused client certificate.
                                Err(e) => {
                                    tracing::debug!(peer = %peer, error = %e, "metrics TLS handshake failed")
                                }
                            },
                        }
                    };
                    let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    shared: Arc<Shared>,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(respond(&request, &shared)) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST)
        .timer(TokioTimer::new())
        .header_read_timeout(CONNECTION_DEADLINE)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

fn respond(request: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match *request.method() {
        Method::GET | Method::HEAD => route(request.uri().path(), shared),
        _ => (405, "text/plain", b"GET only\n".to_vec()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// (status, content type, body) for a path.
pub fn route(path: &str, shared: &Shared) -> (u16, &'static str, Vec<u8>) {
    let path = path.split('?').next().unwrap_or(path);
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", shared.render_metrics().into_bytes()),
        "/leak-report" => match shared.report() {
            Some(r) => match serde_json::to_vec_pretty(&*r) {
                Ok(body) => (200, "application/json", body),
                Err(e) => (500, "text/plain", e.to_string().into_bytes()),
            },
            None => (503, "text/plain", b"no GC pass yet\n".to_vec()),
        },
        "/liveness" => match shared.status.live() {
            Ok(()) => (200, "text/plain", b"live\n".to_vec()),
            Err(reasons) => (503, "text/plain", format!("not live: {reasons}\n").into_bytes()),
        },
        "/readiness" => match shared.readiness() {
            Ok(()) => (200, "text/plain", b"ready\n".to_vec()),
            Err(reasons) => (503, "text/plain", format!("not ready: {reasons}\n").into_bytes()),
        },
        _ => (404, "text/plain", b"not found\n".to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_probes_metrics_and_unknown_paths() {
        let shared = Shared::default();
        assert_eq!(route("/liveness", &shared).0, 200);
        assert_eq!(route("/readiness", &shared).0, 503, "not ready before the watches sync");
        shared.set_synced();
        assert_eq!(route("/readiness?verbose=1", &shared).0, 200);
        shared.status.set_ready(crate::health::KUBE_API_SERVER, false, "apiserver down");
        let (code, _, body) = route("/readiness", &shared);
        assert_eq!((code, String::from_utf8(body).unwrap()), (503, "not ready: apiserver down\n".to_string()));
        assert_eq!(route("/liveness", &shared).0, 200, "an unreachable apiserver does not fail liveness");
        shared.status.set_live(crate::health::EVENT_LOOP, false, "wedged");
        assert_eq!(route("/liveness", &shared).0, 503);
        assert_eq!(route("/leak-report", &shared).0, 503);
        let (code, ct, body) = route("/metrics", &shared);
        assert_eq!((code, ct.starts_with("text/plain; version=0.0.4")), (200, true));
        assert!(String::from_utf8(body).unwrap().contains("ipam_gc_confirmed_leaks 0"));
        assert_eq!(route("/nope", &shared).0, 404);
    }
}
