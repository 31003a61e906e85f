//! The source's connection to the destination: dialing it, the preflight
//! exchange, and in post-copy replacing a lost connection with one that
//! carries on ([`Resume`]).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use migrate_common::certs::TlsDir;
use migrate_common::protocol::{
    Body, ControlChannel, ControlMessage, Hello, PreflightReply, Resume, Resumed, PROTOCOL_VERSION,
};
use migrate_common::transport;

use crate::finish::Failure;

pub type Control = ControlChannel<quinn::SendStream>;

/// How long a source whose data stream the destination stopped waits for
/// the destination's word on why.
const STOPPED_CAUSE_WAIT: Duration = Duration::from_secs(5);

/// How long one attempt to reach a lost destination may take.
const RECONNECT_ATTEMPT: Duration = Duration::from_secs(5);
/// Pause between attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// One QUIC connection and its control stream.
#[derive(Debug)]
pub struct Link {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub control: Control,
}

/// Where and how to dial.
#[derive(Debug, Clone)]
pub struct Dial<'a> {
    pub destination: &'a str,
    pub tls: &'a TlsDir,
    pub idle_timeout: Duration,
}

impl Link {
    pub async fn connect(dial: &Dial<'_>) -> Result<Self> {
        let (endpoint, conn) =
            transport::connect_with_idle_timeout(dial.destination, dial.tls, dial.idle_timeout)
                .await
                .with_context(|| format!("connecting to {}", dial.destination))?;
        let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
        Ok(Self {
            endpoint,
            conn,
            control: ControlChannel::new(recv, send),
        })
    }

    /// Says goodbye: the peer has read our last message when it closes.
    pub async fn close(mut self) {
        let _ = self.control.send_half().finish();
        self.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Drops a connection that is already lost, without waiting on it.
    pub fn abandon(self) {
        self.conn.close(1u32.into(), b"lost");
    }
}

/// Sends `Hello` and returns the destination's verdict.
pub async fn preflight(link: &mut Link, hello: Hello) -> Result<PreflightReply, Failure> {
    link.control.send(hello).await.map_err(Failure::Link)?;
    match link.control.recv().await.map_err(Failure::Link)?.body {
        Some(Body::PreflightReply(reply)) => Ok(reply),
        other => Err(Failure::unexpected("PreflightReply", other)),
    }
}

/// Dials again until the destination takes the migration back or
/// `deadline` passes; returns the new link and where the destination stands.
pub async fn resume(
    dial: &Dial<'_>,
    migration_id: &str,
    tunnel_delivered: u64,
    deadline: Instant,
) -> Result<(Link, Resumed)> {
    let started = Instant::now();
    let mut last_error = None;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(
            RECONNECT_ATTEMPT.min(left),
            try_resume(dial, migration_id, tunnel_delivered),
        )
        .await;
        match attempt {
            Ok(Ok(resumed)) => return Ok(resumed),
            Ok(Err(e)) if e.downcast_ref::<Refused>().is_some() => return Err(e),
            Ok(Err(e)) => {
                tracing::debug!(error = %format!("{e:#}"), "reconnecting");
                last_error = Some(e);
            }
            Err(_) => {
                last_error = Some(anyhow!(
                    "the last attempt had no answer within {RECONNECT_ATTEMPT:?}"
                ))
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
    Err(last_error
        .unwrap_or_else(|| anyhow!("no time left"))
        .context(format!(
            "the destination did not come back within {}",
            humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
        )))
}

/// The destination answered, and does not hold this migration.
#[derive(Debug, thiserror::Error)]
#[error("the destination does not hold this migration any more: {0}")]
pub struct Refused(pub String);

async fn try_resume(
    dial: &Dial<'_>,
    migration_id: &str,
    tunnel_delivered: u64,
) -> Result<(Link, Resumed)> {
    ask(
        dial,
        Resume {
            protocol_version: PROTOCOL_VERSION,
            migration_id: migration_id.to_owned(),
            tunnel_delivered,
            container_id: String::new(),
        },
    )
    .await
}

/// One attempt: dials and sends `resume`; the destination answers what it
/// holds of the migration, or [`Refused`] if nothing.
pub async fn ask(dial: &Dial<'_>, resume: Resume) -> Result<(Link, Resumed)> {
    let mut link = Link::connect(dial).await?;
    link.control.send(resume).await?;
    match link.control.recv().await?.body {
        Some(Body::Resumed(resumed)) => Ok((link, resumed)),
        Some(Body::Failed(failed)) => Err(Refused(failed.message).into()),
        other => bail!(
            "the destination answered {} to Resume",
            ControlMessage { body: other }.kind()
        ),
    }
}

/// `failure`, or when it is a data stream the destination stopped, the
/// destination's own `Failed` that says why (a full disk, a corrupt
/// stream), if it comes within a few seconds.
pub(crate) async fn destination_cause(link: &mut Link, failure: Failure) -> Failure {
    let Failure::Source(e) = &failure else {
        return failure;
    };
    let stopped = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<quinn::WriteError>(),
            Some(quinn::WriteError::Stopped(_))
        )
    });
    if !stopped {
        return failure;
    }
    let deadline = tokio::time::Instant::now() + STOPPED_CAUSE_WAIT;
    while let Ok(Ok(msg)) = tokio::time::timeout_at(deadline, link.control.recv()).await {
        if let Some(Body::Failed(failed)) = msg.body {
            return Failure::Destination(failed);
        }
    }
    failure
}
