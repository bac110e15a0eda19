//! Topology files: a TOML description of how one machine is split between
//! the host kernel and the kernels mkctl spawns.
//!
//! `load` is the only way in: it reads the file ([`schema`]), checks every
//! rule ([`validate`]) and returns a [`Topology`] only when nothing is wrong.
//! Every finding carries the file, line and column and a concrete fix.

pub mod diag;
pub mod model;
pub mod place;
pub mod schema;
pub mod validate;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Severity, Source};
pub use model::{
    HostShare, ImageSpec, Instance, KernelSeries, Machine, Node, Pool, Restart, Topology,
    WindowSpec,
};
pub use schema::Backend;

/// Why a topology could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read at all (a usage problem, exit code 2).
    #[error("cannot read topology file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read and breaks rules (exit code 1).
    #[error("{} is not a valid topology ({} error(s))", file.path().display(), diagnostics.iter().filter(|d| d.is_error()).count())]
    Invalid {
        file: Box<Source>,
        diagnostics: Vec<Diagnostic>,
    },
}

impl LoadError {
    /// Every finding rendered for a terminal, errors first, with a summary.
    pub fn render(&self) -> String {
        match self {
            LoadError::Read { .. } => format!("mkctl: {}\n", crate::error_chain(self)),
            LoadError::Invalid { file, diagnostics } => render_all(file, diagnostics),
        }
    }
}

/// Renders diagnostics and a closing count line.
pub fn render_all(source: &Source, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for d in diagnostics {
        out.push_str(&source.render(d));
        out.push('\n');
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = diagnostics.len() - errors;
    if errors > 0 {
        out.push_str(&format!(
            "{}: {errors} error(s), {warnings} warning(s); nothing was started\n",
            source.path().display()
        ));
    } else if warnings > 0 {
        out.push_str(&format!(
            "{}: valid, {warnings} warning(s)\n",
            source.path().display()
        ));
    }
    out
}

/// Reads and validates a topology file. `discover` describes the running
/// machine; it is called only when the file has no `[machine]` table.
pub fn load(
    path: &Path,
    discover: impl FnOnce() -> Option<Machine>,
) -> Result<Topology, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(Source::new(path, text), discover)
}

/// Validates topology text that was already read (`source.path` names it in
/// messages and anchors relative kernel paths).
pub fn parse(
    source: Source,
    discover: impl FnOnce() -> Option<Machine>,
) -> Result<Topology, LoadError> {
    let (raw, diags) = schema::read(&source.text);
    let syntax_broken = diags.iter().any(|d| d.code == "toml-syntax");
    let discovered = if raw.machine.is_none() && !syntax_broken {
        discover().map(|mut m| {
            m.discovered = true;
            m
        })
    } else {
        None
    };
    if syntax_broken {
        return Err(LoadError::Invalid {
            file: Box::new(source),
            diagnostics: diags,
        });
    }
    validate::validate(&source, raw, discovered, diags).map_err(|diagnostics| LoadError::Invalid {
        file: Box::new(source),
        diagnostics,
    })
}
