//! The open storage engine: fjall's database in `engine.data_dir/store` and its keyspaces, one
//! per kind of record. Writes name a keyspace by [`Space`] rather than by handle, so a write
//! that failed can be applied again to the database reopened after the failure (see
//! `commit.rs`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard};

use super::StoreError;

/// All journals together (fjall's default: 512 MiB; its minimum: 64 MiB). Journal files are
/// sparse until written, so a smaller disk still opens.
const JOURNALS: u64 = 64 * 1024 * 1024;

/// The message keyspace's memtable (fjall's default: 64 MiB).
const MESSAGES_MEMTABLE: u64 = 16 * 1024 * 1024;

/// A keyspace of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    Exchanges,
    Queues,
    /// Keyed by queue first.
    Bindings,
    /// By routing key.
    Retained,
    /// Message id → record, each body once.
    Messages,
    /// Queue + id → flags: one entry per queue holding the message.
    Queued,
    /// When space was last reclaimed: a write whose flush runs the storage engine's clean-up
    /// of tables that compaction replaced (it only runs when a memtable is flushed).
    Maintenance,
}

impl Space {
    pub const ALL: [Space; 7] = [
        Space::Exchanges,
        Space::Queues,
        Space::Bindings,
        Space::Retained,
        Space::Messages,
        Space::Queued,
        Space::Maintenance,
    ];

    fn name(self) -> &'static str {
        match self {
            Space::Exchanges => "exchanges",
            Space::Queues => "queues",
            Space::Bindings => "bindings",
            Space::Retained => "retained",
            Space::Messages => "messages",
            Space::Queued => "queued",
            Space::Maintenance => "maintenance",
        }
    }
}

pub fn db_error(e: fjall::Error) -> StoreError {
    StoreError(format!("storage engine: {e}"))
}

pub struct Tables {
    pub db: Database,
    spaces: Vec<Keyspace>,
}

impl Tables {
    /// Opens (creating when empty) the database in `path`. Fails with fjall's `Locked` while
    /// an earlier handle on it is still closing.
    pub fn open(path: &Path) -> Result<Tables, StoreError> {
        // The smallest journal budget fjall allows: past it, fjall flushes whichever keyspace
        // holds the oldest journal back, so removed messages do not pin hundreds of MiB.
        let db = Database::builder(path)
            .max_journaling_size(JOURNALS)
            .open()
            .map_err(db_error)?;
        let spaces = Space::ALL
            .iter()
            .map(|&space| {
                db.keyspace(space.name(), || match space {
                    // Written bodies wait in the memtable until it is flushed: a smaller one
                    // keeps that memory (which the watermark does not see) small when queues
                    // grow past memory.
                    Space::Messages => {
                        KeyspaceCreateOptions::default().max_memtable_size(MESSAGES_MEMTABLE)
                    }
                    _ => KeyspaceCreateOptions::default(),
                })
                .map_err(db_error)
            })
            .collect::<Result<_, _>>()?;
        Ok(Tables { db, spaces })
    }

    pub fn get(&self, space: Space) -> &Keyspace {
        &self.spaces[space as usize]
    }
}

/// The tables in use. Only reopening and closing them take the lock for writing: a read during
/// a reopening waits for it (a few milliseconds) rather than failing.
pub struct Current {
    tables: RwLock<Option<Tables>>,
    /// Closed for good: the gateway is stopping.
    closed: AtomicBool,
}

impl Current {
    pub fn new(tables: Tables) -> Arc<Current> {
        Arc::new(Current {
            tables: RwLock::new(Some(tables)),
            closed: AtomicBool::new(false),
        })
    }

    /// The tables, or why there are none (a reopening failed, and the writer tries again; or
    /// the store is closed).
    pub fn read(&self) -> Result<MappedRwLockReadGuard<'_, Tables>, StoreError> {
        RwLockReadGuard::try_map(self.tables.read(), Option::as_ref).map_err(|_| {
            StoreError(if self.closed.load(Ordering::Acquire) {
                "the store is closed: the gateway is stopping".into()
            } else {
                "the store is closed after a write failure; it is reopened once the disk has room"
                    .into()
            })
        })
    }

    /// Closes the database for good, once a read under way ends: its files and fjall's lock
    /// are let go of.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        *self.tables.write() = None;
    }

    /// Closes the database and opens it again from its files: what was written before a failure
    /// is read back from the journal, a torn last write is cut.
    pub fn reopen(&self, path: &Path) -> Result<(), StoreError> {
        let mut tables = self.tables.write();
        // Dropping the last handle stops fjall's workers and releases its lock on `path`.
        *tables = None;
        *tables = Some(Tables::open(path)?);
        Ok(())
    }
}
