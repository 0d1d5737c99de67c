//! An inventory read again as what it lists changes — only the sources that changed, one read
//! at a time, on a thread of its own: reading a large node's ruleset, saves and programs takes
//! long enough that whoever must stay responsive (trace, draining its ring buffer) cannot wait
//! for it. The caller says what changed and takes each fresh inventory when it is back.
use anyhow::Result;
use serde_json::Value;
use tokio::sync::oneshot;

use super::{Inventory, Namespaces, Sources};
use crate::registry::Registry;

/// The calling thread's namespace's inventory, kept fresh in the background.
pub(crate) struct Refresher {
    registry: Registry,
    sources: Sources,
    /// The inventory last read, while no read has it (none after a failed read: the next
    /// one reads it whole).
    last: Option<Inventory>,
    /// The read under way.
    reading: Option<oneshot::Receiver<Result<Inventory>>>,
    /// What changed since that read began, read when it is back, with the ruleset listed
    /// last.
    changed: Sources,
    ruleset: Option<Vec<Value>>,
}

impl Refresher {
    /// Reads `sources` of the calling thread's namespace now (the caller waits for this
    /// first read); the inventory and what keeps it fresh.
    pub(crate) fn start(registry: &Registry, sources: Sources) -> Result<(Refresher, Inventory)> {
        let inv = Inventory::read(registry, &Namespaces::Current, sources)?;
        let refresher = Refresher {
            registry: registry.clone(),
            sources,
            last: Some(inv.clone()),
            reading: None,
            changed: Sources::NONE,
            ruleset: None,
        };
        Ok((refresher, inv))
    }

    /// Reads `changed` again (now, or when the read under way is back; nothing when empty).
    /// `ruleset`: the nft ruleset just listed, when the caller has it. Threads take their
    /// namespace from the one that starts them: call this from the one that read first.
    pub(crate) fn read(&mut self, changed: Sources, ruleset: Option<Vec<Value>>) {
        self.changed = self.changed.and(changed);
        if ruleset.is_some() {
            self.ruleset = ruleset;
        }
        if self.reading.is_some() || self.changed.is_empty() {
            return;
        }
        let changed = std::mem::replace(&mut self.changed, Sources::NONE);
        let ruleset = self.ruleset.take();
        let (last, registry, sources) = (self.last.take(), self.registry.clone(), self.sources);
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let read = match last {
                Some(mut inv) => inv
                    .refresh(&registry, changed, ruleset.as_deref())
                    .map(|()| inv),
                None => Inventory::read(&registry, &Namespaces::Current, sources),
            };
            // The caller may have stopped without waiting.
            let _ = tx.send(read);
        });
        self.reading = Some(rx);
    }

    pub(crate) fn reading(&self) -> bool {
        self.reading.is_some()
    }

    /// The read under way, once it is back (never, when none is: for `select!`). Taking it
    /// is `arrived`'s.
    pub(crate) async fn next(&mut self) -> Result<Inventory> {
        match self.reading.as_mut() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("its reader stopped"))),
            None => std::future::pending().await,
        }
    }

    /// Takes a read `next` returned: the inventory, or none when the read failed (the next
    /// read reads it whole). What changed meanwhile is not read until `read` is called again.
    pub(crate) fn arrived(&mut self, read: Result<Inventory>) -> Result<Inventory> {
        self.reading = None;
        let inv = read?;
        self.last = Some(inv.clone());
        Ok(inv)
    }

    /// Gives up the read under way (the caller stops).
    pub(crate) fn abandon(&mut self) {
        self.reading = None;
    }
}
