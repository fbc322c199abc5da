//! The Pusher HTTP API as the load generator's publishers use it against
//! sockudo (its one-request-per-connection `post` also serves the
//! Centrifugo publishers): one signed `POST /apps/{id}/events` per publication (the API
//! answers `Connection: close`, so one TCP connection each), and the wait
//! for `pusher:connection_established` after a WebSocket handshake.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::client::Ws;
use crate::proto::Payload;

/// An app as sockudo knows it: `ID:KEY:SECRET`.
#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl std::str::FromStr for App {
    type Err = String;

    fn from_str(s: &str) -> Result<App, String> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(key), Some(secret))
                if !id.is_empty() && !key.is_empty() && !secret.is_empty() =>
            {
                Ok(App {
                    id: id.into(),
                    key: key.into(),
                    secret: secret.into(),
                })
            }
            _ => Err("expected ID:KEY:SECRET".into()),
        }
    }
}

impl App {
    /// The signed request publishing `data` as event `message` on `channel`.
    pub fn publish_request(
        &self,
        host: &str,
        channel: &str,
        t: u64,
        pad: &str,
        now_secs: u64,
    ) -> Result<Vec<u8>> {
        let data = serde_json::to_string(&Payload { t, p: pad })?;
        let body = serde_json::to_string(
            &serde_json::json!({"name": "message", "channel": channel, "data": data}),
        )?;
        let path = format!("/apps/{}/events", self.id);
        let body_md5 = hex::encode(Md5::digest(body.as_bytes()));
        // Sorted by key, as the signature wants them.
        let query = format!(
            "auth_key={}&auth_timestamp={now_secs}&auth_version=1.0&body_md5={body_md5}",
            self.key
        );
        let signature = self.sign(&format!("POST\n{path}\n{query}"));
        Ok(format!(
            "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: {host}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes())
    }

    fn sign(&self, text: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.secret.as_bytes()).expect("HMAC takes any key");
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Sends one request on a fresh connection (from `source`, when given) and
/// checks the answer is a 2xx; with `read_body`, also that the body holds
/// no Centrifugo `error` (which it answers with status 200).
pub async fn post(
    addr: SocketAddr,
    source: Option<IpAddr>,
    request: Vec<u8>,
    read_body: bool,
) -> Result<()> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = socket
        .connect(addr)
        .await
        .context("connecting to the HTTP API")?;
    stream.set_nodelay(true)?;
    stream.write_all(&request).await?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .context("reading the HTTP answer")?;
    let status = std::str::from_utf8(&head[9..12]).unwrap_or("?");
    if !status.starts_with('2') {
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        let body = String::from_utf8_lossy(&rest);
        bail!(
            "HTTP API answered {status}: {}",
            body.lines().last().unwrap_or("")
        );
    }
    if read_body {
        let mut rest = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut rest),
        )
        .await
        .context("the API answer did not end within 10 s")?
        .context("reading the API answer")?;
        let text = String::from_utf8_lossy(&rest);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        if let Some(error) = crate::centrifugo::api_error(body) {
            bail!("the server API refused the publication: {error}");
        }
    }
    Ok(())
}

/// Waits for `pusher:connection_established` (the first message).
pub async fn wait_established(ws: &mut Ws) -> Result<()> {
    let first = ws
        .next()
        .await
        .context("closed before pusher:connection_established")??;
    let text = first.to_text().unwrap_or("");
    if !text.contains("pusher:connection_established") {
        bail!("expected pusher:connection_established, got {text:.200}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_signed_as_pusher_documents() {
        // The example of the Pusher REST API documentation (auth
        // signatures): key 278d425bdf160c739803, secret
        // 7ad3773142a6692b25b8, this exact string to sign.
        let app: App = "3:278d425bdf160c739803:7ad3773142a6692b25b8"
            .parse()
            .unwrap();
        let text = "POST\n/apps/3/events\nauth_key=278d425bdf160c739803&auth_timestamp=1353088179\
                    &auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f";
        assert_eq!(
            app.sign(text),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
        let request =
            String::from_utf8(app.publish_request("h", "c", 5, "x", 10).unwrap()).unwrap();
        assert!(request
            .starts_with("POST /apps/3/events?auth_key=278d425bdf160c739803&auth_timestamp=10&"));
        assert!(
            request.ends_with(r#"{"channel":"c","data":"{\"t\":5,\"p\":\"x\"}","name":"message"}"#)
        );
        assert!("a:b".parse::<App>().is_err());
    }
}
