//! The spool's file: SQLite in WAL mode (rusqlite, bundled), owned by one thread.
//!
//! Why SQLite rather than a log of our own: the measurement in docs/benchmarks.md ("The
//! spool's store") found the disk's fsync deciding everything durable, and SQLite within a
//! few per cent of a hand-written log once appends share an fsync; what it brings for free is
//! the part peers got wrong — a torn write never becomes a record (a WAL frame counts only
//! when its checksum chain and its transaction's commit frame are intact) — and an operator
//! can open the file with `sqlite3` to see what waits.
//!
//! One thread owns the connection, and everything goes through its queue: appends, reads
//! and deletes never contend for a lock, and whatever queued while the disk was busy is one
//! transaction (group commit). What `fsync` means here:
//! - `always`: `synchronous = FULL`; a commit returns after the WAL is fsynced, and only
//!   then are its messages acked.
//! - `batch`: `synchronous = NORMAL`; a commit is written to the WAL (it survives the
//!   process dying: it is in the kernel) and acked at once; at most `batch_window` later a
//!   passive checkpoint fsyncs the WAL (SQLite syncs the WAL before each checkpoint in this
//!   mode) and moves it into the database file. So at most `batch_window` of acked messages
//!   is at risk on power loss.
//!
//! # Damage found at open
//! Before SQLite sees the files, [`check_wal`] walks the WAL as SQLite's recovery will
//! (header checksum, then each frame's salts and cumulative checksum): bytes after the last
//! intact committed frame — a frame cut short (a torn write), a frame of the current log
//! whose checksum fails (garbled), or frames of a transaction that never committed — are
//! reported with a warning and cut off (SQLite would ignore them anyway; cutting makes
//! that visible and final). Then `PRAGMA quick_check` reads every page of the database;
//! if it finds damage (a garbled page), the readable records are copied, in order, into a
//! fresh file that replaces the damaged one (kept as `<path>.damaged-<unix s>`, with its
//! WAL, moved aside before the fresh file is moved in, so a crash in between loses nothing:
//! the next open finishes the move), and the warning says how many could not be read.
//! A file that is not a database at all is moved aside (`<path>.corrupt-<unix s>`) and the
//! spool starts empty, with an error in the log. Never a crash loop: no damage stops the start.
//! A record whose columns cannot be decoded (a topic that is not UTF-8, a column whose type
//! changed: damage inside a record, which `quick_check` does not see) is moved to the kept
//! dead letters (`internal_error`, its topic as lossy text, its payload base64) with a
//! warning, at open or when the drain reads it; one record never fails the open or a batch.
//!
//! Only SQLite saying "not a database" or "corrupt" (`SQLITE_NOTADB`, `SQLITE_CORRUPT`) is
//! damage. Any other error at open — the file locked by another process, a full disk, an
//! I/O error, a permission — fails the start naming `spool.path` and leaves the file as it
//! is: systemd restarts the daemon, and nothing acked is thrown away. Two processes never
//! share one spool: the store holds an exclusive advisory lock (`flock`) on `<path>.lock`
//! while open, so a second bridge on the same path fails to start instead of repairing the
//! first one's files under it.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::{oneshot, Notify};

use super::config::{Fsync, OnFull, SpoolConfig};
use crate::events;
use crate::outcome::Reason;

/// Accounting overhead of one record on top of its topic and payload (its id, QoS, time and
/// SQLite's cell header, roughly): what `max_size` and `spool_bytes` count.
pub const RECORD_OVERHEAD: u64 = 32;

/// What a kept dead letter counts for in [`Ledger::letter_bytes`].
pub fn letter_size(reason: &str, record: &str) -> u64 {
    (reason.len() + record.len()) as u64 + RECORD_OVERHEAD
}

/// At most this many commands are folded into one transaction.
const MAX_GROUP: usize = 4096;

/// One spooled message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    /// When the bridge received it (unix ms).
    pub received_ms: i64,
    /// MQTT 5 properties, as `message::Properties::encode` writes them (`None`: none).
    pub props: Option<Vec<u8>>,
}

impl Record {
    /// What it counts for in `max_size` and `spool_bytes`.
    pub fn size(&self) -> u64 {
        size_of(
            self.topic.len(),
            self.payload.len() + self.props.as_ref().map_or(0, Vec::len),
        )
    }
}

fn size_of(topic: usize, payload: usize) -> u64 {
    topic as u64 + payload as u64 + RECORD_OVERHEAD
}

/// A record read back, with its place in the spool (ids grow with arrival).
#[derive(Debug)]
pub struct Stored {
    pub id: i64,
    pub record: Record,
}

/// A dead-letter record kept until Redis can take it: a message dropped by `on_full =
/// "drop_oldest"`, or the record of a message refused while Redis was down.
#[derive(Debug, Clone)]
pub struct Letter {
    pub id: i64,
    /// The dead-letter reason (`spool_full`, `invalid_json`, …).
    pub reason: String,
    /// The record, as it goes to the dead-letter list.
    pub record: String,
}

/// What the spool holds, shared by the store thread (which removes) and the front (which
/// adds, before queuing the append): per-topic counts tell a new message whether its topic
/// has older messages spooled, which it must then follow (spec §6.2, order per topic).
#[derive(Debug, Default)]
pub struct Ledger {
    pub topics: HashMap<String, u64>,
    pub messages: u64,
    pub bytes: u64,
    /// Dead-letter records waiting for Redis (see [`Letter`]).
    pub letters: u64,
    /// What they hold (see [`letter_size`]): at most `max_size` (on top of the records'
    /// `max_size`), the oldest discarded past it.
    pub letter_bytes: u64,
    /// The highest id handed to the replay: `drop_oldest` never drops a record being
    /// replayed (its topic's order would break).
    pub replay_cursor: i64,
}

impl Ledger {
    pub fn add(&mut self, topic: &str, size: u64) {
        match self.topics.get_mut(topic) {
            Some(n) => *n += 1,
            None => {
                self.topics.insert(topic.to_string(), 1);
            }
        }
        self.messages += 1;
        self.bytes += size;
    }

    fn remove(&mut self, topic: &str, size: u64) {
        if let Some(n) = self.topics.get_mut(topic) {
            *n -= 1;
            if *n == 0 {
                self.topics.remove(topic);
            }
        }
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(size);
    }

    /// Whether `topic` has messages spooled (or queued to be).
    pub fn holds(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }
}

pub type SharedLedger = Arc<Mutex<Ledger>>;

/// Takes back a record the ledger counted but the store could not append.
pub fn forget(ledger: &SharedLedger, topic: &str, size: u64) {
    lock(ledger).remove(topic, size);
}

pub fn lock(ledger: &SharedLedger) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Command {
    Append(Record, Reply<()>),
    Read(i64, usize, Reply<Vec<Stored>>),
    Delete(Vec<i64>, Reply<()>),
    AppendLetter(String, String, Reply<()>),
    TakeLetters(usize, Reply<Vec<Letter>>),
    ForgetLetters(Vec<i64>, Reply<()>),
    /// Fold the WAL into the database and close the file (a clean stop).
    Close(oneshot::Sender<()>),
}

