//! MQTT sides of the bench: creating the persistent session, the load generator (preload
//! and paced), the do-nothing subscriber, and the check that the broker holds nothing more.
//!
//! The load generator waits for every PUBACK: `mosquitto_pub -l` sends QoS 1 lines without
//! waiting and loses some, so a preload made with it is not the size it claims.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

use crate::Res;

/// The topic filter every route and the do-nothing subscriber use.
pub const FILTER: &str = "bench/+/data";

pub fn device(seq: u64, devices: u64) -> String {
    format!("dev-{}", seq % devices)
}

pub fn topic(seq: u64, devices: u64) -> String {
    format!("bench/{}/data", device(seq, devices))
}

/// A sensor reading of about 90 bytes, as a gateway's devices send them.
pub fn payload(seq: u64, devices: u64) -> Vec<u8> {
    format!(
        r#"{{"seq":{seq},"device":"{}","temp":{:.1},"hum":{:.1},"ts":{}}}"#,
        device(seq, devices),
        15.0 + (seq % 200) as f64 / 10.0,
        30.0 + (seq % 500) as f64 / 10.0,
        1_700_000_000_000u64 + seq
    )
    .into_bytes()
}

fn options(client_id: &str, port: u16, clean_session: bool) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_session(clean_session)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(100);
    o
}

async fn next(eventloop: &mut EventLoop, deadline: Instant) -> Res<Event> {
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, eventloop.poll()).await {
        Ok(Ok(event)) => Ok(event),
        Ok(Err(e)) => Err(format!("MQTT: {e}").into()),
        Err(_) => Err("MQTT: timed out".into()),
    }
}

async fn connect(eventloop: &mut EventLoop, deadline: Instant) -> Res<Instant> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = next(eventloop, deadline).await? {
            return Ok(Instant::now());
        }
    }
}

/// Sends DISCONNECT after everything queued (acks included) and waits until the broker
/// closed the connection: it reads in order, so by then it has processed every ack sent
/// before. (Returning as soon as DISCONNECT is written lets the next connection with the
/// same client id race the broker's backlog and see acked messages redelivered.)
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) -> Res<()> {
    client.disconnect().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Ok(()),
            Err(_) => return Err("MQTT: the broker did not close after DISCONNECT".into()),
        }
    }
}

/// Creates (or resets) `client_id`'s persistent session subscribed to `filter` ([`FILTER`],
/// or it under `$share/<group>/`) at QoS 1,
/// then leaves, so that what is published next queues for it.
pub async fn create_session(port: u16, client_id: &str, filter: &str) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    // A clean connection first drops whatever an earlier run left in the session.
    for clean in [true, false] {
        let (client, mut eventloop) = AsyncClient::new(options(client_id, port, clean), 10);
        connect(&mut eventloop, deadline).await?;
        if !clean {
            client.subscribe(filter, QoS::AtLeastOnce).await?;
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = next(&mut eventloop, deadline).await? {
                    break;
                }
            }
        }
        disconnect(&client, &mut eventloop).await?;
    }
    Ok(())
}

/// Publishes `count` messages (sequence numbers from `first`) at QoS 1 as fast as the
/// broker takes them, and returns once every one was PUBACKed.
pub async fn preload(port: u16, first: u64, count: u64, devices: u64) -> Res<Duration> {
    let mut o = options("bench-loader", port, true);
    o.set_request_channel_capacity(1000);
    let (client, mut eventloop) = AsyncClient::new(o, 1000);
    connect(&mut eventloop, Instant::now() + Duration::from_secs(10)).await?;
    let started = Instant::now();
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            for seq in first..first + count {
                let sent = client
                    .publish(
                        topic(seq, devices),
                        QoS::AtLeastOnce,
                        false,
                        payload(seq, devices),
                    )
                    .await;
                if sent.is_err() {
                    break;
                }
            }
        })
    };
    let mut acked = 0;
    // Generous: on a loaded machine the broker may take ~10 µs to ~1 ms per message.
    let deadline = Instant::now() + Duration::from_secs(60 + count / 1000);
    while acked < count {
        if let Event::Incoming(Packet::PubAck(_)) = next(&mut eventloop, deadline).await? {
            acked += 1;
        }
    }
    let took = started.elapsed();
    publisher.await?;
    disconnect(&client, &mut eventloop).await?;
    Ok(took)
}

/// The do-nothing subscriber: connected and subscribed, but not reading until
/// [`Subscriber::drain`], so the broker queues for it meanwhile.
pub struct Subscriber {
    client: AsyncClient,
    eventloop: EventLoop,
}

/// What the do-nothing subscriber saw.
pub struct Drained {
    pub resumed: Instant,
    pub last: Instant,
    pub received: u64,
}

