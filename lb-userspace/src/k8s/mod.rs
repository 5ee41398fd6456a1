//! The first stage: Kubernetes objects in, reduced to what the model reads.
//!
//! The sources ([`source`]: the API server's watches, or manifest files) send updates; the
//! [`store`] keeps the services, their reduced EndpointSlices and this node, and says which
//! services each update changed.

pub mod object;
pub mod source;
pub mod store;
pub use object::{Age, ObjectRef};
