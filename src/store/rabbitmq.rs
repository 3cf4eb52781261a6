//! RabbitMQ job queue (lapin): a durable work queue with dead-letter and delay queues, publisher confirms on every
//! publish, manual acks, a bounded prefetch, and a supervisor task that reconnects with backoff when the broker
//! goes away.
//!
//! Topology of a queue named `q` (everything durable, declared on every (re)connection):
//! - `q`: the work queue (`x-queue-type` quorum or classic, `x-dead-letter-exchange` `q.dlx`; quorum queues also
//!   get `x-delivery-limit` 50 as a poison-message backstop). The worker dead-letters bad jobs itself, with a
//!   reason header and a confirmed publish (at-least-once); the broker's dead-lettering only serves the delivery
//!   limit and keeps the default at-most-once strategy: `x-dead-letter-strategy: at-least-once` depends on the
//!   broker's `rabbit_fifo_dlx_sup`, which RabbitMQ 3.10 sometimes does not have running after a restart, and
//!   then every such queue crashes on leader election (seen here; the queue can no longer be consumed);
//! - `q.dlx`: a fanout exchange bound to `q.dead`, the dead-letter queue;
//! - `q.delay`: a classic queue without consumers whose messages carry a per-message `expiration`; an expired
//!   message is dead-lettered through the default exchange back to `q`. RabbitMQ only expires messages at the head
//!   of a queue, so a message with a short delay queued behind one with a longer delay waits for the longer one.
//!
//! Connections: one AMQP connection per [`RabbitQueue`] (named by [`AmqpConfig::connection_name`]) with a
//! publisher channel in confirm mode, a consumer channel (once [`RabbitQueue::start_consuming`] was called) and
//! short-lived channels for declarations and queue inspection (a failed declaration closes its channel).

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Acker, Delivery, Job, JobQueue, StoreError, StoreResult};
use crate::config::{DEFAULT_PREFETCH, DEFAULT_QUEUE};
use crate::redact::redact_text;
use crate::telemetry::TraceHeaders;
use crate::tls::{ClientTls, Roots, TlsSettings, Verify};

/// Connection attempts at start-up before [`RabbitQueue::connect`] gives up.
const STARTUP_ATTEMPTS: u32 = 8;
/// First reconnection delay (doubled per failed attempt, with jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest reconnection delay.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Time allowed for one TCP + AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish waits for a connection (and its confirms) during an outage before it fails.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);
/// How often the supervisor checks the connection and channel states.
const HEALTH_INTERVAL: Duration = Duration::from_millis(250);
/// A connection that stayed up this long resets the reconnection backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Time allowed for a broker round trip that is not a publish (cancel, close, inspection).
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cancelled consumer may keep delivering before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The header carrying the reason of a dead-lettered message.
pub const REASON_HEADER: &str = "x-flowcraft-reason";
/// The largest frame this client proposes unless the URL sets `frame_max` (the smaller of the client's and the
/// server's wins). lapin keeps a receive and a send ring buffer of 32 frames each per connection, written through,
/// so at RabbitMQ's default of 128 KiB they were 8 MiB of every worker's resident memory; job messages are a few
/// hundred bytes, and a larger body is split into more frames (docs/architecture.md, "Memory").
pub const DEFAULT_FRAME_MAX: u32 = 16 * 1024;

/// Delivery limit of quorum work queues: a message delivered this often is dead-lettered (poison backstop).
pub const DELIVERY_LIMIT: i32 = 50;
/// Longest queue name accepted (RabbitMQ allows 255 bytes, minus the longest suffix, `.delay`).
const MAX_QUEUE_NAME: usize = 255 - ".delay".len();

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------

/// The type of the work queue (RabbitMQ queue type; also the `spec.queue.type` of a worker pool).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated (Raft) queue: the default, with a delivery limit as a poison backstop.
    #[default]
    Quorum,
    /// Classic queue (single node).
    Classic,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueType {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(StoreError::config(format!("unknown queue type {other:?}: expected quorum or classic"))),
        }
    }
}

/// How to reach RabbitMQ and which queue to use.
#[derive(Clone)]
pub struct AmqpConfig {
    /// AMQP URL, e.g. `amqp://user:password@host:5672/%2f`.
    pub url: String,
    /// Name of the work queue; the dead-letter exchange, dead-letter queue and delay queue derive from it.
    pub queue: String,
    /// Type of the work queue (and of its dead-letter queue).
    pub queue_type: QueueType,
    /// Unacknowledged deliveries handed to this consumer at most (also bounds the internal buffer).
    pub prefetch: u16,
    /// The `connection_name` client property (shown by `rabbitmqctl list_connections client_properties`).
    pub connection_name: String,
    /// Extra CAs and the default client certificate of `amqps://` connections.
    pub tls: TlsSettings,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://127.0.0.1:5672/%2f".to_string(),
            queue: DEFAULT_QUEUE.to_string(),
            queue_type: QueueType::Quorum,
            prefetch: DEFAULT_PREFETCH,
            connection_name: "flowcraft".to_string(),
            tls: TlsSettings::none(),
        }
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("connection_name", &self.connection_name)
            .field("tls", &self.tls)
            .finish()
    }
}

fn redact(url: &str) -> String {
    crate::redact::redact_url(url)
}

fn check_queue_name(queue: &str) -> StoreResult<()> {
    if queue.is_empty() {
        return Err(StoreError::config("the queue name is empty"));
    }
    if queue.len() > MAX_QUEUE_NAME {
        return Err(StoreError::config(format!(
            "queue name {queue:?} is longer than {MAX_QUEUE_NAME} bytes (its .delay queue would exceed RabbitMQ's limit)"
        )));
    }
    if queue.starts_with("amq.") {
        return Err(StoreError::config(format!("queue name {queue:?} uses the reserved prefix amq.")));
    }
    Ok(())
}

/// Where and how to connect: the parsed URI (credentials, vhost, tuning), the host and port (lapin's parser turns
/// an IP address host into `localhost`, so they are taken from the URL here), and the TLS of an `amqps://` URL.
#[derive(Clone)]
struct Endpoint {
    uri: AMQPUri,
    host: String,
    port: u16,
    tls: Option<TlsEndpoint>,
}

