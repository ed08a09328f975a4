// imacri's init for the processes of fanotify-measured ima pods. Built by
// runtime/build.rs as a static binary, embedded into imacri, bind-mounted
// read-only into each such container at /dev/.imacri-init and put before
// the container's (and every exec's) command: `imacri-init PROGRAM ARGS...`.
//
// fanotify measures executions of files on the filesystems it marks (the
// container's rootfs, its measured volumes). A file from anywhere else, for
// example one a helper outside the pod hands over a unix socket, would run
// unseen: through the fd (fexecve), /proc/self/fd/N, a directory fd, a
// working directory or a root there. So before running PROGRAM this
// restricts itself and everything it will run with Landlock: execution is
// allowed only beneath this container's root, whose mounts are the marked
// rootfs and volumes that are noexec or measured. Landlock judges the
// file's own path (its mount and directories), whatever name or fd reached
// it, and a restriction can never be lifted by the process or its children.
//
// Landlock needs no_new_privs for an unprivileged process (imacri also
// sets it in the spec). Any failure stops here (exit 126) rather than run
// PROGRAM unrestricted. Compiled by plain rustc without dependencies.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_long};
use std::os::unix::ffi::OsStringExt;

const SYS_LANDLOCK_CREATE_RULESET: c_long = 444;
const SYS_LANDLOCK_ADD_RULE: c_long = 445;
const SYS_LANDLOCK_RESTRICT_SELF: c_long = 446;
const LANDLOCK_ACCESS_FS_EXECUTE: u64 = 1;
const LANDLOCK_RULE_PATH_BENEATH: c_int = 1;
const PR_SET_NO_NEW_PRIVS: c_int = 38;
const O_PATH: c_int = 0o10000000;
const O_DIRECTORY: c_int = 0o200000;
const O_CLOEXEC: c_int = 0o2000000;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
    fn prctl(option: c_int, ...) -> c_int;
    fn open(path: *const c_char, flags: c_int, ...) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int;
    fn __errno_location() -> *mut c_int;
    fn strerror(errnum: c_int) -> *const c_char;
}

fn errno() -> c_int {
    unsafe { *__errno_location() }
}

fn die(what: &str, err: c_int, code: i32) -> ! {
    let text = unsafe { CStr::from_ptr(strerror(err)) }.to_string_lossy();
    eprintln!("imacri-init: {what}: {text}");
    std::process::exit(code)
}

/// Allows execution only beneath this process's root, for it and all it
/// runs from now on.
fn restrict() {
    unsafe {
        // runc sets it already (the spec asks for it); a pod's seccomp
        // profile may refuse prctl, and landlock_restrict_self below fails
        // (EPERM) if it is not set after all.
        prctl(PR_SET_NO_NEW_PRIVS, 1 as c_long, 0 as c_long, 0 as c_long, 0 as c_long);
        let attr = RulesetAttr {
            handled_access_fs: LANDLOCK_ACCESS_FS_EXECUTE,
        };
        let ruleset = syscall(
            SYS_LANDLOCK_CREATE_RULESET,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0 as c_long,
        ) as c_int;
        if ruleset < 0 {
            die("landlock_create_ruleset", errno(), 126);
        }
        let root = open(c"/".as_ptr(), O_PATH | O_DIRECTORY | O_CLOEXEC);
        if root < 0 {
            die("opening /", errno(), 126);
        }
        let beneath = PathBeneathAttr {
            allowed_access: LANDLOCK_ACCESS_FS_EXECUTE,
            parent_fd: root,
        };
        if syscall(
            SYS_LANDLOCK_ADD_RULE,
            ruleset as c_long,
            LANDLOCK_RULE_PATH_BENEATH as c_long,
            &beneath as *const PathBeneathAttr,
            0 as c_long,
        ) != 0
        {
            die("landlock_add_rule", errno(), 126);
        }
        if syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset as c_long, 0 as c_long) != 0 {
            die("landlock_restrict_self", errno(), 126);
        }
        close(root);
        close(ruleset);
    }
}

fn main() {
    let args: Vec<CString> = std::env::args_os()
        .skip(1)
        .map(|a| CString::new(a.into_vec()).unwrap_or_default())
        .collect();
    if args.is_empty() {
        eprintln!("usage: imacri-init PROGRAM [ARGS...]");
        std::process::exit(127);
    }
    restrict();
    let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    unsafe { execvp(args[0].as_ptr(), argv.as_ptr()) };
    // As a shell reports it: not found is 127, anything else 126.
    let err = errno();
    let what = format!("exec {}", args[0].to_string_lossy());
    die(&what, err, if err == 2 { 127 } else { 126 })
}
