//! Property tests of the parsers that read what workspace admins, runners and registries control (no test
//! bed): none of them panics on any input, and each keeps its promise — normalisation is stable, secrets
//! never come back out, paths stay under the root. A short run here (proptest's default 256 cases each);
//! `PROPTEST_CASES=100000 cargo test --test properties` for a long one.

use std::path::Path;

use base64::Engine;
use proptest::prelude::*;

use runner_warden::config::{Overrides, Settings};
use runner_warden::contract::passwd;
use runner_warden::contract::{audit, ImageFacts, Outcome, Policy};
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

/// A reference model of how containerd maps a name through /etc/passwd (moby/sys/user's
/// `ParsePasswdFilter` + `strconv.Atoi` + `uint32`), written from the Go rules on `str` and independently
/// of the library's parser: `None` when containerd cannot read the file, `Some(None)` when no line names
/// the user, else the uid it runs with.
fn containerd_uid(passwd: &str, name: &str) -> Option<Option<u32>> {
    // bufio.Scanner's 64 KiB token: a longer line fails the whole file.
    if passwd.split('\n').any(|l| l.len() >= 64 * 1024) {
        return None;
    }
    // str::trim is Unicode White_Space, which is Go's unicode.IsSpace (bytes.TrimSpace).
    let first = passwd
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == name);
    Some(first.map(|f| go_atoi(f.get(2).copied().unwrap_or("")) as u32))
}

/// Go's `strconv.Atoi` value with its error ignored (64-bit `int`): digits after an optional sign; an
/// overflow of the digits read so far wins over a later stray byte; out of range is the nearest bound.
fn go_atoi(s: &str) -> i64 {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let digits = &body[..body
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(body.len())];
    let significant = digits.trim_start_matches('0');
    let over_u64 =
        significant.len() > 20 || (significant.len() == 20 && significant > "18446744073709551615");
    if over_u64 {
        return if neg { i64::MIN } else { i64::MAX };
    }
    if digits.is_empty() || digits.len() != body.len() {
        return 0;
    }
    let n: i128 = significant.parse().unwrap_or(0);
    (if neg { -n } else { n }).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn passwd_line() -> impl Strategy<Value = String> {
    (
        "( |\t|\u{a0}|\u{2003}|\u{85})?",
        "(runner|root|runner |#runner|Runner|)",
        "(:x)?",
        "(:([+-]?[0-9]{0,21}[x ]?|4294967296|-4294967296|4294968297|18446744073709551616|9223372036854775808))?",
        "(:[0-9]{0,3})?",
        "(::/app:/bin/sh)?",
        "( |\r|\u{3000})?",
    )
        .prop_map(|(a, b, c, d, e, f, g)| format!("{a}{b}{c}{d}{e}{f}{g}"))
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
    #[test]
    fn passwd_parser_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), name in "[a-z#: ]{0,8}") {
        let _ = passwd::parse(&bytes);
        let _ = passwd::by_name(&bytes, &name);
        let _ = passwd::atoi(&bytes);
        let facts = ImageFacts { user: name, passwd: Some(bytes), ..Default::default() };
        let _ = audit(&facts, &Policy::default());
    }

    #[test]
    fn passwd_lookup_agrees_with_containerd_model(lines in proptest::collection::vec(passwd_line(), 0..6), crlf in any::<bool>()) {
        let text = lines.join(if crlf { "\r\n" } else { "\n" });
        let got = passwd::by_name(text.as_bytes(), "runner").ok().map(|e| e.map(|e| e.runtime_uid()));
        let want = containerd_uid(&text, "runner");
        prop_assert_eq!(got, want, "{:?}", text);
        // Root after narrowing is root: the audit says so.
        if want == Some(Some(0)) {
            let facts = ImageFacts { user: "runner".into(), passwd: Some(text.into_bytes()), ..Default::default() };
            let r = audit(&facts, &Policy::default());
            prop_assert!(r.iter().any(|r| r.check == "non-root-user" && r.outcome == Outcome::Violation));
        }
    }

    #[test]
    fn go_atoi_model_and_library_agree(s in "[+-]?[0-9]{0,22}[x0-9]?") {
        prop_assert_eq!(passwd::atoi(s.as_bytes()).unwrap_or_else(|v| v), go_atoi(&s), "{:?}", s);
    }
}
