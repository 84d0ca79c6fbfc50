//! Migration: the controller's registers, features, identity, queues (with their heads,
//! tails and phases), shadow doorbell buffers and held Asynchronous Event Requests, saved
//! at STOP_COPY (commands in flight have finished: the framework drained the work context
//! before the stop). The namespace's data stays in its backing file (shared storage): the
//! destination must use the same file (its `vendor/backing_file`), or the state is refused;
//! unless the parent copies it (`copy_on_migrate`: the chunks of `device.rs` came first and
//! the destination keeps its own file).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use umdev_pci::{Errno, StateReader, StateWriter};

use crate::ctrl::{Cq, CqState, Ctrl, DbBuf, Done, Features, Regs, Sq, QUEUES};
use crate::identify::Identity;
use crate::mem::Region;
use crate::regs::{self, Status};

/// The state version written.
pub const VERSION: u32 = 1;
const TAG: u16 = 1;

#[derive(Serialize, Deserialize)]
struct SavedSq {
    id: u16,
    cqid: u16,
    size: u32,
    base: u64,
    head: u32,
    tail: u32,
}

#[derive(Serialize, Deserialize)]
struct SavedCq {
    id: u16,
    size: u32,
    iv: u16,
    ien: bool,
    base: u64,
    tail: u32,
    phase: bool,
    head: u32,
    /// Completions still waiting for room: (dw0, sqid, sq_head, cid, sct, sc, dnr).
    overflow: Vec<(u32, u16, u16, u16, u8, u8, bool)>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    identity: Identity,
    regs: (u32, u32, u32, u64, u64, u32),
    features: (u32, u32, u32, bool, Option<(u16, u16)>, bool),
    sqs: Vec<SavedSq>,
    cqs: Vec<SavedCq>,
    dbbuf: Option<(u64, u64)>,
    aers: (Vec<u16>, Vec<u32>),
    backing_file: String,
    /// The namespace's data came in the stream's chunks (the destination keeps its file).
    #[serde(default)]
    data_copied: bool,
    size: u64,
}

/// Whether `r` holds a controller's state.
pub(crate) fn present(r: &StateReader<'_>) -> bool {
    r.get(TAG).is_some()
}

