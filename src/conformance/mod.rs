//! The conformance suite (`runner-warden conformance IMAGE`): the platform's promised pass/fail for an
//! image author's CI. This module is the pure part — checks as data, the verdict, and the judgements the
//! runtime checks make from what the node shows (file modes, `/proc/<pid>/environ`, `mountinfo`, HTTP
//! status codes) — plus the JUnit rendering. `run` drives containerd and the runner through the
//! shutdown probe's seams.

pub mod run;

use std::fmt;

use serde::Serialize;

use crate::contract::{self, CheckResult, Outcome};

/// The platform's three runner types (upstream `main.py` `BRIDGE_REGISTRY`), each checked by default.
pub const RUNNER_TYPES: [&str; 3] = ["claude-agent-sdk", "gemini-cli", "langgraph"];

/// Paths the runtime checks stat through `/proc/<pid>/root`.
pub const RUNTIME_PATHS: [&str; 4] = ["/workspace", "/app", "/app/ambient-runner", "/tmp"];
/// Of those, the ones the runner's user must be able to write.
pub const WRITABLE_PATHS: [&str; 3] = ["/workspace", "/app", "/tmp"];
/// The platform's read-only Secret mount (Vertex credentials).
pub const VERTEX_PATH: &str = "/app/vertex";

/// Header the runner checks against `AGUI_TOKEN` (upstream `app.py`).
pub const TOKEN_HEADER: &str = "X-Ambient-Session-Token";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    /// Not run: an earlier step it needs did not happen (the runner never got healthy, say).
    Skipped,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skipped => "skipped",
        })
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was seen and, when it fails, what to fix.
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

impl Check {
    pub fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            seconds: None,
        }
    }

    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Pass, detail)
    }

    pub fn fail(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Fail, detail)
    }

    pub fn skipped(name: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(name, Status::Skipped, why)
    }

    pub fn from_result(name: impl Into<String>, r: Result<String, String>) -> Self {
        match r {
            Ok(d) => Self::pass(name, d),
            Err(d) => Self::fail(name, d),
        }
    }

    pub fn with_seconds(mut self, s: f64) -> Self {
        self.seconds = Some(s);
        self
    }
}

