//! The Linux process-events connector (`NETLINK_CONNECTOR`, group `CN_IDX_PROC`): the kernel reports
//! exec, uid and gid changes of every process within milliseconds, so a runner that gains root is seen
//! at once rather than at the next poll. It needs root in the host's pid and network namespaces; when
//! the kernel refuses, the caller logs once and keeps polling.
//!
//! Wire layout (include/uapi/linux/connector.h, cn_proc.h): nlmsghdr (16 bytes), cn_msg (20 bytes), then
//! proc_event { what u32, cpu u32, timestamp_ns u64, event_data }.
//!
//! The reader thread never blocks on the rescan loop: events go into a bounded queue (`Forward`,
//! `Inbox`); when it is full, or the kernel overran our socket, one full rescan is requested instead,
//! outside the queue, so no limit can lose it and a thousand drops ask for it once.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Notify};

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_CN_MCAST_IGNORE: u32 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;

const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_UID: u32 = 0x0000_0004;
const PROC_EVENT_GID: u32 = 0x0000_0040;

/// A thread whose credentials may have changed: `tid` the thread (the kernel's `process_pid`), `tgid`
/// its process (`process_tgid`). Credentials are per thread, so the thread's own status is what tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CredentialEvent {
    pub tgid: u32,
    pub tid: u32,
}

pub struct ProcConnector {
    fd: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl ProcConnector {
    /// Opens the socket and asks the kernel for events. Errors mean the connector is not available here
    /// (not root, not in the host namespaces, or a kernel without it).
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the returned descriptor is owned by `fd` from here on.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        })?;
        // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain old data; zeroed is a valid value before we fill it.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_pid = 0; // let the kernel assign a port id
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: addr is a valid sockaddr_nl and the length matches it.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let conn = Self { fd };
        conn.control(PROC_CN_MCAST_LISTEN)?;
        // Wake up once a second so the reader thread notices shutdown (well within the 5 s budget).
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval and its size.
        cvt(unsafe {
            libc::setsockopt(
                conn.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(conn)
    }

    fn control(&self, op: u32) -> io::Result<()> {
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len of the op
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&op.to_ne_bytes());
        // SAFETY: sends our own buffer of the stated length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks up to the receive timeout; returns what one datagram said.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        // SAFETY: zeroed sockaddr_nl is a valid value; recvfrom fills at most its length.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: receives into our own buffer, bounded by its length, and our own address struct.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut from as *mut libc::sockaddr_nl as *mut libc::sockaddr,
                &mut from_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(Received::Events(Vec::new())),
                // The kernel dropped events our buffer had no room for: the caller rescans.
                _ if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received::Overrun),
                _ => Err(e),
            };
        }
        Ok(judge(from.nl_pid, &buf[..n as usize]))
    }
}

/// What one receive gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Events(Vec<CredentialEvent>),
    /// Events were lost (ENOBUFS): only a full scan knows what happened meanwhile.
    Overrun,
    /// A datagram that did not come from the kernel (port id ≠ 0): another process on the host may send
    /// to our port; it is never believed.
    NotKernel {
        sender: u32,
    },
}

/// Believes a datagram only from the kernel.
pub fn judge(sender: u32, datagram: &[u8]) -> Received {
    match sender {
        0 => Received::Events(parse(datagram)),
        sender => Received::NotKernel { sender },
    }
}

impl Drop for ProcConnector {
    fn drop(&mut self) {
        let _ = self.control(PROC_CN_MCAST_IGNORE);
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses one datagram: zero or more netlink messages each carrying one proc_event.
pub fn parse(buf: &[u8]) -> Vec<CredentialEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let Some(len) = u32_at(buf, off).map(|l| l as usize) else {
            break;
        };
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let ev = off + NLMSG_HDRLEN + CN_MSG_LEN;
        if let Some(what) = u32_at(buf, ev) {
            // event_data starts after what, cpu and timestamp_ns: process_pid (the thread), then
            // process_tgid, in exec_proc_event and id_proc_event alike.
            if matches!(what, PROC_EVENT_EXEC | PROC_EVENT_UID | PROC_EVENT_GID) {
                if let (Some(tid), Some(tgid)) = (u32_at(buf, ev + 16), u32_at(buf, ev + 16 + 4)) {
                    out.push(CredentialEvent { tgid, tid });
                }
            }
        }
        off += (len + 3) & !3;
    }
    out
}

