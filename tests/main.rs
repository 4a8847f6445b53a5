//! Integration tests: the real binary, real Redis, real WebSocket clients, one
//! module per section of PROTOCOL.md. One test binary keeps linking cheap.

mod common;

mod auth; // 5. tokens and roles
mod chaos; // faults at random: acknowledged edits survive
mod cluster; // 6. several nodes
mod conformance; // RFC 6455 over raw sockets
mod http; // 1. HTTP surface
mod integrity; // 2-4. foreign values, write_failed, saved, completed
mod limits; // abuse: rate, caps, origins, slow and silent peers
mod load; // the load generator's smoke run
mod notes; // 2. notes and versions
mod operations; // 1. papers API, readiness, metrics
mod persistence; // 4. Redis
mod sentinel; // 4. failover under Sentinel
mod session; // 3. the WebSocket session
