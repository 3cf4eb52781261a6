//! TLS to the real services: PostgreSQL with this machine's snakeoil certificate (`ssl = on`), RabbitMQ and Redis
//! through TLS-terminating proxies with a generated PKI (tests/common/tls.rs). Wrong CAs and host names fail at
//! once with a permanent error naming the service and the reason; a URL asking for TLS never talks clear text; a
//! full distributed run (a worker process and the client) over TLS to all three completes. Connection errors
//! that no retry can fix (credentials, a missing database or vhost) are classified permanent.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::tls::{SNAKEOIL, TlsProxy, pki, upstream};
use flowcraft::client;
use flowcraft::store::postgres::{PgConfig, PostgresStore};
use flowcraft::store::rabbitmq::{AmqpConfig, RabbitQueue};
use flowcraft::store::redis::{RedisConfig, RedisCoordinator};
use flowcraft::store::{Coordinator, Job, JobQueue, RunStatus, RunStore, StoreError};
use flowcraft::tls::TlsSettings;
use serde_json::json;

fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

fn on_localhost(url: &str) -> String {
    url.replace("127.0.0.1", "localhost")
}

fn extra_ca(path: &std::path::Path) -> TlsSettings {
    TlsSettings::from_files(Some(path), None, None).expect("CA file")
}

async fn pg(url: &str, tls: TlsSettings) -> Result<PostgresStore, StoreError> {
    PostgresStore::connect(PgConfig { url: url.to_string(), tls, pool_size: 2, ..PgConfig::default() }).await
}

