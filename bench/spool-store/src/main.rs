//! Which embedded store should hold the spool (spec §6.2, issue "A crash-safe local spool")?
//!
//! Measures, on this machine's disk, what the spool does per message with each candidate:
//! - **append, durable each**: one message per commit, fsync'd before the commit returns
//!   (the cost when the bridge acks each message only once it is on disk, with no batching);
//! - **append, durable per batch**: `BATCH` messages per commit (group commit: the MQTT
//!   source hands over what arrived together);
//! - **append, not synced**: per-batch commits the store writes but does not fsync
//!   (`fsync = "never"`-style: survives a process crash, not a power cut);
//! - **replay**: read the oldest `BATCH` in arrival order, then delete them in one durable
//!   commit, until empty (the drain).
//!
//! Candidates: SQLite in WAL mode (rusqlite, bundled build), redb, and a hand-written
//! append-only log (length-prefixed records without checksums, fdatasync, a
//! read cursor persisted per batch) as the floor a hand-written log could reach.
//!
//! `cargo run --release -- [DIR]` (DIR defaults to the system temp dir: put it on the disk
//! the spool would use). Prints one line per candidate and operation.

use redb::ReadableTable;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const EACH: u64 = 1_000;
const MANY: u64 = 50_000;
const BATCH: u64 = 64;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A spooled message: its topic and a 200-byte payload, as a typical sensor reading.
fn record(seq: u64) -> (String, Vec<u8>) {
    let topic = format!("sensors/dev-{}/data", seq % 1000);
    let mut payload = format!("{{\"seq\":{seq},\"t\":21.5,\"h\":40.1,\"fill\":\"").into_bytes();
    payload.resize(198, b'x');
    payload.extend_from_slice(b"\"}");
    (topic, payload)
}

trait Store {
    fn name(&self) -> &'static str;
    /// Appends `seqs` in one commit; durable when `sync`.
    fn append(&mut self, seqs: std::ops::Range<u64>, sync: bool) -> Res<()>;
    /// Reads up to `n` oldest messages and deletes them durably; how many it took.
    fn take(&mut self, n: u64) -> Res<u64>;
    fn size(&self) -> u64;
}

struct Sqlite {
    conn: rusqlite::Connection,
    path: PathBuf,
}

impl Sqlite {
    fn open(dir: &Path) -> Res<Sqlite> {
        let path = dir.join("spool.sqlite");
        let conn = rusqlite::Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.execute_batch(
            "CREATE TABLE spool (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL)",
        )?;
        Ok(Sqlite { conn, path })
    }
}

impl Store for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite-wal"
    }

    fn append(&mut self, seqs: std::ops::Range<u64>, sync: bool) -> Res<()> {
        // FULL: the WAL is fsync'd at every commit; NORMAL: only at checkpoints.
        self.conn
            .pragma_update(None, "synchronous", if sync { "FULL" } else { "NORMAL" })?;
        let tx = self.conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO spool (topic, payload) VALUES (?1, ?2)")?;
            for seq in seqs {
                let (topic, payload) = record(seq);
                insert.execute(rusqlite::params![topic, payload])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn take(&mut self, n: u64) -> Res<u64> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let tx = self.conn.transaction()?;
        let mut last = None;
        let mut count = 0;
        {
            let mut select =
                tx.prepare_cached("SELECT seq, topic, payload FROM spool ORDER BY seq LIMIT ?1")?;
            let mut rows = select.query([n as i64])?;
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let _topic: String = row.get(1)?;
                let _payload: Vec<u8> = row.get(2)?;
                last = Some(seq);
                count += 1;
            }
        }
        if let Some(last) = last {
            tx.execute("DELETE FROM spool WHERE seq <= ?1", [last])?;
        }
        tx.commit()?;
        Ok(count)
    }

    fn size(&self) -> u64 {
        let wal = self.path.with_extension("sqlite-wal");
        file_size(&self.path) + file_size(&wal)
    }
}

const TABLE: redb::TableDefinition<u64, (&str, &[u8])> = redb::TableDefinition::new("spool");

struct Redb {
    db: redb::Database,
    path: PathBuf,
}

impl Redb {
    fn open(dir: &Path) -> Res<Redb> {
        let path = dir.join("spool.redb");
        let db = redb::Database::create(&path)?;
        let tx = db.begin_write()?;
        tx.open_table(TABLE)?;
        tx.commit()?;
        Ok(Redb { db, path })
    }
}

