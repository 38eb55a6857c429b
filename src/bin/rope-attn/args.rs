//! A small hand-written argument parser: positionals, `--name VALUE` / `--name=VALUE` options,
//! boolean flags, `-h`/`--help`, and `--` to end options. Every mistake is a usage error that
//! names the option (the caller turns it into exit code 2).

use std::collections::{HashMap, HashSet};

/// What one subcommand accepts.
pub struct Spec {
    /// The subcommand's name, for messages.
    pub command: &'static str,
    /// Options that take a value (`"--seq-len"`).
    pub options: &'static [&'static str],
    /// Options that take none (`"--json"`).
    pub flags: &'static [&'static str],
}

/// Parsed arguments of one subcommand.
#[derive(Debug, Default)]
pub struct Args {
    pub positionals: Vec<String>,
    values: HashMap<&'static str, String>,
    flags: HashSet<&'static str>,
    /// `-h` or `--help` was given.
    pub help: bool,
}

impl Spec {
    pub fn parse(&self, argv: &[String]) -> Result<Args, String> {
        let mut out = Args::default();
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            if arg == "--" {
                out.positionals.extend(it.by_ref().cloned());
                break;
            }
            if arg == "-h" || arg == "--help" {
                out.help = true;
                continue;
            }
            if !arg.starts_with('-') || arg == "-" {
                out.positionals.push(arg.clone());
                continue;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (arg.as_str(), None),
            };
            if let Some(&flag) = self.flags.iter().find(|f| **f == name) {
                if inline.is_some() {
                    return Err(format!("{flag} takes no value"));
                }
                out.flags.insert(flag);
            } else if let Some(&opt) = self.options.iter().find(|o| **o == name) {
                let value = match inline {
                    Some(v) => v,
                    None => it.next().cloned().ok_or_else(|| format!("{opt} needs a value"))?,
                };
                out.values.insert(opt, value);
            } else {
                return Err(format!(
                    "unknown option `{name}` for `{}` (see `rope-attn {} --help`)",
                    self.command, self.command
                ));
            }
        }
        Ok(out)
    }
}

impl Args {
    pub fn flag(&self, name: &str) -> bool {
        self.flags.contains(name)
    }

    pub fn value(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// A non-negative integer (`131072`, or an integral `1e6`).
    pub fn count(&self, name: &str) -> Result<Option<usize>, String> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => {
                let x = self.number(name, v)?;
                if x < 0.0 || x.fract() != 0.0 || x > 1e15 {
                    return Err(format!("{name} expects a non-negative integer, got `{v}`"));
                }
                Ok(Some(x as usize))
            }
        }
    }

    /// A finite positive number (`1e6` accepted).
    pub fn positive(&self, name: &str) -> Result<Option<f64>, String> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => {
                let x = self.number(name, v)?;
                if x <= 0.0 {
                    return Err(format!("{name} must be > 0, got `{v}`"));
                }
                Ok(Some(x))
            }
        }
    }

    fn number(&self, name: &str, v: &str) -> Result<f64, String> {
        match v.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(format!("{name} expects a number, got `{v}`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec { command: "t", options: &["--seq-len"], flags: &["--json"] };

    fn parse(a: &[&str]) -> Result<Args, String> {
        SPEC.parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn options_flags_and_positionals() {
        let a = parse(&["c.json", "--seq-len", "1e3", "--json", "d.json"]).unwrap();
        assert_eq!(a.positionals, ["c.json", "d.json"]);
        assert_eq!(a.count("--seq-len").unwrap(), Some(1000));
        assert!(a.flag("--json"));
        let b = parse(&["--seq-len=42", "--", "--json"]).unwrap();
        assert_eq!(b.count("--seq-len").unwrap(), Some(42));
        assert_eq!(b.positionals, ["--json"]);
        assert!(!b.flag("--json"));
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse(&["--nope"]).unwrap_err().contains("--nope"));
        assert!(parse(&["--seq-len"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--seq-len", "1.5"]).unwrap().count("--seq-len").unwrap_err().contains("integer"));
        assert!(parse(&["--json=1"]).unwrap_err().contains("no value"));
    }
}