/// The handle to the store thread. Dropping every handle ends the thread (after a last
/// checkpoint, so a clean stop leaves the WAL folded into the database).
#[derive(Clone)]
pub struct Store {
    tx: std_mpsc::Sender<Command>,
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("spool.path {path}: {error}")]
    Open { path: String, error: String },
    #[error("the spool's thread is gone")]
    Gone,
}

impl Store {
    /// Opens (creating, repairing) the file and starts its thread. `space` is notified
    /// whenever records leave the spool.
    pub fn open(
        config: &SpoolConfig,
        ledger: SharedLedger,
        space: Arc<Notify>,
    ) -> Result<Store, StoreError> {
        let lock_file = exclusive(&config.path).map_err(|error| StoreError::Open {
            path: config.path.display().to_string(),
            error,
        })?;
        let conn = open_checked(&config.path, config.fsync).map_err(|error| StoreError::Open {
            path: config.path.display().to_string(),
            error,
        })?;
        // After the checks: a damaged older file is salvaged (into the new schema) first.
        autoincrement(&conn)
            .and_then(|()| load_ledger(&conn, &mut lock(&ledger)))
            .map_err(|e| StoreError::Open {
                path: config.path.display().to_string(),
                error: e.to_string(),
            })?;
        let (tx, rx) = std_mpsc::channel();
        let worker = Worker {
            conn,
            _lock: lock_file,
            rx,
            ledger,
            space,
            fsync: config.fsync,
            batch_window: config.batch_window,
            on_full: config.on_full,
            max_size: config.max_size,
            letter_budget: config.max_size,
            sync_due: None,
        };
        std::thread::Builder::new()
            .name("spool-store".into())
            .spawn(move || worker.run())
            .map_err(|e| StoreError::Open {
                path: config.path.display().to_string(),
                error: format!("cannot start the spool's thread: {e}"),
            })?;
        Ok(Store { tx })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| StoreError::Gone.to_string())?;
        answer.await.map_err(|_| StoreError::Gone.to_string())?
    }

    /// Appends `record`; returns once it is committed as `fsync` says.
    pub async fn append(&self, record: Record) -> Result<(), String> {
        self.ask(|reply| Command::Append(record, reply)).await
    }

    /// Up to `limit` records after `after`, oldest first.
    pub async fn read(&self, after: i64, limit: usize) -> Result<Vec<Stored>, String> {
        self.ask(|reply| Command::Read(after, limit, reply)).await
    }

    /// Deletes the records `ids` (replayed).
    pub async fn delete(&self, ids: Vec<i64>) -> Result<(), String> {
        self.ask(|reply| Command::Delete(ids, reply)).await
    }

    /// Keeps a dead-letter `record` (with its `reason`) until Redis can take it.
    pub async fn append_letter(&self, reason: &str, record: String) -> Result<(), String> {
        let reason = reason.to_string();
        self.ask(|reply| Command::AppendLetter(reason, record, reply))
            .await
    }

    pub async fn take_letters(&self, limit: usize) -> Result<Vec<Letter>, String> {
        self.ask(|reply| Command::TakeLetters(limit, reply)).await
    }

    pub async fn forget_letters(&self, ids: Vec<i64>) -> Result<(), String> {
        self.ask(|reply| Command::ForgetLetters(ids, reply)).await
    }

    /// Closes the file after a last checkpoint; later commands fail. What is committed is
    /// in the database file then, and the WAL is gone.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.tx.send(Command::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

const SCHEMA: &str = "
-- AUTOINCREMENT: ids only grow, also once the table was emptied (a drain's cursor and
-- `Ledger::replay_cursor` rely on it)
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    -- MQTT 5 properties, serialized (NULL under MQTT 3.1.1)
    props BLOB
);
-- dead-letter records waiting for Redis (drop_oldest drops, messages refused meanwhile)
CREATE TABLE IF NOT EXISTS letters (
    id INTEGER PRIMARY KEY,
    reason TEXT NOT NULL,
    record TEXT NOT NULL
);
";

fn connect(path: &Path, fsync: Fsync) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match fsync {
            Fsync::Always => "FULL",
            Fsync::Batch => "NORMAL",
        },
    )?;
    // Deleted pages are reused by later appends; the file keeps its high-water mark.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// A file written before ids were AUTOINCREMENT gets its `messages` table rebuilt with it
/// (same columns, same ids), so that ids never restart from 1 once the table is empty.
fn autoincrement(conn: &Connection) -> rusqlite::Result<()> {
    let sql: String = conn.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
        [],
        |r| r.get(0),
    )?;
    if sql.contains("AUTOINCREMENT") {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE messages RENAME TO messages_old;
         CREATE TABLE messages (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             topic TEXT NOT NULL,
             payload BLOB NOT NULL,
             qos INTEGER NOT NULL,
             received_ms INTEGER NOT NULL,
             props BLOB
         );
         INSERT INTO messages (id, topic, payload, qos, received_ms, props)
             SELECT id, topic, payload, qos, received_ms, props FROM messages_old;
         DROP TABLE messages_old;
         COMMIT;",
    )
}

/// Takes an exclusive advisory lock (`flock`) on `<path>.lock`, held as long as the store is
/// open: two processes never share one spool (a second bridge on the same `spool.path` fails
/// to start, naming it, instead of cutting the other's WAL or moving its file aside).
fn exclusive(path: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the directory {}: {e}", dir.display()))?;
    }
    let lock_path = sidecar(path, ".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open the lock file {}: {e}", lock_path.display()))?;
    // SAFETY: flock(2) on a descriptor owned by `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!(
                "the spool is in use by another process (another routemq-bridge with the \
                 same spool.path? it holds {})",
                lock_path.display()
            )
        } else {
            format!("cannot lock {}: {e}", lock_path.display())
        });
    }
    Ok(file)
}

/// SQLite found the file is not a database, or a damaged one: the only errors that make the
/// open set the file aside or salvage it. Any other (a lock held by another process, a full
/// disk, an I/O error, a permission) fails the start and leaves the file as it is.
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// Opens `path` after checking its WAL and pages, repairing what can be (see the module doc).
fn open_checked(path: &Path, fsync: Fsync) -> Result<Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the directory {}: {e}", dir.display()))?;
    }
    let salvaged = sidecar(path, ".salvage");
    if !path.exists() && salvaged.exists() {
        // A salvage interrupted after the damaged file went aside: its fresh file is complete.
        std::fs::rename(&salvaged, path).map_err(|e| {
            format!(
                "cannot put the salvaged file {} in place: {e}",
                salvaged.display()
            )
        })?;
        events::spool_damage(path, "a salvage interrupted by a crash was completed");
    }
    let wal = sidecar(path, "-wal");
    match check_wal(&wal) {
        Ok(None) => {}
        Ok(Some(damage)) => {
            events::spool_damage(path, &damage.describe());
            let cut = OpenOptions::new()
                .write(true)
                .open(&wal)
                .and_then(|f| f.set_len(damage.valid_len).and_then(|()| f.sync_all()));
            if let Err(e) = cut {
                return Err(format!("cannot cut the WAL {}: {e}", wal.display()));
            }
            // The wal-index describes the old WAL; SQLite rebuilds it from the WAL.
            let _ = std::fs::remove_file(sidecar(path, "-shm"));
        }
        Err(e) => return Err(format!("cannot read the WAL {}: {e}", wal.display())),
    }
    let conn = match connect(path, fsync) {
        Ok(conn) => conn,
        Err(e) if is_damage(&e) => return set_aside(path, fsync, &e.to_string()),
        Err(e) => return Err(e.to_string()),
    };
    match quick_check(&conn) {
        Ok(None) => Ok(conn),
        Ok(Some(problem)) => {
            drop(conn);
            salvage(path, fsync, &problem)
        }
        Err(e) if is_damage(&e) => {
            drop(conn);
            salvage(path, fsync, &e.to_string())
        }
        Err(e) => Err(format!("PRAGMA quick_check failed: {e}")),
    }
}

