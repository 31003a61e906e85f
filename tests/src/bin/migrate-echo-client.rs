//! The client of the network tests (`tests/tests/network.rs`), run outside
//! the container (in the client namespace on the test bed's switch): it
//! keeps ONE TCP connection to `migrate-echo`, sending a numbered line every
//! `--interval-ms` and reading each echo before the next, and sends a
//! numbered UDP datagram at the same rate, until `--stop-file` exists or
//! `--duration-s` has passed.
//!
//! ```text
//! migrate-echo-client --tcp 10.77.0.10:7000 --udp 10.77.0.10:7001 \
//!     --summary out.json --stop-file stop [--interval-ms 5] \
//!     [--duration-s 600] [--reconnect]
//! ```
//!
//! It rewrites the JSON summary at `--summary` every 50 ms while it runs
//! (atomically: written aside, then renamed) and a last time on exit, with
//! `"running": false`. Per TCP connection: its local port, the echoes
//! received, wrong echoes, the longest time without an echo while one was
//! awaited (from the connection to the first echo, between echoes, and the
//! wait in progress, if any), and how it ended (`reset`, `eof` or `error`,
//! when, after how many echoes). With `--reconnect` it opens a new
//! connection to the same address once the first one ended, and records the
//! same of that one under `reconnect`. For UDP: datagrams sent, echoes
//! received, the longest time between two echoes, the last echo's time.
//! Times are milliseconds since the Unix epoch (`*_unix_ms`) so that the
//! test can set them against its own clock.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

struct Args {
    tcp: SocketAddr,
    udp: SocketAddr,
    summary: PathBuf,
    stop_file: PathBuf,
    interval: Duration,
    duration: Duration,
    reconnect: bool,
}

