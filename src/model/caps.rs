//! The node's caps on what is prewarmed and pinned, and why an image is over them.

/// At most `images` images held, and pinned images taking at most `bytes` (unpacked size as CRI reports
/// it; `None`: no byte cap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub images: usize,
    pub bytes: Option<u64>,
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            images: 50,
            bytes: None,
        }
    }
}

/// Why an image is not held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverCap {
    /// `limit` images rank before it.
    Images { limit: usize },
    /// Holding it (`size` bytes) would take pinned images to more than `limit` bytes; the images ranked
    /// before it already take `held`.
    Bytes { limit: u64, size: u64, held: u64 },
}

impl OverCap {
    /// Every cap's label, in the order the metric lists them.
    pub const LABELS: [&'static str; 2] = ["images", "bytes"];

    /// The metric's `cap` label.
    pub fn label(self) -> &'static str {
        match self {
            OverCap::Images { .. } => "images",
            OverCap::Bytes { .. } => "bytes",
        }
    }
}