/// `PRAGMA quick_check`: `Some` with what it found when the file is damaged; `Err` when it
/// could not run (see [`is_damage`] for what that means).
fn quick_check(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let mut stmt = conn.prepare("PRAGMA quick_check(20)")?;
    let rows: Vec<String> = stmt
        .query_map([], |row| row.get_ref(0).map(lossy_text))?
        .collect::<Result<_, _>>()?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(None)
    } else {
        Ok(Some(rows.join("; ")))
    }
}

/// Copies the readable records of a damaged `path` into a fresh file that replaces it.
fn salvage(path: &Path, fsync: Fsync, problem: &str) -> Result<Connection, String> {
    let fresh = sidecar(path, ".salvage");
    for leftover in [
        fresh.clone(),
        sidecar(&fresh, "-wal"),
        sidecar(&fresh, "-shm"),
    ] {
        let _ = std::fs::remove_file(leftover);
    }
    let (kept, lost_ranges) = {
        let old = match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE) {
            Ok(old) => old,
            Err(e) if is_damage(&e) => return set_aside(path, fsync, &format!("{problem}; {e}")),
            Err(e) => return Err(format!("{problem}; cannot open it to salvage it: {e}")),
        };
        let mut new = connect(&fresh, Fsync::Always).map_err(|e| e.to_string())?;
        let tx = new.transaction().map_err(|e| e.to_string())?;
        let (kept, lost) = copy_readable(&old, &tx);
        tx.commit().map_err(|e| e.to_string())?;
        // The fresh file complete on disk on its own (its WAL folded in and synced, then
        // removed by the close) before anything is moved.
        new.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| e.to_string())?;
        new.close().map_err(|(_, e)| e.to_string())?;
        (kept, lost)
    };
    // The damaged file and its WAL go aside first, then the fresh file takes its place: a
    // crash in between leaves `<path>` missing and `<path>.salvage` complete, which the next
    // open puts in place (see `open_checked`); no moment loses the records copied.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = sidecar(path, &format!(".damaged-{stamp}"));
    std::fs::rename(path, &aside)
        .map_err(|e| format!("cannot move the damaged file aside: {e}"))?;
    let _ = std::fs::rename(sidecar(path, "-wal"), sidecar(&aside, "-wal"));
    let _ = std::fs::remove_file(sidecar(path, "-shm"));
    std::fs::rename(&fresh, path).map_err(|e| format!("cannot replace the damaged file: {e}"))?;
    sync_dir(path);
    events::spool_damage(
        path,
        &format!(
            "the database file is damaged ({problem}; the damaged file is kept as {}); {kept} \
             records were readable and are kept, in order; unreadable: {}",
            aside.display(),
            if lost_ranges.is_empty() {
                "none".to_string()
            } else {
                lost_ranges.join(", ")
            }
        ),
    );
    connect(path, fsync).map_err(|e| e.to_string())
}

/// Copies every record of `old` that can be read into `new`, stepping over damaged pages:
/// after a read error the next readable id is searched for by growing jumps. Returns how many
/// were kept and the id ranges that could not be read.
fn copy_readable(old: &Connection, new: &Connection) -> (u64, Vec<String>) {
    let mut kept = 0u64;
    let mut lost = Vec::new();
    let mut after = i64::MIN;
    'outer: loop {
        match copy_from(old, new, after, &mut kept) {
            Ok(None) => break,
            Ok(Some(last)) => after = last,
            Err(last) => {
                // `last` is the last id copied: find the next readable one.
                let mut jump = 1i64;
                while jump < (1 << 40) {
                    let probe = last.saturating_add(jump);
                    let next: rusqlite::Result<Option<i64>> = old
                        .query_row(
                            "SELECT id FROM messages WHERE id > ?1 ORDER BY id LIMIT 1",
                            [probe],
                            |r| r.get(0),
                        )
                        .map(Some)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(None),
                            e => Err(e),
                        });
                    match next {
                        Ok(Some(id)) => {
                            lost.push(format!("ids {}..{}", last.saturating_add(1), id - 1));
                            after = id - 1;
                            continue 'outer;
                        }
                        Ok(None) => {
                            lost.push(format!("ids after {last}"));
                            break 'outer;
                        }
                        Err(_) => jump = jump.saturating_mul(2),
                    }
                }
                lost.push(format!("ids after {last}"));
                break;
            }
        }
    }
    // The waiting dead-letter records: keep what reads.
    if let Ok(mut stmt) = old.prepare("SELECT id, reason, record FROM letters") {
        if let Ok(rows) = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        }) {
            for (id, reason, record) in rows.flatten() {
                let _ = new.execute(
                    "INSERT INTO letters (id, reason, record) VALUES (?1, ?2, ?3)",
                    params![id, reason, record],
                );
            }
        }
    }
    (kept, lost)
}

/// Copies the records after `after` until the end (`Ok(None)`) or a read error
/// (`Err(last id copied)`).
fn copy_from(
    old: &Connection,
    new: &Connection,
    after: i64,
    kept: &mut u64,
) -> Result<Option<i64>, i64> {
    let mut last = after;
    let mut stmt = old
        .prepare(
            "SELECT id, topic, payload, qos, received_ms, props FROM messages WHERE id > ?1 ORDER BY id",
        )
        .map_err(|_| last)?;
    let mut rows = stmt.query([after]).map_err(|_| last)?;
    loop {
        match rows.next() {
            Ok(Some(row)) => {
                let read = (|| {
                    Ok::<_, rusqlite::Error>((
                        row.get::<_, i64>(0)?,
                        match row.get_ref(1)? {
                            ValueRef::Text(b) => match std::str::from_utf8(b) {
                                Ok(t) => rusqlite::types::Value::Text(t.to_string()),
                                // Kept as it is: the open moves it to the dead letters.
                                Err(_) => rusqlite::types::Value::Blob(b.to_vec()),
                            },
                            other => rusqlite::types::Value::Blob(
                                other.as_bytes().map(<[u8]>::to_vec).unwrap_or_default(),
                            ),
                        },
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                        row.get::<_, Option<Vec<u8>>>(5)?,
                    ))
                })();
                let Ok((id, topic, payload, qos, received, props)) = read else {
                    return Err(last);
                };
                let _ = new.execute(
                    "INSERT INTO messages (id, topic, payload, qos, received_ms, props) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![id, topic, payload, qos, received, props],
                );
                *kept += 1;
                last = id;
            }
            Ok(None) => return Ok(None),
            Err(_) => return Err(last),
        }
    }
}