#[derive(Clone)]
struct TlsEndpoint {
    connector: RustlsConnector,
    /// The name the certificate is checked against (and sent as SNI unless disabled).
    server_name: String,
}

impl Endpoint {
    /// `host:port`, for messages.
    fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The TLS query parameters of RabbitMQ's URI specification (`cacertfile`, `certfile`, `keyfile`, `verify`,
/// `server_name_indication`) as rustls options and the server name to check.
fn amqp_client_tls(url: &url::Url, host: &str) -> StoreResult<(ClientTls, String)> {
    let param = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
    let mut tls = ClientTls::default();
    if let Some(ca) = param("cacertfile") {
        tls.roots = Roots::File(ca.into());
    }
    tls.identity = match (param("certfile"), param("keyfile")) {
        (Some(cert), Some(key)) => Some((cert.into(), key.into())),
        (None, None) => None,
        _ => return Err(StoreError::config("the AMQP URL must give certfile and keyfile together".to_string())),
    };
    tls.verify = match param("verify").as_deref() {
        None | Some("verify_peer") => Verify::Full,
        Some("verify_none") => Verify::None,
        Some(other) => {
            return Err(StoreError::config(format!(
                "invalid AMQP URL parameter verify={other:?}: use verify_peer or verify_none"
            )));
        }
    };
    let server_name = match param("server_name_indication").as_deref() {
        None => host.to_string(),
        // As in Erlang's ssl: no SNI, and the host name is not checked (the chain still is).
        Some("disable") => {
            tls.sni = false;
            if tls.verify == Verify::Full {
                tls.verify = Verify::ChainOnly;
            }
            host.to_string()
        }
        Some(name) => name.to_string(),
    };
    Ok((tls, server_name))
}

const TLS_PARAMETERS: [&str; 5] = ["cacertfile", "certfile", "keyfile", "verify", "server_name_indication"];

fn parse_url(url: &str, queue: &str, settings: &TlsSettings) -> StoreResult<Endpoint> {
    let invalid = |error: String| {
        StoreError::config(format!("invalid AMQP URL {} for queue {queue}: {}", redact(url), redact_text(&error)))
    };
    let mut uri = url.parse::<AMQPUri>().map_err(invalid)?;
    uri.query.frame_max = Some(uri.query.frame_max.unwrap_or(DEFAULT_FRAME_MAX));
    let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    let host = match parsed.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(other) => percent_encoding::percent_decode_str(&other.to_string()).decode_utf8_lossy().into_owned(),
        None => uri.authority.host.clone(),
    };
    let port = uri.authority.port;
    let tls = match uri.scheme {
        AMQPScheme::AMQP => {
            if let Some((name, _)) = parsed.query_pairs().find(|(k, _)| TLS_PARAMETERS.contains(&k.as_ref())) {
                return Err(invalid(format!("{name} is a TLS parameter: use an amqps:// URL for TLS")));
            }
            None
        }
        AMQPScheme::AMQPS => {
            let (options, server_name) = amqp_client_tls(&parsed, &host)?;
            let config = settings
                .client_config(&options)
                .map_err(|e| StoreError::config(format!("RabbitMQ TLS settings for queue {queue}: {e}")))?;
            Some(TlsEndpoint { connector: RustlsConnector::from(Arc::new(config)), server_name })
        }
    };
    Ok(Endpoint { uri, host, port, tls })
}

/// Names of the queue's topology.
#[derive(Debug, Clone)]
struct Names {
    work: String,
    dlx: String,
    dead: String,
    delay: String,
}

impl Names {
    fn new(queue: &str) -> Self {
        Self {
            work: queue.to_string(),
            dlx: format!("{queue}.dlx"),
            dead: format!("{queue}.dead"),
            delay: format!("{queue}.delay"),
        }
    }
}

