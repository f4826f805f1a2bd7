//! The harness itself: services start on private ports and come back on the same port.

use crate::harness::{Mosquitto, Redis};

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
