//! Setting a node's fault injector (`slapshot-server --fault-injection`, endpoint
//! `/admin/faults`). The settings travel as lines of `key=value`:
//!
//! ```text
//! delay-fraction=0.1          # share of shard requests delayed
//! delay=exponential:10ms      # or uniform:5ms:50ms, or fixed:20ms
//! error-rate=0.01             # share answered 503
//! stall=false                 # true: shard requests get no answer at all
//! ```

use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A node's faults.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    pub delay_fraction: f64,
    /// As the server parses it: `exponential:MEAN`, `uniform:MIN:MAX` or `fixed:D`.
    pub delay: String,
    pub error_rate: f64,
    pub stall: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            delay_fraction: 0.0,
            delay: "fixed:0ms".into(),
            error_rate: 0.0,
            stall: false,
        }
    }
}

impl Faults {
    pub fn body(&self) -> String {
        format!(
            "delay-fraction={}\ndelay={}\nerror-rate={}\nstall={}\n",
            self.delay_fraction, self.delay, self.error_rate, self.stall
        )
    }
}

/// Sets `faults` on the node at `addr`.
pub async fn set(addr: SocketAddr, faults: &Faults) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::put("/admin/faults")
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(Bytes::from(faults.body())))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status == http::StatusCode::NOT_FOUND {
        bail!("{addr} has no /admin/faults: start it with --fault-injection");
    }
    if !status.is_success() {
        bail!(
            "{addr} refused the faults ({status}): {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(())
}
