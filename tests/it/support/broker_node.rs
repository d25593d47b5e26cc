//! A private RabbitMQ node owned by one test, started beside the shared broker.
//!
//! Each [`BrokerNode`] runs `rabbitmq-server` with its own node name, AMQP port, Erlang
//! distribution port, Erlang cookie (a private `HOME`) and a temporary folder holding its
//! config, data (`mnesia`), logs and pid file, so it can be stopped, killed and restarted
//! without touching the shared node (`rabbit@localhost`, 127.0.0.1:5672).
//!
//! On Debian the real start script is `/usr/lib/rabbitmq/bin/rabbitmq-server`; the
//! `/usr/sbin` wrapper is avoided because, run as root, it switches to the `rabbitmq` user
//! (who cannot write our temp folder) and writes to the shared node's `startup_log`.
//! Set `WARREN_RABBITMQ_BIN_DIR` to a folder holding `rabbitmq-server` and `rabbitmqctl`
//! to use another installation.
//!
//! Start-up takes roughly 8-10 s on a 2-core machine; a graceful stop about 1 s.
//!
//! Clean-up: `Drop` stops the node (SIGTERM, which RabbitMQ handles as a graceful
//! `rabbitmqctl stop`; SIGKILL to the node's process group after a deadline) and deletes
//! the temp folder. In case the test process dies without running `Drop` (SIGKILL, abort,
//! `process::exit`), a small watchdog shell process does the same once the test process
//! is gone. epmd is shared by all nodes and is left running.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long `start`/`start_again` wait for the node to accept an AMQP connection.
pub const START_DEADLINE: Duration = Duration::from_secs(90);
/// How long a graceful stop may take before the node is killed.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Start attempts when the node exits during start-up (e.g. epmd still holds the name).
const START_ATTEMPTS: u32 = 3;
/// The fixed port range `rabbitmqctl` uses for its own Erlang distribution listener.
const CTL_DIST_PORTS: std::ops::RangeInclusive<u16> = 35672..=35682;
/// Ports are picked below Linux's ephemeral range (32768-60999), so an outgoing
/// connection cannot grab a node's port while the node is stopped.
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);
/// Ports handed out in this process, never handed out twice.
static USED_PORTS: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A running (or stopped) private RabbitMQ node. See the module docs.
pub struct BrokerNode {
    name: String,
    port: u16,
    dist_port: u16,
    root: PathBuf,
    server_bin: PathBuf,
    ctl_bin: PathBuf,
    /// The Erlang cookie written to the node's private `HOME`.
    cookie: String,
    /// The management plugin's HTTP port, when the node runs it.
    management_port: Option<u16>,
    running: Option<Running>,
}

struct Running {
    /// The `rabbitmq-server` shell script: leader of the node's process group; it runs the
    /// Erlang VM as its child and exits when the VM exits.
    child: Child,
    watchdog: Option<Child>,
}

impl BrokerNode {
    /// True if a RabbitMQ installation usable by [`BrokerNode::start`] was found.
    pub fn is_available() -> bool {
        find_bins().is_ok()
    }

    /// A free port on 127.0.0.1 from the same pool as the nodes' own ports (never handed out
    /// twice in this process), for an extra listener set in `extra_conf`, e.g.
    /// `listeners.ssl.default = 127.0.0.1:<port>` for TLS.
    pub fn reserve_port() -> Result<u16> {
        let ports = pick_ports(1).context("picking a free port")?;
        ports
            .first()
            .copied()
            .ok_or_else(|| anyhow!("no free port found"))
    }

    /// Start a fresh private node and wait (up to [`START_DEADLINE`]) until it accepts an
    /// AMQP connection as guest/guest.
    pub async fn start() -> Result<BrokerNode> {
        Self::start_with_config("").await
    }

    /// Like [`BrokerNode::start`], with extra `rabbitmq.conf` lines appended to the node's
    /// config (e.g. `"consumer_timeout = 5000\n"`).
    pub async fn start_with_config(extra_conf: &str) -> Result<BrokerNode> {
        let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        Self::start_with_cookie(&cookie, extra_conf).await
    }

    /// Like [`BrokerNode::start_with_config`], with a given Erlang cookie: nodes (and their
    /// `rabbitmqctl`) sharing a cookie can talk to each other, e.g. to form a cluster
    /// (see `super::cluster`).
    pub async fn start_with_cookie(cookie: &str, extra_conf: &str) -> Result<BrokerNode> {
        Self::start_inner(cookie, extra_conf, false).await
    }

