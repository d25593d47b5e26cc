//! The web admin (`warren web --listen ADDR`): server-rendered pages, each with a JSON twin
//! under `/api/` that the page's small script polls for its live refresh.
//!
//! | page | JSON twin |
//! |---|---|
//! | `/` overview | `/api/overview` |
//! | `/services/{svc}` | `/api/services/{svc}` |
//! | `/topics` | `/api/topics` |
//! | `/topics/{topic}` last messages | `/api/topics/{topic}/messages?n=N` |
//! | `/tasks?q=ID_OR_CID` | `/api/tasks?q=ID_OR_CID` |
//! | `/jobs` | `/api/jobs` |
//!
//! Actions (POST only, each refused with 403 without the page's CSRF token, in the form field
//! `csrf` or the header `X-CSRF-Token`): `/api/services/{svc}/replay` (`id=TASK_ID` or
//! `all=1`) and `/api/services/{svc}/purge` (`queue=dead|tasks`, `confirm=<svc>`). A form
//! post is answered with a redirect to the service page; a request that accepts JSON gets
//! the outcome as JSON.
//!
//! Security: [`WebConfig::check`] refuses a bind address outside loopback without a bearer
//! token; with a token every request needs `Authorization: Bearer <token>` or the cookie a
//! first `?token=<token>` visit sets. Without a token, requests whose `Host` is not a
//! loopback name are refused (DNS rebinding). Every answer carries a strict CSP,
//! `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: same-origin` (no-referrer would make browsers send `Origin: null` on form posts).

pub mod render;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use warren_ops::ReplaySelection;

use crate::views::{PurgeTarget, ReplayView};
use crate::{Admin, AdminError};
use render::{col, enc, esc, link, notes, page, table, value, Ctx, Fmt, Nav};

/// The content security policy: nothing but this origin's script, style and fetches.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
    base-uri 'none'";
const TOKEN_COOKIE: &str = "warren_token";
const APP_JS: &str = include_str!("../../assets/app.js");
const APP_CSS: &str = include_str!("../../assets/app.css");

