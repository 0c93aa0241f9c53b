//! A window of reusable chunk buffers for large transfers split into ranged requests.
//!
//! A request takes a slot before it is sent and the slot comes back only when the
//! consumer drops the chunk's bytes, so at most `slots` chunks are in memory however
//! slow the consumer is. Each buffer is allocated once and reused: a 1 GiB transfer
//! does not fault in 1 GiB of fresh pages.

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};

use crate::metrics::Metrics;

/// The slots of one transfer.
#[derive(Debug)]
pub struct Window {
    free: Mutex<mpsc::Receiver<Vec<u8>>>,
    returns: mpsc::Sender<Vec<u8>>,
}

impl Window {
    pub fn new(slots: usize) -> Window {
        let slots = slots.max(1);
        let (returns, free) = mpsc::channel(slots);
        for _ in 0..slots {
            // Capacity is reserved on first use: a small object never allocates a whole chunk.
            let _ = returns.try_send(Vec::new());
        }
        Window {
            free: Mutex::new(free),
            returns,
        }
    }

    /// Waits for a free slot and makes room in it for `len` bytes; `gauge` counts them
    /// in the parallel-GET buffered-bytes metric while the slot is held.
    pub async fn take(&self, len: u64, gauge: Option<Metrics>) -> Slot {
        // The window keeps a sender, so the channel never closes while waiting here.
        let mut data = self.free.lock().await.recv().await.unwrap_or_default();
        data.clear();
        data.reserve_exact(usize::try_from(len).unwrap_or(usize::MAX));
        let reserved = i64::try_from(len).unwrap_or(i64::MAX);
        if let Some(metrics) = &gauge {
            metrics.add_buffered(reserved);
        }
        Slot {
            data,
            reserved,
            gauge,
            returns: self.returns.clone(),
        }
    }
}

/// One chunk's buffer, returned to its window when dropped.
#[derive(Debug)]
pub struct Slot {
    data: Vec<u8>,
    reserved: i64,
    gauge: Option<Metrics>,
    returns: mpsc::Sender<Vec<u8>>,
}

impl Slot {
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
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
        if let Some(metrics) = &self.gauge {
            metrics.add_buffered(-self.reserved);
        }
        // Fails only when the transfer is over and its window gone: then the buffer is freed.
        let _ = self.returns.try_send(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_are_reused_and_bounded() {
        let window = Window::new(2);
        let mut first = window.take(1024, None).await;
        first.buffer().extend_from_slice(&[1; 1024]);
        let pointer = first.buffer().as_ptr();
        let second = window.take(1024, None).await;
        // A third take waits until a slot comes back.
        let third =
            tokio::time::timeout(std::time::Duration::from_millis(50), window.take(1, None));
        assert!(third.await.is_err(), "only two slots");
        drop(first.into_bytes());
        let mut again = window.take(512, None).await;
        assert!(again.is_empty(), "a reused buffer starts empty");
        assert_eq!(
            again.buffer().as_ptr(),
            pointer,
            "the same allocation comes back"
        );
        drop(second);
    }

    #[tokio::test]
    async fn the_gauge_counts_held_slots() {
        let metrics = Metrics::new();
        let window = Window::new(4);
        let slot = window.take(100, Some(metrics.clone())).await;
        let bytes = slot.into_bytes();
        assert_eq!(metrics.parallel_get_buffered.get(), 100);
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(
            metrics.parallel_get_buffered.get(),
            100,
            "a clone still holds it"
        );
        drop(clone);
        assert_eq!(metrics.parallel_get_buffered.get(), 0);
        assert_eq!(metrics.buffered_high_water(), 100);
    }
}
