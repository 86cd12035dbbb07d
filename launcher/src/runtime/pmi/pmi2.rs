//! PMI-2's wire protocol on the same `PMI_FD` link (the client picks: its first line is
//! PMI-1's `cmd=init pmi_version=2 pmi_subversion=0`; the answer `response_to_init ...
//! pmi_version=2 rc=0` switches the link to PMI-2 framing). Slurm's `libpmi2` (Debian's
//! libpmi2-0) and MPICH's PMI-2 client speak it.
//!
//! Framing: each command is a 6-byte ASCII length (decimal, space padded), then that many
//! bytes of `key=value;` pairs, the first one `cmd=NAME`; a `;` inside a value is written
//! `;;`. Answers are `cmd=NAME-response;rc=0;...` in the same framing (`rc` non-zero with
//! `errmsg` for a refused command).
//!
//! Served: `fullinit` (rank, size, appnum; the client's `pmirank` must be this link's
//! rank), `job-getid` (the KVS name), `kvs-put`, `kvs-fence` (the node's fence, through
//! krun as for PMI-1), `kvs-get` (`found=FALSE` for a key nobody put),
//! `info-putnodeattr` / `info-getnodeattr` (this node's own attributes; `wait=TRUE` waits
//! until the key is put), `info-getjobattr` (`PMI_process_mapping`, `universeSize`),
//! `finalize` and `abort` (the job ends with code 1, as PMI-2's abort carries no code).
//! Others (spawn, name service, job connect) get `rc=-1` naming the command.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::{NodeServer, PmiToLauncher, PutRefused, Wire, KEYLEN_MAX, VALLEN_MAX};

/// Digits of the length field.
const LEN_FIELD: usize = 6;
/// Longest command a client may send (a put of the longest key and value fits).
pub(super) const COMMAND_MAX: usize = 4096;

/// One PMI-2 command: its name and its other pairs, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Command2 {
    pub cmd: String,
    pub args: Vec<(String, String)>,
}

impl Command2 {
    fn get(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one command body (without its length field).
pub(super) fn parse(body: &str) -> Result<Command2, String> {
    let mut pairs = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("{rest:?} is not key=value;"))?;
        let key = &rest[..eq];
        if key.is_empty() || key.contains(';') {
            return Err(format!("{:?} is not a key", key));
        }
        let mut value = String::new();
        let mut chars = rest[eq + 1..].char_indices().peekable();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if c == ';' {
                if matches!(chars.peek(), Some((_, ';'))) {
                    chars.next();
                    value.push(';');
                    continue;
                }
                end = Some(eq + 1 + i);
                break;
            }
            value.push(c);
        }
        let end = end.ok_or_else(|| format!("the value of {key:?} has no closing ';'"))?;
        pairs.push((key.to_string(), value));
        rest = &rest[end + 1..];
    }
    let mut it = pairs.into_iter();
    match it.next() {
        Some((k, v)) if k == "cmd" && !v.is_empty() => Ok(Command2 {
            cmd: v,
            args: it.collect(),
        }),
        Some((k, _)) => Err(format!("the first pair is {k:?}, not cmd")),
        None => Err("an empty command".into()),
    }
}

/// One answer in PMI-2 framing: `cmd=NAME;` then the pairs, `;` in values doubled.
pub(super) fn frame(cmd: &str, pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut body = format!("cmd={cmd};");
    for (k, v) in pairs {
        body.push_str(k);
        body.push('=');
        body.push_str(&v.replace(';', ";;"));
        body.push(';');
    }
    let mut out = format!("{:<width$}", body.len(), width = LEN_FIELD).into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Reads one framed command: `Ok(None)` at the end of the link.
fn read_command(r: &mut impl Read) -> Result<Option<String>, String> {
    let mut len = [0u8; LEN_FIELD];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&len);
    let n: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("the length field {text:?} is not a number"))?;
    if n > COMMAND_MAX {
        return Err(format!("a command of {n} bytes (at most {COMMAND_MAX})"));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)
        .map_err(|e| format!("a command cut short: {e}"))?;
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| "a command that is not UTF-8".into())
}

