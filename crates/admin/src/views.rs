//! The [`Admin`] handle and the views built with it. Every view is a serde type: the web
//! pages render it and their JSON twins (`/api/...`) return it as is.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use warren_core::patterns::utc_timestamp;
use warren_core::status::{ChainProgress, Relation, StatusStore, TaskState, TaskStatus};
use warren_core::topology::{dead_queue, service_queue};
use warren_core::{Broker, Publisher};
use warren_ops::{DeadLetter, DeadLetterOps, ReplayReport, ReplaySelection};

use crate::mgmt::ManagementClient;
use crate::queues::{classify, warren_queues, Listing, QueueKind, QueueRow, Source};
use crate::topics::{Peek, Topic};
use crate::AdminError;

/// The connection name warren's workers give the connection they consume on.
pub const WORKER_CONNECTION: &str = "warren worker (consume)";
/// Most dead letters a service view lists.
pub const DEAD_LETTERS_SHOWN: usize = 100;
/// Most split jobs whose totals are looked up in the status store per view.
const JOB_LOOKUPS: usize = 50;
/// Most children and hooks a task lookup lists.
const LINKS_SHOWN: usize = 200;
/// Most chains in flight a jobs view lists (the most recently advanced).
pub const CHAINS_SHOWN: usize = 50;

/// Everything the operator views need: the broker, and optionally the management API and
/// the status store. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    broker: Broker,
    publisher: Publisher,
    mgmt: Option<ManagementClient>,
    store: Option<Arc<dyn StatusStore>>,
    vhost: String,
    local: bool,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("vhost", &self.vhost)
            .field("management", &self.mgmt)
            .field("store", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

/// The broker and where the counts come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BrokerInfo {
    /// Where the queue counts come from.
    pub source: Source,
    /// The vhost.
    pub vhost: String,
    /// The management API's URL (never with credentials), when used.
    pub management_url: Option<String>,
    /// RabbitMQ's version (management API only).
    pub version: Option<String>,
    /// The cluster name (management API only).
    pub cluster: Option<String>,
    /// Whether a status store is configured.
    pub status_store: bool,
}

/// One service and its counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceSummary {
    /// The service name.
    pub name: String,
    /// `classic` or `quorum`.
    pub queue_type: Option<String>,
    /// Tasks waiting.
    pub ready: Option<u64>,
    /// Tasks being handled.
    pub unacked: Option<u64>,
    /// Consumers on its queue (one per worker process hosting it).
    pub consumers: Option<u64>,
    /// Tasks published to it per second (management API only).
    pub publish_rate: Option<f64>,
    /// Tasks acked (finished) per second (management API only).
    pub ack_rate: Option<f64>,
    /// Dead letters (tasks that failed for good or could not run).
    pub dead: Option<u64>,
    /// Tasks waiting for a retry (in its delay queues).
    pub retrying: u64,
    /// Topic subscriptions of its methods.
    pub subscriptions: usize,
}

/// A worker process (its consuming connection), from the management API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerInfo {
    /// `host:port` of the worker as the broker sees it.
    pub peer: String,
    /// The broker user it connected as (a name, never a password).
    pub user: Option<String>,
    /// When it connected (UTC).
    pub connected_at: Option<String>,
    /// `running`, `blocked`, ...
    pub state: Option<String>,
    /// The services (and subscriptions' services) it consumes.
    pub services: Vec<String>,
    /// Its consumers (queues it consumes).
    pub consumers: u64,
}

/// The overview page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OverviewView {
    /// The broker.
    pub broker: BrokerInfo,
    /// Every service with a queue on the vhost.
    pub services: Vec<ServiceSummary>,
    /// Connected workers (`None` without the management API).
    pub workers: Option<Vec<WorkerInfo>>,
    /// Topics.
    pub topics: usize,
    /// Split jobs and fan-ins in flight (their part queues).
    pub jobs_in_flight: usize,
    /// Tasks waiting for a retry, all services.
    pub retrying: u64,
    /// Dead letters, all services.
    pub dead: u64,
    /// What this view could not show, and why.
    pub notes: Vec<String>,
}

