//! Diagnostics about a topology file: what is wrong, where (file, line,
//! column from the TOML spans), which instances are involved, and what to
//! change. Rendered for people in the style of compiler messages, or as JSON.
//!
//! This module only formats; deciding what is wrong is `schema` and `validate`.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// How bad a diagnostic is. Errors make a topology invalid; warnings do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a topology file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable, grep-able name of the rule (`cpu-conflict`, `unknown-key`, ...).
    pub code: &'static str,
    pub message: String,
    /// Byte span in the source the finding is about, if it has one.
    pub span: Option<Range<usize>>,
    /// Other places that take part (e.g. the first holder of a CPU).
    pub related: Vec<(Range<usize>, String)>,
    /// Names of the instances involved.
    pub instances: Vec<String>,
    /// What to change, concretely.
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            message: message.into(),
            span: None,
            related: Vec::new(),
            instances: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, message)
        }
    }

    pub fn at(mut self, span: Range<usize>) -> Self {
        self.span = Some(span);
        self
    }

    pub fn at_opt(mut self, span: Option<Range<usize>>) -> Self {
        self.span = span;
        self
    }

    pub fn related(mut self, span: Range<usize>, note: impl Into<String>) -> Self {
        self.related.push((span, note.into()));
        self
    }

    pub fn instance(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.instances.contains(&name) {
            self.instances.push(name);
        }
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The text of a topology file and its name, to turn byte spans into
/// `file:line:column` and to quote lines.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        let text = text.into();
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path: path.into(),
            text,
            line_starts,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        let start = self.line_starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        (line + 1, col)
    }

    /// The text of a 1-based line, without its newline.
    pub fn line_text(&self, line: usize) -> &str {
        let start = self.line_starts[line - 1];
        let end = self
            .line_starts
            .get(line)
            .map_or(self.text.len(), |&e| e.saturating_sub(1));
        self.text[start..end].trim_end_matches('\r')
    }

    /// `path:line:col` of a byte offset.
    pub fn location(&self, offset: usize) -> String {
        let (l, c) = self.line_col(offset);
        format!("{}:{l}:{c}", self.path.display())
    }

    /// Renders one diagnostic for a terminal, compiler style.
    pub fn render(&self, d: &Diagnostic) -> String {
        let mut out = String::new();
        let kind = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(out, "{kind}[{}]: {}", d.code, d.message);
        match &d.span {
            Some(span) => {
                let (line, col) = self.line_col(span.start);
                let gutter = line.to_string().len();
                let pad = " ".repeat(gutter);
                let _ = writeln!(out, "{pad}--> {}:{line}:{col}", self.path.display());
                let _ = writeln!(out, "{pad} |");
                let text = self.line_text(line);
                let _ = writeln!(out, "{line} | {text}");
                let line_chars = text.chars().count();
                let width = self.text[span.clone()]
                    .lines()
                    .next()
                    .map_or(1, |s| s.chars().count())
                    .clamp(1, line_chars.saturating_sub(col - 1).max(1));
                let _ = writeln!(out, "{pad} | {}{}", " ".repeat(col - 1), "^".repeat(width));
                for (span, note) in &d.related {
                    let _ = writeln!(out, "{pad} = note: {note} ({})", self.location(span.start));
                }
                if let Some(help) = &d.help {
                    let _ = writeln!(out, "{pad} = help: {help}");
                }
            }
            None => {
                let _ = writeln!(out, "  --> {}", self.path.display());
                for (span, note) in &d.related {
                    let _ = writeln!(out, "   = note: {note} ({})", self.location(span.start));
                }
                if let Some(help) = &d.help {
                    let _ = writeln!(out, "   = help: {help}");
                }
            }
        }
        out
    }

    /// A diagnostic as a JSON object for tools.
    pub fn to_json(&self, d: &Diagnostic) -> serde_json::Value {
        let (line, column) = d.span.as_ref().map_or((None, None), |s| {
            let (l, c) = self.line_col(s.start);
            (Some(l), Some(c))
        });
        serde_json::json!({
            "severity": d.severity,
            "code": d.code,
            "message": d.message,
            "file": self.path.display().to_string(),
            "line": line,
            "column": column,
            "instances": d.instances,
            "help": d.help,
            "related": d.related.iter().map(|(s, n)| {
                let (l, c) = self.line_col(s.start);
                serde_json::json!({"line": l, "column": c, "note": n})
            }).collect::<Vec<_>>(),
        })
    }
}

/// The closest candidate to a misspelt word, if it is close enough to be a
/// likely typo (edit distance at most a third of its length, at least 1).
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.len() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_and_render() {
        let src = Source::new("t.toml", "a = 1\ncpus = \"2-3\"\n");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(13), (2, 8));
        let d = Diagnostic::error("x", "bad cpus")
            .at(13..18)
            .help("use 4-5");
        let r = src.render(&d);
        assert!(r.contains("--> t.toml:2:8"), "{r}");
        assert!(r.contains("2 | cpus = \"2-3\""), "{r}");
        assert!(r.contains("  |        ^^^^^"), "{r}");
        assert!(r.contains("= help: use 4-5"), "{r}");
    }

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("cpu", &["cpus", "memory"]), Some("cpus"));
        assert_eq!(did_you_mean("memroy", &["cpus", "memory"]), Some("memory"));
        assert_eq!(did_you_mean("zzzzzz", &["cpus", "memory"]), None);
    }
}
