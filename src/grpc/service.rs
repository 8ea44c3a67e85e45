//! `inference.GRPCInferenceService`: every call checks its caller's key like the HTTP route of
//! the same name ([`check_access`]), then does what that route does, through the same registry
//! and the same per-model batcher queues.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use futures_util::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert;
use super::generate;
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::*;
use super::status::{bearer, grpc_timeout, status_of};
use super::stream;
use crate::http::auth::{check_access, Access};
use crate::http::inference::{
    count_outcome_via, deadline_within, generation_deadline, take_model_within, StillWanted,
};
use crate::http::v2::{
    check_load_parameters, control_allowed, device_groups, ready_versions, repository_entries,
    stats_scope, version_number, EXTENSIONS,
};
use crate::http::{ApiError, AppState};
use crate::registry::ModelLease;
use crate::telemetry::Protocol;

/// Above this message size, decoding moves off the async workers.
const INLINE_DECODE_BYTES: usize = 32 << 10;

/// The service, over the HTTP layer's state (registry, settings, keys, metrics).
#[derive(Clone)]
pub struct Inference {
    pub(super) state: AppState,
    /// How long an open `ModelStreamInfer` with nothing in flight waits for its next request.
    pub(super) stream_idle_timeout: Duration,
}

/// What the call's metadata says of its caller.
pub(super) struct Caller {
    /// From `grpc-timeout`.
    pub timeout: Option<Duration>,
}

impl Inference {
    /// Checks the caller's key for `access` and reads its deadline; a refusal is counted as the
    /// HTTP layer counts it.
    pub(super) fn admit<T>(&self, req: &Request<T>, access: Access) -> Result<Caller, Status> {
        let loopback = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|c| c.0.ip().is_loopback());
        if let Err((error, reason)) =
            check_access(&self.state, access, bearer(req.metadata()), loopback)
        {
            self.state.metrics.reject(reason);
            return Err(status_of(error));
        }
        let timeout = grpc_timeout(req.metadata()).map_err(status_of)?;
        Ok(Caller { timeout })
    }

    /// A slot under `--max-concurrent-requests` for one inference, or UNAVAILABLE.
    pub(super) fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.state.try_serve().ok_or_else(|| {
            self.state.metrics.reject("concurrency_limit");
            ApiError::Overloaded(format!(
                "the server is serving its limit of {} concurrent requests; retry later",
                self.state.settings.max_concurrent_requests
            ))
        })
    }

    async fn model(
        &self,
        name: &str,
        version: &str,
        timeout: Option<Duration>,
    ) -> Result<ModelLease, ApiError> {
        let version = version_of(name, version)?;
        take_model_within(&self.state, name, version, timeout).await
    }

    /// One inference: the model (loaded first under lazy control, the wait bounded by the
    /// caller's deadline), the message decoded (off the async workers when large), the batcher,
    /// the answer in raw contents. Counted under `aiaas_requests_total{protocol="grpc"}`.
    pub(super) async fn infer(
        &self,
        msg: ModelInferRequest,
        timeout: Option<Duration>,
    ) -> Result<ModelInferResponse, ApiError> {
        let _slot = self.slot()?;
        let model = self
            .model(&msg.model_name, &msg.model_version, timeout)
            .await?;
        let Some(g) = model.generator().cloned() else {
            return count_outcome_via(
                Protocol::Grpc,
                &model,
                run_infer(model.clone(), msg, timeout),
            )
            .await;
        };
        // the wait for a lazy load counts against the deadline
        let deadline = generation_deadline(&model, g.timeout(), timeout);
        let work = async {
            let asked = generate::asked(msg, Some(deadline))?;
            let (tx, mut rx) = mpsc::channel(1);
            generate::run(model.clone(), g, asked, false, &tx).await?;
            rx.try_recv()
                .map_err(|_| ApiError::Internal("the generation ended without an answer".into()))
        };
        count_outcome_via(Protocol::Grpc, &model, work).await
    }

    /// One request of a `ModelStreamInfer` stream, answered on `out`: one response, or a
    /// generative model's pieces as they come (`stream: true`); an error is an
    /// `error_message` response with the request's id, and the stream goes on.
    pub(super) async fn stream_one(
        &self,
        msg: ModelInferRequest,
        timeout: Option<Duration>,
        out: &mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
    ) {
        let id = msg.id.clone();
        if let Err(e) = self.stream_answer(msg, timeout, out).await {
            let _ = out
                .send(Ok(ModelStreamInferResponse {
                    error_message: e.to_string(),
                    infer_response: Some(ModelInferResponse {
                        id,
                        ..Default::default()
                    }),
                }))
                .await;
        }
    }

    async fn stream_answer(
        &self,
        msg: ModelInferRequest,
        timeout: Option<Duration>,
        out: &mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
    ) -> Result<(), ApiError> {
        let answer = |r| {
            Ok(ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(r),
            })
        };
        let _slot = self.slot()?;
        let model = self
            .model(&msg.model_name, &msg.model_version, timeout)
            .await?;
        let Some(g) = model.generator().cloned() else {
            let r = count_outcome_via(
                Protocol::Grpc,
                &model,
                run_infer(model.clone(), msg, timeout),
            )
            .await?;
            let _ = out.send(answer(r)).await;
            return Ok(());
        };
        let lease = model.clone();
        let deadline = generation_deadline(&model, g.timeout(), timeout);
        let work = async move {
            let asked = generate::asked(msg, Some(deadline))?;
            let (tx, mut rx) = mpsc::channel(1);
            let generating = async move { generate::run(lease, g, asked, true, &tx).await };
            let forwarding = async {
                while let Some(r) = rx.recv().await {
                    if out.send(answer(r)).await.is_err() {
                        break;
                    }
                }
            };
            tokio::join!(generating, forwarding).0
        };
        count_outcome_via(Protocol::Grpc, &model, work).await
    }
}

