//! Integration tests of the RabbitMQ job queue against a real broker: confirms, acks, requeue, dead letters,
//! delayed jobs, prefetch, queue types, reconnection after a forced close, and topology conflicts.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use flowcraft::report::Chain;
use flowcraft::store::rabbitmq::{self, AmqpConfig, QueueType, RabbitQueue};
use flowcraft::store::{Delivery, Job, JobQueue, StoreError};

const DEADLINE: Duration = Duration::from_secs(20);

fn config(tag: &str, queue_type: QueueType, prefetch: u16) -> AmqpConfig {
    AmqpConfig {
        url: common::amqp_url(),
        queue: common::unique(tag),
        queue_type,
        prefetch,
        connection_name: common::unique("conn"),
        ..AmqpConfig::default()
    }
}

async fn connect(cfg: AmqpConfig) -> RabbitQueue {
    // Logs show up for failing tests (the test writer is captured otherwise).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("flowcraft=debug"))
        .with_test_writer()
        .try_init();
    RabbitQueue::connect(cfg).await.expect("connect to RabbitMQ")
}

/// The next delivery, failing the test after `DEADLINE`.
async fn next(queue: &RabbitQueue) -> Delivery {
    tokio::time::timeout(DEADLINE, queue.next_delivery())
        .await
        .expect("timed out waiting for a delivery")
        .expect("the delivery stream ended")
}

fn decode(delivery: &Delivery) -> Job {
    serde_json::from_slice(&delivery.body).expect("a job")
}

async fn cleanup(queue: RabbitQueue) {
    queue.delete_queues().await.expect("delete queues");
    queue.close().await;
}

/// `rabbitmqctl` with arguments, returning stdout.
async fn rabbitmqctl(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new("rabbitmqctl").args(&args).output().expect("run rabbitmqctl");
        assert!(output.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    })
    .await
    .expect("rabbitmqctl task")
}

