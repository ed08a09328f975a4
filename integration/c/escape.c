/* `escape MODE [PATH]`: tries one way to run code and prints `RAN MODE`
   (exit 0) or `MODE: <error>` (exit 1). The code is x86-64
   `mov eax, 42; ret`. */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/io_uring.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
static unsigned char code[] = {0xb8, 0x2a, 0, 0, 0, 0xc3};
/* swap-*: while the map guard checks a call, a second thread puts another
   file under the fd number (mmap) or under the range (mprotect). */
static int swap_fd, swap_in;
static void *swap_at;
static void *swapper(void *a) { (void)a; usleep(200000); dup2(swap_in, swap_fd); return 0; }
static void *parked(void *a) { (void)a; pause(); return 0; }
/* A static x86-64 program whose one segment is `body`, written to PATH. */
static int write_elf(const char *path, const unsigned char *body, size_t n) {
    unsigned char f[sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr) + 64] = {0};
    if (n > 64) { errno = EINVAL; return -1; }
    Elf64_Ehdr *e = (Elf64_Ehdr *)f;
    Elf64_Phdr *p = (Elf64_Phdr *)(f + sizeof *e);
    size_t len = sizeof *e + sizeof *p + n;
    memcpy(e->e_ident, ELFMAG, SELFMAG);
    e->e_ident[EI_CLASS] = ELFCLASS64; e->e_ident[EI_DATA] = ELFDATA2LSB;
    e->e_ident[EI_VERSION] = EV_CURRENT;
    e->e_type = ET_EXEC; e->e_machine = EM_X86_64; e->e_version = EV_CURRENT;
    e->e_entry = 0x400000 + sizeof *e + sizeof *p; e->e_phoff = sizeof *e;
    e->e_ehsize = sizeof *e; e->e_phentsize = sizeof *p; e->e_phnum = 1;
    p->p_type = PT_LOAD; p->p_flags = PF_R | PF_X; p->p_vaddr = p->p_paddr = 0x400000;
    p->p_filesz = p->p_memsz = len; p->p_align = 0x1000;
    memcpy(f + sizeof *e + sizeof *p, body, n);
    int fd = open(path, O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0755);
    if (fd < 0) return -1;
    int ok = write(fd, f, len) == (ssize_t)len;
    return close(fd) == 0 && ok ? 0 : -1;
}
/* A program of 129 bytes that exits 0 (`mov eax, 60; xor edi, edi;
   syscall`): a new file to execute. */
static int write_exit0(const char *path) {
    static const unsigned char exit0[] = {0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05};
    return write_elf(path, exit0, sizeof exit0);
}
/* A program that sleeps 0.3 s and then exits with the byte at file offset
   SLEEPER_CODE (0: as written): `nanosleep(&ts, 0); exit(code)`. */
#define SLEEPER_CODE (sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr) + 22)
static int write_sleeper(const char *path) {
    static const unsigned char body[] = {
        0xb8, 35, 0, 0, 0,                  /* mov eax, nanosleep */
        0x48, 0x8d, 0x3d, 16, 0, 0, 0,      /* lea rdi, [rip+16] (ts) */
        0x31, 0xf6,                         /* xor esi, esi */
        0x0f, 0x05,                         /* syscall */
        0xb8, 60, 0, 0, 0,                  /* mov eax, exit */
        0xbf, 0, 0, 0, 0,                   /* mov edi, code */
        0x0f, 0x05,                         /* syscall */
        0, 0, 0, 0, 0, 0, 0, 0,             /* ts: 0 s */
        0x00, 0xa3, 0xe1, 0x11, 0, 0, 0, 0, /* 300000000 ns */
    };
    return write_elf(path, body, sizeof body);
}
/* Opens PATH for writing, maps it shared and writable, dirties each page
   (so later writes through the mapping take no fault: the file's mtime
   moves no more) and closes the fd: the mapping alone keeps it writable. */
static unsigned char *map_shared_writable(const char *path, size_t *len) {
    int fd = open(path, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) return 0;
    unsigned char *w = mmap(0, st.st_size, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (w == MAP_FAILED) return 0;
    for (off_t i = 0; i < st.st_size; i += 4096) w[i] = w[i];
    *len = st.st_size;
    return w;
}
/* Runs `PATH` in a child; its exit status, or -errno if it did not run. */
static int run_child(const char *path, int patch_after_ms, unsigned char *at, unsigned char v) {
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC)) return -errno;
    pid_t c = fork();
    if (c == 0) {
        execl(path, path, (char *)0);
        int e = errno; (void)!write(pfd[1], &e, sizeof e); _exit(127);
    }
    close(pfd[1]);
    if (at) { usleep(patch_after_ms * 1000); *at = v; }
    int st, e = 0;
    if (c < 0 || waitpid(c, &st, 0) < 0) return -errno;
    ssize_t got = read(pfd[0], &e, sizeof e);
    close(pfd[0]);
    if (got == sizeof e) return -e;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}
static void *remapper(void *a) {
    (void)a; usleep(200000);
    mmap(swap_at, 4096, PROT_READ, MAP_PRIVATE|MAP_FIXED, swap_in, 0);
    return 0;
}
/* worker-*: the call is made by a thread other than the main one (as a
   program that loads a library from a worker thread does), which exits
   right after it while the process lives on. */
struct work { const char *m; int fd; int run; int r; void *at; };
static void *worker(void *a);
static void *mapped_at(void *a) {
    struct work *w = a;
    w->at = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, w->fd, 0);
    return 0;
}
static int ran(const char *m, void *p) {
    if (((int (*)(void))p)() != 42) { printf("%s: wrong result\n", m); return 1; }
    printf("RAN %s\n", m); return 0;
}
static int fail(const char *m) { printf("%s: %s\n", m, strerror(errno)); return 1; }
/* A function of this program's own code (a file's page) that code is
   written over (poke-exec, procmem-exec): 42 afterwards, 7 before. */
__attribute__((noinline)) static int seven(void) { __asm__ volatile(""); return 7; }
static int (*volatile seven_at)(void) = seven;
/* ia32-rie: a static 32-bit program without PT_GNU_STACK, to which the
   kernel gives READ_IMPLIES_EXEC. It far-jumps to 64-bit code (selector
   0x33), maps fd 3 with PROT_READ only (MAP_FIXED under 4 GiB: a 32-bit
   task's 64-bit mmap finds no room of its own), calls what it mapped and
   exits with its result. */
static int write_ia32_rie(const char *path) {
    unsigned char f[sizeof(Elf32_Ehdr) + sizeof(Elf32_Phdr) + 64] = {0};
    Elf32_Ehdr *e = (Elf32_Ehdr *)f;
    Elf32_Phdr *p = (Elf32_Phdr *)(f + sizeof *e);
    unsigned base = 0x08048000, entry = base + sizeof *e + sizeof *p;
    unsigned char body[] = {
        0xea, 0, 0, 0, 0, 0x33, 0x00,       /* ljmp 0x33:next (64-bit) */
        0xb8, 9, 0, 0, 0,                   /* mov eax, mmap */
        0xbf, 0, 0, 0, 0x20,                /* mov edi, 0x20000000 */
        0xbe, 0, 0x10, 0, 0,                /* mov esi, 4096 */
        0xba, 1, 0, 0, 0,                   /* mov edx, PROT_READ */
        0x41, 0xba, 0x12, 0, 0, 0,          /* mov r10d, MAP_PRIVATE|MAP_FIXED */
        0x41, 0xb8, 3, 0, 0, 0,             /* mov r8d, 3 */
        0x45, 0x31, 0xc9,                   /* xor r9d, r9d */
        0x0f, 0x05,                         /* syscall */
        0xff, 0xd0,                         /* call rax */
        0x89, 0xc7,                         /* mov edi, eax */
        0xb8, 231, 0, 0, 0,                 /* mov eax, exit_group */
        0x0f, 0x05,                         /* syscall */
    };
    unsigned next = entry + 7;
    memcpy(body + 1, &next, 4);
    size_t len = sizeof *e + sizeof *p + sizeof body;
    memcpy(e->e_ident, ELFMAG, SELFMAG);
    e->e_ident[EI_CLASS] = ELFCLASS32; e->e_ident[EI_DATA] = ELFDATA2LSB;
    e->e_ident[EI_VERSION] = EV_CURRENT;
    e->e_type = ET_EXEC; e->e_machine = EM_386; e->e_version = EV_CURRENT;
    e->e_entry = entry; e->e_phoff = sizeof *e;
    e->e_ehsize = sizeof *e; e->e_phentsize = sizeof *p; e->e_phnum = 1;
    p->p_type = PT_LOAD; p->p_flags = PF_R | PF_X; p->p_vaddr = p->p_paddr = base;
    p->p_filesz = p->p_memsz = len; p->p_align = 0x1000;
    memcpy(f + sizeof *e + sizeof *p, body, sizeof body);
    int fd = open(path, O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0755);
    if (fd < 0) return -1;
    int ok = write(fd, f, len) == (ssize_t)len;
    return close(fd) == 0 && ok ? 0 : -1;
}
/* swap-leader: main runs again in a thread after the main thread exited
   (the process's /proc/<pid>/maps then reads empty). */
