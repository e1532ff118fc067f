//! `/etc/passwd` read as containerd reads it when it maps an image's `USER` (`oci.WithUser`,
//! `WithUsername`, `WithUserID`, through moby/sys/user's `ParsePasswdFilter` and Go's `strconv.Atoi`), so
//! the audit judges the uid the container really gets:
//!
//! - the file is bytes (a byte that is not UTF-8 is just a byte), split into lines at `\n` by a
//!   `bufio.Scanner`, whose longest line is 64 KiB: one longer line anywhere fails the whole parse, and the
//!   container does not start;
//! - every line is trimmed of white space (`bytes.TrimSpace`: Unicode `White_Space`, decoded as UTF-8) and
//!   skipped when empty; nothing else is skipped (a `#` line is a user named `#…`);
//! - fields are split at `:`; a missing field is empty, and the uid and gid fields are `strconv.Atoi`
//!   with the error ignored: a field that is not a number is 0, one outside the 64-bit range is the
//!   nearest bound;
//! - the first line whose name is the user's wins, whatever its uid field holds, and the uid and gid are
//!   narrowed to 32 bits (`uint32(int)`: `4294967296` is uid 0, `-1` is 4294967295).

/// A line longer than this (without its `\n`) is more than `bufio.Scanner`'s 64 KiB token.
pub const LINE_MAX: usize = 64 * 1024 - 1;

/// One line of the file, as moby/sys/user keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: &'a [u8],
    /// The uid field as written (after the line is trimmed).
    pub uid_field: &'a [u8],
    /// `strconv.Atoi` of the uid field, its error ignored.
    pub uid: i64,
    pub gid: i64,
}

impl Entry<'_> {
    /// The uid containerd runs with.
    pub fn runtime_uid(&self) -> u32 {
        narrow(self.uid)
    }

    pub fn runtime_gid(&self) -> u32 {
        narrow(self.gid)
    }
}

/// Why containerd cannot read the file (and so does not start a container that needs it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// Line `line` (1-based) is longer than [`LINE_MAX`] bytes.
    LineTooLong { line: usize },
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LineTooLong { line } => write!(
                f,
                "line {line} of the image's /etc/passwd is longer than 64 KiB, which containerd cannot parse"
            ),
        }
    }
}

/// Go's `uint32(int)`: the low 32 bits.
pub fn narrow(v: i64) -> u32 {
    v as u32
}

/// Go's `strconv.Atoi` on a 64-bit machine: `Ok` the value, or `Err` the value Go returns beside its
/// error (0 for a syntax error, the nearest bound for one out of range — found at the digit that overflows,
/// before any later byte is looked at).
pub fn atoi(s: &[u8]) -> Result<i64, i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, s),
    };
    if digits.is_empty() {
        return Err(0);
    }
    let bound = if neg { i64::MIN } else { i64::MAX };
    let mut n: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return Err(0);
        }
        match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(c - b'0')))
        {
            Some(v) => n = v,
            None => return Err(bound),
        }
    }
    const HALF: u64 = 1 << 63;
    match (neg, n) {
        (false, n) if n >= HALF => Err(bound),
        (true, n) if n > HALF => Err(bound),
        (false, n) => Ok(n as i64),
        (true, n) => Ok((n as i64).wrapping_neg()),
    }
}

/// Every entry of the file, in order, or why containerd cannot read it.
pub fn parse(passwd: &[u8]) -> Result<Vec<Entry<'_>>, Unreadable> {
    let mut out = Vec::new();
    for (i, raw) in passwd.split(|b| *b == b'\n').enumerate() {
        if raw.len() > LINE_MAX {
            return Err(Unreadable::LineTooLong { line: i + 1 });
        }
        let line = trim(raw);
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(|b| *b == b':');
        let name = fields.next().unwrap_or_default();
        let uid_field = fields.nth(1).unwrap_or_default();
        let gid_field = fields.next().unwrap_or_default();
        out.push(Entry {
            name,
            uid_field,
            uid: atoi(uid_field).unwrap_or_else(|v| v),
            gid: atoi(gid_field).unwrap_or_else(|v| v),
        });
    }
    Ok(out)
}

/// The entry `WithUsername` takes: the first whose name is `name`.
pub fn by_name<'a>(passwd: &'a [u8], name: &str) -> Result<Option<Entry<'a>>, Unreadable> {
    Ok(parse(passwd)?
        .into_iter()
        .find(|e| e.name == name.as_bytes()))
}

/// The entry `WithUserID` takes for a numeric uid: the first whose parsed uid (not narrowed) equals it.
pub fn by_uid(passwd: &[u8], uid: u32) -> Result<Option<Entry<'_>>, Unreadable> {
    Ok(parse(passwd)?.into_iter().find(|e| e.uid == i64::from(uid)))
}

/// `bytes.TrimSpace`: white space (Unicode `White_Space`) off both ends; a byte that does not decode as
/// UTF-8 stops the trim.
fn trim(mut s: &[u8]) -> &[u8] {
    while let Some((c, len)) = first_char(s) {
        if !c.is_whitespace() {
            break;
        }
        s = &s[len..];
    }
    while let Some((c, len)) = last_char(s) {
        if !c.is_whitespace() {
            break;
        }
        s = &s[..s.len() - len];
    }
    s
}

