//! A small getopt-style parser, enough for qemu-img's option syntax:
//! `-f fmt`, `-ffmt`, `--output=json`, `--output json`, `-p` flags, and operands.

use std::collections::HashMap;

/// One option: short letter (or '\0'), long name (or ""), whether it takes a value.
pub struct Spec {
    pub short: char,
    pub long: &'static str,
    pub value: bool,
}

/// Parsed options (by long name, or the short letter as a string when no long name) and operands.
#[derive(Default, Debug)]
pub struct Parsed {
    pub opts: HashMap<String, Vec<String>>,
    pub operands: Vec<String>,
    /// Every option in command-line order: (key, value).
    pub order: Vec<(String, String)>,
}

impl Parsed {
    pub fn flag(&self, key: &str) -> bool {
        self.opts.contains_key(key)
    }
    pub fn value(&self, key: &str) -> Option<&str> {
        self.opts
            .get(key)
            .and_then(|v| v.last())
            .map(|s| s.as_str())
    }
    pub fn values(&self, key: &str) -> Vec<String> {
        self.opts.get(key).cloned().unwrap_or_default()
    }
}

fn key(s: &Spec) -> String {
    if s.long.is_empty() {
        s.short.to_string()
    } else {
        s.long.to_string()
    }
}

/// Parse `args` (without the program and subcommand names).
pub fn parse(args: &[String], specs: &[Spec]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    let mut only_operands = false;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if only_operands || a == "-" || !a.starts_with('-') {
            p.operands.push(a.clone());
            continue;
        }
        if a == "--" {
            only_operands = true;
            continue;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let spec = specs
                .iter()
                .find(|s| !s.long.is_empty() && s.long == name)
                .ok_or_else(|| format!("unrecognized option '--{name}'"))?;
            let v = if spec.value {
                match inline {
                    Some(v) => v,
                    None => {
                        let v = args
                            .get(i)
                            .ok_or_else(|| format!("option '--{name}' requires an argument"))?;
                        i += 1;
                        v.clone()
                    }
                }
            } else {
                if inline.is_some() {
                    return Err(format!("option '--{name}' doesn't allow an argument"));
                }
                String::new()
            };
            p.order.push((key(spec), v.clone()));
            p.opts.entry(key(spec)).or_default().push(v);
            continue;
        }
        // Short options, possibly grouped: -pq, -fraw, -f raw.
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            let spec = specs
                .iter()
                .find(|s| s.short == c && c != '\0')
                .ok_or_else(|| format!("invalid option -- '{c}'"))?;
            if spec.value {
                let v = if j < chars.len() {
                    let v: String = chars[j..].iter().collect();
                    j = chars.len();
                    v
                } else {
                    let v = args
                        .get(i)
                        .ok_or_else(|| format!("option requires an argument -- '{c}'"))?;
                    i += 1;
                    v.clone()
                };
                p.order.push((key(spec), v.clone()));
                p.opts.entry(key(spec)).or_default().push(v);
            } else {
                p.order.push((key(spec), String::new()));
                p.opts.entry(key(spec)).or_default().push(String::new());
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let specs = [
            Spec {
                short: 'f',
                long: "format",
                value: true,
            },
            Spec {
                short: 'p',
                long: "",
                value: false,
            },
            Spec {
                short: '\0',
                long: "output",
                value: true,
            },
        ];
        let a: Vec<String> = ["-fraw", "-p", "--output=json", "x", "-f", "qcow2", "y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = parse(&a, &specs).unwrap();
        assert_eq!(p.value("format"), Some("qcow2"));
        assert!(p.flag("p"));
        assert_eq!(p.value("output"), Some("json"));
        assert_eq!(p.operands, vec!["x", "y"]);
        assert!(parse(&["-z".to_string()], &specs).is_err());
        assert!(parse(&["--output".to_string()], &specs).is_err());
    }
}
