//! The AFL++ harness: `krun-fuzz TARGET` runs one fuzz target (see `fuzz::TARGETS`) in
//! AFL++'s persistent mode, taking each input from AFL++'s shared-memory test case (no file
//! written or read per execution), or from standard input when AFL++ offers none. A panic (a
//! decoder's or a broken contract's) aborts, which AFL++ records as a crash. Without AFL++
//! (no fork server), it runs the target once on standard input: `krun-fuzz frame <
//! crash-file` reproduces a crash.
use std::io::Read;

#[global_allocator]
static ALLOC: fabric::fuzz::MaxAlloc = fabric::fuzz::MaxAlloc;

#[allow(non_upper_case_globals)]
extern "C" {
    /// AFL++'s runtime (afl-compiler-rt.o): true while the fork server has another input
    /// for this process (at most `max` per process), false at once without AFL++.
    fn __afl_persistent_loop(max: u32) -> i32;
    /// Starts the fork server here, after the harness's set-up.
    fn __afl_manual_init();
    /// The shared-memory test case: its bytes (null unless AFL++ set up shared-memory
    /// fuzzing, which it does when [`__afl_sharedmem_fuzzing`] is non-zero) and its length.
    static __afl_fuzz_ptr: *const u8;
    static __afl_fuzz_len: *const u32;
}

/// Asks AFL++'s runtime for shared-memory test cases (the runtime's own definition is weak;
/// what `__AFL_FUZZ_INIT()` defines in C). Mutable: the runtime sets it to 0 when it runs
/// outside afl-fuzz (an immutable static would sit in read-only memory and that write
/// would fault). Rust code never reads or writes it.
#[no_mangle]
#[used]
#[allow(non_upper_case_globals)]
static mut __afl_sharedmem_fuzzing: i32 = 1;

/// AFL++ looks for these markers in the binary to enable persistent mode and the deferred
/// fork server (what its compiler wrappers embed for `__AFL_LOOP` and `__AFL_INIT`).
#[used]
static PERSISTENT_SIGNATURE: &[u8; 23] = b"##SIG_AFL_PERSISTENT##\0";
#[used]
static DEFERRED_SIGNATURE: &[u8; 25] = b"##SIG_AFL_DEFER_FORKSRV##";

/// Inputs per process before the fork server starts a fresh one (bounds leaks' effect).
const PER_PROCESS: u32 = 10_000;

fn main() {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!(
            "usage: krun-fuzz TARGET < input   (targets: {})",
            fuzz::TARGETS
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::process::exit(2);
    };
    if name == "--list" {
        for t in fuzz::TARGETS {
            println!("{}", t.name);
        }
        return;
    }
    let Some(target) = fuzz::target(&name) else {
        eprintln!("krun-fuzz: no target {name}");
        std::process::exit(2);
    };
    // A panic anywhere is a crash for AFL++: print it, then abort (no unwinding).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let mut input = Vec::with_capacity(1 << 20);
    // SAFETY: AFL++'s runtime functions take no pointers; called from the main thread.
    unsafe { __afl_manual_init() };
    let mut ran = false;
    // SAFETY: as above.
    while unsafe { __afl_persistent_loop(PER_PROCESS) } != 0 || !ran {
        ran = true;
        // SAFETY: the runtime sets both before each iteration and leaves them alone while
        // the target runs; the pointer, when not null, addresses `*__afl_fuzz_len` bytes of
        // the shared test case.
        let shared = unsafe {
            let ptr = std::ptr::read_volatile(&raw const __afl_fuzz_ptr);
            let len = std::ptr::read_volatile(&raw const __afl_fuzz_len);
            (!ptr.is_null() && !len.is_null())
                .then(|| std::slice::from_raw_parts(ptr, *len as usize))
        };
        match shared {
            Some(case) => fuzz::run(target, case),
            None => {
                input.clear();
                if std::io::stdin().lock().read_to_end(&mut input).is_err() {
                    continue;
                }
                fuzz::run(target, &input);
            }
        }
    }
}
