//! The daemon's event bus: machine changes (noticed by the store's change hook, never by
//! polling), progress of long operations, audit-log entries and firewall repairs, broadcast to
//! every `GET /v1/events` subscriber.

use crate::store::HistoryRow;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{Notify, broadcast};

/// Events a slow subscriber may fall behind by before it is told to resync.
pub const BACKLOG: usize = 1024;

/// One event of the services.
#[derive(Debug, Clone)]
pub enum HostEvent {
    /// A machine was created or changed (state, error, ports).
    Machine {
        /// Its name.
        name: String,
    },
    /// A machine is gone.
    MachineRemoved {
        /// Its name.
        name: String,
    },
    /// A progress line of a long operation.
    Progress {
        /// Action, e.g. `machine.deploy`.
        action: String,
        /// What it acts on.
        target: String,
        /// The line.
        message: String,
    },
    /// An audit-log entry was written.
    Change(HistoryRow),
    /// The firewall drifted and was repaired.
    Firewall {
        /// What happened.
        detail: String,
    },
}

/// The bus.
pub struct Events {
    tx: broadcast::Sender<HostEvent>,
    dirty: Arc<Notify>,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(BACKLOG).0,
            dirty: Arc::new(Notify::new()),
            closed: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Events {
    /// A new subscriber, receiving every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.tx.subscribe()
    }

    /// The daemon stops: subscribers' streams end (so a clean stop does not wait for them).
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }

    /// Resolves once [`Events::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Publish `ev` (dropped when nobody listens).
    pub fn publish(&self, ev: HostEvent) {
        let _ = self.tx.send(ev);
    }

    /// Publish a progress line.
    pub fn progress(&self, action: &str, target: &str, message: &str) {
        self.publish(HostEvent::Progress {
            action: action.into(),
            target: target.into(),
            message: message.into(),
        });
    }

    /// The wake-up the store's change hook rings (machines or exposes changed).
    pub fn dirty(&self) -> Arc<Notify> {
        self.dirty.clone()
    }

    /// Until the process ends: each time the store says machines changed, compare them with
    /// the last snapshot (`snapshot` gives name → fingerprint) and publish the differences.
    pub async fn watch_machines(&self, snapshot: impl Fn() -> Option<HashMap<String, String>>) {
        let mut last = snapshot().unwrap_or_default();
        loop {
            self.dirty.notified().await;
            let Some(now) = snapshot() else { continue };
            for (name, fp) in &now {
                if last.get(name) != Some(fp) {
                    self.publish(HostEvent::Machine { name: name.clone() });
                }
            }
            for name in last.keys().filter(|n| !now.contains_key(*n)) {
                self.publish(HostEvent::MachineRemoved { name: name.clone() });
            }
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn machine_changes_become_events_without_polling() {
        let ev = Arc::new(Events::default());
        let state = Arc::new(std::sync::Mutex::new(HashMap::from([(
            "a".to_string(),
            "stopped".to_string(),
        )])));
        let mut rx = ev.subscribe();
        let (e2, s2) = (ev.clone(), state.clone());
        tokio::spawn(async move { e2.watch_machines(move || Some(s2.lock().unwrap().clone())).await });
        tokio::task::yield_now().await;
        state.lock().unwrap().insert("a".into(), "running".into());
        state.lock().unwrap().insert("b".into(), "creating".into());
        ev.dirty().notify_one();
        let mut got = vec![];
        for _ in 0..2 {
            match tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap()
            {
                HostEvent::Machine { name } => got.push(name),
                e => panic!("{e:?}"),
            }
        }
        got.sort();
        assert_eq!(got, ["a", "b"]);
        state.lock().unwrap().remove("a");
        ev.dirty().notify_one();
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(e, HostEvent::MachineRemoved { name } if name == "a"));
    }
}
