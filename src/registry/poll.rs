//! Repository polling: each pass brings the table in line with the model folders on disk.
//!
//! New and changed models load, removed ones unload and leave the table; under lazy model
//! control models not in memory are only listed (as unloaded) and wait for a request.

use std::collections::HashSet;
use std::sync::Arc;

use super::{LoadReason, Registry};

impl Registry {
    /// One pass of repository polling: new and changed models load, removed ones unload.
    pub async fn poll_once(self: &Arc<Self>) {
        let on_disk = match self.repo.model_names() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot scan the repository");
                return;
            }
        };
        // names and flags only: a table snapshot held across the awaits below would hold the
        // serving copies that unloads wait to see dropped
        let (known, resident): (Vec<String>, HashSet<String>) = {
            let table = self.table.load();
            let resident = table
                .iter()
                .filter(|(_, e)| e.versions.values().any(|v| v.serving.is_some()))
                .map(|(name, _)| name.clone())
                .collect();
            (table.keys().cloned().collect(), resident)
        };
        let mut tasks = Vec::new();
        for name in &on_disk {
            let resident = resident.contains(name);
            // lazy: models not in memory are listed (as unloaded) and wait for a request
            if self.settings.lazy && !resident {
                self.register_unloaded(name);
                continue;
            }
            let me = self.clone();
            let name = name.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = me.sync(&name, false, LoadReason::Poll).await {
                    tracing::warn!(model = %name, error = %e, "poll: load failed");
                }
            }));
        }
        for name in known.into_iter().filter(|n| !on_disk.contains(n)) {
            let me = self.clone();
            tasks.push(tokio::spawn(async move { me.remove(&name).await }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}
