//! The middleware in front of the handlers, one file each. Those whose refusals are error
//! answers take the route's [`Dialect`](super::Dialect) as state, so that they answer in the
//! route's shape.

mod body;
mod concurrency;
mod declared_length;
mod draining;
mod error_shape;
mod observe;
mod request_id;

pub use body::read_body;
pub use concurrency::limit_concurrency;
pub use declared_length::refuse_oversized;
pub use draining::close_when_draining;
pub use error_shape::shape_foreign_errors;
pub use observe::observe;
pub use request_id::sanitize_request_id;
