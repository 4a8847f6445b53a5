//! What a Redis Cluster needs beyond one server: a pipeline per shard,
//! and the completion hand-off in two steps (the stream lives in another slot
//! than the paper): appended after the seal, at least once, and finished by the
//! next writer if one died between.

use std::collections::HashMap;

use redis::{Pipeline, Value};

use super::endpoint::{slot, Conn, Endpoint};
use super::writer::{unexpected, WAIT_TIMEOUT};
use super::{is_transient, keys};

/// Sends a batch to a Redis Cluster: one pipeline per shard (every paper whose
/// slot `masters` gives to the same master), each ending with `WAIT` when
/// replicas must have it. The cluster client routes a pipeline by its first
/// command's key; a command that reaches a master no longer serving its slot
/// (the map moved since it was read) gets `MOVED`, which the writer retries on a
/// new connection and map (writes are idempotent by version). Replies come back
/// in the order of `pipe`.
///
/// # Errors
/// A pipeline failed to go through, or replicas did not take it.
pub(super) fn per_shard(
    conn: &mut Conn,
    pipe: &Pipeline,
    owners: &[&str],
    masters: &[(u16, u16, String)],
    wait_replicas: usize,
) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
    // Shard of each paper, looked up once per paper; a slot the map does not
    // cover (it is being read anew) gets a pipeline of its own.
    let mut shards: Vec<(String, Vec<usize>)> = Vec::new();
    let mut shard_of_paper: HashMap<&str, usize> = HashMap::new();
    for (i, owner) in owners.iter().enumerate() {
        let at = *shard_of_paper.entry(owner).or_insert_with(|| {
            let slot = slot(&keys::meta(owner));
            let shard = match masters.iter().find(|(from, to, _)| (*from..=*to).contains(&slot)) {
                Some((_, _, addr)) => addr.clone(),
                None => format!("slot {slot}"),
            };
            shards.iter().position(|(s, _)| *s == shard).unwrap_or_else(|| {
                shards.push((shard, Vec::new()));
                shards.len() - 1
            })
        });
        shards[at].1.push(i);
    }
    let cmds: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
    let mut replies: Vec<Option<redis::RedisResult<Value>>> = (0..cmds.len()).map(|_| None).collect();
    for (shard, indices) in shards {
        let group: Vec<&redis::Cmd> = indices.iter().map(|&i| cmds[i]).collect();
        let got = match send(conn, &group, wait_replicas, &shard) {
            Ok(got) => got,
            // The cluster client makes an error reply anywhere in a pipeline the
            // error of the whole pipeline: a refusal for good (a key of the wrong
            // type) would otherwise fail the batch, sent again and again, holding up
            // every paper. The shard's commands are sent again paper by paper, and
            // the refused paper's one at a time, so that the refusal lands on its
            // own command (then on its paper alone). They ran already and run again
            // harmlessly, as after any retry: writes are idempotent by version, a
            // seal happens once, presence is set again.
            Err(e) if refused_for_good(&e) => paper_by_paper(conn, &cmds, &indices, owners, wait_replicas)?,
            // The slot map the shards were grouped by is older than the cluster
            // client's (a slot moved): paper by paper, the client routes each
            // pipeline by its own map, as it follows redirections.
            Err(e) if redirected(&e) => paper_by_paper(conn, &cmds, &indices, owners, wait_replicas)?,
            Err(e) => return Err(e),
        };
        for (i, reply) in indices.into_iter().zip(got) {
            replies[i] = Some(reply);
        }
    }
    Ok(replies.into_iter().map(|r| r.unwrap_or_else(|| Err(unexpected(None)))).collect())
}

