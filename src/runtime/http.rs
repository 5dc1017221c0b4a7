//! A minimal HTTP/1.1 server for the probes, metrics and the leak report: GET only, one request
//! per connection, no new crates.
//!
//! Owns: request-line parsing and the four routes.
//! Must not: block on the GC loop (it reads only what [`Shared`] already holds).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Shared;

/// Requests are a request line and a few headers; anything larger is not one of our clients.
const MAX_REQUEST: usize = 16 * 1024;
/// A client that sends nothing for this long is dropped, so idle sockets cannot pile up.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(READ_TIMEOUT, handle(stream, &shared)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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

async fn handle(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let (status, content_type, body) = if method == "GET" || method == "HEAD" {
        route(path, shared)
    } else {
        (405, "text/plain", b"GET only\n".to_vec())
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(&body).await?;
    }
    stream.shutdown().await
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
