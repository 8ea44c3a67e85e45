//! `grpc.health.v1.Health`, for Kubernetes' gRPC probes, Envoy and grpc_health_probe: the
//! server (service "") and `inference.GRPCInferenceService` are SERVING when the server is
//! ready (the models required at start-up loaded, no shutdown begun), else NOT_SERVING. A
//! `Watch` stream sends the status and each change, and ends at shutdown after sending
//! NOT_SERVING, so that it does not hold the drain open.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::http::AppState;

/// How often a `Watch` looks at readiness.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// The services health is reported for.
const SERVICES: &[&str] = &["", "inference.GRPCInferenceService"];

pub struct Health {
    state: AppState,
}

impl Health {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    fn status(state: &AppState, service: &str) -> Result<ServingStatus, Status> {
        if !SERVICES.contains(&service) {
            return Err(Status::not_found(format!(
                "unknown service '{service}'; health is reported for \"\" and inference.GRPCInferenceService"
            )));
        }
        Ok(
            if state.registry.readiness().ready && !state.is_shutting_down() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            },
        )
    }
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for Health {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = Self::status(&self.state, &req.get_ref().service)?;
        Ok(Response::new(answer(status)))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let mut last = Self::status(&self.state, &service)?;
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            if tx.send(Ok(answer(last))).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                }
                let now = Self::status(&state, &service).unwrap_or(ServingStatus::NotServing);
                if now != last {
                    last = now;
                    if tx.send(Ok(answer(now))).await.is_err() {
                        return;
                    }
                }
                if state.is_shutting_down() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