/// A file SQLite cannot open as a database at all: moved aside, and the spool starts empty.
fn set_aside(path: &Path, fsync: Fsync, problem: &str) -> Result<Connection, String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = sidecar(path, &format!(".corrupt-{stamp}"));
    std::fs::rename(path, &aside)
        .map_err(|e| format!("{problem}; and it cannot be moved aside: {e}"))?;
    for side in ["-wal", "-shm"] {
        let _ = std::fs::rename(sidecar(path, side), sidecar(&aside, side));
    }
    events::spool_set_aside(path, &aside, problem);
    connect(path, fsync).map_err(|e| e.to_string())
}

/// Makes the renames in `path`'s directory durable (best effort: a failure only widens the
/// window a power loss could reorder them in).
fn sync_dir(path: &Path) {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn load_ledger(conn: &Connection, ledger: &mut Ledger) -> rusqlite::Result<()> {
    // Records that cannot be decoded first leave for the dead letters: they must not stop
    // the start (a crash loop), nor be counted as waiting.
    let bad = undecodable(conn)?;
    if !bad.is_empty() {
        let tx = conn.unchecked_transaction()?;
        quarantine(&tx, &bad)?;
        tx.commit()?;
    }
    let mut stmt = conn.prepare(
        "SELECT topic, COUNT(*), SUM(length(CAST(topic AS BLOB)) + length(payload) + IFNULL(length(props), 0)) FROM messages GROUP BY topic",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let topic = lossy_text(row.get_ref(0)?);
        let (count, bytes) = (row.get::<_, i64>(1)?, row.get::<_, i64>(2)?);
        let count = count.max(0) as u64;
        ledger.messages += count;
        ledger.bytes += bytes.max(0) as u64 + count * RECORD_OVERHEAD;
        ledger.topics.insert(topic, count);
    }
    let (letters, letter_bytes) = conn.query_row(
        "SELECT COUNT(*), IFNULL(SUM(length(CAST(reason AS BLOB)) + length(CAST(record AS BLOB))), 0) \
         FROM letters",
        [],
        |r| Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, i64>(1)?.max(0) as u64)),
    )?;
    ledger.letters = letters;
    ledger.letter_bytes = letter_bytes + letters * RECORD_OVERHEAD;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The WAL walk.

/// What [`check_wal`] found after the last intact committed frame.
#[derive(Debug, PartialEq, Eq)]
pub struct WalDamage {
    /// Where the intact log ends (bytes); the rest is cut.
    pub valid_len: u64,
    pub file_len: u64,
    /// Frames of the current log cut short, garbled, or of a transaction never committed.
    pub kind: &'static str,
}

impl WalDamage {
    fn describe(&self) -> String {
        format!(
            "the WAL ends in {} at byte {} ({} bytes after it are cut off; what they held was \
             never acknowledged as durable{})",
            self.kind,
            self.valid_len,
            self.file_len - self.valid_len,
            " under fsync = \"always\"; under \"batch\" it may be the last batch_window of acked messages"
        )
    }
}

const WAL_HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

/// Walks the WAL at `wal` as SQLite's recovery does (see the module doc). `Ok(None)`: no
/// WAL, or nothing after its last committed frame but frames of an older log (normal).
pub fn check_wal(wal: &Path) -> std::io::Result<Option<WalDamage>> {
    let mut bytes = Vec::new();
    match std::fs::File::open(wal) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let file_len = bytes.len() as u64;
    if bytes.is_empty() {
        return Ok(None);
    }
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if bytes.len() < WAL_HEADER {
        return Ok(Some(WalDamage {
            valid_len: 0,
            file_len,
            kind: "a header cut short",
        }));
    }
    let magic = be32(&bytes, 0);
    if magic & !1 != 0x377f_0682 {
        return Ok(Some(WalDamage {
            valid_len: 0,
            file_len,
            kind: "a garbled header",
        }));
    }
    let big_endian = magic & 1 == 1;
    let page_size = be32(&bytes, 8) as usize;
    let (salt1, salt2) = (be32(&bytes, 16), be32(&bytes, 20));
    let mut sum = checksum(big_endian, (0, 0), &bytes[..24]);
    if sum != (be32(&bytes, 24), be32(&bytes, 28)) || !(512..=65536).contains(&page_size) {
        return Ok(Some(WalDamage {
            valid_len: 0,
            file_len,
            kind: "a garbled header",
        }));
    }
    let frame = FRAME_HEADER + page_size;
    let mut at = WAL_HEADER;
    let mut committed_end = WAL_HEADER;
    let mut kind = None;
    while at < bytes.len() {
        if bytes.len() - at < frame {
            kind = Some("a frame cut short (a torn write)");
            break;
        }
        let header = &bytes[at..at + FRAME_HEADER];
        if (be32(header, 8), be32(header, 12)) != (salt1, salt2) {
            // A frame of an older log, left behind when the log restarted: not ours to judge.
            break;
        }
        sum = checksum(big_endian, sum, &header[..8]);
        sum = checksum(big_endian, sum, &bytes[at + FRAME_HEADER..at + frame]);
        if sum != (be32(header, 16), be32(header, 20)) {
            kind = Some("a garbled frame");
            break;
        }
        at += frame;
        if be32(header, 4) != 0 {
            committed_end = at;
        }
    }
    if kind.is_none() && committed_end < at {
        kind = Some("frames of a transaction that never committed");
    }
    Ok(kind.map(|kind| WalDamage {
        valid_len: committed_end as u64,
        file_len,
        kind,
    }))
}

