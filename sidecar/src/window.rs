//! A window of reusable chunk buffers for large transfers split into ranged requests,
//! optionally drawing on a process-wide byte budget.
//!
//! A request takes a slot before it is sent and the slot comes back only when the
//! consumer drops the chunk's bytes, so at most `slots` chunks are in memory however
//! slow the consumer is. Without a budget, each buffer is allocated once and reused: a
//! 1 GiB transfer does not fault in 1 GiB of fresh pages. With a `Budget`, a slot also
//! waits until the bytes it needs are free across every transfer sharing that budget;
//! its buffer is then reused through the budget's spares, which keep their share
//! (every byte allocated is counted) and give it up as soon as anyone waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::metrics::{Buffers, Metrics};

/// Budget permits are KiB, so a budget past 4 GiB still fits the semaphore's u32 takes.
const UNIT: u64 = 1024;

/// Bytes that every transfer sharing it may hold in buffers at once, process-wide.
/// Waiters are served first come, first served, so no transfer starves. Buffers of
/// finished transfers are kept for the next ones (up to 1/16 of the budget, still
/// counted), so short requests do not allocate, fault in and free a block each.
#[derive(Debug, Clone)]
pub struct Budget(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    permits: Arc<Semaphore>,
    units: u32,
    /// Windows drawing on the budget now, for each one's fair share.
    windows: AtomicUsize,
    /// Reservations waiting for permits: while any waits, no buffer is kept as a spare.
    waiting: AtomicUsize,
    spares: std::sync::Mutex<Spares>,
    buffers: Buffers,
    metrics: Metrics,
}

/// Buffers of finished transfers, with their budget shares.
#[derive(Debug, Default)]
struct Spares {
    buffers: Vec<Buffer>,
    units: u32,
}

impl Budget {
    pub fn new(bytes: u64, buffers: Buffers, metrics: Metrics) -> Budget {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        Budget(Arc::new(Shared {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
            windows: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            spares: Default::default(),
            buffers,
            metrics,
        }))
    }

    /// The chunk size at which every window drawing on the budget now could hold `slots`
    /// chunks at once without waiting for another.
    pub fn fair_share(&self, slots: usize) -> u64 {
        let windows = self.0.windows.load(Ordering::SeqCst).max(1);
        u64::from(self.0.units) * UNIT / (windows * slots.max(1)) as u64
    }

    /// Waits until `len` bytes are free (a request larger than the budget waits for all of it).
    async fn reserve(&self, len: u64) -> Reservation {
        let units = u32::try_from(len.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.0.units);
        let permits = &self.0.permits;
        let permit = match permits.clone().try_acquire_many_owned(units) {
            Ok(permit) => Some(permit),
            Err(_) => {
                // Spares never make anyone wait: give them back first, and keep no new
                // ones until this reservation is served.
                self.0.waiting.fetch_add(1, Ordering::SeqCst);
                drop(std::mem::take(&mut *self.lock_spares()));
                // The semaphore is never closed, so acquiring cannot fail.
                let permit = permits.clone().acquire_many_owned(units).await.ok();
                self.0.waiting.fetch_sub(1, Ordering::SeqCst);
                permit
            }
        };
        let bytes = i64::try_from(len).unwrap_or(i64::MAX);
        self.0.metrics.add_buffered(self.0.buffers, bytes);
        Reservation {
            _permit: permit,
            bytes,
            units,
            budget: self.clone(),
        }
    }

    /// A kept buffer that fits a `len`-byte chunk, with its share.
    fn spare(&self, len: usize) -> Option<Buffer> {
        let mut spares = self.lock_spares();
        let wanted = i64::try_from(len).unwrap_or(i64::MAX);
        let index = spares.buffers.iter().position(|(data, reservation)| {
            reservation.as_ref().is_some_and(|r| r.bytes >= wanted)
                && data.capacity() <= len.saturating_mul(2)
        })?;
        let buffer = spares.buffers.swap_remove(index);
        spares.units -= buffer.1.as_ref().map_or(0, |r| r.units);
        Some(buffer)
    }

    /// Keeps a finished transfer's buffer for the next one, while the spares stay small
    /// and nobody waits for budget; otherwise it is freed with its share.
    fn keep(&self, buffer: Buffer) {
        let Some(units) = buffer.1.as_ref().map(|r| r.units) else {
            return;
        };
        if buffer.0.capacity() == 0 || self.0.waiting.load(Ordering::SeqCst) > 0 {
            return;
        }
        let mut spares = self.lock_spares();
        if spares.units + units <= self.0.units / 16 {
            spares.units += units;
            spares.buffers.push(buffer);
        }
    }

