//! `warren check`: is the broker reachable, what is it, and who do we log in as.
//!
//! lapin does not expose the broker's server properties, so the product and version come
//! from a separate probe: a plain TCP connection that sends the AMQP 0-9-1 protocol header
//! and reads the broker's `Connection.Start` frame, which carries them, then hangs up.
//! Nothing is declared on the broker.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_core::{Broker, ReconnectPolicy};

use crate::opts::Global;

/// `warren check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {}

/// What the broker says about itself in `Connection.Start`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// `product`, e.g. `RabbitMQ`.
    pub product: Option<String>,
    /// `version`, e.g. `3.10.8`.
    pub version: Option<String>,
    /// `platform`, e.g. `Erlang/OTP 25.2.3`.
    pub platform: Option<String>,
    /// `cluster_name`.
    pub cluster_name: Option<String>,
}

impl ServerInfo {
    /// `RabbitMQ 3.10.8` (or whatever part is known).
    pub fn product_version(&self) -> String {
        match (&self.product, &self.version) {
            (Some(p), Some(v)) => format!("{p} {v}"),
            (Some(p), None) => p.clone(),
            (None, Some(v)) => format!("version {v}"),
            (None, None) => String::from("unknown broker"),
        }
    }
}

/// Checks every URL of the list; exit code 1 if any of them fails.
pub async fn run(global: &Global, _args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let urls = global.each_url();
    let mut failed = 0;
    for (i, raw) in urls.iter().enumerate() {
        if i > 0 {
            println!();
        }
        if let Err(e) = check_one(global, raw).await {
            eprintln!("error: {}", crate::describe(&e));
            failed += 1;
        }
    }
    if failed > 0 {
        if urls.len() > 1 {
            eprintln!("{failed} of {} brokers failed the check", urls.len());
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn check_one(global: &Global, raw: &str) -> anyhow::Result<()> {
    // One attempt, no reconnect loop: a check reports, it does not wait for a broker.
    let cfg = global
        .amqp_for(raw, "warren check")?
        .with_reconnect(ReconnectPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(100),
            give_up_after: Some(Duration::ZERO),
        })
        .with_connect_timeout(global.connect_timeout);
    let url = cfg.urls().first().context("no URL given")?.clone();
    let endpoint = url.host_port();
    println!("url       {}", url.redacted());
    println!("endpoint  {endpoint}");
    if url.redacted().starts_with("amqps:") {
        println!("version   (not probed over TLS)");
    } else {
        let info = probe(&endpoint, global.connect_timeout)
            .await
            .with_context(|| format!("cannot reach a broker at {endpoint}"))?;
        let mut extra = Vec::new();
        if let Some(p) = &info.platform {
            extra.push(p.clone());
        }
        if let Some(c) = &info.cluster_name {
            extra.push(format!("cluster {c}"));
        }
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(" ({})", extra.join(", "))
        };
        println!("broker    {}{extra}", info.product_version());
    }
    let started = Instant::now();
    let broker = Broker::connect(cfg)
        .await
        .with_context(|| format!("cannot open an AMQP connection to {endpoint}"))?;
    let took = started.elapsed();
    let (vhost, user) = broker.identity().await?;
    broker.close().await;
    println!("vhost     {vhost}");
    println!("user      {user}");
    println!(
        "status    ok: logged in and opened the vhost in {} ms",
        took.as_millis()
    );
    Ok(())
}

/// The AMQP 0-9-1 protocol header a client opens with.
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// The end marker of every AMQP frame.
const FRAME_END: u8 = 0xCE;
/// Largest `Connection.Start` frame accepted (RabbitMQ's is well under 1 KiB).
const MAX_START_FRAME: usize = 64 * 1024;

/// Opens a TCP connection to `host:port`, sends the protocol header and reads the broker's
/// `Connection.Start`, then closes the socket.
pub async fn probe(host_port: &str, timeout: Duration) -> anyhow::Result<ServerInfo> {
    let work = async {
        let mut sock = TcpStream::connect(host_port).await?;
        sock.write_all(PROTOCOL_HEADER).await?;
        let mut head = [0u8; 7];
        sock.read_exact(&mut head).await?;
        if &head[..4] == b"AMQP" {
            // The broker refused our protocol version and answered with its own header.
            let mut last = [0u8; 1];
            let _ = sock.read_exact(&mut last).await;
            bail!(
                "the server speaks AMQP {}-{}-{}, not 0-9-1",
                head[5],
                head[6],
                last[0]
            );
        }
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        if size > MAX_START_FRAME {
            bail!("the server's first frame is {size} bytes: not an AMQP broker?");
        }
        let mut payload = vec![0u8; size + 1];
        sock.read_exact(&mut payload).await?;
        if payload[size] != FRAME_END || head[0] != 1 {
            bail!("the server's first frame is not an AMQP method frame: not an AMQP broker?");
        }
        payload.truncate(size);
        parse_connection_start(&payload)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => bail!("no AMQP greeting within {timeout:?}"),
    }
}

/// Reads `product`, `version`, `platform` and `cluster_name` from the payload of a
/// `Connection.Start` method frame.
pub fn parse_connection_start(p: &[u8]) -> anyhow::Result<ServerInfo> {
    let mut r = Reader { buf: p, at: 0 };
    let (class, method) = (r.u16()?, r.u16()?);
    if (class, method) != (10, 10) {
        bail!("expected connection.start (10.10), got method {class}.{method}");
    }
    let _version_major = r.u8()?;
    let _version_minor = r.u8()?;
    let table_len = r.u32()? as usize;
    let mut t = Reader {
        buf: r.take(table_len)?,
        at: 0,
    };
    let mut info = ServerInfo::default();
    while !t.done() {
        let key_len = t.u8()? as usize;
        let key = String::from_utf8_lossy(t.take(key_len)?).into_owned();
        let kind = t.u8()?;
        let text = match kind {
            b'S' | b'x' => {
                let n = t.u32()? as usize;
                Some(String::from_utf8_lossy(t.take(n)?).into_owned())
            }
            b's' | b'u' => t.take(2).map(|_| None)?,
            b't' | b'b' | b'B' => t.take(1).map(|_| None)?,
            b'I' | b'i' | b'f' => t.take(4).map(|_| None)?,
            b'l' | b'L' | b'd' | b'T' => t.take(8).map(|_| None)?,
            b'D' => t.take(5).map(|_| None)?,
            b'F' | b'A' => {
                let n = t.u32()? as usize;
                t.take(n).map(|_| None)?
            }
            b'V' => None,
            other => bail!(
                "unknown field type {:?} in server properties",
                other as char
            ),
        };
        match key.as_str() {
            "product" => info.product = text,
            "version" => info.version = text,
            "platform" => info.platform = text,
            "cluster_name" => info.cluster_name = text,
            _ => {}
        }
    }
    Ok(info)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .context("connection.start frame is truncated")?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> anyhow::Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_str(out: &mut Vec<u8>, key: &str, value: &str) {
        out.push(u8::try_from(key.len()).unwrap_or(0));
        out.extend_from_slice(key.as_bytes());
        out.push(b'S');
        out.extend_from_slice(&u32::try_from(value.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }

    #[test]
    fn parses_server_properties() {
        let mut table = Vec::new();
        // a nested table that must be skipped
        table.push(12);
        table.extend_from_slice(b"capabilities");
        table.push(b'F');
        let nested = [
            9, b'p', b'u', b'b', b'l', b'i', b's', b'h', b'e', b'r', b't', 1,
        ];
        table.extend_from_slice(&u32::try_from(nested.len()).unwrap_or(0).to_be_bytes());
        table.extend_from_slice(&nested);
        long_str(&mut table, "cluster_name", "rabbit@box");
        long_str(&mut table, "product", "RabbitMQ");
        long_str(&mut table, "version", "3.10.8");
        table.push(4);
        table.extend_from_slice(b"flag");
        table.push(b't');
        table.push(1);
        let mut p = vec![0, 10, 0, 10, 0, 9];
        p.extend_from_slice(&u32::try_from(table.len()).unwrap_or(0).to_be_bytes());
        p.extend_from_slice(&table);
        p.extend_from_slice(&[0, 0, 0, 5]);
        p.extend_from_slice(b"PLAIN");
        let info = parse_connection_start(&p).expect("parses");
        assert_eq!(info.product_version(), "RabbitMQ 3.10.8");
        assert_eq!(info.cluster_name.as_deref(), Some("rabbit@box"));
        assert!(parse_connection_start(&p[..20]).is_err());
        assert!(parse_connection_start(&[0, 10, 0, 11]).is_err());
    }
}
