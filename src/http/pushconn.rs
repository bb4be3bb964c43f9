//! Push connections: a connection the caller's [`super::server::Lean`] test recognises as a
//! push stream is served without hyper, so that an idle event stream costs a few hundred bytes
//! instead of hyper's two 8 KiB connection buffers, which it keeps for the connection's whole
//! life.
//!
//! Owns only the HTTP/1.1 framing of that one exchange: it reads the request head (with
//! `httparse`, the parser hyper itself uses, within `limits.max_header_bytes` and
//! `limits.header_read_timeout`), hands the request to the same router as every other request
//! (so authentication, validation and the handler are the ones hyper connections get),
//! writes the response head and the body (chunked when its length is unknown) and closes the
//! connection when the body ends or the client goes away. It must never answer anything but
//! what the router answered, and never keep a connection open after its one response.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower::ServiceExt;

use super::limits::Limits;
use super::slot::Guarded;

/// Most header fields a request may have (hyper's default is 100).
const MAX_HEADERS: usize = 100;

/// How the body of the one response is framed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `content-length` known.
    Length,
    /// HTTP/1.1 with no length: chunked.
    Chunked,
    /// HTTP/1.0 with no length: the body ends when the connection closes (an HTTP/1.0
    /// client does not know chunked encoding).
    UntilClose,
}

/// Serves the one request on `stream` (whose first bytes, `read`, were already read from
/// it) and closes it.
pub async fn serve(
    mut stream: Guarded<TcpStream>,
    read: Vec<u8>,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
) {
    // Boxed: the head's buffers, the router's future and the response head are gone once
    // the exchange is down to relaying the body, which is all an idle stream holds.
    let started = Box::pin(respond(&mut stream, read, peer, router, limits)).await;
    if let Some((body, framing)) = started {
        relay(stream, body, framing, limits.stream_write_timeout).await;
    }
}

/// Reads the request, asks the router, writes the response head. Returns the body to relay
/// and how it is framed; `None` when the exchange is already over.
async fn respond(
    stream: &mut Guarded<TcpStream>,
    already: Vec<u8>,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
) -> Option<(Body, Framing)> {
    let read = read_head(stream, already, limits.max_header_bytes);
    let head = match tokio::time::timeout(limits.header_read_timeout, read).await {
        Ok(Ok(head)) => head,
        Ok(Err(Refuse(status))) => {
            let _ = stream.write_all(&plain_response(status)).await;
            return None;
        }
        // The client did not send its request in time: closed, as hyper does.
        Err(_) => return None,
    };
    let mut req = head;
    let version = req.version();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let resp = match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, body) = resp.into_parts();
    let length = axum::body::HttpBody::size_hint(&body).exact();
    let framing = match (length, version) {
        (Some(_), _) => Framing::Length,
        (None, axum::http::Version::HTTP_10) => Framing::UntilClose,
        (None, _) => Framing::Chunked,
    };
    let mut out = Vec::with_capacity(256);
    write_head(&mut out, version, parts.status, &parts.headers, length);
    let written = tokio::time::timeout(limits.stream_write_timeout, stream.write_all(&out)).await;
    matches!(written, Ok(Ok(()))).then_some((body, framing))
}

/// Sends the body as it comes, then closes the connection; stops at once when the client
/// hangs up, and closes a client that takes no byte for `write_timeout` (a stream that does
/// not read must not hold its buffers for ever).
async fn relay(
    mut stream: Guarded<TcpStream>,
    mut body: Body,
    framing: Framing,
    write_timeout: Duration,
) {
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            // The client hung up (or sent more, which a push client never does): stop now
            // rather than at the next keep-alive.
            _ = client_gone(stream.get_ref()) => return,
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers: none are sent here
                };
                if data.is_empty() {
                    continue;
                }
                // Events are small: one buffer, one write, and nothing large in this
                // future's state while the stream idles.
                let out = if framing == Framing::Chunked {
                    let mut out = Vec::with_capacity(data.len() + 12);
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                    bytes::Bytes::from(out)
                } else {
                    data
                };
                match tokio::time::timeout(write_timeout, stream.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::debug!("push stream closed: its client takes no bytes");
                        return;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "push stream body failed");
                return;
            }
            None => break,
        }
    }
    if framing == Framing::Chunked {
        let _ = tokio::time::timeout(write_timeout, stream.write_all(b"0\r\n\r\n")).await;
    }
    let _ = stream.shutdown().await;
}