/// One method of a service and its failures (from the service's dead letters): every
/// method a worker advertised (0 failures when it has none) and every method named by a
/// dead letter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MethodFailures {
    /// The method (`?` for dead letters whose body names none).
    pub method: String,
    /// When a worker last advertised hosting it (UTC); `None` when no running worker did
    /// within the advertisement's ttl (or there is no status store).
    pub advertised_at: Option<String>,
    /// Its dead letters.
    pub dead: u64,
    /// Dead letters per reason (`handler`, `bad_payload`, ...).
    pub reasons: BTreeMap<String, u64>,
    /// The newest dead letter's error.
    pub last_error: Option<String>,
    /// When the newest died (UTC).
    pub last_at: Option<String>,
}

/// One dead letter, as the service view shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetterView {
    /// Position in the queue (0: oldest).
    pub index: usize,
    /// The task id.
    pub task_id: Option<String>,
    /// The cid.
    pub cid: Option<String>,
    /// `svc.method`.
    pub target: Option<String>,
    /// Why it died.
    pub reason: Option<String>,
    /// The error.
    pub error: Option<String>,
    /// The queue it came from (where a replay sends it).
    pub source_queue: Option<String>,
    /// When it died (UTC).
    pub dead_at: Option<String>,
    /// How often it was replayed before.
    pub replayed: i64,
    /// The body (JSON when it is JSON, else text).
    pub body: Value,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(l: &DeadLetter) -> Self {
        Self {
            index: l.index,
            task_id: l.task_id.clone(),
            cid: l.cid.clone(),
            target: l.target.clone(),
            reason: l.reason.clone(),
            error: l.error.clone(),
            source_queue: l.source_queue.clone(),
            dead_at: l
                .dead_at_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(utc_timestamp),
            replayed: l.replayed,
            body: serde_json::from_slice(&l.body)
                .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&l.body).into_owned())),
        }
    }
}

/// A subscription of a service's method.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubscriptionView {
    /// The topic.
    pub topic: String,
    /// The subscribed method.
    pub method: String,
    /// Messages waiting.
    pub pending: Option<u64>,
}

/// The service page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceView {
    /// Its counts.
    pub summary: ServiceSummary,
    /// Whether its service or dead-letter queue exists.
    pub exists: bool,
    /// Its queues (work, dead-letter, delay, done markers).
    pub queues: Vec<QueueRow>,
    /// Its methods (advertised by workers, or named by dead letters) with their failures.
    pub methods: Vec<MethodFailures>,
    /// Its dead letters, oldest first (at most [`DEAD_LETTERS_SHOWN`]).
    pub dead_letters: Vec<DeadLetterView>,
    /// Dead letters in the queue.
    pub dead_total: u64,
    /// Its topic subscriptions.
    pub subscriptions: Vec<SubscriptionView>,
    /// What this view could not show, and why.
    pub notes: Vec<String>,
}

/// A split job or a fan-in in flight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobView {
    /// `split` or `fan-in`.
    pub kind: String,
    /// Its part queue.
    pub queue: String,
    /// The service, when known (split jobs of a service with a queue on the vhost).
    pub service: Option<String>,
    /// `svc.method` of a split job, when the service is known.
    pub target: Option<String>,
    /// The split task's id, or the fan-in's job id.
    pub id: String,
    /// Part results in (ready messages in the part queue).
    pub parts_in: Option<u64>,
    /// Parts in total, when the status store knows it (recorded when the job started).
    pub parts_total: Option<u64>,
    /// A joiner is holding the part queue (joining now).
    pub joining: bool,
}

/// A chain in flight, from the status store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChainView {
    /// The chain's id.
    pub id: String,
    /// Its cid.
    pub cid: String,
    /// The current step, 1-based.
    pub step: u32,
    /// Its number of steps.
    pub steps_total: u32,
    /// `step / steps_total`.
    pub progress: String,
    /// The current step's `svc.method`.
    pub target: Option<String>,
    /// The current step's task id.
    pub step_task: String,
    /// `pending` (sent, no worker started it yet) or `running`.
    pub state: TaskState,
    /// Every step's `svc.method`.
    pub steps: Vec<String>,
    /// When it last advanced (UTC).
    pub updated_at: String,
}

impl From<&ChainProgress> for ChainView {
    fn from(p: &ChainProgress) -> Self {
        let total = u32::try_from(p.steps.len()).unwrap_or(u32::MAX);
        let step = p.index.saturating_add(1);
        Self {
            id: p.id.to_string(),
            cid: p.cid.clone(),
            step,
            steps_total: total,
            progress: format!("{step} / {total}"),
            target: p.target().map(str::to_owned),
            step_task: p.step_task.to_string(),
            state: p.state,
            steps: p.steps.clone(),
            updated_at: utc_timestamp(p.updated_ms),
        }
    }
}