/// A short string (queue names are checked up front; message ids and expirations may not fit).
fn short(value: &str, what: &str, queue: &str) -> StoreResult<ShortString> {
    ShortString::try_new(value)
        .map_err(|error| StoreError::queue(format!("{what} {value:?} for queue {queue} is too long: {error}")))
}

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// A header's text (long or short string), if it is one.
fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The W3C trace context headers of a job message (the publisher's span, `crate::telemetry`), `None` when empty.
fn trace_field_table(trace: &TraceHeaders) -> Option<FieldTable> {
    let mut table = FieldTable::default();
    for (name, value) in trace.pairs() {
        table.insert(name.into(), long(value));
    }
    (!table.inner().is_empty()).then_some(table)
}

/// The trace context headers of a delivered message.
fn trace_headers(table: Option<&FieldTable>) -> TraceHeaders {
    let mut trace = TraceHeaders::default();
    for name in TraceHeaders::NAMES {
        if let Some(value) = table.and_then(|t| t.inner().get(name)).and_then(header_text) {
            trace.insert(name, value);
        }
    }
    trace
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

fn soft_error(error: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some((soft.clone(), amqp.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Errors that another attempt (after a reconnection) cannot fix.
fn is_permanent(error: &lapin::Error) -> bool {
    matches!(
        soft_error(error),
        Some((AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED | AMQPSoftError::CONTENTTOOLARGE, _))
    )
}

/// A broker error of `op`.
fn amqp(op: String, error: lapin::Error) -> StoreError {
    StoreError::Queue { op, source: Some(error.into()) }
}

fn declare_error(kind: &str, name: &str, error: lapin::Error) -> StoreError {
    match soft_error(&error) {
        Some((AMQPSoftError::PRECONDITIONFAILED, _)) => StoreError::Config {
            message: format!(
                "{kind} {name} already exists with different settings; delete it or configure the same queue type"
            ),
            source: Some(error.into()),
        },
        _ => amqp(format!("declaring {kind} {name}"), error),
    }
}

fn queue_error(queue: &str, what: &str, error: lapin::Error) -> StoreError {
    match soft_error(&error) {
        Some((AMQPSoftError::NOTFOUND, _)) => amqp(format!("{what} on queue {queue}: it does not exist"), error),
        _ => amqp(format!("{what} on queue {queue}"), error),
    }
}

async fn with_timeout<T>(queue: &str, what: &str, future: impl Future<Output = lapin::Result<T>>) -> StoreResult<T> {
    match tokio::time::timeout(RPC_TIMEOUT, future).await {
        Ok(result) => result.map_err(|error| queue_error(queue, what, error)),
        Err(_) => Err(StoreError::queue(format!("{what} on queue {queue} timed out after {RPC_TIMEOUT:?}"))),
    }
}

/// Exponential backoff with jitter: between half and all of `min(base * 2^attempt, cap)`.
fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let full = exp.min(BACKOFF_CAP);
    let half = full / 2;
    let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(jitter_ms)
}

// ------------------------------------------------------------------------------------------------
// Connecting and declaring
// ------------------------------------------------------------------------------------------------

async fn open_connection(endpoint: &Endpoint, connection_name: &str, queue: &str) -> StoreResult<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    let runtime = lapin::runtime::default_runtime()
        .map_err(|error| amqp(format!("RabbitMQ for queue {queue}: no async runtime"), error))?;
    let target = endpoint.clone();
    // The socket is opened here rather than by lapin: lapin's own connector has no TLS without its TLS features
    // and would speak clear text to an amqps:// URL, and it resolves IP address hosts as "localhost".
    let connect = async move |_uri: AMQPUri, runtime| {
        let addrs: Vec<std::net::SocketAddr> =
            tokio::net::lookup_host((target.host.as_str(), target.port)).await?.collect();
        let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
        match &target.tls {
            None => Ok(stream),
            Some(tls) => Ok(stream.into_rustls(&tls.connector, &tls.server_name).await?),
        }
    };
    let opened = tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connector(endpoint.uri.clone(), runtime, connect, properties),
    );
    let address = endpoint.address();
    match opened.await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(connect_error(&address, queue, error)),
        Err(_) => Err(StoreError::queue(format!(
            "connecting to RabbitMQ at {address} for queue {queue} timed out after {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// A failed connection attempt, classified: TLS failures, refused credentials and unknown vhosts are permanent.
fn connect_error(address: &str, queue: &str, error: lapin::Error) -> StoreError {
    if let Some(why) = crate::tls::describe_failure(&error) {
        return StoreError::Tls {
            service: "RabbitMQ",
            message: format!("TLS to {address} for queue {queue} failed: {why}"),
        };
    }
    if let ErrorKind::ProtocolError(amqp) = error.kind() {
        let refused = match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some("the credentials were refused"),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some("the virtual host does not exist or is not allowed"),
            _ => None,
        };
        if let Some(why) = refused {
            return StoreError::Refused {
                service: "RabbitMQ",
                message: format!("{address} refused the connection for queue {queue}: {why} ({})", amqp.get_message()),
            };
        }
    }
    amqp(format!("connecting to RabbitMQ at {address} for queue {queue}"), error)
}

async fn close_connection(connection: &Connection, queue: &str) {
    if connection.status().connected() {
        match tokio::time::timeout(RPC_TIMEOUT, connection.close(200, "closing".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(queue = %queue, error = %error, "Closing the connection failed.")
            }
            Err(_) => debug!(queue = %queue, "Closing the connection timed out."),
        }
    }
}

async fn close_channel(channel: &Channel, queue: &str) {
    if channel.status().connected() {
        match tokio::time::timeout(RPC_TIMEOUT, channel.close(200, "done".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!(queue = %queue, error = %error, "Closing a channel failed."),
            Err(_) => debug!(queue = %queue, "Closing a channel timed out."),
        }
    }
}

fn work_arguments(queue_type: QueueType, names: &Names) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long(queue_type.as_str()));
    args.insert("x-dead-letter-exchange".into(), long(&names.dlx));
    if queue_type == QueueType::Quorum {
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(DELIVERY_LIMIT));
    }
    args
}

fn dead_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long(queue_type.as_str()));
    args
}

fn delay_arguments(names: &Names) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("classic"));
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(&names.work));
    args
}

async fn declare_topology(connection: &Connection, queue_type: QueueType, names: &Names) -> StoreResult<()> {
    let channel = with_timeout(&names.work, "opening a channel", connection.create_channel()).await?;
    let result = declare_on(&channel, queue_type, names).await;
    close_channel(&channel, &names.work).await;
    result
}