/// The reader thread's end of the queue to the rescan loop.
pub struct Forward {
    tx: mpsc::Sender<CredentialEvent>,
    rescan: Arc<Notify>,
}

/// The rescan loop's end: events in batches, and the full rescan asked for when events were lost.
pub struct Inbox {
    rx: mpsc::Receiver<CredentialEvent>,
    rescan: Arc<Notify>,
    batch: usize,
}

/// A queue of `capacity` events (a batch drains at most as many).
pub fn channel(capacity: usize) -> (Forward, Inbox) {
    let (tx, rx) = mpsc::channel(capacity);
    let rescan = Arc::new(Notify::new());
    (
        Forward {
            tx,
            rescan: rescan.clone(),
        },
        Inbox {
            rx,
            rescan,
            batch: capacity,
        },
    )
}

impl Forward {
    /// Queues the event, never blocking: with the queue full it is dropped and a full rescan requested.
    pub fn event(&self, e: CredentialEvent) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(e) {
            self.rescan.notify_one();
        }
    }

    /// Events were lost before they reached us: only a full rescan knows what happened meanwhile.
    pub fn lost(&self) {
        self.rescan.notify_one();
    }
}

/// What the rescan loop has to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    /// Events were lost (the queue was full, or the kernel overran the socket): rescan everything. One
    /// request however many were lost since the last (a `Notify` permit, not a queue slot).
    RescanAll,
    /// Distinct threads that exec'd or changed UID or GID, in arrival order (at most a queue's worth).
    Events(Vec<CredentialEvent>),
}

impl Inbox {
    /// The next thing to do: a pending full rescan first, else every queued event (up to a batch),
    /// duplicates dropped. `None` once the reader is gone and the queue empty.
    pub async fn next(&mut self) -> Option<Work> {
        tokio::select! {
            biased;
            _ = self.rescan.notified() => Some(Work::RescanAll),
            first = self.rx.recv() => {
                let first = first?;
                let mut seen = HashSet::from([first]);
                let mut events = vec![first];
                for _ in 1..self.batch {
                    match self.rx.try_recv() {
                        Ok(e) => {
                            if seen.insert(e) {
                                events.push(e);
                            }
                        }
                        Err(_) => break,
                    }
                }
                Some(Work::Events(events))
            }
        }
    }
}

