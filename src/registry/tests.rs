//! Loopback tests: a tiny registry and token server played in-process.