async fn declare_on(channel: &Channel, queue_type: QueueType, names: &Names) -> StoreResult<()> {
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let timeout = |name: &str| StoreError::queue(format!("declaring {name} timed out after {RPC_TIMEOUT:?}"));
    let exchange = channel.exchange_declare(
        names.dlx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
        FieldTable::default(),
    );
    tokio::time::timeout(RPC_TIMEOUT, exchange)
        .await
        .map_err(|_| timeout(&names.dlx))?
        .map_err(|error| declare_error("exchange", &names.dlx, error))?;
    let dead = channel.queue_declare(names.dead.as_str().into(), durable, dead_arguments(queue_type));
    tokio::time::timeout(RPC_TIMEOUT, dead)
        .await
        .map_err(|_| timeout(&names.dead))?
        .map_err(|error| declare_error("queue", &names.dead, error))?;
    let bind = channel.queue_bind(
        names.dead.as_str().into(),
        names.dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    tokio::time::timeout(RPC_TIMEOUT, bind)
        .await
        .map_err(|_| timeout(&names.dead))?
        .map_err(|error| declare_error("binding of queue", &names.dead, error))?;
    let work = channel.queue_declare(names.work.as_str().into(), durable, work_arguments(queue_type, names));
    tokio::time::timeout(RPC_TIMEOUT, work)
        .await
        .map_err(|_| timeout(&names.work))?
        .map_err(|error| declare_error("queue", &names.work, error))?;
    let delay = channel.queue_declare(names.delay.as_str().into(), durable, delay_arguments(names));
    tokio::time::timeout(RPC_TIMEOUT, delay)
        .await
        .map_err(|_| timeout(&names.delay))?
        .map_err(|error| declare_error("queue", &names.delay, error))?;
    Ok(())
}

/// Messages ready in `queue` (passive declare on a short-lived channel: a missing queue closes the channel).
async fn passive_depth(connection: &Connection, queue: &str) -> StoreResult<u32> {
    let channel = with_timeout(queue, "opening a channel", connection.create_channel()).await?;
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared =
        with_timeout(queue, "inspecting", channel.queue_declare(queue.into(), options, FieldTable::default())).await;
    close_channel(&channel, queue).await;
    Ok(declared?.message_count())
}

/// Messages ready in the work queue `queue` at `url` (one short connection; for autoscaling on queue depth).
pub async fn queue_depth(url: &str, queue: &str, tls: &TlsSettings) -> StoreResult<u32> {
    check_queue_name(queue)?;
    let endpoint = parse_url(url, queue, tls)?;
    let connection = open_connection(&endpoint, "flowcraft-queue-depth", queue).await?;
    let depth = passive_depth(&connection, queue).await;
    close_connection(&connection, queue).await;
    depth
}

/// Open and close one connection to `url` (the operator's check of a pool's broker: address, credentials,
/// virtual host and TLS); `queue` only names the pool's queue in errors.
pub async fn check_connection(url: &str, queue: &str, tls: &TlsSettings) -> StoreResult<()> {
    check_queue_name(queue)?;
    let endpoint = parse_url(url, queue, tls)?;
    let connection = open_connection(&endpoint, "flowcraft-operator-check", queue).await?;
    close_connection(&connection, queue).await;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Sessions (one connection with its channels) and publishing
// ------------------------------------------------------------------------------------------------

/// The consumer of a session.
struct ConsumerSlot {
    channel: Channel,
    tag: ShortString,
    /// Set when we cancelled it ourselves (its end is then expected).
    cancelled: Arc<AtomicBool>,
}

/// One live connection with its publisher channel and (maybe) its consumer.
struct Session {
    connection: Connection,
    publisher: Channel,
    consumer: tokio::sync::Mutex<Option<ConsumerSlot>>,
    /// The consumer of this session is delivering.
    consumer_active: Arc<AtomicBool>,
    /// Something on this session failed: the supervisor replaces it.
    lost: CancellationToken,
    opened: Instant,
}

impl Session {
    /// Why this session is unusable, if it is.
    fn problem(&self) -> Option<&'static str> {
        if self.lost.is_cancelled() {
            Some("a channel failed")
        } else if !self.connection.status().connected() {
            Some("the connection is closed")
        } else if !self.publisher.status().connected() {
            Some("the publisher channel is closed")
        } else {
            None
        }
    }
}

/// A message ready to publish.
struct Outgoing {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
    id: String,
}

enum PublishFailure {
    /// The broker answered: nack or returned (unroutable).
    Rejected(String),
    /// The channel or connection failed.
    Channel(lapin::Error),
}

/// Publish every message, then await every confirm (even after a failure, so none is left pending).
async fn publish_on(channel: &Channel, messages: &[Outgoing]) -> Result<(), PublishFailure> {
    let mut confirms = Vec::with_capacity(messages.len());
    for message in messages {
        let confirm = channel
            .basic_publish(
                message.exchange.clone(),
                message.routing_key.clone(),
                BasicPublishOptions { mandatory: true, immediate: false },
                &message.body,
                message.properties.clone(),
            )
            .await
            .map_err(PublishFailure::Channel)?;
        confirms.push((message, confirm));
    }
    let mut failure = None;
    for (message, confirm) in confirms {
        let outcome = match confirm.await {
            Ok(Confirmation::Ack(None)) => continue,
            Ok(Confirmation::Ack(Some(returned))) => PublishFailure::Rejected(format!(
                "message {} to {:?} was returned as unroutable ({} {})",
                message.id,
                message.routing_key.as_str(),
                returned.reply_code,
                returned.reply_text
            )),
            Ok(Confirmation::Nack(_)) => {
                PublishFailure::Rejected(format!("the broker refused message {} (nack)", message.id))
            }
            Ok(Confirmation::NotRequested) => {
                PublishFailure::Rejected("publisher confirms are not enabled on the channel".to_string())
            }
            Err(error) => PublishFailure::Channel(error),
        };
        failure.get_or_insert(outcome);
    }
    failure.map_or(Ok(()), Err)
}

// ------------------------------------------------------------------------------------------------
// Settling deliveries
// ------------------------------------------------------------------------------------------------

/// Settles one delivery on the channel it came from.
struct RabbitAcker {
    acker: lapin::Acker,
    /// Keeps the consumer channel open until the delivery is settled.
    channel: Channel,
    queue: String,
}

impl RabbitAcker {
    async fn settle(&self, op: &'static str, result: lapin::Result<bool>) -> StoreResult<()> {
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                debug!(queue = %self.queue, op, "Delivery not settled: its channel is gone (the broker redelivers it) or it was already settled.");
                Ok(())
            }
            Err(error) if !self.channel.status().connected() => {
                debug!(queue = %self.queue, op, error = %error, "Delivery not settled: its channel died; the broker redelivers it.");
                Ok(())
            }
            Err(error) => Err(amqp(format!("{op} on queue {}", self.queue), error)),
        }
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> StoreResult<()> {
        let result = self.acker.ack(BasicAckOptions::default()).await;
        self.settle("ack", result).await
    }

    async fn requeue(&self) -> StoreResult<()> {
        let result = self.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await;
        self.settle("requeue", result).await
    }
}

/// Everything the consumer forwarding task needs.
struct Forwarder {
    consumer: lapin::Consumer,
    channel: Channel,
    tx: mpsc::Sender<Delivery>,
    queue: String,
    active: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
    lost: CancellationToken,
    stop: CancellationToken,
    shutdown: CancellationToken,
}

