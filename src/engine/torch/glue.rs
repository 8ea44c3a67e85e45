//! Safe wrappers over `glue.cpp`: the libtorch calls tch does not expose.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::{CModule, Kind, Tensor};

extern "C" {
    fn aiaas_free_message(message: *mut c_char);
    fn aiaas_cast_floating(module: *mut c_void, scalar_type: c_int, error: *mut *mut c_char)
        -> i64;
    fn aiaas_cuda_pool_stream(device: c_int, id: *mut i64) -> bool;
    fn aiaas_cuda_exchange_stream(device: c_int, id: i64, previous: *mut i64) -> bool;
    fn aiaas_cuda_synchronize(device: c_int) -> bool;
    fn aiaas_cuda_memory(device: c_int, allocated: *mut i64, reserved: *mut i64) -> bool;
    fn aiaas_autocast_enter(cuda: bool, scalar_type: c_int, saved: *mut i64) -> bool;
    fn aiaas_autocast_exit(cuda: bool, saved: *const i64);
    fn aiaas_empty_pinned(dims: *const i64, ndims: usize, scalar_type: c_int) -> *mut c_void;
}

/// libtorch's `torch::jit::Module*` behind a [`CModule`]. tch keeps exactly that pointer as the
/// struct's only field and has no accessor for it; the size check below fails the build should
/// a tch release change the layout.
fn module_ptr(module: &mut CModule) -> *mut c_void {
    const _: () = assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut c_void>());
    // SAFETY: CModule is a single raw pointer (checked above); reading it does not move or
    // free the module, which outlives the call through the `&mut` borrow.
    unsafe { *std::ptr::from_mut(module).cast::<*mut c_void>() }
}

/// Casts the floating-point parameters, buffers and inline tensor constants of `module` and
/// its submodules to `kind`, leaving integer ones as they are; returns how many were cast.
pub fn cast_floating(module: &mut CModule, kind: Kind) -> Result<usize, String> {
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: a live module pointer, a valid scalar type number and an out-pointer for the
    // message; the C++ side catches every exception.
    let n = unsafe { aiaas_cast_floating(module_ptr(module), scalar_type(kind)?, &mut error) };
    if n >= 0 {
        return Ok(n as usize);
    }
    if error.is_null() {
        return Err("libtorch failed to cast the module".into());
    }
    // SAFETY: a NUL-terminated string malloc'ed by the C++ side, freed once here.
    let message = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .into_owned();
    unsafe { aiaas_free_message(error) };
    Err(message)
}

/// c10::ScalarType's number of `kind`.
fn scalar_type(kind: Kind) -> Result<c_int, String> {
    Ok(match kind {
        Kind::Uint8 => 0,
        Kind::Int8 => 1,
        Kind::Int16 => 2,
        Kind::Int => 3,
        Kind::Int64 => 4,
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::Bool => 11,
        Kind::BFloat16 => 15,
        other => return Err(format!("no tensor type for {other:?}")),
    })
}

/// An uninitialised tensor in pinned (page-locked) host memory, which the GPU copies from
/// without the driver staging it first; `None` without CUDA.
pub fn empty_pinned(shape: &[i64], kind: Kind) -> Option<Tensor> {
    let scalar_type = scalar_type(kind).ok()?;
    // SAFETY: a live slice of dims; the C++ side catches every exception.
    let ptr = unsafe { aiaas_empty_pinned(shape.as_ptr(), shape.len(), scalar_type) };
    // SAFETY: a non-null result is a heap `at::Tensor*` of our own, which is what tch's
    // Tensor owns (and deletes on drop).
    (!ptr.is_null()).then(|| unsafe { Tensor::from_ptr(ptr.cast::<torch_sys::C_tensor>()) })
}

/// A CUDA stream of libtorch's pool on `device`, as its id; `None` without CUDA.
pub fn cuda_pool_stream(device: usize) -> Option<i64> {
    let mut id = 0i64;
    // SAFETY: an out-pointer to a live i64; the C++ side catches every exception.
    unsafe { aiaas_cuda_pool_stream(device as c_int, &mut id) }.then_some(id)
}

/// Stream `id` as the calling thread's current stream on `device` until the guard drops (the
/// stream it replaced comes back): an engine's copies and kernels queue on its own stream
/// whichever thread runs it, warm-up's loading thread included.
pub struct StreamGuard {
    device: c_int,
    previous: i64,
}

impl StreamGuard {
    pub fn on(device: usize, id: i64) -> Option<Self> {
        let mut previous = 0i64;
        // SAFETY: an out-pointer to a live i64; the C++ side catches every exception.
        let ok = unsafe { aiaas_cuda_exchange_stream(device as c_int, id, &mut previous) };
        ok.then_some(Self {
            device: device as c_int,
            previous,
        })
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut ignored = 0i64;
        // SAFETY: as above.
        unsafe { aiaas_cuda_exchange_stream(self.device, self.previous, &mut ignored) };
    }
}

/// Waits for all work queued on CUDA device `device`.
pub fn cuda_synchronize(device: usize) -> bool {
    // SAFETY: a plain value in; the C++ side catches every exception.
    unsafe { aiaas_cuda_synchronize(device as c_int) }
}

/// The CUDA caching allocator's `(allocated, reserved)` bytes on `device`; `None` without CUDA.
pub fn cuda_memory(device: usize) -> Option<(u64, u64)> {
    let (mut allocated, mut reserved) = (0i64, 0i64);
    // SAFETY: out-pointers to two live i64s; the C++ side catches every exception.
    let ok = unsafe { aiaas_cuda_memory(device as c_int, &mut allocated, &mut reserved) };
    ok.then_some((allocated.max(0) as u64, reserved.max(0) as u64))
}

/// Autocast to `kind` on the calling thread (on CUDA when `cuda`, else the CPU) until the
/// guard drops, which puts back the thread's previous autocast settings: thread-local state
/// must not outlive the forward pass, since warm-up runs on a shared loading thread.
pub struct Autocast {
    cuda: bool,
    saved: [i64; 3],
}

impl Autocast {
    pub fn on(cuda: bool, kind: Kind) -> Option<Self> {
        let scalar_type = scalar_type(kind).ok()?;
        let mut saved = [0i64; 3];
        // SAFETY: room for the 3 values it saves; the C++ side catches every exception.
        unsafe { aiaas_autocast_enter(cuda, scalar_type, saved.as_mut_ptr()) }
            .then_some(Self { cuda, saved })
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        // SAFETY: the 3 values aiaas_autocast_enter saved.
        unsafe { aiaas_autocast_exit(self.cuda, self.saved.as_ptr()) };
    }
}