/// SQLite's WAL checksum, continuing from `(s0, s1)` over `data` (a multiple of 8 bytes).
fn checksum(big_endian: bool, (mut s0, mut s1): (u32, u32), data: &[u8]) -> (u32, u32) {
    for pair in data.chunks_exact(8) {
        let word = |b: &[u8]| {
            let b = [b[0], b[1], b[2], b[3]];
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s0 = s0.wrapping_add(word(&pair[..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(word(&pair[4..])).wrapping_add(s0);
    }
    (s0, s1)
}

// ---------------------------------------------------------------------------------------
// The thread.

struct Worker {
    conn: Connection,
    /// The advisory lock on `<path>.lock` (see [`exclusive`]), released with the thread.
    _lock: std::fs::File,
    rx: std_mpsc::Receiver<Command>,
    ledger: SharedLedger,
    space: Arc<Notify>,
    fsync: Fsync,
    batch_window: Duration,
    on_full: OnFull,
    max_size: u64,
    /// What the kept dead letters may hold (`max_size`, on top of the records' `max_size`):
    /// past it the oldest are discarded, with a warning. Bounded apart from the records
    /// rather than counted in `max_size` because a dropped record's letter can be larger
    /// than the record: counted together, `drop_oldest` could not make room by dropping
    /// small records.
    letter_budget: u64,
    /// `batch`: when the WAL must next be synced (something was committed since).
    sync_due: Option<Instant>,
}

impl Worker {
    fn run(mut self) {
        let _lifeline = crate::liveness::Lifeline::new("spool store");
        loop {
            let first = match self.sync_due {
                Some(due) => match self
                    .rx
                    .recv_timeout(due.saturating_duration_since(Instant::now()))
                {
                    Ok(command) => Some(command),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(command) => Some(command),
                    Err(_) => break,
                },
            };
            if let Some(first) = first {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match self.rx.try_recv() {
                        Ok(command) => group.push(command),
                        Err(_) => break,
                    }
                }
                let close = match group.iter().position(|c| matches!(c, Command::Close(_))) {
                    Some(at) => {
                        let rest = group.split_off(at);
                        Some(rest)
                    }
                    None => None,
                };
                self.serve(group);
                if let Some(rest) = close {
                    return self.close(rest);
                }
            }
            if self.sync_due.is_some_and(|due| due <= Instant::now()) {
                self.sync();
            }
        }
        self.sync();
    }

    /// A clean stop: the last checkpoint truncates the WAL, and closing the connection (the
    /// last one) removes it. Commands after the close are dropped (their callers see the
    /// store gone).
    fn close(self, rest: Vec<Command>) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            events::spool_store_error("checkpoint", &e.to_string());
        }
        let Worker { conn, _lock, .. } = self;
        if let Err((_, e)) = conn.close() {
            events::spool_store_error("close", &e.to_string());
        }
        drop(_lock);
        for command in rest {
            if let Command::Close(done) = command {
                let _ = done.send(());
            }
        }
    }

    /// `batch`: makes what was committed durable (a passive checkpoint syncs the WAL first).
    fn sync(&mut self) {
        self.sync_due = None;
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            events::spool_store_error("checkpoint", &e.to_string());
        }
    }

    /// One group of commands: the writes in one transaction, then the answers. The ledger
    /// follows only what was committed.
    fn serve(&mut self, group: Vec<Command>) {
        let mut appends = Vec::new();
        let mut answers: Vec<Answer> = Vec::new();
        let mut reads = Vec::new();
        let mut drops = Drops::default();
        // Letter bytes added and forgotten by this group, and those evicted.
        let (mut lettered, mut unlettered) = (0u64, 0u64);
        let mut evicted = (0u64, 0u64);
        // Every command keeps its reply, also when the transaction fails part-way: its
        // caller learns the error, not that the store is gone.
        let mut pending = group.into_iter();
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            for command in pending.by_ref() {
                match command {
                    Command::Append(record, reply) => {
                        appends.push(reply);
                        if self.on_full == OnFull::DropOldest {
                            drop_oldest(&tx, &self.ledger, self.max_size, &mut drops)?;
                        }
                        tx.prepare_cached(
                            "INSERT INTO messages (topic, payload, qos, received_ms, props) \
                             VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![
                            record.topic,
                            record.payload,
                            record.qos,
                            record.received_ms,
                            record.props
                        ])?;
                    }
                    Command::Delete(ids, reply) => {
                        let mut removed = Vec::with_capacity(ids.len());
                        let deleted = (|| -> rusqlite::Result<()> {
                            let mut stmt = tx.prepare_cached(
                                "DELETE FROM messages WHERE id = ?1 RETURNING topic, \
                                 length(CAST(topic AS BLOB)), length(payload) + IFNULL(length(props), 0)",
                            )?;
                            for id in ids {
                                let mut rows = stmt.query([id])?;
                                if let Some(row) = rows.next()? {
                                    removed.push((
                                        lossy_text(row.get_ref(0)?),
                                        size_of(
                                            row.get::<_, i64>(1)?.max(0) as usize,
                                            row.get::<_, i64>(2)?.max(0) as usize,
                                        ),
                                    ));
                                }
                            }
                            Ok(())
                        })();
                        answers.push(Answer::Deleted(removed, reply));
                        deleted?;
                    }
                    Command::AppendLetter(reason, record, reply) => {
                        answers.push(Answer::Lettered(letter_size(&reason, &record), reply));
                        tx.prepare_cached("INSERT INTO letters (reason, record) VALUES (?1, ?2)")?
                            .execute(params![reason, record])?;
                        lettered += letter_size(&reason, &record);
                    }
                    Command::ForgetLetters(ids, reply) => {
                        let (mut forgotten, mut bytes) = (0u64, 0u64);
                        let deleted = (|| -> rusqlite::Result<()> {
                            let mut stmt = tx.prepare_cached(
                                "DELETE FROM letters WHERE id = ?1 RETURNING \
                                 length(CAST(reason AS BLOB)) + length(CAST(record AS BLOB))",
                            )?;
                            for id in ids {
                                let mut rows = stmt.query([id])?;
                                if let Some(row) = rows.next()? {
                                    forgotten += 1;
                                    bytes += row.get::<_, i64>(0)?.max(0) as u64 + RECORD_OVERHEAD;
                                }
                            }
                            Ok(())
                        })();
                        unlettered += bytes;
                        answers.push(Answer::Forgotten(forgotten, bytes, reply));
                        deleted?;
                    }
                    read @ (Command::Read(..) | Command::TakeLetters(..)) => reads.push(read),
                    Command::Close(_) => {} // split off before the group is served
                }
            }
            // The kept dead letters stay within their budget: the oldest go.
            let held = (lock(&self.ledger).letter_bytes + drops.letter_bytes + lettered)
                .saturating_sub(unlettered);
            if held > self.letter_budget {
                evicted = evict_letters(&tx, held - self.letter_budget)?;
            }
            tx.commit()
        })();
        let result = result.map_err(|e| {
            let e = e.to_string();
            events::spool_store_error("write", &e);
            e
        });
        // What the failure left unserved: the writes share its error, the reads are served.
        for command in pending {
            match command {
                Command::Append(_, reply)
                | Command::Delete(_, reply)
                | Command::AppendLetter(_, _, reply)
                | Command::ForgetLetters(_, reply) => appends.push(reply),
                read @ (Command::Read(..) | Command::TakeLetters(..)) => reads.push(read),
                Command::Close(_) => {}
            }
        }
        let wrote = !appends.is_empty() || !answers.is_empty();
        if result.is_ok() {
            if wrote && self.fsync == Fsync::Batch && self.sync_due.is_none() {
                self.sync_due = Some(Instant::now() + self.batch_window);
            }
            let mut freed = !drops.records.is_empty();
            {
                let mut ledger = lock(&self.ledger);
                for (topic, size) in &drops.records {
                    ledger.remove(topic, *size);
                }
                ledger.letters += drops.records.len() as u64;
                ledger.letter_bytes += drops.letter_bytes;
                ledger.letters = ledger.letters.saturating_sub(evicted.0);
                ledger.letter_bytes = ledger.letter_bytes.saturating_sub(evicted.1);
                for answer in &answers {
                    match answer {
                        Answer::Deleted(removed, _) => {
                            freed |= !removed.is_empty();
                            for (topic, size) in removed {
                                ledger.remove(topic, *size);
                            }
                        }
                        Answer::Forgotten(n, bytes, _) => {
                            ledger.letters = ledger.letters.saturating_sub(*n);
                            ledger.letter_bytes = ledger.letter_bytes.saturating_sub(*bytes);
                        }
                        Answer::Lettered(size, _) => {
                            ledger.letters += 1;
                            ledger.letter_bytes += size;
                        }
                    }
                }
            }
            if !drops.records.is_empty() {
                events::spool_dropped(drops.records.len() as u64);
            }
            if evicted.0 > 0 {
                events::spool_letters_evicted(evicted.0, self.letter_budget);
            }
            if freed {
                self.space.notify_waiters();
            }
        }
        for reply in appends {
            let _ = reply.send(result.clone());
        }
        for answer in answers {
            let reply = match answer {
                Answer::Deleted(_, reply)
                | Answer::Forgotten(_, _, reply)
                | Answer::Lettered(_, reply) => reply,
            };
            let _ = reply.send(result.clone());
        }
        for read in reads {
            self.answer_read(read);
        }
    }

    /// Moves records that cannot be decoded to the kept dead letters (see [`quarantine`]),
    /// so that they never fail a read again.
    fn set_aside_records(&mut self, bad: &[i64]) -> rusqlite::Result<()> {
        if bad.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        let moved = quarantine(&tx, bad)?;
        tx.commit()?;
        {
            let mut ledger = lock(&self.ledger);
            for (topic, size, letter) in &moved {
                ledger.remove(topic, *size);
                ledger.letter_bytes += letter;
            }
            ledger.letters += moved.len() as u64;
        }
        self.space.notify_waiters();
        Ok(())
    }

    fn answer_read(&mut self, read: Command) {
        match read {
            Command::Read(after, limit, reply) => {
                let rows = read_records(&self.conn, after, limit)
                    .and_then(|(rows, bad)| self.set_aside_records(&bad).map(|()| rows))
                    .map_err(|e| e.to_string());
                if let Ok(rows) = &rows {
                    if let Some(last) = rows.last() {
                        let mut ledger = lock(&self.ledger);
                        ledger.replay_cursor = ledger.replay_cursor.max(last.id);
                    }
                }
                let _ = reply.send(rows);
            }
            Command::TakeLetters(limit, reply) => {
                let rows = read_letters(&self.conn, limit).map_err(|e| e.to_string());
                let _ = reply.send(rows);
            }
            _ => {}
        }
    }
}