/// Why a request head was refused, as the status to answer.
struct Refuse(StatusCode);

/// Reads and parses the request head. The bytes after it (a GET has no body) are ignored.
async fn read_head(
    stream: &mut Guarded<TcpStream>,
    mut buf: Vec<u8>,
    max: usize,
) -> Result<Request<Body>, Refuse> {
    use tokio::io::AsyncReadExt;
    buf.reserve(1024);
    loop {
        if let Some(req) = parse_head(&buf)? {
            return Ok(req);
        }
        if buf.len() >= max {
            return Err(Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        let mut chunk = [0u8; 1024];
        let want = chunk.len().min(max - buf.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return Err(Refuse(StatusCode::BAD_REQUEST)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The request, once `buf` holds a whole head.
fn parse_head(buf: &[u8]) -> Result<Option<Request<Body>>, Refuse> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Complete(_)) => to_request(&parsed).map(Some),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            Err(Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE))
        }
        Err(_) => Err(Refuse(StatusCode::BAD_REQUEST)),
    }
}

fn to_request(parsed: &httparse::Request<'_, '_>) -> Result<Request<Body>, Refuse> {
    let bad = || Refuse(StatusCode::BAD_REQUEST);
    let mut builder = Request::builder()
        .method(parsed.method.ok_or_else(bad)?)
        .uri(parsed.path.ok_or_else(bad)?)
        .version(match parsed.version {
            Some(0) => axum::http::Version::HTTP_10,
            _ => axum::http::Version::HTTP_11,
        });
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
        builder = builder.header(name, value);
    }
    builder.body(Body::empty()).map_err(|_| bad())
}

/// The status line and headers, ending the head. The connection always closes after this
/// one response.
fn write_head(
    out: &mut Vec<u8>,
    version: axum::http::Version,
    status: StatusCode,
    headers: &HeaderMap,
    length: Option<u64>,
) {
    use std::io::Write;
    let http10 = version == axum::http::Version::HTTP_10;
    let _ = write!(
        out,
        "HTTP/1.{} {} {}\r\n",
        if http10 { 0 } else { 1 },
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match length {
        Some(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        None if http10 => {}
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    let _ = write!(
        out,
        "date: {}\r\nconnection: close\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
}

/// A whole response for a refused request head.
fn plain_response(status: StatusCode) -> Vec<u8> {
    let mut out = Vec::new();
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({
        "error": if status == StatusCode::BAD_REQUEST { "bad_request" } else { "headers_too_large" },
        "message": status.canonical_reason().unwrap_or("refused"),
    })
    .to_string();
    write_head(
        &mut out,
        axum::http::Version::HTTP_11,
        status,
        &headers,
        Some(body.len() as u64),
    );
    out.extend_from_slice(body.as_bytes());
    out
}

/// Resolves when the client closes its side (or errs). Bytes it sends are read and dropped.
async fn client_gone(stream: &TcpStream) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        // Not held across the await: an idle stream's state stays small.
        let mut sink = [0u8; 256];
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_carry_the_framing_we_use() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let mut out = Vec::new();
        write_head(
            &mut out,
            axum::http::Version::HTTP_11,
            StatusCode::OK,
            &headers,
            None,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("content-type: text/event-stream\r\n"));
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.contains("connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        let refused = String::from_utf8(plain_response(StatusCode::BAD_REQUEST)).unwrap();
        let (head, body) = refused.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "bad_request");
    }
}
