//! Quake 3's connectionless queries, as a player's browser and a server
//! admin's console send them: `getstatus` (the server's info string and one
//! line per player: score, ping, name) and `rcon` (a console command run on
//! the server, its printed output back). Both are single UDP datagrams that
//! start with four 0xff bytes; the server answers each with one datagram.
//!
//! ```text
//! → ff ff ff ff "getstatus 42"
//! ← ff ff ff ff "statusResponse\n" "\key\value\key\value…\n" "12 48 \"Sarge\"\n" …
//! → ff ff ff ff "rcon <password> set migrate_token 5f1c"
//! ← ff ff ff ff "print\n" <console output>
//! ```
//!
//! Everything here is pure (bytes in, values out) and bounded: what comes
//! back is a stranger's datagram.

use std::collections::BTreeMap;

use serde::Serialize;

/// The header of every connectionless datagram.
const OUT_OF_BAND: [u8; 4] = [0xff; 4];
/// The most a datagram may hold (the engine's own limit on a packet).
pub const MAX_DATAGRAM: usize = 16 << 10;
/// The most player lines a status may hold (the engine's MAX_CLIENTS).
pub const MAX_PLAYERS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("not a connectionless datagram (no 0xff 0xff 0xff 0xff header)")]
    NotOutOfBand,
    #[error("a {0}-byte datagram, more than a server sends")]
    TooLong(usize),
    #[error("expected a {expected} answer, got {got:?}")]
    UnexpectedCommand { expected: &'static str, got: String },
    #[error("the info string is malformed: {0}")]
    BadInfo(String),
    #[error("player line {line:?} is malformed")]
    BadPlayer { line: String },
    #[error("more than {MAX_PLAYERS} players")]
    TooManyPlayers,
    #[error("{what} {value:?} would not survive the server's tokenizer (no spaces, quotes or semicolons)")]
    Unsendable { what: &'static str, value: String },
}

/// A `getstatus` query; `challenge` comes back in the answer's info string,
/// which pairs answers with queries.
pub fn status_request(challenge: u64) -> Vec<u8> {
    let mut datagram = OUT_OF_BAND.to_vec();
    datagram.extend_from_slice(format!("getstatus {challenge}").as_bytes());
    datagram
}

/// An `rcon` query running `command` (words the server's console reads).
pub fn rcon_request(password: &str, command: &[String]) -> Result<Vec<u8>, QueryError> {
    check_word("the rcon password", password)?;
    for word in command {
        check_word("an rcon word", word)?;
    }
    let mut datagram = OUT_OF_BAND.to_vec();
    datagram.extend_from_slice(format!("rcon {password} {}", command.join(" ")).as_bytes());
    Ok(datagram)
}

fn check_word(what: &'static str, value: &str) -> Result<(), QueryError> {
    let bad = value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | ';'));
    if bad {
        return Err(QueryError::Unsendable {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// One line of the scoreboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Player {
    /// Without the colour codes (`^1`) the name may hold.
    pub name: String,
    pub score: i64,
    pub ping: u32,
}

/// A server's answer to `getstatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub info: BTreeMap<String, String>,
    pub players: Vec<Player>,
}

impl Status {
    pub fn map(&self) -> Option<&str> {
        self.info.get("mapname").map(String::as_str)
    }

    /// The challenge the query sent, if it was a number.
    pub fn challenge(&self) -> Option<u64> {
        self.info.get("challenge")?.parse().ok()
    }
}

/// Parses an answer to [`status_request`].
pub fn parse_status(datagram: &[u8]) -> Result<Status, QueryError> {
    let body = answer(datagram, "statusResponse")?;
    let mut lines = body.lines();
    let info = parse_info(lines.next().unwrap_or_default())?;
    let mut players = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        if players.len() == MAX_PLAYERS {
            return Err(QueryError::TooManyPlayers);
        }
        players.push(parse_player(line)?);
    }
    Ok(Status { info, players })
}

/// Parses an answer to [`rcon_request`]: the console's output.
pub fn parse_print(datagram: &[u8]) -> Result<String, QueryError> {
    answer(datagram, "print").map(str::to_owned)
}

/// The value of cvar `name` in the console's answer to a query of it
/// (`"name" is:"value^7" default:"…^7"`, or `…, the default`).
pub fn cvar_value(print: &str, name: &str) -> Option<String> {
    let rest = print.split_once(&format!("\"{name}\" is:\""))?.1;
    let value = rest.split_once('"')?.0;
    Some(strip_colours(value))
}

/// `s` without Quake's colour codes: a caret and the character after it.
pub fn strip_colours(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '^' {
            chars.next();
        } else {
            out.push(c);
        }
    }
    out
}

/// The text after the header and `command`'s line.
fn answer<'a>(datagram: &'a [u8], command: &'static str) -> Result<&'a str, QueryError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(QueryError::TooLong(datagram.len()));
    }
    let rest = datagram
        .strip_prefix(&OUT_OF_BAND)
        .ok_or(QueryError::NotOutOfBand)?;
    // Names and the info string may hold any byte; a lossy reading keeps
    // the rest of the answer usable.
    let text = std::str::from_utf8(rest).unwrap_or_default();
    let (first, body) = text.split_once('\n').unwrap_or((text, ""));
    if first != command {
        let got = String::from_utf8_lossy(rest)
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(64)
            .collect();
        return Err(QueryError::UnexpectedCommand {
            expected: command,
            got,
        });
    }
    Ok(body)
}