/// A message's version: empty for the default one.
fn version_of(name: &str, version: &str) -> Result<Option<u64>, ApiError> {
    if version.is_empty() {
        Ok(None)
    } else {
        version_number(name, version).map(Some)
    }
}

async fn run_infer(
    model: ModelLease,
    msg: ModelInferRequest,
    timeout: Option<Duration>,
) -> Result<ModelInferResponse, ApiError> {
    let (wanted, _alive) = StillWanted::new(Some(deadline_within(&model, timeout, None)));
    let size = msg.encoded_len();
    let decode = {
        let model = model.clone();
        move || -> Result<_, ApiError> {
            let request = convert::infer_request(msg)?;
            wanted.check()?;
            let (items, rows) = model.codec.decode_v2(request.inputs.clone())?;
            Ok((request, items, rows))
        }
    };
    let (request, items, rows) = if size <= INLINE_DECODE_BYTES {
        decode()?
    } else {
        tokio::task::spawn_blocking(decode)
            .await
            .map_err(|e| ApiError::Internal(format!("decoding task failed: {e}")))??
    };
    if rows > model.spec.batching.max_batch_size && items.len() == 1 {
        return Err(ApiError::BadRequest(format!(
            "batch of {rows} exceeds max_batch_size {} of model '{}'",
            model.spec.batching.max_batch_size, model.name
        )));
    }
    let deadline = deadline_within(
        &model,
        timeout,
        request.timeout_us.map(Duration::from_micros),
    );
    let results = model.batched()?.infer(items, Some(deadline)).await?;
    let outputs = model
        .codec
        .encode_v2(&results, request.outputs.as_deref())?;
    Ok(convert::infer_response(
        &model.name,
        model.version,
        request.id.unwrap_or_default(),
        outputs,
    ))
}

/// Runs a call's work, counts it in `aiaas_grpc_requests_total` and logs it as the HTTP layer
/// logs a request.
async fn observed<T>(
    state: &AppState,
    method: &'static str,
    request_id: &str,
    work: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let span = tracing::info_span!("grpc", request_id = %request_id, method);
    let started = Instant::now();
    state.metrics.grpc_in_flight.inc();
    let _in_flight = InFlight(state.metrics.clone());
    let result = work.instrument(span.clone()).await;
    let _enter = span.enter();
    let elapsed = started.elapsed();
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    state.metrics.observe_grpc(method, code_name(code), elapsed);
    let total_ms = elapsed.as_secs_f64() * 1e3;
    match &result {
        Ok(_) if method == "ServerLive" || method == "ServerReady" => {
            tracing::debug!(total_ms, "gRPC {method} OK")
        }
        Ok(_) => tracing::info!(total_ms, "gRPC {method} OK"),
        Err(s) if s.code() == tonic::Code::Internal => {
            tracing::error!(
                total_ms,
                error = s.message(),
                "gRPC {method} {}",
                code_name(code)
            )
        }
        Err(s) => tracing::info!(
            total_ms,
            error = s.message(),
            "gRPC {method} {}",
            code_name(code)
        ),
    }
    result
}

