//! Registry change notifications: promotions and rollbacks on PostgreSQL NOTIFY a channel when
//! they commit, with the schema as payload; a [`RegistryListener`] LISTENs on it for its own
//! schema, so a serving replica learns of a change at once instead of at its next poll.

use sqlx::postgres::PgListener;

use crate::{
    backend::Backend,
    error::{DbContext, Result},
    store::Store,
};

/// The channel promotions and rollbacks notify (see the PostgreSQL dialect).
const CHANNEL: &str = "searchloop_registry";

/// Wakes a process when another one promotes or rolls back an adapter in the same store.
#[derive(Debug)]
pub struct RegistryListener {
    listener: PgListener,
    schema: String,
}

impl RegistryListener {
    /// Waits for the next committed change to this store's registry. A lost connection is an
    /// error, and the next call reconnects; changes made meanwhile are not seen, so a caller
    /// keeps polling the registry as well.
    pub async fn changed(&mut self) -> Result<()> {
        loop {
            let notification = self
                .listener
                .recv()
                .await
                .ctx("wait for an adapter registry change")?;
            if notification.payload() == self.schema {
                return Ok(());
            }
        }
    }
}

impl Store {
    /// A listener for this store's registry changes; `None` on SQLite, whose store belongs to
    /// one process.
    pub async fn registry_listener(&self) -> Result<Option<RegistryListener>> {
        let Backend::Postgres { pool, schema } = &*self.backend else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(pool)
            .await
            .ctx("connect the adapter registry listener")?;
        listener
            .listen(CHANNEL)
            .await
            .ctx("listen for adapter registry changes")?;
        Ok(Some(RegistryListener {
            listener,
            schema: schema.clone(),
        }))
    }
}
