//! Embeds libtorch's library directory as an rpath so that `aiaas` starts without
//! LD_LIBRARY_PATH, keeps libtorch_cuda linked so that CUDA is found at run time, and compiles
//! `src/engine/torch/glue.cpp` (the libtorch calls tch does not expose) against libtorch's headers.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    compile_protos();
    // torch-sys (links = "tch") exports the directory it linked against.
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:rustc-env=AIAAS_TORCH_VERSION=unknown");
        println!("cargo:rustc-env=AIAAS_GIT_REVISION=unknown");
        return;
    };
    let lib_dir = PathBuf::from(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-env=AIAAS_LIBTORCH_LIB={}", lib_dir.display());
    // rustc links with --as-needed; nothing references libtorch_cuda directly, yet without it
    // libtorch reports CUDA as unavailable.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    compile_glue(&lib_dir);
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let python = std::env::var("PYTHON_INTERPRETER").unwrap_or_else(|_| "python".into());
    let torch_version = std::process::Command::new(&python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=AIAAS_TORCH_VERSION={torch_version}");
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=AIAAS_GIT_REVISION={revision}");
}

/// Compiles the C++ glue against the headers beside libtorch's `lib/` (the same libtorch tch
/// links), with libtorch's C++ ABI. One file, CPU headers only; -O1 is plenty for a few calls.
fn compile_glue(lib_dir: &std::path::Path) {
    const GLUE: &str = "src/engine/torch/glue.cpp";
    println!("cargo:rerun-if-changed={GLUE}");
    let include = lib_dir.parent().unwrap_or(lib_dir).join("include");
    // libtorch's C++ ABI, as torch-sys finds it: the environment, else the torch package's
    // own flag, else the new ABI (every torch wheel since 2.7)
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| {
        let python = std::env::var("PYTHON_INTERPRETER").unwrap_or_else(|_| "python".into());
        std::process::Command::new(python)
            .args([
                "-c",
                "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map_or_else(
                || "1".into(),
                |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
            )
    });
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .opt_level(1)
        .debug(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(GLUE)
        .compile("aiaas_torch_glue");
}

/// Generates the server side of KServe v2's / Triton's `inference.GRPCInferenceService` from the
/// vendored `grpc_service.proto` (and `model_config.proto`, which it imports), and writes their
/// descriptor set for server reflection. protox parses the files in Rust, so no `protoc` is needed.
fn compile_protos() {
    use prost::Message;
    const DIR: &str = "src/grpc/proto";
    println!("cargo:rerun-if-changed={DIR}");
    let files = protox::compile([format!("{DIR}/grpc_service.proto")], [DIR])
        .unwrap_or_else(|e| panic!("cannot parse the .proto files in {DIR}: {e}"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("inference_descriptor.bin"), files.encode_to_vec())
        .expect("write the descriptor set");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(files)
        .unwrap_or_else(|e| panic!("cannot generate the gRPC service: {e}"));
}