    fn lock_spares(&self) -> std::sync::MutexGuard<'_, Spares> {
        self.0
            .spares
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Bytes of a budget held by one buffer; they return when it drops.
#[derive(Debug)]
struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: i64,
    units: u32,
    budget: Budget,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let shared = &self.budget.0;
        shared.metrics.add_buffered(shared.buffers, -self.bytes);
    }
}

/// A buffer and the budget share it holds.
type Buffer = (Vec<u8>, Option<Reservation>);

/// The slots of one transfer.
#[derive(Debug)]
pub struct Window {
    free: Mutex<mpsc::Receiver<Buffer>>,
    returns: mpsc::Sender<Buffer>,
    budget: Option<Budget>,
}

impl Window {
    pub fn new(slots: usize) -> Window {
        Window::build(slots, None)
    }

    /// A window whose slots also take their bytes from `budget`.
    pub fn with_budget(slots: usize, budget: Budget) -> Window {
        budget.0.windows.fetch_add(1, Ordering::SeqCst);
        Window::build(slots, Some(budget))
    }

    fn build(slots: usize, budget: Option<Budget>) -> Window {
        let slots = slots.max(1);
        let (returns, free) = mpsc::channel(slots);
        for _ in 0..slots {
            // Capacity is reserved on first use: a small object never allocates a whole chunk.
            let _ = returns.try_send((Vec::new(), None));
        }
        Window {
            free: Mutex::new(free),
            returns,
            budget,
        }
    }