static int again_argc, leader_left;
static char **again_argv;
int main(int argc, char **argv);
static void *without_leader(void *a) { (void)a; exit(main(again_argc, again_argv)); }
/* Sends `n` fds over unix socket `s` (SCM_RIGHTS, with one byte). */
static int send_fds(int s, const int *fds, int n) {
    char x = 'x';
    struct iovec io = {&x, 1};
    char buf[CMSG_SPACE(2 * sizeof(int))];
    struct msghdr msg = {0};
    msg.msg_iov = &io; msg.msg_iovlen = 1;
    msg.msg_control = buf; msg.msg_controllen = CMSG_SPACE(n * sizeof(int));
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(n * sizeof(int));
    memcpy(CMSG_DATA(cm), fds, n * sizeof(int));
    return sendmsg(s, &msg, 0) == 1 ? 0 : -1;
}
/* Receives `n` (at most 2) fds sent by send_fds. */
static int recv_fds(int s, int *fds, int n) {
    char x;
    struct iovec io = {&x, 1};
    char buf[CMSG_SPACE(2 * sizeof(int))];
    struct msghdr msg = {0};
    msg.msg_iov = &io; msg.msg_iovlen = 1;
    msg.msg_control = buf; msg.msg_controllen = sizeof buf;
    if (recvmsg(s, &msg, 0) != 1) return -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    if (!cm || cm->cmsg_type != SCM_RIGHTS) return -1;
    memcpy(fds, CMSG_DATA(cm), n * sizeof(int));
    return 0;
}
/* `path` opened by a child process and handed over a unix socket
   (SCM_RIGHTS): the receiver never opens it by name. */
static int passed_fd(const char *path) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(path, O_RDONLY);
        _exit(fd < 0 || send_fds(sv[0], &fd, 1));
    }
    int fd = -1;
    if (recv_fds(sv[1], &fd, 1)) fd = -1;
    waitpid(pid, 0, 0);
    return fd;
}
/* Sends `path` and its directory as fds to each client of a unix socket
   at `sock`, for ever: a helper outside the pod handing over its files. */
static int serve_fds(const char *sock, const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, sock, sizeof a.sun_path - 1);
    unlink(sock);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 8)) return fail("serve-fds");
    chmod(sock, 0777);
    char dir[256];
    strncpy(dir, path, sizeof dir - 1); dir[sizeof dir - 1] = 0;
    *strrchr(dir, '/') = 0;
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        int fds[2] = {open(path, O_RDONLY), open(dir, O_RDONLY|O_DIRECTORY)};
        send_fds(c, fds, 2);
        close(fds[0]); close(fds[1]); close(c);
    }
}
/* Receives a file fd and its directory's fd from `sock` (see serve_fds). */
static int received_fds(const char *sock, int fds[2]) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, sock, sizeof a.sun_path - 1);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) return -1;
    return recv_fds(s, fds, 2);
}
static int memfd(void) {
    int fd = memfd_create("payload", 0);
    if (fd < 0) return -1;
    write(fd, code, sizeof code); ftruncate(fd, 4096);
    return fd;
}
static void *worker(void *a) {
    struct work *w = a;
    void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, w->fd, 0);
    if (p == MAP_FAILED) { w->r = fail(w->m); return 0; }
    if (w->run) { w->r = ran(w->m, p); return 0; }
    printf("MAPPED %s\n", w->m);
    w->r = 0;
    return 0;
}
static int in_worker(const char *m, int fd, int run) {
    struct work w = {m, fd, run, 1, 0};
    pthread_t t;
    if (fd < 0 || pthread_create(&t, 0, worker, &w)) return fail(m);
    pthread_join(t, 0);
    return w.r;
}
/* own-listener: answers every notification of the process's own filter
   with CONTINUE. */
static int own_listener = -1;
static void *continuer(void *a) {
    (void)a;
    for (;;) {
        struct seccomp_notif req;
        struct seccomp_notif_resp resp;
        memset(&req, 0, sizeof req);
        if (ioctl(own_listener, SECCOMP_IOCTL_NOTIF_RECV, &req)) return 0;
        memset(&resp, 0, sizeof resp);
        resp.id = req.id;
        resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
        ioctl(own_listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
}
/* Maps PATH executable (a page), first made with the code if `make`;
   MAP_FAILED (errno set) if it cannot. */
static void *map_code(const char *path, int make) {
    if (make) {
        int w = open(path, O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return MAP_FAILED;
        close(w);
    }
    int fd = open(path, O_RDONLY);
    void *p = fd < 0 ? MAP_FAILED : mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (fd >= 0) close(fd);
    return p;
}

/* An io_uring of four entries (raw syscalls: no liburing in the image). */
struct uring { int fd; unsigned *tail, *array, mask; struct io_uring_sqe *sqes; };
static int uring_setup(struct uring *u, unsigned flags) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = flags;
    p.sq_thread_idle = 5000;
    u->fd = syscall(SYS_io_uring_setup, 4, &p);
    if (u->fd < 0) return -1;
    char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned),
                    PROT_READ|PROT_WRITE, MAP_SHARED|MAP_POPULATE, u->fd, IORING_OFF_SQ_RING);
    u->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe),
                   PROT_READ|PROT_WRITE, MAP_SHARED|MAP_POPULATE, u->fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || u->sqes == MAP_FAILED) return -1;
    u->tail = (unsigned *)(sq + p.sq_off.tail);
    u->array = (unsigned *)(sq + p.sq_off.array);
    u->mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    return 0;
}
/* Queues one entry; `flags`: IOSQE_*. */
static struct io_uring_sqe *uring_sqe(struct uring *u, int op, int fd, unsigned flags) {
    unsigned i = *u->tail & u->mask;
    struct io_uring_sqe *e = &u->sqes[i];
    memset(e, 0, sizeof *e);
    e->opcode = op; e->fd = fd; e->flags = flags;
    u->array[i] = i;
    __atomic_store_n(u->tail, *u->tail + 1, __ATOMIC_RELEASE);
    return e;
}
static int uring_submit(struct uring *u, unsigned n) {
    return syscall(SYS_io_uring_enter, u->fd, n, 0, 0, 0, 0);
}
static char uring_buf[16];
/* Submits a read of `fd` that an io_uring worker thread performs (and
   blocks in, on an empty pipe). */
static int uring_read(int fd) {
    struct uring u;
    if (uring_setup(&u, 0)) return -1;
    struct io_uring_sqe *e = uring_sqe(&u, IORING_OP_READ, fd, IOSQE_ASYNC);
    e->addr = (unsigned long)uring_buf; e->len = sizeof uring_buf;
    return uring_submit(&u, 1);
}
/* uring-swap*: opens /bin/busybox and returns the fd; 200 ms later the
   ring's kernel thread (SQPOLL) runs a close of that fd and an open of
   /tmp/uswap.bin (the code; it takes the freed fd number again), queued by
   a child: no system call of this process, nothing that interrupts its
   mmap. */
static int uring_swap_later(void) {
    int w = open("/tmp/uswap.bin", O_RDWR|O_CREAT|O_TRUNC, 0644);
    if (w < 0 || write(w, code, sizeof code) != sizeof code) return -1;
    close(w);
    struct uring u;
    if (uring_setup(&u, IORING_SETUP_SQPOLL)) return -1;
    int fd = open("/bin/busybox", O_RDONLY);
    if (fd < 0) return -1;
    if (fork() == 0) {
        usleep(200000);
        uring_sqe(&u, IORING_OP_CLOSE, fd, IOSQE_IO_LINK);
        struct io_uring_sqe *e = uring_sqe(&u, IORING_OP_OPENAT, AT_FDCWD, 0);
        e->addr = (unsigned long)"/tmp/uswap.bin"; e->open_flags = O_RDONLY;
        /* The ring's thread sleeps when idle: only a wake-up, no
           submission, from this other process. */
        syscall(SYS_io_uring_enter, u.fd, 0, 0, IORING_ENTER_SQ_WAKEUP, 0, 0);
        _exit(0);
    }
    return fd;
}
/* uring-vm-swap's sharer: a process sharing only the address space (clone
   with CLONE_VM, not CLONE_FILES: the guard's fd-table check misses it),
   calling into vm_at until what is there returns 42. No libc inside: it
   shares the caller's thread pointer. */