/// `\key\value\key\value`.
fn parse_info(line: &str) -> Result<BTreeMap<String, String>, QueryError> {
    let fields = line
        .strip_prefix('\\')
        .ok_or_else(|| QueryError::BadInfo("it does not start with a backslash".into()))?;
    let parts: Vec<&str> = fields.split('\\').collect();
    if !parts.len().is_multiple_of(2) {
        return Err(QueryError::BadInfo(format!(
            "key {:?} has no value",
            parts.last().unwrap_or(&"")
        )));
    }
    Ok(parts
        .chunks(2)
        .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
        .collect())
}

/// `score ping "name"`.
fn parse_player(line: &str) -> Result<Player, QueryError> {
    let bad = || QueryError::BadPlayer {
        line: line.chars().take(80).collect(),
    };
    let mut words = line.splitn(3, ' ');
    let score = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    let ping = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    let name = words
        .next()
        .and_then(|w| w.strip_prefix('"'))
        .and_then(|w| w.strip_suffix('"'))
        .ok_or_else(bad)?;
    Ok(Player {
        name: strip_colours(name),
        score,
        ping,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn datagram(text: &str) -> Vec<u8> {
        let mut d = OUT_OF_BAND.to_vec();
        d.extend_from_slice(text.as_bytes());
        d
    }

    /// Shaped as ioquake3 1.36 with OpenArena 0.8.8 answered here.
    const STATUS: &str = "statusResponse\n\\challenge\\7\\fraglimit\\0\\mapname\\oa_dm4\\sv_hostname\\noname\\g_timestamp\\2026-12-03 14:22:22\n0 0 \"Sarge\"\n-1 12 \"^1Gr^7ism\"\n";

    #[test]
    fn a_status_gives_the_map_the_challenge_and_the_scoreboard() {
        let status = parse_status(&datagram(STATUS)).unwrap();
        assert_eq!(status.map(), Some("oa_dm4"));
        assert_eq!(status.challenge(), Some(7));
        assert_eq!(status.info["g_timestamp"], "2026-12-03 14:22:22");
        assert_eq!(
            status.players,
            vec![
                Player {
                    name: "Sarge".into(),
                    score: 0,
                    ping: 0
                },
                Player {
                    name: "Grism".into(),
                    score: -1,
                    ping: 12
                },
            ]
        );
    }

    #[test]
    fn an_empty_server_has_no_players() {
        let status = parse_status(&datagram("statusResponse\n\\mapname\\oa_dm1\n")).unwrap();
        assert!(status.players.is_empty());
        assert_eq!(status.challenge(), None);
    }

    #[test]
    fn what_a_server_would_not_send_is_refused() {
        assert_eq!(
            parse_status(b"statusResponse\n\\a\\b\n"),
            Err(QueryError::NotOutOfBand)
        );
        assert!(matches!(
            parse_status(&datagram("print\nhello")),
            Err(QueryError::UnexpectedCommand { .. })
        ));
        assert!(matches!(
            parse_status(&datagram("statusResponse\n\\mapname\n")),
            Err(QueryError::BadInfo(_))
        ));
        assert!(matches!(
            parse_status(&datagram("statusResponse\n\\a\\b\nten 0 \"x\"\n")),
            Err(QueryError::BadPlayer { .. })
        ));
        assert!(matches!(
            parse_status(&datagram("statusResponse\n\\a\\b\n1 0 x\n")),
            Err(QueryError::BadPlayer { .. })
        ));
        let crowd = "1 0 \"x\"\n".repeat(MAX_PLAYERS + 1);
        assert_eq!(
            parse_status(&datagram(&format!("statusResponse\n\\a\\b\n{crowd}"))),
            Err(QueryError::TooManyPlayers)
        );
        let huge = datagram(&format!(
            "statusResponse\n\\a\\{}",
            "b".repeat(MAX_DATAGRAM)
        ));
        assert!(matches!(parse_status(&huge), Err(QueryError::TooLong(_))));
    }

    #[test]
    fn queries_are_one_header_and_one_line() {
        assert_eq!(status_request(42), datagram("getstatus 42"));
        let set = ["set", "migrate_token", "5f1c"].map(String::from);
        assert_eq!(
            rcon_request("pw", &set).unwrap(),
            datagram("rcon pw set migrate_token 5f1c")
        );
    }

    #[test]
    fn rcon_refuses_words_the_console_would_split() {
        for word in ["two words", "quo\"te", "a;quit", ""] {
            assert!(rcon_request(word, &["status".into()]).is_err(), "{word:?}");
            assert!(rcon_request("pw", &[word.into()]).is_err(), "{word:?}");
        }
    }

    #[test]
    fn a_cvar_query_answers_its_value() {
        let print = parse_print(&datagram(
            "print\n\"migrate_token\" is:\"abc123^7\", the default\n",
        ))
        .unwrap();
        assert_eq!(
            cvar_value(&print, "migrate_token").as_deref(),
            Some("abc123")
        );
        assert_eq!(
            cvar_value("\"g_speed\" is:\"320^7\" default:\"320^7\"\n", "g_speed").as_deref(),
            Some("320")
        );
        assert_eq!(cvar_value("Unknown command \"nope^7\"\n", "nope"), None);
    }
}
