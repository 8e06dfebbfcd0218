//! Noticing a VMM's exit at once: each running machine's VMM is watched through a pidfd, which
//! wakes the liveness pass the moment the process ends; a machine's change wakes it too (to
//! watch a new VMM), and the pass's timer stays as the fallback.

use super::Machines;
use crate::domain::MachineState;
use crate::events::HostEvent;
use sistemo_vmm::Instance;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::{Notify, broadcast};

/// The VMMs watched, and what their exits wake.
pub struct VmmWatch {
    watched: HashSet<(i32, u64)>,
    wake: Arc<Notify>,
    events: Option<broadcast::Receiver<HostEvent>>,
}

impl VmmWatch {
    /// A watch woken by machine changes from `events` too.
    pub fn new(events: broadcast::Receiver<HostEvent>) -> VmmWatch {
        VmmWatch {
            watched: HashSet::new(),
            wake: Arc::new(Notify::new()),
            events: Some(events),
        }
    }

    /// Wait for the next liveness pass: `tick`, a watched VMM's exit, or a machine's change.
    pub async fn next(&mut self, tick: &mut tokio::time::Interval) {
        loop {
            let listening = self.events.is_some();
            let events = self.events.as_mut();
            tokio::select! {
                _ = tick.tick() => return,
                _ = self.wake.notified() => return,
                ev = async { events.expect("checked").recv().await }, if listening => match ev {
                    Ok(HostEvent::Machine { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => self.events = None,
                },
            }
        }
    }

    /// Watch every running machine's VMM not watched yet; forget those no longer running.
    pub fn update(&mut self, machines: &Machines) {
        let live: HashSet<(i32, u64)> = machines
            .store
            .lock()
            .machines()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.state == MachineState::Running)
            .filter_map(|m| m.instance)
            .map(|i| (i.pid, i.start_time))
            .collect();
        self.watched.retain(|w| live.contains(w));
        for &(pid, start_time) in live.difference(&self.watched.clone()) {
            let Ok(fd) = crate::sys::pidfd_open(pid) else {
                continue;
            };
            // Opened after the check of the row: still the same process (not a reused pid)?
            if !(Instance { pid, start_time }).is_alive() {
                self.wake.notify_one();
                continue;
            }
            self.watched.insert((pid, start_time));
            let wake = self.wake.clone();
            tokio::spawn(async move {
                crate::sys::pidfd_exited(fd).await;
                wake.notify_one();
            });
        }
    }
}
