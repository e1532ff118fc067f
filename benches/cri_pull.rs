//! The runtime's own ceiling for `scripts/bench-prewarm` (BENCHMARKS.md): every image named on the command
//! line pulled at once by raw CRI `PullImage` calls with the test bed's credential — no status call, no
//! progress probe, no pins, no audit: what kubelet with `serializeImagePulls: false` asks of containerd.
//! Prints the wall time in milliseconds; exits non-zero if any pull fails. Run by `scripts/bench-prewarm`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::Bed;
use runner_warden::runtime::Runtime;

fn main() {
    let images: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    assert!(!images.is_empty(), "usage: cri_pull IMAGE...");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let ms = rt.block_on(async {
        let bed = Bed::get();
        let runtime = Runtime::new(&bed.socket, "k8s.io");
        let cred = bed.credential();
        let t0 = Instant::now();
        let pulls = images.iter().map(|image| {
            let (runtime, cred) = (runtime.clone(), &cred);
            async move {
                runtime
                    .pull_image(image, Some(cred))
                    .await
                    .unwrap_or_else(|s| panic!("raw CRI pull of {image} failed: {}", s.message()))
            }
        });
        futures::future::join_all(pulls).await;
        t0.elapsed().as_millis()
    });
    println!("{ms}");
}
