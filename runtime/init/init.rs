// imacri's init for the processes of fanotify-measured ima pods. Built by
// runtime/build.rs as a static, freestanding binary, embedded into imacri,
// bind-mounted read-only into each such container at /dev/.imacri-init and
// put before the container's (and every exec's) command:
// `imacri-init PROGRAM ARGS...`.
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
// With IMACRI_INIT_DENY_PROC_WRITES=1 in its environment (a pod whose policy
// says `anonymous_exec = "deny"`; the variable is taken out of what PROGRAM
// gets) it also restricts opening files for writing, allowed beneath every
// entry of the root but procfs mounts: no process can open
// /proc/<pid>/mem (its own included, which ptrace's checks always allow) to
// write code pages with FOLL_FORCE, which no system call filter sees and
// only the boot parameter proc_mem.force_override=never closes otherwise.
// Landlock has only allow rules, so "everything but /proc" is a rule per
// entry of "/" as it is now: writes beneath a top-level entry made later
// (and beneath /proc) are refused too (README, "Executable memory").
//
// Landlock needs no_new_privs for an unprivileged process (imacri sets it in
// the spec). Any failure stops here (exit 126) rather than run PROGRAM
// unrestricted.
//
// Every container process and exec of such a pod goes through this, so it
// is freestanding (no libc, no std: raw system calls, ~10 KB): an exec of a
// std binary with a static glibc cost ~390 us here, this one ~45 us.
// Compiled by plain rustc without dependencies.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const WRITE: usize = 1;
    pub const OPEN: usize = 2;
    pub const CLOSE: usize = 3;
    pub const EXECVE: usize = 59;
    pub const EXIT_GROUP: usize = 231;
    pub const PRCTL: usize = 157;
    pub const OPENAT: usize = 257;
    pub const GETDENTS64: usize = 217;
    pub const FSTATFS: usize = 138;
}
#[cfg(target_arch = "aarch64")]
mod nr {
    pub const WRITE: usize = 64;
    pub const OPENAT: usize = 56;
    pub const CLOSE: usize = 57;
    pub const EXECVE: usize = 221;
    pub const EXIT_GROUP: usize = 94;
    pub const PRCTL: usize = 167;
    pub const GETDENTS64: usize = 61;
    pub const FSTATFS: usize = 44;
}
// The same numbers on every architecture (the unified table).
const LANDLOCK_CREATE_RULESET: usize = 444;
const LANDLOCK_ADD_RULE: usize = 445;
const LANDLOCK_RESTRICT_SELF: usize = 446;

const LANDLOCK_ACCESS_FS_EXECUTE: u64 = 1;
const LANDLOCK_ACCESS_FS_WRITE_FILE: u64 = 1 << 1;
const LANDLOCK_RULE_PATH_BENEATH: usize = 1;
const PR_SET_NO_NEW_PRIVS: usize = 38;
const O_PATH: usize = 0o10000000;
const O_DIRECTORY: usize = 0o200000;
const O_CLOEXEC: usize = 0o2000000;
const O_NOFOLLOW: usize = 0o400000;
#[cfg(target_arch = "aarch64")]
const AT_FDCWD: isize = -100;
const DT_LNK: u8 = 10;
const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// Set by imacri for pods whose policy denies anonymous executable memory.
const DENY_PROC_WRITES: &[u8] = b"IMACRI_INIT_DENY_PROC_WRITES=";
const ENOENT: isize = 2;
const EACCES: isize = 13;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

#[cfg(target_arch = "x86_64")]
unsafe fn syscall(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let r: isize;
    asm!("syscall", inlateout("rax") n as isize => r, in("rdi") a, in("rsi") b,
         in("rdx") c, in("r10") d, lateout("rcx") _, lateout("r11") _, options(nostack));
    r
}

#[cfg(target_arch = "aarch64")]
unsafe fn syscall(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let r: isize;
    asm!("svc 0", in("x8") n, inlateout("x0") a as isize => r, in("x1") b, in("x2") c,
         in("x3") d, options(nostack));
    r
}

// The kernel starts us with the stack pointer at argc; hand it to `start`.
#[cfg(target_arch = "x86_64")]
global_asm!(
    ".globl _start",
    "_start:",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {start}",
    start = sym start,
);
#[cfg(target_arch = "aarch64")]
global_asm!(
    ".globl _start",
    "_start:",
    "mov x0, sp",
    "bl {start}",
    start = sym start,
);

fn exit(code: usize) -> ! {
    unsafe { syscall(nr::EXIT_GROUP, code, 0, 0, 0) };
    loop {}
}

fn write_err(b: &[u8]) {
    unsafe { syscall(nr::WRITE, 2, b.as_ptr() as usize, b.len(), 0) };
}