impl NodeServer {
    /// Serves `rank`'s link in PMI-2 framing until it closes (after the PMI-1 `init` that
    /// asked for version 2).
    pub(super) fn serve_pmi2(
        &self,
        rank: u32,
        generation: u64,
        mut reader: impl Read,
        mut out: UnixStream,
    ) {
        loop {
            let body = match read_command(&mut reader) {
                Ok(Some(b)) => b,
                Ok(None) => return,
                Err(e) => {
                    eprintln!(
                        "krund: node {}: rank {rank}: PMI-2: {e}; link closed",
                        self.node
                    );
                    return;
                }
            };
            let reply = match parse(&body) {
                Ok(c) => self.answer2(rank, generation, &c),
                Err(e) => Some(frame("error", &[("rc", "-1"), ("errmsg", &e)])),
            };
            match reply {
                Some(r) => {
                    if out.write_all(&r).is_err() {
                        return;
                    }
                }
                None => {
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// The answer to one PMI-2 command (`None`: close the link; a connection of an older
    /// incarnation gets none, as in PMI-1).
    fn answer2(&self, rank: u32, generation: u64, c: &Command2) -> Option<Vec<u8>> {
        let resp = format!("{}-response", c.cmd);
        let fail = |msg: &str| frame(&resp, &[("rc", "-1"), ("errmsg", msg)]);
        let ok = |pairs: &[(&str, &str)]| {
            let mut all = vec![("rc", "0")];
            all.extend_from_slice(pairs);
            frame(&resp, &all)
        };
        let layout = {
            let st = self.state.lock().expect("pmi lock");
            if st.generation != generation {
                return None;
            }
            st.layout.clone()
        };
        Some(match c.cmd.as_str() {
            "fullinit" => match c.get("pmirank").map(|r| r.parse::<u32>()) {
                Some(Ok(r)) if r != rank => fail(&format!(
                    "pmirank {r} on the link of rank {rank} (PMI_RANK is {rank})"
                )),
                Some(Err(_)) => fail("pmirank is not a number"),
                _ => {
                    let (r, size) = (rank.to_string(), layout.size.to_string());
                    ok(&[
                        ("pmi-version", "2"),
                        ("pmi-subversion", "0"),
                        ("rank", &r),
                        ("size", &size),
                        ("appnum", "0"),
                        ("debugged", "FALSE"),
                        ("pmiverbose", "FALSE"),
                    ])
                }
            },
            "job-getid" => ok(&[("jobid", &layout.kvsname)]),
            "kvs-put" => match self.put(c.get("key"), c.get("value")) {
                Ok(()) => ok(&[]),
                Err(PutRefused::TooLong) => fail(&format!(
                    "key or value too long (at most {KEYLEN_MAX} and {VALLEN_MAX} bytes)"
                )),
                Err(PutRefused::Missing) => fail("kvs-put needs a key and a value"),
            },
            "kvs-get" => match c.get("key") {
                Some(k) => match self.state.lock().expect("pmi lock").kvs.get(k) {
                    Some(v) => ok(&[("found", "TRUE"), ("value", v)]),
                    None => ok(&[("found", "FALSE")]),
                },
                None => fail("kvs-get needs a key"),
            },
            "kvs-fence" => match self.fence(rank, generation) {
                Ok(()) => ok(&[]),
                Err(_) if self.state.lock().expect("pmi lock").generation != generation => {
                    return None
                }
                // As in PMI-1: krun ends the job; the rank waits here for its end.
                Err(_) => loop {
                    std::thread::park();
                },
            },
            "info-putnodeattr" => match (c.get("key"), c.get("value")) {
                (Some(k), Some(v)) if k.len() <= KEYLEN_MAX && v.len() <= VALLEN_MAX => {
                    let mut st = self.state.lock().expect("pmi lock");
                    st.node_attrs.insert(k.to_string(), v.to_string());
                    drop(st);
                    self.changed.notify_all();
                    ok(&[])
                }
                (Some(_), Some(_)) => fail("key or value too long"),
                _ => fail("info-putnodeattr needs a key and a value"),
            },
            "info-getnodeattr" => match c.get("key") {
                Some(k) => {
                    let wait = c.get("wait") == Some("TRUE");
                    let mut st = self.state.lock().expect("pmi lock");
                    loop {
                        if st.generation != generation {
                            return None;
                        }
                        if let Some(v) = st.node_attrs.get(k) {
                            break ok(&[("found", "TRUE"), ("value", v)]);
                        }
                        if !wait {
                            break ok(&[("found", "FALSE")]);
                        }
                        st = self.changed.wait(st).expect("pmi lock");
                    }
                }
                None => fail("info-getnodeattr needs a key"),
            },
            "info-getjobattr" => match c.get("key") {
                Some("PMI_process_mapping") => ok(&[("found", "TRUE"), ("value", &layout.mapping)]),
                Some("universeSize") => {
                    ok(&[("found", "TRUE"), ("value", &layout.size.to_string())])
                }
                Some(_) => ok(&[("found", "FALSE")]),
                None => fail("info-getjobattr needs a key"),
            },
            "finalize" => {
                self.mark(rank, |r| r.finalized = true);
                ok(&[])
            }
            "abort" => {
                self.mark(rank, |r| r.aborted = true);
                if let Some(msg) = c.get("msg").filter(|m| !m.is_empty()) {
                    eprintln!(
                        "krund: node {}: rank {rank} aborts the job: {msg}",
                        self.node
                    );
                }
                (self.tell)(PmiToLauncher::Abort {
                    wire: Wire::Pmi1,
                    rank,
                    code: 1,
                });
                return None;
            }
            other => fail(&format!("{other} is not served by krund")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_escaped_semicolons_and_bad_ones_say_why() {
        let c = parse("cmd=kvs-put;key=k;value=a;;b=c;;;").unwrap();
        assert_eq!(c.cmd, "kvs-put");
        assert_eq!(c.get("key"), Some("k"));
        assert_eq!(c.get("value"), Some("a;b=c;"));
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("key=k;").unwrap_err().contains("not cmd"));
        assert!(parse("cmd=x;key").unwrap_err().contains("key=value"));
        assert!(parse("cmd=x;key=v").unwrap_err().contains("closing"));
        assert!(parse("cmd=;").unwrap_err().contains("not cmd"));
    }

    #[test]
    fn answers_are_framed_with_their_length_and_escaped() {
        let f = frame("kvs-get-response", &[("rc", "0"), ("value", "x;y")]);
        let text = String::from_utf8(f).unwrap();
        let body = "cmd=kvs-get-response;rc=0;value=x;;y;";
        assert_eq!(text, format!("{:<6}{body}", body.len()));
        assert_eq!(
            parse(&text[6..]).unwrap().get("value"),
            Some("x;y"),
            "round trip"
        );
    }

    #[test]
    fn a_length_field_that_lies_or_is_too_long_is_refused() {
        let mut r: &[u8] = b"abcdefcmd=x;";
        assert!(read_command(&mut r).unwrap_err().contains("not a number"));
        let mut r: &[u8] = b"99999 cmd=x;";
        assert!(read_command(&mut r).unwrap_err().contains("at most"));
        let mut r: &[u8] = b"20    cmd=x;";
        assert!(read_command(&mut r).unwrap_err().contains("cut short"));
        let mut r: &[u8] = b"";
        assert_eq!(read_command(&mut r).unwrap(), None);
    }
}
