//! The only place that calls virglrenderer: every `unsafe` block of the virgl backend is
//! here, each wrapper taking Rust types and returning the library's status as a `Result`.
//!
//! virglrenderer keeps one global state per process and must be called from one thread
//! (it owns a GL context); [`Virgl`] is the proof of initialisation, neither `Send` nor
//! `Sync`, and at most one exists at a time.

use std::cell::RefCell;
use std::ffi::c_int;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use virglrenderer_sys as sys;

use crate::guest_memory::HostIovec;

/// virglrenderer's entry points, looked up at run time (`dlopen` of
/// `libvirglrenderer.so.1`) rather than linked: only a `--virgl` renderer and the virgl
/// probes load the library and the twenty it pulls in (epoxy, gbm, X11, vulkan, ...);
/// every other process of every VM starts without them, which is most of an exec's cost
/// and of each process's private memory. Each field's type is the C prototype of
/// `virglrenderer.h` as the bindings give it.
struct Lib {
    set_debug_callback:
        unsafe extern "C" fn(sys::virgl_debug_callback_type) -> sys::virgl_debug_callback_type,
    init: unsafe extern "C" fn(*mut c_void, c_int, *mut sys::virgl_renderer_callbacks) -> c_int,
    get_cap_set: unsafe extern "C" fn(u32, *mut u32, *mut u32),
    fill_caps: unsafe extern "C" fn(u32, u32, *mut c_void),
    resource_create: unsafe extern "C" fn(
        *mut sys::virgl_renderer_resource_create_args,
        *mut sys::iovec,
        u32,
    ) -> c_int,
    resource_attach_iov: unsafe extern "C" fn(c_int, *mut sys::iovec, c_int) -> c_int,
    resource_detach_iov: unsafe extern "C" fn(c_int, *mut *mut sys::iovec, *mut c_int),
    resource_unref: unsafe extern "C" fn(u32),
    transfer_write_iov: unsafe extern "C" fn(
        u32,
        u32,
        c_int,
        u32,
        u32,
        *mut sys::virgl_box,
        u64,
        *mut sys::iovec,
        std::ffi::c_uint,
    ) -> c_int,
    transfer_read_iov: unsafe extern "C" fn(
        u32,
        u32,
        u32,
        u32,
        u32,
        *mut sys::virgl_box,
        u64,
        *mut sys::iovec,
        c_int,
    ) -> c_int,
    context_create: unsafe extern "C" fn(u32, u32, *const std::ffi::c_char) -> c_int,
    context_create_with_flags:
        unsafe extern "C" fn(u32, u32, u32, *const std::ffi::c_char) -> c_int,
    context_destroy: unsafe extern "C" fn(u32),
    ctx_attach_resource: unsafe extern "C" fn(c_int, c_int),
    ctx_detach_resource: unsafe extern "C" fn(c_int, c_int),
    submit_cmd: unsafe extern "C" fn(*mut c_void, c_int, c_int) -> c_int,
    create_fence: unsafe extern "C" fn(c_int, u32) -> c_int,
    context_create_fence: unsafe extern "C" fn(u32, u32, u32, u64) -> c_int,
    poll: unsafe extern "C" fn(),
    resource_create_blob:
        unsafe extern "C" fn(*const sys::virgl_renderer_resource_create_blob_args) -> c_int,
    resource_export_blob: unsafe extern "C" fn(u32, *mut u32, *mut c_int) -> c_int,
    resource_get_map_info: unsafe extern "C" fn(u32, *mut u32) -> c_int,
    cleanup: unsafe extern "C" fn(*mut c_void),
}

/// The library's soname (what libvirglrenderer-dev's link would have recorded).
const SONAME: &std::ffi::CStr = c"libvirglrenderer.so.1";

