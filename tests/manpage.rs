//! The committed man page, `doc/rsfs-overlay.1`, is exactly what clap_mangen renders from
//! `rsfs_overlay::cli::command()`, the same definition `--help` prints, so the two never disagree.
//!
//! After changing the command line, regenerate the page with `UPDATE_MAN=1 cargo test --test manpage`.

use std::path::PathBuf;

const REGENERATE: &str = "UPDATE_MAN=1 cargo test --test manpage";

fn man_page_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("doc/rsfs-overlay.1")
}

/// The page as clap_mangen renders it, except that the after-help text (the mount options table)
/// gets a proper heading instead of clap_mangen's "EXTRA" and is set without filling, so that its
/// columns stay aligned.
fn render() -> Vec<u8> {
    let mut page = Vec::new();
    clap_mangen::Man::new(rsfs_overlay::cli::command())
        .render(&mut page)
        .expect("rendering into memory cannot fail");
    let page = String::from_utf8(page).expect("clap_mangen writes UTF-8");
    retitle_extra_section(&page).into_bytes()
}

fn retitle_extra_section(page: &str) -> String {
    let mut out = String::with_capacity(page.len() + 32);
    let mut in_extra = false;
    let mut seen = false;
    for line in page.lines() {
        if line.starts_with(".SH ") && in_extra {
            out.push_str(".fi\n");
            in_extra = false;
        }
        if line == ".SH EXTRA" {
            out.push_str(".SH \"MOUNT OPTIONS\"\n.nf\n");
            in_extra = true;
            seen = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if in_extra {
        out.push_str(".fi\n");
    }
    assert!(
        seen,
        "clap_mangen rendered no EXTRA section (the after-help options table)"
    );
    out
}

/// The first line where the two pages differ, numbered from 1, for the failure message.
fn first_difference(committed: &[u8], rendered: &[u8]) -> String {
    let committed = String::from_utf8_lossy(committed);
    let rendered = String::from_utf8_lossy(rendered);
    let mut old = committed.lines();
    let mut new = rendered.lines();
    for number in 1.. {
        match (old.next(), new.next()) {
            (Some(a), Some(b)) if a == b => continue,
            (None, None) => break,
            (a, b) => {
                return format!(
                    "line {number}:\n  committed: {}\n  rendered:  {}",
                    a.unwrap_or("<end of file>"),
                    b.unwrap_or("<end of file>")
                );
            }
        }
    }
    "line endings or a trailing newline".to_owned()
}

#[test]
fn man_page_matches_the_command_line() {
    let path = man_page_path();
    let rendered = render();

    if std::env::var_os("UPDATE_MAN").is_some_and(|v| v == "1") {
        std::fs::write(&path, &rendered)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
        return;
    }

    let committed = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; generate it with `{REGENERATE}`",
            path.display()
        )
    });
    assert!(
        committed == rendered,
        "{} is out of date with the clap definition in src/cli.rs (first difference at {}); \
         run `{REGENERATE}` and commit the result",
        path.display(),
        first_difference(&committed, &rendered)
    );
}
