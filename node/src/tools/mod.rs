//! Operator and developer commands that are never on the serving path.

pub mod certs;
pub mod dev;
pub mod proxy_cmd;
pub mod reports;