impl Lib {
    /// Loaded once per process and never unloaded (virglrenderer keeps global state).
    fn get() -> Result<&'static Lib, VirglError> {
        static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
        LIB.get_or_init(Lib::load)
            .as_ref()
            .map_err(|why| VirglError::Load(why.clone()))
    }

    // Each transmute's target is the field it initialises: the prototype is written once,
    // in the struct, not again at every symbol.
    #[allow(clippy::missing_transmute_annotations)]
    fn load() -> Result<Lib, String> {
        // SAFETY: FFI with a NUL-terminated name; the handle is never closed.
        let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(dl_error());
        }
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: FFI with a live handle and a NUL-terminated name.
                let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
                if p.is_null() {
                    return Err(format!("{}: no {}", SONAME.to_string_lossy(), $name));
                }
                // SAFETY: the symbol is the function of that name in virglrenderer.h, whose
                // prototype the field's type states; a code pointer and a fn pointer have
                // the same size and representation.
                unsafe { std::mem::transmute::<*mut c_void, _>(p) }
            }};
        }
        Ok(Lib {
            set_debug_callback: sym!("virgl_set_debug_callback"),
            init: sym!("virgl_renderer_init"),
            get_cap_set: sym!("virgl_renderer_get_cap_set"),
            fill_caps: sym!("virgl_renderer_fill_caps"),
            resource_create: sym!("virgl_renderer_resource_create"),
            resource_attach_iov: sym!("virgl_renderer_resource_attach_iov"),
            resource_detach_iov: sym!("virgl_renderer_resource_detach_iov"),
            resource_unref: sym!("virgl_renderer_resource_unref"),
            transfer_write_iov: sym!("virgl_renderer_transfer_write_iov"),
            transfer_read_iov: sym!("virgl_renderer_transfer_read_iov"),
            context_create: sym!("virgl_renderer_context_create"),
            context_create_with_flags: sym!("virgl_renderer_context_create_with_flags"),
            context_destroy: sym!("virgl_renderer_context_destroy"),
            ctx_attach_resource: sym!("virgl_renderer_ctx_attach_resource"),
            ctx_detach_resource: sym!("virgl_renderer_ctx_detach_resource"),
            submit_cmd: sym!("virgl_renderer_submit_cmd"),
            create_fence: sym!("virgl_renderer_create_fence"),
            context_create_fence: sym!("virgl_renderer_context_create_fence"),
            poll: sym!("virgl_renderer_poll"),
            resource_create_blob: sym!("virgl_renderer_resource_create_blob"),
            resource_export_blob: sym!("virgl_renderer_resource_export_blob"),
            resource_get_map_info: sym!("virgl_renderer_resource_get_map_info"),
            cleanup: sym!("virgl_renderer_cleanup"),
        })
    }
}

/// The dynamic loader's last error, for a message.
fn dl_error() -> String {
    // SAFETY: FFI; dlerror returns NULL or a NUL-terminated string valid until the next
    // dl call on this thread, copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return format!("{}: cannot be loaded", SONAME.to_string_lossy());
    }
    // SAFETY: non-NULL, NUL-terminated (above).
    unsafe { std::ffi::CStr::from_ptr(e) }
        .to_string_lossy()
        .into_owned()
}

/// Whether a [`Virgl`] exists in this process.
static INITIALISED: AtomicBool = AtomicBool::new(false);

/// struct virgl_box (the bindings leave it opaque).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirglBox {
    pub x: u32,
    pub y: u32,
    pub z: u32,
    pub w: u32,
    pub h: u32,
    pub d: u32,
}

/// A fence virglrenderer reported through a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signaled {
    /// `virgl_renderer_create_fence`'s id (ctx 0).
    Global(u32),
    /// `virgl_renderer_context_create_fence`'s (context, ring, id).
    Context {
        ctx_id: u32,
        ring_idx: u32,
        fence_id: u64,
    },
}

/// What the callbacks read and write; the cookie points at it.
#[derive(Debug, Default)]
struct Cookie {
    signaled: RefCell<Vec<Signaled>>,
    /// The render node, when the renderer uses one instead of a surfaceless display.
    drm: Option<OwnedFd>,
}