impl Subscriber {
    pub async fn connect(port: u16, client_id: &str) -> Res<Subscriber> {
        let (client, mut eventloop) = AsyncClient::new(options(client_id, port, false), 100);
        let deadline = Instant::now() + Duration::from_secs(10);
        connect(&mut eventloop, deadline).await?;
        client.subscribe(FILTER, QoS::AtLeastOnce).await?;
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = next(&mut eventloop, deadline).await? {
                return Ok(Subscriber { client, eventloop });
            }
        }
    }

    /// Reads until `count` messages arrived (each acked on receipt, as rumqttc does by
    /// default) and does nothing else with them: the baseline.
    pub async fn drain(mut self, count: u64) -> Res<Drained> {
        let deadline = Instant::now() + Duration::from_secs(60 + count / 1000);
        let resumed = Instant::now();
        let mut received = 0;
        let mut last = resumed;
        while received < count {
            if let Event::Incoming(Packet::Publish(_)) = next(&mut self.eventloop, deadline).await?
            {
                received += 1;
                last = Instant::now();
            }
        }
        disconnect(&self.client, &mut self.eventloop).await?;
        Ok(Drained {
            resumed,
            last,
            received,
        })
    }
}

/// Resumes `client_id`'s session and counts what the broker still delivers within `wait`:
/// messages nobody acknowledged. Leaves the session as it was (minus those, now acked).
pub async fn leftover(port: u16, client_id: &str, wait: Duration) -> Res<u64> {
    let (client, mut eventloop) = AsyncClient::new(options(client_id, port, false), 100);
    connect(&mut eventloop, Instant::now() + Duration::from_secs(10)).await?;
    let deadline = Instant::now() + wait;
    let mut count = 0;
    while let Ok(event) = next(&mut eventloop, deadline).await {
        if let Event::Incoming(Packet::Publish(_)) = event {
            count += 1;
        }
    }
    disconnect(&client, &mut eventloop).await?;
    Ok(count)
}

/// A publisher for the live runs: one connection, paced sends.
pub struct Paced {
    client: AsyncClient,
    acks: tokio::task::JoinHandle<Res<u64>>,
    acked: tokio::sync::watch::Receiver<u64>,
}

impl Paced {
    pub async fn connect(port: u16) -> Res<Paced> {
        let mut o = options("bench-live-publisher", port, true);
        o.set_request_channel_capacity(1000);
        let (client, mut eventloop) = AsyncClient::new(o, 1000);
        connect(&mut eventloop, Instant::now() + Duration::from_secs(10)).await?;
        let (tx, acked) = tokio::sync::watch::channel(0u64);
        let acks = tokio::spawn(async move {
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        n += 1;
                        let _ = tx.send(n);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(n),
                    Ok(_) => {}
                    Err(e) => return Err(format!("live publisher: {e}").into()),
                }
            }
        });
        Ok(Paced {
            client,
            acks,
            acked,
        })
    }

    /// Publishes `count` messages from `first` at `rate` per second, each at its slot on a
    /// fixed schedule (late slots are sent at once, so a stall shows up as latency, not as
    /// a lower rate). Returns when each was handed to the client.
    pub async fn run(&self, first: u64, count: u64, rate: u64, devices: u64) -> Res<Vec<Instant>> {
        self.run_offset(first, count, rate, devices, 0).await
    }

    /// [`Paced::run`] on devices `dev-<offset>` … `dev-<offset + devices - 1>` (topics no
    /// other part of the run uses).
    pub async fn run_offset(
        &self,
        first: u64,
        count: u64,
        rate: u64,
        devices: u64,
        offset: u64,
    ) -> Res<Vec<Instant>> {
        let mut sent = Vec::with_capacity(count as usize);
        let start = tokio::time::Instant::now();
        for i in 0..count {
            let slot = start + Duration::from_nanos(i * 1_000_000_000 / rate.max(1));
            tokio::time::sleep_until(slot).await;
            let seq = first + i;
            let t = format!("bench/dev-{}/data", offset + seq % devices);
            let p = payload(seq, devices);
            sent.push(Instant::now());
            self.client.publish(t, QoS::AtLeastOnce, false, p).await?;
        }
        Ok(sent)
    }

    /// Waits until `total` PUBACKs arrived, at most `timeout`.
    pub async fn wait_acked(&mut self, total: u64, timeout: Duration) -> Res<()> {
        let reached = {
            let wait = self.acked.wait_for(|n| *n >= total);
            matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(_)))
        };
        if reached {
            return Ok(());
        }
        let acked = *self.acked.borrow();
        Err(format!("the broker acked {acked} of {total} publishes").into())
    }

    pub async fn close(self) -> Res<u64> {
        self.client.disconnect().await?;
        self.acks.await?
    }
}
