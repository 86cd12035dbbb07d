//! Raw bindings to libfabric, generated at build time by bindgen from the headers of the
//! libfabric 2.1 that `scripts/build-libfabric.sh` builds (or the system's when it is absent).
//! libfabric's `static inline` calls are reached through the `krun_fi_*` C shims in `shim.c`.
//!
//! The library is not linked: [`Lib::load`] opens it with dlopen the first time it is needed,
//! so a process that never opens an endpoint (krun, krund, most ranks) starts without
//! libfabric's provider constructors. Everything here is unsafe FFI; the safe layer lives in
//! the `fabric` crate.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

/// Libfabric API version krun asks for (1.17: served by 1.17 and 2.x alike).
pub const KRUN_FI_VERSION: u32 = (1 << 16) | 17;

/// `FI_ADDR_UNSPEC` is a cast macro bindgen cannot evaluate.
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;

/// The library dlopened by [`Lib::load`]: the one whose headers these bindings come from.
pub const LIBRARY: &str = env!("KRUN_LIBFABRIC_LIBRARY");

/// The exported (non-inline) libfabric calls krun uses, resolved from the loaded library.
pub struct Lib {
    pub fi_getinfo: unsafe extern "C" fn(
        version: u32,
        node: *const c_char,
        service: *const c_char,
        flags: u64,
        hints: *const fi_info,
        info: *mut *mut fi_info,
    ) -> c_int,
    pub fi_freeinfo: unsafe extern "C" fn(info: *mut fi_info),
    pub fi_dupinfo: unsafe extern "C" fn(info: *const fi_info) -> *mut fi_info,
    pub fi_fabric: unsafe extern "C" fn(
        attr: *mut fi_fabric_attr,
        fabric: *mut *mut fid_fabric,
        context: *mut c_void,
    ) -> c_int,
    pub fi_strerror: unsafe extern "C" fn(errnum: c_int) -> *const c_char,
    pub fi_version: unsafe extern "C" fn() -> u32,
}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

impl Lib {
    /// Loads libfabric once per process; later calls return the same library (or the same
    /// error, naming the library and dlerror's reason).
    pub fn load() -> Result<&'static Lib, String> {
        LIB.get_or_init(|| Self::open(LIBRARY))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The library, if [`Lib::load`] succeeded earlier.
    pub fn loaded() -> Option<&'static Lib> {
        LIB.get().and_then(|r| r.as_ref().ok())
    }

    fn open(path: &str) -> Result<Lib, String> {
        let c_path =
            CString::new(path).map_err(|_| format!("library path {path:?} contains NUL"))?;
        // SAFETY: dlopen with a valid C string; the handle is never closed (the library stays
        // loaded for the life of the process, as a linked library would).
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(format!("cannot load libfabric ({path}): {}", dlerror()));
        }
        let sym = |name: &str| -> Result<*mut c_void, String> {
            let c_name = CString::new(name).expect("symbol names have no NUL");
            // SAFETY: handle is a live dlopen handle; c_name is a valid C string.
            let p = unsafe { libc::dlsym(handle, c_name.as_ptr()) };
            if p.is_null() {
                Err(format!("{path} has no symbol {name}: {}", dlerror()))
            } else {
                Ok(p)
            }
        };
        // SAFETY: each symbol is the libfabric function of that name, whose C signature
        // (from the same headers bindgen read) matches the field's type; dlsym returns the
        // default symbol version, the one those headers declare.
        unsafe {
            Ok(Lib {
                fi_getinfo: std::mem::transmute::<*mut c_void, _>(sym("fi_getinfo")?),
                fi_freeinfo: std::mem::transmute::<*mut c_void, _>(sym("fi_freeinfo")?),
                fi_dupinfo: std::mem::transmute::<*mut c_void, _>(sym("fi_dupinfo")?),
                fi_fabric: std::mem::transmute::<*mut c_void, _>(sym("fi_fabric")?),
                fi_strerror: std::mem::transmute::<*mut c_void, _>(sym("fi_strerror")?),
                fi_version: std::mem::transmute::<*mut c_void, _>(sym("fi_version")?),
            })
        }
    }

    /// `fi_allocinfo()` (an inline call in the headers: `fi_dupinfo(NULL)`).
    ///
    /// # Safety
    /// The result is owned by the caller and freed with `fi_freeinfo`.
    pub unsafe fn allocinfo(&self) -> *mut fi_info {
        (self.fi_dupinfo)(std::ptr::null())
    }

    /// The text of a libfabric error code (positive `FI_E*` value).
    pub fn strerror(&self, errnum: i32) -> String {
        // SAFETY: fi_strerror returns a pointer to a static string for any code.
        unsafe { CStr::from_ptr((self.fi_strerror)(errnum)) }
            .to_string_lossy()
            .into_owned()
    }

    /// The loaded library's version as (major, minor).
    pub fn version(&self) -> (u32, u32) {
        // SAFETY: fi_version takes nothing and returns a number.
        let v = unsafe { (self.fi_version)() };
        (v >> 16, v & 0xffff)
    }
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a C string valid until the next dl* call on this thread.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated per dlerror's contract.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}
