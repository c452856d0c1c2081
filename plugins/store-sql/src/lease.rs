//! The trainer lease: at most one process trains from a store at a time.
//!
//! On PostgreSQL, serving replicas and trainers share one schema, and the lease is a session
//! advisory lock keyed by that schema, held on a connection of its own that never returns to
//! the pool. A second trainer's attempt fails at once and it stays idle; when the holder dies,
//! its session ends and the database releases the lock, so the next attempt elsewhere
//! succeeds. No lease row can go stale, and no clock is involved.
//!
//! A SQLite store belongs to one process (its writers serialise on the file, and a fleet
//! shares PostgreSQL instead), so its lease is always granted.

use sqlx::{Connection, PgConnection};

use crate::{
    backend::Backend,
    error::{DbContext, Result},
    store::Store,
};

/// Takes the lease for the store's schema without waiting: `true` when this session holds it.
/// Two keys: the first names the lock's purpose, the second the schema, so stores in different
/// schemas of one database (tests, or several fleets) never contend.
const TRY_LOCK: &str =
    "SELECT pg_try_advisory_lock(hashtext('searchloop trainer'), hashtext(current_schema()))";

/// The right to train from a store; dropping it gives the right up.
#[derive(Debug)]
pub struct TrainerLease {
    /// The session holding the PostgreSQL lock (`None` on SQLite). Dropping the connection
    /// ends the session, which releases the lock.
    session: Option<PgConnection>,
}

impl TrainerLease {
    /// Whether the lease still holds: on PostgreSQL, whether its session is still alive (a
    /// database restart or a cut connection ends it, and the lock with it).
    pub async fn is_held(&mut self) -> bool {
        match &mut self.session {
            Some(session) => session.ping().await.is_ok(),
            None => true,
        }
    }

    /// Gives the lease up now, waiting for the database to see it released.
    pub async fn release(self) -> Result<()> {
        if let Some(session) = self.session {
            session.close().await.ctx("release the trainer lease")?;
        }
        Ok(())
    }
}

impl Store {
    /// Takes the trainer lease if no other process holds it; `None` when one does. See the
    /// module docs for what the lease is on each backend.
    pub async fn try_trainer_lease(&self) -> Result<Option<TrainerLease>> {
        let pool = match &*self.backend {
            Backend::Sqlite { .. } => return Ok(Some(TrainerLease { session: None })),
            Backend::Postgres { pool, .. } => pool,
        };
        // A connection of the lease's own: a pooled one would go back to the pool still
        // holding the session lock, and be handed to a query that knows nothing of it.
        let mut session = pool
            .acquire()
            .await
            .ctx("open a session for the trainer lease")?
            .detach();
        let granted: bool = sqlx::query_scalar(TRY_LOCK)
            .fetch_one(&mut session)
            .await
            .ctx("take the trainer lease")?;
        if granted {
            Ok(Some(TrainerLease {
                session: Some(session),
            }))
        } else {
            session
                .close()
                .await
                .ctx("close the trainer lease's session")?;
            Ok(None)
        }
    }
}