/// Whether every backend connection named `app` uses TLS (`pg_stat_ssl`), and how many there are.
async fn ssl_of(app: &str) -> (bool, i64) {
    let observer = pg(&with_params(&common::database_url(), "sslmode=disable"), TlsSettings::none()).await.unwrap();
    let client = observer.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a \
             ON a.pid = s.pid WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

fn assert_tls_error(result: Result<impl std::fmt::Debug, StoreError>, service: &str, needle: &str) -> String {
    let err = result.expect_err("TLS must fail");
    let message = err.to_string();
    assert!(matches!(err, StoreError::Tls { .. }), "not a TLS error: {message}");
    assert!(err.is_permanent(), "{message}");
    assert!(message.starts_with(service), "{message}");
    assert!(message.contains(needle), "{needle:?} not in: {message}");
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sslmodes_behave_as_libpq() {
    let base = common::database_url();
    // require: encrypted (pg_stat_ssl says so), no verification.
    let app = common::unique("pgtls");
    let store = pg(&with_params(&base, &format!("sslmode=require&application_name={app}")), TlsSettings::none())
        .await
        .expect("sslmode=require");
    store.migrate().await.ok();
    assert_eq!(ssl_of(&app).await, (true, 1), "sslmode=require connections use TLS");
    // prefer (the default) uses TLS when the server offers it; disable does not.
    let app_prefer = common::unique("pgprefer");
    let _prefer =
        pg(&with_params(&base, &format!("application_name={app_prefer}")), TlsSettings::none()).await.unwrap();
    assert_eq!(ssl_of(&app_prefer).await, (true, 1));
    let app_plain = common::unique("pgplain");
    let _plain = pg(&with_params(&base, &format!("sslmode=disable&application_name={app_plain}")), TlsSettings::none())
        .await
        .unwrap();
    assert_eq!(ssl_of(&app_plain).await, (false, 1));

    // verify-ca: the chain is checked, not the host name (127.0.0.1 is not in the snakeoil certificate).
    pg(&with_params(&base, &format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}")), TlsSettings::none())
        .await
        .expect("verify-ca with the right CA");
    // require with a root certificate verifies the chain too, as in libpq.
    let started = Instant::now();
    let wrong = pki().ca_file.display().to_string();
    assert_tls_error(
        pg(&with_params(&base, &format!("sslmode=require&sslrootcert={wrong}")), TlsSettings::none()).await,
        "PostgreSQL",
        "not signed by a trusted CA",
    );
    assert_tls_error(
        pg(&with_params(&base, &format!("sslmode=verify-ca&sslrootcert={wrong}")), TlsSettings::none()).await,
        "PostgreSQL",
        "not signed by a trusted CA",
    );
    // verify-full: the host name too.
    pg(&with_params(&on_localhost(&base), &format!("sslmode=verify-full&sslrootcert={SNAKEOIL}")), TlsSettings::none())
        .await
        .expect("verify-full on localhost");
    assert_tls_error(
        pg(&with_params(&base, &format!("sslmode=verify-full&sslrootcert={SNAKEOIL}")), TlsSettings::none()).await,
        "PostgreSQL",
        "not valid for the host name",
    );
    // Without sslrootcert, verify-full trusts the system roots and FLOWCRAFT_TLS_CA_FILE. (This machine's system
    // store may hold the snakeoil certificate itself, so only the positive case is checked here; the RabbitMQ
    // and Redis tests show that the system roots alone reject an unknown CA.)
    pg(&with_params(&on_localhost(&base), "sslmode=verify-full"), extra_ca(SNAKEOIL.as_ref()))
        .await
        .expect("verify-full with the CA from FLOWCRAFT_TLS_CA_FILE");
    assert!(started.elapsed() < Duration::from_secs(20), "failures are immediate: {:?}", started.elapsed());
    // A libpq key=value connection string works the same way.
    let kv = format!("host=localhost port=5432 user=root dbname=test sslmode=verify-full sslrootcert={SNAKEOIL}");
    pg(&kv, TlsSettings::none()).await.expect("key=value form");
    store.drop_tables().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusals_are_permanent_and_name_the_reason() {
    let base = common::database_url();
    let missing = base.rsplit_once('/').map(|(head, _)| format!("{head}/flowcraft_no_such_db")).unwrap();
    let err = pg(&missing, TlsSettings::none()).await.expect_err("missing database");
    assert!(matches!(err, StoreError::Refused { .. }) && err.is_permanent(), "{err}");
    assert!(err.to_string().contains("flowcraft_no_such_db") && err.to_string().contains("3D000"), "{err}");
    let nobody = base.replacen("root@", "flowcraft_nobody:s3cr3t%2Fpw@", 1);
    let err = pg(&nobody, TlsSettings::none()).await.expect_err("unknown role");
    assert!(matches!(err, StoreError::Refused { .. }), "{err}");
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
    let err = pg(&with_params(&base, "sslmode=verify_full"), TlsSettings::none()).await.expect_err("bad sslmode");
    assert!(matches!(err, StoreError::Config { .. }) && err.to_string().contains("verify-full"), "{err}");
    // Nothing listens: transient.
    let err = pg("postgres://root@127.0.0.1:1/test?connect_timeout=2", TlsSettings::none()).await.expect_err("down");
    assert!(!err.is_permanent(), "{err}");
}

fn amqp_config(url: String, queue: &str, tls: TlsSettings) -> AmqpConfig {
    AmqpConfig {
        url,
        queue: queue.to_string(),
        prefetch: 4,
        connection_name: "tls-test".into(),
        tls,
        ..AmqpConfig::default()
    }
}

fn amqps(proxy: &TlsProxy, params: &str) -> String {
    let plain = url::Url::parse(&common::amqp_url()).unwrap();
    let creds = format!("{}:{}", plain.username(), plain.password().unwrap_or(""));
    let url = format!("amqps://{creds}@localhost:{}/%2f", proxy.port);
    if params.is_empty() { url } else { with_params(&url, params) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_amqps_verifies_the_broker_and_never_falls_back_to_clear_text() {
    let proxy = TlsProxy::start(upstream(&common::amqp_url(), 5672), false).await;
    let name = common::unique("amqps");
    // cacertfile in the URL.
    let ca = pki().ca_file.display().to_string();
    let queue =
        RabbitQueue::connect(amqp_config(amqps(&proxy, &format!("cacertfile={ca}")), &name, TlsSettings::none()))
            .await
            .expect("amqps with cacertfile");
    queue.publish(&[Job::new("r1", "bp", "n1")]).await.expect("publish over TLS");
    queue.start_consuming().await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(20), queue.next_delivery()).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&delivery.body).contains("r1"));
    delivery.acker.ack().await.unwrap();
    // The CA from FLOWCRAFT_TLS_CA_FILE instead, and an IP address host with server_name_indication.
    let by_settings = RabbitQueue::connect(amqp_config(amqps(&proxy, ""), &name, extra_ca(&pki().ca_file)))
        .await
        .expect("amqps with the extra CA");
    assert_eq!(by_settings.queue_depth().await.unwrap(), 0);
    by_settings.close().await;

    let started = Instant::now();
    // A CA that did not sign the broker's certificate.
    let other = pki().other_ca_file.display().to_string();
    let message = assert_tls_error(
        RabbitQueue::connect(amqp_config(amqps(&proxy, &format!("cacertfile={other}")), &name, TlsSettings::none()))
            .await,
        "RabbitMQ",
        "not signed by a trusted CA",
    );
    assert!(!message.contains("guest:guest"), "{message}");
    // The system roots alone do not know the test CA.
    assert_tls_error(
        RabbitQueue::connect(amqp_config(amqps(&proxy, ""), &name, TlsSettings::none())).await,
        "RabbitMQ",
        "not signed by a trusted CA",
    );
    // A host name the certificate does not hold.
    assert_tls_error(
        RabbitQueue::connect(amqp_config(
            amqps(&proxy, &format!("cacertfile={ca}&server_name_indication=rabbit.example.com")),
            &name,
            TlsSettings::none(),
        ))
        .await,
        "RabbitMQ",
        "not valid for the host name",
    );
    assert!(started.elapsed() < Duration::from_secs(20), "failures are immediate: {:?}", started.elapsed());
    // verify=verify_none: encrypted, not authenticated.
    let unverified =
        RabbitQueue::connect(amqp_config(amqps(&proxy, "verify=verify_none"), &name, TlsSettings::none())).await;
    assert!(unverified.is_ok(), "{:?}", unverified.err());
    // TLS parameters on an amqp:// URL are a configuration error.
    let err = RabbitQueue::connect(amqp_config(
        format!("{}?cacertfile={ca}", common::amqp_url()),
        &name,
        TlsSettings::none(),
    ))
    .await
    .expect_err("amqp:// with cacertfile");
    assert!(matches!(err, StoreError::Config { .. }) && err.to_string().contains("amqps://"), "{err}");
    queue.delete_queues().await.ok();
    queue.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_refusals_are_permanent() {
    let name = common::unique("refused");
    let plain = url::Url::parse(&common::amqp_url()).unwrap();
    let host = format!("{}:{}", plain.host_str().unwrap(), plain.port().unwrap_or(5672));
    let started = Instant::now();
    let err =
        RabbitQueue::connect(amqp_config(format!("amqp://guest:wr%2Fong@{host}/%2f"), &name, TlsSettings::none()))
            .await
            .expect_err("wrong password");
    assert!(matches!(err, StoreError::Refused { .. }), "{err}");
    assert!(!err.to_string().contains("wr/ong") && !err.to_string().contains("wr%2Fong"), "{err}");
    let err = RabbitQueue::connect(amqp_config(
        format!("amqp://guest:guest@{host}/no-such-vhost"),
        &name,
        TlsSettings::none(),
    ))
    .await
    .expect_err("unknown vhost");
    assert!(matches!(err, StoreError::Refused { .. }) && err.to_string().contains("virtual host"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "not retried: {:?}", started.elapsed());
}

fn redis_config(url: String, tls: TlsSettings) -> RedisConfig {
    RedisConfig { url, prefix: common::unique("rtls"), tls, ..RedisConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_rediss_verifies_the_server() {
    let proxy = TlsProxy::start(upstream(&common::redis_url(), 6379), false).await;
    let url = format!("rediss://localhost:{}/", proxy.port);
    let coord = RedisCoordinator::connect(redis_config(url.clone(), extra_ca(&pki().ca_file))).await.expect("rediss");
    coord.ping().await.unwrap();
    assert!(coord.acquire_lease("r", "n", Duration::from_secs(5)).await.unwrap().is_some());
    let started = Instant::now();
    assert_tls_error(
        RedisCoordinator::connect(redis_config(url.clone(), extra_ca(&pki().other_ca_file))).await,
        "Redis",
        "not signed by a trusted CA",
    );
    assert_tls_error(RedisCoordinator::connect(redis_config(url, TlsSettings::none())).await, "Redis", "trusted CA");
    assert!(started.elapsed() < Duration::from_secs(20), "failures are immediate: {:?}", started.elapsed());
    // #insecure: encrypted, not verified (redis-rs' own convention).
    let insecure = format!("rediss://localhost:{}/#insecure", proxy.port);
    RedisCoordinator::connect(redis_config(insecure, TlsSettings::none()))
        .await
        .expect("#insecure")
        .ping()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_presented_when_the_server_requires_them() {
    let pki = pki();
    let with_identity =
        TlsSettings::from_files(Some(&pki.ca_file), Some(&pki.client_cert_file), Some(&pki.client_key_file))
            .expect("identity");
    // Redis behind a proxy that requires a client certificate: the default identity of the settings.
    let redis_proxy = TlsProxy::start(upstream(&common::redis_url(), 6379), true).await;
    let url = format!("rediss://localhost:{}/", redis_proxy.port);
    let coord = RedisCoordinator::connect(redis_config(url.clone(), with_identity.clone())).await.expect("mTLS redis");
    coord.ping().await.unwrap();
    let err = RedisCoordinator::connect(redis_config(url, extra_ca(&pki.ca_file))).await.expect_err("no client cert");
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("client certificate"), "{err}");
    // RabbitMQ: certfile/keyfile in the URL, as RabbitMQ's URI spec has them.
    let amqp_proxy = TlsProxy::start(upstream(&common::amqp_url(), 5672), true).await;
    let name = common::unique("mtls");
    let params = format!("certfile={}&keyfile={}", pki.client_cert_file.display(), pki.client_key_file.display());
    let queue = RabbitQueue::connect(amqp_config(amqps(&amqp_proxy, &params), &name, extra_ca(&pki.ca_file)))
        .await
        .expect("mTLS amqps");
    let err = RabbitQueue::connect(amqp_config(amqps(&amqp_proxy, ""), &name, extra_ca(&pki.ca_file)))
        .await
        .expect_err("no client cert");
    assert!(err.is_permanent() && err.to_string().contains("client certificate"), "{err}");
    queue.delete_queues().await.ok();
    queue.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_run_over_tls_to_all_three_services_completes() {
    let amqp_proxy = TlsProxy::start(upstream(&common::amqp_url(), 5672), false).await;
    let redis_proxy = TlsProxy::start(upstream(&common::redis_url(), 6379), false).await;
    let mut cluster = Cluster::new("tlsrun");
    let app = format!("{}-worker", cluster.name);
    cluster.conn.amqp_url = Some(amqps(&amqp_proxy, ""));
    cluster.conn.redis_url = Some(format!("rediss://localhost:{}/", redis_proxy.port));
    cluster.conn.database_url = Some(with_params(
        &on_localhost(&common::database_url()),
        &format!("sslmode=verify-full&sslrootcert={SNAKEOIL}&application_name={app}"),
    ));
    cluster.conn.tls_ca_file = Some(pki().ca_file.clone());
    let dir = tempfile::tempdir().unwrap();
    let bp = json!({"id": "tls", "nodes": [
        {"id": "a", "uses": "transform", "params": {"expr": "{'n': 1}"}},
        {"id": "b", "uses": "transform", "params": {"expr": "{'n': input.n + 1}"}},
        {"id": "c", "uses": "noop"}],
        "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}]});
    std::fs::write(dir.path().join("tls.json"), bp.to_string()).unwrap();
    let ca = pki().ca_file.display().to_string();
    let worker = cluster.spawn_worker("w", dir.path(), &[("FLOWCRAFT_TLS_CA_FILE", ca.as_str())]);
    // The client side over TLS too.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let policy = flowcraft::distributed::ConnectPolicy::one_shot(Duration::from_secs(30));
    let store = flowcraft::distributed::connect_store(&cluster.conn, &shutdown, policy).await.expect("store over TLS");
    let queue =
        flowcraft::distributed::connect_queue(&cluster.conn, "tls-client", &shutdown, policy).await.expect("queue");
    let graph = flowcraft::flow::BlueprintSet::load_dir(dir.path(), None).unwrap().get("tls").unwrap();
    let run_id = format!("{}-run", cluster.name);
    client::start_run(&queue, &store, &graph, &run_id, json!({})).await.unwrap();
    let result = client::wait_for_run(&store, &run_id, Some(&graph), Some(Duration::from_secs(60)), |_, _| {})
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", worker.log_text()));
    assert_eq!(result.status, RunStatus::Completed, "{:?}\n{}", result.error, worker.log_text());
    assert_eq!(result.outputs["b"], json!({"n": 2}));
    // The worker's PostgreSQL connections are encrypted.
    let (ssl, count) = ssl_of(&app).await;
    assert!(ssl && count >= 1, "worker connections: ssl={ssl}, count={count}");
    let _ = store.run_info(&run_id).await.unwrap();
    queue.close().await;
    drop(worker);
    // Clean-up goes through the plain URLs (the names are the cluster's).
    cluster.cleanup().await;
}

/// The first bytes each client sends to a server when its URL asks for TLS: a TLS handshake, never a clear-text
/// protocol header (AMQP's `AMQP\0\0\x09\x01`, a RESP command, PostgreSQL's startup message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_that_ask_for_tls_never_speak_clear_text() {
    const TLS_HANDSHAKE: u8 = 0x16;
    let ca = pki().ca_file.display().to_string();
    // RabbitMQ: amqps:// to a server that is not TLS.
    let (port, first) = common::tls::first_bytes(b"AMQP\x00\x00\x09\x01").await;
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f?cacertfile={ca}");
    let err = RabbitQueue::connect(amqp_config(url, "q", TlsSettings::none())).await.expect_err("no TLS server");
    let bytes = first.await.unwrap();
    assert_eq!(bytes.first(), Some(&TLS_HANDSHAKE), "amqps:// sent {bytes:?} ({err})");
    assert!(!String::from_utf8_lossy(&bytes).contains("guest"), "credentials in clear text");
    // Redis: rediss:// likewise.
    let (port, first) = common::tls::first_bytes(b"-ERR unknown command\r\n").await;
    let url = format!("rediss://:s3cr3t@127.0.0.1:{port}/");
    let connect = RedisCoordinator::connect(redis_config(url, extra_ca(&pki().ca_file)));
    let _ = tokio::time::timeout(Duration::from_secs(60), connect).await;
    let bytes = first.await.unwrap();
    assert_eq!(bytes.first(), Some(&TLS_HANDSHAKE), "rediss:// sent {bytes:?}");
    // PostgreSQL: sslmode=require asks for TLS first (SSLRequest) and fails when the server declines ('N').
    let (port, first) = common::tls::first_bytes(b"N").await;
    let url = format!("postgres://root:s3cr3t@127.0.0.1:{port}/test?sslmode=require");
    let err = pg(&url, TlsSettings::none()).await.expect_err("server without TLS");
    let bytes = first.await.unwrap();
    assert_eq!(bytes, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], "SSLRequest first ({err})");
    assert!(matches!(err, StoreError::Tls { .. }) && err.is_permanent(), "{err}");
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
}
