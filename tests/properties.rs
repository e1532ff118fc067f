//! Property tests of the parsers that read what workspace admins, runners and registries control (no test
//! bed): none of them panics on any input, and each keeps its promise — normalisation is stable, secrets
//! never come back out, paths stay under the root. A short run here (proptest's default 256 cases each);
//! `PROPTEST_CASES=100000 cargo test --test properties` for a long one.

use std::path::Path;

use base64::Engine;
use proptest::prelude::*;

use runner_warden::config::{Overrides, Settings};
use runner_warden::credentials::Keyring;
use runner_warden::image_audit::layers::{classify, clean, Change};
use runner_warden::process_audit::proc_connector::parse as parse_netlink;
use runner_warden::process_audit::proc_status::parse_status;
use runner_warden::reference::ImageRef;
use runner_warden::runtime::errors::redact;

/// Strings near the grammar: registry-ish characters plus a few that are not.
fn reference_like() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9./:@_\\-\\[\\]é]{0,80}").unwrap()
}

proptest! {
    #[test]
    fn image_references_parse_without_panic_and_normalise_stably(s in reference_like()) {
        if let Ok(r) = ImageRef::parse(&s) {
            let again = ImageRef::parse(r.as_str()).expect("a normalised reference parses");
            prop_assert_eq!(again.as_str(), r.as_str());
        }
    }

    #[test]
    fn any_bytes_as_a_pull_secret_are_an_error_or_a_keyring_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(k) = Keyring::parse(&bytes) {
            let _ = k.lookup("r.io/team/runner");
        }
    }

    #[test]
    fn a_secret_never_comes_back_out_of_its_parse_error(
        host in "[a-z]{1,10}\\.io",
        user in "[a-z]{1,8}",
        password in "[A-Za-z0-9!#%]{6,24}",
        cut in 0usize..200,
    ) {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let json = format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}","password":"{password}"}}}}}}"#);
        // Every prefix is a malformed secret; none may quote the password in its error.
        let broken = &json.as_bytes()[..cut.min(json.len())];
        if let Err(e) = Keyring::parse(broken) {
            prop_assert!(!e.to_string().contains(&password), "{e}");
        }
    }

    #[test]
    fn redaction_removes_every_secret_given_and_never_panics(
        text in "\\PC{0,120}",
        secret in "[A-Za-z0-9]{3,16}",
        at in 0usize..120,
    ) {
        let mut t: Vec<char> = text.chars().collect();
        let at = at.min(t.len());
        t.splice(at..at, secret.chars());
        let text: String = t.into_iter().collect();
        let out = redact(&text, &[&secret]);
        prop_assert!(!out.contains(&secret), "{out}");
    }

    #[test]
    fn cleaned_tar_paths_stay_under_the_root(raw in "[a-z./]{0,40}") {
        let p = clean(&raw);
        prop_assert!(p.starts_with('/'));
        prop_assert!(!p.contains("//") && !p.split('/').any(|c| c == ".." || c == "."), "{p}");
        prop_assert_eq!(clean(&p), p.clone(), "cleaning is idempotent");
        match classify(&raw) {
            Change::Add(q) | Change::Whiteout(q) | Change::Opaque(q) => prop_assert!(q.starts_with('/')),
        }
    }

    #[test]
    fn proc_status_and_netlink_parsers_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_status(1, &bytes);
        let _ = parse_netlink(&bytes);
    }

    #[test]
    fn any_config_text_is_settings_or_problems_never_a_panic(text in "\\PC{0,300}") {
        let _ = Settings::parse(&text, Path::new("/nonexistent"), &Overrides::default());
    }

    #[test]
    fn config_near_its_grammar_reports_problems_never_panics(
        key in "(socket|concurrency|image|pull_secret|interval|metrics_address|stall_timeout)",
        value in "(\"[a-z0-9:/._ -]{0,20}\"|[0-9]{1,12}|true|\\[\\]|-1)",
        section in "(containerd|prewarm|report|runtime_audit|shutdown|kubernetes|\\[images\\])",
    ) {
        let text = format!("[{section}]\n{key} = {value}\n");
        let _ = Settings::parse(&text, Path::new("/nonexistent"), &Overrides::default());
    }
}