/// The jobs page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobsView {
    /// Split jobs in flight.
    pub split_jobs: Vec<JobView>,
    /// Fan-ins (and background invoke/retry with a callback) in flight.
    pub fan_ins: Vec<JobView>,
    /// Chains in flight (status store only), most recently advanced first.
    pub chains: Vec<ChainView>,
    /// What this view could not show, and why.
    pub notes: Vec<String>,
}

/// A task related to a looked-up task, and how.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkedTask {
    /// `child`, `part` or `step` (in [`TaskLookup::children`]); `hook` or `callback` (in
    /// [`TaskLookup::hooks`]).
    pub relation: Relation,
    /// Its status.
    #[serde(flatten)]
    pub status: TaskStatus,
}

/// The task lookup page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskLookup {
    /// What was asked: a task id or a cid.
    pub query: String,
    /// The task (an id) or every task of the cid.
    pub found: Vec<TaskStatus>,
    /// For a task id: the tasks it caused as part of its work (tasks its handler enqueued
    /// or invoked, its parts, the next chain step), as recorded when they were sent or
    /// started.
    pub children: Vec<LinkedTask>,
    /// For a task id: the hooks and callbacks its outcome fired.
    pub hooks: Vec<LinkedTask>,
    /// For a task id: the other tasks of its cid (neither its children nor its hooks).
    pub related: Vec<TaskStatus>,
    /// Whether a status store is configured.
    pub store: bool,
}

/// What a purge removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PurgeReport {
    /// The queue purged.
    pub queue: String,
    /// Messages removed.
    pub removed: u64,
}

/// Which queue of a service a purge empties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurgeTarget {
    /// Its dead letters (`warren.dead.<svc>`).
    Dead,
    /// Its waiting tasks (`warren.svc.<svc>`).
    Tasks,
}

/// A replay's outcome, as the web admin returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplayView {
    /// The dead-letter queue.
    pub queue: String,
    /// Dead letters looked at.
    pub looked_at: usize,
    /// Task ids replayed.
    pub replayed: Vec<Option<String>>,
    /// Selected but not replayed: (task id, error).
    pub failed: Vec<(Option<String>, String)>,
    /// Ids asked for that no dead letter has (then nothing was replayed).
    pub unmatched: Vec<String>,
    /// The replay stopped early.
    pub interrupted: bool,
}

impl From<&ReplayReport> for ReplayView {
    fn from(r: &ReplayReport) -> Self {
        Self {
            queue: r.queue.clone(),
            looked_at: r.looked_at,
            replayed: r.replayed.iter().map(|x| x.task_id.clone()).collect(),
            failed: r
                .failed
                .iter()
                .map(|f| (f.task_id.clone(), f.error.clone()))
                .collect(),
            unmatched: r.unmatched.clone(),
            interrupted: r.interrupted,
        }
    }
}

fn add(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        _ => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}

impl Admin {
    /// An admin on `broker`'s vhost. `mgmt`: the management API (see
    /// [`ManagementClient::discover`]); without it, queues are listed with rabbitmqctl when
    /// `local` (the broker runs on this machine). `store`: the status store, for task
    /// lookups, published counts and job totals.
    pub async fn new(
        broker: Broker,
        mgmt: Option<ManagementClient>,
        store: Option<Arc<dyn StatusStore>>,
        local: bool,
    ) -> Result<Self, AdminError> {
        let (vhost, _user) = broker.identity().await?;
        let publisher = Publisher::new(broker.clone(), 1);
        Ok(Self {
            broker,
            publisher,
            mgmt,
            store,
            vhost,
            local,
        })
    }

    /// The broker connection.
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The management API client, if any.
    #[must_use]
    pub fn management(&self) -> Option<&ManagementClient> {
        self.mgmt.as_ref()
    }

    /// The vhost.
    #[must_use]
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// Every warren queue, with counts.
    pub async fn listing(&self) -> Result<Listing, AdminError> {
        warren_queues(self.mgmt.as_ref(), &self.vhost, self.local).await
    }