/// Up to `limit` records after `after`, and the ids of those that cannot be decoded.
fn read_records(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> rusqlite::Result<(Vec<Stored>, Vec<i64>)> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, topic, payload, qos, received_ms, props FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![after, limit as i64])?;
    let mut records = Vec::new();
    let mut bad = Vec::new();
    while let Some(row) = rows.next()? {
        let id = row.get::<_, i64>(0)?;
        match decode(row)? {
            Some(record) => records.push(Stored { id, record }),
            None => bad.push(id),
        }
    }
    Ok((records, bad))
}

/// A record's columns, or `None` when one cannot be what it should (a topic that is not
/// UTF-8, a payload that is neither text nor blob, ...): damage `quick_check` cannot see.
fn decode(row: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Record>> {
    let bytes = |v: ValueRef<'_>| match v {
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(b.to_vec()),
        _ => None,
    };
    let Some(topic) = topic_of(row.get_ref(1)?) else {
        return Ok(None);
    };
    let Some(payload) = bytes(row.get_ref(2)?) else {
        return Ok(None);
    };
    let (ValueRef::Integer(qos), ValueRef::Integer(received_ms)) =
        (row.get_ref(3)?, row.get_ref(4)?)
    else {
        return Ok(None);
    };
    let props = match row.get_ref(5)? {
        ValueRef::Null => None,
        v => match bytes(v) {
            Some(props) => Some(props),
            None => return Ok(None),
        },
    };
    Ok(Some(Record {
        topic,
        payload,
        qos: qos.clamp(0, 2) as u8,
        received_ms,
        props,
    }))
}

/// A stored topic: text (or a blob) that is UTF-8. `None`: it cannot be a topic.
fn topic_of(value: ValueRef<'_>) -> Option<String> {
    match value {
        ValueRef::Text(b) | ValueRef::Blob(b) => std::str::from_utf8(b).ok().map(str::to_string),
        _ => None,
    }
}

/// A stored text (a topic) whatever it holds, invalid UTF-8 replaced (for the ledger and
/// the dead letters).
fn lossy_text(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Text(b) | ValueRef::Blob(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("({})", other.data_type()),
    }
}

/// The ids of the records that cannot be decoded (see [`decode`]): a scan at open, of the
/// topics and the column types (not the payloads).
fn undecodable(conn: &Connection) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare(
        "SELECT id, topic, typeof(payload) IN ('blob', 'text') AND typeof(qos) = 'integer' \
         AND typeof(received_ms) = 'integer' AND typeof(props) IN ('null', 'blob', 'text') \
         FROM messages",
    )?;
    let mut rows = stmt.query([])?;
    let mut bad = Vec::new();
    while let Some(row) = rows.next()? {
        if topic_of(row.get_ref(1)?).is_none() || row.get::<_, i64>(2)? == 0 {
            bad.push(row.get::<_, i64>(0)?);
        }
    }
    Ok(bad)
}

/// Moves the records `ids` (that cannot be decoded) to the kept dead letters, reason
/// `internal_error`, their topic as lossy text and their payload as far as it reads, with a
/// warning each. Returns the topic (lossy), size and letter size of each record moved.
fn quarantine(
    tx: &rusqlite::Transaction<'_>,
    ids: &[i64],
) -> rusqlite::Result<Vec<(String, u64, u64)>> {
    let mut moved = Vec::new();
    for &id in ids {
        let row = tx
            .query_row(
                "SELECT topic, payload, received_ms, length(CAST(topic AS BLOB)), \
                 length(CAST(payload AS BLOB)) + IFNULL(length(CAST(props AS BLOB)), 0) \
                 FROM messages WHERE id = ?1",
                [id],
                |r| {
                    let payload = match r.get_ref(1)? {
                        ValueRef::Text(b) | ValueRef::Blob(b) => b.to_vec(),
                        _ => Vec::new(),
                    };
                    let received = match r.get_ref(2)? {
                        ValueRef::Integer(ms) => ms.to_string(),
                        _ => "unknown".to_string(),
                    };
                    Ok((
                        lossy_text(r.get_ref(0)?),
                        payload,
                        received,
                        size_of(
                            r.get::<_, Option<i64>>(3)?.unwrap_or(0).max(0) as usize,
                            r.get::<_, Option<i64>>(4)?.unwrap_or(0).max(0) as usize,
                        ),
                    ))
                },
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        let Some((topic, payload, received, size)) = row else {
            continue;
        };
        let detail = format!(
            "a spooled record (id {id}, received at unix ms {received}) could not be decoded \
             (damaged on disk); it was not replayed"
        );
        let record = crate::dead_letter::record(
            &topic,
            "",
            Reason::InternalError,
            &detail,
            &payload,
            crate::dead_letter::TRUNCATE_AT,
        );
        tx.prepare_cached("INSERT INTO letters (reason, record) VALUES (?1, ?2)")?
            .execute(params![Reason::InternalError.as_str(), record])?;
        tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?
            .execute([id])?;
        events::spool_record_unreadable(id, &topic);
        moved.push((
            topic,
            size,
            letter_size(Reason::InternalError.as_str(), &record),
        ));
    }
    Ok(moved)
}

fn read_letters(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<Letter>> {
    let mut stmt =
        conn.prepare_cached("SELECT id, reason, record FROM letters ORDER BY id LIMIT ?1")?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok(Letter {
            id: r.get(0)?,
            reason: lossy_text(r.get_ref(1)?),
            record: lossy_text(r.get_ref(2)?),
        })
    })?;
    rows.collect()
}

