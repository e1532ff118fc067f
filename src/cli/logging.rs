//! The log filter an operator asks for, checked before anything runs: a misspelt level is an error, not
//! silence (tracing reads a bare unknown word as a target and turns everything else off).

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// kube-client logs every failed request at ERROR without saying which; the agent's own line for the
/// same failure names the call and the API server (`ApiHealth`), so this one is off under bare levels.
const DUPLICATES_OFF: &str = "kube_client::client::builder=off";

/// `--log-level` / `RUNNER_WARDEN_LOG` → a tracing filter. A bare level applies to runner-warden; the
/// libraries (kube, tonic, hyper, …) stay at `warn` unless a directive names them. Full filter syntax
/// (`runner_warden=debug,kube=info`) is accepted as written once every directive checks out.
pub fn log_filter(spec: &str) -> Result<String, String> {
    let spec = spec.trim();
    let bad = || {
        format!(
            "{spec:?} is neither a level ({}) nor a filter such as \"runner_warden=debug,kube=info\"",
            LEVELS.join(", ")
        )
    };
    if spec.is_empty() {
        return Err(bad());
    }
    let lower = spec.to_ascii_lowercase();
    if LEVELS.contains(&lower.as_str()) {
        return Ok(match lower.as_str() {
            "off" => lower,
            "info" | "debug" | "trace" => format!("warn,{DUPLICATES_OFF},runner_warden={lower}"),
            _ => format!("{lower},{DUPLICATES_OFF}"),
        });
    }
    for directive in spec.split(',') {
        let d = directive.trim();
        let level_ok = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
        let ok = match d.rsplit_once('=') {
            Some((target, level)) => !target.is_empty() && level_ok(level),
            None => level_ok(d),
        };
        if !ok {
            return Err(bad());
        }
    }
    tracing_subscriber::EnvFilter::try_new(spec).map_err(|_| bad())?;
    Ok(spec.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_levels_apply_to_the_agent_and_keep_libraries_quiet() {
        let quiet = DUPLICATES_OFF;
        assert_eq!(
            log_filter("info").unwrap(),
            format!("warn,{quiet},runner_warden=info")
        );
        assert_eq!(
            log_filter("DEBUG").unwrap(),
            format!("warn,{quiet},runner_warden=debug")
        );
        assert_eq!(log_filter("warn").unwrap(), format!("warn,{quiet}"));
        assert_eq!(log_filter("off").unwrap(), "off");
    }

    #[test]
    fn directives_pass_through_when_every_one_checks_out() {
        assert_eq!(
            log_filter("runner_warden=debug,kube=info").unwrap(),
            "runner_warden=debug,kube=info"
        );
        assert_eq!(log_filter("warn,tonic=debug").unwrap(), "warn,tonic=debug");
    }

    #[test]
    fn a_misspelt_level_is_an_error_not_silence() {
        for bad in [
            "debgu",
            "",
            "  ",
            "runner_warden=loud",
            "info,debgu",
            "=debug",
        ] {
            let e = log_filter(bad).unwrap_err();
            assert!(e.contains("neither a level"), "{bad:?}: {e}");
        }
    }
}