    fn broker_info(
        &self,
        listing: &Listing,
        version: Option<String>,
        cluster: Option<String>,
    ) -> BrokerInfo {
        BrokerInfo {
            source: listing.source,
            vhost: self.vhost.clone(),
            management_url: self.mgmt.as_ref().map(|m| m.url().to_owned()),
            version,
            cluster,
            status_store: self.store.is_some(),
        }
    }

    /// The services found in `rows`, with their counts.
    fn services(rows: &[QueueRow]) -> BTreeMap<String, ServiceSummary> {
        let mut out: BTreeMap<String, ServiceSummary> = BTreeMap::new();
        let get = |out: &mut BTreeMap<String, ServiceSummary>, svc: &str| {
            out.entry(svc.to_owned())
                .or_insert_with(|| ServiceSummary {
                    name: svc.to_owned(),
                    ..ServiceSummary::default()
                })
                .clone()
        };
        for r in rows {
            match classify(&r.name) {
                QueueKind::Service(svc) => {
                    let mut s = get(&mut out, &svc);
                    s.queue_type.clone_from(&r.kind);
                    s.ready = r.ready;
                    s.unacked = r.unacked;
                    s.consumers = r.consumers;
                    s.publish_rate = r.publish_rate;
                    s.ack_rate = r.ack_rate;
                    out.insert(svc, s);
                }
                QueueKind::Dead(svc) => {
                    let mut s = get(&mut out, &svc);
                    s.dead = add(r.ready, r.unacked);
                    out.insert(svc, s);
                }
                QueueKind::Delay { svc, .. } => {
                    let mut s = get(&mut out, &svc);
                    s.retrying += r.messages();
                    out.insert(svc, s);
                }
                QueueKind::Subscription { svc, .. } => {
                    let mut s = get(&mut out, &svc);
                    s.subscriptions += 1;
                    out.insert(svc, s);
                }
                _ => {}
            }
        }
        out
    }

    /// The overview: services, workers, totals.
    pub async fn overview(&self) -> Result<OverviewView, AdminError> {
        let listing = self.listing().await?;
        let mut notes: Vec<String> = listing.note.iter().cloned().collect();
        let services: Vec<ServiceSummary> = Self::services(&listing.queues).into_values().collect();
        let (mut version, mut cluster, mut workers) = (None, None, None);
        if let Some(m) = &self.mgmt {
            let o = m.overview().await?;
            version = o.rabbitmq_version;
            cluster = o.cluster_name;
            workers = Some(self.workers(m).await?);
        } else {
            notes.push(String::from(
                "connected workers and rates need the management API",
            ));
        }
        let topics = listing
            .queues
            .iter()
            .filter_map(|r| match classify(&r.name) {
                QueueKind::Recent(t) | QueueKind::Subscription { topic: t, .. } => Some(t),
                _ => None,
            })
            .collect::<BTreeSet<_>>()
            .len();
        let jobs_in_flight = listing
            .queues
            .iter()
            .filter(|r| {
                matches!(
                    classify(&r.name),
                    QueueKind::SplitJob { .. } | QueueKind::FanIn(_)
                )
            })
            .count();
        Ok(OverviewView {
            broker: self.broker_info(&listing, version, cluster),
            retrying: services.iter().map(|s| s.retrying).sum(),
            dead: services.iter().filter_map(|s| s.dead).sum(),
            services,
            workers,
            topics,
            jobs_in_flight,
            notes,
        })
    }

    /// Worker processes: connections named [`WORKER_CONNECTION`], with the services whose
    /// queues they consume.
    async fn workers(&self, m: &ManagementClient) -> Result<Vec<WorkerInfo>, AdminError> {
        let connections = m.connections().await?;
        let consumers = m.consumers(&self.vhost).await?;
        let mut out = Vec::new();
        for c in connections
            .iter()
            .filter(|c| c.client_name() == Some(WORKER_CONNECTION))
            .filter(|c| c.vhost.as_deref().is_none_or(|v| v == self.vhost))
        {
            let mine: Vec<_> = consumers
                .iter()
                .filter(|x| x.channel_details.connection_name == c.name)
                .collect();
            let services: BTreeSet<String> = mine
                .iter()
                .filter_map(|x| match classify(&x.queue.name) {
                    QueueKind::Service(s) | QueueKind::Subscription { svc: s, .. } => Some(s),
                    _ => None,
                })
                .collect();
            let port = c
                .peer_port
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default();
            out.push(WorkerInfo {
                peer: format!("{}:{port}", c.peer_host.as_deref().unwrap_or("?")),
                user: c.user.clone(),
                connected_at: c.connected_at.map(utc_timestamp),
                state: c.state.clone(),
                services: services.into_iter().collect(),
                consumers: mine.len() as u64,
            });
        }
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(out)
    }

