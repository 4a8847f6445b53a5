//! A fault proxy: a TCP relay on a free loopback port in front of one target
//! (a Redis, or a node), that can pass, cut, delay or black-hole the traffic,
//! each direction on its own, while the test runs. It is how a test cuts one
//! node from Redis while another node goes on.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does with the bytes of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards them.
    Pass,
    /// Forwards each read after this delay (a slow link).
    Delay(Duration),
    /// Reads and drops them: the peer waits for an answer that never comes
    /// (a half-open link).
    BlackHole,
    /// Resets every connection, and every new one at once (a network cut).
    Cut,
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the target.
    Up,
    /// From the target back to the client.
    Down,
}

struct State {
    modes: Mutex<(Mode, Mode)>,
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

impl State {
    fn mode(&self, direction: Direction) -> Mode {
        let modes = self.modes.lock().unwrap();
        match direction {
            Direction::Up => modes.0,
            Direction::Down => modes.1,
        }
    }
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:target`, passing everything.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State {
            modes: Mutex::new((Mode::Pass, Mode::Pass)),
            conns: Mutex::default(),
            stop: false.into(),
        });
        let shared = state.clone();
        std::thread::spawn(move || accept(listener, target, shared));
        Proxy { port, state }
    }

    /// The proxy's address as a Redis URL.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Both directions.
    pub fn set(&self, mode: Mode) {
        *self.state.modes.lock().unwrap() = (mode, mode);
        if mode == Mode::Cut {
            self.reset_all();
        }
    }

    /// One direction.
    pub fn set_direction(&self, direction: Direction, mode: Mode) {
        let mut modes = self.state.modes.lock().unwrap();
        match direction {
            Direction::Up => modes.0 = mode,
            Direction::Down => modes.1 = mode,
        }
        drop(modes);
        if mode == Mode::Cut {
            self.reset_all();
        }
    }

    fn reset_all(&self) {
        for conn in self.state.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.reset_all();
    }
}

fn accept(listener: TcpListener, target: u16, state: Arc<State>) {
    while !state.stop.load(Ordering::Relaxed) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        let cut = state.mode(Direction::Up) == Mode::Cut || state.mode(Direction::Down) == Mode::Cut;
        let upstream = if cut { None } else { TcpStream::connect(("127.0.0.1", target)).ok() };
        let Some(upstream) = upstream else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nonblocking(false);
        let pair = [client.try_clone(), upstream.try_clone(), client.try_clone(), upstream.try_clone()];
        let [Ok(c1), Ok(u1), Ok(c2), Ok(u2)] = pair else { continue };
        {
            let mut conns = state.conns.lock().unwrap();
            conns.push(client);
            conns.push(upstream);
        }
        let (up, down) = (state.clone(), state.clone());
        std::thread::spawn(move || pump(c1, u1, Direction::Up, up));
        std::thread::spawn(move || pump(u2, c2, Direction::Down, down));
    }
}

/// Copies one direction until either side closes, the proxy stops or the link is cut.
fn pump(mut from: TcpStream, mut to: TcpStream, direction: Direction, state: Arc<State>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0; 64 * 1024];
    while !state.stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if state.mode(direction) == Mode::Cut {
                    break;
                }
                continue;
            }
            Err(_) => break,
        };
        match state.mode(direction) {
            Mode::Pass => {}
            Mode::Delay(delay) => std::thread::sleep(delay),
            Mode::BlackHole => continue,
            Mode::Cut => break,
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