struct InFlight(Arc<crate::telemetry::Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.grpc_in_flight.dec();
    }
}

/// The call's request id (set by the router's request-id layers).
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A status code's canonical name (the `code` label).
pub(super) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn ok<T>(v: T) -> Result<Response<T>, Status> {
    Ok(Response::new(v))
}

fn unsupported(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not supported by this server; send tensors in the request"
    ))
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(&self, req: Request<ServerLiveRequest>) -> Answer<ServerLiveResponse> {
        observed(&self.state, "ServerLive", &request_id(&req), async {
            self.admit(&req, Access::Public)?;
            ok(ServerLiveResponse { live: true })
        })
        .await
    }

    async fn server_ready(&self, req: Request<ServerReadyRequest>) -> Answer<ServerReadyResponse> {
        observed(&self.state, "ServerReady", &request_id(&req), async {
            self.admit(&req, Access::Public)?;
            let ready = self.state.registry.readiness().ready && !self.state.is_shutting_down();
            ok(ServerReadyResponse { ready })
        })
        .await
    }

    async fn model_ready(&self, req: Request<ModelReadyRequest>) -> Answer<ModelReadyResponse> {
        observed(&self.state, "ModelReady", &request_id(&req), async {
            self.admit(&req, Access::Infer)?;
            let m = req.get_ref();
            let version = version_of(&m.name, &m.version).map_err(status_of)?;
            // `ready: false` for a model of the repository that is not ready (unloaded,
            // loading, failed), NOT_FOUND for a name the repository does not have
            match self.state.registry.serving(&m.name, version) {
                Ok(_) => ok(ModelReadyResponse { ready: true }),
                Err(_) if self.state.registry.entry(&m.name).is_some() && version.is_none() => {
                    ok(ModelReadyResponse { ready: false })
                }
                Err(e) => Err(status_of(e.into())),
            }
        })
        .await
    }

    async fn server_metadata(
        &self,
        req: Request<ServerMetadataRequest>,
    ) -> Answer<ServerMetadataResponse> {
        observed(&self.state, "ServerMetadata", &request_id(&req), async {
            self.admit(&req, Access::Infer)?;
            ok(ServerMetadataResponse {
                name: "aiaas".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
            })
        })
        .await
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Answer<ModelMetadataResponse> {
        observed(&self.state, "ModelMetadata", &request_id(&req), async {
            let caller = self.admit(&req, Access::Infer)?;
            let m = req.get_ref();
            let model = self
                .model(&m.name, &m.version, caller.timeout)
                .await
                .map_err(status_of)?;
            let versions = if m.version.is_empty() {
                ready_versions(&self.state, &model.name)
            } else {
                vec![model.version.to_string()]
            };
            ok(convert::metadata(&model, versions))
        })
        .await
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> Answer<ModelInferResponse> {
        observed(&self.state, "ModelInfer", &request_id(&req), async {
            let caller = self.admit(&req, Access::Infer)?;
            let answer = self
                .infer(req.into_inner(), caller.timeout)
                .await
                .map_err(status_of)?;
            ok(answer)
        })
        .await
    }

    type ModelStreamInferStream =
        Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Answer<Self::ModelStreamInferStream> {
        // counted when the stream opens; each request in it is counted per model
        observed(&self.state, "ModelStreamInfer", &request_id(&req), async {
            let caller = self.admit(&req, Access::Infer)?;
            let responses = stream::serve(self.clone(), req.into_inner(), caller);
            ok(Box::pin(responses) as Self::ModelStreamInferStream)
        })
        .await
    }

    async fn model_config(&self, req: Request<ModelConfigRequest>) -> Answer<ModelConfigResponse> {
        observed(&self.state, "ModelConfig", &request_id(&req), async {
            let caller = self.admit(&req, Access::Infer)?;
            let m = req.get_ref();
            let model = self
                .model(&m.name, &m.version, caller.timeout)
                .await
                .map_err(status_of)?;
            ok(ModelConfigResponse {
                config: Some(convert::config(&model, device_groups(&model))),
            })
        })
        .await
    }

    async fn model_statistics(
        &self,
        req: Request<ModelStatisticsRequest>,
    ) -> Answer<ModelStatisticsResponse> {
        observed(&self.state, "ModelStatistics", &request_id(&req), async {
            self.admit(&req, Access::Infer)?;
            let m = req.get_ref();
            let model_stats = if m.version.is_empty() {
                let name = (!m.name.is_empty()).then_some(m.name.as_str());
                stats_scope(&self.state, name)
                    .map_err(status_of)?
                    .iter()
                    .map(|s| convert::statistics(s))
                    .collect()
            } else {
                let version = version_of(&m.name, &m.version).map_err(status_of)?;
                let model = self
                    .state
                    .registry
                    .serving(&m.name, version)
                    .map_err(|e| status_of(e.into()))?;
                vec![convert::statistics(&model)]
            };
            ok(ModelStatisticsResponse { model_stats })
        })
        .await
    }

    async fn repository_index(
        &self,
        req: Request<RepositoryIndexRequest>,
    ) -> Answer<RepositoryIndexResponse> {
        observed(&self.state, "RepositoryIndex", &request_id(&req), async {
            self.admit(&req, Access::Admin)?;
            let models = repository_entries(&self.state, req.get_ref().ready)
                .into_iter()
                .map(|e| repository_index_response::ModelIndex {
                    name: e.name,
                    version: e.version.unwrap_or_default(),
                    state: e.state.into(),
                    reason: e.reason,
                })
                .collect();
            ok(RepositoryIndexResponse { models })
        })
        .await
    }

    async fn repository_model_load(
        &self,
        req: Request<RepositoryModelLoadRequest>,
    ) -> Answer<RepositoryModelLoadResponse> {
        observed(
            &self.state,
            "RepositoryModelLoad",
            &request_id(&req),
            async {
                self.admit(&req, Access::Admin)?;
                let m = req.get_ref();
                control_allowed(&self.state).map_err(status_of)?;
                check_load_parameters(m.parameters.keys().map(String::as_str))
                    .map_err(status_of)?;
                self.state
                    .registry
                    .load(&m.model_name)
                    .await
                    .map_err(|e| status_of(e.into()))?;
                ok(RepositoryModelLoadResponse {})
            },
        )
        .await
    }

    async fn repository_model_unload(
        &self,
        req: Request<RepositoryModelUnloadRequest>,
    ) -> Answer<RepositoryModelUnloadResponse> {
        observed(
            &self.state,
            "RepositoryModelUnload",
            &request_id(&req),
            async {
                self.admit(&req, Access::Admin)?;
                let m = req.get_ref();
                control_allowed(&self.state).map_err(status_of)?;
                self.state
                    .registry
                    .unload(&m.model_name)
                    .await
                    .map_err(|e| status_of(e.into()))?;
                ok(RepositoryModelUnloadResponse {})
            },
        )
        .await
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Answer<SystemSharedMemoryStatusResponse> {
        Err(unsupported("system shared memory"))
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Answer<SystemSharedMemoryRegisterResponse> {
        Err(unsupported("system shared memory"))
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Answer<SystemSharedMemoryUnregisterResponse> {
        Err(unsupported("system shared memory"))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Answer<CudaSharedMemoryStatusResponse> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Answer<CudaSharedMemoryRegisterResponse> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Answer<CudaSharedMemoryUnregisterResponse> {
        Err(unsupported("CUDA shared memory"))
    }

    async fn trace_setting(&self, _: Request<TraceSettingRequest>) -> Answer<TraceSettingResponse> {
        Err(Status::unimplemented(
            "trace settings are not supported: aiaas logs through --log-level and exports metrics",
        ))
    }

    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> Answer<LogSettingsResponse> {
        Err(Status::unimplemented(
            "log settings are not supported: set --log-level at start-up",
        ))
    }
}