impl Forwarder {
    /// Forward deliveries into the internal channel until the consumer ends.
    async fn run(mut self) {
        let stop = self.stop.clone();
        let grace = async move {
            stop.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::pin!(grace);
        let end: Option<String> = loop {
            let item = tokio::select! {
                item = self.consumer.next() => item,
                () = &mut grace => break Some("the consumer kept running after its cancellation".to_string()),
                () = self.shutdown.cancelled() => break None,
            };
            let delivery = match item {
                None => break Some("the consumer was cancelled".to_string()),
                Some(Err(error)) => break Some(error.to_string()),
                Some(Ok(delivery)) => delivery,
            };
            let delivery = Delivery {
                trace: trace_headers(delivery.properties.headers().as_ref()),
                body: delivery.data,
                redelivered: delivery.redelivered,
                acker: Box::new(RabbitAcker {
                    acker: delivery.acker,
                    channel: self.channel.clone(),
                    queue: self.queue.clone(),
                }),
            };
            tokio::select! {
                sent = self.tx.send(delivery) => if sent.is_err() { break None },
                () = self.shutdown.cancelled() => break None,
            }
        };
        self.active.store(false, Ordering::SeqCst);
        let expected =
            self.cancelled.load(Ordering::SeqCst) || self.stop.is_cancelled() || self.shutdown.is_cancelled();
        match end {
            Some(reason) if !expected => {
                warn!(queue = %self.queue, error = %reason, "Consumer ended unexpectedly; reconnecting.");
                self.lost.cancel();
            }
            _ => debug!(queue = %self.queue, "Consumer ended."),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The queue
// ------------------------------------------------------------------------------------------------

/// State shared by the queue handle, its supervisor and its consumer tasks.
struct Inner {
    cfg: AmqpConfig,
    endpoint: Endpoint,
    names: Names,
    /// The live session, `None` during an outage.
    session: watch::Sender<Option<Arc<Session>>>,
    /// `start_consuming` was called and `stop_consuming` was not.
    consume_wanted: AtomicBool,
    /// Feeds `next_delivery`; dropped by `stop_consuming` and `close` so that it ends.
    delivery_tx: Mutex<Option<mpsc::Sender<Delivery>>>,
    /// Cancelled by `stop_consuming`.
    stop: CancellationToken,
    /// Cancelled by `close` (or when the handle is dropped).
    shutdown: CancellationToken,
}

impl Inner {
    fn queue(&self) -> &str {
        &self.names.work
    }

    async fn open_session(&self) -> StoreResult<Arc<Session>> {
        let connection = open_connection(&self.endpoint, &self.cfg.connection_name, self.queue()).await?;
        let result = async {
            declare_topology(&connection, self.cfg.queue_type, &self.names).await?;
            let publisher =
                with_timeout(self.queue(), "opening the publisher channel", connection.create_channel()).await?;
            with_timeout(
                self.queue(),
                "enabling publisher confirms",
                publisher.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
            Ok(publisher)
        }
        .await;
        match result {
            Ok(publisher) => Ok(Arc::new(Session {
                connection,
                publisher,
                consumer: tokio::sync::Mutex::new(None),
                consumer_active: Arc::new(AtomicBool::new(false)),
                lost: CancellationToken::new(),
                opened: Instant::now(),
            })),
            Err(error) => {
                close_connection(&connection, self.queue()).await;
                Err(error)
            }
        }
    }

    /// The live session, waiting for a reconnection until `deadline`.
    async fn wait_session(&self, deadline: Instant) -> StoreResult<Arc<Session>> {
        let mut rx = self.session.subscribe();
        loop {
            if self.shutdown.is_cancelled() {
                return Err(StoreError::queue(format!("queue {} is closed", self.queue())));
            }
            let current = rx.borrow_and_update().clone();
            if let Some(session) = current
                && session.problem().is_none()
            {
                return Ok(session);
            }
            let wait = async {
                tokio::select! {
                    changed = rx.changed() => changed.is_ok(),
                    () = self.shutdown.cancelled() => false,
                    // A session may fail without the watch changing: look again now and then.
                    () = tokio::time::sleep(HEALTH_INTERVAL) => true,
                }
            };
            match tokio::time::timeout_at(deadline, wait).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(StoreError::queue(format!("queue {} is closed", self.queue())));
                }
                Err(_) => {
                    return Err(StoreError::queue(format!(
                        "RabbitMQ is unavailable for queue {}: no connection within {PUBLISH_DEADLINE:?}",
                        self.queue()
                    )));
                }
            }
        }
    }

    /// Publish `messages` with confirms, waiting through outages (until a deadline) and republishing the whole
    /// batch after a reconnection (duplicates are harmless; a lost job is not).
    async fn publish_all(&self, what: &str, messages: &[Outgoing]) -> StoreResult<()> {
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        let mut retries = 0u32;
        loop {
            let session = self.wait_session(deadline).await?;
            let error = match tokio::time::timeout_at(deadline, publish_on(&session.publisher, messages)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(PublishFailure::Rejected(message))) => {
                    return Err(StoreError::queue(format!(
                        "publishing {what} to queue {} failed: {message}",
                        self.queue()
                    )));
                }
                Ok(Err(PublishFailure::Channel(error))) => error,
                Err(_) => {
                    let blocked = session.connection.status().blocked();
                    if !blocked {
                        // Pending confirms would stay registered on this channel: start afresh.
                        session.lost.cancel();
                    }
                    let why = if blocked { " (the broker blocks publishers: resource alarm)" } else { "" };
                    return Err(StoreError::queue(format!(
                        "publishing {what} to queue {}: not confirmed within {PUBLISH_DEADLINE:?}{why}",
                        self.queue()
                    )));
                }
            };
            let channel_dead = session.problem().is_some();
            if channel_dead {
                session.lost.cancel();
            }
            if !channel_dead || is_permanent(&error) {
                return Err(amqp(format!("publishing {what} to queue {}", self.queue()), error));
            }
            retries += 1;
            warn!(queue = %self.queue(), error = %error, retries, "Publish interrupted by a connection loss; republishing after reconnection.");
        }
    }

    /// Start the consumer on `session` unless it runs already or consuming is not wanted.
    async fn ensure_consumer(&self, session: &Session) -> StoreResult<()> {
        let mut slot = session.consumer.lock().await;
        if slot.is_some() || !self.consume_wanted.load(Ordering::SeqCst) {
            return Ok(());
        }
        let tx = self.delivery_tx.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(tx) = tx else {
            return Ok(());
        };
        let queue = self.queue();
        let channel = with_timeout(queue, "opening the consumer channel", session.connection.create_channel()).await?;
        let started = async {
            with_timeout(
                queue,
                "setting the prefetch",
                channel.basic_qos(self.cfg.prefetch, BasicQosOptions::default()),
            )
            .await?;
            let tag = short(&format!("flowcraft-{}", uuid::Uuid::new_v4()), "consumer tag", queue)?;
            with_timeout(
                queue,
                "starting the consumer",
                channel.basic_consume(queue.into(), tag, BasicConsumeOptions::default(), FieldTable::default()),
            )
            .await
        }
        .await;
        let consumer = match started {
            Ok(consumer) => consumer,
            Err(error) => {
                close_channel(&channel, queue).await;
                return Err(error);
            }
        };
        let cancelled = Arc::new(AtomicBool::new(false));
        session.consumer_active.store(true, Ordering::SeqCst);
        *slot = Some(ConsumerSlot { channel: channel.clone(), tag: consumer.tag(), cancelled: cancelled.clone() });
        let forwarder = Forwarder {
            consumer,
            channel,
            tx,
            queue: queue.to_string(),
            active: session.consumer_active.clone(),
            cancelled,
            lost: session.lost.clone(),
            stop: self.stop.clone(),
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(forwarder.run());
        info!(queue = %queue, prefetch = self.cfg.prefetch, "Consuming.");
        Ok(())
    }

    /// Cancel the consumer of `session` (its channel stays open so handed-out deliveries can be settled).
    async fn cancel_consumer(&self, session: &Session) {
        let slot = session.consumer.lock().await;
        let Some(slot) = slot.as_ref() else {
            return;
        };
        if slot.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        let cancel = slot.channel.basic_cancel(slot.tag.clone(), BasicCancelOptions::default());
        match with_timeout(self.queue(), "cancelling the consumer", cancel).await {
            Ok(()) => info!(queue = %self.queue(), "Stopped consuming."),
            Err(error) => {
                debug!(queue = %self.queue(), error = %error, "Cancelling the consumer failed; its channel is gone.")
            }
        }
    }

    /// Wait until `session` fails (`Some(reason)`) or the queue is closed (`None`).
    async fn watch_session(&self, session: &Session) -> Option<String> {
        let mut events = session.connection.events_listener();
        let mut events_open = true;
        let mut tick = tokio::time::interval(HEALTH_INTERVAL);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = session.lost.cancelled() => return Some("a channel failed".to_string()),
                event = events.next(), if events_open => match event {
                    Some(lapin::Event::Error(error)) => {
                        // A channel error (e.g. an inspection of a missing queue) does not end the connection.
                        if let Some(problem) = session.problem() {
                            return Some(format!("{problem}: {error}"));
                        }
                    }
                    Some(_) => {}
                    None => events_open = false,
                },
                _ = tick.tick() => {
                    if let Some(problem) = session.problem() {
                        return Some(problem.to_string());
                    }
                }
            }
        }
    }

    /// Reconnect with backoff until it works (`Some`) or the queue is closed (`None`).
    async fn reconnect(&self, mut failures: u32) -> Option<Arc<Session>> {
        loop {
            let delay = backoff(failures);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return None,
            }
            let opened = tokio::select! {
                opened = self.open_session() => opened,
                () = self.shutdown.cancelled() => return None,
            };
            match opened {
                Ok(session) => return Some(session),
                Err(error) => {
                    failures = failures.saturating_add(1);
                    warn!(queue = %self.queue(), error = %error, attempt = failures, "Reconnecting failed; retrying.");
                }
            }
        }
    }

