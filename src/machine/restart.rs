//! Restart policies (Docker's `no`, `on-failure`, `always`): a machine whose VMM ended by
//! itself is started again after a back-off that doubles while it keeps dying.

use super::Machines;
use crate::domain::MachineState;
use crate::error::chain;
use crate::store::Machine;
use std::time::Duration;
use uuid::Uuid;

/// The first automatic restart waits this long; each next one in a row twice as long…
const RESTART_FIRST: Duration = Duration::from_secs(1);
/// …up to this.
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A machine that ran this long since its last automatic restart starts the back-off afresh.
const RESTART_RESET: Duration = Duration::from_secs(300);

/// A machine's automatic restarts: the next one's time (if one is due), how many came in a
/// row, and when the last one happened.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    due: Option<std::time::Instant>,
    n: u32,
    last: Option<std::time::Instant>,
}

impl Machines {
    /// Plan the next automatic restart of `m`, with exponential back-off.
    pub(super) fn schedule_restart(&self, m: &Machine) {
        let now = std::time::Instant::now();
        let mut all = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(m.id).or_insert(Backoff {
            due: None,
            n: 0,
            last: None,
        });
        b.n = match b.last {
            Some(last) if now.duration_since(last) < RESTART_RESET => b.n.saturating_add(1),
            _ => 0,
        };
        let wait = RESTART_FIRST.saturating_mul(1 << b.n.min(16)).min(RESTART_MAX);
        b.due = Some(now + wait);
        tracing::info!(machine = %m.name, policy = %m.restart, wait_s = wait.as_secs_f64(), "restarting by its policy");
    }

    /// Start the machines whose automatic restart is due (still `error` or `stopped`: a user's
    /// own start, stop or delete meanwhile wins). The daemon runs it on a task of its own, apart
    /// from [`Machines::reap_dead`], so a restart's boot never delays noticing another death.
    pub async fn restart_due(&self) {
        let now = std::time::Instant::now();
        let due: Vec<Uuid> = {
            let mut all = self.restarts.lock().unwrap_or_else(|p| p.into_inner());
            all.iter_mut()
                .filter(|(_, b)| b.due.is_some_and(|t| t <= now))
                .map(|(id, b)| {
                    b.due = None;
                    b.last = Some(now);
                    *id
                })
                .collect()
        };
        for id in due {
            let m = match self.store.lock().machine_by_id(id) {
                Ok(m) => m,
                Err(_) => {
                    self.restarts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    continue;
                }
            };
            if !matches!(m.state, MachineState::Error | MachineState::Stopped) {
                continue;
            }
            if let Err(e) = self.start(&id.to_string(), &|_| {}).await {
                tracing::warn!(machine = %m.name, error = %chain(&e), "automatic restart failed");
                self.schedule_restart(&m);
            }
        }
    }
}
