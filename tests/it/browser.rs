//! The browser tests: `tests/browser/run.mjs` drives headless Debian chromium through
//! playwright-core against the real `roomd` binary (the script starts, kills with -9 and
//! restarts it itself). They cover `/client.js`, the demo at `/`, the kill -9 resume and
//! `/dashboard`, print the browser-to-browser vote latency, and write screenshots to
//! `target/browser-screenshots/`.
//!
//! Missing prerequisites fail this test with what to install; it never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole browser run, startup included, on a loaded two-core machine.
const DEADLINE: Duration = Duration::from_secs(240);

fn chromium() -> PathBuf {
    std::env::var_os("ROOMD_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

#[test]
fn browser_tests_pass_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/browser");
    let setup = "install them with `apt-get install -y chromium` and `(cd tests/browser && npm ci)`, as .ci/run does";
    assert!(
        chromium().exists(),
        "no chromium at {}: {setup}",
        chromium().display()
    );
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .exists(),
        "tests/browser/node_modules has no playwright-core: {setup}"
    );
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        node_ok,
        "`node` is not on PATH: install Node.js 18 or later"
    );

    let screenshots = root.join("target/browser-screenshots");
    // Output goes to files, so a chatty run can never block on a full pipe.
    let logs = tempfile::tempdir().expect("a temporary directory can be created");
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new("node")
        .arg(dir.join("run.mjs"))
        .current_dir(root)
        .env("ROOMD_BIN", env!("CARGO_BIN_EXE_roomd"))
        .env("ROOMD_SCREENSHOTS", &screenshots)
        .stdout(std::fs::File::create(&out_path).expect("a log file can be created"))
        .stderr(std::fs::File::create(&err_path).expect("a log file can be created"))
        .spawn()
        .expect("node can be started");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the node process can be waited on") {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    // Shown with `--nocapture` (the latency line), and on failure.
    println!("{stdout}");
    match status {
        Some(status) => assert!(
            status.success(),
            "browser tests failed ({status}):\n{stdout}\n{stderr}"
        ),
        None => panic!("browser tests did not finish within {DEADLINE:?}:\n{stdout}\n{stderr}"),
    }
}