/// How the web admin listens.
#[derive(Clone)]
pub struct WebConfig {
    /// The address to bind (default 127.0.0.1:8088).
    pub listen: SocketAddr,
    /// The bearer token every request must carry (required off loopback).
    pub token: Option<String>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Why the web admin cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebError {
    /// A non-loopback bind without a token, or an unusable token. Retrying does not help.
    #[error("{0}")]
    Config(String),
    /// The address cannot be bound (in use, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("the web server failed: {0}")]
    Serve(std::io::Error),
}

impl WebConfig {
    /// Refuses a bind outside loopback without a token, and a token shorter than 16
    /// characters.
    pub fn check(&self) -> Result<(), WebError> {
        if let Some(t) = &self.token {
            if t.len() < 16 {
                return Err(WebError::Config(String::from(
                    "the web token must be at least 16 characters",
                )));
            }
        } else if !self.listen.ip().is_loopback() {
            return Err(WebError::Config(format!(
                "refusing to listen on {} without a token: anyone who reaches it could replay \
                 and purge; set --token / WARREN_WEB_TOKEN (16+ characters) or listen on \
                 127.0.0.1",
                self.listen
            )));
        }
        Ok(())
    }
}

struct AppState {
    admin: Admin,
    csrf: String,
    token: Option<String>,
}

type St = State<Arc<AppState>>;

/// A random token (32 hex digits).
fn random_token() -> String {
    let a: u128 = rand::random();
    format!("{a:032x}")
}

/// Compares two secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The router with every page, JSON twin, action and the security layers.
pub fn router(admin: Admin, cfg: &WebConfig) -> Result<Router, WebError> {
    cfg.check()?;
    let state = Arc::new(AppState {
        admin,
        csrf: random_token(),
        token: cfg.token.clone(),
    });
    let app = Router::new()
        .route("/", get(overview_page))
        .route("/api/overview", get(overview_api))
        .route("/services/{svc}", get(service_page))
        .route("/api/services/{svc}", get(service_api))
        .route("/api/services/{svc}/replay", post(replay_action))
        .route("/api/services/{svc}/purge", post(purge_action))
        .route("/topics", get(topics_page))
        .route("/api/topics", get(topics_api))
        .route("/topics/{topic}", get(peek_page))
        .route("/api/topics/{topic}/messages", get(peek_api))
        .route("/tasks", get(tasks_page))
        .route("/api/tasks", get(tasks_api))
        .route("/jobs", get(jobs_page))
        .route("/api/jobs", get(jobs_api))
        .route("/static/app.js", get(app_js))
        .route("/static/app.css", get(app_css))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(middleware::from_fn(security_headers))
        .with_state(state);
    Ok(app)
}

/// Serves the web admin on `cfg.listen` until `shutdown` completes. `on_bound` is called
/// with the bound address (useful with port 0).
pub async fn serve(
    admin: Admin,
    cfg: WebConfig,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WebError> {
    let app = router(admin, &cfg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| WebError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(WebError::Serve)?;
    on_bound(bound);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(WebError::Serve)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let is_api = req.uri().path().starts_with("/api/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if is_api || !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn plain(status: StatusCode, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.to_owned(),
    )
        .into_response()
}

/// Token or loopback-host check, and the CSRF check of every POST (in the handlers: the
/// token lives in the body).
async fn guard(State(st): St, req: Request, next: Next) -> Response {
    let headers = req.headers();
    match &st.token {
        Some(token) => {
            let bearer = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let ok = bearer.is_some_and(|b| same_secret(b, token))
                || cookie(headers, TOKEN_COOKIE).is_some_and(|c| same_secret(&c, token));
            if !ok {
                // A first visit with ?token=... sets the cookie and comes back without it.
                let from_query = req.uri().query().and_then(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == "token")
                        .map(|(_, v)| v.into_owned())
                });
                if req.method() == Method::GET && from_query.is_some_and(|t| same_secret(&t, token))
                {
                    let path = req.uri().path().to_owned();
                    let mut resp = Redirect::to(&path).into_response();
                    if let Ok(v) = HeaderValue::from_str(&format!(
                        "{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
                    )) {
                        resp.headers_mut().insert(header::SET_COOKIE, v);
                    }
                    return resp;
                }
                let mut resp = plain(
                    StatusCode::UNAUTHORIZED,
                    "a token is required: Authorization: Bearer <token>, or open /?token=<token> once",
                );
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return resp;
            }
        }
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let name = host
                .rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(host, |(h, _)| h);
            if !matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
                return plain(
                    StatusCode::FORBIDDEN,
                    "this web admin answers only to 127.0.0.1 / localhost (start it with a token \
                     to reach it otherwise)",
                );
            }
        }
    }
    // A cross-site POST: refuse even before the CSRF token is looked at.
    if req.method() == Method::POST {
        if let (Some(origin), Some(host)) = (
            headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
            headers.get(header::HOST).and_then(|v| v.to_str().ok()),
        ) {
            let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
            if origin_host != host {
                return plain(StatusCode::FORBIDDEN, "cross-origin POST refused");
            }
        }
    }
    next.run(req).await
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

fn status_of(e: &AdminError) -> StatusCode {
    match e {
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::Invalid(_) | AdminError::Name(_) => StatusCode::BAD_REQUEST,
        e if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Serialize)]
struct ApiError {
    error: String,
    transient: bool,
}

fn api_error(e: &AdminError) -> Response {
    (
        status_of(e),
        Json(ApiError {
            error: e.to_string(),
            transient: e.is_transient(),
        }),
    )
        .into_response()
}

fn api<T: Serialize>(r: Result<T, AdminError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => api_error(&e),
    }
}

