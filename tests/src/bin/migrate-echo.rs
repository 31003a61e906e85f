//! The server of the network tests (`tests/tests/network.rs`), run in a
//! container: a TCP echo server (each connection gets back every line it
//! sends) and a UDP echo server (each datagram goes back to its sender), in
//! one process with a thread per connection, so that a dump never meets a
//! process that comes or goes (as socat's `fork` would make).
//!
//! `migrate-echo [--bind ADDR] [--tcp PORT] [--udp PORT]` (defaults
//! 0.0.0.0, 7000, 7001). It prints one line when both listen, and one per
//! connection accepted, naming the peer: on the destination that line goes
//! to the container's log there, which tells the test which host served a
//! connection. Std only: it is copied into a busybox rootfs.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

struct Args {
    bind: IpAddr,
    tcp: u16,
    udp: u16,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bind: IpAddr::from([0, 0, 0, 0]),
        tcp: 7000,
        udp: 7001,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--bind" => args.bind = value.parse().map_err(|e| bad(&e))?,
            "--tcp" => args.tcp = value.parse().map_err(|e| bad(&e))?,
            "--udp" => args.udp = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(args)
}

/// A line on stdout; a write that fails (the pipe gone) is not fatal.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "migrate-echo: {line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("migrate-echo: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind((args.bind, args.tcp)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("migrate-echo: binding tcp {}:{}: {e}", args.bind, args.tcp);
            return ExitCode::FAILURE;
        }
    };
    let udp = match UdpSocket::bind((args.bind, args.udp)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("migrate-echo: binding udp {}:{}: {e}", args.bind, args.udp);
            return ExitCode::FAILURE;
        }
    };
    std::thread::spawn(move || udp_echo(&udp));
    say(&format!(
        "listening on tcp {}:{} and udp {}:{}",
        args.bind, args.tcp, args.bind, args.udp
    ));
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                say(&format!("connection from {peer}"));
                std::thread::spawn(move || echo_lines(stream));
            }
            Err(e) => {
                eprintln!("migrate-echo: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Echoes every line of `stream` until it ends or fails.
fn echo_lines(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if writer.write_all(&line).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends every datagram back to its sender.
fn udp_echo(socket: &UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let _ = socket.send_to(&buf[..n], peer);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}