/// Runs the connector on its own thread until `stop`, forwarding each credential event (and each
/// overrun) to `forward`. `down` is called if the socket fails for good (the loop then polls only).
pub fn spawn(
    conn: ProcConnector,
    forward: Forward,
    down: impl FnOnce() + Send + 'static,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("proc-connector".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut spoofed_said = false;
            while !stop.load(Ordering::Relaxed) {
                match conn.recv(&mut buf) {
                    Ok(Received::Events(events)) => {
                        for e in events {
                            forward.event(e);
                        }
                    }
                    Ok(Received::Overrun) => {
                        tracing::debug!("proc connector overrun (events lost); a full rescan follows");
                        forward.lost();
                    }
                    Ok(Received::NotKernel { sender }) => {
                        if !spoofed_said {
                            spoofed_said = true;
                            tracing::warn!(sender, "ignoring proc connector messages that do not come from the kernel (another process on the host sends to the agent's netlink port)");
                        }
                    }
                    Err(e) => {
                        down();
                        tracing::warn!(error = %e, "proc connector read failed; falling back to polling");
                        return;
                    }
                }
            }
        })
        .expect("spawn proc-connector thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(what: u32, pid: u32, tgid: u32) -> Vec<u8> {
        let mut b = Vec::new();
        let len = (NLMSG_HDRLEN + CN_MSG_LEN + 16 + 16) as u32;
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&[0u8; 12]);
        b.extend_from_slice(&[0u8; CN_MSG_LEN]);
        b.extend_from_slice(&what.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&0u64.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b.extend_from_slice(&tgid.to_ne_bytes());
        b.extend_from_slice(&[0u8; 8]);
        b
    }

    #[test]
    fn parses_credential_events_and_ignores_others() {
        let mut buf = event(PROC_EVENT_UID, 11, 10);
        buf.extend(event(1 /* fork */, 20, 20));
        buf.extend(event(PROC_EVENT_EXEC, 31, 30));
        assert_eq!(
            parse(&buf),
            [
                CredentialEvent { tgid: 10, tid: 11 },
                CredentialEvent { tgid: 30, tid: 31 }
            ]
        );
        assert!(parse(&buf[..10]).is_empty());
    }

    #[test]
    fn only_the_kernel_is_believed() {
        let buf = event(PROC_EVENT_UID, 11, 10);
        assert_eq!(
            judge(0, &buf),
            Received::Events(vec![CredentialEvent { tgid: 10, tid: 11 }])
        );
        assert_eq!(judge(4242, &buf), Received::NotKernel { sender: 4242 });
    }

    fn ev(tgid: u32, tid: u32) -> CredentialEvent {
        CredentialEvent { tgid, tid }
    }

    /// Whether the inbox has something to do right now (without waiting).
    fn ready(inbox: &mut Inbox) -> Option<Work> {
        use futures::FutureExt;
        inbox.next().now_or_never().flatten()
    }

    #[tokio::test]
    async fn events_dropped_by_a_full_queue_ask_for_exactly_one_full_rescan() {
        let (forward, mut inbox) = channel(4);
        for pid in 1..=10 {
            forward.event(ev(pid, pid));
        }
        assert_eq!(
            inbox.next().await,
            Some(Work::RescanAll),
            "first, before the events"
        );
        assert_eq!(
            inbox.next().await,
            Some(Work::Events((1..=4).map(|p| ev(p, p)).collect())),
            "the queue's four"
        );
        assert_eq!(ready(&mut inbox), None, "six drops, one rescan");
        // Room again: events flow, and nothing was lost this time.
        forward.event(ev(20, 21));
        assert_eq!(inbox.next().await, Some(Work::Events(vec![ev(20, 21)])));
        assert_eq!(ready(&mut inbox), None);
    }

    #[tokio::test]
    async fn overruns_ask_for_one_rescan_and_a_lost_reader_ends_the_inbox() {
        let (forward, mut inbox) = channel(4);
        forward.lost();
        forward.lost();
        assert_eq!(inbox.next().await, Some(Work::RescanAll));
        assert_eq!(ready(&mut inbox), None);
        // A rescan asked for while the loop waits wakes it.
        let waiting = tokio::spawn(async move { (inbox.next().await, inbox) });
        tokio::task::yield_now().await;
        forward.lost();
        let (work, mut inbox) = waiting.await.unwrap();
        assert_eq!(work, Some(Work::RescanAll));
        drop(forward);
        assert_eq!(inbox.next().await, None);
    }

    /// The kernel's own event for a non-leader thread's UID change names that thread and its process
    /// (needs root: the connector and the change).
    #[test]
    fn the_kernel_names_the_thread_that_changed_its_credentials() {
        let conn = ProcConnector::open().expect("the proc connector (root, host namespaces)");
        let me = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions; setresuid changes this thread's real UID only (-1:
            // unchanged), and back: the effective UID stays 0 throughout.
            let tid = unsafe { libc::gettid() } as u32;
            let changed = unsafe { libc::syscall(libc::SYS_setresuid, 4242, -1, -1) } == 0
                && unsafe { libc::syscall(libc::SYS_setresuid, 0, -1, -1) } == 0;
            tx.send((tid, changed)).unwrap();
        });
        let (tid, changed) = rx.recv().unwrap();
        t.join().unwrap();
        assert!(changed, "setresuid as root");
        assert_ne!(tid, me);
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Received::Events(events) = conn.recv(&mut buf).unwrap() {
                if events.contains(&CredentialEvent { tgid: me, tid }) {
                    break;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no event for thread {tid} of {me}"
            );
        }
    }

    #[tokio::test]
    async fn a_burst_is_one_batch_of_distinct_threads() {
        let (forward, mut inbox) = channel(8);
        for e in [ev(10, 10), ev(10, 11), ev(10, 10), ev(20, 20), ev(10, 11)] {
            forward.event(e);
        }
        assert_eq!(
            inbox.next().await,
            Some(Work::Events(vec![ev(10, 10), ev(10, 11), ev(20, 20)]))
        );
        assert_eq!(ready(&mut inbox), None);
    }
}