fn page_error(st: &AppState, title: &str, e: &AdminError) -> Response {
    let body = format!(
        "<h1>{}</h1><p class=\"error\">{}</p>",
        esc(title),
        esc(&e.to_string())
    );
    (
        status_of(e),
        Html(page(title, Nav::None, None, &st.csrf, &body)),
    )
        .into_response()
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn flash(q: &HashMap<String, String>) -> String {
    match (q.get("msg"), q.get("err")) {
        (_, Some(e)) => format!("<p class=\"error\" id=\"flash\">{}</p>", esc(e)),
        (Some(m), None) => format!("<p class=\"flash\" id=\"flash\">{}</p>", esc(m)),
        _ => String::new(),
    }
}

fn card(label: &str, inner: &str) -> String {
    format!(
        "<div class=\"card\"><span class=\"n\">{inner}</span><span class=\"l\">{}</span></div>",
        esc(label)
    )
}

// ---- overview ----

async fn overview_api(State(st): St) -> Response {
    api(st.admin.overview().await)
}

async fn overview_page(State(st): St) -> Response {
    let v = match st.admin.overview().await {
        Ok(v) => to_value(&v),
        Err(e) => return page_error(&st, "Overview", &e),
    };
    let ctx = Ctx {
        csrf: st.csrf.clone(),
        svc: None,
    };
    let services = [
        link("name", "Service", "/services/{name}"),
        col("queue_type", "Type", Fmt::Text),
        col("ready", "Ready", Fmt::Num),
        col("unacked", "Unacked", Fmt::Num),
        col("consumers", "Consumers", Fmt::Num),
        col("publish_rate", "In /s", Fmt::Rate),
        col("ack_rate", "Done /s", Fmt::Rate),
        col("retrying", "Retrying", Fmt::Num),
        col("dead", "Dead letters", Fmt::Num),
        col("subscriptions", "Subscriptions", Fmt::Num),
    ];
    let workers = [
        col("peer", "Worker", Fmt::Text),
        col("services", "Services", Fmt::List),
        col("consumers", "Consumers", Fmt::Num),
        col("state", "State", Fmt::Text),
        col("user", "User", Fmt::Text),
        col("connected_at", "Connected", Fmt::Text),
    ];
    let body = format!(
        "<h1>Overview</h1>\
         <p class=\"meta\">RabbitMQ {} · cluster {} · vhost <code>{}</code> · counts from {}{}</p>\
         <div class=\"cards\">{}{}{}{}{}{}</div>\
         <h2>Services</h2>{}\
         <h2>Connected workers</h2>{}{}",
        value(&v, "broker.version", Fmt::Text),
        value(&v, "broker.cluster", Fmt::Text),
        value(&v, "broker.vhost", Fmt::Text),
        value(&v, "broker.source", Fmt::Text),
        match v.pointer("/broker/management_url").and_then(Value::as_str) {
            Some(u) => format!(" (<code>{}</code>)", esc(u)),
            None => String::new(),
        },
        card("services", &value(&v, "services.length", Fmt::Num)),
        card("dead letters", &value(&v, "dead", Fmt::Num)),
        card("retrying", &value(&v, "retrying", Fmt::Num)),
        card("topics", &value(&v, "topics", Fmt::Num)),
        card("jobs in flight", &value(&v, "jobs_in_flight", Fmt::Num)),
        card("workers", &value(&v, "workers.length", Fmt::Num)),
        table(
            "services",
            &v,
            "services",
            &services,
            &ctx,
            "no warren services on this vhost"
        ),
        table(
            "workers",
            &v,
            "workers",
            &workers,
            &ctx,
            "no worker connected (or no management API)"
        ),
        notes(&v),
    );
    Html(page(
        "Overview",
        Nav::Overview,
        Some(("/api/overview", 5)),
        &st.csrf,
        &body,
    ))
    .into_response()
}

// ---- service ----

async fn service_api(State(st): St, Path(svc): Path<String>) -> Response {
    api(st.admin.service(&svc).await)
}

async fn service_page(
    State(st): St,
    Path(svc): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let title = format!("Service {svc}");
    let v = match st.admin.service(&svc).await {
        Ok(v) => to_value(&v),
        Err(e) => return page_error(&st, &title, &e),
    };
    let ctx = Ctx {
        csrf: st.csrf.clone(),
        svc: Some(svc.clone()),
    };
    let methods = [
        col("method", "Method", Fmt::Text),
        col("advertised_at", "Advertised by a worker at", Fmt::Text),
        col("dead", "Dead letters", Fmt::Num),
        col("reasons", "Reasons", Fmt::Counts),
        col("last_error", "Last error", Fmt::Text),
        col("last_at", "Last failed at", Fmt::Text),
    ];
    let letters = [
        col("task_id", "Task", Fmt::Replay),
        link("task_id", "Task id", "/tasks?q={task_id}"),
        col("target", "Target", Fmt::Text),
        col("reason", "Reason", Fmt::Text),
        col("error", "Error", Fmt::Text),
        col("dead_at", "Dead at", Fmt::Text),
        col("replayed", "Replayed", Fmt::Num),
        col("body", "Body", Fmt::Json),
    ];
    let queues = [
        col("name", "Queue", Fmt::Text),
        col("type", "Type", Fmt::Text),
        col("ready", "Ready", Fmt::Num),
        col("unacked", "Unacked", Fmt::Num),
        col("consumers", "Consumers", Fmt::Num),
        col("publish_rate", "In /s", Fmt::Rate),
    ];
    let subs = [
        link("topic", "Topic", "/topics/{topic}"),
        col("method", "Method", Fmt::Text),
        col("pending", "Pending", Fmt::Num),
    ];
    let csrf = esc(&st.csrf);
    let action = |what: &str| format!("/api/services/{}/{what}", enc(&svc));
    let body = format!(
        "<h1>Service <code>{name}</code></h1>{flash}\
         <div class=\"cards\">{}{}{}{}{}{}</div>\
         <h2>Methods and their failures</h2>{}\
         <h2>Dead letters</h2>\
         <div class=\"actions\">\
           <form method=\"post\" action=\"{replay}\" class=\"inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"all\" value=\"1\">\
             <button type=\"submit\" id=\"replay-all\">Replay all</button></form>\
           <form method=\"post\" action=\"{purge}\" class=\"inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"queue\" value=\"dead\">\
             <label>Purge dead letters: type <code>{name}</code> to confirm \
             <input type=\"text\" name=\"confirm\" autocomplete=\"off\" id=\"purge-dead-confirm\"></label> \
             <button type=\"submit\" class=\"danger\" id=\"purge-dead\">Purge</button></form>\
           <form method=\"post\" action=\"{purge}\" class=\"inline\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"queue\" value=\"tasks\">\
             <label>Purge waiting tasks: type <code>{name}</code> to confirm \
             <input type=\"text\" name=\"confirm\" autocomplete=\"off\" id=\"purge-tasks-confirm\"></label> \
             <button type=\"submit\" class=\"danger\" id=\"purge-tasks\">Purge</button></form>\
         </div>{}\
         <h2>Subscriptions</h2>{}\
         <h2>Queues</h2>{}{}",
        card("ready", &value(&v, "summary.ready", Fmt::Num)),
        card("unacked", &value(&v, "summary.unacked", Fmt::Num)),
        card("consumers", &value(&v, "summary.consumers", Fmt::Num)),
        card("retrying", &value(&v, "summary.retrying", Fmt::Num)),
        card("dead letters", &value(&v, "dead_total", Fmt::Num)),
        card("in /s", &value(&v, "summary.publish_rate", Fmt::Rate)),
        table(
            "methods",
            &v,
            "methods",
            &methods,
            &ctx,
            "no method known (no worker advertised one, no dead letters)"
        ),
        table("dead-letters", &v, "dead_letters", &letters, &ctx, "no dead letters"),
        table("subscriptions", &v, "subscriptions", &subs, &ctx, "no subscriptions"),
        table("queues", &v, "queues", &queues, &ctx, "no queues"),
        notes(&v),
        name = esc(&svc),
        flash = flash(&q),
        replay = esc(&action("replay")),
        purge = esc(&action("purge")),
    );
    let api_url = format!("/api/services/{}", enc(&svc));
    let html = page(&title, Nav::None, Some((&api_url, 15)), &st.csrf, &body).replacen(
        "<main ",
        &format!("<main data-svc=\"{}\" ", esc(&svc)),
        1,
    );
    Html(html).into_response()
}

fn form(body: &Bytes) -> HashMap<String, String> {
    url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The CSRF token of a POST (form field or header), checked.
fn csrf_ok(st: &AppState, headers: &HeaderMap, f: &HashMap<String, String>) -> bool {
    let given = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| f.get("csrf").cloned());
    given.is_some_and(|t| same_secret(&t, &st.csrf))
}

fn action_done(headers: &HeaderMap, svc: &str, json: Value, msg: &str, err: bool) -> Response {
    if wants_json(headers) {
        let code = if err {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        return (code, Json(json)).into_response();
    }
    let key = if err { "err" } else { "msg" };
    Redirect::to(&format!("/services/{}?{key}={}", enc(svc), enc(msg))).into_response()
}

async fn replay_action(
    State(st): St,
    Path(svc): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = form(&body);
    if !csrf_ok(&st, &headers, &f) {
        return plain(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    let selection = match (f.get("id").filter(|s| !s.is_empty()), f.get("all")) {
        (Some(id), _) => ReplaySelection::Ids(vec![id.clone()]),
        (None, Some(_)) => ReplaySelection::All,
        (None, None) => {
            return action_done(
                &headers,
                &svc,
                serde_json::json!({"error": "give id=<task id> or all=1"}),
                "give id=<task id> or all=1",
                true,
            )
        }
    };
    match st.admin.replay(&svc, &selection, &|_, _| {}).await {
        Ok(report) => {
            let view = ReplayView::from(&report);
            let bad = !report.unmatched.is_empty() || !report.failed.is_empty();
            let msg = if !report.unmatched.is_empty() {
                format!(
                    "nothing replayed: no dead letter has task id {}",
                    report.unmatched.join(", ")
                )
            } else if report.failed.is_empty() {
                format!("replayed {} dead letter(s)", report.replayed.len())
            } else {
                format!(
                    "replayed {}, failed {}: {}",
                    report.replayed.len(),
                    report.failed.len(),
                    report
                        .failed
                        .first()
                        .map(|f| f.error.as_str())
                        .unwrap_or_default()
                )
            };
            action_done(&headers, &svc, to_value(&view), &msg, bad)
        }
        Err(e) => {
            if wants_json(&headers) {
                return api_error(&e);
            }
            action_done(&headers, &svc, Value::Null, &e.to_string(), true)
        }
    }
}

async fn purge_action(
    State(st): St,
    Path(svc): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f = form(&body);
    if !csrf_ok(&st, &headers, &f) {
        return plain(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    let target = match f.get("queue").map(String::as_str) {
        Some("dead") => PurgeTarget::Dead,
        Some("tasks") => PurgeTarget::Tasks,
        _ => {
            let m = "queue must be dead or tasks";
            return action_done(&headers, &svc, serde_json::json!({"error": m}), m, true);
        }
    };
    if f.get("confirm").map(|c| c.trim()) != Some(svc.as_str()) {
        let m = format!("not purged: type the service name ({svc}) to confirm");
        return action_done(&headers, &svc, serde_json::json!({"error": m}), &m, true);
    }
    match st.admin.purge(&svc, target).await {
        Ok(r) => {
            let msg = format!("purged {}: {} message(s) removed", r.queue, r.removed);
            action_done(&headers, &svc, to_value(&r), &msg, false)
        }
        Err(e) => {
            if wants_json(&headers) {
                return api_error(&e);
            }
            action_done(&headers, &svc, Value::Null, &e.to_string(), true)
        }
    }
}

// ---- topics ----

async fn topics_api(State(st): St) -> Response {
    api(st.admin.topics().await)
}

async fn topics_page(State(st): St) -> Response {
    let v = match st.admin.topics().await {
        Ok(v) => to_value(&v),
        Err(e) => return page_error(&st, "Topics", &e),
    };
    let cols = [
        link("topic", "Topic", "/topics/{topic}"),
        col("published", "Published", Fmt::Num),
        col("recent", "Recent (peek)", Fmt::Num),
        col("subscribers", "Subscribers (pending, dead)", Fmt::Subs),
    ];
    let ctx = Ctx::default();
    let body = format!(
        "<h1>Topics</h1><p class=\"meta\">Published counts come from the status store; \
         open a topic for its last messages.</p>{}",
        table("topics", &v, "", &cols, &ctx, "no topics on this vhost")
    );
    Html(page(
        "Topics",
        Nav::Topics,
        Some(("/api/topics", 5)),
        &st.csrf,
        &body,
    ))
    .into_response()
}

fn peek_n(q: &HashMap<String, String>) -> usize {
    q.get("n")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100)
}

async fn peek_api(
    State(st): St,
    Path(topic): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    api(st
        .admin
        .peek(&topic, peek_n(&q))
        .await
        .and_then(|p| p.ok_or_else(|| AdminError::NotFound(format!("no topic {topic:?}")))))
}

async fn peek_page(
    State(st): St,
    Path(topic): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let title = format!("Topic {topic}");
    let n = peek_n(&q);
    let v = match st.admin.peek(&topic, n).await {
        Ok(Some(p)) => to_value(&p),
        Ok(None) => {
            return page_error(
                &st,
                &title,
                &AdminError::NotFound(format!(
                    "no topic {topic:?}: nothing was ever published to it"
                )),
            )
        }
        Err(e) => return page_error(&st, &title, &e),
    };
    let cols = [
        col("published_at", "Published at", Fmt::Text),
        link("id", "Task id", "/tasks?q={id}"),
        link("cid", "Cid", "/tasks?q={cid}"),
        col("payload", "Payload", Fmt::Json),
    ];
    let body = format!(
        "<h1>Topic <code>{}</code></h1><p class=\"meta\">The last {n} of {} kept messages, \
         oldest first (read without removing them).</p>{}",
        esc(&topic),
        value(&v, "total", Fmt::Num),
        table(
            "messages",
            &v,
            "messages",
            &cols,
            &Ctx::default(),
            "no messages kept"
        )
    );
    let api_url = format!("/api/topics/{}/messages?n={n}", enc(&topic));
    Html(page(
        &title,
        Nav::Topics,
        Some((&api_url, 10)),
        &st.csrf,
        &body,
    ))
    .into_response()
}

// ---- tasks ----

async fn tasks_api(State(st): St, Query(q): Query<HashMap<String, String>>) -> Response {
    let query = q.get("q").map(String::as_str).unwrap_or_default();
    api(st.admin.task(query).await)
}

async fn tasks_page(State(st): St, Query(q): Query<HashMap<String, String>>) -> Response {
    let query = q.get("q").map(|s| s.trim().to_owned()).unwrap_or_default();
    let search = format!(
        "<form method=\"get\" action=\"/tasks\" class=\"actions\">\
         <label>Task id or cid <input type=\"text\" name=\"q\" id=\"q\" size=\"44\" value=\"{}\"></label> \
         <button type=\"submit\" id=\"lookup\">Look up</button></form>",
        esc(&query)
    );
    if query.is_empty() {
        let body = format!(
            "<h1>Task lookup</h1>{search}<p class=\"meta\">Statuses come from the status store \
             (Redis), kept for its retention (24 h by default).</p>"
        );
        return Html(page("Tasks", Nav::Tasks, None, &st.csrf, &body)).into_response();
    }
    let v = match st.admin.task(&query).await {
        Ok(v) => to_value(&v),
        Err(e) => return page_error(&st, "Tasks", &e),
    };
    let cols = [
        link("id", "Task id", "/tasks?q={id}"),
        link("cid", "Cid", "/tasks?q={cid}"),
        col("target", "Target", Fmt::Text),
        col("state", "State", Fmt::Text),
        col("attempts", "Attempts", Fmt::Num),
        col("result", "Result or error", Fmt::Outcome),
    ];
    let linked = [
        col("relation", "Relation", Fmt::Text),
        link("id", "Task id", "/tasks?q={id}"),
        col("target", "Target", Fmt::Text),
        col("state", "State", Fmt::Text),
        col("attempts", "Attempts", Fmt::Num),
        col("result", "Result or error", Fmt::Outcome),
    ];
    let store_note = if v.get("store").and_then(Value::as_bool) == Some(false) {
        "<p class=\"error\">No status store is configured (WARREN_REDIS_URL): task statuses \
         are not available.</p>"
    } else {
        ""
    };
    let body = format!(
        "<h1>Task lookup</h1>{search}{store_note}\
         <h2>Found</h2>{}\
         <h2>Children (tasks it enqueued or invoked, parts, next chain step)</h2>{}\
         <h2>Hooks and callbacks</h2>{}\
         <h2>Other tasks of the same cid</h2>{}",
        table(
            "found",
            &v,
            "found",
            &cols,
            &Ctx::default(),
            "no task or cid by that name in the status store (never recorded, or expired)"
        ),
        table("children", &v, "children", &linked, &Ctx::default(), "none"),
        table("hooks", &v, "hooks", &linked, &Ctx::default(), "none"),
        table("related", &v, "related", &cols, &Ctx::default(), "none"),
    );
    let api_url = format!("/api/tasks?q={}", enc(&query));
    Html(page(
        "Tasks",
        Nav::Tasks,
        Some((&api_url, 5)),
        &st.csrf,
        &body,
    ))
    .into_response()
}

// ---- jobs ----

async fn jobs_api(State(st): St) -> Response {
    api(st.admin.jobs().await)
}

async fn jobs_page(State(st): St) -> Response {
    let v = match st.admin.jobs().await {
        Ok(v) => to_value(&v),
        Err(e) => return page_error(&st, "Jobs", &e),
    };
    let split = [
        col("target", "Method", Fmt::Text),
        link("id", "Split task", "/tasks?q={id}"),
        col("parts_in", "Parts in / total", Fmt::Parts),
        col("joining", "Joining", Fmt::Text),
        col("queue", "Part queue", Fmt::Text),
    ];
    let fan = [
        col("id", "Job", Fmt::Text),
        col("parts_in", "Targets in / total", Fmt::Parts),
        col("joining", "Joining", Fmt::Text),
        col("queue", "Part queue", Fmt::Text),
    ];
    let chains = [
        link("id", "Chain", "/tasks?q={cid}"),
        col("progress", "Step", Fmt::Text),
        col("target", "Current step", Fmt::Text),
        col("state", "State", Fmt::Text),
        link("step_task", "Step task", "/tasks?q={step_task}"),
        col("steps", "Steps", Fmt::List),
        col("updated_at", "Advanced at", Fmt::Text),
    ];
    let body = format!(
        "<h1>Jobs in flight</h1><h2>Split jobs</h2>{}<h2>Fan-ins</h2>{}<h2>Chains</h2>{}{}",
        table(
            "split-jobs",
            &v,
            "split_jobs",
            &split,
            &Ctx::default(),
            "no split job in flight"
        ),
        table(
            "fan-ins",
            &v,
            "fan_ins",
            &fan,
            &Ctx::default(),
            "no fan-in in flight"
        ),
        table(
            "chains",
            &v,
            "chains",
            &chains,
            &Ctx::default(),
            "no chain in flight"
        ),
        notes(&v)
    );
    Html(page(
        "Jobs",
        Nav::Jobs,
        Some(("/api/jobs", 5)),
        &st.csrf,
        &body,
    ))
    .into_response()
}

// ---- static ----

async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_CSS,
    )
        .into_response()
}

async fn not_found() -> Response {
    plain(StatusCode::NOT_FOUND, "not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_local_binds_need_a_token() {
        let cfg = |listen: &str, token: Option<&str>| WebConfig {
            listen: listen.parse().expect("addr"),
            token: token.map(str::to_owned),
        };
        assert!(cfg("127.0.0.1:8088", None).check().is_ok());
        assert!(cfg("[::1]:8088", None).check().is_ok());
        assert!(cfg("0.0.0.0:8088", None).check().is_err());
        assert!(cfg("0.0.0.0:8088", Some("short")).check().is_err());
        assert!(cfg("0.0.0.0:8088", Some("0123456789abcdef"))
            .check()
            .is_ok());
        assert!(!format!("{:?}", cfg("0.0.0.0:1", Some("0123456789abcdef"))).contains("0123"));
    }

    #[test]
    fn secrets_compare() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
