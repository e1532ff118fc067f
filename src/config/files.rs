//! What can be checked on the node's filesystem before anything runs: pull secrets read and parsed,
//! where findings go, the stop-record directory, the shape of the containerd socket path. Problems name
//! their key; `--check-config` exits 2 on any, `run` logs them once at start (a bad secret is then also
//! reported on the image's project at every distinct problem, and the agent keeps serving the rest).

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::Settings;
use crate::credentials::read_secret;

impl Settings {
    /// Every problem the filesystem shows now, each naming its key.
    pub fn check_files(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, d) in self.images.iter().enumerate() {
            if let Some(p) = &d.pull_secret {
                if let Err(e) = read_secret(p) {
                    problems.push(format!("images[{i}].pull_secret: {e}"));
                }
            }
        }
        if self.findings != "-" {
            let f = Path::new(&self.findings);
            match std::fs::metadata(f) {
                Ok(m) if m.is_dir() => problems.push(format!(
                    "report.findings: {} is a directory; name a file to append to, or \"-\" for standard output",
                    f.display()
                )),
                Ok(m) if m.permissions().readonly() => problems.push(format!(
                    "report.findings: {} is read-only",
                    f.display()
                )),
                Ok(_) => {}
                Err(_) => {
                    let parent = f.parent().filter(|p| !p.as_os_str().is_empty());
                    if !parent.is_none_or(Path::is_dir) {
                        problems.push(format!(
                            "report.findings: directory {} does not exist; create it or choose another file",
                            parent.unwrap_or(Path::new(".")).display()
                        ));
                    }
                }
            }
        }
        let stops = &self.shutdown.stop_records;
        if stops.exists() && !stops.is_dir() {
            problems.push(format!(
                "shutdown.stop_records: {} exists and is not a directory",
                stops.display()
            ));
        }
        let sock = &self.containerd_socket;
        if !sock.is_absolute() {
            problems.push(format!(
                "containerd.socket: {} is not an absolute path (e.g. /run/containerd/containerd.sock)",
                sock.display()
            ));
        } else if let Ok(m) = std::fs::metadata(sock) {
            if !m.file_type().is_socket() {
                let what = if m.is_dir() {
                    "a directory"
                } else {
                    "not a socket"
                };
                problems.push(format!(
                    "containerd.socket: {} is {what}; name containerd's gRPC socket (its config's grpc.address)",
                    sock.display()
                ));
            }
        }
        problems
    }
}

/// `unix:///run/containerd/containerd.sock` (what crictl and kubelet accept) → the path.
pub fn socket_path(raw: &str) -> &str {
    raw.strip_prefix("unix://").unwrap_or(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use crate::credentials::SECRET_MAX;

    fn settings(text: &str, dir: &Path) -> Settings {
        Settings::parse(text, dir, &Overrides::default()).unwrap()
    }

    #[test]
    fn secrets_findings_stops_and_socket_are_checked_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("junk.json"), "not json").unwrap();
        std::fs::write(d.join("big.json"), vec![b' '; (SECRET_MAX + 1) as usize]).unwrap();
        std::fs::write(
            d.join("nopass.json"),
            r#"{"auths":{"r.io":{"username":"u"}}}"#,
        )
        .unwrap();
        std::fs::write(d.join("ok.json"), r#"{"auths":{"r.io":{"auth":"dTpw"}}}"#).unwrap();
        std::fs::create_dir(d.join("adir")).unwrap();
        std::fs::write(d.join("afile"), "").unwrap();
        let text = format!(
            "[containerd]\nsocket = \"{0}/afile\"\n[report]\nfindings = \"{0}/missing/f.jsonl\"\n[shutdown]\nstop_records = \"{0}/afile\"\n\
             [[images]]\nimage = \"r.io/a:1\"\npull_secret = \"junk.json\"\n[[images]]\nimage = \"r.io/b:1\"\npull_secret = \"big.json\"\n\
             [[images]]\nimage = \"r.io/c:1\"\npull_secret = \"gone.json\"\n[[images]]\nimage = \"r.io/d:1\"\npull_secret = \"adir\"\n\
             [[images]]\nimage = \"r.io/e:1\"\npull_secret = \"ok.json\"\n[[images]]\nimage = \"r.io/f:1\"\npull_secret = \"nopass.json\"\n",
            d.display()
        );
        let p = settings(&text, d).check_files();
        let all = p.join("\n");
        for want in [
            "images[0].pull_secret: ",
            "images[1].pull_secret: ",
            "at most 1048576 bytes",
            "images[2].pull_secret: cannot read",
            "images[3].pull_secret: ",
            "is a directory",
            "report.findings: directory",
            "shutdown.stop_records: ",
            "containerd.socket: ",
            "not a socket",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("images[4]"), "{all}");
        assert!(
            all.contains("images[5].pull_secret"),
            "a username without a password: {all}"
        );
        assert_eq!(p.len(), 8, "{all}");
        let p = settings(
            &format!("[containerd]\nsocket = \"{}/adir\"\n", d.display()),
            d,
        )
        .check_files();
        assert!(p[0].contains("is a directory"), "{p:?}");
        let p = settings("[containerd]\nsocket = \"relative.sock\"\n", d).check_files();
        assert!(p[0].contains("not an absolute path"), "{p:?}");
    }

    #[test]
    fn unix_urls_are_socket_paths() {
        assert_eq!(socket_path("unix:///run/c.sock"), "/run/c.sock");
        assert_eq!(socket_path("/run/c.sock"), "/run/c.sock");
    }
}
