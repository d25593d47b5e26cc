//! Test support shared by the integration and fault tests (`crate::support`).
//!
//! * [`broker_node::BrokerNode`]: a private RabbitMQ node a test may stop, kill and restart.
//! * [`proxy::TcpProxy`]: a TCP proxy that can cut or black-hole connections.
//! * [`cluster::Cluster`]: a private three-node RabbitMQ cluster, started once for the
//!   test binary and shared by its tests.
//! * [`mgmt_node::MgmtNode`]: a private node with the management plugin, started once for
//!   the test binary (the admin and web admin tests).

// A harness with a complete API: a few accessors (e.g. `TcpProxy::addr`) no test uses yet.
#![allow(dead_code)]

pub mod broker_node;
pub mod cluster;
pub mod mgmt_node;
pub mod proxy;
