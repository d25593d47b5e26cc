//! `warren queues`: warren's queues (`warren.*` and `part.*`) with their counts.
//!
//! Where the counts come from, best first (the listing says which):
//! - RabbitMQ's management HTTP API, when `--management-url` / `WARREN_MANAGEMENT_URL` is set
//!   or the broker's host answers on port 15672: every queue, with ready, unacked, consumer
//!   counts and rates, for a broker anywhere (counts lag by the API's statistics interval);
//! - `rabbitmqctl list_queues`, when the broker is on this machine and the tool is installed
//!   and allowed to talk to the node;
//! - AMQP passive declares of the queues of the services named with `--service`: ready and
//!   consumer counts only (AMQP does not report unacked messages), shown as `-`.
//!
//! The listing logic is in [`warren_admin::queues`] (shared with `warren web`).

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;
use warren_admin::queues::{amqp_service_queues, belongs_to_any, warren_queues, Listing, Source};
use warren_core::Broker;

use crate::opts::Global;

/// `warren queues` options.
#[derive(Debug, Args)]
pub struct QueuesArgs {
    /// Only the queues of this service (repeatable); required when neither the management
    /// API nor rabbitmqctl is usable
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    /// Use neither the management API nor rabbitmqctl (AMQP passive declares only)
    #[arg(long)]
    amqp_only: bool,
}

/// `warren queues`.
pub async fn run(global: &Global, args: &QueuesArgs) -> anyhow::Result<ExitCode> {
    for s in &args.services {
        warren_core::names::validate_name("service", s)
            .with_context(|| format!("--service {s:?}"))?;
    }
    let broker = Broker::connect(global.amqp("warren queues")?)
        .await
        .context("cannot connect to the broker")?;
    let (vhost, _) = broker.identity().await?;
    let listed = if args.amqp_only {
        Err(String::from("--amqp-only"))
    } else {
        match global.management().await {
            Err(e) => Err(crate::describe(&e)),
            Ok(mgmt) => warren_queues(mgmt.as_ref(), &vhost, global.broker_is_local())
                .await
                .map_err(|e| e.to_string()),
        }
    };
    let listing = match listed {
        Ok(mut l) => {
            if !args.services.is_empty() {
                l.queues.retain(|q| belongs_to_any(&q.name, &args.services));
            }
            l
        }
        Err(why) => {
            if args.services.is_empty() {
                broker.close().await;
                bail!(
                    "cannot list queues ({why}); set --management-url / WARREN_MANAGEMENT_URL, \
                     or name the services to look at with --service NAME"
                );
            }
            let queues = amqp_service_queues(&broker, &args.services).await;
            Listing {
                source: Source::Amqp,
                vhost,
                queues: queues?,
                note: Some(why),
            }
        }
    };
    broker.close().await;
    let mut listing = listing;
    listing.queues.sort_by(|a, b| a.name.cmp(&b.name));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print_table(&listing);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(listing: &Listing) {
    match listing.source {
        Source::Amqp => println!(
            "# vhost {}, counts from AMQP passive declares: unacked not available ({})",
            listing.vhost,
            listing.note.as_deref().unwrap_or("no better source")
        ),
        s => println!("# vhost {}, counts from {}", listing.vhost, s.as_str()),
    }
    if listing.queues.is_empty() {
        println!("# no warren queues");
        return;
    }
    let width = listing
        .queues
        .iter()
        .map(|q| q.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let rates = listing.source == Source::Management;
    print!(
        "{:<width$}  {:<8}  {:>9}  {:>9}  {:>9}",
        "NAME", "TYPE", "READY", "UNACKED", "CONSUMERS"
    );
    if rates {
        print!("  {:>8}  {:>8}", "IN/S", "ACK/S");
    }
    println!();
    let show = |v: Option<u64>| v.map_or_else(|| String::from("-"), |n| n.to_string());
    let rate = |v: Option<f64>| v.map_or_else(|| String::from("-"), |r| format!("{r:.1}"));
    for q in &listing.queues {
        if !q.exists {
            println!("{:<width$}  (does not exist)", q.name);
            continue;
        }
        print!(
            "{:<width$}  {:<8}  {:>9}  {:>9}  {:>9}",
            q.name,
            q.kind.as_deref().unwrap_or("-"),
            show(q.ready),
            show(q.unacked),
            show(q.consumers)
        );
        if rates {
            print!("  {:>8}  {:>8}", rate(q.publish_rate), rate(q.ack_rate));
        }
        println!();
    }
}