    /// One service: counts, queues, failures per method, dead letters, subscriptions.
    pub async fn service(&self, svc: &str) -> Result<ServiceView, AdminError> {
        warren_core::names::validate_name("service", svc)?;
        let svc_q = service_queue(svc)?;
        let dead_q = dead_queue(svc)?;
        let listing = self.listing().await?;
        let mut notes: Vec<String> = listing.note.iter().cloned().collect();
        let summary = Self::services(&listing.queues)
            .remove(svc)
            .unwrap_or_else(|| ServiceSummary {
                name: svc.to_owned(),
                ..ServiceSummary::default()
            });
        let queues: Vec<QueueRow> = listing
            .queues
            .iter()
            .filter(|r| match classify(&r.name) {
                QueueKind::Service(s)
                | QueueKind::Dead(s)
                | QueueKind::Delay { svc: s, .. }
                | QueueKind::Done(s) => s == svc,
                _ => false,
            })
            .cloned()
            .collect();
        let subscriptions = listing
            .queues
            .iter()
            .filter_map(|r| match classify(&r.name) {
                QueueKind::Subscription {
                    topic,
                    svc: s,
                    method,
                } if s == svc => Some(SubscriptionView {
                    topic,
                    method,
                    pending: r.ready,
                }),
                _ => None,
            })
            .collect();
        let exists = queues.iter().any(|q| q.name == svc_q || q.name == dead_q);
        let letters = self
            .broker
            .dead_letters(svc, Some(DEAD_LETTERS_SHOWN))
            .await?;
        let (dead_letters, dead_total) = match &letters {
            Some(l) => (
                l.letters
                    .iter()
                    .map(DeadLetterView::from)
                    .collect::<Vec<_>>(),
                u64::from(l.total),
            ),
            None => (Vec::new(), 0),
        };
        if dead_total > DEAD_LETTERS_SHOWN as u64 {
            notes.push(format!(
                "showing the oldest {DEAD_LETTERS_SHOWN} of {dead_total} dead letters; the \
                 failures per method count those only"
            ));
        }
        let mut methods: BTreeMap<String, MethodFailures> = BTreeMap::new();
        for l in letters.iter().flat_map(|l| &l.letters) {
            let method = l
                .target
                .as_deref()
                .and_then(|t| t.strip_prefix(svc))
                .and_then(|t| t.strip_prefix('.'))
                .unwrap_or("?")
                .to_owned();
            let m = methods
                .entry(method.clone())
                .or_insert_with(|| MethodFailures {
                    method,
                    advertised_at: None,
                    dead: 0,
                    reasons: BTreeMap::new(),
                    last_error: None,
                    last_at: None,
                });
            m.dead += 1;
            *m.reasons
                .entry(l.reason.clone().unwrap_or_else(|| String::from("?")))
                .or_default() += 1;
            // Oldest first: the last one seen is the newest.
            m.last_error.clone_from(&l.error);
            m.last_at = l
                .dead_at_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(utc_timestamp);
        }
        match &self.store {
            Some(store) => match store.advertised(svc).await {
                Ok(advertised) => {
                    for a in advertised {
                        methods
                            .entry(a.method.clone())
                            .or_insert_with(|| MethodFailures {
                                method: a.method.clone(),
                                advertised_at: None,
                                dead: 0,
                                reasons: BTreeMap::new(),
                                last_error: None,
                                last_at: None,
                            })
                            .advertised_at = Some(utc_timestamp(a.seen_ms));
                    }
                }
                Err(e) => notes.push(format!("the methods workers advertise are not known: {e}")),
            },
            None => notes.push(String::from(
                "methods that never failed need the status store (workers advertise their \
                 methods there)",
            )),
        }
        Ok(ServiceView {
            summary,
            exists,
            queues,
            methods: methods.into_values().collect(),
            dead_letters,
            dead_total,
            subscriptions,
            notes,
        })
    }