fn first_char(s: &[u8]) -> Option<(char, usize)> {
    let head = &s[..s.len().min(4)];
    let valid = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).ok()?,
    };
    valid.chars().next().map(|c| (c, c.len_utf8()))
}

fn last_char(s: &[u8]) -> Option<(char, usize)> {
    (1..=s.len().min(4)).find_map(|k| {
        let t = std::str::from_utf8(&s[s.len() - k..]).ok()?;
        let mut cs = t.chars();
        let c = cs.next()?;
        cs.next().is_none().then_some((c, k))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atoi_as_go() {
        for (s, want) in [
            ("0", Ok(0)),
            ("1001", Ok(1001)),
            ("+7", Ok(7)),
            ("-1", Ok(-1)),
            ("-0", Ok(0)),
            ("007", Ok(7)),
            ("4294967296", Ok(4294967296)),
            ("9223372036854775807", Ok(i64::MAX)),
            ("9223372036854775808", Err(i64::MAX)),
            ("-9223372036854775808", Ok(i64::MIN)),
            ("-9223372036854775809", Err(i64::MIN)),
            ("99999999999999999999", Err(i64::MAX)),
            // The overflow is seen before the trailing byte.
            ("99999999999999999999x", Err(i64::MAX)),
            ("1x", Err(0)),
            ("x", Err(0)),
            ("", Err(0)),
            ("+", Err(0)),
            ("-", Err(0)),
            (" 1", Err(0)),
            ("1_000", Err(0)),
            ("0x10", Err(0)),
        ] {
            assert_eq!(atoi(s.as_bytes()), want, "{s:?}");
        }
    }

    #[test]
    fn narrowing_is_the_low_32_bits() {
        for (v, want) in [
            (0, 0),
            (1001, 1001),
            (4294967296, 0),
            (4294967297, 1),
            (-1, u32::MAX),
            (-4294967296, 0),
            (i64::MAX, u32::MAX),
            (i64::MIN, 0),
        ] {
            assert_eq!(narrow(v), want, "{v}");
        }
    }

    #[test]
    fn lookups_as_containerd() {
        // (passwd, name, uid containerd runs with; None: no such user)
        for (passwd, name, want) in [
            (&b"runner:x:1001:0::/:/bin/sh\n"[..], "runner", Some(1001)),
            // The first line with the name wins even when its uid is not a number.
            (
                b"runner:x:x:x::/:/bin/sh\nrunner:x:1001:1001::/:/bin/sh\n",
                "runner",
                Some(0),
            ),
            // Lines are trimmed.
            (
                b" runner:x:0:0::/:/bin/sh\nrunner:x:1001:0::/:/bin/sh\n",
                "runner",
                Some(0),
            ),
            (b"\trunner:x:0:0::/:/bin/sh \r\n", "runner", Some(0)),
            (b"\xc2\xa0runner:x:0:0::/:/bin/sh\n", "runner", Some(0)),
            // Narrowed to 32 bits.
            (b"runner:x:4294967296:0::/:/bin/sh\n", "runner", Some(0)),
            (b"runner:x:4294968297:0::/:/bin/sh\n", "runner", Some(1001)),
            (b"runner:x:-1:0::/:/bin/sh\n", "runner", Some(u32::MAX)),
            (
                b"runner:x:99999999999999999999:0\n",
                "runner",
                Some(u32::MAX),
            ),
            // Missing fields are 0.
            (b"runner\n", "runner", Some(0)),
            (b"runner:x\n", "runner", Some(0)),
            // A byte that is not UTF-8 is a byte like any other.
            (b"\xff\xfe:x:0:0\nrunner:x:1001:0\n", "runner", Some(1001)),
            (b"runner\xff:x:0:0\nrunner:x:1001:0\n", "runner", Some(1001)),
            // A comment is a user named "#...".
            (b"#runner:x:0:0\nrunner:x:1001:0\n", "runner", Some(1001)),
            (b"root:x:0:0\n", "runner", None),
            (b"", "runner", None),
        ] {
            let got = by_name(passwd, name).unwrap().map(|e| e.runtime_uid());
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(passwd));
        }
    }

    #[test]
    fn gid_for_a_numeric_uid_compares_the_unnarrowed_field() {
        let p = b"big:x:4294967296:7\nzero:x:0:5\n";
        assert_eq!(by_uid(p, 0).unwrap().map(|e| e.runtime_gid()), Some(5));
        assert_eq!(by_uid(p, 1).unwrap(), None);
    }

    #[test]
    fn a_line_over_64_kib_fails_the_whole_file() {
        let mut p = b"runner:x:1001:0\n".to_vec();
        p.extend(std::iter::repeat_n(b'a', LINE_MAX));
        assert!(by_name(&p, "runner").unwrap().is_some());
        p.push(b'a');
        assert_eq!(
            by_name(&p, "runner"),
            Err(Unreadable::LineTooLong { line: 2 })
        );
    }
}