    /// Like [`BrokerNode::start_with_config`], with the `rabbitmq_management` plugin enabled
    /// (through the node's own `RABBITMQ_ENABLED_PLUGINS_FILE`) on a port of its own on
    /// 127.0.0.1 (see [`BrokerNode::management_url`]), and statistics collected every 500 ms
    /// instead of 5 s so the API's counts catch up quickly. Waits until the API answers too.
    pub async fn start_with_management(extra_conf: &str) -> Result<BrokerNode> {
        let cookie = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
        Self::start_inner(&cookie, extra_conf, true).await
    }

    async fn start_inner(cookie: &str, extra_conf: &str, management: bool) -> Result<BrokerNode> {
        let (server_bin, ctl_bin) = find_bins()?;
        let ports = pick_ports(if management { 3 } else { 2 }).context("picking free ports")?;
        let n = NODE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let name = format!("warren-t-{pid}-{n}-{tag}@localhost");
        let root = std::env::temp_dir().join(format!("warren-broker-{pid}-{n}-{tag}"));
        fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
        // From here on `Drop` removes the folder, whatever fails.
        let mut node = BrokerNode {
            name,
            port: ports[0],
            dist_port: ports[1],
            root,
            server_bin,
            ctl_bin,
            cookie: cookie.to_owned(),
            management_port: management.then(|| ports[2]),
            running: None,
        };
        node.write_files(extra_conf)?;
        node.start_node().await?;
        Ok(node)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `http://guest:guest@127.0.0.1:<port>` of the management API, when the node was started
    /// with [`BrokerNode::start_with_management`].
    pub fn management_url(&self) -> Option<String> {
        self.management_port
            .map(|p| format!("http://guest:guest@127.0.0.1:{p}"))
    }

    /// The node's AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's AMQP address (127.0.0.1:port), e.g. as a [`super::proxy::TcpProxy`] upstream.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The Erlang node name, `warren-t-…@localhost`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The node's temp folder (config, data, logs); deleted on drop.
    pub fn data_dir(&self) -> &Path {
        &self.root
    }

    /// The node's main log file.
    pub fn log_file(&self) -> PathBuf {
        self.root.join("log").join(format!("{}.log", self.name))
    }

    /// OS pid of the node's Erlang VM (from its pid file), while it runs.
    pub fn os_pid(&self) -> Option<u32> {
        self.running.as_ref()?;
        fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// True while the node's processes are alive (it may still be booting or stopping).
    pub fn is_running(&mut self) -> bool {
        match self.running.as_mut() {
            Some(run) => matches!(run.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stop the whole node gracefully (like `rabbitmqctl stop`). Data and config are kept
    /// for [`BrokerNode::start_again`]. No-op if it is not running.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(mut run) = self.running.take() else {
            return Ok(());
        };
        let pgid = run.child.id();
        signal(&pgid.to_string(), "TERM");
        let graceful = wait_exit(&mut run.child, STOP_DEADLINE).await?;
        finish(&mut run).await?;
        if !graceful {
            bail!(
                "node {} did not stop within {STOP_DEADLINE:?}; it was killed",
                self.name
            );
        }
        Ok(())
    }

    /// Crash the node: SIGKILL its whole process group (no graceful shutdown, like a power
    /// cut for the broker). Data written so far is kept for [`BrokerNode::start_again`].
    pub async fn kill(&mut self) -> Result<()> {
        let Some(mut run) = self.running.take() else {
            return Ok(());
        };
        finish(&mut run).await
    }

    /// Start the node again after [`stop`](BrokerNode::stop) or [`kill`](BrokerNode::kill):
    /// same name, ports and data folder. Waits until it accepts AMQP connections.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("node {} is already running", self.name);
        }
        self.running = None;
        self.start_node().await
    }

    /// [`stop`](BrokerNode::stop) then [`start_again`](BrokerNode::start_again).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Run `rabbitmqctl -n <node> <args…>` against this node and return its stdout,
    /// e.g. `node.rabbitmqctl(&["list_queues", "name", "messages"])` or
    /// `node.rabbitmqctl(&["close_all_connections", "test"])`. Takes about 1 s (CLI start-up).
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new(&self.ctl_bin);
        for var in scrubbed_vars() {
            cmd.env_remove(var);
        }
        cmd.envs(self.env())
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| anyhow!("rabbitmqctl {args:?} timed out"))?
            .with_context(|| format!("running {}", self.ctl_bin.display()))?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    // ---- internals ----

    fn pid_file(&self) -> PathBuf {
        self.root.join("run").join("node.pid")
    }

    fn console_log(&self) -> PathBuf {
        self.root.join("log").join("console.log")
    }

