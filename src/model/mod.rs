//! The nouns the jobs and the reporters share: what the node should hold (`DesiredImage`, its projects
//! and pull secrets), the caps on it, an image's prewarm state, arrival and pin, a pull's failure class.
//! A bottom module (the jobs' events, in `outcome`, are built from these):
//! it imports nothing from the jobs (`prewarm`, `image_audit`, `process_audit`, `shutdown`, `sources`) nor
//! from `report`, so every one of them can import it without an import circle.

mod caps;
mod desired;
mod failure;
mod prewarm;

pub use caps::{Caps, OverCap};
pub use desired::{ClusterSecret, DesiredImage, Projects, SecretRef};
pub use failure::{Failure, FailureClass};
pub use prewarm::{Arrival, ImageState, PinState};
