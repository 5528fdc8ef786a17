//! Installing and running the external SignalR clients (Node and Python)
//! that `protocol-tests/clients.rs` drives against feedhub.
//!
//! * [`node`] makes sure `protocol-tests/js/node_modules` matches
//!   `package-lock.json` (`npm ci`, at most once at a time across threads and
//!   processes) and returns a [`Runtime`] that runs `.mjs` scripts.
//! * [`python`] makes sure a virtualenv under `target/` has
//!   `protocol-tests/python/requirements.txt` installed.
//! * [`Runtime::run`] runs a script with environment variables and a hard
//!   timeout (the process is killed when it expires), forwarding every output
//!   line to the test's output, and returns a [`ScriptRun`] to assert on.
//!
//! When Node, npm or Python is missing (or installing the clients fails), the
//! helpers panic if `CI=true`, and otherwise print `SKIPPED: ...` and return
//! `None` so the test passes vacuously on a developer machine without them.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// How long installing the npm or pip packages may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// A lock directory older than this is left over from a killed process.
const STALE_LOCK: Duration = Duration::from_secs(900);

/// The crate root (where `Cargo.toml` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `protocol-tests/js`.
pub fn js_dir() -> PathBuf {
    repo_root().join("protocol-tests").join("js")
}

/// `protocol-tests/python`.
pub fn python_dir() -> PathBuf {
    repo_root().join("protocol-tests").join("python")
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                repo_root().join(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// True when running under CI (`CI=true`), where a missing tool is a failure.
pub fn is_ci() -> bool {
    matches!(
        std::env::var("CI")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Ok("true") | Ok("1") | Ok("yes")
    )
}

/// Fails the test under CI, otherwise reports the skip; always returns `None`.
fn unavailable<T>(what: &str, reason: &str) -> Option<T> {
    if is_ci() {
        panic!("{what} is required under CI=true but unavailable: {reason}");
    }
    println!("SKIPPED: {what} unavailable ({reason}); set CI=true to make this a failure");
    eprintln!("SKIPPED: {what} unavailable ({reason})");
    None
}

/// Runs `program --version`; `Err` describes why it is not usable.
fn version_of(program: &OsStr) -> Result<String, String> {
    match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => Err(format!(
            "`{} --version` exited with {}: {}",
            program.to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(err) => Err(format!("`{}` not found: {err}", program.to_string_lossy())),
    }
}

/// A program plus leading arguments that runs test scripts.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// What it is, for messages ("node", "python").
    pub name: &'static str,
    program: PathBuf,
    dir: PathBuf,
}

/// The finished (or killed) run of a script.
#[derive(Debug)]
pub struct ScriptRun {
    /// What was run, for messages.
    pub label: String,
    /// Exit status; `None` when it was killed on timeout.
    pub status: Option<ExitStatus>,
    /// True when the hard timeout expired and the process was killed.
    pub timed_out: bool,
    /// Everything it printed (stdout and stderr interleaved by line).
    pub output: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl ScriptRun {
    /// True when the script exited with status 0 within its timeout.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// Panics (failing the test) unless the script succeeded. The script's
    /// full output has already been printed; the message repeats its summary.
    pub fn assert_success(&self) {
        if self.success() {
            return;
        }
        let how = if self.timed_out {
            format!("was killed after {:?} (timeout)", self.elapsed)
        } else {
            match self.status {
                Some(status) => format!("exited with {status}"),
                None => "did not exit normally".to_string(),
            }
        };
        let summary: Vec<&str> = self
            .output
            .lines()
            .filter(|l| {
                l.starts_with("FAILED:")
                    || l.starts_with("FAIL ")
                    || l.contains(" passed, ")
                    || l.contains("Error")
            })
            .take(60)
            .collect();
        panic!(
            "{} {how}.\n--- failures and summary (full output above) ---\n{}",
            self.label,
            if summary.is_empty() {
                last_lines(&self.output, 40)
            } else {
                summary.join("\n")
            }
        );
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Runtime {
    /// Runs `script` (relative to this runtime's script directory) with the
    /// given environment, killing it after `timeout`. Output lines are
    /// printed as they arrive, prefixed with `[label]`.
    pub async fn run(&self, script: &str, envs: &[(&str, String)], timeout: Duration) -> ScriptRun {
        let label = format!("{} {script}", self.name);
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.arg(script)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Python: no buffering surprises when output is a pipe.
            .env("PYTHONUNBUFFERED", "1")
            .env("NODE_NO_WARNINGS", "1");
        for (key, value) in envs {
            cmd.env(key, value);
        }
        println!("[{label}] starting with timeout {timeout:?}");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("cannot spawn {label}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let collected = std::sync::Arc::new(Mutex::new(String::new()));
        let out_task = tokio::spawn(forward(stdout, label.clone(), collected.clone()));
        let err_task = tokio::spawn(forward(
            stderr,
            format!("{label} stderr"),
            collected.clone(),
        ));

        let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => (Some(status), false),
            Ok(Err(err)) => panic!("waiting for {label} failed: {err}"),
            Err(_) => {
                println!("[{label}] TIMEOUT after {timeout:?}: killing it");
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                (None, true)
            }
        };
        // The pipes close when the process exits; don't hang on a grandchild holding them.
        let _ = tokio::time::timeout(Duration::from_secs(5), out_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), err_task).await;
        let elapsed = started.elapsed();
        println!("[{label}] finished in {elapsed:?}: status {status:?}, timed out: {timed_out}");
        let output = collected.lock().unwrap_or_else(|e| e.into_inner()).clone();
        ScriptRun {
            label,
            status,
            timed_out,
            output,
            elapsed,
        }
    }
}

async fn forward<R: AsyncRead + Unpin>(
    reader: R,
    label: String,
    collected: std::sync::Arc<Mutex<String>>,
) {
    let mut lines = BufReader::new(reader).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                println!("[{label}] {line}");
                let mut all = collected.lock().unwrap_or_else(|e| e.into_inner());
                all.push_str(&line);
                all.push('\n');
            }
            Ok(None) => break,
            Err(err) => {
                println!("[{label}] <output not readable: {err}>");
                break;
            }
        }
    }
}

/// A cross-process lock: a directory created atomically, removed on drop.
struct DirLock {
    path: PathBuf,
}

impl DirLock {
    fn acquire(path: PathBuf, wait: Duration) -> io::Result<DirLock> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let deadline = Instant::now() + wait;
        loop {
            match fs::create_dir(&path) {
                Ok(()) => return Ok(DirLock { path }),
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .is_some_and(|age| age > STALE_LOCK);
                    if stale {
                        println!("removing stale lock {}", path.display());
                        let _ = fs::remove_dir(&path);
                        continue;
                    }
                    if Instant::now() > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("lock {} still held after {wait:?}", path.display()),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.path);
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Runs a blocking setup command with a timeout, capturing its output.
fn run_setup(mut cmd: Command, what: &str) -> Result<(), String> {
    println!("setup: {what}");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("{what}: cannot start: {err}"))?;
    // Drain the pipes on threads so a chatty installer can't block on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > INSTALL_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: killed after {INSTALL_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("{what}: wait failed: {e}")),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    println!(
        "setup: {what}: {status} in {:?}\n{}{}",
        started.elapsed(),
        last_lines(&stdout, 20),
        last_lines(&stderr, 20)
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {status}\n{}\n{}",
            last_lines(&stdout, 40),
            last_lines(&stderr, 40)
        ))
    }
}