pub(crate) fn save(c: &Ctrl, w: &mut StateWriter) -> Result<(), Errno> {
    let r = *c.regs.lock().unwrap_or_else(|e| e.into_inner());
    let f = *c.features.lock().unwrap_or_else(|e| e.into_inner());
    let sqs = c
        .sqs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flatten()
        .map(|q| SavedSq {
            id: q.id,
            cqid: q.cqid,
            size: q.size,
            base: q.ring.iova(),
            head: q.head.load(Ordering::Acquire),
            tail: q.tail.load(Ordering::Acquire),
        })
        .collect();
    let cqs = c
        .cqs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flatten()
        .map(|q| {
            let st = q.st.lock().unwrap_or_else(|e| e.into_inner());
            SavedCq {
                id: q.id,
                size: q.size,
                iv: q.iv,
                ien: q.ien,
                base: q.ring.iova(),
                tail: st.tail,
                phase: st.phase,
                head: st.head,
                overflow: st
                    .overflow
                    .iter()
                    .map(|d| {
                        (
                            d.dw0,
                            d.sqid,
                            d.sq_head,
                            d.cid,
                            d.status.sct,
                            d.status.sc,
                            d.status.dnr,
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    let dbbuf = c
        .dbbuf
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|d| (d.shadow.iova(), d.eventidx.iova()));
    let aers = c.aers.lock().unwrap_or_else(|e| e.into_inner());
    let saved = Saved {
        identity: c.identity.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        regs: (r.cc, r.csts, r.aqa, r.asq, r.acq, r.intms),
        features: (
            f.coalescing,
            f.coalescing_disabled,
            f.async_event_config,
            f.volatile_write_cache,
            f.queues_granted,
            f.io_queues_created,
        ),
        sqs,
        cqs,
        dbbuf,
        aers: (aers.0.clone(), aers.1.iter().copied().collect()),
        backing_file: c.ns.path().display().to_string(),
        data_copied: c.tuning.copy_on_migrate,
        size: c.ns.size(),
    };
    let bytes = serde_json::to_vec(&saved).map_err(|_| Errno::INVAL)?;
    w.bytes(TAG, &bytes);
    Ok(())
}

pub(crate) fn load(c: &Arc<Ctrl>, _version: u32, r: &StateReader<'_>) -> Result<(), Errno> {
    let saved: Saved = serde_json::from_slice(r.bytes(TAG)?).map_err(|e| {
        tracing::warn!(error = %e, "mnvme: the incoming state is not an mnvme state");
        Errno::INVAL
    })?;
    // Everything is checked before anything changes.
    if saved.size != c.ns.size() {
        tracing::warn!(
            theirs = saved.size,
            ours = c.ns.size(),
            "mnvme: incoming state of a namespace of another size"
        );
        return Err(Errno::INVAL);
    }
    let ours = c.ns.path().display().to_string();
    if !saved.data_copied && saved.backing_file != ours {
        tracing::warn!(
            theirs = saved.backing_file,
            ours,
            "mnvme: the source's namespace is in another file; set vendor/backing_file to it before migrating"
        );
        return Err(Errno::INVAL);
    }
    let valid_q = |id: u16, size: u32| {
        usize::from(id) < QUEUES && (2..=regs::MAX_QUEUE_ENTRIES).contains(&size)
    };
    let bad_sq = saved
        .sqs
        .iter()
        .any(|q| !valid_q(q.id, q.size) || q.head >= q.size || q.tail >= q.size);
    let bad_cq = saved
        .cqs
        .iter()
        .any(|q| !valid_q(q.id, q.size) || q.tail >= q.size || q.head >= q.size);
    if bad_sq || bad_cq {
        tracing::warn!("mnvme: incoming state with an impossible queue");
        return Err(Errno::INVAL);
    }
    let a = c.attached().ok_or(Errno::NODEV)?;
    c.generation.fetch_add(1, Ordering::SeqCst);
    let mut sqs = vec![None; QUEUES];
    for q in saved.sqs {
        let sq = Sq::new(&a.guest, q.id, q.cqid, q.size, q.base);
        sq.head.store(q.head, Ordering::Release);
        sq.tail.store(q.tail, Ordering::Release);
        sqs[usize::from(q.id)] = Some(Arc::new(sq));
    }
    let mut cqs = vec![None; QUEUES];
    for q in saved.cqs {
        let overflow: VecDeque<Done> = q
            .overflow
            .iter()
            .map(|&(dw0, sqid, sq_head, cid, sct, sc, dnr)| Done {
                dw0,
                sqid,
                sq_head,
                cid,
                status: Status { sct, sc, dnr },
            })
            .collect();
        let cq = Cq::new(&a.guest, q.id, q.size, q.iv, q.ien, q.base);
        cq.db_head.store(q.head, Ordering::Release);
        cq.posted_tail.store(q.tail, Ordering::Release);
        cq.backlog.store(
            u32::try_from(overflow.len()).unwrap_or(u32::MAX),
            Ordering::Release,
        );
        *cq.st.lock().unwrap_or_else(|e| e.into_inner()) = CqState {
            tail: q.tail,
            phase: q.phase,
            head: q.head,
            overflow,
        };
        cqs[usize::from(q.id)] = Some(Arc::new(cq));
    }
    // Pins of whatever the destination held before go back.
    for q in c
        .sqs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flatten()
    {
        q.ring.unpin(&a.guest);
    }
    for q in c
        .cqs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flatten()
    {
        q.ring.unpin(&a.guest);
    }
    if let Some(d) = &*c.dbbuf.read().unwrap_or_else(|e| e.into_inner()) {
        d.shadow.unpin(&a.guest);
        d.eventidx.unpin(&a.guest);
    }
    *c.sqs.write().unwrap_or_else(|e| e.into_inner()) = sqs;
    *c.cqs.write().unwrap_or_else(|e| e.into_inner()) = cqs;
    *c.dbbuf.write().unwrap_or_else(|e| e.into_inner()) = saved.dbbuf.map(|(s, e)| DbBuf {
        shadow: Region::new(&a.guest, s, regs::PAGE),
        eventidx: Region::new(&a.guest, e, regs::PAGE),
    });
    let (cc, csts, aqa, asq, acq, intms) = saved.regs;
    *c.regs.lock().unwrap_or_else(|e| e.into_inner()) = Regs {
        cc,
        csts,
        aqa,
        asq,
        acq,
        intms,
    };
    let (
        coalescing,
        coalescing_disabled,
        async_event_config,
        volatile_write_cache,
        queues_granted,
        io_queues_created,
    ) = saved.features;
    *c.features.lock().unwrap_or_else(|e| e.into_inner()) = Features {
        coalescing,
        coalescing_disabled,
        async_event_config,
        volatile_write_cache,
        queues_granted,
        io_queues_created,
    };
    *c.aers.lock().unwrap_or_else(|e| e.into_inner()) =
        (saved.aers.0, saved.aers.1.into_iter().collect());
    *c.identity.lock().unwrap_or_else(|e| e.into_inner()) = saved.identity;
    tracing::info!("mnvme: state loaded");
    Ok(())
}