/// The static audit's results as conformance lines (`image/<check>`); a violation fails.
pub fn static_checks(results: &[CheckResult]) -> Vec<Check> {
    results
        .iter()
        .map(|r| {
            let status = match r.outcome {
                Outcome::Pass => Status::Pass,
                Outcome::Warning => Status::Warn,
                Outcome::Violation => Status::Fail,
            };
            Check::new(format!("image/{}", r.check), status, r.detail.clone())
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

/// Fails when any check fails; warnings and skipped checks do not (a skipped check is always the
/// consequence of a failed one).
pub fn verdict(checks: &[Check]) -> Verdict {
    if checks.iter().any(|c| c.status == Status::Fail) {
        Verdict::Fail
    } else {
        Verdict::Pass
    }
}

/// Counts by status, in the order pass, warn, fail, skipped.
pub fn counts(checks: &[Check]) -> [usize; 4] {
    let n = |s| checks.iter().filter(|c| c.status == s).count();
    [
        n(Status::Pass),
        n(Status::Warn),
        n(Status::Fail),
        n(Status::Skipped),
    ]
}

/// The variables the platform injects, set to recognisable values. Every address is loopback: nothing
/// the image does with them may leave the machine (port 9 is discard, and nothing listens there).
pub fn marker_env(port: u16, runner_type: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = contract::INJECTED_ENV
        .iter()
        .map(|k| {
            let v = match *k {
                "SESSION_ID" => "rw-conformance-session".to_string(),
                "PROJECT_NAME" => "rw-conformance-project".into(),
                "WORKSPACE_PATH" => "/workspace".into(),
                "AGUI_PORT" => port.to_string(),
                "RUNNER_TYPE" => runner_type.into(),
                "BACKEND_API_URL" => "http://127.0.0.1:9".into(),
                "AMBIENT_GRPC_URL" => "127.0.0.1:9".into(),
                "AMBIENT_GRPC_USE_TLS" => "false".into(),
                "AMBIENT_CP_TOKEN_URL" => "http://127.0.0.1:9/token".into(),
                "AMBIENT_CP_TOKEN_PUBLIC_KEY" => "rw-conformance-public-key".into(),
                "INITIAL_PROMPT" => "rw-conformance-prompt".into(),
                // A resumed session: upstream then sends no initial prompt at start.
                "IS_RESUME" => "true".into(),
                "CREDENTIAL_IDS" => "rw-conformance-credential".into(),
                other => format!("rw-conformance-{}", other.to_ascii_lowercase()),
            };
            (k.to_string(), v)
        })
        .collect();
    // The legacy operator injects a session token; the runner then wants it on every route but /health.
    env.push(("AGUI_TOKEN".into(), "rw-conformance-token".into()));
    env
}

/// The runner process of a container: PID 1, or its first child when PID 1 is a shell wrapper that did
/// not `exec` (`children` is `/proc/<pid1>/task/<pid1>/children`).
pub fn runner_pid(pid1: u32, pid1_comm: &str, children: &str) -> u32 {
    if contract::shutdown::SHELLS.contains(&pid1_comm.trim()) {
        if let Some(child) = children.split_whitespace().find_map(|c| c.parse().ok()) {
            return child;
        }
    }
    pid1
}

/// One injected variable the runner process does not see as injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvMismatch {
    pub name: String,
    pub expected: String,
    /// `None`: unset in the process.
    pub found: Option<String>,
}

/// Compares the injected markers with a process's `/proc/<pid>/environ` (NUL-separated `K=V`; the
/// last assignment of a name wins, as getenv's first match would not — the kernel keeps one per name
/// in practice).
pub fn compare_environ(expected: &[(String, String)], environ: &[u8]) -> Vec<EnvMismatch> {
    let mut seen: std::collections::HashMap<&[u8], &[u8]> = std::collections::HashMap::new();
    for entry in environ.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        if let Some(eq) = entry.iter().position(|b| *b == b'=') {
            seen.entry(&entry[..eq]).or_insert(&entry[eq + 1..]);
        }
    }
    expected
        .iter()
        .filter_map(|(k, v)| {
            let found = seen.get(k.as_bytes()).copied();
            (found != Some(v.as_bytes())).then(|| EnvMismatch {
                name: k.clone(),
                expected: v.clone(),
                found: found.map(|f| String::from_utf8_lossy(f).into_owned()),
            })
        })
        .collect()
}

/// The `injected-env` line from the comparison.
pub fn env_check(pid: u32, mismatches: &[EnvMismatch]) -> Check {
    const NAME: &str = "injected-env";
    if mismatches.is_empty() {
        return Check::pass(
            NAME,
            format!("the runner process (pid {pid}) sees every injected variable as injected"),
        );
    }
    let what: Vec<String> = mismatches
        .iter()
        .map(|m| match &m.found {
            // The markers are not secrets, but what the image put there might be: name its length only.
            Some(f) => format!(
                "{} is overwritten ({} bytes instead of the injected {:?})",
                m.name,
                f.len(),
                m.expected
            ),
            None => format!("{} is unset", m.name),
        })
        .collect();
    Check::fail(
        NAME,
        format!(
            "{}: the entrypoint changes what the platform injects; do not assign or unset these in the entrypoint",
            what.join("; ")
        ),
    )
}

/// Mode bits and owner of a path, as `stat` gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub is_dir: bool,
}

/// Who the runner process is for permission checks: fs uid, fs gid and supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Can this process create files in this directory? Judged as the kernel does from the mode bits alone:
/// the owner class when the uid owns it, else the group class when its gid or a supplementary group
/// owns it, else other; a directory needs write and search. ACLs and capabilities are not considered
/// (a conformant runner has no capabilities; an ACL the image sets is not read here).
pub fn writable(m: &FileMode, who: &Credentials) -> bool {
    if !m.is_dir {
        return false;
    }
    let class = if m.uid == who.uid {
        (m.mode >> 6) & 0o7
    } else if m.gid == who.gid || who.groups.contains(&m.gid) {
        (m.mode >> 3) & 0o7
    } else {
        m.mode & 0o7
    };
    class & 0o3 == 0o3
}

