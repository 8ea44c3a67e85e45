//! KServe v2 over gRPC: Triton's `inference.GRPCInferenceService` (vendored
//! `proto/grpc_service.proto`, code generated at build time), served on its own port
//! (`--grpc-port`, default 8081) by the same accept loop as HTTP, so that tritonclient.grpc,
//! perf_analyzer and KServe's gRPC client work unchanged. Also `grpc.health.v1.Health` and
//! server reflection (v1 and v1alpha) for grpcurl and load balancers.
//!
//! It sits beside the HTTP layer and reuses it: the same state, the same key check
//! ([`crate::http::auth::check_access`]), the same error type mapped to gRPC codes
//! ([`status::code_of`]), the same registry and batcher queues. It knows no libtorch.

mod body;
mod convert;
mod generate;
mod health;
mod service;
mod status;
mod stream;

use std::time::Duration;

use axum::Router;
use tonic::codec::CompressionEncoding;

use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use crate::http::{AppState, REQUEST_ID};

pub use status::code_of;

/// The code generated from `proto/grpc_service.proto` and `proto/model_config.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// The descriptor set of the vendored protos, for server reflection.
const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));

/// gRPC settings.
#[derive(Debug, Clone, Copy)]
pub struct GrpcSettings {
    /// How long a `ModelStreamInfer` stream with no request in flight may send nothing before
    /// it is ended (`--grpc-stream-idle-timeout`).
    pub stream_idle_timeout: Duration,
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            stream_idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Every gRPC service as one router, for [`crate::connections::serve`]: inference, health and
/// reflection. Messages are limited to `--max-body-bytes` (RESOURCE_EXHAUSTED beyond), gzip is
/// accepted and answered when the client asks, and a unary call's message must arrive within
/// `--body-timeout`.
pub fn router(state: AppState, settings: GrpcSettings) -> anyhow::Result<Router> {
    let limit = state.settings.max_body_bytes;
    let body_timeout = state.settings.body_timeout;
    let inference =
        proto::grpc_inference_service_server::GrpcInferenceServiceServer::new(service::Inference {
            state: state.clone(),
            stream_idle_timeout: settings.stream_idle_timeout,
        })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let health = tonic_health::pb::health_server::HealthServer::new(health::Health::new(state));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let routes = tonic::service::Routes::new(inference)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok(routes
        .into_axum_router()
        .layer(axum::middleware::from_fn(move |req, next| {
            body::unary_deadline(req, next, body_timeout)
        }))
        .layer(axum::middleware::map_response(
            status::too_large_is_resource_exhausted,
        ))
        // request ids as over HTTP: the client's `x-request-id` metadata when it is safe to log,
        // else a new UUID, echoed in the answer's metadata and logged with the call
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::middleware::from_fn(crate::http::sanitize_request_id))
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone())),
        ))
}
