//! ferrogate's Admin API: APISIX's resource model (routes, services,
//! upstreams, global rules), their validation with APISIX's messages, the
//! REST router, admin-key auth and the stores that keep the objects.
//!
//! The data plane does not depend on HTTP details here: it subscribes to a
//! [`store::Store`] and compiles the objects it is told about.

pub mod api;
pub mod auth;
pub mod error;
pub use plugins::expr;
pub mod model;
pub mod ops;
pub mod pem;
pub mod resource;
pub mod store;
pub mod validate;

#[cfg(test)]
mod testcerts;

pub use api::{router, AdminState};
pub use auth::{AdminKey, AuthPolicy, Role};
pub use error::AdminError;
pub use resource::Kind;
