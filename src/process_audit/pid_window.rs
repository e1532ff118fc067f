//! Which of a container's processes one scan reads, in memory that does not grow with the container:
//! at most `cap` pids, chosen in one pass over the listing. A container within the cap is read whole; one
//! over it is read a window at a time, each scan starting after the highest pid the last one read and
//! wrapping round, so every process is still read every ⌈n / cap⌉ scans.

use std::collections::BinaryHeap;

/// The pids one scan reads (ascending), how many the listing had, and where the next scan starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picked {
    pub pids: Vec<u32>,
    /// Every pid offered, read or not.
    pub total: usize,
    /// The next scan reads pids above this one first (0: from the lowest).
    pub cursor: u32,
}

impl Picked {
    /// Processes listed but not read this time.
    pub fn unread(&self) -> usize {
        self.total - self.pids.len()
    }
}

/// Keeps the lowest `cap` pids above `cursor` and, for the wrap, the lowest `cap` at or below it: two
/// max-heaps of at most `cap` each, whatever the number offered.
pub struct PidWindow {
    cap: usize,
    cursor: u32,
    after: BinaryHeap<u32>,
    before: BinaryHeap<u32>,
    total: usize,
}

impl PidWindow {
    pub fn new(cap: usize, cursor: u32) -> Self {
        Self {
            cap: cap.max(1),
            cursor,
            after: BinaryHeap::new(),
            before: BinaryHeap::new(),
            total: 0,
        }
    }

    pub fn offer(&mut self, pid: u32) {
        self.total += 1;
        let heap = if pid > self.cursor {
            &mut self.after
        } else {
            &mut self.before
        };
        if heap.len() < self.cap {
            heap.push(pid);
        } else if let Some(mut highest) = heap.peek_mut() {
            if pid < *highest {
                *highest = pid;
            }
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn finish(self) -> Picked {
        let mut pids = self.after.into_sorted_vec();
        if self.total <= self.cap {
            pids.extend(self.before.into_sorted_vec());
            pids.sort_unstable();
            return Picked {
                pids,
                total: self.total,
                cursor: 0,
            };
        }
        let cursor = if pids.len() < self.cap {
            // Fewer than a window above the cursor: wrap round to the lowest pids.
            let mut low = self.before.into_sorted_vec();
            low.truncate(self.cap - pids.len());
            let cursor = low.last().copied().unwrap_or(0);
            pids.extend(low);
            pids.sort_unstable();
            cursor
        } else {
            pids.last().copied().unwrap_or(0)
        };
        Picked {
            pids,
            total: self.total,
            cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(cap: usize, cursor: u32, pids: &[u32]) -> Picked {
        let mut w = PidWindow::new(cap, cursor);
        for p in pids {
            w.offer(*p);
        }
        w.finish()
    }

    #[test]
    fn a_wrap_fills_the_window_exactly_from_the_lowest_pids() {
        // One pid above the cursor: three more from the bottom make the window of four, no more.
        let p = pick(4, 60, &[70, 10, 20, 30, 40, 50, 60]);
        assert_eq!(p.pids, [10, 20, 30, 70]);
        assert_eq!((p.total, p.unread(), p.cursor), (7, 3, 30));
        // Three above: one from the bottom.
        let p = pick(4, 40, &[50, 60, 70, 10, 20, 30, 40]);
        assert_eq!(p.pids, [10, 50, 60, 70]);
        assert_eq!(p.cursor, 10);
    }

    #[test]
    fn within_the_cap_everything_is_read_in_pid_order() {
        let p = pick(4, 0, &[30, 10, 20]);
        assert_eq!((p.pids, p.total, p.cursor), (vec![10, 20, 30], 3, 0));
        // A cursor left by an earlier, bigger listing does not hide anything once under the cap.
        let p = pick(4, 20, &[30, 10, 20]);
        assert_eq!(
            (p.pids.as_slice(), p.unread(), p.cursor),
            (&[10, 20, 30][..], 0, 0)
        );
    }

    #[test]
    fn over_the_cap_successive_windows_read_every_process_and_wrap() {
        let all: Vec<u32> = (1..=10).rev().map(|p| p * 10).collect(); // listed in any order
        let mut cursor = 0;
        let mut windows = Vec::new();
        for _ in 0..4 {
            let p = pick(4, cursor, &all);
            assert_eq!((p.total, p.unread()), (10, 6));
            cursor = p.cursor;
            windows.push(p.pids);
        }
        assert_eq!(
            windows,
            [
                vec![10, 20, 30, 40],
                vec![50, 60, 70, 80],
                vec![10, 20, 90, 100], // the wrap: the last two, then the lowest
                vec![30, 40, 50, 60],
            ]
        );
    }

    #[test]
    fn memory_is_two_windows_whatever_is_offered() {
        let mut w = PidWindow::new(16, 500_000);
        for pid in 1..=1_000_000u32 {
            w.offer(pid);
        }
        assert!(w.after.len() <= 16 && w.before.len() <= 16);
        assert!(w.after.capacity() < 64 && w.before.capacity() < 64);
        let p = w.finish();
        assert_eq!((p.pids.len(), p.total), (16, 1_000_000));
        assert_eq!(p.pids, (500_001..=500_016).collect::<Vec<_>>());
        assert_eq!(p.cursor, 500_016);
    }
}