    /// Waits for a free slot, and for `len` bytes of the budget if there is one, and
    /// makes room in it for `len` bytes.
    pub async fn take(&self, len: u64) -> Slot {
        // The window keeps a sender, so the channel never closes while waiting here.
        let (mut data, mut reservation) = self.free.lock().await.recv().await.unwrap_or_default();
        let wanted = usize::try_from(len).unwrap_or(usize::MAX);
        if let Some(budget) = &self.budget {
            // Budgeted buffers live in the budget's spares between uses, never idle in a
            // window: a share nobody uses can then always be given to whoever waits.
            (data, reservation) = match budget.spare(wanted) {
                Some(spare) => spare,
                None => (Vec::new(), Some(budget.reserve(len).await)),
            };
        } else if data.capacity() > wanted.saturating_mul(2) {
            data = Vec::new();
        }
        data.clear();
        data.reserve_exact(wanted);
        Slot {
            data,
            reservation,
            returns: self.returns.clone(),
            budget: self.budget.clone(),
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.0.windows.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One chunk's buffer, returned to its window when dropped.
#[derive(Debug)]
pub struct Slot {
    data: Vec<u8>,
    reservation: Option<Reservation>,
    returns: mpsc::Sender<Buffer>,
    budget: Option<Budget>,
}

impl Slot {
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    /// The chunk as `Bytes`; the slot returns when the last clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let buffer = (std::mem::take(&mut self.data), self.reservation.take());
        let buffer = match &self.budget {
            Some(budget) => {
                budget.keep(buffer);
                (Vec::new(), None)
            }
            None => buffer,
        };
        // Fails only when the transfer is over and its window gone.
        let _ = self.returns.try_send(buffer);
    }
}

#[cfg(test)]
impl Budget {
    /// Bytes free now.
    fn available(&self) -> u64 {
        self.0.permits.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;

    use super::*;

    /// Whether `future` is still waiting after being polled once.
    fn waits<F: Future>(future: F) -> bool {
        let mut future = pin!(future);
        let mut context = Context::from_waker(std::task::Waker::noop());
        future.as_mut().poll(&mut context).is_pending()
    }

    #[tokio::test]
    async fn buffers_are_reused_and_bounded() {
        let window = Window::new(2);
        let mut first = window.take(1024).await;
        first.buffer().extend_from_slice(&[1; 1024]);
        let pointer = first.buffer().as_ptr();
        let second = window.take(1024).await;
        assert!(waits(window.take(1)), "only two slots");
        drop(first.into_bytes());
        let mut again = window.take(512).await;
        assert!(again.buffer().is_empty(), "a reused buffer starts empty");
        assert_eq!(
            again.buffer().as_ptr(),
            pointer,
            "the same allocation comes back"
        );
        drop(second);
    }

    #[tokio::test]
    async fn the_gauge_counts_buffers_in_use_and_kept_until_they_are_freed() {
        let metrics = Metrics::new();
        let budget = Budget::new(1 << 20, Buffers::ParallelGet, metrics.clone());
        let window = Window::with_budget(1, budget);
        let bytes = window.take(100).await.into_bytes();
        assert_eq!(metrics.parallel_get_buffered.get(), 100);
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(metrics.parallel_get_buffered.get(), 100, "a clone holds it");
        drop(clone);
        assert_eq!(
            metrics.parallel_get_buffered.get(),
            100,
            "kept for reuse, still counted"
        );
        let again = window.take(80).await;
        assert_eq!(
            metrics.parallel_get_buffered.get(),
            100,
            "reused, not counted twice"
        );
        drop((again, window));
        assert_eq!(metrics.buffered_high_water(Buffers::ParallelGet), 100);

        // 1 KiB: a 100-byte buffer is over 1/16 of it, so it is freed, not kept.
        let tiny = Budget::new(1024, Buffers::DiskRead, metrics.clone());
        let window = Window::with_budget(1, tiny);
        drop(window.take(100).await);
        assert_eq!(metrics.disk_read_buffered.get(), 0);
    }

    #[tokio::test]
    async fn a_buffer_too_big_to_keep_is_freed_with_its_share() {
        let metrics = Metrics::new();
        let budget = Budget::new(1 << 20, Buffers::DiskRead, metrics.clone());
        let window = Window::with_budget(1, budget.clone());
        drop(window.take(512 * 1024).await);
        assert_eq!(budget.available(), 1 << 20, "over 1/16 of the budget");
        let small = window.take(64 * 1024).await;
        assert_eq!(budget.available(), (1 << 20) - 64 * 1024);
        drop(small);
    }

    #[tokio::test]
    async fn one_budget_bounds_every_window_sharing_it() {
        let metrics = Metrics::new();
        let budget = Budget::new(64 * 1024, Buffers::DiskRead, metrics.clone());
        let first = Window::with_budget(8, budget.clone());
        let second = Window::with_budget(8, budget.clone());
        let a = first.take(32 * 1024).await;
        let b = second.take(32 * 1024).await;
        assert_eq!(budget.available(), 0);
        assert!(
            waits(second.take(1024)),
            "a free slot still waits for budget"
        );
        drop((a, first));
        let c = second.take(32 * 1024).await;
        assert_eq!(metrics.disk_read_buffered.get(), 64 * 1024);
        drop((b, c, second));
        assert_eq!(metrics.disk_read_buffered.get(), 0);
        assert_eq!(budget.available(), 64 * 1024);
    }

    #[tokio::test]
    async fn the_fair_share_divides_the_budget_among_open_windows() {
        let budget = Budget::new(64 << 20, Buffers::DiskRead, Metrics::new());
        assert_eq!(
            budget.fair_share(4),
            16 << 20,
            "no window yet counts as one"
        );
        let windows: Vec<Window> = (0..8)
            .map(|_| Window::with_budget(4, budget.clone()))
            .collect();
        assert_eq!(budget.fair_share(4), 2 << 20);
        drop(windows);
        assert_eq!(budget.fair_share(4), 16 << 20);
    }

    #[tokio::test]
    async fn a_finished_transfers_buffer_serves_the_next_without_a_new_allocation() {
        let metrics = Metrics::new();
        let budget = Budget::new(1 << 20, Buffers::DiskRead, metrics.clone());
        let first = Window::with_budget(1, budget.clone());
        let mut slot = first.take(4096).await;
        let pointer = slot.buffer().as_ptr();
        drop(first);
        drop(slot);
        assert_eq!(
            metrics.disk_read_buffered.get(),
            4096,
            "kept, and still counted"
        );
        let second = Window::with_budget(1, budget.clone());
        let mut again = second.take(4096).await;
        assert_eq!(again.buffer().as_ptr(), pointer, "the kept allocation");
        assert_eq!(metrics.disk_read_buffered.get(), 4096);
        drop((again, second));
        let big = Window::with_budget(1, budget.clone());
        drop(big.take(512 * 1024).await);
        drop(big);
        assert_eq!(
            metrics.disk_read_buffered.get(),
            4096,
            "spares stay under 1/16 of the budget: the big one was freed"
        );
    }

    #[tokio::test]
    async fn spares_are_given_back_to_a_reservation_that_would_wait() {
        let metrics = Metrics::new();
        let budget = Budget::new(64 * 1024, Buffers::ParallelGet, metrics.clone());
        for len in [1, 10, 100] {
            let window = Window::with_budget(1, budget.clone());
            drop(window.take(len).await);
        }
        assert!(
            budget.available() < 64 * 1024,
            "small buffers kept as spares"
        );
        let whole = Window::with_budget(1, budget.clone());
        let all = whole.take(64 * 1024).await;
        assert_eq!(budget.available(), 0, "the whole budget, spares given back");
        assert_eq!(metrics.parallel_get_buffered.get(), 64 * 1024);
        drop((all, whole));
    }

    #[tokio::test]
    async fn a_slot_larger_than_the_budget_takes_all_of_it() {
        let budget = Budget::new(4096, Buffers::ParallelGet, Metrics::new());
        let window = Window::with_budget(2, budget.clone());
        let big = window.take(1 << 20).await;
        assert_eq!(budget.available(), 0);
        drop((big, window));
        assert_eq!(budget.available(), 4096);
    }
}
