//! Reliability with real processes and real files, on SQLite and PostgreSQL: eight writer
//! processes, a group reader and feedback for 30 seconds; a writer process killed with SIGKILL
//! at a random moment, 20 times; and damaged or foreign files that must be refused untouched.
//!
//! Child processes are this test binary run again with `SEARCHLOOP_STORE_CHILD` set, which
//! turns the otherwise empty `child_process` test into a writer that prints `ACK <id>` after
//! each insert returns.

// Test helpers outside #[test] functions panic on failure too: the panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use common::{
    Kind, TestDb,
    sample::{self, Shape},
};
use futures::StreamExt;
use rand::Rng;
use searchloop_core::Trajectory;
use searchloop_store_sql::{Cursor, FeedbackInput, FeedbackOutcome, GroupQuery, Store, StoreError};

const CHILD_MODE: &str = "SEARCHLOOP_STORE_CHILD";
const CHILD_LOCATION: &str = "SEARCHLOOP_STORE_LOCATION";
const CHILD_PREFIX: &str = "SEARCHLOOP_STORE_PREFIX";
const CHILD_SECONDS: &str = "SEARCHLOOP_STORE_SECONDS";

/// The trajectory a child writes under `id` (`<prefix>-<n>`): groups of four consecutive ids.
fn expected(id: &str) -> Trajectory {
    let (prefix, n) = id.rsplit_once('-').unwrap();
    let n: u64 = n.parse().unwrap();
    sample::trajectory(
        id,
        &Shape {
            group_id: Some(format!("{prefix}-g{}", n / 4)),
            ..Shape::default()
        },
    )
}

/// The child: writes trajectories until killed, or for `SEARCHLOOP_STORE_SECONDS`, printing
/// each acknowledged id. A no-op in a normal test run.
#[test]
fn child_process() {
    let Ok(_mode) = std::env::var(CHILD_MODE) else {
        return;
    };
    let location = std::env::var(CHILD_LOCATION).unwrap();
    let prefix = std::env::var(CHILD_PREFIX).unwrap();
    let seconds: Option<u64> = std::env::var(CHILD_SECONDS)
        .ok()
        .map(|s| s.parse().unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open_with(&location, TestDb::options())
            .await
            .unwrap();
        let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
        let mut stdout = std::io::stdout().lock();
        for n in 0.. {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let id = format!("{prefix}-{n}");
            store.insert_trajectory(&expected(&id)).await.unwrap();
            writeln!(stdout, "ACK {id}").unwrap();
            stdout.flush().unwrap();
        }
        store.close().await;
    });
}

/// Starts a child writer and a thread that collects its acknowledged ids.
fn spawn_writer(
    location: &str,
    prefix: &str,
    seconds: Option<u64>,
    acked: Arc<Mutex<Vec<String>>>,
) -> (Child, thread::JoinHandle<()>) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_MODE, "writer")
        .env(CHILD_LOCATION, location)
        .env(CHILD_PREFIX, prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(s) = seconds {
        command.env(CHILD_SECONDS, s.to_string());
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // With one test thread, libtest prints "test child_process ... " without a line
            // break before the test runs, so the first acknowledgement shares its line.
            if let Some((_, id)) = line.split_once("ACK ") {
                acked.lock().unwrap().push(id.to_string());
            }
        }
    });
    (child, reader)
}

