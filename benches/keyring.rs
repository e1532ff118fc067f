//! Keyring matching under a hostile pull secret (BENCHMARKS.md): a key whose host label is `*a*a*…*b`
//! against an image whose label is 63 `a`s — the worst case of glob matching, which a recursive matcher
//! pays in 2^31 steps — against a benign key of the same length, in the same run. Fails loudly if a lookup
//! matches what it must not or the hostile case costs more than 100× the benign one.

use std::time::Instant;

use base64::Engine;
use runner_warden::credentials::Keyring;

fn keyring(key: &str) -> Keyring {
    let auth = base64::engine::general_purpose::STANDARD.encode("user:password");
    let json = serde_json::json!({ "auths": { key: { "auth": auth } } }).to_string();
    Keyring::parse(json.as_bytes()).expect("the secret parses")
}

/// Median nanoseconds per lookup over `rounds` rounds of `n` lookups.
fn time(ring: &Keyring, image: &str, rounds: usize, n: usize) -> f64 {
    let mut per = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n {
            assert!(
                ring.lookup(std::hint::black_box(image)).is_empty(),
                "must not match"
            );
        }
        per.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    per.sort_by(|a, b| a.partial_cmp(b).unwrap());
    per[per.len() / 2]
}

fn main() {
    let label = "a".repeat(63);
    let image = format!("{label}.example.com/team/runner:v1");
    let hostile = keyring(&format!("{}b.example.com", "*a".repeat(31)));
    let benign = keyring(&format!("{}b.example.com", "a".repeat(62)));
    let (rounds, n) = (7, 2_000);
    let base = time(&benign, &image, rounds, n);
    let worst = time(&hostile, &image, rounds, n);
    let ratio = worst / base;
    println!("keyring lookup, benign key of 63 chars: {:.0} ns", base);
    println!("keyring lookup, hostile glob *a*a…*b:   {:.0} ns", worst);
    println!("ratio hostile / benign: {ratio:.1}");
    assert!(
        ratio < 100.0,
        "the hostile glob costs {ratio:.0}× a benign key"
    );
}
