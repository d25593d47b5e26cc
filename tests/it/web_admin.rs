//! The web admin (`warren web`) against live in-process workers on the private management
//! node (`support::mgmt_node`): plain HTTP checks of its security (headers, CSRF, host and
//! token checks), and a headless Chromium over WebDriver (chromedriver, driven with
//! fantoccini) that loads every page, checks that none logs a console error, and clicks
//! replay on a dead letter.
//!
//! Chromium and chromedriver come from Debian (`scripts/ensure-chromium.sh`, which
//! `scripts/test` and `.ci/run` call). Without them the browser test **fails**. On failure it
//! saves a screenshot to `target/web-admin-failures/`; it always saves the overview to
//! `target/web-admin/overview.png`, and with `WARREN_UPDATE_SCREENSHOT=1` also to
//! `docs/web-admin-overview.png` (the one the docs show).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use warren::testing::TestWorker;
use warren::{
    Context, Message, QueueType, RedisStore, RetryPolicy, Service, StatusStore, Task, TaskError,
    Worker,
};
use warren_admin::web::{serve, WebConfig};
use warren_admin::{Admin, ManagementClient};
use warren_core::Broker;

use crate::common::{config_for, poll, unique};
use crate::support::mgmt_node::MgmtNode;

const DEADLINE: Duration = Duration::from_secs(30);

/// The web admin served in the background of a test; stopped on drop.
struct WebServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl WebServer {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn start_web(admin: Admin, token: Option<String>) -> WebServer {
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cfg = WebConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token,
    };
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        let r = serve(
            admin,
            cfg,
            |a| {
                let _ = tx.send(a);
            },
            shutdown,
        )
        .await;
        if let Err(e) = r {
            eprintln!("web admin stopped: {e}");
        }
    });
    let addr = tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("the web admin binds in time")
        .expect("the web admin bound");
    WebServer { addr, stop }
}

async fn admin_on(node: &MgmtNode, store: Option<Arc<dyn StatusStore>>) -> (Broker, Admin) {
    let broker = Broker::connect(config_for(&node.amqp_url(), QueueType::Quorum))
        .await
        .expect("broker");
    let mgmt = ManagementClient::new(node.management_url()).expect("management URL");
    let admin = Admin::new(broker.clone(), Some(mgmt), store, false)
        .await
        .expect("admin");
    (broker, admin)
}