    /// Keep a session alive: watch it, replace it when it fails, start the consumer on every new one.
    async fn supervise(self: Arc<Self>, first: Arc<Session>) {
        let mut session = first;
        let mut failures = 0u32;
        loop {
            self.session.send_replace(Some(session.clone()));
            if self.consume_wanted.load(Ordering::SeqCst)
                && let Err(error) = self.ensure_consumer(&session).await
            {
                warn!(queue = %self.queue(), error = %error, "Starting the consumer failed; reconnecting.");
                session.lost.cancel();
            }
            let reason = self.watch_session(&session).await;
            self.session.send_replace(None);
            close_connection(&session.connection, self.queue()).await;
            let Some(reason) = reason else {
                debug!(queue = %self.queue(), "Connection closed.");
                return;
            };
            warn!(queue = %self.queue(), error = %reason, "Connection lost; reconnecting.");
            failures = if session.opened.elapsed() > STABLE_AFTER { 0 } else { failures.saturating_add(1) };
            drop(session);
            session = match self.reconnect(failures).await {
                Some(session) => session,
                None => return,
            };
            info!(queue = %self.queue(), "Reconnected.");
        }
    }
}

/// The RabbitMQ [`JobQueue`].
pub struct RabbitQueue {
    inner: Arc<Inner>,
    deliveries: tokio::sync::Mutex<mpsc::Receiver<Delivery>>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for RabbitQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitQueue").field("cfg", &self.inner.cfg).finish()
    }
}

