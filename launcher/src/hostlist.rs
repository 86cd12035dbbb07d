//! Slurm's hostlist grammar: `expand("n[01-03,7],gpu[1-2]-ib")` and its inverse `compress`,
//! as `scontrol show hostnames` / `scontrol show hostlist` do.
//!
//! Grammar: a list of names separated by top-level commas; a name is text with zero or more
//! bracket groups; a group is comma-separated numbers or `lo-hi` ranges. The width of `lo`
//! gives the zero padding. Several groups in one name expand as a cartesian product, the
//! first group varying slowest.
use crate::error::{LauncherError, Result};

/// Upper bound on expanded names, so a typo like `n[0-999999999]` fails instead of eating memory.
pub const MAX_HOSTS: usize = 1 << 20;

fn malformed(expr: &str, pos: usize, what: &str) -> LauncherError {
    LauncherError::Usage(format!(
        "malformed hostlist {expr:?} at position {pos}: {what}"
    ))
}

/// One piece of a name: literal text or the numbers of a bracket group.
enum Piece {
    Text(String),
    Numbers(Vec<String>),
}

/// Expands a hostlist expression into host names, in order.
pub fn expand(expr: &str) -> Result<Vec<String>> {
    let bytes = expr.as_bytes();
    let mut hosts = Vec::new();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    let flush = |pieces: &mut Vec<Piece>,
                 text: &mut String,
                 hosts: &mut Vec<String>,
                 pos: usize|
     -> Result<()> {
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(text)));
        }
        if pieces.is_empty() {
            return Err(malformed(expr, pos, "empty host name"));
        }
        let mut names = vec![String::new()];
        for p in pieces.drain(..) {
            names = match p {
                Piece::Text(t) => names.into_iter().map(|n| n + &t).collect(),
                Piece::Numbers(nums) => {
                    if names.len().saturating_mul(nums.len()) > MAX_HOSTS {
                        return Err(malformed(expr, pos, "expands to too many hosts"));
                    }
                    names
                        .iter()
                        .flat_map(|n| nums.iter().map(move |x| format!("{n}{x}")))
                        .collect()
                }
            };
        }
        if hosts.len() + names.len() > MAX_HOSTS {
            return Err(malformed(expr, pos, "expands to too many hosts"));
        }
        hosts.extend(names);
        Ok(())
    };
    while i < bytes.len() {
        match bytes[i] {
            b',' => {
                flush(&mut pieces, &mut text, &mut hosts, i)?;
                i += 1;
            }
            b'[' => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                let close = expr[i..]
                    .find(']')
                    .map(|o| i + o)
                    .ok_or_else(|| malformed(expr, i, "'[' is never closed"))?;
                pieces.push(Piece::Numbers(parse_group(expr, i + 1, close)?));
                i = close + 1;
            }
            b']' => return Err(malformed(expr, i, "']' without '['")),
            c if c.is_ascii_whitespace() => {
                return Err(malformed(expr, i, "whitespace in a host name"))
            }
            _ => {
                let ch = expr[i..].chars().next().expect("in bounds");
                text.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    if !expr.is_empty() {
        flush(&mut pieces, &mut text, &mut hosts, expr.len())?;
    }
    Ok(hosts)
}

/// Parses `1,3,05-07` between `start` and `end` (exclusive) into formatted numbers.
fn parse_group(expr: &str, start: usize, end: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut pos = start;
    for part in expr[start..end].split(',') {
        let number = |s: &str, at: usize| -> Result<u64> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed(expr, at, &format!("{s:?} is not a number")));
            }
            s.parse()
                .map_err(|_| malformed(expr, at, &format!("{s:?} is too large")))
        };
        match part.split_once('-') {
            Some((lo_s, hi_s)) => {
                let lo = number(lo_s, pos)?;
                let hi = number(hi_s, pos + lo_s.len() + 1)?;
                if hi < lo {
                    return Err(malformed(
                        expr,
                        pos,
                        &format!("range {lo_s}-{hi_s} runs backwards"),
                    ));
                }
                if (hi - lo) as usize >= MAX_HOSTS || out.len() + (hi - lo) as usize >= MAX_HOSTS {
                    return Err(malformed(expr, pos, "range expands to too many hosts"));
                }
                let width = lo_s.len();
                out.extend((lo..=hi).map(|n| format!("{n:0width$}")));
            }
            None => {
                number(part, pos)?;
                out.push(part.to_string());
            }
        }
        pos += part.len() + 1;
    }
    Ok(out)
}

/// Splits `node007` into (`node`, 7, width 3); names without a numeric suffix give None.
fn split_suffix(name: &str) -> Option<(&str, u64, usize)> {
    let digits = name.bytes().rev().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 18 {
        return None;
    }
    let (prefix, num) = name.split_at(name.len() - digits);
    Some((prefix, num.parse().ok()?, digits))
}