/// Why virglrenderer refused.
#[derive(Debug, thiserror::Error)]
pub enum VirglError {
    /// libvirglrenderer.so.1 could not be loaded (or lacks a function).
    #[error("{0}")]
    Load(String),
    /// Another instance lives in this process.
    #[error("virglrenderer is already initialised in this process")]
    AlreadyInitialised,
    /// `virgl_renderer_init` failed.
    #[error("virgl_renderer_init failed ({0}): no usable EGL or GL (Mesa) on this host")]
    Init(i32),
    /// A call returned a non-zero status.
    #[error("{call} failed with status {status}")]
    Call {
        /// The function.
        call: &'static str,
        /// Its return value (often an errno).
        status: i32,
    },
}

fn check(call: &'static str, status: i32) -> Result<(), VirglError> {
    match status {
        0 => Ok(()),
        status => Err(VirglError::Call { call, status }),
    }
}

/// Proof that virglrenderer is initialised in this process; cleans it up when dropped.
pub struct Virgl {
    lib: &'static Lib,
    cookie: Box<Cookie>,
    /// virglrenderer's state belongs to the thread that initialised it.
    _not_send: PhantomData<*mut ()>,
}

impl std::fmt::Debug for Virgl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Virgl").finish_non_exhaustive()
    }
}

unsafe extern "C" fn write_fence(cookie: *mut c_void, fence: u32) {
    // SAFETY: the cookie is the `Cookie` that `Virgl::init` passed, alive until cleanup.
    let cookie = unsafe { &*(cookie as *const Cookie) };
    cookie.signaled.borrow_mut().push(Signaled::Global(fence));
}

unsafe extern "C" fn write_context_fence(
    cookie: *mut c_void,
    ctx_id: u32,
    ring_idx: u32,
    fence_id: u64,
) {
    // SAFETY: as in `write_fence`.
    let cookie = unsafe { &*(cookie as *const Cookie) };
    cookie.signaled.borrow_mut().push(Signaled::Context {
        ctx_id,
        ring_idx,
        fence_id,
    });
}

extern "C" {
    /// glibc's, declared here with the va_list type bindgen gave the callback.
    fn vsnprintf(
        buf: *mut libc::c_char,
        len: usize,
        fmt: *const libc::c_char,
        ap: *mut sys::__va_list_tag,
    ) -> libc::c_int;
}

/// virglrenderer's own messages (printf-style, to stderr by default) go to our log, with
/// the process's role and level like every other line. Guest-caused context errors are
/// among them, so they are logged at debug level only (a guest could otherwise flood the
/// host's log).
unsafe extern "C" fn debug_message(fmt: *const libc::c_char, ap: *mut sys::__va_list_tag) {
    let mut buf = [0 as libc::c_char; 512];
    // SAFETY: `fmt` and `ap` are the format and arguments virglrenderer passed, consumed
    // once here; vsnprintf writes at most `buf.len()` bytes, NUL-terminated.
    let n = unsafe { vsnprintf(buf.as_mut_ptr(), buf.len(), fmt, ap) };
    if n < 0 {
        return;
    }
    // SAFETY: vsnprintf NUL-terminated the buffer.
    let text = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    log::debug!("virglrenderer: {}", text.to_string_lossy().trim_end());
}

unsafe extern "C" fn get_drm_fd(cookie: *mut c_void) -> libc::c_int {
    // SAFETY: as in `write_fence`.
    let cookie = unsafe { &*(cookie as *const Cookie) };
    match &cookie.drm {
        // virglrenderer owns (and closes) what it gets: a duplicate of ours.
        // SAFETY: fcntl on a descriptor the cookie owns; -1 on failure is what the library
        // expects for "none".
        Some(fd) => unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) },
        None => -1,
    }
}

/// `libc::iovec`s over `iovecs`, in the layout virglrenderer reads.
pub fn to_iovecs(iovecs: &[HostIovec]) -> Vec<libc::iovec> {
    iovecs
        .iter()
        .map(|v| libc::iovec {
            iov_base: v.base().cast(),
            iov_len: v.len(),
        })
        .collect()
}