/// Serialises setup within this process (tests run on parallel threads).
fn setup_mutex() -> &'static Mutex<()> {
    static M: OnceLock<Mutex<()>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(()))
}

/// Node with `protocol-tests/js` dependencies installed, or `None` (skipped).
pub fn node() -> Option<Runtime> {
    static READY: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let result = READY.get_or_init(|| {
        let _guard = setup_mutex().lock().unwrap_or_else(|e| e.into_inner());
        prepare_node(js_dir(), ".feedhub-npm-ci.lock")
    });
    match result {
        Ok(rt) => Some(rt.clone()),
        Err(reason) => unavailable("Node.js client tests (node + npm)", reason),
    }
}

/// Node with the demo page's build dependencies (`js-client-demo`: esbuild and the SignalR
/// packages) installed, or `None` (skipped).
pub fn demo_node() -> Option<Runtime> {
    static READY: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let result = READY.get_or_init(|| {
        let _guard = setup_mutex().lock().unwrap_or_else(|e| e.into_inner());
        prepare_node(
            repo_root().join("js-client-demo"),
            ".feedhub-demo-npm-ci.lock",
        )
    });
    match result {
        Ok(rt) => Some(rt.clone()),
        Err(reason) => unavailable("the demo page build (node + npm)", reason),
    }
}

