//! Per-client-address rate limit of the TCP API (Sistemo's `rate_limit_rps`/`rate_limit_burst`):
//! a token bucket per address; past it, `429 Too Many Requests`. The root-only Unix socket is
//! never limited.

use super::Peer;
use crate::api::{ErrorBody, ErrorKind};
use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Addresses tracked before idle ones (full buckets) are forgotten.
const MAX_TRACKED: usize = 4096;

/// Token buckets of TCP API callers, by address.
#[derive(Clone)]
pub struct RateLimit {
    rps: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<IpAddr, (f64, Instant)>>>,
}

impl RateLimit {
    /// `rps` requests per second with bursts of `burst`; `rps` 0 is no limit.
    pub fn new(rps: u32, burst: u32) -> RateLimit {
        RateLimit {
            rps: f64::from(rps),
            burst: f64::from(burst.max(1)),
            buckets: Arc::default(),
        }
    }

    /// Take a token for `ip` at `now`; false when its bucket is empty.
    fn take(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rps == 0.0 {
            return true;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_TRACKED && !b.contains_key(&ip) {
            let (rps, burst) = (self.rps, self.burst);
            b.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rps < burst);
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rps).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The middleware: requests that came over TCP take a token of their address's bucket.
pub async fn limit(State(rl): State<RateLimit>, req: Request, next: Next) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .and_then(|ConnectInfo(p)| p.0.remote.as_deref()?.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip());
    match ip {
        Some(ip) if !rl.take(ip, Instant::now()) => {
            let body = ErrorBody::new(
                ErrorKind::TooManyRequests,
                format!(
                    "too many requests from {ip} (allowed: {} per second, bursts of {}: the rate_limit_rps and rate_limit_burst settings)",
                    rl.rps, rl.burst
                ),
            );
            let mut r = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            r
        }
        _ => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_address() {
        let rl = RateLimit::new(10, 3);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| rl.take(a, t0)));
        assert!(!rl.take(a, t0), "the burst is spent");
        assert!(rl.take(b, t0), "another address has its own bucket");
        assert!(!rl.take(a, t0 + Duration::from_millis(50)));
        assert!(
            rl.take(a, t0 + Duration::from_millis(160)),
            "a token every 100 ms"
        );
        let off = RateLimit::new(0, 0);
        assert!((0..1000).all(|_| off.take(a, t0)));
    }
}