impl Store for Redb {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn append(&mut self, seqs: std::ops::Range<u64>, sync: bool) -> Res<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(if sync {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        {
            let mut table = tx.open_table(TABLE)?;
            for seq in seqs {
                let (topic, payload) = record(seq);
                table.insert(seq, (topic.as_str(), payload.as_slice()))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn take(&mut self, n: u64) -> Res<u64> {
        let tx = self.db.begin_write()?;
        let mut count = 0;
        {
            let mut table = tx.open_table(TABLE)?;
            let mut last = None;
            for entry in table.range::<u64>(..)?.take(n as usize) {
                let (seq, value) = entry?;
                let (_topic, _payload) = value.value();
                last = Some(seq.value());
                count += 1;
            }
            if let Some(last) = last {
                table.retain_in(..=last, |_, _| false)?;
            }
        }
        tx.commit()?;
        Ok(count)
    }

    fn size(&self) -> u64 {
        file_size(&self.path)
    }
}

/// The floor: one append-only file of `[u32 len][topic\0payload]` records, fdatasync per
/// commit, and an 8-byte read offset in a second file, written and fdatasync'd per batch
/// taken. (A real one would add CRCs, segments and their deletion, and torn-tail repair.)
struct SegmentLog {
    log: File,
    reader: File,
    cursor: File,
    offset: u64,
    path: PathBuf,
}

impl SegmentLog {
    fn open(dir: &Path) -> Res<SegmentLog> {
        let path = dir.join("spool.log");
        let log = OpenOptions::new().create(true).append(true).open(&path)?;
        let reader = File::open(&path)?;
        let cursor = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("spool.cursor"))?;
        Ok(SegmentLog {
            log,
            reader,
            cursor,
            offset: 0,
            path,
        })
    }
}

impl Store for SegmentLog {
    fn name(&self) -> &'static str {
        "hand-written log"
    }

    fn append(&mut self, seqs: std::ops::Range<u64>, sync: bool) -> Res<()> {
        let mut buf = Vec::new();
        for seq in seqs {
            let (topic, payload) = record(seq);
            let len = (topic.len() + 1 + payload.len()) as u32;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(topic.as_bytes());
            buf.push(0);
            buf.extend_from_slice(&payload);
        }
        self.log.write_all(&buf)?;
        if sync {
            self.log.sync_data()?;
        }
        Ok(())
    }

    fn take(&mut self, n: u64) -> Res<u64> {
        self.reader.seek(SeekFrom::Start(self.offset))?;
        let mut count = 0;
        let mut len = [0u8; 4];
        while count < n {
            match self.reader.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
            let mut record = vec![0u8; u32::from_le_bytes(len) as usize];
            self.reader.read_exact(&mut record)?;
            self.offset += 4 + record.len() as u64;
            count += 1;
        }
        self.cursor.seek(SeekFrom::Start(0))?;
        self.cursor.write_all(&self.offset.to_le_bytes())?;
        self.cursor.sync_data()?;
        Ok(count)
    }

    fn size(&self) -> u64 {
        file_size(&self.path)
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn line(store: &str, op: &str, messages: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{store:<17} {op:<30} {messages:>7} msgs {:>9.1} µs/msg {:>9.0} msg/s",
        secs * 1e6 / messages as f64,
        messages as f64 / secs
    );
}

fn measure(store: &mut dyn Store) -> Res<()> {
    let name = store.name();
    let mut seq = 0;
    let started = Instant::now();
    for _ in 0..EACH {
        store.append(seq..seq + 1, true)?;
        seq += 1;
    }
    line(name, "append, durable each", EACH, started);

    let started = Instant::now();
    let end = seq + MANY;
    while seq < end {
        store.append(seq..seq + BATCH, true)?;
        seq += BATCH;
    }
    line(name, &format!("append, durable per {BATCH}"), MANY, started);

    let started = Instant::now();
    let end = seq + MANY;
    while seq < end {
        store.append(seq..seq + BATCH, false)?;
        seq += BATCH;
    }
    line(
        name,
        &format!("append, per {BATCH}, not synced"),
        MANY,
        started,
    );
    let size = store.size();

    let started = Instant::now();
    let mut taken = 0;
    loop {
        let n = store.take(BATCH)?;
        if n == 0 {
            break;
        }
        taken += n;
    }
    line(
        name,
        &format!("replay: read+delete per {BATCH}"),
        taken,
        started,
    );
    if taken != seq {
        return Err(format!("{name}: replayed {taken} of {seq}").into());
    }
    println!(
        "{name:<17} on disk with {seq} messages: {:.1} MiB ({} B/msg)",
        size as f64 / 1048576.0,
        size / seq
    );
    Ok(())
}

fn main() -> Res<()> {
    let base = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("spool-store-bench-{}", std::process::id()));
    let open = |name: &str| -> Res<PathBuf> {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub)?;
        Ok(sub)
    };
    measure(&mut Sqlite::open(&open("sqlite")?)?)?;
    measure(&mut Redb::open(&open("redb")?)?)?;
    measure(&mut SegmentLog::open(&open("log")?)?)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
