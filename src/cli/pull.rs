//! `runner-warden pull`: prewarm one image now. Exit status 0 present, 1 pull failed, 2 bad arguments or
//! containerd unreachable.

use std::path::Path;
use std::sync::Arc;

use runner_warden::credential_providers::{self, CredentialProviders, ProvidersSettings};
use std::process::ExitCode;

use runner_warden::prewarm::oneshot::{self, GaveUp, Pulled};
use runner_warden::prewarm::{PrewarmSettings, PullOutcome};
use runner_warden::reference::ImageRef;
use runner_warden::runtime::errors::FailureClass;

use super::{fail, PullArgs};

pub async fn run(args: PullArgs) -> anyhow::Result<ExitCode> {
    let doc = |class: Option<&str>| serde_json::json!({ "image": &args.image, "class": class });
    let image = match ImageRef::parse(&args.image) {
        Ok(i) => i,
        Err(e) => return Ok(fail(&args.output, &e.to_string(), doc(None))),
    };
    if let Some(s) = &args.secret {
        if !Path::new(s).is_file() {
            let message = format!(
                "pull secret {} does not exist or is not a file",
                s.display()
            );
            return Ok(fail(&args.output, &message, doc(None)));
        }
    }
    let providers = match (
        &args.credential_provider_config,
        &args.credential_provider_bin_dir,
    ) {
        (Some(config), Some(bin_dir)) => {
            match credential_providers::config::read(config, bin_dir) {
                Ok(providers) => Some(Arc::new(CredentialProviders::new(&ProvidersSettings {
                    config: config.clone(),
                    bin_dir: bin_dir.clone(),
                    timeout: runner_warden::config::DEFAULT_PROVIDER_TIMEOUT,
                    providers,
                }))),
                Err(problems) => return Ok(fail(&args.output, &problems.join("; "), doc(None))),
            }
        }
        _ => None,
    };
    let settings = PrewarmSettings {
        concurrency: 1,
        stall_timeout: args.stall_timeout,
        pin: !args.no_pin,
        ..PrewarmSettings::default()
    };
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(None);
    let drawer = tokio::spawn(super::progress::draw(progress_rx));
    let result = oneshot::pull(
        args.containerd.runtime(),
        &image,
        args.secret.clone(),
        settings,
        args.force,
        args.attempts,
        oneshot::PullHelp {
            progress: Some(progress_tx),
            providers,
        },
    )
    .await;
    let _ = drawer.await; // the sender went with the pull: the bar is cleared
    match result {
        Ok(Pulled { outcome, pinned }) => {
            let id = outcome.image_id();
            let (what, seconds) = match &outcome {
                PullOutcome::Present { .. } => ("present", None),
                PullOutcome::Pulled { seconds, .. } => ("pulled", Some(*seconds)),
            };
            if args.output.json() {
                let doc = serde_json::json!({
                    "image": image.as_str(),
                    "outcome": what,
                    "image_id": id,
                    "seconds": seconds,
                    "pinned": pinned,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(ExitCode::SUCCESS);
            }
            let pin_text = match pinned {
                None => "not pinned (--no-pin)",
                Some(true) => "pinned",
                Some(false) => "NOT pinned: the runtime ignores pins (containerd < 1.7)",
            };
            match seconds {
                None => println!("present {image} {id} (already present; {pin_text})"),
                Some(s) => println!("pulled {image} {id} in {s:.1}s ({pin_text})"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(GaveUp { failure: f, .. }) if f.class == FailureClass::Runtime => {
            Ok(fail(&args.output, &f.message, doc(Some(f.class.as_str()))))
        }
        Err(GaveUp {
            failure: f,
            attempts,
        }) => {
            let message = format!(
                "pull failed [{}] after {attempts} attempt(s): {} — {}",
                f.class,
                f.message,
                f.class.advice()
            );
            let _ = fail(&args.output, &message, doc(Some(f.class.as_str())));
            Ok(ExitCode::from(1))
        }
    }
}