impl Virgl {
    /// Initialises virglrenderer headless: EGL on a surfaceless platform (Mesa llvmpipe
    /// without a GPU), or on `render_node` (GBM) when given; fences reported through the
    /// callbacks.
    pub fn init(render_node: Option<OwnedFd>) -> Result<Self, VirglError> {
        let lib = Lib::get()?;
        if INITIALISED.swap(true, Ordering::SeqCst) {
            return Err(VirglError::AlreadyInitialised);
        }
        // SAFETY: the callback only formats into a local buffer and logs.
        unsafe { (lib.set_debug_callback)(Some(debug_message)) };
        let display = if render_node.is_some() {
            0
        } else {
            sys::VIRGL_RENDERER_USE_SURFACELESS
        };
        let cookie = Box::new(Cookie {
            signaled: RefCell::default(),
            drm: render_node,
        });
        // The callbacks must outlive the renderer: virglrenderer keeps the pointer.
        let callbacks: &'static mut sys::virgl_renderer_callbacks =
            Box::leak(Box::new(sys::virgl_renderer_callbacks {
                version: 4,
                write_fence: Some(write_fence),
                create_gl_context: None,
                destroy_gl_context: None,
                make_current: None,
                get_drm_fd: Some(get_drm_fd),
                write_context_fence: Some(write_context_fence),
                get_server_fd: None,
                get_egl_display: None,
            }));
        // DRM native contexts where this virglrenderer has them (its capset says so).
        let flags = (sys::VIRGL_RENDERER_USE_EGL | sys::VIRGL_RENDERER_DRM | display) as i32;
        // SAFETY: the cookie is a live heap object owned by the returned `Virgl` (cleanup
        // runs before it is freed), the callbacks are leaked (never freed), and the guard
        // above makes this the only initialisation in the process.
        let rc = unsafe { (lib.init)(&*cookie as *const Cookie as *mut c_void, flags, callbacks) };
        if rc != 0 {
            INITIALISED.store(false, Ordering::SeqCst);
            return Err(VirglError::Init(rc));
        }
        Ok(Virgl {
            lib,
            cookie,
            _not_send: PhantomData,
        })
    }

    /// (max_version, max_size) of capset `id`; (0, 0) when unknown.
    pub fn capset_info(&self, id: u32) -> (u32, u32) {
        let (mut version, mut size) = (0u32, 0u32);
        // SAFETY: two valid out-pointers.
        unsafe { (self.lib.get_cap_set)(id, &mut version, &mut size) };
        (version, size)
    }

    /// Fills `out` (exactly the capset's max size) with capset `id` at `version`.
    pub fn fill_caps(&self, id: u32, version: u32, out: &mut [u8]) {
        // SAFETY: `out` is as large as virglrenderer said the capset is (the caller sized
        // it from `capset_info`), so the library writes inside it.
        unsafe { (self.lib.fill_caps)(id, version, out.as_mut_ptr().cast()) };
    }

    /// virgl_renderer_resource_create without backing.
    pub fn resource_create(
        &self,
        args: &mut sys::virgl_renderer_resource_create_args,
    ) -> Result<(), VirglError> {
        // SAFETY: `args` is a valid struct; no iovecs are passed.
        check("virgl_renderer_resource_create", unsafe {
            (self.lib.resource_create)(args, std::ptr::null_mut(), 0)
        })
    }

    /// Attaches `iovecs` as the resource's backing.
    ///
    /// # Safety
    /// virglrenderer keeps the array pointer, not a copy: `iovecs` (and the memory it
    /// describes) must stay alive and unmoved until [`Virgl::detach_iov`] or
    /// [`Virgl::resource_unref`].
    pub unsafe fn attach_iov(
        &self,
        handle: u32,
        iovecs: &mut [libc::iovec],
    ) -> Result<(), VirglError> {
        // SAFETY: the caller keeps the array alive, as documented; the length matches it.
        check("virgl_renderer_resource_attach_iov", unsafe {
            (self.lib.resource_attach_iov)(
                handle as i32,
                iovecs.as_mut_ptr().cast(),
                iovecs.len() as i32,
            )
        })
    }