    fn write_files(&self, extra_conf: &str) -> Result<()> {
        for sub in ["home", "etc", "mnesia", "log", "run"] {
            fs::create_dir_all(self.root.join(sub))?;
        }
        let cookie = self.root.join("home").join(".erlang.cookie");
        fs::write(&cookie, &self.cookie)?;
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))?;
        let etc = self.root.join("etc");
        let management_conf = match self.management_port {
            Some(p) => format!(
                "management.tcp.port = {p}\n\
                 management.tcp.ip = 127.0.0.1\n\
                 collect_statistics_interval = 500\n"
            ),
            None => String::new(),
        };
        fs::write(
            etc.join("rabbitmq.conf"),
            format!(
                "# private test node {name}\n\
                 listeners.tcp.1 = 127.0.0.1:{port}\n\
                 loopback_users.guest = true\n\
                 {management_conf}\
                 {extra_conf}\n",
                name = self.name,
                port = self.port,
            ),
        )?;
        fs::write(etc.join("advanced.config"), "[].\n")?;
        let plugins = if self.management_port.is_some() {
            "[rabbitmq_management].\n"
        } else {
            "[].\n"
        };
        fs::write(etc.join("enabled_plugins"), plugins)?;
        // Keeps the scripts from sourcing /etc/rabbitmq/rabbitmq-env.conf (the shared node's).
        fs::write(etc.join("rabbitmq-env.conf"), "# private test node\n")?;
        Ok(())
    }

    /// Environment for both `rabbitmq-server` and `rabbitmqctl`.
    fn env(&self) -> Vec<(&'static str, String)> {
        let p = |sub: &str| self.root.join(sub).to_string_lossy().into_owned();
        vec![
            ("HOME", p("home")),
            ("RABBITMQ_NODENAME", self.name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", p("mnesia")),
            ("RABBITMQ_LOG_BASE", p("log")),
            (
                "RABBITMQ_PID_FILE",
                self.pid_file().to_string_lossy().into_owned(),
            ),
            ("RABBITMQ_CONFIG_FILE", p("etc/rabbitmq.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", p("etc/advanced.config")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", p("etc/enabled_plugins")),
            ("RABBITMQ_CONF_ENV_FILE", p("etc/rabbitmq-env.conf")),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ]
    }

    fn spawn(&self) -> Result<Running> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.console_log())?;
        let mut cmd = Command::new(&self.server_bin);
        for var in scrubbed_vars() {
            cmd.env_remove(var);
        }
        cmd.envs(self.env())
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: the node can be killed as a whole, and a Ctrl-C aimed at
            // the test run does not reach it (the watchdog/Drop clean it up).
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.server_bin.display()))?;
        let watchdog = spawn_watchdog(child.id(), &self.root);
        Ok(Running { child, watchdog })
    }

    /// Spawn the node and wait until it serves AMQP; retries if it exits during start-up.
    async fn start_node(&mut self) -> Result<()> {
        let mut attempt = 1;
        loop {
            let _ = fs::remove_file(self.pid_file());
            self.running = Some(self.spawn()?);
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let exited = !self.is_running();
                    if let Some(mut run) = self.running.take() {
                        finish(&mut run).await?;
                    }
                    if !exited || attempt >= START_ATTEMPTS {
                        return Err(e);
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let url = self.amqp_url();
        let addr = self.addr();
        loop {
            if let Some(run) = self.running.as_mut() {
                if let Some(status) = run.child.try_wait()? {
                    bail!(
                        "RabbitMQ node {} exited during start-up ({status})\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(5),
                    lapin::Connection::connect(&url, lapin::ConnectionProperties::default()),
                )
                .await;
                if let Ok(Ok(conn)) = attempt {
                    let _ = conn.close(200, "ready check".into()).await;
                    let api_up = self.management_port.is_none_or(|p| {
                        TcpStream::connect_timeout(
                            &SocketAddr::from(([127, 0, 0, 1], p)),
                            Duration::from_secs(1),
                        )
                        .is_ok()
                    });
                    if api_up {
                        return Ok(());
                    }
                }
            }
            if started.elapsed() > START_DEADLINE {
                bail!(
                    "RabbitMQ node {} did not accept AMQP connections on port {} within {START_DEADLINE:?}\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    fn log_tail(&self) -> String {
        let mut out = String::new();
        for file in [self.console_log(), self.log_file()] {
            out.push_str(&format!("--- last lines of {} ---\n", file.display()));
            out.push_str(&tail(&file, 30));
        }
        out
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        if let Some(mut run) = self.running.take() {
            let pgid = run.child.id();
            // Graceful first (quick, ~1 s), then the whole process group.
            signal(&pgid.to_string(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(run.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            signal(&format!("-{pgid}"), "KILL");
            let _ = run.child.kill();
            let _ = run.child.wait();
            stop_watchdog(&mut run);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Kill whatever is left of the node's process group, reap the script, stop the watchdog.
async fn finish(run: &mut Running) -> Result<()> {
    let pgid = run.child.id();
    signal(&format!("-{pgid}"), "KILL");
    if !wait_exit(&mut run.child, Duration::from_secs(10)).await? {
        let _ = run.child.kill();
        let _ = run.child.wait();
    }
    // The Erlang VM's helpers (erl_child_setup, inet_gethost, the disk monitor's shell)
    // share the group; make sure none is left.
    signal(&format!("-{pgid}"), "KILL");
    stop_watchdog(run);
    Ok(())
}

/// Poll until the child exits; false if the deadline passed first.
async fn wait_exit(child: &mut Child, deadline: Duration) -> Result<bool> {
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        if started.elapsed() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `kill -<sig> -- <target>`; target is a pid or `-pgid`. Errors (already gone) are ignored.
fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A shell process that cleans up the node if this test process dies without `Drop`.
fn spawn_watchdog(pgid: u32, root: &Path) -> Option<Child> {
    const SCRIPT: &str = r#"
parent=$1 pgid=$2 dir=$3
while kill -0 "$parent" 2>/dev/null; do sleep 1; done
kill -TERM -- "-$pgid" 2>/dev/null
for _ in $(seq 50); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.2; done
kill -KILL -- "-$pgid" 2>/dev/null
case "$dir" in */warren-broker-*) rm -rf -- "$dir" ;; esac
"#;
    Command::new("bash")
        .arg("-c")
        .arg(SCRIPT)
        .arg("warren-broker-watchdog")
        .arg(std::process::id().to_string())
        .arg(pgid.to_string())
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()
}

fn stop_watchdog(run: &mut Running) {
    if let Some(mut w) = run.watchdog.take() {
        signal(&format!("-{}", w.id()), "KILL");
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// Inherited variables that would redirect the node (or its CLI) elsewhere.
fn scrubbed_vars() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| {
            k.starts_with("RABBITMQ_")
                || matches!(
                    k.as_str(),
                    "ERL_FLAGS" | "ERL_AFLAGS" | "ERL_ZFLAGS" | "ERL_EPMD_PORT" | "NODENAME"
                )
        })
        .collect()
}

/// (`rabbitmq-server`, `rabbitmqctl`) to run directly (not Debian's `/usr/sbin` wrappers).
fn find_bins() -> Result<(PathBuf, PathBuf)> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("WARREN_RABBITMQ_BIN_DIR") {
        dirs.push(dir.into());
    }
    dirs.push("/usr/lib/rabbitmq/bin".into());
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.push("/usr/local/sbin".into());
    dirs.push("/usr/sbin".into());
    for dir in dirs {
        let server = dir.join("rabbitmq-server");
        let ctl = dir.join("rabbitmqctl");
        if is_wrapper(&server) {
            continue;
        }
        if server.is_file() && ctl.is_file() {
            return Ok((server, ctl));
        }
    }
    bail!(
        "rabbitmq-server not found: BrokerNode needs a local RabbitMQ installation \
         (apt-get install rabbitmq-server) or WARREN_RABBITMQ_BIN_DIR"
    )
}

/// Debian's `/usr/sbin/rabbitmq-server` is a symlink to `rabbitmq-script-wrapper`.
fn is_wrapper(path: &Path) -> bool {
    fs::canonicalize(path)
        .map(|p| p.ends_with("rabbitmq-script-wrapper"))
        .unwrap_or(false)
}

/// `n` distinct free ports on 127.0.0.1, below the ephemeral range, never handed out before
/// in this process, and outside `rabbitmqctl`'s distribution range.
fn pick_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut held: Vec<TcpListener> = Vec::new();
    let mut ports = Vec::new();
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        if tries > 1000 {
            return Err(std::io::Error::other("no free port found"));
        }
        let port = rand::random_range(PORT_RANGE);
        if CTL_DIST_PORTS.contains(&port) || used.contains(&port) || ports.contains(&port) {
            continue;
        }
        // A wildcard bind fails if anything listens on the port on any address.
        let Ok(listener) = TcpListener::bind(("0.0.0.0", port)) else {
            continue;
        };
        held.push(listener);
        ports.push(port);
    }
    used.extend(&ports);
    Ok(ports)
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return "(missing)\n".into();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    out
}