/// `(pid, name)` of the broker connections whose `connection_name` client property is `connection_name`
/// (`rabbitmqctl close_connection` takes the pid).
async fn connections_named(connection_name: &str) -> Vec<(String, String)> {
    let listing = rabbitmqctl(vec![
        "-q".into(),
        "list_connections".into(),
        "pid".into(),
        "name".into(),
        "client_properties".into(),
    ])
    .await;
    let needle = format!("\"{connection_name}\"");
    listing
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| {
            let mut columns = line.split('\t');
            Some((columns.next()?.to_string(), columns.next()?.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_consumes_and_acks_a_hundred_jobs() {
    let queue = connect(config("mq", QueueType::Quorum, 16)).await;
    let jobs: Vec<Job> = (0..100).map(|i| Job::new("run-1", "bp", format!("node-{i}"))).collect();
    queue.publish(&jobs).await.expect("publish");
    assert_eq!(queue.queue_depth().await.expect("depth"), 100);

    queue.start_consuming().await.expect("consume");
    common::eventually("the queue is ready", DEADLINE, || async { queue.is_ready().then_some(()) }).await;
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let delivery = next(&queue).await;
        assert!(!delivery.redelivered);
        let job = decode(&delivery);
        assert_eq!(job.run_id, "run-1");
        assert!(seen.insert(job.node_id.clone()), "duplicate delivery of {}", job.node_id);
        delivery.acker.ack().await.expect("ack");
    }
    assert_eq!(seen.len(), 100);
    common::eventually("the queue is empty", DEADLINE, || async {
        (queue.queue_depth().await.ok() == Some(0)).then_some(())
    })
    .await;
    assert!(tokio::time::timeout(Duration::from_millis(300), queue.next_delivery()).await.is_err(), "nothing is left");
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_delivery_comes_back_redelivered() {
    let queue = connect(config("mq", QueueType::Quorum, 4)).await;
    queue.publish(&[Job::new("run-2", "bp", "a")]).await.expect("publish");
    queue.start_consuming().await.expect("consume");

    let first = next(&queue).await;
    assert!(!first.redelivered);
    first.acker.requeue().await.expect("requeue");

    let second = next(&queue).await;
    assert!(second.redelivered, "a requeued delivery is flagged redelivered");
    assert_eq!(decode(&second), Job::new("run-2", "bp", "a"));
    second.acker.ack().await.expect("ack");
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_keeps_the_body_and_reason() {
    let queue = connect(config("mq", QueueType::Quorum, 4)).await;
    queue.dead_letter(b"not json {", "undecodable: expected value").await.expect("dead letter");
    assert_eq!(queue.dead_letter_depth().await.expect("depth"), 1);
    assert_eq!(queue.queue_depth().await.expect("depth"), 0);

    let (body, reason) = queue.get_dead_letter().await.expect("get").expect("a dead letter");
    assert_eq!(body, b"not json {");
    assert_eq!(reason.as_deref(), Some("undecodable: expected value"));
    assert!(queue.get_dead_letter().await.expect("get").is_none());
    cleanup(queue).await;
}

/// Workers propose a 16 KiB `frame_max` (`rabbitmq::DEFAULT_FRAME_MAX`, for memory): a body of many frames goes
/// through whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_a_frame_goes_through_whole() {
    let queue = connect(config("mq", QueueType::Quorum, 4)).await;
    let body: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    queue.dead_letter(&body, "big").await.expect("dead letter");
    let (got, reason) = queue.get_dead_letter().await.expect("get").expect("a dead letter");
    assert!(got == body, "the body came back with {} bytes", got.len());
    assert_eq!(reason.as_deref(), Some("big"));
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_returns_to_the_work_queue_after_its_delay() {
    let queue = connect(config("mq", QueueType::Quorum, 4)).await;
    queue.start_consuming().await.expect("consume");
    let delay = Duration::from_millis(700);
    let job = Job { attempt: 1, ..Job::new("run-3", "bp", "leased") };
    let start = Instant::now();
    queue.publish_delayed(&job, delay).await.expect("publish delayed");

    let delivery = next(&queue).await;
    assert!(start.elapsed() >= delay, "delivered after {:?}, before the delay", start.elapsed());
    assert_eq!(decode(&delivery), job);
    delivery.acker.ack().await.expect("ack");
    assert_eq!(queue.delay_depth().await.expect("delay depth"), 0);
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_the_unacked_deliveries() {
    let queue = connect(config("mq", QueueType::Quorum, 2)).await;
    let jobs: Vec<Job> = (0..5).map(|i| Job::new("run-4", "bp", format!("n{i}"))).collect();
    queue.publish(&jobs).await.expect("publish");
    queue.start_consuming().await.expect("consume");

    let first = next(&queue).await;
    let second = next(&queue).await;
    common::eventually("3 messages stay ready", DEADLINE, || async {
        (queue.queue_depth().await.ok() == Some(3)).then_some(())
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), queue.next_delivery()).await.is_err(),
        "a third delivery arrived while two were unacked"
    );

    first.acker.ack().await.expect("ack");
    let third = next(&queue).await;
    common::eventually("2 messages stay ready", DEADLINE, || async {
        (queue.queue_depth().await.ok() == Some(2)).then_some(())
    })
    .await;
    second.acker.ack().await.expect("ack");
    third.acker.ack().await.expect("ack");
    for _ in 0..2 {
        next(&queue).await.acker.ack().await.expect("ack");
    }
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_and_quorum_queues_declare_and_work() {
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let cfg = config("mq", queue_type, 4);
        let name = cfg.queue.clone();
        let queue = connect(cfg).await;
        let listing = rabbitmqctl(vec!["-q".into(), "list_queues".into(), "name".into(), "type".into()]).await;
        let types: Vec<(&str, &str)> = listing.lines().filter_map(|line| line.split_once('\t')).collect();
        assert!(types.contains(&(name.as_str(), queue_type.as_str())), "{name} is {queue_type}: {listing}");
        assert!(types.contains(&(format!("{name}.delay").as_str(), "classic")), "{name}.delay is classic");

        queue.publish(&[Job::new("run-5", "bp", queue_type.as_str())]).await.expect("publish");
        queue.start_consuming().await.expect("consume");
        let delivery = next(&queue).await;
        assert_eq!(decode(&delivery).node_id, queue_type.as_str());
        delivery.acker.ack().await.expect("ack");
        cleanup(queue).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_closes_the_connection() {
    let cfg = config("mq", QueueType::Quorum, 4);
    let connection_name = cfg.connection_name.clone();
    let queue = connect(cfg).await;
    queue.start_consuming().await.expect("consume");
    queue.publish(&[Job::new("run-6", "bp", "before")]).await.expect("publish");
    let unacked = next(&queue).await;
    assert!(!unacked.redelivered);

    let names = common::eventually("the connection is listed", DEADLINE, || async {
        let names = connections_named(&connection_name).await;
        (!names.is_empty()).then_some(names)
    })
    .await;
    assert_eq!(names.len(), 1, "one connection per queue handle: {names:?}");
    rabbitmqctl(vec!["close_connection".into(), names[0].0.clone(), "flowcraft reconnect test".into()]).await;

    // Publishing right after the close waits for the reconnection instead of failing or dropping the job.
    queue.publish(&[Job::new("run-6", "bp", "after")]).await.expect("publish after the close");
    // Settling a delivery of the dead channel is not an error: the broker redelivers it.
    unacked.acker.ack().await.expect("ack on a closed channel");

    let mut got = Vec::new();
    for _ in 0..2 {
        let delivery = next(&queue).await;
        let job = decode(&delivery);
        if job.node_id == "before" {
            assert!(delivery.redelivered, "the unacked job comes back redelivered");
        }
        got.push(job.node_id);
        delivery.acker.ack().await.expect("ack");
    }
    got.sort();
    assert_eq!(got, ["after", "before"]);
    common::eventually("the queue is ready again", DEADLINE, || async { queue.is_ready().then_some(()) }).await;
    // The old connection is gone and exactly one new one replaced it.
    common::eventually("one new connection", DEADLINE, || async {
        let now = connections_named(&connection_name).await;
        (now.len() == 1 && now[0] != names[0]).then_some(())
    })
    .await;
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_conflict_is_a_clear_error() {
    let classic = config("mq", QueueType::Classic, 4);
    let name = classic.queue.clone();
    let queue = connect(classic.clone()).await;
    let conflict = RabbitQueue::connect(AmqpConfig { queue_type: QueueType::Quorum, ..classic }).await;
    match conflict {
        Err(e @ StoreError::Config { .. }) => {
            let message = Chain(&e).to_string();
            assert!(message.contains(&name), "the error names the queue: {message}");
            assert!(message.contains("PRECONDITION_FAILED"), "the error names the conflict: {message}");
            assert!(message.contains("x-queue-type"), "the error names the argument: {message}");
        }
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("a quorum declaration of a classic queue must fail"),
    }
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_consuming_drains_then_ends() {
    let queue = connect(config("mq", QueueType::Quorum, 3)).await;
    let jobs: Vec<Job> = (0..6).map(|i| Job::new("run-7", "bp", format!("n{i}"))).collect();
    queue.publish(&jobs).await.expect("publish");
    queue.start_consuming().await.expect("consume");
    let first = next(&queue).await;
    common::eventually("the prefetch window is full", DEADLINE, || async {
        (queue.queue_depth().await.ok() == Some(3)).then_some(())
    })
    .await;

    queue.stop_consuming().await;
    let mut drained = vec![first];
    while let Some(delivery) = tokio::time::timeout(DEADLINE, queue.next_delivery()).await.expect("ends") {
        drained.push(delivery);
    }
    assert_eq!(drained.len(), 3, "the deliveries received before the cancel are handed out");
    for delivery in &drained {
        delivery.acker.ack().await.expect("settle after stop");
    }
    assert!(queue.next_delivery().await.is_none());
    assert!(queue.start_consuming().await.is_err(), "a stopped queue handle does not consume again");
    common::eventually("acked after stop", DEADLINE, || async {
        (queue.queue_depth().await.ok() == Some(3)).then_some(())
    })
    .await;
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_purge_and_the_free_depth_function() {
    let queue = connect(config("mq", QueueType::Quorum, 4)).await;
    let name = queue.config().queue.clone();
    let jobs: Vec<Job> = (0..3).map(|i| Job::new("run-8", "bp", format!("n{i}"))).collect();
    queue.publish(&jobs).await.expect("publish");
    assert_eq!(rabbitmq::queue_depth(&common::amqp_url(), &name, &Default::default()).await.expect("depth"), 3);
    assert_eq!(queue.purge().await.expect("purge"), 3);
    assert_eq!(queue.queue_depth().await.expect("depth"), 0);
    let missing = rabbitmq::queue_depth(&common::amqp_url(), &common::unique("missing"), &Default::default()).await;
    assert!(
        matches!(missing, Err(StoreError::Queue { ref op, source: Some(_) }) if op.contains("does not exist")),
        "{missing:?}"
    );
    // An inspection of a missing queue closes only its own channel: the handle stays usable.
    assert!(queue.is_ready());
    queue.publish(&jobs[..1]).await.expect("publish");
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_fails_clearly() {
    let bad_url = AmqpConfig { url: "http://nowhere".into(), ..config("mq", QueueType::Quorum, 4) };
    assert!(matches!(RabbitQueue::connect(bad_url).await, Err(StoreError::Config { .. })));
    let no_prefetch = config("mq", QueueType::Quorum, 0);
    assert!(matches!(RabbitQueue::connect(no_prefetch).await, Err(StoreError::Config { .. })));

    let unreachable =
        AmqpConfig { url: "amqp://guest:secret@127.0.0.1:1/%2f".into(), ..config("mq", QueueType::Quorum, 4) };
    let name = unreachable.queue.clone();
    match RabbitQueue::connect(unreachable).await {
        Err(e @ StoreError::Queue { .. }) => {
            let message = Chain(&e).to_string();
            assert!(message.contains(&name), "{message}");
            assert!(!message.contains("secret"), "credentials are not leaked: {message}");
        }
        other => panic!("expected a queue error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_is_lost_when_the_connection_drops_during_publishing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let cfg = config("mq", QueueType::Quorum, 16);
    let connection_name = cfg.connection_name.clone();
    let queue = Arc::new(connect(cfg).await);
    let confirmed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Two publishers keep publishing small batches until told to stop; every batch must be confirmed.
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let (queue, confirmed, stop) = (queue.clone(), confirmed.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let jobs: Vec<Job> =
                        (0..5).map(|i| Job::new("run-9", "bp", format!("p{p}-{}", sent + i))).collect();
                    queue.publish(&jobs).await.expect("publish through the outage");
                    sent += jobs.len();
                    confirmed.fetch_add(jobs.len(), Ordering::SeqCst);
                }
                sent
            })
        })
        .collect();
    common::eventually("some jobs are confirmed", DEADLINE, || async {
        (confirmed.load(Ordering::SeqCst) >= 50).then_some(())
    })
    .await;
    let connections = connections_named(&connection_name).await;
    assert_eq!(connections.len(), 1, "{connections:?}");
    rabbitmqctl(vec!["close_connection".into(), connections[0].0.clone(), "flowcraft publish test".into()]).await;
    let at_close = confirmed.load(Ordering::SeqCst);
    common::eventually("publishing goes on after the reconnection", DEADLINE, || async {
        (confirmed.load(Ordering::SeqCst) >= at_close + 100).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut expected = HashSet::new();
    for (p, publisher) in publishers.into_iter().enumerate() {
        let sent = tokio::time::timeout(DEADLINE, publisher).await.expect("publisher stops").expect("publisher");
        expected.extend((0..sent).map(|i| format!("p{p}-{i}")));
    }

    // Every confirmed job is in the queue (duplicates from republished batches are allowed).
    queue.start_consuming().await.expect("consume");
    let mut seen = HashSet::new();
    while seen.len() < expected.len() {
        let delivery = next(&queue).await;
        let node = decode(&delivery).node_id;
        assert!(expected.contains(&node), "unexpected job {node}");
        seen.insert(node);
        delivery.acker.ack().await.expect("ack");
    }
    let queue = Arc::into_inner(queue).expect("the only handle");
    cleanup(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_by_the_quorum_delivery_limit() {
    let queue = connect(config("mq", QueueType::Quorum, 1)).await;
    let job = Job::new("run-10", "bp", "poison");
    queue.publish(std::slice::from_ref(&job)).await.expect("publish");
    queue.start_consuming().await.expect("consume");
    let mut deliveries = 0;
    // Requeue until the broker stops delivering it (then it sits in the dead-letter queue).
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(2), queue.next_delivery()).await {
        deliveries += 1;
        assert!(deliveries <= 60, "the delivery limit did not stop the poison message");
        delivery.acker.requeue().await.expect("requeue");
    }
    assert!(deliveries >= 50, "delivered {deliveries} times, expected the limit of 50");
    common::eventually("the poison message is dead-lettered", DEADLINE, || async {
        (queue.dead_letter_depth().await.ok() == Some(1)).then_some(())
    })
    .await;
    let (body, reason) = queue.get_dead_letter().await.expect("get").expect("dead letter");
    assert_eq!(serde_json::from_slice::<Job>(&body).expect("job"), job);
    assert_eq!(reason, None, "the broker dead-lettered it, not flowcraft");
    cleanup(queue).await;
}