fn parse_args() -> Result<Args, String> {
    let (mut tcp, mut udp, mut summary, mut stop_file) = (None, None, None, None);
    let mut interval = Duration::from_millis(5);
    let mut duration = Duration::from_secs(600);
    let mut reconnect = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--reconnect" {
            reconnect = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--tcp" => tcp = Some(value.parse().map_err(|e| bad(&e))?),
            "--udp" => udp = Some(value.parse().map_err(|e| bad(&e))?),
            "--summary" => summary = Some(PathBuf::from(&value)),
            "--stop-file" => stop_file = Some(PathBuf::from(&value)),
            "--interval-ms" => {
                interval = Duration::from_millis(value.parse().map_err(|e| bad(&e))?);
            }
            "--duration-s" => duration = Duration::from_secs(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(Args {
        tcp: tcp.ok_or("--tcp is required")?,
        udp: udp.ok_or("--udp is required")?,
        summary: summary.ok_or("--summary is required")?,
        stop_file: stop_file.ok_or("--stop-file is required")?,
        interval,
        duration,
        reconnect,
    })
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How a connection ended.
struct End {
    how: &'static str,
    error: String,
    unix_ms: u64,
    after_replies: u64,
}

/// One TCP connection's record.
struct Conn {
    local_port: u16,
    connected_unix_ms: u64,
    replies: u64,
    mismatched: u64,
    longest_gap: Duration,
    /// When the last echo came (or the connection was made).
    last_reply: Instant,
    last_reply_unix_ms: u64,
    /// Whether a request is waiting for its echo.
    awaiting: bool,
    ended: Option<End>,
}

impl Conn {
    fn new(local_port: u16) -> Self {
        Self {
            local_port,
            connected_unix_ms: unix_ms(SystemTime::now()),
            replies: 0,
            mismatched: 0,
            longest_gap: Duration::ZERO,
            last_reply: Instant::now(),
            last_reply_unix_ms: 0,
            awaiting: false,
            ended: None,
        }
    }

    fn to_json(&self) -> Value {
        // The wait in progress counts: a connection that stopped answering
        // shows it.
        let waiting = if self.awaiting && self.ended.is_none() {
            self.last_reply.elapsed()
        } else {
            Duration::ZERO
        };
        json!({
            "local_port": self.local_port,
            "connected_unix_ms": self.connected_unix_ms,
            "replies": self.replies,
            "mismatched": self.mismatched,
            "longest_gap_ms": millis(self.longest_gap.max(waiting)),
            "waiting_ms": millis(waiting),
            "last_reply_unix_ms": self.last_reply_unix_ms,
            "ended": self.ended.as_ref().map(|e| json!({
                "how": e.how,
                "error": e.error,
                "unix_ms": e.unix_ms,
                "after_replies": e.after_replies,
            })),
        })
    }
}

#[derive(Default)]
struct Udp {
    sent: u64,
    send_errors: u64,
    last_send_error: String,
    replies: u64,
    mismatched: u64,
    longest_gap: Duration,
    last_reply: Option<Instant>,
    last_reply_unix_ms: u64,
}

#[derive(Default)]
struct State {
    /// The first connection; None until it is made.
    tcp: Option<Conn>,
    connect_error: String,
    reconnect_attempts: u64,
    reconnect_error: String,
    reconnect: Option<Conn>,
    udp: Udp,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("migrate-echo-client: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let state: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let udp = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("migrate-echo-client: udp socket: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = udp.set_read_timeout(Some(Duration::from_millis(50)));
    let workers = [
        spawn(&state, &stop, {
            let (tcp, interval, reconnect) = (args.tcp, args.interval, args.reconnect);
            move |state, stop| tcp_worker(tcp, interval, reconnect, state, stop)
        }),
        spawn(&state, &stop, {
            let (socket, to, interval) = (udp.try_clone(), args.udp, args.interval);
            move |state, stop| match socket {
                Ok(socket) => udp_sender(&socket, to, interval, state, stop),
                Err(e) => lock(state).udp.last_send_error = e.to_string(),
            }
        }),
        spawn(&state, &stop, {
            let from = args.udp;
            move |state, stop| udp_receiver(&udp, from, state, stop)
        }),
    ];
    let deadline = started + args.duration;
    while !args.stop_file.exists() && Instant::now() < deadline {
        write_summary(&args, &state, started, true);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    write_summary(&args, &state, started, false);
    ExitCode::SUCCESS
}

fn spawn(
    state: &Shared,
    stop: &Arc<AtomicBool>,
    work: impl FnOnce(&Shared, &AtomicBool) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let (state, stop) = (state.clone(), stop.clone());
    std::thread::spawn(move || work(&state, &stop))
}

fn write_summary(args: &Args, state: &Shared, started: Instant, running: bool) {
    let summary = {
        let s = lock(state);
        let udp = &s.udp;
        json!({
            "running": running,
            "elapsed_ms": millis(started.elapsed()),
            "tcp_target": args.tcp.to_string(),
            "udp_target": args.udp.to_string(),
            "tcp": s.tcp.as_ref().map(Conn::to_json),
            "connect_error": s.connect_error,
            "reconnect": if args.reconnect {
                json!({
                    "attempts": s.reconnect_attempts,
                    "error": s.reconnect_error,
                    "connection": s.reconnect.as_ref().map(Conn::to_json),
                })
            } else {
                Value::Null
            },
            "udp": {
                "sent": udp.sent,
                "send_errors": udp.send_errors,
                "last_send_error": udp.last_send_error,
                "replies": udp.replies,
                "mismatched": udp.mismatched,
                "longest_gap_ms": millis(udp.longest_gap),
                "last_reply_unix_ms": udp.last_reply_unix_ms,
            },
        })
    };
    let aside = args.summary.with_extension("json.part");
    let written = std::fs::write(&aside, summary.to_string())
        .and_then(|()| std::fs::rename(&aside, &args.summary));
    if let Err(e) = written {
        eprintln!(
            "migrate-echo-client: writing {}: {e}",
            args.summary.display()
        );
    }
}

/// Which connection a worker is driving.
#[derive(Clone, Copy)]
enum Which {
    First,
    Reconnect,
}

fn conn(state: &mut State, which: Which) -> Option<&mut Conn> {
    match which {
        Which::First => state.tcp.as_mut(),
        Which::Reconnect => state.reconnect.as_mut(),
    }
}

fn tcp_worker(
    to: SocketAddr,
    interval: Duration,
    reconnect: bool,
    state: &Shared,
    stop: &AtomicBool,
) {
    // The first connection: retried until made (the server may still be
    // coming up).
    let stream = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(stream) => break stream,
            Err(e) => {
                lock(state).connect_error = e.to_string();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    lock(state).tcp = Some(Conn::new(local_port(&stream)));
    ping_pong(stream, interval, state, stop, Which::First);
    if !reconnect {
        return;
    }
    // A new connection to the same address, once.
    let stream = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        lock(state).reconnect_attempts += 1;
        match TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
            Ok(stream) => break stream,
            Err(e) => {
                lock(state).reconnect_error = e.to_string();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    lock(state).reconnect = Some(Conn::new(local_port(&stream)));
    ping_pong(stream, interval, state, stop, Which::Reconnect);
}

fn local_port(stream: &TcpStream) -> u16 {
    stream.local_addr().map(|a| a.port()).unwrap_or(0)
}

fn ended_how(e: &std::io::Error) -> &'static str {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset"
        }
        _ => "error",
    }
}

/// Sends numbered lines on `stream` and reads their echoes until the stop
/// or the connection's end, which it records.
fn ping_pong(
    stream: TcpStream,
    interval: Duration,
    state: &Shared,
    stop: &AtomicBool,
    which: Which,
) {
    let _ = stream.set_nodelay(true);
    // Short, so that a wait for an echo still sees the stop.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let end = |how: &'static str, error: String| {
        let mut s = lock(state);
        if let Some(c) = conn(&mut s, which) {
            c.ended = Some(End {
                how,
                error,
                unix_ms: unix_ms(SystemTime::now()),
                after_replies: c.replies,
            });
        }
    };
    let mut seq: u64 = 0;
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let sent_at = Instant::now();
        let request = format!("tcp {seq}\n");
        if let Some(c) = conn(&mut lock(state), which) {
            c.awaiting = true;
        }
        if let Err(e) = writer.write_all(request.as_bytes()) {
            end(ended_how(&e), e.to_string());
            return;
        }
        line.clear();
        // Bytes read before a timeout stay in `line`: keep reading into it.
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    end("eof", String::new());
                    return;
                }
                Ok(_) if line.ends_with(b"\n") => break,
                Ok(_) => {}
                // The read timeout (EAGAIN); ETIMEDOUT, a connection that
                // retransmitted in vain, ends it below.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => {
                    end(ended_how(&e), e.to_string());
                    return;
                }
            }
        }
        {
            let mut s = lock(state);
            if let Some(c) = conn(&mut s, which) {
                let now = Instant::now();
                c.longest_gap = c.longest_gap.max(now - c.last_reply);
                c.last_reply = now;
                c.last_reply_unix_ms = unix_ms(SystemTime::now());
                c.awaiting = false;
                c.replies += 1;
                if line != request.as_bytes() {
                    c.mismatched += 1;
                }
            }
        }
        if let Some(rest) = (sent_at + interval).checked_duration_since(Instant::now()) {
            std::thread::sleep(rest);
        }
    }
}