/// What to tell an image author about a path the runner cannot write.
pub fn unwritable_text(path: &str, m: &FileMode, who: &Credentials) -> String {
    format!(
        "{path} (mode {:o}, owner {}:{}) is not writable by the runner (uid {}, gid {}, groups {:?}); `chown {}:0 {path} && chmod g+rwX {path}` in the Dockerfile",
        m.mode & 0o7777,
        m.uid,
        m.gid,
        who.uid,
        who.gid,
        who.groups,
        who.uid
    )
}

/// `Groups:` of `/proc/<pid>/status` (supplementary groups).
pub fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `path` is a mount point in `/proc/<pid>/mountinfo`, and read-only: `Some(true)` read-only,
/// `Some(false)` writable, `None` not a mount point. The last mount on a path is the visible one.
pub fn mount_read_only(mountinfo: &str, path: &str) -> Option<bool> {
    mountinfo.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let point = f.nth(4)?;
        let opts = f.next()?;
        (unescape_octal(point) == path).then(|| opts.split(',').any(|o| o == "ro"))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST /` with `{}`: a route that parses the body answers 2xx, 400, 401 (token required) or 422
/// (upstream's answer: `messages` missing). 404/405 mean no `POST /` route; 5xx a crash; no answer a
/// dead or hung runner. Other codes are odd but not proof of a missing route.
pub fn classify_run(status: Option<u16>) -> (Status, String) {
    match status {
        None => (
            Status::Fail,
            "POST / got no HTTP answer; the runner must serve the AG-UI run endpoint".into(),
        ),
        Some(s @ (200..=299 | 400 | 401 | 422)) => {
            (Status::Pass, format!("POST / {{}} answered {s}"))
        }
        Some(s @ (404 | 405)) => (
            Status::Fail,
            format!("POST / answered {s}: no AG-UI run route at `/`; serve POST / (upstream: ambient_runner.endpoints.run)"),
        ),
        Some(s @ 500..=599) => (
            Status::Fail,
            format!("POST / {{}} answered {s}: the runner crashed on a body it should reject with 422"),
        ),
        Some(s) => (
            Status::Warn,
            format!("POST / {{}} answered {s}; upstream's runner answers 422"),
        ),
    }
}

/// `GET /capabilities`: 200 with a JSON object; when `framework` is present it must name the runner
/// type the runner was started with.
pub fn classify_capabilities(answer: Option<(u16, &[u8])>, runner_type: &str) -> (Status, String) {
    let Some((status, body)) = answer else {
        return (Status::Fail, "GET /capabilities got no HTTP answer".into());
    };
    if status != 200 {
        let why = match status {
            401 => " (the runner wants a session token it was given: does the image read AGUI_TOKEN from somewhere else?)",
            404 => ": serve GET /capabilities (upstream: ambient_runner.endpoints.capabilities)",
            _ => "",
        };
        return (
            Status::Fail,
            format!("GET /capabilities answered {status}{why}"),
        );
    }
    let json: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                Status::Fail,
                format!("GET /capabilities answered 200 but not JSON ({e})"),
            )
        }
    };
    let Some(obj) = json.as_object() else {
        return (
            Status::Fail,
            "GET /capabilities answered 200 but not a JSON object".into(),
        );
    };
    match obj.get("framework") {
        None | Some(serde_json::Value::Null) => (
            Status::Pass,
            "GET /capabilities answered 200 with a JSON object (no framework field)".into(),
        ),
        Some(serde_json::Value::String(f)) if f.trim().eq_ignore_ascii_case(runner_type.trim()) => (
            Status::Pass,
            format!("GET /capabilities answered 200, framework {f}"),
        ),
        Some(other) => (
            Status::Fail,
            format!(
                "GET /capabilities says framework {other} but RUNNER_TYPE is {runner_type}: the runner did not load the bridge it was asked for"
            ),
        ),
    }
}

/// XML text and attribute escaping for the JUnit report; characters XML 1.0 cannot carry at all
/// (control characters other than tab, newline, carriage return) become `?`.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push_str(&format!("&#{};", c as u32)),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// A JUnit XML report: test suite `runner-contract`, one test case per check, `<failure>` for fails,
/// `<skipped/>` for checks not run; warnings pass with the reason in `<system-out>`.
pub fn junit(image: &str, checks: &[Check]) -> String {
    let [_, _, failures, skipped] = counts(checks);
    let total: f64 = checks.iter().filter_map(|c| c.seconds).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str(&format!(
        "<testsuite name=\"runner-contract\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{total:.3}\">\n",
        checks.len()
    ));
    x.push_str(&format!(
        "  <properties><property name=\"image\" value=\"{}\"/></properties>\n",
        xml_escape(image)
    ));
    for c in checks {
        x.push_str(&format!(
            "  <testcase classname=\"runner-contract\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(&c.name),
            c.seconds.unwrap_or(0.0)
        ));
        match c.status {
            Status::Pass => x.push_str("/>\n"),
            Status::Warn => x.push_str(&format!(
                ">\n    <system-out>warning: {}</system-out>\n  </testcase>\n",
                xml_escape(&c.detail)
            )),
            Status::Fail => x.push_str(&format!(
                ">\n    <failure message=\"{}\">{}</failure>\n  </testcase>\n",
                xml_escape(&c.detail),
                xml_escape(&c.detail)
            )),
            Status::Skipped => x.push_str(&format!(
                ">\n    <skipped message=\"{}\"/>\n  </testcase>\n",
                xml_escape(&c.detail)
            )),
        }
    }
    x.push_str("</testsuite>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, status: Status) -> Check {
        Check::new(name, status, "d")
    }

    #[test]
    fn the_verdict_fails_only_on_a_failed_check() {
        use Status::*;
        let cases: [(&[Status], Verdict); 6] = [
            (&[], Verdict::Pass),
            (&[Pass, Pass], Verdict::Pass),
            (&[Pass, Warn], Verdict::Pass),
            (&[Pass, Skipped], Verdict::Pass),
            (&[Pass, Fail], Verdict::Fail),
            (&[Warn, Skipped, Fail], Verdict::Fail),
        ];
        for (statuses, want) in cases {
            let checks: Vec<Check> = statuses.iter().map(|s| c("x", *s)).collect();
            assert_eq!(verdict(&checks), want, "{statuses:?}");
        }
        let checks = [c("a", Pass), c("b", Warn), c("c", Fail), c("d", Skipped)];
        assert_eq!(counts(&checks), [1, 1, 1, 1]);
    }

    #[test]
    fn static_results_map_to_lines() {
        let r = |outcome| CheckResult {
            check: "stop-signal",
            outcome,
            detail: "x".into(),
        };
        let lines = static_checks(&[r(Outcome::Pass), r(Outcome::Warning), r(Outcome::Violation)]);
        let got: Vec<(&str, Status)> = lines.iter().map(|l| (l.name.as_str(), l.status)).collect();
        assert_eq!(
            got,
            [
                ("image/stop-signal", Status::Pass),
                ("image/stop-signal", Status::Warn),
                ("image/stop-signal", Status::Fail)
            ]
        );
    }

    #[test]
    fn writability_follows_the_kernel_permission_classes() {
        let who = Credentials {
            uid: 1001,
            gid: 0,
            groups: vec![0, 2000],
        };
        let d = |mode, uid, gid| FileMode {
            mode,
            uid,
            gid,
            is_dir: true,
        };
        let cases = [
            // (mode, owner uid, owner gid, writable, why)
            (d(0o700, 1001, 5), true, "owner rwx"),
            (
                d(0o500, 1001, 0),
                false,
                "owner r-x, even though group 0 may write below",
            ),
            (
                d(0o570, 1001, 0),
                false,
                "owner class wins over a writable group class",
            ),
            (d(0o775, 0, 0), true, "group 0 rwx (the OpenShift layout)"),
            (d(0o755, 0, 0), false, "root-owned 755"),
            (d(0o1777, 0, 0), true, "sticky /tmp"),
            (d(0o770, 0, 2000), true, "a supplementary group"),
            (d(0o770, 0, 3000), false, "a group it is not in"),
            (d(0o773, 0, 3000), true, "other -wx"),
            (d(0o772, 0, 3000), false, "other write without search"),
            (d(0o720, 5, 2000), false, "group write without search"),
            (d(0o777, 0, 0), true, "an emptyDir"),
        ];
        for (m, want, why) in cases {
            assert_eq!(writable(&m, &who), want, "{why}: {m:?}");
        }
        let file = FileMode {
            is_dir: false,
            ..d(0o777, 1001, 0)
        };
        assert!(!writable(&file, &who), "a file is not a writable directory");
        assert!(unwritable_text("/app", &d(0o755, 0, 0), &who).contains("mode 755, owner 0:0"));
    }

    #[test]
    fn the_runner_is_pid_1_or_a_shell_wrappers_child() {
        assert_eq!(runner_pid(10, "python3", "11 12"), 10);
        assert_eq!(runner_pid(10, "sh", "11 12 "), 11);
        assert_eq!(runner_pid(10, "bash\n", "11"), 11);
        assert_eq!(runner_pid(10, "sh", ""), 10);
    }

    #[test]
    fn supplementary_groups_are_read_from_status() {
        assert_eq!(
            parse_groups("Name:\tx\nGroups:\t0 10 2000 \nX: 1\n"),
            [0, 10, 2000]
        );
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name:\tx\n"), Vec::<u32>::new());
    }

    #[test]
    fn environ_is_compared_marker_by_marker() {
        let exp = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let expected = exp(&[("SESSION_ID", "s"), ("AGUI_PORT", "18000")]);
        type Found<'a> = &'a [(&'a str, Option<&'a str>)];
        let cases: [(&[u8], Found); 5] = [
            (b"PATH=/bin\0SESSION_ID=s\0AGUI_PORT=18000\0", &[]),
            (
                b"SESSION_ID=s\0AGUI_PORT=8001\0",
                &[("AGUI_PORT", Some("8001"))],
            ),
            (b"AGUI_PORT=18000\0", &[("SESSION_ID", None)]),
            (b"SESSION_ID=\0AGUI_PORT=18000", &[("SESSION_ID", Some(""))]),
            (
                b"SESSION_ID=s=t\0\0garbage\0AGUI_PORT=18000\0",
                &[("SESSION_ID", Some("s=t"))],
            ),
        ];
        for (environ, want) in cases {
            let got = compare_environ(&expected, environ);
            let got: Vec<(&str, Option<&str>)> = got
                .iter()
                .map(|m| (m.name.as_str(), m.found.as_deref()))
                .collect();
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(environ));
        }
        let check = env_check(7, &compare_environ(&expected, b"AGUI_PORT=8001\0"));
        assert_eq!(check.status, Status::Fail);
        assert!(
            check.detail.contains("SESSION_ID is unset")
                && check.detail.contains("AGUI_PORT is overwritten (4 bytes"),
            "{}",
            check.detail
        );
        assert_eq!(env_check(7, &[]).status, Status::Pass);
    }

    #[test]
    fn markers_cover_every_injected_variable_and_stay_on_loopback() {
        let env = marker_env(18123, "gemini-cli");
        for k in contract::INJECTED_ENV {
            assert!(env.iter().any(|(n, _)| n == k), "{k} has no marker");
        }
        let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("AGUI_PORT"), "18123");
        assert_eq!(get("RUNNER_TYPE"), "gemini-cli");
        assert_eq!(get("WORKSPACE_PATH"), "/workspace");
        for (k, v) in &env {
            if v.contains("://") || v.contains(':') && k.contains("URL") {
                assert!(v.contains("127.0.0.1"), "{k}={v} is not loopback");
            }
        }
    }

    #[test]
    fn mount_points_and_their_read_only_flag() {
        let mi = "\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/l
30 22 8:1 /tmp/ws /workspace rw,relatime - ext4 /dev/sda1 rw
31 22 8:1 /tmp/vx /app/vertex ro,relatime - ext4 /dev/sda1 rw
32 22 8:1 /tmp/a /a\\040b ro - ext4 /dev/sda1 rw
33 22 8:1 /tmp/vy /app/vertex rw,relatime - ext4 /dev/sda1 rw
";
        assert_eq!(mount_read_only(mi, "/workspace"), Some(false));
        assert_eq!(mount_read_only(mi, "/a b"), Some(true));
        // The later mount shadows the earlier one.
        assert_eq!(mount_read_only(mi, "/app/vertex"), Some(false));
        assert_eq!(
            mount_read_only(
                &mi.lines().take(3).collect::<Vec<_>>().join("\n"),
                "/app/vertex"
            ),
            Some(true)
        );
        assert_eq!(mount_read_only(mi, "/app"), None);
    }

    #[test]
    fn post_run_answers_are_classified() {
        use Status::*;
        let cases = [
            (None, Fail),
            (Some(200), Pass),
            (Some(204), Pass),
            (Some(400), Pass),
            (Some(401), Pass),
            (Some(422), Pass),
            (Some(404), Fail),
            (Some(405), Fail),
            (Some(500), Fail),
            (Some(503), Fail),
            (Some(403), Warn),
            (Some(302), Warn),
        ];
        for (status, want) in cases {
            assert_eq!(classify_run(status).0, want, "{status:?}");
        }
        assert!(classify_run(Some(405)).1.contains("no AG-UI run route"));
    }

    #[test]
    fn capabilities_answers_are_classified() {
        use Status::*;
        type Answer<'a> = Option<(u16, &'a [u8])>;
        let cases: [(Answer, &str, Status); 9] = [
            (
                Some((200, br#"{"framework":"langgraph"}"#)),
                "langgraph",
                Pass,
            ),
            (
                Some((200, br#"{"framework":"LangGraph"}"#)),
                "langgraph",
                Pass,
            ),
            (Some((200, br#"{"agent_features":[]}"#)), "langgraph", Pass),
            (Some((200, br#"{"framework":null}"#)), "langgraph", Pass),
            (
                Some((200, br#"{"framework":"claude-agent-sdk"}"#)),
                "gemini-cli",
                Fail,
            ),
            (Some((200, b"ok")), "langgraph", Fail),
            (Some((200, b"[1]")), "langgraph", Fail),
            (Some((404, b"")), "langgraph", Fail),
            (None, "langgraph", Fail),
        ];
        for (answer, rt, want) in cases {
            let (got, detail) = classify_capabilities(answer, rt);
            assert_eq!(got, want, "{answer:?} {rt}: {detail}");
        }
    }

    #[test]
    fn xml_escaping_covers_markup_quotes_and_control_characters() {
        let cases = [
            ("plain", "plain"),
            ("a<b>&c", "a&lt;b&gt;&amp;c"),
            (r#"say "hi" 'x'"#, "say &quot;hi&quot; &apos;x&apos;"),
            ("l1\nl2\tz\r", "l1&#10;l2&#9;z&#13;"),
            ("bell\u{7}esc\u{1b}", "bell?esc?"),
            ("ünïcode ✓", "ünïcode ✓"),
            ("&amp;", "&amp;amp;"),
        ];
        for (raw, want) in cases {
            assert_eq!(xml_escape(raw), want, "{raw:?}");
        }
    }

    #[test]
    fn junit_has_one_case_per_check_with_failures_and_skips() {
        let checks = vec![
            Check::pass("starts", "healthy").with_seconds(1.5),
            Check::new("image/contract-label", Status::Warn, "no label"),
            Check::fail("required-paths", "/workspace is missing <here> & \"there\""),
            Check::skipped("graceful-shutdown", "not run"),
        ];
        let x = junit("reg/x:<1>", &checks);
        assert!(x.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"runner-contract\" tests=\"4\" failures=\"1\" errors=\"0\" skipped=\"1\" time=\"1.500\">"), "{x}");
        assert_eq!(x.matches("<testcase ").count(), 4);
        assert!(
            x.contains("<property name=\"image\" value=\"reg/x:&lt;1&gt;\"/>"),
            "{x}"
        );
        assert!(
            x.contains("<testcase classname=\"runner-contract\" name=\"starts\" time=\"1.500\"/>"),
            "{x}"
        );
        assert!(
            x.contains(
                "<failure message=\"/workspace is missing &lt;here&gt; &amp; &quot;there&quot;\">"
            ),
            "{x}"
        );
        assert!(x.contains("<skipped message=\"not run\"/>"), "{x}");
        assert!(
            x.contains("<system-out>warning: no label</system-out>"),
            "{x}"
        );
        assert!(x.trim_end().ends_with("</testsuite>"));
        // Every case not closed inline is closed by a tag.
        assert_eq!(x.matches("</testcase>").count(), 3);
    }
}
