//! The progress bar on stderr (drawn only when stderr is a terminal, at most 4 times a
//! second, so it costs the generator nothing measurable).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps labelled `phase`; `unit` names the steps (e.g. `ms`, `conns`).
pub fn bar(phase: &str, len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(4));
    let template = format!("{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}}");
    // The template is built from a constant pattern; fall back to the default style
    // rather than fail a bench over its decoration.
    let style = ProgressStyle::with_template(&template)
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(phase.to_string());
    bar
}