    /// Detaches the resource's backing (the array pointer it returns is ours, not freed).
    pub fn detach_iov(&self, handle: u32) {
        let mut iov: *mut sys::iovec = std::ptr::null_mut();
        let mut n: i32 = 0;
        // SAFETY: two valid out-pointers; the returned array is the caller's own.
        unsafe { (self.lib.resource_detach_iov)(handle as i32, &mut iov, &mut n) };
    }

    /// Drops a resource (its backing must have been detached).
    pub fn resource_unref(&self, handle: u32) {
        // SAFETY: a plain handle; an unknown one is ignored by the library.
        unsafe { (self.lib.resource_unref)(handle) };
    }

    /// Copies `bbox` from the attached backing (at `offset`) into the resource.
    #[allow(clippy::too_many_arguments)]
    pub fn transfer_write(
        &self,
        handle: u32,
        ctx_id: u32,
        level: u32,
        stride: u32,
        layer_stride: u32,
        bbox: VirglBox,
        offset: u64,
    ) -> Result<(), VirglError> {
        let mut b = bbox;
        // SAFETY: no iovec is passed, so the library uses the attached backing, whose
        // bounds it checks against `offset`, the box and the strides.
        check("virgl_renderer_transfer_write_iov", unsafe {
            (self.lib.transfer_write_iov)(
                handle,
                ctx_id,
                level as i32,
                stride,
                layer_stride,
                (&mut b as *mut VirglBox).cast(),
                offset,
                std::ptr::null_mut(),
                0,
            )
        })
    }

