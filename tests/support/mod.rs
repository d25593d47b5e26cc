//! Test support shared by the integration and fault tests (`mod support;`).
//!
//! * [`broker_node::BrokerNode`]: a private RabbitMQ node a test may stop, kill and restart.
//! * [`proxy::TcpProxy`]: a TCP proxy that can cut or black-hole connections.

// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod broker_node;
pub mod proxy;