/// Chromium for the browser tests (`FEEDHUB_CHROMIUM`, default `/usr/bin/chromium`), or
/// `None` (skipped; a failure under `CI=true`). `.ci/run` installs it with apt.
pub fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("FEEDHUB_CHROMIUM")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !path.exists() {
        return unavailable(
            "Chromium (browser tests)",
            &format!("{} not found (apt-get install chromium)", path.display()),
        );
    }
    match version_of(path.as_os_str()) {
        Ok(v) => {
            println!("{v}");
            Some(path)
        }
        Err(reason) => unavailable("Chromium (browser tests)", &reason),
    }
}

fn prepare_node(dir: PathBuf, lock_name: &str) -> Result<Runtime, String> {
    let node = PathBuf::from("node");
    let version = version_of(node.as_os_str())?;
    println!("node {version}");
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 18 {
        return Err(format!("node {version} is too old (need >= 18)"));
    }
    let lock_file = dir.join("package-lock.json");
    let installed_marker = dir.join("node_modules").join(".package-lock.json");
    let needs_install = |marker: &Path| match (mtime(marker), mtime(&lock_file)) {
        (Some(installed), Some(lock)) => installed < lock,
        _ => true,
    };
    if needs_install(&installed_marker) {
        let npm = PathBuf::from("npm");
        version_of(npm.as_os_str())?;
        let _lock = DirLock::acquire(target_dir().join(lock_name), INSTALL_TIMEOUT)
            .map_err(|e| format!("npm lock: {e}"))?;
        // Another process may have installed while we waited for the lock.
        if needs_install(&installed_marker) {
            let mut cmd = Command::new(&npm);
            cmd.args(["ci", "--no-audit", "--no-fund", "--prefer-offline"])
                .current_dir(&dir);
            run_setup(cmd, &format!("npm ci in {}", dir.display()))?;
        }
    }
    Ok(Runtime {
        name: "node",
        program: node,
        dir,
    })
}

/// Python with `protocol-tests/python/requirements.txt` installed in a
/// virtualenv under `target/`, or `None` (skipped).
pub fn python() -> Option<Runtime> {
    static READY: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let result = READY.get_or_init(|| {
        let _guard = setup_mutex().lock().unwrap_or_else(|e| e.into_inner());
        prepare_python()
    });
    match result {
        Ok(rt) => Some(rt.clone()),
        Err(reason) => unavailable("Python client tests (python3 + venv + pip)", reason),
    }
}

fn prepare_python() -> Result<Runtime, String> {
    let python = std::env::var_os("FEEDHUB_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let version = version_of(&python)?;
    println!("{version}");
    let requirements_path = python_dir().join("requirements.txt");
    let requirements = fs::read_to_string(&requirements_path)
        .map_err(|e| format!("cannot read {}: {e}", requirements_path.display()))?;
    let venv = target_dir().join("feedhub-pyvenv");
    let venv_python = venv.join("bin").join("python");
    let marker = venv.join(".feedhub-requirements.txt");
    let up_to_date = || {
        venv_python.exists() && fs::read_to_string(&marker).ok().as_deref() == Some(&requirements)
    };
    if !up_to_date() {
        let _lock = DirLock::acquire(target_dir().join(".feedhub-pyvenv.lock"), INSTALL_TIMEOUT)
            .map_err(|e| format!("venv lock: {e}"))?;
        if !up_to_date() {
            if !venv_python.exists() {
                let mut cmd = Command::new(&python);
                cmd.args([OsStr::new("-m"), OsStr::new("venv"), venv.as_os_str()]);
                run_setup(cmd, "python3 -m venv target/feedhub-pyvenv")?;
            }
            let mut cmd = Command::new(&venv_python);
            cmd.args([
                OsStr::new("-m"),
                OsStr::new("pip"),
                OsStr::new("install"),
                OsStr::new("--disable-pip-version-check"),
                OsStr::new("-q"),
                OsStr::new("-r"),
                requirements_path.as_os_str(),
            ]);
            run_setup(cmd, "pip install -r protocol-tests/python/requirements.txt")?;
            fs::write(&marker, &requirements).map_err(|e| format!("cannot write marker: {e}"))?;
        }
    }
    Ok(Runtime {
        name: "python",
        program: venv_python,
        dir: python_dir(),
    })
}
