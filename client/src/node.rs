//! One cache node as the client sees it: HTTP requests to it over pooled keep-alive
//! connections, and its health.
//!
//! A node that refuses connections is marked down at once; one that times out twice in a
//! row is marked down too. Reads skip down nodes (their shards count as absent) while a
//! background task probes `/health` with exponential backoff and marks the node up again
//! as soon as it answers.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::metrics::{ClientMetrics, inc};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Consecutive timeouts after which a node is considered down.
const TIMEOUTS_BEFORE_DOWN: u32 = 2;
/// First and longest wait between health probes of a down node.
const PROBE_BACKOFF_MIN: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A pooled HTTP/1.1 client for talking to nodes.
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(50))
        .pool_max_idle_per_host(256)
        .build(connector)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("connection refused or unreachable")]
    Unreachable,
    #[error("timed out")]
    Timeout,
    #[error("answered {0}")]
    Status(u16),
    #[error("{0}")]
    Transport(String),
}

#[derive(Debug, Default)]
struct Health {
    down: bool,
    consecutive_timeouts: u32,
    probing: bool,
}

pub struct Node {
    pub id: String,
    pub addr: String,
    base: String,
    health: Mutex<Health>,
}

impl Node {
    pub fn new(id: String, addr: String) -> Self {
        let base = format!("http://{addr}");
        Self {
            id,
            addr,
            base,
            health: Mutex::new(Health::default()),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_up(&self) -> bool {
        !self.health().down
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&HeaderValue>,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, token.clone());
        }
        request
            .body(Full::new(body))
            .expect("a well-formed request")
    }

    /// Sends a request and reads the whole response within `timeout`.
    async fn exchange(
        &self,
        http: &HttpClient,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), NodeError> {
        let exchange = async {
            let response = http.request(request).await.map_err(|e| {
                if e.is_connect() {
                    NodeError::Unreachable
                } else {
                    NodeError::Transport(e.to_string())
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| NodeError::Transport(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| NodeError::Timeout)?
    }

    /// GET a shard: `Ok(None)` if the node does not have it.
    pub async fn get_shard(
        &self,
        http: &HttpClient,
        token: Option<&HeaderValue>,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<Bytes>, NodeError> {
        let request = self.request(
            Method::GET,
            &format!("/v1/shards/{key}"),
            token,
            Bytes::new(),
        );
        match self.exchange(http, request, timeout).await? {
            (StatusCode::OK, body) => Ok(Some(body)),
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (status, _) => Err(NodeError::Status(status.as_u16())),
        }
    }

    /// PUT a shard, with its crc32 so that the node refuses damaged bytes.
    pub async fn put_shard(
        &self,
        http: &HttpClient,
        token: Option<&HeaderValue>,
        key: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(), NodeError> {
        let crc = crc32fast::hash(&body);
        let mut request = self.request(Method::PUT, &format!("/v1/shards/{key}"), token, body);
        request
            .headers_mut()
            .insert(slapshot_core::CRC_HEADER, HeaderValue::from(crc));
        match self.exchange(http, request, timeout).await? {
            (StatusCode::CREATED | StatusCode::NO_CONTENT, _) => Ok(()),
            (status, _) => Err(NodeError::Status(status.as_u16())),
        }
    }

    /// GET a path (such as /health or /metrics) and return the status and text.
    pub async fn get_text(
        &self,
        http: &HttpClient,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, String), NodeError> {
        let request = self.request(Method::GET, path, None, Bytes::new());
        let (status, body) = self.exchange(http, request, timeout).await?;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }

    /// Notes a request's outcome for the node's health; a node that goes down starts
    /// being probed.
    pub fn record(
        self: &Arc<Self>,
        outcome: Result<(), &NodeError>,
        http: &HttpClient,
        metrics: &Arc<ClientMetrics>,
    ) {
        let went_down = {
            let mut health = self.health();
            match outcome {
                Ok(()) | Err(NodeError::Status(_)) => {
                    health.consecutive_timeouts = 0;
                    false
                }
                Err(NodeError::Timeout) => {
                    health.consecutive_timeouts += 1;
                    !health.down && health.consecutive_timeouts >= TIMEOUTS_BEFORE_DOWN
                }
                Err(NodeError::Unreachable | NodeError::Transport(_)) => !health.down,
            }
        };
        if went_down {
            self.mark_down(http, metrics);
        }
    }

    fn mark_down(self: &Arc<Self>, http: &HttpClient, metrics: &Arc<ClientMetrics>) {
        {
            let mut health = self.health();
            if health.down {
                return;
            }
            health.down = true;
            if health.probing {
                return;
            }
            health.probing = true;
        }
        metrics
            .nodes_down
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(node = %self.id, addr = %self.addr, "node marked down");
        let (node, http, metrics) = (self.clone(), http.clone(), metrics.clone());
        tokio::spawn(async move { node.probe_until_up(&http, &metrics).await });
    }

    async fn probe_until_up(&self, http: &HttpClient, metrics: &ClientMetrics) {
        let mut backoff = PROBE_BACKOFF_MIN;
        loop {
            tokio::time::sleep(backoff).await;
            if let Ok((200, _)) = self.get_text(http, "/health", PROBE_BACKOFF_MAX).await {
                let mut health = self.health();
                health.down = false;
                health.probing = false;
                health.consecutive_timeouts = 0;
                drop(health);
                metrics
                    .nodes_down
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                inc(&metrics.node_recoveries);
                tracing::info!(node = %self.id, addr = %self.addr, "node is back up");
                return;
            }
            backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
        }
    }
}
