//! Forwarding: a client request for a record pinned elsewhere, carried over the authenticated
//! peer links to a node of a region that may hold it, one QUIC stream per request; and the
//! serving side, which runs it with [`ops::execute`], exactly like a local client's request.
//!
//! Architecture invariant: the forwarding node stores nothing of the record; the target
//! authenticates the sender (it is a peer link) and applies its own residency admission again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_replication::protocol::ProtocolError;
use meridian_replication::wire::{ForwardMethod, Message};
use tracing::Instrument;

use super::LinkError;
use super::frame::{read_msg, write_msg};
use crate::config::Topology;
use crate::engine::Engine;
use crate::ops::{self, Op};
use crate::sync::lock;

/// A client request to carry to another region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardRequest {
    pub op: Op,
    pub key: String,
    pub idempotency_key: Option<String>,
    pub body: Vec<u8>,
}

impl ForwardRequest {
    fn to_message(&self) -> Message {
        Message::Forward {
            method: match self.op {
                Op::Get => ForwardMethod::Get,
                Op::Put => ForwardMethod::Put,
                Op::Patch => ForwardMethod::Patch,
                Op::Incr => ForwardMethod::Incr,
                Op::Delete => ForwardMethod::Delete,
            },
            key: self.key.clone(),
            // The wire has no absent string: empty means none (a header is never empty).
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            body: self.body.clone(),
        }
    }
}

fn op_of(method: ForwardMethod) -> Op {
    match method {
        ForwardMethod::Get => Op::Get,
        ForwardMethod::Put => Op::Put,
        ForwardMethod::Patch => Op::Patch,
        ForwardMethod::Incr => Op::Incr,
        ForwardMethod::Delete => Op::Delete,
    }
}

/// The answer of a peer to a forwarded request.
#[derive(Debug)]
pub struct ForwardAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    pub region: String,
    pub node: String,
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no node of region(s) {regions:?} is connected{tried}")]
    NoneReachable { regions: Vec<String>, tried: String },
}

/// How long a forwarded request waits for a link to an allowed region that is still connecting.
const FORWARD_CONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long a forwarded request may take before the next candidate node is tried.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// Carries client requests for records pinned elsewhere over the authenticated peer links.
/// Uses the connections this node dialled (one per peer), one QUIC stream per request.
pub struct Forwarder {
    topology: Arc<Topology>,
    conns: Mutex<HashMap<String, quinn::Connection>>,
}

impl Forwarder {
    pub fn new(topology: Arc<Topology>) -> Self {
        Forwarder {
            topology,
            conns: Mutex::default(),
        }
    }

    fn conn(&self, node: &str) -> Option<quinn::Connection> {
        let conns = lock(&self.conns);
        conns.get(node).cloned()
    }

    fn any_connected(&self, regions: &[String]) -> bool {
        regions
            .iter()
            .flat_map(|r| self.topology.nodes_in(r))
            .any(|n| self.conn(&n.id).is_some())
    }

    pub(super) fn register(&self, node: &str, conn: Option<quinn::Connection>) {
        let mut conns = lock(&self.conns);
        match conn {
            Some(c) => conns.insert(node.to_string(), c),
            None => conns.remove(node),
        };
    }

    /// Send `request` to a node of the first of `regions` that answers.
    pub async fn forward(
        &self,
        regions: &[String],
        request: &ForwardRequest,
    ) -> Result<ForwardAnswer, ForwardError> {
        let request = request.to_message();
        // Right after start (or a reconnect) the links may still be connecting: wait a moment
        // for one instead of refusing at once.
        let waited = Instant::now();
        while !self.any_connected(regions) && waited.elapsed() < FORWARD_CONNECT_WAIT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut tried = Vec::new();
        for region in regions {
            for node in self.topology.nodes_in(region) {
                let Some(conn) = self.conn(&node.id) else {
                    continue;
                };
                match tokio::time::timeout(FORWARD_TIMEOUT, forward_rpc(&conn, &request)).await {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(e)) => tried.push(format!("{}: {e}", node.id)),
                    Err(_) => {
                        tried.push(format!("{}: no answer within {FORWARD_TIMEOUT:?}", node.id))
                    }
                }
            }
        }
        Err(ForwardError::NoneReachable {
            regions: regions.to_vec(),
            tried: if tried.is_empty() {
                String::new()
            } else {
                format!(" ({})", tried.join("; "))
            },
        })
    }
}

async fn forward_rpc(
    conn: &quinn::Connection,
    request: &Message,
) -> Result<ForwardAnswer, LinkError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, request).await?;
    let _ = send.finish();
    match read_msg(&mut recv).await? {
        Message::Forwarded {
            status,
            region,
            node,
            body,
        } => Ok(ForwardAnswer {
            status,
            body,
            region,
            node,
            replayed: false,
        }),
        _ => Err(ProtocolError::UnexpectedMessage("non-forward answer").into()),
    }
}

/// Serve requests that `peer` forwards to us on its connection, one stream each.
pub(super) async fn serve_forwards(engine: Arc<Engine>, conn: quinn::Connection, peer: String) {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let engine = engine.clone();
        let peer = peer.clone();
        tokio::spawn(
            async move {
                let request = match read_msg(&mut recv).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "bad forwarded request");
                        return;
                    }
                };
                let Message::Forward {
                    method,
                    key,
                    idempotency_key,
                    body,
                } = request
                else {
                    tracing::warn!(%peer, "unexpected message on a forwarding stream");
                    return;
                };
                let idem = (!idempotency_key.is_empty()).then_some(idempotency_key);
                let answer = ops::execute(&engine, op_of(method), &key, &body, idem).await;
                let reply = Message::Forwarded {
                    status: answer.status,
                    region: engine.region.clone(),
                    node: engine.node_id.clone(),
                    body: answer.body,
                };
                if let Err(e) = write_msg(&mut send, &reply).await {
                    tracing::warn!(%peer, error = %e, "answering a forwarded request failed");
                }
                let _ = send.finish();
            }
            .instrument(tracing::Span::current()),
        );
    }
}
