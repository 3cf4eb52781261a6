//! The OTLP exporter's HTTP client: the crate's reqwest (rustls, our crypto provider) driven on the process's tokio
//! runtime. The SDK's batch processor exports from its own thread, outside any runtime, so each request is
//! spawned onto the runtime and its result awaited from there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use tracing::{debug, warn};

use super::TelemetryError;

/// Each export request gives up after this long (the OTLP default timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A collector's answer is a small protobuf message; anything larger is cut here.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// reqwest on a tokio runtime handle.
#[derive(Debug)]
pub(super) struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// The last export failed (logged once per run of failures, not once per batch).
    failing: AtomicBool,
}

impl OtlpHttp {
    /// A client that runs its requests on `runtime`.
    pub(super) fn new(runtime: tokio::runtime::Handle) -> Result<Self, TelemetryError> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().map_err(TelemetryError::Client)?;
        Ok(Self { client, runtime, failing: AtomicBool::new(false) })
    }

    /// Log the first failure of a series, and the recovery.
    fn note(&self, result: &Result<Response<Bytes>, HttpError>) {
        let failed = match result {
            Ok(response) => !response.status().is_success(),
            Err(_) => true,
        };
        let was = self.failing.swap(failed, Ordering::Relaxed);
        match (was, failed, result) {
            (false, true, Ok(response)) => {
                warn!(status = %response.status(), "The trace collector refused spans; they are dropped until it accepts them.")
            }
            (false, true, Err(error)) => warn!(
                error = %crate::redact::redact_text(&crate::report::Chain(error.as_ref()).to_string()),
                "Cannot send spans to the trace collector; they are dropped until it answers."
            ),
            (true, false, _) => debug!("The trace collector accepts spans again."),
            _ => {}
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let result = match self.runtime.spawn(send(client, request)).await {
            Ok(result) => result,
            Err(joined) => Err(joined.into()),
        };
        self.note(&result);
        result
    }
}

/// One request, its response body read up to [`MAX_RESPONSE_BYTES`].
async fn send(client: reqwest::Client, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
    let mut response = client.execute(reqwest::Request::try_from(request)?).await?;
    let mut answer = Response::builder().status(response.status());
    for (name, value) in response.headers() {
        answer = answer.header(name, value);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_RESPONSE_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok(answer.body(Bytes::from(body))?)
}
