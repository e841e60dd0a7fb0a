//! The operator documentation stays in step with the settings the daemon reads: every
//! variable in `settings::VARIABLES` has a row in the settings tables, a line in the
//! systemd environment file example, and a line in `tokend serve --help`.

use std::path::Path;

use tokend::settings::VARIABLES;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {} failed: {error}", path.display()))
}

/// Returns the table rows of the section that starts with the heading `heading`.
fn table_rows<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    text[start + 1..]
        .lines()
        .skip(1)
        .take_while(|line| !line.starts_with("## ") && !line.starts_with("### "))
        .filter(|line| line.starts_with('|'))
        .collect()
}

/// Returns the variables that no row names in backquotes.
fn undocumented(rows: &[&str]) -> Vec<&'static str> {
    VARIABLES
        .iter()
        .copied()
        .filter(|variable| {
            let quoted = format!("`{variable}`");
            !rows.iter().any(|row| row.contains(&quoted))
        })
        .collect()
}

#[test]
fn operations_guide_lists_every_setting() {
    let text = read("docs/operations.md");
    let missing = undocumented(&table_rows(&text, "## Settings"));
    assert!(
        missing.is_empty(),
        "docs/operations.md has no row for {missing:?} in the table under \"## Settings\"; \
         add one per variable with its file key, default and meaning"
    );
}

#[test]
fn readme_lists_every_setting() {
    let text = read("README.md");
    let missing = undocumented(&table_rows(&text, "### Settings"));
    assert!(
        missing.is_empty(),
        "README.md has no row for {missing:?} in the table under \"### Settings\"; add one \
         per variable"
    );
}

#[test]
fn environment_file_example_lists_every_setting() {
    let text = read("deploy/systemd/tokend.env.example");
    let missing: Vec<_> = VARIABLES
        .iter()
        .filter(|variable| {
            !text.lines().any(|line| {
                line.trim_start_matches('#')
                    .starts_with(&format!("{variable}="))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/systemd/tokend.env.example has no line for {missing:?}; add a comment that \
         says what it sets and a line `#VARIABLE=default`"
    );
}

#[test]
fn serve_help_lists_every_setting() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let missing: Vec<_> = VARIABLES
        .iter()
        .filter(|variable| !help.contains(*variable))
        .collect();
    assert!(
        missing.is_empty(),
        "`tokend serve --help` does not mention {missing:?}; add them to SERVE_HELP in \
         src/cli.rs"
    );
}