fn on_both(test: fn(Kind)) {
    thread::scope(|s| {
        let handles = [Kind::Sqlite, Kind::Postgres].map(|kind| s.spawn(move || test(kind)));
        for h in handles {
            h.join().unwrap();
        }
    });
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A writer process killed with SIGKILL at a random moment, 20 times: the store opens cleanly
/// every time and holds every acknowledged trajectory, bit for bit.
#[test]
fn sigkilled_writer_loses_no_acknowledged_trajectory() {
    on_both(|kind| {
        block_on(async {
            let db = TestDb::new(kind).await;
            db.open().await.close().await;
            let mut rng = rand::rng();
            let (mut total_acked, mut unacknowledged_commits) = (0, 0);
            for round in 0..20 {
                let before = {
                    let store = db.open().await;
                    let n = store.stats().await.unwrap().trajectories;
                    store.close().await;
                    n
                };
                let acked = Arc::new(Mutex::new(Vec::new()));
                let (mut child, reader) =
                    spawn_writer(&db.location(), &format!("kill{round}"), None, acked.clone());
                tokio::time::sleep(Duration::from_millis(rng.random_range(150..1500))).await;
                child.kill().unwrap();
                child.wait().unwrap();
                reader.join().unwrap();
                let acked = acked.lock().unwrap().clone();
                total_acked += acked.len();

                let store = Store::open_with(&db.location(), TestDb::options())
                    .await
                    .unwrap_or_else(|e| panic!("{kind:?} round {round}: reopen failed: {e}"));
                store.check_integrity().await.unwrap();
                for id in &acked {
                    let stored = store.get_trajectory(id).await.unwrap();
                    assert_eq!(
                        stored.as_ref(),
                        Some(&expected(id)),
                        "{kind:?} round {round}: {id}"
                    );
                }
                let after = store.stats().await.unwrap().trajectories;
                let written = after - before;
                assert!(
                    written == acked.len() as u64 || written == acked.len() as u64 + 1,
                    "{kind:?} round {round}: {written} rows for {} acknowledged inserts",
                    acked.len()
                );
                unacknowledged_commits += written - acked.len() as u64;
                store.close().await;
            }
            println!(
                "{kind:?}: 20 kills, {total_acked} acknowledged inserts all intact, \
                 {unacknowledged_commits} kills between a commit and its acknowledgement"
            );
            assert!(
                total_acked >= 20,
                "{kind:?}: only {total_acked} inserts were acknowledged"
            );
            db.cleanup().await;
        })
    });
}

/// What the group reader has seen: per trajectory, the length of its latest ledger.
type ReaderView = HashMap<String, usize>;

async fn read_new_groups(store: &Store, cursor: &mut Cursor, view: &mut ReaderView) {
    let mut stream = store
        .rewarded_groups(GroupQuery {
            since: *cursor,
            ..GroupQuery::default()
        })
        .await
        .unwrap();
    while let Some(group) = stream.next().await {
        for m in group.unwrap().members {
            view.insert(m.trajectory.id.clone(), m.trajectory.rewards.len());
        }
    }
    *cursor = stream.next_cursor();
}

/// Eight writer processes, a reader streaming groups from its cursor, and feedback arriving
/// (with repeated deliveries), for 30 seconds. Afterwards every acknowledged write is present,
/// counted exactly, and the reader's incremental view equals the store.
#[test]
fn eight_writers_a_group_reader_and_feedback_for_30_seconds() {
    on_both(|kind| {
        block_on(async {
            let db = TestDb::new(kind).await;
            let store = db.open().await;
            let acked = Arc::new(Mutex::new(Vec::new()));
            let writers: Vec<_> = (0..8)
                .map(|i| spawn_writer(&db.location(), &format!("w{i}"), Some(30), acked.clone()))
                .collect();
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

            let reader = {
                let (store, done) = (store.clone(), done.clone());
                tokio::spawn(async move {
                    let (mut cursor, mut view) = (Cursor::START, ReaderView::new());
                    let mut passes = 0;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        read_new_groups(&store, &mut cursor, &mut view).await;
                        passes += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    (cursor, view, passes)
                })
            };
            let feedback = {
                let (store, done, acked) = (store.clone(), done.clone(), acked.clone());
                tokio::spawn(async move {
                    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
                    let mut delivered: Vec<(String, FeedbackInput)> = Vec::new();
                    let (mut recorded, mut duplicates) = (0u64, 0u64);
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        let redeliver = !delivered.is_empty() && rng.random_bool(0.2);
                        let (id, input) = if redeliver {
                            delivered[rng.random_range(0..delivered.len())].clone()
                        } else {
                            let picked = {
                                let ids = acked.lock().unwrap();
                                (!ids.is_empty())
                                    .then(|| ids[rng.random_range(0..ids.len())].clone())
                            };
                            let Some(id) = picked else {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            };
                            let input =
                                FeedbackInput::new("purchase", rng.random_range(-1.0..=1.0))
                                    .with_key(format!("fb-{}", delivered.len()));
                            (id, input)
                        };
                        match store.add_feedback(&id, input.clone()).await.unwrap() {
                            FeedbackOutcome::Recorded => {
                                assert!(!redeliver, "a repeated delivery was recorded twice");
                                recorded += 1;
                                delivered.push((id, input));
                            }
                            FeedbackOutcome::Duplicate => {
                                assert!(redeliver, "new feedback was taken for a duplicate");
                                duplicates += 1;
                            }
                        }
                    }
                    (recorded, duplicates, delivered)
                })
            };

            for (mut child, reader) in writers {
                let status = tokio::task::spawn_blocking(move || {
                    let status = child.wait().unwrap();
                    reader.join().unwrap();
                    status
                })
                .await
                .unwrap();
                assert!(status.success(), "{kind:?}: a writer failed: {status}");
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let (recorded, duplicates, delivered) = feedback.await.unwrap();
            let (mut cursor, mut view, passes) = reader.await.unwrap();
            read_new_groups(&store, &mut cursor, &mut view).await;

            let acked = acked.lock().unwrap().clone();
            let stats = store.stats().await.unwrap();
            println!(
                "{kind:?}: {} trajectories, {recorded} feedback ({duplicates} repeats), {passes} reader passes",
                acked.len()
            );
            assert!(
                acked.len() >= 80,
                "{kind:?}: only {} writes in 30 s",
                acked.len()
            );
            assert!(recorded > 0 && duplicates > 0);
            assert_eq!(stats.trajectories, acked.len() as u64);
            assert_eq!(stats.feedback_entries, recorded);
            assert_eq!(stats.reward_entries, 3 * acked.len() as u64 + recorded);
            let mut feedback_per_id: HashMap<&str, usize> = HashMap::new();
            for (id, _) in &delivered {
                *feedback_per_id.entry(id.as_str()).or_default() += 1;
            }
            let acked_set: HashSet<&String> = acked.iter().collect();
            assert_eq!(acked_set.len(), acked.len());
            assert_eq!(
                view.len(),
                acked.len(),
                "{kind:?}: the reader missed or invented trajectories"
            );
            for id in &acked {
                let stored = store.get_trajectory(id).await.unwrap().unwrap();
                let want = expected(id);
                assert_eq!(stored.rewards[..3], want.rewards[..], "{id}");
                assert_eq!(
                    Trajectory {
                        rewards: want.rewards.clone(),
                        ..stored.clone()
                    },
                    want,
                    "{id}"
                );
                let ledger = 3 + feedback_per_id.get(id.as_str()).copied().unwrap_or(0);
                assert_eq!(stored.rewards.len(), ledger, "{id}");
                assert_eq!(
                    view.get(id),
                    Some(&ledger),
                    "{kind:?}: the reader's view of {id} is stale"
                );
            }
            store.close().await;
            db.cleanup().await;
        })
    });
}

/// Damaged and foreign SQLite files are refused with a clear error, and their bytes are left
/// exactly as they were.
#[test]
fn damaged_or_foreign_sqlite_files_are_refused_untouched() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let refuse = |name: &'static str| {
            let path = dir.path().join(name);
            async move {
                let before = std::fs::read(&path).unwrap();
                let err = Store::open(path.to_str().unwrap()).await.unwrap_err();
                assert_eq!(std::fs::read(&path).unwrap(), before, "{name} was modified");
                err
            }
        };

        std::fs::write(
            dir.path().join("notes.txt"),
            "these are not the trajectories\n".repeat(50),
        )
        .unwrap();
        let err = refuse("notes.txt").await;
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err}");
        assert!(
            err.to_string().contains("notes.txt")
                && err.to_string().contains("not a SQLite database")
        );

        let mut noise = vec![0u8; 16_384];
        rand::rng().fill(&mut noise[..]);
        std::fs::write(dir.path().join("noise.bin"), &noise).unwrap();
        assert!(matches!(
            refuse("noise.bin").await,
            StoreError::NotADatabase { .. }
        ));

        std::fs::write(dir.path().join("stub.db"), b"SQLite format 3\0abc").unwrap();
        assert!(matches!(
            refuse("stub.db").await,
            StoreError::NotADatabase { .. }
        ));

        // A real store, cut in half.
        let path = dir.path().join("truncated.db");
        let store = Store::open(path.to_str().unwrap()).await.unwrap();
        for i in 0..60 {
            store
                .insert_trajectory(&expected(&format!("t-{i}")))
                .await
                .unwrap();
        }
        store.close().await;
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let err = refuse("truncated.db").await;
        assert!(matches!(err, StoreError::CorruptFile { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");

        // Another program's database.
        let other = dir.path().join("shop.db");
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
            "sqlite://{}?mode=rwc",
            other.display()
        ))
        .await
        .unwrap();
        sqlx::raw_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO customers (name) VALUES ('ada');")
            .execute(&mut conn).await.unwrap();
        sqlx::Connection::close(conn).await.unwrap();
        let err = refuse("shop.db").await;
        assert!(matches!(err, StoreError::ForeignDatabase { .. }), "{err}");
        assert!(err.to_string().contains("customers"), "{err}");

        // An empty database of another program, marked by its application id.
        let marked = dir.path().join("marked.db");
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
            "sqlite://{}?mode=rwc",
            marked.display()
        ))
        .await
        .unwrap();
        sqlx::raw_sql("PRAGMA application_id = 42; PRAGMA user_version = 1;")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::Connection::close(conn).await.unwrap();
        assert!(matches!(
            refuse("marked.db").await,
            StoreError::ForeignDatabase { .. }
        ));

        // Our own store, from a newer build, and one whose version record is gone.
        for (name, sql) in [
            (
                "future.db",
                "INSERT INTO searchloop_schema VALUES (99, 'from the future', 0)",
            ),
            ("unversioned.db", "DELETE FROM searchloop_schema"),
        ] {
            let path = dir.path().join(name);
            Store::open(path.to_str().unwrap())
                .await
                .unwrap()
                .close()
                .await;
            let db = TestDb::Sqlite {
                dir: tempfile::tempdir().unwrap(),
                path,
            };
            db.execute(sql).await;
            let err = refuse(name).await;
            match name {
                "future.db" => assert!(
                    matches!(
                        err,
                        StoreError::SchemaTooNew {
                            found: 99,
                            supported: 4,
                            ..
                        }
                    ),
                    "{err}"
                ),
                _ => assert!(matches!(err, StoreError::ForeignDatabase { .. }), "{err}"),
            }
        }

        let err = Store::open(dir.path().to_str().unwrap()).await.unwrap_err();
        assert!(matches!(err, StoreError::InvalidLocation { .. }), "{err}");
        assert!(Store::open("sqlite::memory:").await.is_err());
        let missing_dir = dir.path().join("no/such/dir/store.db");
        assert!(Store::open(missing_dir.to_str().unwrap()).await.is_err());
        assert!(!missing_dir.exists());

        // A store that was merely closed opens again, through either spelling.
        let fine = dir.path().join("fine.db");
        Store::open(fine.to_str().unwrap())
            .await
            .unwrap()
            .close()
            .await;
        Store::open(&format!("sqlite://{}", fine.display()))
            .await
            .unwrap()
            .close()
            .await;
    });
}

