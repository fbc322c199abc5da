//! HTTP/1.1 messages without I/O: a request head parsed by `httparse`
//! and the responses the relay sends. The routes (`http`) and the
//! WebSocket handshake (`ws::handshake`) both read heads from here.

/// A parsed request head, owning what the routes need.
///
/// The headers live in one string (each lower-cased name followed by its
/// value) indexed by `spans`: a handful of allocations per request instead
/// of two per header, so a handshake leaves few short-lived allocations
/// between the long-lived ones of the connections it creates.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub http11: bool,
    text: String,
    /// (start, end of name, end of value) in `text`.
    spans: Vec<(u32, u32, u32)>,
}

/// Most headers a request may carry.
const MAX_HEADERS: usize = 64;

/// Why bytes are not an HTTP request head.
#[derive(Debug, thiserror::Error)]
#[error("malformed HTTP request: {0}")]
pub struct MalformedHead(httparse::Error);

impl Head {
    /// Parses a head from the start of `buf`: `Ok(None)` when incomplete,
    /// else the head and its length in bytes.
    pub fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, MalformedHead> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Partial) => Ok(None),
            Ok(httparse::Status::Complete(len)) => {
                let size = req
                    .headers
                    .iter()
                    .map(|h| h.name.len() + h.value.len())
                    .sum();
                let mut text = String::with_capacity(size);
                let mut spans = Vec::with_capacity(req.headers.len());
                // The head is at most MAX_HEAD bytes, so offsets fit u32.
                for h in req.headers.iter() {
                    let start = text.len() as u32;
                    text.extend(h.name.chars().map(|c| c.to_ascii_lowercase()));
                    let name_end = text.len() as u32;
                    text.push_str(&String::from_utf8_lossy(h.value));
                    spans.push((start, name_end, text.len() as u32));
                }
                let head = Head {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                    http11: req.version == Some(1),
                    text,
                    spans,
                };
                Ok(Some((head, len)))
            }
            Err(e) => Err(MalformedHead(e)),
        }
    }

    /// The first header called `name` (lower case).
    pub fn header<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.headers_named(name).next()
    }

    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.spans
            .iter()
            .filter_map(move |&(start, name_end, end)| {
                let (start, name_end, end) = (start as usize, name_end as usize, end as usize);
                (&self.text[start..name_end] == name).then(|| &self.text[name_end..end])
            })
    }

    /// The path without its query string.
    pub fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }

    pub fn keep_alive(&self) -> bool {
        let conn = self
            .header("connection")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if self.http11 {
            !conn.contains("close")
        } else {
            conn.contains("keep-alive")
        }
    }
}

/// An HTTP response to send.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub extra: &'static str,
    /// The answer to `HEAD`: the headers of the full answer, no body.
    pub head_only: bool,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n").into_bytes(),
            extra: "",
            head_only: false,
        }
    }

    /// A JSON error body: `{"error":{"code":...,"message":...}}`.
    pub fn error(status: u16, code: &str, message: &str) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(
                &serde_json::json!({"error": {"code": code, "message": message}}),
            )
            .unwrap_or_default(),
            extra: "",
            head_only: false,
        }
    }

    pub fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}{}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.extra,
            if keep_alive {
                ""
            } else {
                "Connection: close\r\n"
            }
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}
