//! Project problems are said once: a problem found again at the next reconcile is not news; one that
//! went away may be said again if it comes back. Pure.

use std::collections::HashSet;

type Key = (String, &'static str, String);

/// The problems said in the last round and the ones found in this one.
#[derive(Default)]
pub struct ProblemMemory {
    last: HashSet<Key>,
    this: HashSet<Key>,
}

impl ProblemMemory {
    /// `true` when (`namespace`, `reason`, `message`) was not found in the last round nor yet in this one:
    /// say it.
    pub fn is_news(&mut self, namespace: &str, reason: &'static str, message: &str) -> bool {
        let key = (namespace.to_string(), reason, message.to_string());
        let news = !self.last.contains(&key) && !self.this.contains(&key);
        self.this.insert(key);
        news
    }

    /// The round is over: what it found is what the next one compares with.
    pub fn end_round(&mut self) {
        self.last = std::mem::take(&mut self.this);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_said_once_while_it_lasts_and_again_when_it_returns() {
        let mut m = ProblemMemory::default();
        assert!(m.is_news("a", "R", "broken"));
        assert!(!m.is_news("a", "R", "broken"), "twice in one round");
        assert!(m.is_news("b", "R", "broken"), "another project");
        assert!(m.is_news("a", "R", "other text"), "another text");
        m.end_round();
        assert!(!m.is_news("a", "R", "broken"), "still there");
        m.end_round();
        m.end_round(); // a round without it: it went away
        assert!(m.is_news("a", "R", "broken"), "back again");
    }
}