/// A deletion's answer, sent once the transaction is decided.
enum Answer {
    /// The records removed (topic and size): the ledger forgets them after the commit.
    Deleted(Vec<(String, u64)>, Reply<()>),
    /// Letters forgotten: how many, their bytes.
    Forgotten(u64, u64, Reply<()>),
    /// A letter kept: its size.
    Lettered(u64, Reply<()>),
}

/// What `drop_oldest` dropped in the transaction being built.
#[derive(Default)]
struct Drops {
    records: Vec<(String, u64)>,
    bytes: u64,
    /// What their dead letters hold ([`letter_size`]).
    letter_bytes: u64,
    last_id: i64,
}

/// Deletes the oldest kept dead letters until `excess` bytes are freed; how many went, and
/// their bytes.
fn evict_letters(tx: &rusqlite::Transaction<'_>, excess: u64) -> rusqlite::Result<(u64, u64)> {
    let mut chosen = Vec::new();
    let mut freed = 0u64;
    {
        let mut stmt = tx.prepare_cached(
            "SELECT id, length(CAST(reason AS BLOB)) + length(CAST(record AS BLOB)) FROM letters \
             ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        while freed < excess {
            let Some(row) = rows.next()? else { break };
            freed += row.get::<_, i64>(1)?.max(0) as u64 + RECORD_OVERHEAD;
            chosen.push(row.get::<_, i64>(0)?);
        }
    }
    for id in &chosen {
        tx.prepare_cached("DELETE FROM letters WHERE id = ?1")?
            .execute([id])?;
    }
    Ok((chosen.len() as u64, freed))
}

