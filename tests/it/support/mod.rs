//! Test support shared by the integration and fault tests (`mod support;`).
//!
//! * [`broker_node::BrokerNode`]: a private RabbitMQ node a test may stop, kill and restart.
//! * [`proxy::TcpProxy`]: a TCP proxy that can cut or black-hole connections.
//! * [`cluster::Cluster`]: a private three-node RabbitMQ cluster shared by a test binary.

// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod broker_node;
pub mod cluster;
pub mod proxy;
