//! `demo-feed`: keyed random-walk prices published to a ringcast relay, so
//! anyone can watch it work (the dashboard at `/` shows them). Each
//! publication is `POST /publish/{channel}?key={symbol}` on one keep-alive
//! connection, the way a backend publishes; the body is
//! `{"bid":…,"ask":…,"t":<Unix ms>}`. Runs until stopped (Ctrl-C), or for
//! `--seconds`.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(
    name = "demo-feed",
    about = "Publishes keyed random-walk prices to a ringcast relay over HTTP"
)]
struct Cli {
    /// The relay's HTTP address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// The channel published to.
    #[arg(long, default_value = "prices")]
    channel: String,
    /// How many instruments (keys): SYM000, SYM001, ...
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    symbols: u32,
    /// Publications per second, over all instruments.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: u32,
    /// Stop after this many seconds (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// The relay's --publish-key, if it has one.
    #[arg(long)]
    publish_key: Option<String>,
}

/// A small xorshift generator: the walk needs no cryptographic randomness.
struct Walk(u64);

impl Walk {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A step of about ±0.05%.
    fn step(&mut self) -> f64 {
        (self.next() % 2001) as f64 / 1000.0 - 1.0
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One keep-alive connection to the relay's publish endpoint.
struct Publisher {
    reader: BufReader<TcpStream>,
    head: String,
}

impl Publisher {
    async fn connect(addr: SocketAddr, key: Option<&str>) -> Result<Publisher> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let head = format!("Host: {addr}\r\nContent-Type: application/json\r\n{auth}");
        Ok(Publisher {
            reader: BufReader::new(stream),
            head,
        })
    }

    /// Publishes `body` under `key`; fails on anything but 202.
    async fn publish(&mut self, channel: &str, key: &str, body: &str) -> Result<()> {
        let request = format!(
            "POST /publish/{channel}?key={key} HTTP/1.1\r\n{}Content-Length: {}\r\n\r\n{body}",
            self.head,
            body.len()
        );
        self.reader.get_mut().write_all(request.as_bytes()).await?;
        let mut status = String::new();
        self.reader.read_line(&mut status).await?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                bail!("the relay closed the connection");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut answer = vec![0u8; length];
        self.reader.read_exact(&mut answer).await?;
        if status.split_whitespace().nth(1) != Some("202") {
            bail!(
                "the relay answered {}: {}",
                status.trim_end(),
                String::from_utf8_lossy(&answer)
            );
        }
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let symbols: Vec<String> = (0..cli.symbols).map(|i| format!("SYM{i:03}")).collect();
    let mut walk = Walk(0x9e37_79b9_7f4a_7c15);
    let mut prices: Vec<f64> = (0..cli.symbols)
        .map(|_| 20.0 + (walk.next() % 48_000) as f64 / 100.0)
        .collect();
    let mut publisher = Publisher::connect(cli.addr, cli.publish_key.as_deref()).await?;
    eprintln!(
        "demo-feed: {} instruments on channel {:?} at {} publications/s to {}",
        cli.symbols, cli.channel, cli.rate, cli.addr
    );
    let start = Instant::now();
    let end = (cli.seconds > 0).then(|| start + Duration::from_secs(cli.seconds));
    let mut sent: u64 = 0;
    let mut report = start + Duration::from_secs(5);
    loop {
        let now = Instant::now();
        if end.is_some_and(|end| now >= end) {
            break;
        }
        let due = (now - start).as_secs_f64() * f64::from(cli.rate);
        while (sent as f64) < due {
            let i = (walk.next() % u64::from(cli.symbols)) as usize;
            prices[i] = (prices[i] * (1.0 + walk.step() / 2000.0)).max(0.01);
            let bid = (prices[i] * 100.0).round() / 100.0;
            let body = format!(
                r#"{{"bid":{bid:.2},"ask":{:.2},"t":{}}}"#,
                bid + 0.01,
                unix_ms()
            );
            publisher.publish(&cli.channel, &symbols[i], &body).await?;
            sent += 1;
        }
        if now >= report {
            eprintln!(
                "demo-feed: {sent} published ({:.0}/s)",
                sent as f64 / (now - start).as_secs_f64()
            );
            report = now + Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("demo-feed: {sent} published");
    Ok(())
}
