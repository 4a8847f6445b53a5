//! Integration tests: the real binary, real Redis, real WebSocket clients, one
//! module per section of PROTOCOL.md. One test binary keeps linking cheap.

mod common;

mod http; // 1. HTTP surface
mod load; // the load generator's smoke run
mod notes; // 2. notes and versions
mod persistence; // 4. Redis
mod session; // 3. the WebSocket session