static void *vm_at;
static char vm_stack[65536];
static int vm_sharer(void *a) {
    (void)a;
    for (unsigned long i = 0; i < 3000000000UL; i++)
        if (((int (*)(void))vm_at)() == 42) {
            syscall(SYS_write, 1, "RAN uring-vm-swap\n", 18);
            syscall(SYS_exit, 0);
        }
    syscall(SYS_exit, 3);
    return 0;
}
/* held-flood: a thread's loop of mprotect(PROT_EXEC) on a page of its
   own; every call is held (the threads share the address space). */
static void *wx_flipper(void *a) {
    (void)a;
    char *p = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 0;
    for (unsigned long i = 0;; i++)
        if (mprotect(p, 4096, (i & 1) ? PROT_READ|PROT_WRITE : PROT_READ|PROT_EXEC)) return 0;
}
/* Returns the worker's errno (thread-local), 0 when it worked. */
static void *protector(void *a) {
    return mprotect(a, 4096, PROT_READ|PROT_EXEC) ? (void *)(long)errno : 0;
}
/* Pins the caller to CPU `cpu`. */
static void pin(int cpu) {
    cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}
/* The caller runs on CPU 0 only when nothing else wants it (SCHED_IDLE),
   behind busy_cpu0's spinner. */
static void starve_on_cpu0(void) {
    pin(0);
    struct sched_param sp = {0};
    sched_setscheduler(0, SCHED_IDLE, &sp);
}
/* A child spinning on CPU 0 (its pid, to kill); the caller moves to CPU 1. */
static pid_t busy_cpu0(void) {
    pid_t caller = getpid();
    pid_t spin = fork();
    if (!spin) {
        /* Never outlives the caller: an ExecSync that timed out kills the
           caller alone, and the spinner would hold the exec's output open
           (and CPU 0) for good. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != caller) _exit(0);
        pin(0);
        for (;;) ;
    }
    pin(1);
    return spin;
}

/* Watches task C's syscall file until C has been answered `times` times
   in its execve (each a "59 ..." seen, blocked on a permission event,
   then "running": woken, not yet run). 1 when it was, 0 when C is gone or
   the watch gave up. */
static int answered_in_execve(pid_t c, int times) {
    char f[64], t[64];
    snprintf(f, sizeof f, "/proc/%d/syscall", c);
    int answered = 0, in_exec = 0;
    for (int i = 0; i < 4000000 && answered < times; i++) {
        int sf = open(f, O_RDONLY);
        if (sf < 0) break;
        ssize_t n = read(sf, t, sizeof t - 1);
        close(sf);
        if (n <= 0) break;
        t[n] = 0;
        if (!strncmp(t, "59 ", 3)) in_exec = 1;
        else if (in_exec && !strncmp(t, "running", 7)) { answered++; in_exec = 0; }
    }
    return answered == times;
}

/* What a copy of this program prints in mode "mark": exec-swap rewrites
   it in a copy (same length) to tell which content ran. */
static const char marker[] = "MARK-good";

/* Runs PATH with "mark" and returns 1 when it printed MARK-EVIL (stdout
   of the child into a pipe). With `starve`, the child runs on CPU 0 at
   SCHED_IDLE (a spinner holds CPU 0), and once it is in execve and
   answered (its syscall file turns from "59 ..." to "running": woken, not
   yet run) PATH is opened for writing and rewritten, before the child's
   kernel reaches its own writers check. *wrote says whether that open
   and write went through. */
static int run_mark(const char *path, int starve, long off, int *wrote) {
    int p[2];
    if (pipe(p)) return -1;
    pid_t c = fork();
    if (c < 0) return -1;
    if (!c) {
        if (starve) {
            starve_on_cpu0();
        }
        dup2(p[1], 1);
        execl(path, path, "mark", (char *)0);
        _exit(127);
    }
    close(p[1]);
    *wrote = 0;
    if (starve && answered_in_execve(c, 1)) {
        int w = open(path, O_WRONLY);
        if (w >= 0) {
            *wrote = pwrite(w, "MARK-EVIL", 9, off) == 9;
            close(w);
        }
    }
    char out[64] = {0};
    ssize_t n = read(p[0], out, sizeof out - 1);
    close(p[0]);
    waitpid(c, 0, 0);
    return n > 0 && strstr(out, "MARK-EVIL") != 0;
}

/* For interp-swap: runs PATH (a dynamic program) with its child on CPU 0
   at SCHED_IDLE (a spinner holds CPU 0); once the child is answered a
   second time in its execve (the program's event, then, mostly, its
   interpreter's: its syscall file goes "59 ...", "running", "59 ...",
   "running"), opens LOADER for writing, breaks its ELF magic and closes
   it at once, then puts the magic back once the child is done. Returns
   1 when the child's kernel loaded the broken loader (ELIBBAD: it read
   the loader after the writer was done, so it could have run anything
   written there), 2 when the open went through but the child's execution
   failed with ETXTBSY (its kernel's writers check saw the writer: no
   harm), 3 when it went through and the child ran, 0 when it failed with
   EPERM, -1 otherwise. */
static int race_loader(const char *path, const char *loader) {
    pid_t c = fork();
    if (c < 0) return -1;
    if (!c) {
        starve_on_cpu0();
        int n = open("/dev/null", O_WRONLY);
        dup2(n, 1);
        execl(path, path, (char *)0);
        _exit(errno == ETXTBSY ? 126 : errno == ELIBBAD || errno == ENOEXEC ? 125 : 127);
    }
    int r = -1, broke = 0;
    if (answered_in_execve(c, 2)) {
        int w = open(loader, O_WRONLY);
        if (w >= 0) {
            broke = pwrite(w, "\x7f" "ELX", 4, 0) == 4;
            close(w);
        } else if (errno == EPERM) {
            r = 0;
        }
    }
    int st = 0;
    waitpid(c, &st, 0);
    if (broke) {
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 0;
        r = code == 125 || WIFSIGNALED(st) ? 1 : code == 126 ? 2 : 3;
        int w = open(loader, O_WRONLY);
        if (w < 0 || pwrite(w, "\x7f" "ELF", 4, 0) != 4) r = -2;
        if (w >= 0) close(w);
    }
    return r;
}

int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "";
    const char *path = argc > 2 ? argv[2] : "/tmp/code.bin";
    if (!strcmp(m, "interp-swap")) {
        /* PATH: a copy of /bin/hello whose PT_INTERP names PATH's
           directory's ld.so, a copy of its loader nothing else maps. Then
           argv[3] (10) tries of a writer opening that loader between
           imacri's answer to the execution's interpreter event and the
           kernel's own writers check of it (race_loader). Prints
           "INTERP tries loaded refused busy after": `loaded` counts the
           executions whose kernel loaded the loader as the writer left
           it, after imacri had answered for what it measured. */
        int tries = argc > 3 ? atoi(argv[3]) : 10;
        static const char orig[] = "/lib64/ld-linux-x86-64.so.2";
        char loader[256];
        snprintf(loader, sizeof loader, "%.*s/ld.so",
                 (int)(strrchr(path, '/') - path), path);
        if (strlen(loader) >= sizeof orig) { errno = ENAMETOOLONG; return fail(m); }
        static char buf[4 << 20];
        struct { const char *from, *to; int patch; } copies[] = {
            {orig, loader, 0}, {"/bin/hello", path, 1}};
        for (int k = 0; k < 2; k++) {
            int in = open(copies[k].from, O_RDONLY);
            ssize_t len = in < 0 ? -1 : read(in, buf, sizeof buf);
            if (in >= 0) close(in);
            if (len <= 0) return fail(m);
            if (copies[k].patch) {
                char *at = memmem(buf, len, orig, sizeof orig);
                if (!at) { errno = ENOEXEC; return fail(m); }
                memset(at, 0, sizeof orig);
                memcpy(at, loader, strlen(loader));
            }
            int w = open(copies[k].to, O_WRONLY|O_CREAT|O_TRUNC, 0755);
            if (w < 0 || write(w, buf, len) != len || close(w)) return fail(m);
        }
        pid_t spin = busy_cpu0();
        int loaded = 0, refused = 0, busy = 0, after = 0;
        for (int i = 0; i < tries; i++) {
            int r = race_loader(path, loader);
            if (r == -2) { kill(spin, SIGKILL); errno = EIO; return fail(m); }
            loaded += r == 1;
            refused += r == 0;
            busy += r == 2;
            after += r == 3;
        }
        kill(spin, SIGKILL);
        printf("INTERP %d %d %d %d %d\n", tries, loaded, refused, busy, after);
        return 0;
    }
    if (!strcmp(m, "mark")) {
        printf("%s\n", marker);
        return 0;
    }
    if (!strcmp(m, "exec-swap")) {
        /* PATH: a copy of this program, executed (measured, then cached);
           then up to argv[3] (20) tries of an execution of it rewritten
           between imacri's answer and the kernel's writers check
           (run_mark). Prints SWAPPED when a child ran the rewritten copy,
           else HELD and how many rewrites went through. */
        int tries = argc > 3 ? atoi(argv[3]) : 20;
        static char buf[4 << 20];
        int self = open("/proc/self/exe", O_RDONLY);
        ssize_t len = self < 0 ? -1 : read(self, buf, sizeof buf);
        char *at = len > 0 ? memmem(buf, len, marker, 9) : 0;
        if (!at) return fail(m);
        long off = at - buf;
        pid_t spin = busy_cpu0();
        int writes = 0, wrote;
        for (int i = 0; i < tries; i++) {
            int w = open(path, O_WRONLY|O_CREAT|O_TRUNC, 0755);
            if (w < 0 || write(w, buf, len) != len) { kill(spin, SIGKILL); return fail(m); }
            close(w);
            run_mark(path, 0, off, &wrote);
            if (run_mark(path, 1, off, &wrote) == 1) {
                printf("SWAPPED %s after %d\n", m, i + 1);
                kill(spin, SIGKILL);
                return 0;
            }
            writes += wrote;
        }
        printf("HELD %s %d %d\n", m, tries, writes);
        kill(spin, SIGKILL);
        return 0;
    }
    if (!strcmp(m, "memfd-mmap")) {
        int fd = memfd(); if (fd < 0) return fail(m);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_SHARED, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "memfd-sealed")) {
        /* Sealed against writes (F_SEAL_WRITE): what is mapped stays. */
        int fd = memfd_create("sealed", MFD_ALLOW_SEALING);
        if (fd < 0 || write(fd, code, sizeof code) != sizeof code || ftruncate(fd, 4096)
            || fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW)) return fail(m);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_SHARED, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "memfd-future")) {
        /* Sealed against future writes only (F_SEAL_FUTURE_WRITE), which
           the kernel lets a shared writable mapping made before outlive:
           `mov eax, 7; ret` is mapped executable, then 42 written. */
        static const unsigned char seven[] = {0xb8, 7, 0, 0, 0, 0xc3};
        int fd = memfd_create("future", MFD_ALLOW_SEALING);
        if (fd < 0 || write(fd, seven, sizeof seven) != sizeof seven || ftruncate(fd, 4096)) return fail(m);
        unsigned char *w = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0);
        if (w == MAP_FAILED || fcntl(fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE|F_SEAL_SHRINK|F_SEAL_GROW)) return fail(m);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        memcpy(w, code, sizeof code);
        return ran(m, p);
    }
    if (!strcmp(m, "memfd-mprotect")) {
        int fd = memfd(); if (fd < 0) return fail(m);
        void *p = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED || mprotect(p, 4096, PROT_READ|PROT_EXEC)) return fail(m);
        return ran(m, p);
    }
    if (!strcmp(m, "secret-mmap") || !strcmp(m, "secret-mprotect")) {
        /* Secret memory (memfd_secret): a file no other process, and not
           the kernel's own readers, can read, so nothing could hash it.
           The kernel mounts it noexec: refused everywhere, pod or not. */
        int fd = syscall(SYS_memfd_secret, 0);
        if (fd < 0 || ftruncate(fd, 4096)) return fail(m);
        unsigned char *w = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0);
        if (w == MAP_FAILED) return fail(m);
        memcpy(w, code, sizeof code);
        if (!strcmp(m, "secret-mprotect"))
            return mprotect(w, 4096, PROT_READ|PROT_EXEC) ? fail(m) : ran(m, w);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_SHARED, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "worker-mprotect")) {
        /* A file's mapping made executable by a worker thread. */
        int w = open("/tmp/wprot.bin", O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        close(w);
        int fd = open("/tmp/wprot.bin", O_RDONLY);
        void *p = fd < 0 ? MAP_FAILED : mmap(0, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
        pthread_t t;
        void *r = (void *)1;
        if (p == MAP_FAILED || pthread_create(&t, 0, protector, p)) return fail(m);
        pthread_join(t, &r);
        if (r) { errno = (int)(long)r; return fail(m); }
        return ran(m, p);
    }
    if (!strcmp(m, "shm-mprotect") || !strcmp(m, "shmat-exec")) {
        int id = shmget(IPC_PRIVATE, 4096, 0700|IPC_CREAT);
        if (id < 0) return fail(m);
        char *s = shmat(id, 0, 0);
        if (s == (void *)-1) return fail(m);
        memcpy(s, code, sizeof code);
        int r;
        if (!strcmp(m, "shm-mprotect")) {
            r = mprotect(s, 4096, PROT_READ|PROT_EXEC) ? fail(m) : ran(m, s);
        } else {
            void *x = shmat(id, 0, SHM_EXEC|SHM_RDONLY);
            r = x == (void *)-1 ? fail(m) : ran(m, x);
        }
        shmctl(id, IPC_RMID, 0);
        return r;
    }
    if (!strcmp(m, "file-mmap") || !strcmp(m, "writers-mmap") || !strcmp(m, "mmap-unlink")) {
        /* mmap-unlink: the file is deleted once mapped, before its code
           runs (a library unpacked, loaded and removed). */
        int w = open(path, O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        if (strcmp(m, "writers-mmap")) close(w);
        int fd = open(path, O_RDONLY);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        if (p != MAP_FAILED && !strcmp(m, "mmap-unlink") && unlink(path)) return fail(m);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "map-later")) {
        /* Opens PATH as it is, maps it executable argv[3] milliseconds
           later (a mapping call with an fd opened before), and keeps it
           mapped for argv[4] seconds (30). */
        int fd = open(path, O_RDONLY);
        if (fd < 0) return fail(m);
        usleep((argc > 3 ? atoi(argv[3]) : 0) * 1000);
        if (mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) return fail(m);
        printf("MAPPED %s\n", m);
        fflush(stdout);
        sleep(argc > 4 ? atoi(argv[4]) : 30);
        return 0;
    }
    if (!strcmp(m, "map-hold")) {
        /* Makes PATH with the code, maps it executable and keeps it mapped
           for argv[3] seconds (30). */
        if (map_code(path, 1) == MAP_FAILED) return fail(m);
        printf("MAPPED %s\n", m);
        fflush(stdout);
        sleep(argc > 3 ? atoi(argv[3]) : 30);
        return 0;
    }
    if (!strcmp(m, "trace-mmap")) {
        /* A seccomp profile's SCMP_ACT_TRACE hands a call to the task's
           tracer, which lets it run by resuming it: the parent traces the
           child, whose executable mapping of a new file it lets through. */
        pid_t k = fork();
        if (k < 0) return fail(m);
        if (!k) {
            if (ptrace(PTRACE_TRACEME, 0, 0, 0)) _exit(fail(m));
            raise(SIGSTOP);
            int w = open("/tmp/traced.bin", O_WRONLY|O_CREAT|O_TRUNC, 0644);
            if (w < 0 || write(w, code, sizeof code) != sizeof code || close(w)) _exit(fail(m));
            int fd = open("/tmp/traced.bin", O_RDONLY);
            void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
            int r = p == MAP_FAILED ? fail(m) : ran(m, p);
            fflush(stdout);
            _exit(r);
        }
        int st;
        if (waitpid(k, &st, 0) != k || !WIFSTOPPED(st)) return fail(m);
        ptrace(PTRACE_SETOPTIONS, k, 0, PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL);
        ptrace(PTRACE_CONT, k, 0, 0);
        for (;;) {
            if (waitpid(k, &st, 0) != k) return fail(m);
            if (WIFEXITED(st)) { fflush(stdout); return WEXITSTATUS(st); }
            if (WIFSIGNALED(st)) { printf("%s: signal %d\n", m, WTERMSIG(st)); return 1; }
            int sig = WSTOPSIG(st);
            /* A seccomp stop (SIGTRAP | PTRACE_EVENT_SECCOMP << 8): resume. */
            ptrace(PTRACE_CONT, k, 0, sig == SIGTRAP ? 0 : sig);
        }
    }
    if (!strcmp(m, "write-sleeper")) return write_sleeper(path) ? fail(m) : 0;
    if (!strcmp(m, "shared-exec") || !strcmp(m, "shared-cache")) {
        /* A program on the container's rootfs (overlayfs) is mapped shared
           and writable and its fd closed. shared-exec runs it and, while
           it sleeps, writes its exit code through the mapping: a process
           running code that was never measured exits 42 ("RAN"). The
           kernel refuses to execute a file open for writing, but an
           overlayfs mapping holds the upper layer's file, not the one
           executed. shared-cache runs it once as written (measured), then
           changes it through the mapping (no event, no new mtime), unmaps
           it and runs it again: a digest remembered from the first run
           would let the new content run as the old. With argv[3], PATH is
           a sleeper already (one the policy allows). */
        if (argc <= 3 && write_sleeper(path)) return fail(m);
        size_t len;
        unsigned char *w = map_shared_writable(path, &len);
        if (!w) return fail(m);
        usleep(100000);
        int live = !strcmp(m, "shared-exec");
        int r = run_child(path, 100, live ? w + SLEEPER_CODE : 0, 42);
        if (!live && r == 0) {
            w[SLEEPER_CODE] = 42;
            munmap(w, len);
            usleep(100000);
            r = run_child(path, 0, 0, 0);
        }
        if (r < 0) { errno = -r; return fail(m); }
        if (r == 42) { printf("RAN %s\n", m); return 0; }
        printf("%s: exited %d\n", m, r);
        return 1;
    }
    if (!strcmp(m, "shared-rw")) {
        /* What a database does with its files (SQLite's -shm, LMDB): PATH
           mapped shared and writable, written through the mapping, read
           back with pread: prints "SHARED ok". With argv[3], from a
           process with a second thread (its fd table shared). */
        pthread_t t;
        if (argc > 3 && pthread_create(&t, 0, parked, 0)) return fail(m);
        int fd = open(path, O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (fd < 0 || ftruncate(fd, 4096)) return fail(m);
        char *w = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0);
        if (w == MAP_FAILED) return fail(m);
        memcpy(w, "written", 8);
        char back[8] = {0};
        if (msync(w, 4096, MS_SYNC) || pread(fd, back, 8, 0) != 8) return fail(m);
        if (strcmp(back, "written")) { printf("%s: read back %.8s\n", m, back); return 1; }
        printf("SHARED ok\n");
        return 0;
    }
    if (!strcmp(m, "shared-flood")) {
        /* argv[3] new files in directory PATH, each mapped shared and
           writable and unmapped: "MAPPED <n> REFUSED <n>". */
        int n = argc > 3 ? atoi(argv[3]) : 0, ok = 0, refused = 0;
        for (int i = 0; i < n; i++) {
            char f[256];
            snprintf(f, sizeof f, "%s/f%d", path, i);
            int fd = open(f, O_RDWR|O_CREAT|O_TRUNC, 0644);
            if (fd < 0 || ftruncate(fd, 4096)) return fail(m);
            void *w = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0);
            close(fd);
            if (w == MAP_FAILED) { if (errno != EPERM) return fail(m); refused++; continue; }
            munmap(w, 4096);
            ok++;
        }
        printf("MAPPED %d REFUSED %d\n", ok, refused);
        return 0;
    }
    if (!strcmp(m, "close-flood")) {
        /* argv[3] empty files made in directory PATH, then "PATH/ready";
           once "PATH/go" appears (made from outside), two processes open
           them for writing and close them in turn for argv[4] seconds
           (each close a FAN_CLOSE_WRITE wherever the filesystem is marked
           for it), then "PATH/done". */
        int n = argc > 3 ? atoi(argv[3]) : 0, secs = argc > 4 ? atoi(argv[4]) : 1;
        char f[4096];
        mkdir(path, 0755);
        for (int i = 0; i < n; i++) {
            snprintf(f, sizeof f, "%s/%d", path, i);
            int fd = open(f, O_WRONLY|O_CREAT, 0644);
            if (fd < 0) return fail(m);
            close(fd);
        }
        snprintf(f, sizeof f, "%s/ready", path);
        close(open(f, O_WRONLY|O_CREAT, 0644));
        snprintf(f, sizeof f, "%s/go", path);
        for (int waited = 0; access(f, F_OK) != 0; waited++) {
            if (waited > 6000) { errno = ETIMEDOUT; return fail(m); }
            usleep(10000);
        }
        for (int w = 0; w < 2; w++) {
            if (fork() == 0) {
                time_t end = time(NULL) + secs;
                for (long i = w; time(NULL) < end; i += 2) {
                    snprintf(f, sizeof f, "%s/%ld", path, i % n);
                    close(open(f, O_WRONLY));
                }
                _exit(0);
            }
        }
        while (wait(NULL) > 0) {}
        snprintf(f, sizeof f, "%s/done", path);
        close(open(f, O_WRONLY|O_CREAT, 0644));
        return 0;
    }
    if (!strcmp(m, "map-flood")) {
        /* argv[3] times: PATH made anew (a new inode, the same bytes and
           path: one log entry), mapped executable and the mapping kept
           until the end: "MAPPED <n> REFUSED <n>" (refused: EPERM). */
        int n = argc > 3 ? atoi(argv[3]) : 0, ok = 0, refused = 0;
        for (int i = 0; i < n; i++) {
            unlink(path);
            void *p = map_code(path, 1);
            if (p == MAP_FAILED) { if (errno != EPERM) return fail(m); refused++; continue; }
            ok++;
        }
        printf("MAPPED %d REFUSED %d\n", ok, refused);
        return 0;
    }
    if (!strcmp(m, "shared-keep")) {
        /* PATH (a sleeper) mapped shared and writable, its fd closed, and
           the mapping kept for a minute: "READY" once it is. */
        if (write_sleeper(path)) return fail(m);
        size_t len;
        if (!map_shared_writable(path, &len)) return fail(m);
        printf("READY\n");
        fflush(stdout);
        sleep(60);
        return 0;
    }
    if (!strcmp(m, "shared-mmap")) {
        /* The same for an executable mapping: PATH (the code) mapped shared
           and writable, then mapped executable (measured as written), then
           changed through the first mapping: prints "RAN shared-mmap 43".
           With argv[3], PATH is a file the policy allows (a library): its
           second byte is changed and read back through the executable
           mapping ("RAN shared-mmap changed"); nothing is called. */
        int keep = argc > 3;
        if (!keep) {
            int w0 = open(path, O_RDWR|O_CREAT|O_TRUNC, 0644);
            if (w0 < 0 || write(w0, code, sizeof code) != sizeof code) return fail(m);
            close(w0);
        }
        size_t len;
        unsigned char *w = map_shared_writable(path, &len);
        if (!w) return fail(m);
        usleep(100000);
        int fd = open(path, O_RDONLY);
        void *p = fd < 0 ? MAP_FAILED : mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        if (keep) {
            unsigned char old = w[1];
            w[1] = old ^ 0xff;
            if (((volatile unsigned char *)p)[1] != old) { printf("RAN %s changed\n", m); return 0; }
            printf("%s: unchanged\n", m);
            return 1;
        }
        w[1] = 0x2b;
        int r = ((int (*)(void))p)();
        if (r == 43) { printf("RAN %s 43\n", m); return 0; }
        printf("%s: returned %d\n", m, r);
        return 1;
    }
    if (!strcmp(m, "tomtou")) {
        /* Maps PATH executable, then rewrites its first bytes in place
           through another fd: a mapping that outlives the write runs what
           was written ("mov eax, 43": prints RAN tomtou 43). Without
           argv[3] PATH is made first with the code; with it (a real
           library) the same bytes are written back and nothing is called. */
        int keep = argc > 3;
        void *p = map_code(path, !keep);
        if (p == MAP_FAILED) return fail(m);
        unsigned char c43[] = {0xb8, 0x2b, 0, 0, 0, 0xc3}, same[16];
        memcpy(same, p, sizeof same);
        int w = open(path, O_WRONLY);
        if (w < 0) return fail(m);
        ssize_t n = keep ? pwrite(w, same, sizeof same, 0) : pwrite(w, c43, sizeof c43, 0);
        if (n < 0) return fail(m);
        close(w);
        sleep(1);
        if (keep) { printf("WROTE %s\n", m); return 0; }
        printf("RAN %s %d\n", m, ((int (*)(void))p)());
        return 0;
    }
    if (!strcmp(m, "loader-rewrite")) {
        /* The kernel maps a program's ELF interpreter itself (no mmap
           call, so no map guard) and then lets it be written (unlike the
           program, which is ETXTBSY while it runs). Runs PATH (dynamic,
           lazily bound: it sleeps, then calls puts) in a child and, while
           it sleeps, writes a run of NOPs ending in exit(42) over the
           executable segment of its loader argv[3] (copied up first, so
           that the child maps the file written): resolving puts then runs
           what was written ("RAN loader-rewrite 42"). */
        if (argc < 4) { errno = EINVAL; return fail(m); }
        const char *ld = argv[3];
        /* With a 5th argument `hide`, the child first executes PATH with
           its loader renamed away: the kernel opens (and has allowed) the
           program, then fails on its interpreter (ENOENT); the loader put
           back, the same task executes PATH again. */
        int hide = argc > 4 && !strcmp(argv[4], "hide");
        int w = open(ld, O_RDWR);
        if (w < 0) return fail(m);
        close(w);
        char away[4096];
        snprintf(away, sizeof away, "%s.away", ld);
        pid_t c = fork();
        if (c == 0) {
            if (hide) {
                if (rename(ld, away)) _exit(124);
                int failed = execl(path, path, (char *)0) != 0 && errno == ENOENT;
                if (rename(away, ld) || !failed) _exit(125);
            }
            execl(path, path, (char *)0);
            _exit(126);
        }
        usleep(500000);
        w = open(ld, O_RDWR);
        int patched = 0;
        Elf64_Ehdr eh;
        if (w >= 0 && pread(w, &eh, sizeof eh, 0) == sizeof eh) {
            for (int i = 0; i < eh.e_phnum; i++) {
                Elf64_Phdr ph;
                if (pread(w, &ph, sizeof ph, eh.e_phoff + i * sizeof ph) != sizeof ph) break;
                if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_X)) continue;
                unsigned char ex[] = {0xbf, 42, 0, 0, 0, 0xb8, 231, 0, 0, 0, 0x0f, 0x05};
                unsigned char *b = malloc(ph.p_filesz);
                if (!b || ph.p_filesz < sizeof ex) break;
                memset(b, 0x90, ph.p_filesz);
                memcpy(b + ph.p_filesz - sizeof ex, ex, sizeof ex);
                patched = pwrite(w, b, ph.p_filesz, ph.p_offset) == (ssize_t)ph.p_filesz;
                free(b);
                break;
            }
        }
        int e = errno;
        if (!patched) kill(c, SIGKILL);
        int st = 0;
        waitpid(c, &st, 0);
        errno = e;
        if (!patched) return fail(m);
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (code == 42) { printf("RAN %s 42\n", m); return 0; }
        printf("%s: WROTE, the program exited %d\n", m, code);
        return 1;
    }
    if (!strcmp(m, "wrlease-mmap") || !strcmp(m, "wrlease-exec")) {
        /* Holds a write lease on PATH and never gives it up (its break
           signal ignored): any other open of PATH waits for it, up to
           fs.lease-break-time. Then maps PATH executable (made with the
           code) or runs `PATH true` in a child, and prints how long that
           took: "RAN wrlease-mmap 42 IN <ms>" / "EXEC <status> IN <ms>". */
        signal(SIGIO, SIG_IGN);
        int mmapping = !strcmp(m, "wrlease-mmap");
        if (mmapping) {
            int w = open(path, O_RDWR|O_CREAT|O_TRUNC, 0755);
            if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
            close(w);
        }
        int fd = open(path, O_RDONLY);
        /* EAGAIN while anyone else has it open: the reader holds the fd of
           the close-after-write event of the copy for a moment. */
        for (int i = 0; fd >= 0 && fcntl(fd, F_SETLEASE, F_WRLCK); i++) {
            if (errno != EAGAIN || i == 200) return fail(m);
            usleep(10000);
        }
        if (fd < 0) return fail(m);
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        int r = 0;
        if (mmapping) {
            void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
            if (p == MAP_FAILED) return fail(m);
            r = ((int (*)(void))p)();
        } else {
            pid_t c = fork();
            if (c == 0) { execl(path, path, "true", (char *)0); _exit(126); }
            waitpid(c, &r, 0);
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        long ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
        if (mmapping) printf("RAN %s %d IN %ld\n", m, r, ms);
        else printf("EXEC %d IN %ld\n", r, ms);
        return 0;
    }
    if (!strcmp(m, "cut")) {
        /* Cuts PATH with truncate(2), mapping nothing. */
        if (truncate(path, 0)) return fail(m);
        printf("CUT %s\n", m);
        return 0;
    }
    if (!strcmp(m, "truncate")) {
        /* Maps PATH executable, then cuts it with truncate(2) (no open,
           so no fanotify event) and grows it back: the mapped page now
           reads as zeros (prints CUT truncate 0). argv[3]: seconds to
           wait between the two. */
        int fd = open(path, O_RDONLY);
        struct stat st;
        void *p = fd < 0 || fstat(fd, &st) ? MAP_FAILED
            : mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        printf("MAPPED %s\n", m);
        fflush(stdout);
        if (argc > 3) sleep(atoi(argv[3]));
        if (truncate(path, 0) || truncate(path, st.st_size)) return fail(m);
        printf("CUT %s %d\n", m, ((unsigned char *)p)[0]);
        return 0;
    }
    if (!strcmp(m, "worker-mmap")) {
        /* With argv[2]: map that file executable (an honest library load).
           Without: write the code to /tmp/worker.bin, map and run it. */
        if (argc > 2) return in_worker(m, open(path, O_RDONLY), 0);
        int w = open("/tmp/worker.bin", O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        close(w);
        return in_worker(m, open("/tmp/worker.bin", O_RDONLY), 1);
    }
    if (!strcmp(m, "fd-pass-mmap")) {
        const char *p2 = argc > 2 ? argv[2] : "/tmp/passed.bin";
        int w = open(p2, O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        close(w);
        int fd = passed_fd(p2); if (fd < 0) return fail(m);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "threaded-mmap")) {
        /* A multi-threaded program mapping argv[2] executable, honestly. */
        int fd = open(path, O_RDONLY);
        pthread_t t;
        if (fd < 0 || pthread_create(&t, 0, parked, 0)) return fail(m);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        printf("MAPPED %s\n", m);
        fflush(stdout);
        return 0;
    }
    if (!strcmp(m, "swap-leader") && !leader_left) {
        pthread_t t;
        leader_left = 1; again_argc = argc; again_argv = argv;
        if (pthread_create(&t, 0, without_leader, 0)) return fail(m);
        pthread_exit(0);
    }
    int leaderless = !strcmp(m, "swap-leader");
    if (!strcmp(m, "swap-mmap") || !strcmp(m, "swap-mprotect") || !strcmp(m, "swap-worker") || leaderless) {
        /* swap-mmap: argv[2] is a file the policy allows, mapped through an
           fd that names the code by the time the kernel reads it again.
           swap-worker: the same, the mapping made by a thread that exits
           right after it. swap-leader: swap-mmap in a process whose main
           thread is gone. swap-mprotect: anonymous memory made executable,
           with the code's file mapped under it by then. */
        int worker_made = !strcmp(m, "swap-worker");
        const char *out = !strcmp(m, "swap-mmap")   ? "/tmp/swapped-mmap.bin"
                          : worker_made             ? "/tmp/swapped-worker.bin"
                          : leaderless              ? "/tmp/swapped-leader.bin"
                                                    : "/tmp/swapped-mprotect.bin";
        int w = open(out, O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        close(w);
        swap_in = open(out, O_RDONLY);
        if (swap_in < 0) return fail(m);
        pthread_t t;
        void *p;
        if (!strcmp(m, "swap-mmap") || worker_made || leaderless) {
            swap_fd = open(path, O_RDONLY);
            if (swap_fd < 0 || pthread_create(&t, 0, swapper, 0)) return fail(m);
            if (worker_made) {
                static struct work w;
                pthread_t mapper;
                w.m = m; w.fd = swap_fd; w.run = 0;
                if (pthread_create(&mapper, 0, mapped_at, &w)) return fail(m);
                pthread_join(mapper, 0);
                p = w.at;
            } else {
                p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, swap_fd, 0);
            }
        } else {
            swap_at = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
            if (swap_at == MAP_FAILED || pthread_create(&t, 0, remapper, 0)) return fail(m);
            p = mprotect(swap_at, 4096, PROT_READ|PROT_EXEC) ? MAP_FAILED : swap_at;
        }
        pthread_join(t, 0);
        if (p == MAP_FAILED) return fail(m);
        if (memcmp(p, code, sizeof code)) { printf("%s: not swapped in time\n", m); return 1; }
        int r = ran(m, p);
        fflush(stdout);
        return r;
    }
    if (!strcmp(m, "fd-pass-exec")) {
        /* argv[2]: an executable; run through the passed fd (fexecve). */
        int fd = passed_fd(path); if (fd < 0) return fail(m);
        char *av[] = {"true", NULL}, *ev[] = {NULL};
        fexecve(fd, av, ev);
        return fail(m);
    }
    if (!strcmp(m, "serve-fds")) return serve_fds(path, argv[3]);
    if (!strncmp(m, "recv-", 5)) {
        /* argv[2]: the socket of a serve-fds outside the pod, whose file
           is a busybox run as `echo` by the fd (fexecve), through
           /proc/self/fd, relative to the directory's fd, from it as the
           working directory, or with it as the root. */
        int fds[2];
        if (received_fds(path, fds)) return fail(m);
        char said[64], link[64];
        snprintf(said, sizeof said, "RAN %s", m);
        char *av[] = {"echo", said, NULL}, *ev[] = {NULL};
        if (!strcmp(m, "recv-fexecve")) fexecve(fds[0], av, ev);
        if (!strcmp(m, "recv-proc")) {
            snprintf(link, sizeof link, "/proc/self/fd/%d", fds[0]);
            execve(link, av, ev);
        }
        if (!strcmp(m, "recv-dirfd")) syscall(SYS_execveat, fds[1], "evil", av, ev, 0);
        if (!strcmp(m, "recv-cwd") && !fchdir(fds[1])) execve("./evil", av, ev);
        if (!strcmp(m, "recv-chroot") && !fchdir(fds[1]) && !chroot(".")) execve("/evil", av, ev);
        return fail(m);
    }
    if (!strcmp(m, "ptrace")) {
        /* argv[2]: a pid to attach to (and write a word of its code). */
        pid_t p = atoi(path);
        if (ptrace(PTRACE_ATTACH, p, 0, 0)) return fail(m);
        waitpid(p, 0, 0);
        ptrace(PTRACE_DETACH, p, 0, 0);
        printf("RAN %s\n", m);
        return 0;
    }
    if (!strcmp(m, "personality")) {
        if (personality(READ_IMPLIES_EXEC) < 0) return fail(m);
        if (!(personality(0xffffffff) & READ_IMPLIES_EXEC)) { printf("%s: not set\n", m); return 1; }
        int fd = memfd(); if (fd < 0) return fail(m);
        void *p = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "ia32-rie")) {
        /* A file mapped PROT_READ by a 32-bit program runs: prints RAN
           when the 32-bit program exits with the mapped code's 42. */
        int c = open("/tmp/ia32.bin", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0644);
        if (c < 0 || write(c, code, sizeof code) != (ssize_t)sizeof code || close(c)) return fail(m);
        if (write_ia32_rie("/tmp/ia32-rie")) return fail(m);
        int pr[2];
        if (pipe2(pr, O_CLOEXEC)) return fail(m);
        pid_t k = fork();
        if (k < 0) return fail(m);
        if (!k) {
            int in = open("/tmp/ia32.bin", O_RDONLY);
            if (in < 0 || dup2(in, 3) != 3) _exit(98);
            char *av[] = {"ia32-rie", 0}, *ev[] = {0};
            execve("/tmp/ia32-rie", av, ev);
            int err = errno;
            if (write(pr[1], &err, sizeof err) < 0) _exit(97);
            _exit(99);
        }
        close(pr[1]);
        int err = 0, st = 0;
        ssize_t got = read(pr[0], &err, sizeof err);
        waitpid(k, &st, 0);
        if (got == (ssize_t)sizeof err) { errno = err; printf("%s: execve: %s\n", m, strerror(err)); return 1; }
        if (WIFEXITED(st) && WEXITSTATUS(st) == 42) { printf("RAN %s\n", m); return 0; }
        printf("%s: status %d\n", m, st);
        return 1;
    }
    if (!strcmp(m, "compat-mprotect")) {
        /* The same mprotect as a 32-bit call (int 0x80) from this 64-bit
           process: seccomp sees another architecture and other numbers. */
        int w = open("/tmp/compat.bin", O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        close(w);
        int fd = open("/tmp/compat.bin", O_RDONLY);
        /* Below 4 GiB: a 32-bit call takes 32-bit addresses. */
        void *p = mmap((void *)0x10000000, 4096, PROT_READ, MAP_PRIVATE|MAP_FIXED_NOREPLACE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        long r;
        __asm__ volatile("int $0x80" : "=a"(r)
                         : "a"(125L), "b"((long)p), "c"(4096L), "d"((long)(PROT_READ|PROT_EXEC))
                         : "r8", "r9", "r10", "r11", "memory");
        if (r < 0) { errno = (int)-r; return fail(m); }
        return ran(m, p);
    }
    if (!strcmp(m, "own-listener")) {
        /* A seccomp filter of the process's own whose listener (a thread of
           its own) answers CONTINUE to its executable mappings: the newest
           filter's answer is the one the kernel takes. */
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD|BPF_W|BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP|BPF_JEQ|BPF_K, __NR_mmap, 0, 3),
            BPF_STMT(BPF_LD|BPF_W|BPF_ABS, offsetof(struct seccomp_data, args[2])),
            BPF_JUMP(BPF_JMP|BPF_JSET|BPF_K, PROT_EXEC, 0, 1),
            BPF_STMT(BPF_RET|BPF_K, SECCOMP_RET_USER_NOTIF),
            BPF_STMT(BPF_RET|BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {sizeof f / sizeof f[0], f};
        int w = open("/tmp/listener.bin", O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        close(w);
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return fail(m);
        own_listener = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
        if (own_listener < 0) return fail(m);
        pthread_t t;
        if (pthread_create(&t, 0, continuer, 0)) return fail(m);
        int fd = open("/tmp/listener.bin", O_RDONLY);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "uring-mmap")) {
        /* A library mapped while an io_uring worker of the process (a
           thread of the kernel's, sharing its fd table) waits on a read,
           as in a program whose runtime does file I/O through io_uring. */
        int pp[2];
        if (pipe(pp) || uring_read(pp[0]) < 0) return fail(m);
        usleep(100000);
        int fd = open(path, O_RDONLY);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        printf("MAPPED %s\n", m);
        return 0;
    }
    if (!strcmp(m, "uring-swap")) {
        /* io_uring puts another file under the fd while the map guard
           checks the call (see uring_swap_later). PATH: ms to wait before
           the mmap (0: at once, so the swap falls inside the check). */
        int fd = uring_swap_later();
        if (fd < 0) return fail(m);
        usleep(atoi(path) * 1000);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "uring-vm-swap")) {
        /* uring-swap with a second process that shares the address space
           and nothing else: it jumps into the mapping the moment the call
           made it, unless it is held still until the mapping was checked
           (and killed with the caller if it was swapped). PATH: ms to wait
           before the mmap. */
        static unsigned char ret0[] = {0xb8, 0, 0, 0, 0, 0xc3};
        vm_at = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
        if (vm_at == MAP_FAILED) return fail(m);
        memcpy(vm_at, ret0, sizeof ret0);
        if (mprotect(vm_at, 4096, PROT_READ|PROT_EXEC)) return fail(m);
        int fd = uring_swap_later();
        if (fd < 0) return fail(m);
        int sharer = clone(vm_sharer, vm_stack + sizeof vm_stack, CLONE_VM|SIGCHLD, 0);
        if (sharer < 0) return fail(m);
        usleep(atoi(path) * 1000);
        void *p = mmap(vm_at, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_FIXED, fd, 0);
        if (p == MAP_FAILED) { kill(sharer, SIGKILL); return fail(m); }
        int st;
        if (waitpid(sharer, &st, 0) < 0) return fail(m);
        printf("uring-vm-swap: the sharer %s %d\n", WIFEXITED(st) ? "exited" : "was killed by",
               WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
        return 1;
    }
    if (!strcmp(m, "exec-times") || !strcmp(m, "exec-new-times")) {
        /* PATH executions, one after the other: prints the median, the
           99th percentile and the longest, in microseconds. exec-times runs
           /bin/true (measured once: then a cached answer each); exec-new-times
           a new file each time (a tiny program written outside the timing:
           each execution is hashed). */
        int n = atoi(path), fresh = !strcmp(m, "exec-new-times");
        long *v = calloc(n, sizeof *v);
        if (!v) return fail(m);
        for (int i = 0; i < n; i++) {
            char prog[64];
            snprintf(prog, sizeof prog, "/tmp/exec-new-%d", i);
            if (fresh && write_exit0(prog) != 0) return fail(m);
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            pid_t c = fork();
            if (c == 0) { execl(fresh ? prog : "/bin/true", "true", (char *)0); _exit(127); }
            int st;
            if (c < 0 || waitpid(c, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) return fail(m);
            clock_gettime(CLOCK_MONOTONIC, &b);
            if (fresh) unlink(prog);
            v[i] = (b.tv_sec - a.tv_sec) * 1000000 + (b.tv_nsec - a.tv_nsec) / 1000;
        }
        for (int i = 1; i < n; i++)
            for (int j = i; j > 0 && v[j - 1] > v[j]; j--) { long t = v[j]; v[j] = v[j - 1]; v[j - 1] = t; }
        printf("EXEC-TIMES p50 %ld p99 %ld max %ld\n", v[n / 2], v[n * 99 / 100], v[n - 1]);
        return 0;
    }
    if (!strcmp(m, "held-flood")) {
        /* PATH threads, each looping guarded calls that are held: as many
           calls wait at once as there are threads. */
        int n = atoi(path);
        for (int i = 0; i < n; i++) {
            pthread_t t;
            if (pthread_create(&t, 0, wx_flipper, 0)) return fail(m);
        }
        printf("FLOODING %d\n", n);
        fflush(stdout);
        for (;;) pause();
    }
    if (!strcmp(m, "mprotect-flood")) {
        /* Every other call adds PROT_EXEC to anonymous memory: a guarded
           call each, which costs imacri far more than the caller. PATH
           "threaded": with a second thread, so that each call is held. */
        pthread_t t;
        if (!strcmp(path, "threaded") && pthread_create(&t, 0, parked, 0)) return fail(m);
        char *p = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return fail(m);
        for (unsigned long i = 0;; i++)
            if (mprotect(p, 4096, (i & 1) ? PROT_READ|PROT_WRITE : PROT_READ|PROT_EXEC)) return fail(m);
    }
    if (!strcmp(m, "rewrite-flood")) {
        /* Rewrites a file and opens it to read, in a loop: under a policy
           that measures reads, each open is of new content (hashed, the
           digest cached), each close after writing forgets it. */
        for (unsigned long i = 0;; i++) {
            int fd = open(path, O_WRONLY|O_CREAT|O_TRUNC, 0644);
            if (fd < 0 || write(fd, &i, sizeof i) != sizeof i) return fail(m);
            close(fd);
            fd = open(path, O_RDONLY);
            if (fd < 0) return fail(m);
            close(fd);
        }
    }
    if (!strcmp(m, "open-flood")) {
        /* Opens a file in a loop: under a policy that measures reads, an
           access event each. */
        for (;;) {
            int fd = open(path, O_RDONLY);
            if (fd < 0) return fail(m);
            close(fd);
        }
    }
    if (!strcmp(m, "badfd-mmap")) {
        /* PATH times an executable mapping of an fd that is not open: the
           map guard cannot resolve the file and refuses each, a warning
           the pod can cause as fast as it calls. */
        int n = atoi(path), refused = 0;
        for (int i = 0; i < n; i++)
            if (mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, 900, 0) == MAP_FAILED) refused++;
        printf("REFUSED %d\n", refused);
        return 0;
    }
    if (!strcmp(m, "after-deny")) {
        /* An execution that was refused leaves nothing behind that lets the
           same file be mapped executable. */
        char *av[] = {(char *)path, "true", NULL}, *ev[] = {NULL};
        execve(path, av, ev);
        printf("execve: %s\n", strerror(errno));
        int fd = open(path, O_RDONLY);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        printf("RAN %s (mapped)\n", m);
        return 0;
    }
    /* Executable memory no file backs (a policy with anonymous_exec =
       "deny" refuses each): */
    if (!strcmp(m, "anon-exec")) {
        void *p = mmap(0, 4096, PROT_READ|PROT_WRITE|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return fail(m);
        memcpy(p, code, sizeof code);
        return ran(m, p);
    }
    if (!strcmp(m, "anon-mprotect")) {
        void *p = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return fail(m);
        memcpy(p, code, sizeof code);
        if (mprotect(p, 4096, PROT_READ|PROT_EXEC)) return fail(m);
        return ran(m, p);
    }
    if (!strcmp(m, "cow-mprotect") || !strcmp(m, "wx-mmap")) {
        /* A file of zeros mapped privately: its copy written with code
           (execmod), or a file mapped writable and executable at once. */
        int w = open("/tmp/zeros.bin", O_RDWR|O_CREAT|O_TRUNC|O_CLOEXEC, 0644);
        if (w < 0 || ftruncate(w, 4096) || close(w)) return fail(m);
        int fd = open("/tmp/zeros.bin", O_RDONLY|O_CLOEXEC);
        int wx = !strcmp(m, "wx-mmap");
        int prot = PROT_READ|PROT_WRITE|(wx ? PROT_EXEC : 0);
        void *p = mmap(0, 4096, prot, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        memcpy(p, code, sizeof code);
        if (!wx && mprotect(p, 4096, PROT_READ|PROT_EXEC)) return fail(m);
        return ran(m, p);
    }
    if (!strcmp(m, "rw-mprotect")) {
        /* A file of code mapped privately and writable, not written by this
           process, then made executable: another process could have
           written it in between (process_vm_writev). */
        int w = open("/tmp/code.bin", O_RDWR|O_CREAT|O_TRUNC|O_CLOEXEC, 0644);
        if (w < 0 || write(w, code, sizeof code) != (ssize_t)sizeof code || close(w)) return fail(m);
        int fd = open("/tmp/code.bin", O_RDONLY|O_CLOEXEC);
        void *p = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        if (mprotect(p, 4096, PROT_READ|PROT_EXEC)) return fail(m);
        return ran(m, p);
    }
    if (!strcmp(m, "execstack")) {
        /* This program again with PF_X on its PT_GNU_STACK: the kernel maps
           the stack executable, and it runs code from there. */
        int in = open("/proc/self/exe", O_RDONLY|O_CLOEXEC);
        struct stat st;
        if (in < 0 || fstat(in, &st)) return fail(m);
        unsigned char *b = malloc(st.st_size);
        if (!b || read(in, b, st.st_size) != st.st_size) return fail(m);
        Elf64_Ehdr *e = (Elf64_Ehdr *)b;
        for (int i = 0; i < e->e_phnum; i++) {
            Elf64_Phdr *ph = (Elf64_Phdr *)(b + e->e_phoff + i * e->e_phentsize);
            if (ph->p_type == PT_GNU_STACK) ph->p_flags |= PF_X;
        }
        int out = open("/tmp/execstack", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0755);
        if (out < 0 || write(out, b, st.st_size) != st.st_size || close(out)) return fail(m);
        char *av[] = {"escape", "stack-run", 0}, *ev[] = {0};
        execve("/tmp/execstack", av, ev);
        return fail(m);
    }
    if (!strcmp(m, "stack-run")) {
        unsigned char on_stack[64];
        memcpy(on_stack, code, sizeof code);
        return ran("execstack", on_stack);
    }
    if (!strcmp(m, "uffd-exec")) {
        /* A sealed memfd of zeros mapped privately and executable (what is
           measured: zeros), its page then filled with code by
           userfaultfd (user-mode faults only: open to anyone). */
        int fd = memfd_create("zeros", MFD_ALLOW_SEALING);
        if (fd < 0 || ftruncate(fd, 4096)) return fail(m);
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_WRITE|F_SEAL_SEAL)) return fail(m);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return fail(m);
        int u = syscall(SYS_userfaultfd, O_CLOEXEC|UFFD_USER_MODE_ONLY);
        if (u < 0) return fail(m);
        struct uffdio_api api = {.api = UFFD_API};
        if (ioctl(u, UFFDIO_API, &api)) return fail(m);
        struct uffdio_register reg = {.range = {(unsigned long)p, 4096}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(u, UFFDIO_REGISTER, &reg)) return fail(m);
        static unsigned char page[4096] __attribute__((aligned(4096)));
        memcpy(page, code, sizeof code);
        struct uffdio_copy cp = {.dst = (unsigned long)p, .src = (unsigned long)page, .len = 4096};
        if (ioctl(u, UFFDIO_COPY, &cp)) return fail(m);
        return ran(m, p);
    }
    if (!strcmp(m, "poke-exec")) {
        /* A child's own code rewritten by its parent (PTRACE_POKETEXT,
           FOLL_FORCE): the child then runs what was written. */
        pid_t k = fork();
        if (k < 0) return fail(m);
        if (!k) {
            if (ptrace(PTRACE_TRACEME, 0, 0, 0)) _exit(98);
            raise(SIGSTOP);
            _exit(seven_at());
        }
        int st = 0;
        waitpid(k, &st, 0);
        errno = 0;
        long word = ptrace(PTRACE_PEEKTEXT, k, (void *)seven, 0);
        if (errno) { int e = errno; kill(k, SIGKILL); waitpid(k, 0, 0); errno = e; return fail(m); }
        memcpy(&word, code, sizeof code);
        if (ptrace(PTRACE_POKETEXT, k, (void *)seven, (void *)word)) {
            int e = errno; kill(k, SIGKILL); waitpid(k, 0, 0); errno = e; return fail(m);
        }
        ptrace(PTRACE_CONT, k, 0, 0);
        waitpid(k, &st, 0);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 42) { printf("RAN %s\n", m); return 0; }
        printf("%s: status %d\n", m, st);
        return 1;
    }
    if (!strcmp(m, "procmem-exec")) {
        /* This process's own code rewritten through /proc/self/mem (or
           the name given, e.g. /proc/thread-self/mem) with FOLL_FORCE:
           proc_mem.force_override=never or imacri's init (no opening
           beneath procfs for writing) stops it. */
        int fd = open(argc > 2 ? argv[2] : "/proc/self/mem", O_RDWR|O_CLOEXEC);
        if (fd < 0) return fail(m);
        if (pwrite(fd, code, sizeof code, (off_t)(unsigned long)seven) != (ssize_t)sizeof code) return fail(m);
        if (seven_at() != 42) { printf("%s: wrong result\n", m); return 1; }
        printf("RAN %s\n", m);
        return 0;
    }
    printf("unknown mode %s\n", m);
    return 2;
}