/// A NUL-terminated C string as bytes (without the NUL).
unsafe fn c_bytes<'a>(p: *const u8) -> &'a [u8] {
    let mut n = 0;
    while *p.add(n) != 0 {
        n += 1;
    }
    core::slice::from_raw_parts(p, n)
}

fn errno_text(e: isize) -> &'static [u8] {
    match e {
        1 => b"Operation not permitted",
        2 => b"No such file or directory",
        8 => b"Exec format error",
        12 => b"Cannot allocate memory",
        13 => b"Permission denied",
        20 => b"Not a directory",
        22 => b"Invalid argument",
        36 => b"File name too long",
        38 => b"Function not implemented",
        40 => b"Too many levels of symbolic links",
        95 => b"Operation not supported",
        _ => b"error",
    }
}

/// `imacri-init: <what><detail>: <errno text>` and exit with `code`.
fn die(what: &[u8], detail: &[u8], err: isize, code: usize) -> ! {
    write_err(b"imacri-init: ");
    write_err(what);
    write_err(detail);
    write_err(b": ");
    write_err(errno_text(err));
    write_err(b"\n");
    exit(code)
}

/// `open` of an absolute path (openat from the working directory on
/// architectures without `open`).
unsafe fn open(path: &[u8], flags: usize) -> isize {
    #[cfg(target_arch = "x86_64")]
    let fd = syscall(nr::OPEN, path.as_ptr() as usize, flags, 0, 0);
    #[cfg(target_arch = "aarch64")]
    let fd = syscall(nr::OPENAT, AT_FDCWD as usize, path.as_ptr() as usize, flags, 0);
    fd
}

/// Adds a path-beneath rule; the kernel's errno on failure.
unsafe fn add_rule(ruleset: isize, fd: isize, access: u64) -> isize {
    let beneath = PathBeneathAttr {
        allowed_access: access,
        parent_fd: fd as i32,
    };
    syscall(
        LANDLOCK_ADD_RULE,
        ruleset as usize,
        LANDLOCK_RULE_PATH_BENEATH,
        &beneath as *const PathBeneathAttr as usize,
        0,
    )
}

/// Allows opening for writing beneath each entry of "/" but procfs mounts
/// (and symbolic links, whose rule would be their own inode's). A rule on
/// "/" itself would cover /proc.
unsafe fn allow_writes_but_proc(ruleset: isize) {
    let dir = open(b"/\0", O_DIRECTORY | O_CLOEXEC);
    if dir < 0 {
        die(b"opening /", b"", -dir, 126);
    }
    // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, name.
    let mut buf = [0u64; 1024];
    loop {
        let n = syscall(nr::GETDENTS64, dir as usize, buf.as_mut_ptr() as usize, 8192, 0);
        if n < 0 {
            die(b"reading /", b"", -n, 126);
        }
        if n == 0 {
            break;
        }
        let bytes = buf.as_ptr() as *const u8;
        let mut at = 0usize;
        while at < n as usize {
            let rec = bytes.add(at);
            let reclen = core::ptr::read_unaligned(rec.add(16) as *const u16) as usize;
            let dtype = *rec.add(18);
            let name = rec.add(19);
            at += reclen;
            let nm = c_bytes(name);
            if nm == b"." || nm == b".." || dtype == DT_LNK {
                continue;
            }
            let fd = syscall(
                nr::OPENAT,
                dir as usize,
                name as usize,
                O_PATH | O_NOFOLLOW | O_CLOEXEC,
                0,
            );
            if fd == -ENOENT {
                continue;
            }
            if fd < 0 {
                die(b"opening /", nm, -fd, 126);
            }
            // struct statfs starts with f_type (a long) on both.
            let mut sfs = [0u64; 32];
            let r = syscall(nr::FSTATFS, fd as usize, sfs.as_mut_ptr() as usize, 0, 0);
            if r < 0 {
                die(b"statfs /", nm, -r, 126);
            }
            // An entry Landlock takes no rule for (an internal
            // filesystem's file bound there) stays unwritable: closed.
            if sfs[0] != PROC_SUPER_MAGIC {
                add_rule(ruleset, fd, LANDLOCK_ACCESS_FS_WRITE_FILE);
            }
            syscall(nr::CLOSE, fd as usize, 0, 0, 0);
        }
    }
    syscall(nr::CLOSE, dir as usize, 0, 0, 0);
}