/// `(lo, hi, width)`: the numbers lo..=hi printed with `width` digits.
type NumberRange = (u64, u64, usize);

/// Compresses host names into a hostlist expression. Consecutive names with the same prefix
/// share one bracket group; runs of consecutive numbers of equal width become ranges.
pub fn compress<S: AsRef<str>>(names: &[S]) -> String {
    // Groups of (prefix, numeric ranges) in input order; names without a number have None.
    let mut groups: Vec<(String, Option<Vec<NumberRange>>)> = Vec::new();
    for name in names.iter().map(AsRef::as_ref) {
        match split_suffix(name) {
            Some((prefix, n, width)) => {
                if let Some((p, Some(ranges))) = groups.last_mut() {
                    if p == prefix {
                        let last = ranges.last_mut().expect("groups hold at least one range");
                        // Unpadded numbers join unpadded ranges (9,10,11 -> 9-11); padded ones
                        // need the same width.
                        let unpadded = width == digits(n) && last.2 == digits(last.0);
                        if n == last.1 + 1 && (last.2 == width || unpadded) {
                            last.1 = n;
                        } else {
                            ranges.push((n, n, width));
                        }
                        continue;
                    }
                }
                groups.push((prefix.to_string(), Some(vec![(n, n, width)])));
            }
            None => groups.push((name.to_string(), None)),
        }
    }
    let mut out = Vec::new();
    for (prefix, ranges) in groups {
        match ranges {
            None => out.push(prefix),
            Some(r) if r.len() == 1 && r[0].0 == r[0].1 => {
                out.push(format!("{prefix}{:0w$}", r[0].0, w = r[0].2))
            }
            Some(r) => {
                let inner: Vec<String> = r
                    .iter()
                    .map(|&(lo, hi, w)| {
                        if lo == hi {
                            format!("{lo:0w$}")
                        } else {
                            format!("{lo:0w$}-{hi:0w$}")
                        }
                    })
                    .collect();
                out.push(format!("{prefix}[{}]", inner.join(",")));
            }
        }
    }
    out.join(",")
}

fn digits(n: u64) -> usize {
    n.to_string().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(e: &str) -> Vec<String> {
        expand(e).unwrap_or_else(|err| panic!("{e}: {err}"))
    }

    #[test]
    fn expands_like_scontrol_show_hostnames() {
        assert_eq!(ex("n1"), ["n1"]);
        assert_eq!(ex("n[1-3]"), ["n1", "n2", "n3"]);
        assert_eq!(ex("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(ex("n[1,3,5-6],login"), ["n1", "n3", "n5", "n6", "login"]);
        assert_eq!(
            ex("rack[1-2]-n[1-2]"),
            ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
        );
        assert_eq!(ex("a[1-2]b,c[9-10]"), ["a1b", "a2b", "c9", "c10"]);
        assert_eq!(ex("n[001-003]"), ["n001", "n002", "n003"]);
        assert!(ex("").is_empty());
    }

    #[test]
    fn malformed_expressions_name_the_position() {
        for (e, pos) in [
            ("n[1-", 1),
            ("n]", 1),
            ("n[a-b]", 2),
            ("n[3-1]", 2),
            ("n,,m", 2),
            ("n[1-2x]", 4),
            ("a b", 1),
        ] {
            let err = expand(e).unwrap_err().to_string();
            assert!(err.contains(&format!("position {pos}")), "{e}: {err}");
        }
        assert!(expand("n[0-99999999]")
            .unwrap_err()
            .to_string()
            .contains("too many"));
    }

    #[test]
    fn compresses_like_scontrol_show_hostlist() {
        assert_eq!(compress(&["n1", "n2", "n3"]), "n[1-3]");
        assert_eq!(compress(&["n01", "n02", "n04"]), "n[01-02,04]");
        assert_eq!(compress(&["n1", "login", "n2"]), "n1,login,n2");
        assert_eq!(compress(&["n3", "n1", "n2"]), "n[3,1-2]");
        assert_eq!(compress(&["gpu7"]), "gpu7");
        assert_eq!(compress(&["a", "b"]), "a,b");
        assert_eq!(compress(&["n9", "n10", "n11"]), "n[9-11]");
        assert_eq!(compress::<&str>(&[]), "");
    }

    #[test]
    fn compress_inverts_expand() {
        for e in ["n[1-3]", "n[01-02,04],login", "x[7-9,11]", "rack1-n[1-4]"] {
            assert_eq!(compress(&ex(e)), e, "{e}");
            assert_eq!(ex(&compress(&ex(e))), ex(e));
        }
    }
}