/// A PostgreSQL schema holding another program's tables, or a newer store, is refused and left
/// as it was.
#[test]
fn foreign_or_newer_postgres_schemas_are_refused_untouched() {
    block_on(async {
        let foreign = TestDb::new(Kind::Postgres).await;
        foreign
            .execute(
                "CREATE TABLE customers (id BIGINT PRIMARY KEY); INSERT INTO customers VALUES (1);",
            )
            .await;
        let err = Store::open(&foreign.location()).await.unwrap_err();
        assert!(matches!(err, StoreError::ForeignDatabase { .. }), "{err}");
        assert!(err.to_string().contains("customers"), "{err}");
        assert!(
            foreign
                .try_execute("SELECT 1 FROM searchloop_schema")
                .await
                .is_err(),
            "nothing was created"
        );
        foreign.execute("INSERT INTO customers VALUES (2)").await;
        foreign.cleanup().await;

        let future = TestDb::new(Kind::Postgres).await;
        future.open().await.close().await;
        future
            .execute("INSERT INTO searchloop_schema VALUES (99, 'from the future', 0)")
            .await;
        let err = Store::open(&future.location()).await.unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
        future.cleanup().await;

        let nowhere = format!(
            "{}{}options[search_path]=no_such_schema_here",
            common::pg_url(),
            if common::pg_url().contains('?') {
                '&'
            } else {
                '?'
            }
        );
        let err = Store::open(&nowhere).await.unwrap_err();
        assert!(err.to_string().contains("no schema is selected"), "{err}");
    });
}