/// A shard's commands (`indices` into `cmds`) sent again one paper's pipeline at
/// a time, and a paper whose pipeline is refused one command at a time. Replies
/// in the order of `indices`.
fn paper_by_paper(
    conn: &mut Conn,
    cmds: &[&redis::Cmd],
    indices: &[usize],
    owners: &[&str],
    wait_replicas: usize,
) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
    let mut papers: Vec<(&str, Vec<usize>)> = Vec::new();
    for (at, &i) in indices.iter().enumerate() {
        match papers.iter_mut().find(|(paper, _)| *paper == owners[i]) {
            Some((_, ats)) => ats.push(at),
            None => papers.push((owners[i], vec![at])),
        }
    }
    let mut replies: Vec<Option<redis::RedisResult<Value>>> = (0..indices.len()).map(|_| None).collect();
    for (paper, ats) in papers {
        let group: Vec<&redis::Cmd> = ats.iter().map(|&at| cmds[indices[at]]).collect();
        let got = match send(conn, &group, wait_replicas, paper) {
            Ok(got) => got,
            Err(e) if refused_for_good(&e) => {
                let mut one_by_one = Vec::with_capacity(group.len());
                for cmd in group {
                    match send(conn, &[cmd], wait_replicas, paper) {
                        Ok(mut got) => one_by_one.push(got.pop().unwrap_or_else(|| Err(unexpected(None)))),
                        Err(e) if refused_for_good(&e) => one_by_one.push(Err(e)),
                        Err(e) => return Err(e),
                    }
                }
                one_by_one
            }
            Err(e) => return Err(e),
        };
        for (at, reply) in ats.into_iter().zip(got) {
            replies[at] = Some(reply);
        }
    }
    Ok(replies.into_iter().map(|r| r.unwrap_or_else(|| Err(unexpected(None)))).collect())
}

/// A slot served elsewhere than the pipeline was sent.
fn redirected(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("MOVED" | "ASK"))
}

/// An error Redis answered with that retrying cannot cure, rather than one of
/// the connection, the cluster's state or the client.
fn refused_for_good(e: &redis::RedisError) -> bool {
    e.code().is_some() && !is_transient(e)
}

/// One pipeline of commands of one shard's slots (`to`: the shard or paper, for
/// the error), ending with `WAIT` when replicas must have it.
fn send(
    conn: &mut Conn,
    cmds: &[&redis::Cmd],
    wait_replicas: usize,
    to: &str,
) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
    let mut sub = redis::pipe();
    sub.ignore_errors();
    for cmd in cmds {
        sub.add_command((*cmd).clone());
    }
    if wait_replicas > 0 {
        sub.cmd("WAIT").arg(wait_replicas).arg(WAIT_TIMEOUT.as_millis() as u64);
    }
    let mut got = sub.query::<Vec<redis::RedisResult<Value>>>(conn)?;
    if wait_replicas > 0 {
        let acked = match got.pop() {
            Some(Ok(Value::Int(n))) => n,
            _ => 0,
        };
        if acked < wait_replicas as i64 {
            let detail = format!("WAIT: {acked} of {wait_replicas} replicas have the writes to {to}");
            return Err(redis::RedisError::from((redis::ErrorKind::Io, "replication", detail)));
        }
    }
    Ok(got)
}

/// The second step of a seal on a Cluster: the stream entry, then the marker
/// cleared (an entry may so be appended twice, never lost).
pub(super) fn hand_off(conn: &mut Conn, paper: &str, snapshot: &[u8]) -> redis::RedisResult<()> {
    redis::cmd("XADD")
        .arg(keys::COMPLETED_STREAM)
        .arg("*")
        .arg("paper")
        .arg(paper)
        .arg("snapshot")
        .arg(snapshot)
        .query::<Value>(conn)?;
    redis::cmd("HDEL").arg(keys::meta(paper)).arg("handoff_pending").query::<Value>(conn)?;
    Ok(())
}

/// On a Cluster, at the writer's first connection: the hand-offs a writer left
/// pending (it died between the seal and the stream entry) are finished, found
/// by a `SCAN` of each master for paper metas.
///
/// # Errors
/// A master could not be scanned, or an entry not appended.
pub(super) fn finish_pending_handoffs(endpoint: &Endpoint, conn: &mut Conn) -> redis::RedisResult<()> {
    let mut finished = 0;
    for (_, _, addr) in endpoint.masters()? {
        let mut node = endpoint.connect_node(&addr)?;
        let mut cursor = 0u64;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("rp:paper:{*}:meta")
                .arg("COUNT")
                .arg(1000)
                .query(&mut node)?;
            for key in found {
                let Some(paper) = key.strip_prefix("rp:paper:{").and_then(|k| k.strip_suffix("}:meta")) else {
                    continue;
                };
                let pending: Option<Vec<u8>> = redis::cmd("HGET").arg(&key).arg("handoff_pending").query(&mut node)?;
                if let Some(snapshot) = pending.filter(|s| !s.is_empty()) {
                    hand_off(conn, paper, &snapshot)?;
                    finished += 1;
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    if finished > 0 {
        log::info!(
            "appended {finished} completed papers to {} that a stopped writer left pending",
            keys::COMPLETED_STREAM
        );
    }
    Ok(())
}
