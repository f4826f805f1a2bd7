//! The harness itself: services start on private ports and come back on the same port; the
//! fault proxy forwards, drops and black-holes on demand.

use crate::harness::{FaultProxy, Mosquitto, Redis, RedisCluster};

#[test]
fn redis_restarts_on_the_same_port() {
    let mut redis = Redis::start();
    let port = redis.port();
    assert_ne!(port, 6379, "must never use the machine's Redis");
    let mut conn = redis.client().get_connection().expect("connect");
    let pong: String = redis::cmd("PING").query(&mut conn).expect("ping");
    assert_eq!(pong, "PONG");
    redis.kill();
    assert!(redis.client().get_connection().is_err(), "redis is down");
    redis.start_again();
    assert_eq!(redis.port(), port);
    let mut conn = redis.client().get_connection().expect("reconnect");
    let pong: String = redis::cmd("PING").query(&mut conn).expect("ping");
    assert_eq!(pong, "PONG");
}

#[test]
fn mosquitto_starts_and_restarts() {
    let mut broker = Mosquitto::start();
    assert_ne!(broker.port(), 1883, "must never use the machine's broker");
    broker.stop();
    broker.start_again();
    assert!(std::net::TcpStream::connect(("127.0.0.1", broker.port())).is_ok());
}

/// One raw RESP exchange on `stream`: the reply's first chunk, or the error (a dropped
/// connection reads as end of file or a reset).
fn exchange(stream: &mut std::net::TcpStream, request: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    stream.write_all(request)?;
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf[..n].to_vec())
}

fn connect(proxy: &FaultProxy) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("read timeout");
    stream
}

#[test]
fn the_fault_proxy_forwards_and_drops_a_reply_after_the_armed_request() {
    let redis = Redis::start();
    let proxy = FaultProxy::start(redis.port());
    let mut stream = connect(&proxy);
    assert_eq!(
        exchange(&mut stream, b"PING\r\n").expect("ping"),
        b"+PONG\r\n"
    );

    proxy.drop_after_request(b"EXEC");
    let reply = exchange(&mut stream, b"MULTI\r\nSET k v\r\nEXEC\r\n");
    assert!(reply.is_err(), "the EXEC reply must not arrive: {reply:?}");
    assert_eq!(proxy.fired(), 1);
    // The server acted on it.
    let mut direct = redis.client().get_connection().expect("direct");
    let v: String = redis::cmd("GET").arg("k").query(&mut direct).expect("GET");
    assert_eq!(v, "v");
    // One-shot: a new connection works, EXEC and all.
    let mut again = connect(&proxy);
    let reply = exchange(&mut again, b"MULTI\r\nSET k w\r\nEXEC\r\n").expect("MULTI");
    assert!(reply.starts_with(b"+OK"), "{reply:?}");
}

#[test]
fn the_fault_proxy_drops_connections_and_black_holes_on_demand() {
    let redis = Redis::start();
    let proxy = FaultProxy::start(redis.port());
    let mut stream = connect(&proxy);
    assert_eq!(
        exchange(&mut stream, b"PING\r\n").expect("ping"),
        b"+PONG\r\n"
    );
    proxy.drop_connections();
    assert!(exchange(&mut stream, b"PING\r\n").is_err(), "dropped");

    let mut stream = connect(&proxy);
    proxy.blackhole(true);
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("read timeout");
    let err = exchange(&mut stream, b"PING\r\n").expect_err("no answer in a black hole");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "silence, not a reset: {err:?}"
    );
    proxy.blackhole(false);
    let mut stream = connect(&proxy);
    assert_eq!(
        exchange(&mut stream, b"PING\r\n").expect("ping"),
        b"+PONG\r\n"
    );
}

#[test]
fn the_shared_redis_cluster_has_three_masters_with_a_replica_each_and_serves_every_slot() {
    let cluster = RedisCluster::shared();
    assert_eq!(cluster.nodes().len(), 6);
    let mut conn = cluster.nodes()[0]
        .client()
        .get_connection()
        .expect("connect");
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut conn)
        .expect("CLUSTER INFO");
    for line in [
        "cluster_state:ok",
        "cluster_slots_assigned:16384",
        "cluster_known_nodes:6",
        "cluster_size:3",
    ] {
        assert!(info.contains(line), "{line} not in {info}");
    }
    // Keys spread over the masters; the cluster client follows them there.
    let masters: std::collections::BTreeSet<u16> = (0..30)
        .map(|i| cluster.master_of(&format!("selftest:{i}")))
        .collect();
    assert_eq!(masters.len(), 3, "30 keys on {masters:?}");
    let mut conn = cluster
        .client()
        .get_connection()
        .expect("cluster connection");
    for i in 0..30 {
        let () = redis::cmd("SET")
            .arg(format!("selftest:{i}"))
            .arg(i)
            .query(&mut conn)
            .expect("SET through the cluster");
    }
    let v: i64 = redis::cmd("GET")
        .arg("selftest:29")
        .query(&mut conn)
        .expect("GET through the cluster");
    assert_eq!(v, 29);
}

#[test]
fn a_redis_cluster_is_torn_down_by_pid_when_dropped() {
    let cluster = RedisCluster::start();
    let pids: Vec<u32> = cluster.nodes().iter().filter_map(Redis::pid).collect();
    let ports: Vec<u16> = cluster.nodes().iter().map(Redis::port).collect();
    assert_eq!(pids.len(), 6);
    drop(cluster);
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "node on {port} still listening"
        );
    }
}