fn redis_url() -> String {
    std::env::var("WARREN_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// A worker whose `<svc>.work` rejects every task until `fixed`, then records it; `<svc>.got`
/// subscribes to `topic`; `<svc>.step` returns key-values, `<svc>.hold` waits until `held`
/// says `true` (a chain step or fan-in target in flight).
async fn start_worker(
    node: &MgmtNode,
    svc: &str,
    topic: &str,
    fixed: Arc<AtomicBool>,
    held: tokio::sync::watch::Receiver<bool>,
    store: Arc<dyn StatusStore>,
) -> (TestWorker, Arc<Mutex<Vec<u64>>>) {
    let ledger = Arc::new(Mutex::new(Vec::new()));
    let seen = ledger.clone();
    let service = Service::new(svc)
        .method("step", |_: Context, _: Value| async move {
            Ok::<_, TaskError>(json!({"stepped": true}))
        })
        .method("hold", move |_: Context, _: Value| {
            let mut held = held.clone();
            async move {
                let _ = held.wait_for(|open| *open).await;
                Ok::<_, TaskError>(json!({"held": true}))
            }
        })
        .method("work", move |_: Context, n: u64| {
            let seen = seen.clone();
            let fixed = fixed.clone();
            async move {
                if !fixed.load(Ordering::SeqCst) {
                    return Err(TaskError::reject("not fixed yet"));
                }
                seen.lock().unwrap().push(n);
                Ok::<_, TaskError>(n * 10)
            }
        })
        .method("got", |_: Context, _: Value| async move {
            Ok::<_, TaskError>(())
        })
        .subscribe(topic, "got")
        .retry(RetryPolicy::none());
    let worker = TestWorker::start(
        Worker::builder()
            .amqp(config_for(&node.amqp_url(), QueueType::Quorum))
            .status_store(store)
            .service(service),
    )
    .await
    .expect("worker starts on the management node");
    (worker, ledger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_security_headers_csrf_host_and_token_checks() {
    let node = MgmtNode::shared().await;
    let (broker, admin) = admin_on(node, None).await;
    let web = start_web(admin.clone(), None).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let r = http.get(web.url("/")).send().await.expect("GET /");
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let html = r.text().await.unwrap();
    // The broker user's name may show (a worker's connection); its password never does.
    assert!(
        !html.contains("guest:guest") && !html.contains("guest@"),
        "no credentials on the page"
    );
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();

    // Every JSON twin answers JSON.
    for path in [
        "/api/overview",
        "/api/topics",
        "/api/jobs",
        "/api/tasks?q=x",
    ] {
        let r = http.get(web.url(path)).send().await.expect(path);
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().await.expect("JSON");
        assert!(v.is_object() || v.is_array(), "{path}: {v}");
    }

    // POSTs without the CSRF token, or with a wrong one, are refused; a GET cannot act.
    let svc = unique("web-csrf");
    let action = web.url(&format!("/api/services/{svc}/replay"));
    let r = http
        .post(&action)
        .form(&[("all", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(&action)
        .form(&[("all", "1"), ("csrf", "0123456789abcdef0123456789abcdef")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(web.url(&format!("/api/services/{svc}/purge")))
        .form(&[("queue", "dead"), ("confirm", svc.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(http.get(&action).send().await.unwrap().status(), 405);
    // With the token: accepted (and answered: this service has no dead-letter queue).
    let r = http
        .post(&action)
        .header("accept", "application/json")
        .form(&[("all", "1"), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "{}", r.text().await.unwrap_or_default());
    // A purge without the typed confirmation does nothing.
    let r = http
        .post(web.url(&format!("/api/services/{svc}/purge")))
        .header("accept", "application/json")
        .form(&[
            ("queue", "dead"),
            ("confirm", "wrong"),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A cross-origin POST is refused even with the token.
    let r = http
        .post(&action)
        .header("origin", "http://evil.example")
        .form(&[("all", "1"), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // DNS rebinding: a foreign Host is refused when there is no token.
    let r = http
        .get(web.url("/api/overview"))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    drop(web);

    // With a token: nothing without it; a bearer header or the cookie a ?token= visit sets.
    let token = "t0k3n-for-the-web-admin-test".to_owned();
    let web = start_web(admin, Some(token.clone())).await;
    assert_eq!(
        http.get(web.url("/api/overview"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = http
        .get(web.url("/api/overview"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(web.url(&format!("/?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let pair = cookie.split(';').next().unwrap().to_owned();
    let r = http
        .get(web.url("/api/jobs"))
        .header("cookie", pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(web);
    broker.close().await;
}

// ---- the browser ----

/// chromedriver, in a process group of its own; killed (the group: Chromium with it) on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> anyhow::Result<Driver> {
        let bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "chromedriver is not installed: the web admin's browser tests need Debian's \
                     chromium and chromium-driver (run scripts/ensure-chromium.sh)"
                )
            })?;
        ensure!(
            chromium().is_some(),
            "chromium is not installed (run scripts/ensure-chromium.sh)"
        );
        let port = crate::support::broker_node::BrokerNode::reserve_port()?;
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting chromedriver")?;
        let driver = Driver { child, port };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let end = tokio::time::Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            ensure!(
                tokio::time::Instant::now() < end,
                "chromedriver did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(driver)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A fresh profile folder, deleted on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn browser(driver: &Driver, profile: &Path) -> anyhow::Result<Browser> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium().map(|p| p.to_string_lossy().into_owned()),
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    // Already installed by an earlier call: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    ClientBuilder::rustls()
        .context("WebDriver client")?
        .capabilities(caps)
        .connect(&driver.url())
        .await
        .context("starting a Chromium session")
}

/// The browser's console entries since the last call (chromedriver's log endpoint).
async fn console(driver: &Driver, b: &Browser) -> anyhow::Result<Vec<Value>> {
    let sid = b
        .session_id()
        .await?
        .ok_or_else(|| anyhow!("no WebDriver session"))?;
    let v: Value = reqwest::Client::new()
        .post(format!("{}/session/{sid}/se/log", driver.url()))
        .json(&json!({"type": "browser"}))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["value"].as_array().cloned().unwrap_or_default())
}

/// Console errors (SEVERE: console.error, uncaught exceptions, failed loads, CSP refusals).
async fn console_errors(driver: &Driver, b: &Browser) -> anyhow::Result<Vec<String>> {
    Ok(console(driver, b)
        .await?
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect())
}

/// Waits for an element's text to satisfy `ok`.
async fn wait_text(b: &Browser, css: &str, ok: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut last = String::new();
    loop {
        if let Ok(el) = b.find(Locator::Css(css)).await {
            if let Ok(t) = el.text().await {
                if ok(&t) {
                    return Ok(t);
                }
                last = t;
            }
        }
        if tokio::time::Instant::now() > end {
            bail!("timed out waiting for {css:?}; its text was {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// One page: loads, shows `css` with `expect` in it, its live refresh (from its JSON twin)
/// succeeded, and the console has no error.
async fn check_page(
    driver: &Driver,
    b: &Browser,
    url: &str,
    css: &str,
    expect: &str,
) -> anyhow::Result<()> {
    b.goto(url)
        .await
        .with_context(|| format!("loading {url}"))?;
    wait_text(b, css, |t| t.contains(expect))
        .await
        .with_context(|| format!("{url}: {css} should show {expect:?}"))?;
    wait_text(b, "#live", |t| {
        t.starts_with("live") || t.starts_with("refresh failed")
    })
    .await
    .and_then(|t| {
        if t.starts_with("live") {
            Ok(())
        } else {
            Err(anyhow!("{url}: the live refresh failed: {t}"))
        }
    })
    .or_else(|e| {
        // Pages without a JSON twin to poll (the empty task search) have no refresh.
        if url.ends_with("/tasks") {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    let errors = console_errors(driver, b).await?;
    ensure!(errors.is_empty(), "{url} logged console errors: {errors:?}");
    Ok(())
}

/// What the browser test keeps in flight (or finished) for the jobs and task pages.
struct InFlight {
    chain_id: uuid::Uuid,
    fan_in: String,
    hooked: String,
}

#[allow(clippy::too_many_arguments)]
async fn browse_and_replay(
    driver: &Driver,
    b: &Browser,
    web: &WebServer,
    svc: &str,
    topic: &str,
    task_id: &str,
    in_flight: &InFlight,
    fixed: &AtomicBool,
    ledger: &Mutex<Vec<u64>>,
) -> anyhow::Result<()> {
    // Every page, against the live worker.
    check_page(driver, b, &web.url("/"), "#services", svc).await?;
    check_page(driver, b, &web.url("/"), "#workers", svc).await?;
    let service_page = web.url(&format!("/services/{svc}"));
    check_page(driver, b, &service_page, "#dead-letters", task_id).await?;
    check_page(driver, b, &service_page, "#methods", "rejected: 1").await?;
    check_page(driver, b, &web.url("/topics"), "#topics", topic).await?;
    check_page(
        driver,
        b,
        &web.url(&format!("/topics/{topic}")),
        "#messages",
        "\"n\":2",
    )
    .await?;
    check_page(driver, b, &web.url("/tasks"), "h1", "Task lookup").await?;
    check_page(
        driver,
        b,
        &web.url(&format!("/tasks?q={task_id}")),
        "#found",
        "failed",
    )
    .await?;
    check_page(driver, b, &web.url("/jobs"), "#split-jobs", "no split job").await?;
    // Chains in flight with their current step; fan-ins with their total.
    let hold = format!("{svc}.hold");
    check_page(driver, b, &web.url("/jobs"), "#chains", &hold).await?;
    let row = wait_text(b, "#chains", |t| {
        t.contains(&in_flight.chain_id.to_string())
    })
    .await?;
    ensure!(
        row.contains("2 / 3") && row.contains("running"),
        "the chain at step 2 of 3, running: {row:?}"
    );
    wait_text(b, "#fan-ins", |t| {
        t.contains(&in_flight.fan_in) && t.contains("0 / 2")
    })
    .await?;
    // Every method, the ones that never failed with 0 dead letters.
    check_page(driver, b, &service_page, "#methods", "hold").await?;
    let methods = wait_text(b, "#methods", |t| {
        ["step", "hold", "got", "work"]
            .iter()
            .all(|m| t.lines().any(|l| l.starts_with(&format!("{m} "))))
    })
    .await?;
    for m in ["step", "hold", "got"] {
        let row = methods
            .lines()
            .find(|l| l.starts_with(&format!("{m} ")))
            .unwrap_or_default();
        // method, advertised at, dead letters 0, no reasons.
        ensure!(
            row.split_whitespace().nth(2) == Some("0"),
            "{m} never failed: {row:?}"
        );
    }
    ensure!(methods.contains("rejected: 1"), "{methods:?}");
    // A task's hook apart from its children; a chain step's next step among its children.
    check_page(
        driver,
        b,
        &web.url(&format!("/tasks?q={}", in_flight.hooked)),
        "#hooks",
        "hook",
    )
    .await?;
    wait_text(b, "#children", |t| t.contains("none")).await?;
    // The first step's task id (ChainState::step_id(0)); its next step is its child.
    let first_step = uuid::Uuid::new_v5(&in_flight.chain_id, &0u32.to_be_bytes());
    check_page(
        driver,
        b,
        &web.url(&format!("/tasks?q={first_step}")),
        "#children",
        &hold,
    )
    .await?;
    let children = wait_text(b, "#children", |t| t.contains("step")).await?;
    ensure!(children.contains("step"), "{children:?}");
    wait_text(b, "#hooks", |t| t.contains("none")).await?;

    // The overview's screenshot, for the docs.
    b.goto(&web.url("/")).await?;
    wait_text(b, "#live", |t| t.starts_with("live")).await?;
    let png = b.screenshot().await?;
    let dir = target_dir().join("web-admin");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("overview.png"), &png)?;
    if std::env::var_os("WARREN_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/web-admin-overview.png"),
            &png,
        )?;
    }

    // Fix the handler, click replay on the dead letter: the task runs.
    fixed.store(true, Ordering::SeqCst);
    b.goto(&service_page).await?;
    let button = format!("button.replay[data-task='{task_id}']");
    // A live refresh may replace the row between finding the button and clicking it.
    let mut tries = 0;
    loop {
        let el = b
            .wait()
            .at_most(DEADLINE)
            .for_element(Locator::Css(&button))
            .await?;
        match el.click().await {
            Ok(()) => break,
            Err(e) if tries < 5 && e.to_string().contains("stale") => tries += 1,
            Err(e) => return Err(e.into()),
        }
    }
    wait_text(b, "#flash", |t| t.contains("replayed 1 dead letter")).await?;
    let end = tokio::time::Instant::now() + DEADLINE;
    while !ledger.lock().unwrap().contains(&7) {
        ensure!(
            tokio::time::Instant::now() < end,
            "the replayed task was not handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The page the replay led back to no longer lists it.
    wait_text(b, "#dead-letters", |t| t.contains("no dead letters")).await?;
    let errors = console_errors(driver, b).await?;
    ensure!(
        errors.is_empty(),
        "console errors after the replay: {errors:?}"
    );

    // A POST from the page without the CSRF token is refused.
    let status = b
        .execute(
            "return fetch(arguments[0], {method: 'POST', body: new URLSearchParams({all: '1'})})\
             .then(r => r.status)",
            vec![json!(format!("/api/services/{svc}/replay"))],
        )
        .await?;
    ensure!(
        status == json!(403),
        "a POST without the CSRF token answered {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_loads_every_page_without_console_errors_and_replays_a_dead_letter() {
    let started = std::time::Instant::now();
    let node = MgmtNode::shared().await;
    let svc = unique("web-ui");
    let topic = unique("web-topic");
    let store: Arc<dyn StatusStore> = Arc::new(
        RedisStore::new(&redis_url(), Duration::from_secs(600))
            .expect("redis URL")
            .with_prefix(format!("warren-test:{svc}:")),
    );
    let fixed = Arc::new(AtomicBool::new(false));
    let (release, held) = tokio::sync::watch::channel(false);
    let (worker, ledger) =
        start_worker(node, &svc, &topic, fixed.clone(), held, store.clone()).await;
    let receipt = worker
        .client()
        .enqueue(Task::new(format!("{svc}.work"), &7u64))
        .await
        .expect("enqueue");
    let task_id = receipt.id.to_string();
    for n in 1..=2 {
        worker
            .client()
            .publish(Message::new(&topic, &json!({ "n": n })))
            .await
            .expect("publish");
    }
    // In flight while the pages are looked at: a chain held at its 2nd of 3 steps, a fan-in
    // of 2 held targets; done: a task with a hook.
    let chain = worker
        .client()
        .enqueue_chain(
            warren::Chain::new()
                .step(format!("{svc}.step"))
                .step(format!("{svc}.hold"))
                .step(format!("{svc}.step")),
        )
        .await
        .expect("chain");
    let fan_in = worker
        .client()
        .parallel(
            warren::Parallel::new()
                .target(format!("{svc}.hold"), &1)
                .target(format!("{svc}.hold"), &2)
                .on_final(format!("{svc}.step")),
        )
        .await
        .expect("fan-in");
    let hooked = worker
        .client()
        .enqueue(Task::new(format!("{svc}.step"), &json!({})).on_complete(format!("{svc}.step")))
        .await
        .expect("a task with a hook");
    let in_flight = InFlight {
        chain_id: chain.id,
        fan_in: fan_in.job.to_string(),
        hooked: hooked.id.to_string(),
    };
    let (broker, admin) = admin_on(node, Some(store.clone())).await;
    poll("the dead letter", DEADLINE, || {
        let admin = admin.clone();
        let svc = svc.clone();
        async move { (admin.service(&svc).await.ok()?.dead_total == 1).then_some(()) }
    })
    .await;
    let web = start_web(admin, None).await;

    let driver = Driver::start()
        .await
        .expect("the browser tests need chromium and chromedriver");
    let profile = TempDir(std::env::temp_dir().join(format!("warren-chromium-{svc}")));
    std::fs::create_dir_all(&profile.0).expect("profile folder");
    let b = browser(&driver, &profile.0)
        .await
        .expect("a headless Chromium");
    let outcome = browse_and_replay(
        &driver, &b, &web, &svc, &topic, &task_id, &in_flight, &fixed, &ledger,
    )
    .await;
    if let Err(e) = &outcome {
        let dir = target_dir().join("web-admin-failures");
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(png) = b.screenshot().await {
            let file = dir.join(format!("{svc}.png"));
            let _ = std::fs::write(&file, png);
            eprintln!("screenshot of the failure: {}", file.display());
        }
        eprintln!("failed: {e:#}");
    }
    let _ = b.close().await;
    drop(driver);
    drop(web);
    release.send_replace(true);
    let _ = tokio::time::timeout(DEADLINE, chain.wait()).await;
    broker.close().await;
    let _ = worker.stop().await;
    let cleanup = Broker::connect(config_for(&node.amqp_url(), QueueType::Quorum)).await;
    if let Ok(c) = cleanup {
        let _ = c.delete_queue(&format!("warren.topic.{topic}")).await;
        c.close().await;
    }
    if let Err(e) = outcome {
        panic!("{e:#}");
    }
    eprintln!("[web_admin] browser test took {:.1?}", started.elapsed());
}