impl RabbitQueue {
    /// Connect (retrying with backoff a bounded number of times), declare the topology and start the supervisor
    /// that reconnects when the connection is lost. Does not consume: see [`RabbitQueue::start_consuming`].
    ///
    /// A topology conflict (a queue that exists with other arguments) fails at once with
    /// [`StoreError::Config`].
    pub async fn connect(cfg: AmqpConfig) -> StoreResult<Self> {
        check_queue_name(&cfg.queue)?;
        if cfg.prefetch == 0 {
            return Err(StoreError::config(format!(
                "prefetch for queue {} must be at least 1 (0 would be unlimited)",
                cfg.queue
            )));
        }
        let endpoint = parse_url(&cfg.url, &cfg.queue, &cfg.tls)?;
        let names = Names::new(&cfg.queue);
        let (tx, rx) = mpsc::channel(usize::from(cfg.prefetch));
        let inner = Arc::new(Inner {
            endpoint,
            names,
            session: watch::Sender::new(None),
            consume_wanted: AtomicBool::new(false),
            delivery_tx: Mutex::new(Some(tx)),
            stop: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            cfg,
        });
        let mut attempt = 0u32;
        let session = loop {
            match inner.open_session().await {
                Ok(session) => break session,
                Err(error) if error.is_permanent() => return Err(error),
                Err(error) => {
                    attempt += 1;
                    if attempt >= STARTUP_ATTEMPTS {
                        let url = redact(&inner.cfg.url);
                        let op = format!(
                            "cannot reach RabbitMQ at {url} for queue {} after {attempt} attempts",
                            inner.queue()
                        );
                        return Err(StoreError::Queue { op, source: error.into_backend() });
                    }
                    let delay = backoff(attempt);
                    warn!(queue = %inner.queue(), error = %error, attempt, retry_in_ms = delay.as_millis() as u64, "Connecting to RabbitMQ failed; retrying.");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        inner.session.send_replace(Some(session.clone()));
        info!(queue = %inner.queue(), url = %redact(&inner.cfg.url), queue_type = %inner.cfg.queue_type, "Connected to RabbitMQ.");
        let supervisor = tokio::spawn(inner.clone().supervise(session));
        Ok(Self { inner, deliveries: tokio::sync::Mutex::new(rx), supervisor: Mutex::new(Some(supervisor)) })
    }

    /// The configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.cfg
    }

    /// Start consuming the work queue (manual acks, `basic_qos(prefetch)`); deliveries then come from
    /// [`JobQueue::next_delivery`]. The consumer is restarted after every reconnection. Idempotent.
    pub async fn start_consuming(&self) -> StoreResult<()> {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return Err(StoreError::queue(format!(
                "consuming from queue {} was stopped; it cannot be restarted on this handle",
                inner.queue()
            )));
        }
        inner.consume_wanted.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + PUBLISH_DEADLINE;
        loop {
            let session = match inner.wait_session(deadline).await {
                Ok(session) => session,
                Err(error) => {
                    inner.consume_wanted.store(false, Ordering::SeqCst);
                    return Err(error);
                }
            };
            match inner.ensure_consumer(&session).await {
                Ok(()) => return Ok(()),
                Err(error) if session.problem().is_some() => {
                    // The connection went away meanwhile: the supervisor reconnects; try on the next session.
                    debug!(queue = %inner.queue(), error = %error, "Starting the consumer failed; waiting for a reconnection.");
                    session.lost.cancel();
                }
                Err(error) => {
                    inner.consume_wanted.store(false, Ordering::SeqCst);
                    return Err(error);
                }
            }
        }
    }

    /// Close the connection and stop the supervisor. Unsettled deliveries return to the queue.
    pub async fn close(&self) {
        self.inner.consume_wanted.store(false, Ordering::SeqCst);
        drop(self.inner.delivery_tx.lock().unwrap_or_else(PoisonError::into_inner).take());
        self.inner.shutdown.cancel();
        let handle = self.supervisor.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle
            && tokio::time::timeout(RPC_TIMEOUT, handle).await.is_err()
        {
            debug!(queue = %self.inner.queue(), "The supervisor did not stop in time.");
        }
    }

    async fn live_session(&self) -> StoreResult<Arc<Session>> {
        self.inner.wait_session(Instant::now() + PUBLISH_DEADLINE).await
    }

    /// Messages ready in the work queue (passive declare).
    pub async fn queue_depth(&self) -> StoreResult<u32> {
        let session = self.live_session().await?;
        passive_depth(&session.connection, &self.inner.names.work).await
    }

    /// Messages in the dead-letter queue.
    pub async fn dead_letter_depth(&self) -> StoreResult<u32> {
        let session = self.live_session().await?;
        passive_depth(&session.connection, &self.inner.names.dead).await
    }

    /// Messages waiting in the delay queue.
    pub async fn delay_depth(&self) -> StoreResult<u32> {
        let session = self.live_session().await?;
        passive_depth(&session.connection, &self.inner.names.delay).await
    }

    /// Drop every ready message of the work queue and return how many (tests: a broker losing jobs).
    pub async fn purge(&self) -> StoreResult<u32> {
        let session = self.live_session().await?;
        let queue = self.inner.queue();
        let channel = with_timeout(queue, "opening a channel", session.connection.create_channel()).await?;
        let purged =
            with_timeout(queue, "purging", channel.queue_purge(queue.into(), QueuePurgeOptions::default())).await;
        close_channel(&channel, queue).await;
        purged
    }

    /// Take one message off the dead-letter queue: its body and its reason header (tests and tooling).
    pub async fn get_dead_letter(&self) -> StoreResult<Option<(Vec<u8>, Option<String>)>> {
        let session = self.live_session().await?;
        let dead = &self.inner.names.dead;
        let channel = with_timeout(dead, "opening a channel", session.connection.create_channel()).await?;
        let got = with_timeout(
            dead,
            "getting a message",
            channel.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await;
        close_channel(&channel, dead).await;
        let Some(message) = got? else {
            return Ok(None);
        };
        let reason = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get(REASON_HEADER))
            .and_then(header_text);
        Ok(Some((message.delivery.data, reason)))
    }

    /// Delete the work, delay and dead-letter queues and the dead-letter exchange (test clean-up). Stops
    /// consuming first (a cancelled consumer would otherwise reconnect and declare the queues again).
    pub async fn delete_queues(&self) -> StoreResult<()> {
        self.stop_consuming().await;
        let session = self.live_session().await?;
        let names = &self.inner.names;
        let channel = with_timeout(&names.work, "opening a channel", session.connection.create_channel()).await?;
        let result = async {
            for queue in [&names.work, &names.delay, &names.dead] {
                with_timeout(
                    queue,
                    "deleting",
                    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
                )
                .await?;
            }
            with_timeout(
                &names.dlx,
                "deleting the exchange",
                channel.exchange_delete(names.dlx.as_str().into(), ExchangeDeleteOptions::default()),
            )
            .await
        }
        .await;
        close_channel(&channel, &names.work).await;
        result
    }

    fn job_message(&self, job: &Job, routing_key: &str) -> StoreResult<Outgoing> {
        let queue = self.inner.queue();
        let body = serde_json::to_vec(job).map_err(|error| StoreError::Queue {
            op: format!("encoding a job for queue {queue}"),
            source: Some(error.into()),
        })?;
        let id = job.message_id();
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(short(&id, "message id", queue)?);
        if let Some(headers) = trace_field_table(&TraceHeaders::current()) {
            properties = properties.with_headers(headers);
        }
        Ok(Outgoing { exchange: "".into(), routing_key: routing_key.into(), body, properties, id })
    }
}

impl Drop for RabbitQueue {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}

#[async_trait]
impl JobQueue for RabbitQueue {
    async fn publish(&self, jobs: &[Job]) -> StoreResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let messages =
            jobs.iter().map(|job| self.job_message(job, &self.inner.names.work)).collect::<StoreResult<Vec<_>>>()?;
        let what = if jobs.len() == 1 { "1 job".to_string() } else { format!("{} jobs", jobs.len()) };
        self.inner.publish_all(&what, &messages).await
    }

