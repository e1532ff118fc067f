//! What the jobs tell their consumers, as data: each job emits typed events (state changes and outcomes,
//! their classes as enums) and knows nothing of metrics, the status board, Events or the findings file;
//! `report/` turns each event into those. This module imports no job and no consumer, so both sides can
//! import it (`report/` never imports a job).

pub mod audit;
pub mod prewarm;
pub mod runtime;
pub mod shutdown;

use std::sync::Arc;

/// Where a job sends its events: called by the job, in order, as each happens. A consumer that must not
/// hold the job up hands the event on rather than blocking.
pub type Emit<E> = Arc<dyn Fn(E) + Send + Sync>;