fn udp_sender(
    socket: &UdpSocket,
    to: SocketAddr,
    interval: Duration,
    state: &Shared,
    stop: &AtomicBool,
) {
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let sent_at = Instant::now();
        // Unconnected: an ICMP error for one datagram does not fail the next
        // receive.
        let result = socket.send_to(format!("udp {seq}").as_bytes(), to);
        {
            let mut s = lock(state);
            match result {
                Ok(_) => s.udp.sent += 1,
                Err(e) => {
                    s.udp.send_errors += 1;
                    s.udp.last_send_error = e.to_string();
                }
            }
        }
        if let Some(rest) = (sent_at + interval).checked_duration_since(Instant::now()) {
            std::thread::sleep(rest);
        }
    }
}

fn udp_receiver(socket: &UdpSocket, from: SocketAddr, state: &Shared, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if peer != from {
            continue;
        }
        let well_formed = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| t.strip_prefix("udp "))
            .is_some_and(|seq| seq.parse::<u64>().is_ok());
        let mut s = lock(state);
        let now = Instant::now();
        if let Some(last) = s.udp.last_reply {
            s.udp.longest_gap = s.udp.longest_gap.max(now - last);
        }
        s.udp.last_reply = Some(now);
        s.udp.last_reply_unix_ms = unix_ms(SystemTime::now());
        s.udp.replies += 1;
        if !well_formed {
            s.udp.mismatched += 1;
        }
    }
}
