//! `quake-status`: a Quake 3 server seen from a player's machine.
//!
//! ```text
//! quake-status watch 10.77.0.10:27960 [--poll 100ms] [--show 1s] [--json] [--stop-file F] [--for 30s]
//! quake-status rcon 10.77.0.10:27960 --password PW -- status
//! quake-status cvar 10.77.0.10:27960 --password PW [--set 5f1c] migrate_token
//! ```
//!
//! `watch` queries the server's status every `--poll` and shows the
//! scoreboard every `--show` (or, with `--json`, one JSON object per line),
//! keeping count of how long the server went without answering; it stops
//! when `--stop-file` exists or `--for` has passed, and ends with a summary.
//!
//! ioquake3 answers one address's `getstatus` at most once a second (after
//! a burst of ten): against amplification, per IP address, whatever the
//! port. To poll faster a player's machine asks from several of its
//! addresses in turn (`--from`, repeated): ten give one answer every
//! 100 ms.

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use quake_status::{
    cvar_value, parse_print, parse_status, rcon_request, status_request, Status, MAX_DATAGRAM,
};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A Quake 3 server's scoreboard and console over its UDP queries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Polls the server's status and shows its scoreboard.
    Watch {
        server: SocketAddr,
        /// How often to ask.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        poll: Duration,
        /// How often to show the latest answer.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        show: Duration,
        /// One JSON object per line instead of the scoreboard.
        #[arg(long)]
        json: bool,
        /// Stop once this file exists.
        #[arg(long)]
        stop_file: Option<PathBuf>,
        /// Stop after this long.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Ask from this local address (repeat it to ask from several in
        /// turn); by default from the one the route to the server picks.
        #[arg(long = "from")]
        from: Vec<std::net::IpAddr>,
    },
    /// Runs a console command on the server and prints its output.
    Rcon {
        server: SocketAddr,
        #[arg(long)]
        password: String,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(required = true, last = true)]
        words: Vec<String>,
    },
    /// Prints the value of one of the server's cvars (over rcon), after
    /// setting it with `--set`.
    Cvar {
        server: SocketAddr,
        #[arg(long)]
        password: String,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Sets the cvar (creating it) first.
        #[arg(long)]
        set: Option<String>,
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Watch {
            server,
            poll,
            show,
            json,
            stop_file,
            duration,
            from,
        } => watch(
            server,
            &from,
            Pace { poll, show },
            json,
            Until {
                stop_file,
                duration,
            },
        ),
        Command::Rcon {
            server,
            password,
            timeout,
            words,
        } => rcon(server, &password, &words, timeout).map(|out| print!("{out}")),
        Command::Cvar {
            server,
            password,
            timeout,
            set,
            name,
        } => cvar(server, &password, &name, set, timeout).map(|value| println!("{value}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quake-status: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A UDP socket from `from` (any local address if None) to `server`.
fn socket_to(server: SocketAddr, from: Option<std::net::IpAddr>) -> Result<UdpSocket> {
    let local = match from {
        Some(ip) => SocketAddr::new(ip, 0),
        None if server.is_ipv4() => "0.0.0.0:0".parse()?,
        None => "[::]:0".parse()?,
    };
    let socket =
        UdpSocket::bind(local).with_context(|| format!("binding a UDP socket to {local}"))?;
    socket
        .connect(server)
        .with_context(|| format!("addressing {server}"))?;
    Ok(socket)
}

/// The console's answer to one command; several datagrams when the output
/// is long, gathered until the server is quiet for a moment.
fn rcon(server: SocketAddr, password: &str, words: &[String], timeout: Duration) -> Result<String> {
    let socket = socket_to(server, None)?;
    socket.send(&rcon_request(password, words)?)?;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut out = String::new();
    let mut answered = false;
    let mut wait = timeout;
    loop {
        socket.set_read_timeout(Some(wait))?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                // A command that prints nothing (`set`) still answers, empty.
                if let Ok(text) = parse_print(&buf[..n]) {
                    out.push_str(&text);
                    answered = true;
                    wait = Duration::from_millis(200);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => return Err(e).with_context(|| format!("waiting for {server}")),
        }
    }
    if !answered {
        bail!(
            "{server} did not answer within {} (the server answers nothing to a command \
             that prints nothing, such as set)",
            humantime::format_duration(timeout)
        );
    }
    if out.contains("Bad rconpassword") || out.contains("No rconpassword set") {
        bail!("{server} refused the command: {}", out.trim());
    }
    Ok(out)
}

/// The value of cvar `name`, set to `set` first if given. Setting prints
/// nothing, and the server sends no answer for a command that printed
/// nothing: the set goes alone, and the query that follows shows it took.
fn cvar(
    server: SocketAddr,
    password: &str,
    name: &str,
    set: Option<String>,
    timeout: Duration,
) -> Result<String> {
    if let Some(value) = &set {
        let socket = socket_to(server, None)?;
        socket.send(&rcon_request(
            password,
            &["set".to_owned(), name.to_owned(), value.clone()],
        )?)?;
    }
    let out = rcon(server, password, &[name.to_owned()], timeout)?;
    let value = cvar_value(&out, name)
        .with_context(|| format!("the server has no cvar {name}: {}", out.trim()))?;
    if let Some(wanted) = set {
        if value != wanted {
            bail!("{name} is {value:?} after setting it to {wanted:?}");
        }
    }
    Ok(value)
}

/// What `watch` has seen so far.
#[derive(Debug, Default)]
struct Watch {
    queries: u64,
    answered: u64,
    first_answer: Option<SystemTime>,
    last_answer: Option<SystemTime>,
    latest: Option<Status>,
    /// The longest time between two answers, and when it began.
    longest_gap: Duration,
    longest_gap_from: Option<SystemTime>,
}

impl Watch {
    fn answer(&mut self, status: Status, at: SystemTime) {
        self.answered += 1;
        if let Some(last) = self.last_answer {
            let gap = at.duration_since(last).unwrap_or_default();
            if gap > self.longest_gap {
                self.longest_gap = gap;
                self.longest_gap_from = Some(last);
            }
        }
        self.first_answer.get_or_insert(at);
        self.last_answer = Some(at);
        self.latest = Some(status);
    }

    fn silent_for(&self, now: SystemTime) -> Option<Duration> {
        self.last_answer
            .map(|last| now.duration_since(last).unwrap_or_default())
    }

    /// The longest gap, counting a silence still going on.
    fn longest(&self, now: SystemTime) -> (Duration, Option<SystemTime>) {
        match self.silent_for(now) {
            Some(silent) if silent > self.longest_gap => (silent, self.last_answer),
            _ => (self.longest_gap, self.longest_gap_from),
        }
    }
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// "14:23:05.123", UTC.
fn clock(t: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_millis(t).to_string();
    stamp
        .split_once('T')
        .map(|(_, time)| time.trim_end_matches('Z').to_owned())
        .unwrap_or(stamp)
}

/// How often `watch` asks and shows.
#[derive(Debug, Clone, Copy)]
struct Pace {
    poll: Duration,
    show: Duration,
}

/// When `watch` stops.
#[derive(Debug)]
struct Until {
    stop_file: Option<PathBuf>,
    duration: Option<Duration>,
}

impl Until {
    fn reached(&self, started: Instant) -> bool {
        self.stop_file.as_ref().is_some_and(|f| f.exists())
            || self.duration.is_some_and(|d| started.elapsed() >= d)
    }
}

/// How long `watch` sleeps when no answer is waiting: fine enough for gaps
/// measured against a 100 ms poll.
const IDLE: Duration = Duration::from_millis(2);

fn watch(
    server: SocketAddr,
    from: &[std::net::IpAddr],
    pace: Pace,
    json: bool,
    until: Until,
) -> Result<()> {
    let sockets = if from.is_empty() {
        vec![socket_to(server, None)?]
    } else {
        from.iter()
            .map(|ip| socket_to(server, Some(*ip)))
            .collect::<Result<Vec<_>>>()?
    };
    for socket in &sockets {
        socket.set_nonblocking(true)?;
    }
    let started = Instant::now();
    let mut seen = Watch::default();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut next_poll = started;
    let mut next_show = started + pace.show;
    let (mut shown_queries, mut shown_answers) = (0, 0);
    let mut stdout = std::io::stdout().lock();
    while !until.reached(started) {
        let now = Instant::now();
        if now >= next_poll {
            let socket = &sockets[(seen.queries % sockets.len() as u64) as usize];
            // A query lost to an unreachable server only shows as silence.
            let _ = socket.send(&status_request(seen.queries));
            seen.queries += 1;
            next_poll += pace.poll;
            if next_poll < now {
                next_poll = now + pace.poll;
            }
        }
        if now >= next_show {
            let at = SystemTime::now();
            let line = if json {
                json_line(&seen, at).to_string()
            } else {
                scoreboard(
                    &seen,
                    at,
                    seen.queries - shown_queries,
                    seen.answered - shown_answers,
                )
            };
            writeln!(stdout, "{line}")?;
            stdout.flush()?;
            (shown_queries, shown_answers) = (seen.queries, seen.answered);
            next_show += pace.show;
        }
        let mut received = false;
        for socket in &sockets {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    received = true;
                    if let Ok(status) = parse_status(&buf[..n]) {
                        seen.answer(status, SystemTime::now());
                    }
                }
                // Nothing yet, or refused (nothing listens, for now): silence.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(e).with_context(|| format!("waiting for {server}")),
            }
        }
        if !received {
            std::thread::sleep(IDLE);
        }
    }
    let at = SystemTime::now();
    let (gap, gap_from) = seen.longest(at);
    if json {
        let summary = json!({
            "summary": {
                "queries": seen.queries,
                "answered": seen.answered,
                "longest_gap_ms": gap.as_millis(),
                "longest_gap_from_unix_ms": gap_from.map(unix_ms),
                "last": seen.latest,
            }
        });
        writeln!(stdout, "{summary}")?;
    } else {
        let span = gap_from.map_or_else(String::new, |f| {
            format!(" (from {} to {})", clock(f), clock(f + gap))
        });
        writeln!(
            stdout,
            "{} of {} queries answered; the longest time without an answer: {:.2} s{span}",
            seen.answered,
            seen.queries,
            gap.as_secs_f64()
        )?;
    }
    if seen.answered == 0 {
        bail!("{server} never answered");
    }
    Ok(())
}

fn json_line(seen: &Watch, at: SystemTime) -> serde_json::Value {
    json!({
        "unix_ms": unix_ms(at),
        "queries": seen.queries,
        "answered": seen.answered,
        "silent_ms": seen.silent_for(at).map(|d| d.as_millis()),
        "longest_gap_ms": seen.longest(at).0.as_millis(),
        "status": seen.latest,
    })
}

/// The scoreboard as a player's browser shows it: map, then players by
/// score.
fn scoreboard(seen: &Watch, at: SystemTime, queries: u64, answers: u64) -> String {
    let Some(status) = &seen.latest else {
        return format!("[{}] no answer yet", clock(at));
    };
    let silent = seen.silent_for(at).unwrap_or_default();
    let state = if silent > Duration::from_millis(500) {
        format!("NO ANSWER for {:.1} s", silent.as_secs_f64())
    } else {
        format!("{answers}/{queries} answered")
    };
    let mut players = status.players.clone();
    players.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
    let mut out = format!("[{}] {}  {}", clock(at), status.map().unwrap_or("?"), state);
    for p in players {
        out.push_str(&format!(
            "\n    {:<16} {:>4} frags  {:>3} ms",
            p.name, p.score, p.ping
        ));
    }
    out
}