    async fn publish_delayed(&self, job: &Job, delay: Duration) -> StoreResult<()> {
        let mut message = self.job_message(job, &self.inner.names.delay)?;
        let expiration = delay.as_millis().to_string();
        message.properties = message.properties.with_expiration(short(&expiration, "expiration", self.inner.queue())?);
        self.inner.publish_all("a delayed job", &[message]).await
    }

    async fn dead_letter(&self, body: &[u8], reason: &str) -> StoreResult<()> {
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), long(reason));
        let message = Outgoing {
            exchange: self.inner.names.dlx.as_str().into(),
            routing_key: self.inner.queue().into(),
            body: body.to_vec(),
            properties: BasicProperties::default().with_delivery_mode(2).with_headers(headers),
            id: "dead letter".to_string(),
        };
        self.inner.publish_all("a dead letter", &[message]).await
    }

    async fn next_delivery(&self) -> Option<Delivery> {
        self.deliveries.lock().await.recv().await
    }

    async fn stop_consuming(&self) {
        let inner = &self.inner;
        inner.consume_wanted.store(false, Ordering::SeqCst);
        inner.stop.cancel();
        drop(inner.delivery_tx.lock().unwrap_or_else(PoisonError::into_inner).take());
        let session = inner.session.borrow().clone();
        if let Some(session) = session {
            inner.cancel_consumer(&session).await;
        }
    }

    fn is_ready(&self) -> bool {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() {
            return false;
        }
        let session = inner.session.borrow();
        let Some(session) = session.as_ref() else {
            return false;
        };
        session.problem().is_none()
            && (!inner.consume_wanted.load(Ordering::SeqCst) || session.consumer_active.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_headers_travel_as_amqp_headers() {
        assert_eq!(trace_field_table(&TraceHeaders::default()), None);
        let trace = TraceHeaders { traceparent: Some("00-ab-cd-01".into()), tracestate: Some("v=1".into()) };
        let table = trace_field_table(&trace);
        assert_eq!(trace_headers(table.as_ref()), trace);
        let mut short = FieldTable::default();
        short.insert("traceparent".into(), AMQPValue::ShortString("00-ab-cd-01".into()));
        short.insert("other".into(), long("x"));
        let only_parent = TraceHeaders { traceparent: Some("00-ab-cd-01".into()), tracestate: None };
        assert_eq!(trace_headers(Some(&short)), only_parent);
        assert_eq!(trace_headers(None), TraceHeaders::default());
    }

    #[test]
    fn queue_type_round_trips() {
        assert_eq!("quorum".parse::<QueueType>().ok(), Some(QueueType::Quorum));
        assert_eq!("Classic".parse::<QueueType>().ok(), Some(QueueType::Classic));
        assert!("stream".parse::<QueueType>().is_err());
        assert_eq!(QueueType::default().to_string(), "quorum");
        assert_eq!(QueueType::Classic.to_string(), "classic");
    }

    #[test]
    fn defaults_match_the_contract() {
        let cfg = AmqpConfig::default();
        assert_eq!(cfg.queue, "flowcraft-jobs");
        assert_eq!(cfg.prefetch, 16);
        assert_eq!(cfg.queue_type, QueueType::Quorum);
    }

    #[test]
    fn the_frame_max_is_small_unless_the_url_sets_it() {
        let frame_max = |url: &str| parse_url(url, "q", &TlsSettings::none()).map(|e| e.uri.query.frame_max);
        assert_eq!(frame_max("amqp://guest:guest@127.0.0.1:5672/%2f").ok(), Some(Some(DEFAULT_FRAME_MAX)));
        assert_eq!(frame_max("amqp://127.0.0.1:5672/%2f?frame_max=131072").ok(), Some(Some(131_072)));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("amqp://guest:secret@host:5672/%2f"), "amqp://***@host:5672/%2f");
        // A password with a raw '/' used to be printed (the authority was cut at the first '/').
        assert_eq!(redact("amqp://guest:se/cr@et@host:5672/%2f"), "amqp://***@host:5672/%2f");
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
        let cfg = AmqpConfig { url: "amqp://u:p4ss@h/%2f".to_string(), ..AmqpConfig::default() };
        assert!(!format!("{cfg:?}").contains("p4ss"));
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(check_queue_name("jobs").is_ok());
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name("amq.x").is_err());
        assert!(check_queue_name(&"q".repeat(250)).is_err());
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            let delay = backoff(attempt);
            assert!(delay <= BACKOFF_CAP);
            assert!(delay >= BACKOFF_BASE / 2 || attempt == 0);
        }
    }

    #[test]
    fn quorum_arguments_have_the_poison_backstop() {
        let names = Names::new("q");
        let args = work_arguments(QueueType::Quorum, &names);
        assert!(args.contains_key("x-delivery-limit"));
        assert!(!args.contains_key("x-dead-letter-strategy"), "at-least-once broker dead-lettering is not used");
        let classic = work_arguments(QueueType::Classic, &names);
        assert!(!classic.contains_key("x-delivery-limit"));
        assert!(classic.contains_key("x-dead-letter-exchange"));
    }
}
