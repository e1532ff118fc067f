//! The prewarmer's nouns: each image's state, how present content arrived, whether it is pinned (its
//! events are `outcome::prewarm::PrewarmEvent`).

/// Where a desired image is in its life on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageState {
    /// Waiting for a pull slot, for containerd to answer, or for its next check.
    Waiting,
    Pulling,
    Ready,
    /// The last attempt failed; it is retried after a backoff.
    Failed,
    /// Not held: over the node's caps.
    OverCap,
}

impl ImageState {
    /// Every state, in the order `prewarm_images{state}` lists them.
    pub const ALL: [ImageState; 5] = [
        ImageState::Waiting,
        ImageState::Pulling,
        ImageState::Ready,
        ImageState::Failed,
        ImageState::OverCap,
    ];

    /// The metric's `state` label and what `status` shows.
    pub fn label(self) -> &'static str {
        match self {
            ImageState::Waiting => "waiting",
            ImageState::Pulling => "pulling",
            ImageState::Ready => "ready",
            ImageState::Failed => "failed",
            ImageState::OverCap => "over_cap",
        }
    }
}

/// How a present image came to be there, for the "prewarmed" news.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrival {
    AlreadyPresent,
    Pulled { seconds: f64 },
}

impl Arrival {
    pub fn describe(self) -> String {
        match self {
            Arrival::AlreadyPresent => "already present".to_string(),
            Arrival::Pulled { seconds } => format!("pulled in {seconds:.1}s"),
        }
    }
}

/// Whether a present image is safe from kubelet's GC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinState {
    Pinned,
    /// Pinned, but the runtime does not honour pins (containerd < 1.7).
    Ignored,
    Disabled,
}

impl PinState {
    /// As `status` shows it.
    pub fn label(self) -> &'static str {
        match self {
            PinState::Pinned => "pinned",
            PinState::Ignored => "not_honoured",
            PinState::Disabled => "disabled",
        }
    }
}