/// `drop_oldest`: while the spool holds more than `max_size`, drops its oldest records that
/// the replay has not taken, keeping their topic and time for the dead letter. The ledger
/// already counts the record being appended (and forgets the drops after the commit).
fn drop_oldest(
    tx: &rusqlite::Transaction<'_>,
    ledger: &SharedLedger,
    max_size: u64,
    drops: &mut Drops,
) -> rusqlite::Result<()> {
    let (over, cursor) = {
        let ledger = lock(ledger);
        (
            ledger
                .bytes
                .saturating_sub(drops.bytes)
                .saturating_sub(max_size),
            ledger.replay_cursor,
        )
    };
    if over == 0 {
        return Ok(());
    }
    let now = crate::spool::unix_ms();
    let mut freed = 0u64;
    let mut chosen = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT id, topic, received_ms, length(CAST(topic AS BLOB)), length(payload) + IFNULL(length(props), 0) \
             FROM messages WHERE id > ?1 ORDER BY id LIMIT 256",
        )?;
        let mut rows = stmt.query([cursor.max(drops.last_id)])?;
        while freed < over {
            let Some(row) = rows.next()? else { break };
            let size = size_of(
                row.get::<_, i64>(3)?.max(0) as usize,
                row.get::<_, i64>(4)?.max(0) as usize,
            );
            freed += size;
            chosen.push((
                row.get::<_, i64>(0)?,
                lossy_text(row.get_ref(1)?),
                row.get::<_, i64>(2)?,
                size,
            ));
        }
    }
    for (id, topic, received_ms, size) in chosen {
        tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?
            .execute([id])?;
        let detail = format!(
            "dropped from the full spool (spool.on_full = \"drop_oldest\"); received at unix \
             ms {received_ms}, dropped at unix ms {now}"
        );
        let record = crate::dead_letter::record(&topic, "", Reason::SpoolFull, &detail, b"", 0);
        tx.prepare_cached("INSERT INTO letters (reason, record) VALUES (?1, ?2)")?
            .execute(params![Reason::SpoolFull.as_str(), record])?;
        drops.letter_bytes += letter_size(Reason::SpoolFull.as_str(), &record);
        drops.last_id = id;
        drops.bytes += size;
        drops.records.push((topic, size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, fsync: Fsync) -> SpoolConfig {
        SpoolConfig {
            path: dir.join("spool.db"),
            max_size: SpoolConfig::DEFAULT_MAX_SIZE,
            on_full: OnFull::Backpressure,
            fsync,
            batch_window: Duration::from_millis(10),
            after: Duration::from_secs(5),
        }
    }

    fn record(topic: &str, n: u32) -> Record {
        Record {
            topic: topic.to_string(),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
            qos: 1,
            received_ms: 1,
            props: None,
        }
    }

    #[tokio::test]
    async fn records_come_back_in_order_and_leave_when_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SharedLedger::default();
        let store = Store::open(
            &config(dir.path(), Fsync::Batch),
            ledger.clone(),
            Arc::default(),
        )
        .unwrap();
        for n in 0..10 {
            let r = record(if n % 2 == 0 { "a" } else { "b" }, n);
            lock(&ledger).add(&r.topic, r.size());
            store.append(r).await.unwrap();
        }
        let read = store.read(0, 100).await.unwrap();
        let ns: Vec<String> = read
            .iter()
            .map(|s| String::from_utf8(s.record.payload.clone()).unwrap())
            .collect();
        assert_eq!(ns.len(), 10);
        assert_eq!(ns[0], "{\"n\":0}");
        assert_eq!(ns[9], "{\"n\":9}");
        assert_eq!(lock(&ledger).messages, 10);
        store
            .delete(read.iter().map(|s| s.id).collect())
            .await
            .unwrap();
        assert_eq!(lock(&ledger).messages, 0);
        assert!(lock(&ledger).topics.is_empty());
        assert_eq!(lock(&ledger).bytes, 0);
    }

    #[tokio::test]
    async fn a_reopened_spool_knows_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ledger = SharedLedger::default();
            let store = Store::open(
                &config(dir.path(), Fsync::Always),
                ledger.clone(),
                Arc::default(),
            )
            .unwrap();
            for n in 0..5 {
                let r = record("t", n);
                lock(&ledger).add(&r.topic, r.size());
                store.append(r).await.unwrap();
            }
            // A clean stop: the WAL is folded into the file and closed.
            store.close().await;
            assert!(!dir.path().join("spool.db-wal").exists());
        }
        let ledger = SharedLedger::default();
        let store = Store::open(
            &config(dir.path(), Fsync::Always),
            ledger.clone(),
            Arc::default(),
        )
        .expect("reopened");
        assert_eq!(lock(&ledger).messages, 5);
        assert_eq!(lock(&ledger).topics.get("t"), Some(&5));
        assert_eq!(store.read(0, 10).await.unwrap().len(), 5);
    }

    /// A real WAL of three commits, copied while its connection still holds it.
    fn real_wal(dir: &Path) -> Vec<u8> {
        let conn = connect(&dir.join("w.db"), Fsync::Always).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        for n in 0..3 {
            conn.execute(
                "INSERT INTO messages (topic, payload, qos, received_ms) VALUES ('t', ?1, 1, 0)",
                [vec![n as u8; 100]],
            )
            .unwrap();
        }
        std::fs::read(dir.join("w.db-wal")).unwrap()
    }

    #[test]
    fn an_intact_wal_passes_and_a_garbled_or_torn_last_frame_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let wal = real_wal(dir.path());
        let copy = dir.path().join("copy-wal");
        std::fs::write(&copy, &wal).unwrap();
        assert_eq!(check_wal(&copy).unwrap(), None, "an intact WAL");

        let mut garbled = wal.clone();
        let at = garbled.len() - 50;
        garbled[at] ^= 0xff;
        std::fs::write(&copy, &garbled).unwrap();
        let damage = check_wal(&copy).unwrap().expect("found");
        assert_eq!(damage.kind, "a garbled frame");
        assert!(damage.valid_len < wal.len() as u64 && damage.valid_len > 32);

        std::fs::write(&copy, &wal[..wal.len() - 10]).unwrap();
        let damage = check_wal(&copy).unwrap().expect("found");
        assert_eq!(damage.kind, "a frame cut short (a torn write)");
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_path_fails_naming_it_and_leaves_the_spool_alone() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), Fsync::Always);
        let ledger = SharedLedger::default();
        let first = Store::open(&config, ledger.clone(), Arc::default()).unwrap();
        let r = record("t", 1);
        lock(&ledger).add(&r.topic, r.size());
        first.append(r).await.unwrap();

        let second = Store::open(&config, SharedLedger::default(), Arc::default());
        let error = second
            .err()
            .expect("a second open of a spool in use fails")
            .to_string();
        assert!(
            error.contains("spool.path") && error.contains("another process"),
            "{error}"
        );
        // The first one goes on, with its record; nothing was moved aside.
        assert_eq!(first.read(0, 10).await.unwrap().len(), 1);
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("corrupt")));
        first.close().await;
        let again = Store::open(&config, SharedLedger::default(), Arc::default());
        assert!(again.is_ok(), "free again once the first one closed");
    }

    #[tokio::test]
    async fn a_record_garbled_while_open_goes_to_the_dead_letters_and_the_rest_reads() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), Fsync::Always);
        let ledger = SharedLedger::default();
        let store = Store::open(&config, ledger.clone(), Arc::default()).unwrap();
        for n in 0..3 {
            let r = record("abc", n);
            lock(&ledger).add(&r.topic, r.size());
            store.append(r).await.unwrap();
        }
        // Its topic's bytes garbled into invalid UTF-8 (same length), and a type flipped.
        let other = Connection::open(&config.path).unwrap();
        other
            .execute_batch(
                "UPDATE messages SET topic = CAST(x'ff6263' AS TEXT) WHERE id = 2;
                 UPDATE messages SET qos = 'x' WHERE id = 3;",
            )
            .unwrap();
        drop(other);
        let read = store
            .read(0, 10)
            .await
            .expect("a bad record never fails the read");
        assert_eq!(read.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(lock(&ledger).messages, 1);
        let letters = store.take_letters(10).await.unwrap();
        assert_eq!(letters.len(), 2);
        assert!(
            letters.iter().all(|l| l.reason == "internal_error"),
            "{letters:?}"
        );
        assert!(
            letters[0].record.contains("\u{fffd}bc"),
            "{}",
            letters[0].record
        );
        // And it is gone from the file: the next read does not see it again.
        assert!(store.read(1, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_salvage_interrupted_after_moving_the_damaged_file_aside_is_completed() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), Fsync::Always);
        {
            let ledger = SharedLedger::default();
            let store = Store::open(&config, ledger.clone(), Arc::default()).unwrap();
            for n in 0..3 {
                let r = record("t", n);
                lock(&ledger).add(&r.topic, r.size());
                store.append(r).await.unwrap();
            }
            store.close().await;
        }
        // The state a crash leaves between the two renames of `salvage`.
        std::fs::rename(&config.path, dir.path().join("spool.db.salvage")).unwrap();
        let ledger = SharedLedger::default();
        let store = Store::open(&config, ledger.clone(), Arc::default()).unwrap();
        assert_eq!(lock(&ledger).messages, 3);
        assert_eq!(store.read(0, 10).await.unwrap().len(), 3);
        assert!(!dir.path().join("spool.db.salvage").exists());
    }

    #[tokio::test]
    async fn a_failed_write_answers_every_command_of_its_group_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), Fsync::Always);
        let store = Store::open(&config, SharedLedger::default(), Arc::default()).unwrap();
        // Another process holds the write lock: the writes fail once the busy timeout ends.
        let other = Connection::open(&config.path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (append, delete, read) = tokio::join!(
            store.append(record("t", 1)),
            store.delete(vec![1]),
            store.read(0, 10),
        );
        for result in [append, delete] {
            let error = result.expect_err("a write under another's lock fails");
            assert!(
                error.contains("locked"),
                "the real error, not a lost reply: {error}"
            );
        }
        assert!(read.expect("reads are served").is_empty());
    }

    #[tokio::test]
    async fn kept_dead_letters_are_bounded_the_oldest_going_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), Fsync::Always);
        config.max_size = 1024; // and so the letters' budget
        let ledger = SharedLedger::default();
        let store = Store::open(&config, ledger.clone(), Arc::default()).unwrap();
        let letter = |n: usize| format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(150));
        for n in 0..20 {
            store
                .append_letter("invalid_json", letter(n))
                .await
                .unwrap();
        }
        let (count, bytes) = {
            let ledger = lock(&ledger);
            (ledger.letters, ledger.letter_bytes)
        };
        assert!(bytes <= 1024, "letters hold {bytes} bytes, over 1 KiB");
        assert!(count > 0 && count < 20, "{count} letters kept");
        let kept = store.take_letters(100).await.unwrap();
        assert_eq!(kept.len() as u64, count);
        assert_eq!(
            kept.last().map(|l| l.record.clone()),
            Some(letter(19)),
            "the newest stays"
        );
        // Forgetting them empties the account.
        store
            .forget_letters(kept.iter().map(|l| l.id).collect())
            .await
            .unwrap();
        let ledger = lock(&ledger);
        assert_eq!((ledger.letters, ledger.letter_bytes), (0, 0));
    }

    #[tokio::test]
    async fn a_file_without_autoincrement_is_migrated_and_ids_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), Fsync::Always);
        {
            let conn = Connection::open(&config.path).unwrap();
            conn.execute_batch(
                "CREATE TABLE messages (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, \
                 payload BLOB NOT NULL, qos INTEGER NOT NULL, received_ms INTEGER NOT NULL, \
                 props BLOB);
                 INSERT INTO messages VALUES (7, 't', x'01', 1, 0, NULL);",
            )
            .unwrap();
        }
        let ledger = SharedLedger::default();
        let store = Store::open(&config, ledger.clone(), Arc::default()).unwrap();
        assert_eq!(lock(&ledger).messages, 1);
        let read = store.read(0, 10).await.unwrap();
        assert_eq!(read[0].id, 7);
        store.delete(vec![7]).await.unwrap();
        let r = record("t", 2);
        lock(&ledger).add(&r.topic, r.size());
        store.append(r).await.unwrap();
        let read = store.read(0, 10).await.unwrap();
        assert!(
            read[0].id > 7,
            "an id after an emptied table: {}",
            read[0].id
        );
    }

    #[test]
    fn a_wal_cut_short_is_found_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("x-wal");
        assert_eq!(check_wal(&wal).unwrap(), None);
        std::fs::write(&wal, [0u8; 10]).unwrap();
        assert_eq!(check_wal(&wal).unwrap().unwrap().kind, "a header cut short");
    }
}