    /// Topics and their subscriptions.
    pub async fn topics(&self) -> Result<Vec<Topic>, AdminError> {
        let listing = self.listing().await?;
        crate::topics::topics(&listing.queues, Some(&self.broker), self.store.as_deref()).await
    }

    /// The last `n` messages of `topic`.
    pub async fn peek(&self, topic: &str, n: usize) -> Result<Option<Peek>, AdminError> {
        crate::topics::peek(&self.broker, topic, n).await
    }

    /// A task id's status and its cid's other tasks, or every task of a cid.
    pub async fn task(&self, query: &str) -> Result<TaskLookup, AdminError> {
        let query = query.trim();
        let Some(store) = &self.store else {
            return Ok(TaskLookup {
                query: query.to_owned(),
                found: Vec::new(),
                children: Vec::new(),
                hooks: Vec::new(),
                related: Vec::new(),
                store: false,
            });
        };
        if query.is_empty() || query.len() > 255 {
            return Err(AdminError::Invalid(String::from(
                "give a task id or a cid (1 to 255 characters)",
            )));
        }
        let by_id = match uuid::Uuid::parse_str(query) {
            Ok(id) => store.get(id).await?,
            Err(_) => None,
        };
        let (mut children, mut hooks) = (Vec::new(), Vec::new());
        let (found, related) = match by_id {
            Some(s) => {
                let links = store.related(s.id).await?;
                for (id, relation) in links.iter().take(LINKS_SHOWN) {
                    // Expired (or never started and never recorded): not listed.
                    let Some(status) = store.get(*id).await? else {
                        continue;
                    };
                    let t = LinkedTask {
                        relation: *relation,
                        status,
                    };
                    if relation.is_hook() {
                        hooks.push(t);
                    } else {
                        children.push(t);
                    }
                }
                let order = |t: &LinkedTask| (t.status.created_ms, t.status.id);
                children.sort_by_key(order);
                hooks.sort_by_key(order);
                let related = store
                    .by_cid(&s.cid)
                    .await?
                    .into_iter()
                    .filter(|r| r.id != s.id && !links.iter().any(|(id, _)| *id == r.id))
                    .collect();
                (vec![s], related)
            }
            None => (store.by_cid(query).await?, Vec::new()),
        };
        Ok(TaskLookup {
            query: query.to_owned(),
            found,
            children,
            hooks,
            related,
            store: true,
        })
    }

    /// Split jobs and fan-ins in flight, from their part queues.
    pub async fn jobs(&self) -> Result<JobsView, AdminError> {
        let listing = self.listing().await?;
        let services: BTreeSet<String> = listing
            .queues
            .iter()
            .filter_map(|r| match classify(&r.name) {
                QueueKind::Service(s) => Some(s),
                _ => None,
            })
            .collect();
        let mut notes: Vec<String> = listing.note.iter().cloned().collect();
        let (mut split_jobs, mut fan_ins) = (Vec::new(), Vec::new());
        for r in &listing.queues {
            let joining = r.consumers.is_some_and(|c| c > 0);
            match classify(&r.name) {
                QueueKind::SplitJob {
                    svc_method,
                    task_id,
                } => {
                    // `<svc>-<method>`: the longest known service that prefixes it.
                    let svc = services
                        .iter()
                        .filter(|s| {
                            svc_method.len() > s.len() + 1
                                && svc_method.starts_with(s.as_str())
                                && svc_method.as_bytes()[s.len()] == b'-'
                        })
                        .max_by_key(|s| s.len())
                        .cloned();
                    let target = svc
                        .as_ref()
                        .map(|s| format!("{s}.{}", &svc_method[s.len() + 1..]));
                    split_jobs.push(JobView {
                        kind: String::from("split"),
                        queue: r.name.clone(),
                        service: svc,
                        target,
                        id: task_id,
                        parts_in: r.ready,
                        parts_total: None,
                        joining,
                    });
                }
                QueueKind::FanIn(job) => fan_ins.push(JobView {
                    kind: String::from("fan-in"),
                    queue: r.name.clone(),
                    service: None,
                    target: None,
                    id: job,
                    parts_in: r.ready,
                    parts_total: None,
                    joining,
                }),
                _ => {}
            }
        }
        let mut chains = Vec::new();
        match &self.store {
            Some(store) => {
                self.job_totals(store.as_ref(), &mut split_jobs, &mut fan_ins)
                    .await;
                for j in split_jobs
                    .iter_mut()
                    .filter(|j| j.parts_total.is_none())
                    .take(JOB_LOOKUPS)
                {
                    j.parts_total = self.parts_total(store.as_ref(), j).await;
                }
                chains = self.chains(store.as_ref(), &mut notes).await;
            }
            None => notes.push(String::from(
                "part totals and chains in flight need the status store (a part queue holds \
                 the results in, not the number of parts; a chain's progress travels in its \
                 messages)",
            )),
        }
        Ok(JobsView {
            split_jobs,
            fan_ins,
            chains,
            notes,
        })
    }