    /// Copies `bbox` of the resource into `dst` when given (else into the attached
    /// backing), starting at byte `offset`, `stride` bytes per row.
    #[allow(clippy::too_many_arguments)]
    pub fn transfer_read(
        &self,
        handle: u32,
        ctx_id: u32,
        level: u32,
        stride: u32,
        layer_stride: u32,
        bbox: VirglBox,
        offset: u64,
        dst: Option<&mut [u8]>,
    ) -> Result<(), VirglError> {
        let mut b = bbox;
        let mut iov = dst.map(|d| libc::iovec {
            iov_base: d.as_mut_ptr().cast(),
            iov_len: d.len(),
        });
        let (iov_ptr, n) = match iov.as_mut() {
            Some(v) => ((v as *mut libc::iovec).cast(), 1),
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: `iov`, when given, describes `dst`, which outlives the call; the library
        // checks the box, strides and offset against it (or the attached backing).
        check("virgl_renderer_transfer_read_iov", unsafe {
            (self.lib.transfer_read_iov)(
                handle,
                ctx_id,
                level,
                stride,
                layer_stride,
                (&mut b as *mut VirglBox).cast(),
                offset,
                iov_ptr,
                n,
            )
        })
    }

    /// Creates context `ctx_id` of `capset` (0: the default, VIRGL, which the `_with_flags`
    /// form refuses).
    pub fn context_create(&self, ctx_id: u32, capset: u32, name: &[u8]) -> Result<(), VirglError> {
        if capset == 0 {
            // SAFETY: as below.
            return check("virgl_renderer_context_create", unsafe {
                (self.lib.context_create)(ctx_id, name.len() as u32, name.as_ptr().cast())
            });
        }
        // SAFETY: `name` is valid for its length (no NUL needed: the length is passed).
        check("virgl_renderer_context_create_with_flags", unsafe {
            (self.lib.context_create_with_flags)(
                ctx_id,
                capset,
                name.len() as u32,
                name.as_ptr().cast(),
            )
        })
    }

    /// Destroys a context.
    pub fn context_destroy(&self, ctx_id: u32) {
        // SAFETY: a plain handle.
        unsafe { (self.lib.context_destroy)(ctx_id) };
    }

    /// CTX_ATTACH_RESOURCE.
    pub fn ctx_attach_resource(&self, ctx_id: u32, handle: u32) {
        // SAFETY: plain handles; unknown ones are ignored by the library.
        unsafe { (self.lib.ctx_attach_resource)(ctx_id as i32, handle as i32) };
    }

    /// CTX_DETACH_RESOURCE.
    pub fn ctx_detach_resource(&self, ctx_id: u32, handle: u32) {
        // SAFETY: plain handles; unknown ones are ignored by the library.
        unsafe { (self.lib.ctx_detach_resource)(ctx_id as i32, handle as i32) };
    }

    /// Executes a command stream of whole dwords in context `ctx_id`.
    pub fn submit(&self, ctx_id: u32, commands: &mut [u8]) -> Result<(), VirglError> {
        let ndw = (commands.len() / 4) as i32;
        // SAFETY: the library reads `ndw` dwords from the buffer, which holds at least
        // that many bytes.
        check("virgl_renderer_submit_cmd", unsafe {
            (self.lib.submit_cmd)(commands.as_mut_ptr().cast(), ctx_id as i32, ndw)
        })
    }

    /// A fence on context 0, reported as [`Signaled::Global`].
    pub fn create_fence(&self, id: u32) -> Result<(), VirglError> {
        // SAFETY: integer arguments only.
        check("virgl_renderer_create_fence", unsafe {
            (self.lib.create_fence)(id as i32, 0)
        })
    }

    /// A fence on a context's ring, reported as [`Signaled::Context`].
    pub fn context_create_fence(
        &self,
        ctx_id: u32,
        ring_idx: u32,
        fence_id: u64,
    ) -> Result<(), VirglError> {
        // SAFETY: integer arguments only.
        check("virgl_renderer_context_create_fence", unsafe {
            (self.lib.context_create_fence)(ctx_id, 0, ring_idx, fence_id)
        })
    }

    /// Lets virglrenderer retire finished work and returns the fences it reported.
    pub fn poll(&self) -> Vec<Signaled> {
        // SAFETY: no arguments; callbacks run on this thread, into `self.cookie`.
        unsafe { (self.lib.poll)() };
        std::mem::take(&mut *self.cookie.signaled.borrow_mut())
    }

    /// Creates a blob; `iovecs` as for [`Virgl::attach_iov`].
    ///
    /// # Safety
    /// As for [`Virgl::attach_iov`]: the array must outlive the resource.
    pub unsafe fn create_blob(
        &self,
        args: &sys::virgl_renderer_resource_create_blob_args,
    ) -> Result<(), VirglError> {
        // SAFETY: the caller keeps the iovecs alive, as documented.
        check("virgl_renderer_resource_create_blob", unsafe {
            (self.lib.resource_create_blob)(args)
        })
    }

    /// Exports a blob as an fd: (fd, VIRGL_RENDERER_BLOB_FD_TYPE_*).
    pub fn export_blob(&self, handle: u32) -> Result<(OwnedFd, u32), VirglError> {
        let (mut kind, mut fd) = (0u32, -1i32);
        // SAFETY: two valid out-pointers.
        check("virgl_renderer_resource_export_blob", unsafe {
            (self.lib.resource_export_blob)(handle, &mut kind, &mut fd)
        })?;
        if fd < 0 {
            return Err(VirglError::Call {
                call: "virgl_renderer_resource_export_blob",
                status: fd,
            });
        }
        // SAFETY: on success the library hands over a new descriptor we now own.
        Ok((unsafe { OwnedFd::from_raw_fd(fd) }, kind))
    }

    /// VIRGL_RENDERER_MAP_CACHE_* of a blob.
    pub fn map_info(&self, handle: u32) -> Result<u32, VirglError> {
        let mut info = 0u32;
        // SAFETY: a valid out-pointer.
        check("virgl_renderer_resource_get_map_info", unsafe {
            (self.lib.resource_get_map_info)(handle, &mut info)
        })?;
        Ok(info)
    }
}

impl Drop for Virgl {
    fn drop(&mut self) {
        // SAFETY: the cookie passed at init; after this the library calls nothing of ours.
        unsafe { (self.lib.cleanup)(&*self.cookie as *const Cookie as *mut c_void) };
        INITIALISED.store(false, Ordering::SeqCst);
    }
}
