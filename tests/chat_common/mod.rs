//! Helpers shared by the chat-data suites (tests/chat_data.rs, tests/chat_finetune.rs).
#![allow(dead_code)] // each suite uses a different subset
use std::path::Path;

/// Runs tests/hf/chat_templates.py with `args` in the project venv; its stdout. Fails the test
/// with the script's output when it fails.
pub fn chat_python(args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python3");
    let script = root.join("tests/hf/chat_templates.py");
    let out = std::process::Command::new(&python).arg(&script).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {}: {e}. These tests need the project venv: run scripts/setup.sh", python.display())
    });
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    assert!(out.status.success(), "{script:?} {args:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}
