//! `runner-warden pull`: prewarm one image now. Exit status 0 present, 1 pull failed, 2 bad arguments or
//! containerd unreachable.

use std::path::Path;
use std::process::ExitCode;

use runner_warden::prewarm::oneshot::{self, GaveUp, Pulled};
use runner_warden::prewarm::{PrewarmSettings, PullOutcome};
use runner_warden::reference::ImageRef;
use runner_warden::runtime::errors::FailureClass;

use super::{exit_unusable, PullArgs};

pub async fn run(args: PullArgs) -> anyhow::Result<ExitCode> {
    let image = match ImageRef::parse(&args.image) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("runner-warden: {e}");
            return Ok(exit_unusable());
        }
    };
    if let Some(s) = &args.secret {
        if !Path::new(s).is_file() {
            eprintln!(
                "runner-warden: pull secret {} does not exist or is not a file",
                s.display()
            );
            return Ok(exit_unusable());
        }
    }
    let settings = PrewarmSettings {
        concurrency: 1,
        stall_timeout: args.stall_timeout,
        pin: !args.no_pin,
        ..PrewarmSettings::default()
    };
    let result = oneshot::pull(
        args.containerd.runtime(),
        &image,
        args.secret.clone(),
        settings,
        args.force,
        args.attempts,
    )
    .await;
    match result {
        Ok(Pulled { outcome, pinned }) => {
            let pin_text = match pinned {
                None => "not pinned (--no-pin)",
                Some(true) => "pinned",
                Some(false) => "NOT pinned: the runtime ignores pins (containerd < 1.7)",
            };
            let id = outcome.image_id();
            match outcome {
                PullOutcome::Present { .. } => {
                    println!("present {image} {id} (already present; {pin_text})")
                }
                PullOutcome::Pulled { seconds, .. } => {
                    println!("pulled {image} {id} in {seconds:.1}s ({pin_text})")
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(GaveUp { failure: f, .. }) if f.class == FailureClass::Runtime => {
            eprintln!("runner-warden: {}", f.message);
            Ok(exit_unusable())
        }
        Err(GaveUp {
            failure: f,
            attempts,
        }) => {
            eprintln!(
                "runner-warden: pull failed [{}] after {attempts} attempt(s): {} — {}",
                f.class,
                f.message,
                f.class.advice()
            );
            Ok(ExitCode::from(1))
        }
    }
}