    /// The totals recorded when the jobs started (one round trip for all of them).
    async fn job_totals(
        &self,
        store: &dyn StatusStore,
        split: &mut [JobView],
        fan: &mut [JobView],
    ) {
        let mut jobs: Vec<&mut JobView> = split.iter_mut().chain(fan.iter_mut()).collect();
        let ids: Vec<uuid::Uuid> = jobs
            .iter()
            .map(|j| uuid::Uuid::parse_str(&j.id).unwrap_or_default())
            .collect();
        let Ok(totals) = store.job_totals(&ids).await else {
            return;
        };
        for (j, t) in jobs.iter_mut().zip(totals) {
            if let Some(t) = t {
                j.parts_total = Some(u64::from(t));
            }
        }
    }

    /// The chains in flight the store lists, without those whose end it recorded since (a
    /// redelivered step may write its progress after the chain ended).
    async fn chains(&self, store: &dyn StatusStore, notes: &mut Vec<String>) -> Vec<ChainView> {
        let listed = match store.chains(CHAINS_SHOWN).await {
            Ok(l) => l,
            Err(e) => {
                notes.push(format!("chains in flight are not listed: {e}"));
                return Vec::new();
            }
        };
        if listed.len() >= CHAINS_SHOWN {
            notes.push(format!(
                "showing the {CHAINS_SHOWN} most recently advanced chains in flight"
            ));
        }
        let mut out = Vec::with_capacity(listed.len());
        for p in &listed {
            let ended = matches!(
                store.get(p.id).await,
                Ok(Some(s)) if matches!(s.state, TaskState::Succeeded | TaskState::Failed)
            );
            if !ended {
                out.push(ChainView::from(p));
            }
        }
        out
    }

    /// The number of part tasks the status store knows for a split job: the tasks of the
    /// split task's cid for the same target, other than the split task itself.
    async fn parts_total(&self, store: &dyn StatusStore, job: &JobView) -> Option<u64> {
        let id = uuid::Uuid::parse_str(&job.id).ok()?;
        let split = store.get(id).await.ok()??;
        let all = store.by_cid(&split.cid).await.ok()?;
        let n = all
            .iter()
            .filter(|s| s.id != id && s.target == split.target)
            .count() as u64;
        (n > 0).then_some(n)
    }

    /// Replays dead letters of `svc` (see [`DeadLetterOps::replay_dead_letters`]).
    pub async fn replay(
        &self,
        svc: &str,
        selection: &ReplaySelection,
        progress: &(dyn Fn(usize, usize) + Send + Sync),
    ) -> Result<ReplayReport, AdminError> {
        warren_core::names::validate_name("service", svc)?;
        self.broker
            .replay_dead_letters_with_progress(&self.publisher, svc, selection, progress)
            .await?
            .ok_or_else(|| {
                AdminError::NotFound(format!(
                    "service {svc:?} has no dead-letter queue on this vhost"
                ))
            })
    }

    /// Empties a queue of `svc`: its dead letters or its waiting tasks.
    pub async fn purge(&self, svc: &str, target: PurgeTarget) -> Result<PurgeReport, AdminError> {
        warren_core::names::validate_name("service", svc)?;
        let queue = match target {
            PurgeTarget::Dead => dead_queue(svc)?,
            PurgeTarget::Tasks => service_queue(svc)?,
        };
        if self.broker.queue_stats(&queue).await?.is_none() {
            return Err(AdminError::NotFound(format!(
                "queue {queue} does not exist"
            )));
        }
        let removed = self.broker.purge_queue(&queue).await?;
        Ok(PurgeReport {
            queue,
            removed: u64::from(removed),
        })
    }
}