/// Allows execution only beneath this process's root (and, with
/// `deny_proc_writes`, opening for writing only outside procfs), for it and
/// all it runs from now on.
unsafe fn restrict(deny_proc_writes: bool) {
    // runc sets it already (the spec asks for it); a pod's seccomp profile
    // may refuse prctl, and landlock_restrict_self below fails (EPERM) if it
    // is not set after all.
    syscall(nr::PRCTL, PR_SET_NO_NEW_PRIVS, 1, 0, 0);
    let mut handled = LANDLOCK_ACCESS_FS_EXECUTE;
    if deny_proc_writes {
        handled |= LANDLOCK_ACCESS_FS_WRITE_FILE;
    }
    let attr = RulesetAttr {
        handled_access_fs: handled,
    };
    let ruleset = syscall(
        LANDLOCK_CREATE_RULESET,
        &attr as *const RulesetAttr as usize,
        core::mem::size_of::<RulesetAttr>(),
        0,
        0,
    );
    if ruleset < 0 {
        die(b"landlock_create_ruleset", b"", -ruleset, 126);
    }
    let fd = open(b"/\0", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if fd < 0 {
        die(b"opening /", b"", -fd, 126);
    }
    let r = add_rule(ruleset, fd, LANDLOCK_ACCESS_FS_EXECUTE);
    if r != 0 {
        die(b"landlock_add_rule", b"", -r, 126);
    }
    if deny_proc_writes {
        allow_writes_but_proc(ruleset);
    }
    let r = syscall(LANDLOCK_RESTRICT_SELF, ruleset as usize, 0, 0, 0);
    if r != 0 {
        die(b"landlock_restrict_self", b"", -r, 126);
    }
    syscall(nr::CLOSE, fd as usize, 0, 0, 0);
    syscall(nr::CLOSE, ruleset as usize, 0, 0, 0);
}

/// Whether the environment asks for [`allow_writes_but_proc`]; takes every
/// entry of that name out of it (PROGRAM's environment is the container's).
unsafe fn take_deny_proc_writes(envp: *mut *const u8) -> bool {
    let mut asked = false;
    let (mut from, mut to) = (envp, envp);
    while !(*from).is_null() {
        let kv = c_bytes(*from);
        if kv.starts_with(DENY_PROC_WRITES) {
            asked |= &kv[DENY_PROC_WRITES.len()..] == b"1";
        } else {
            *to = *from;
            to = to.add(1);
        }
        from = from.add(1);
    }
    *to = core::ptr::null();
    asked
}

/// execvp: a name with a slash as it is, else each directory of PATH (as
/// glibc: /bin:/usr/bin without one). Returns the errno to report.
unsafe fn execvp(argv: *const *const u8, envp: *const *const u8) -> isize {
    let name = c_bytes(*argv);
    if name.contains(&b'/') {
        return -syscall(nr::EXECVE, *argv as usize, argv as usize, envp as usize, 0);
    }
    let mut path: &[u8] = b"/bin:/usr/bin";
    let mut e = envp;
    while !(*e).is_null() {
        let kv = c_bytes(*e);
        if kv.starts_with(b"PATH=") {
            path = &kv[5..];
        }
        e = e.add(1);
    }
    let mut buf = [0u8; 4096];
    let mut seen_eacces = false;
    for dir in path.split(|b| *b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        if dir.len() + 1 + name.len() + 1 > buf.len() {
            continue;
        }
        buf[..dir.len()].copy_from_slice(dir);
        buf[dir.len()] = b'/';
        buf[dir.len() + 1..dir.len() + 1 + name.len()].copy_from_slice(name);
        buf[dir.len() + 1 + name.len()] = 0;
        let r = -syscall(nr::EXECVE, buf.as_ptr() as usize, argv as usize, envp as usize, 0);
        match r {
            EACCES => seen_eacces = true,
            ENOENT | 20 => {}
            other => return other,
        }
    }
    if seen_eacces {
        EACCES
    } else {
        ENOENT
    }
}

unsafe extern "C" fn start(sp: *const usize) -> ! {
    let argc = *sp;
    let argv = sp.add(1) as *const *const u8;
    let envp = argv.add(argc + 1) as *mut *const u8;
    if argc < 2 {
        write_err(b"usage: imacri-init PROGRAM [ARGS...]\n");
        exit(127);
    }
    restrict(take_deny_proc_writes(envp));
    let err = execvp(argv.add(1), envp);
    // As a shell reports it: not found is 127, anything else 126.
    let code = if err == ENOENT { 127 } else { 126 };
    die(b"exec ", c_bytes(*argv.add(1)), err, code)
}

// The compiler may call these for slice copies and comparisons; without a
// libc they are ours. Volatile accesses keep them from being turned back
// into calls to themselves.
#[no_mangle]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i)));
    }
    d
}

#[no_mangle]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) < (s as usize) {
        return memcpy(d, s, n);
    }
    for i in (0..n).rev() {
        core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i)));
    }
    d
}

#[no_mangle]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        core::ptr::write_volatile(d.add(i), c as u8);
    }
    d
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        let (x, y) = (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i)));
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

#[no_mangle]
unsafe extern "C" fn strlen(p: *const u8) -> usize {
    let mut n = 0;
    while core::ptr::read_volatile(p.add(n)) != 0 {
        n += 1;
    }
    n
}

// Referenced by the prebuilt core (built to unwind); never called here:
// panics abort.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(126)
}
