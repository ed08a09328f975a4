// imacri's pause program: the process that holds a pod's namespaces. Built by
// runtime/build.rs as a static binary and embedded into imacri, which imports
// it into containerd as the built-in sandbox image.
//
// As PID 1 of a shared PID namespace it reaps orphans; it exits on SIGINT or
// SIGTERM. Signals through libc directly: this file is compiled by plain
// rustc without dependencies.

use std::os::raw::c_int;

const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;
const SIGCHLD: c_int = 17;
const WNOHANG: c_int = 1;

extern "C" {
    fn signal(sig: c_int, handler: extern "C" fn(c_int)) -> usize;
    fn pause() -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn _exit(code: c_int) -> !;
}

extern "C" fn on_term(_: c_int) {
    unsafe { _exit(0) }
}

extern "C" fn on_child(_: c_int) {
    let mut status: c_int = 0;
    unsafe { while waitpid(-1, &mut status, WNOHANG) > 0 {} }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("-v") {
        println!("imacri pause");
        return;
    }
    unsafe {
        signal(SIGINT, on_term);
        signal(SIGTERM, on_term);
        signal(SIGCHLD, on_child);
    }
    loop {
        unsafe {
            pause();
        }
    }
}
