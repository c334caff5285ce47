//! Group commit: one thread owns all writes to the store.
//!
//! Requests from async callers wait in a bounded queue; the writer thread
//! takes everything queued (up to [`MAX_GROUP`] requests) and applies it as
//! one group, so concurrent writers share one fsync. Each caller is answered
//! only after its group is durable.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Applied, Mutation, Store, WriteError};

/// Most requests applied in one group.
pub const MAX_GROUP: usize = 256;

/// Why a request got no answer from the store.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The writer thread has stopped (node shutting down).
    #[error("the store is shutting down")]
    Closed,
    /// The store failed as a whole for this group.
    #[error("storage failure: {0}")]
    Store(String),
}

type Reply = oneshot::Sender<Result<Vec<Result<Applied, WriteError>>, WriterError>>;

struct Request {
    mutations: Vec<Mutation>,
    reply: Reply,
}

/// A cloneable handle to the writer thread.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

impl Writer {
    /// Starts the writer thread with a queue of `queue` pending requests.
    /// The thread ends when every handle is dropped.
    pub fn spawn(store: Arc<Store>, queue: usize) -> std::io::Result<(Writer, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let handle = std::thread::Builder::new()
            .name("tiersync-writer".into())
            .spawn(move || run(store, rx))?;
        Ok((Writer { tx }, handle))
    }

    /// Whether the writer thread has stopped taking requests.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Applies `mutations` (in order) and waits until they are durable.
    pub async fn apply(
        &self,
        mutations: Vec<Mutation>,
    ) -> Result<Vec<Result<Applied, WriteError>>, WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { mutations, reply })
            .await
            .map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)?
    }

    /// Applies one mutation and waits until it is durable.
    pub async fn apply_one(&self, mutation: Mutation) -> Result<Applied, WriteError> {
        match self.apply(vec![mutation]).await {
            // The writer answers every request with one result per mutation.
            Ok(mut results) => results.pop().unwrap_or(Err(WriteError::Unavailable(
                "the writer returned no result".into(),
            ))),
            Err(e) => Err(WriteError::Unavailable(e.to_string())),
        }
    }
}

fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let counts: Vec<usize> = group.iter().map(|r| r.mutations.len()).collect();
        let mut replies = Vec::with_capacity(group.len());
        let mut all = Vec::with_capacity(counts.iter().sum());
        for r in group {
            all.extend(r.mutations);
            replies.push(r.reply);
        }
        match store.apply(all, crate::now_ms()) {
            Ok(results) => {
                let mut results = results.into_iter();
                for (reply, n) in replies.into_iter().zip(counts) {
                    let _ = reply.send(Ok(results.by_ref().take(n).collect()));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "store failed for a write group");
                for reply in replies {
                    let _ = reply.send(Err(WriterError::Store(msg.clone())));
                }
            }
        }
    }
}
