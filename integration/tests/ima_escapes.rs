//! What an attacker inside an ima pod would try to run code its owner
//! cannot see: executable mappings of memory-backed files (memfd, SysV shm),
//! of non-ELF files and through the loader (`ld.so FILE`), files mapped or
//! executed (fexecve) through an fd another process passed over a unix
//! socket (in the pod, or from a helper outside it), ptrace of the
//! entrypoint by an exec, `personality` tricks, 32-bit calls, a seccomp
//! listener of the process's own, other processes' roots (pause's included), /dev/shm, scripts,
//! files written while or after they ran, and floods of new paths. Each
//! works in a plain pod (the control); in an ima pod each is measured
//! (measure mode: its digest is in the log) or refused (enforce mode with
//! the image's golden policy: EPERM and a `deny` entry), with kubelet's
//! default (no seccomp profile) and with RuntimeDefault.

use imacri_integration::client::{exec_sh, run_pod, sh_ok, start_container};
use imacri_integration::images::{build_and_push, busybox, compile_c};
use imacri_integration::runner::{go_while_down, next_out, runner};
use imacri_integration::{attest, container_config, cri, pod_config, Env, Imacri};
use sha2::{Digest, Sha256};
use std::process::Command;

/// `escape MODE [PATH]`: tries one way to run code and prints `RAN MODE`
/// (exit 0) or `MODE: <error>` (exit 1). The code is x86-64
/// `mov eax, 42; ret`.
const ESCAPE_C: &str = r#"
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
/* A static x86-64 program of 129 bytes that exits 0 (`mov eax, 60;
   xor edi, edi; syscall`), written to PATH: a new file to execute. */
static int write_exit0(const char *path) {
    static const unsigned char exit0[] = {0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05};
    unsigned char f[sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr) + sizeof exit0] = {0};
    Elf64_Ehdr *e = (Elf64_Ehdr *)f;
    Elf64_Phdr *p = (Elf64_Phdr *)(f + sizeof *e);
    memcpy(e->e_ident, ELFMAG, SELFMAG);
    e->e_ident[EI_CLASS] = ELFCLASS64; e->e_ident[EI_DATA] = ELFDATA2LSB;
    e->e_ident[EI_VERSION] = EV_CURRENT;
    e->e_type = ET_EXEC; e->e_machine = EM_X86_64; e->e_version = EV_CURRENT;
    e->e_entry = 0x400000 + sizeof *e + sizeof *p; e->e_phoff = sizeof *e;
    e->e_ehsize = sizeof *e; e->e_phentsize = sizeof *p; e->e_phnum = 1;
    p->p_type = PT_LOAD; p->p_flags = PF_R | PF_X; p->p_vaddr = p->p_paddr = 0x400000;
    p->p_filesz = p->p_memsz = sizeof f; p->p_align = 0x1000;
    memcpy(f + sizeof *e + sizeof *p, exit0, sizeof exit0);
    int fd = open(path, O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0755);
    if (fd < 0) return -1;
    int ok = write(fd, f, sizeof f) == (ssize_t)sizeof f;
    return close(fd) == 0 && ok ? 0 : -1;
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
/* swap-leader: main runs again in a thread after the main thread exited
   (the process's /proc/<pid>/maps then reads empty). */
static int again_argc, leader_left;
static char **again_argv;
int main(int argc, char **argv);
static void *without_leader(void *a) { (void)a; exit(main(again_argc, again_argv)); }
/* `path` opened by a child process and handed over a unix socket
   (SCM_RIGHTS): the receiver never opens it by name. */
static int passed_fd(const char *path) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(path, O_RDONLY);
        char c = 'x';
        struct iovec io = {&c, 1};
        char buf[CMSG_SPACE(sizeof fd)];
        struct msghdr msg = {0};
        msg.msg_iov = &io; msg.msg_iovlen = 1;
        msg.msg_control = buf; msg.msg_controllen = sizeof buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof fd);
        memcpy(CMSG_DATA(cm), &fd, sizeof fd);
        _exit(fd < 0 || sendmsg(sv[0], &msg, 0) != 1);
    }
    char c;
    struct iovec io = {&c, 1};
    char buf[CMSG_SPACE(sizeof(int))];
    struct msghdr msg = {0};
    msg.msg_iov = &io; msg.msg_iovlen = 1;
    msg.msg_control = buf; msg.msg_controllen = sizeof buf;
    int fd = -1;
    if (recvmsg(sv[1], &msg, 0) == 1) {
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        if (cm && cm->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    }
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
        char x = 'x';
        struct iovec io = {&x, 1};
        char buf[CMSG_SPACE(sizeof fds)];
        struct msghdr msg = {0};
        msg.msg_iov = &io; msg.msg_iovlen = 1;
        msg.msg_control = buf; msg.msg_controllen = sizeof buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof fds);
        memcpy(CMSG_DATA(cm), fds, sizeof fds);
        sendmsg(c, &msg, 0);
        close(fds[0]); close(fds[1]); close(c);
    }
}
/* Receives a file fd and its directory's fd from `sock` (see serve_fds). */
static int received_fds(const char *sock, int fds[2]) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, sock, sizeof a.sun_path - 1);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) return -1;
    char x;
    struct iovec io = {&x, 1};
    char buf[CMSG_SPACE(2 * sizeof(int))];
    struct msghdr msg = {0};
    msg.msg_iov = &io; msg.msg_iovlen = 1;
    msg.msg_control = buf; msg.msg_controllen = sizeof buf;
    if (recvmsg(s, &msg, 0) != 1) return -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    if (!cm || cm->cmsg_type != SCM_RIGHTS) return -1;
    memcpy(fds, CMSG_DATA(cm), 2 * sizeof(int));
    return 0;
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
int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "";
    const char *path = argc > 2 ? argv[2] : "/tmp/code.bin";
    if (!strcmp(m, "memfd-mmap")) {
        int fd = memfd(); if (fd < 0) return fail(m);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_SHARED, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "memfd-mprotect")) {
        int fd = memfd(); if (fd < 0) return fail(m);
        void *p = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED || mprotect(p, 4096, PROT_READ|PROT_EXEC)) return fail(m);
        return ran(m, p);
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
    if (!strcmp(m, "file-mmap") || !strcmp(m, "writers-mmap")) {
        int w = open(path, O_RDWR|O_CREAT|O_TRUNC, 0644);
        if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
        if (!strcmp(m, "file-mmap")) close(w);
        int fd = open(path, O_RDONLY);
        void *p = mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
        return p == MAP_FAILED ? fail(m) : ran(m, p);
    }
    if (!strcmp(m, "tomtou")) {
        /* Maps PATH executable, then rewrites its first bytes in place
           through another fd: a mapping that outlives the write runs what
           was written ("mov eax, 43": prints RAN tomtou 43). Without
           argv[3] PATH is made first with the code; with it (a real
           library) the same bytes are written back and nothing is called. */
        int keep = argc > 3;
        if (!keep) {
            int w = open(path, O_RDWR|O_CREAT|O_TRUNC, 0644);
            if (w < 0 || write(w, code, sizeof code) != sizeof code) return fail(m);
            close(w);
        }
        int fd = open(path, O_RDONLY);
        void *p = fd < 0 ? MAP_FAILED : mmap(0, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE, fd, 0);
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
    printf("unknown mode %s\n", m);
    return 2;
}
"#;

/// A dynamically linked program (run through ld.so and libc).
const HELLO_C: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) { printf("hello %s\n", argc > 1 ? argv[1] : "dynamic"); return 0; }
"#;

const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// busybox, the attacker program and a dynamic `hello` with its loader and
/// libc from the host.
fn attacker_image(env: &Env) -> String {
    // Built once for the tests of this file, which run side by side.
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| build_attacker_image(env)).clone()
}

fn build_attacker_image(env: &Env) -> String {
    let mut def = busybox();
    let escape = compile_c(&env.base, "escape", ESCAPE_C, &[]).unwrap();
    def.files.push(("bin/escape".into(), escape, 0o755));
    let src = env.base.join("hello.c");
    std::fs::write(&src, HELLO_C).unwrap();
    let hello = env.base.join("hello-dyn");
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&hello)
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    def.files
        .push(("bin/hello".into(), std::fs::read(&hello).unwrap(), 0o755));
    for lib in [LOADER, LIBC] {
        let bytes = std::fs::read(lib).unwrap_or_else(|e| panic!("{lib}: {e}"));
        def.files
            .push((lib.trim_start_matches('/').into(), bytes, 0o755));
    }
    let name = format!("{}/test/escapes:1", env.registry);
    build_and_push(&env.base, &def, &name, None).unwrap();
    name
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The memfd/shm payload as mapped: the code, then zeros to a page.
fn page_digest() -> String {
    let mut page = vec![0u8; 4096];
    page[..6].copy_from_slice(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    sha256_hex(&page)
}

fn log_lines(d: &Imacri, pod: &str) -> Vec<String> {
    let (code, out, err) = attest(d, &["log", pod]);
    assert_eq!(code, 0, "{err}");
    out.lines().map(str::to_string).collect()
}

/// An entry of the pod's log whose path contains `path`, with `digest` (if
/// given) and event `ev`.
fn logged(lines: &[String], path: &str, digest: Option<&str>, ev: &str) -> bool {
    lines.iter().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() == 8
            && f[4].contains(path)
            && digest.is_none_or(|d| f[3] == format!("sha256:{d}"))
            && f[7] == ev
    })
}

/// The entries of one container among a pod's.
fn entries_of(lines: &[String], container: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains(container))
        .cloned()
        .collect()
}

fn ima(name: &str, policy: &str) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    cfg.annotations
        .insert("imacri.dev/ima".into(), "true".into());
    cfg.annotations
        .insert("imacri.dev/ima-policy".into(), policy.into());
    cfg
}

fn runtime_default(mut c: cri::ContainerConfig) -> cri::ContainerConfig {
    c.linux
        .get_or_insert_with(Default::default)
        .security_context = Some(cri::LinuxContainerSecurityContext {
        seccomp: Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

/// A daemon whose `measure` policy only measures and whose `strict` policy
/// enforces the attacker image's golden policy.
async fn node(env: &Env, extra_ima: &str) -> (Imacri, String, tempfile::TempDir) {
    let image = attacker_image(env);
    let work = tempfile::tempdir_in(&env.base).unwrap();
    let golden = work.path().join("golden.json");
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[ima]\n{extra_ima}\n[ima.policies.default]\n[ima.policies.measure]\n[ima.policies.strict]\nmode = \"enforce\"\nallowlist = [\"{}\"]\n",
            golden.display()
        ),
    )
    .unwrap();
    let d = Imacri::start_with(env, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    d.pull(&image).await;
    let (code, _, err) = attest(&d, &["golden", &image, "--out", golden.to_str().unwrap()]);
    assert_eq!(code, 0, "attest golden: {err}");
    (d, image, work)
}

/// `node`, restarted with a test hook's variable set.
async fn node_with(env: &Env, var: &str, value: &str) -> (Imacri, String, tempfile::TempDir) {
    let (mut d, image, work) = node(env, "").await;
    d.kill();
    d.vars = vec![(var.into(), value.into())];
    d.spawn().await.unwrap();
    (d, image, work)
}

/// A pod of `cfg` with one sleeping container `c`: (pod, container).
async fn sleeping_pod(
    rt: &mut imacri_integration::client::Rt,
    d: &Imacri,
    cfg: &cri::PodSandboxConfig,
    image: &str,
) -> (String, String) {
    let pod = run_pod(rt, cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let c = start_container(
        rt,
        &pod,
        cfg,
        container_config("c", image, &["sleep", "1000"]),
    )
    .await;
    (pod, c)
}

async fn stop_pod(rt: &mut imacri_integration::client::Rt, pod: &str) {
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .unwrap();
}

/// An ima pod with `policy` and two sleeping containers: `a` without a
/// seccomp profile (kubelet's default), `b` with RuntimeDefault.
async fn two_containers(
    d: &Imacri,
    rt: &mut imacri_integration::client::Rt,
    name: &str,
    policy: &str,
    image: &str,
) -> (String, String, String) {
    let cfg = ima(name, policy);
    let pod = run_pod(rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let sleeper = |n: &str| container_config(n, image, &["sleep", "1000"]);
    let a = start_container(rt, &pod, &cfg, sleeper("a")).await;
    let b = start_container(rt, &pod, &cfg, runtime_default(sleeper("b"))).await;
    (pod, a, b)
}

const MAPPINGS: [&str; 9] = [
    "memfd-mmap",
    "memfd-mprotect",
    "worker-mprotect",
    "shm-mprotect",
    "shmat-exec",
    "file-mmap",
    "worker-mmap",
    "fd-pass-mmap",
    "personality",
];

/// Ways past the map guard's seccomp filter rather than through it: the
/// same call as a 32-bit syscall (`int 0x80`), and a seccomp listener of the
/// process's own answering CONTINUE first.
const AROUND_THE_GUARD: [&str; 2] = ["compat-mprotect", "own-listener"];

/// In an ima pod neither gets a call past the guard: a foreign
/// architecture's call is not allowed at all, and the kernel gives no
/// second listener to a task whose filters already have one.
async fn around_the_guard_fails(rt: &mut imacri_integration::client::Rt, c: &str) {
    // Killed by seccomp's bad-architecture action: SIGSYS (128 + 31).
    let (_, out, err) = exec_sh(rt, c, "escape compat-mprotect; echo rc=$?").await;
    assert!(!out.contains("RAN"), "a 32-bit mprotect ran: {out}{err}");
    assert!(
        out.trim_end().ends_with("rc=159"),
        "compat-mprotect: {out}{err}"
    );
    let (_, out, err) = exec_sh(rt, c, "escape own-listener; echo rc=$?").await;
    assert!(!out.contains("RAN"), "a listener of its own: {out}{err}");
    assert!(
        out.contains("own-listener: Device or resource busy") && out.trim_end().ends_with("rc=1"),
        "own-listener: {out}{err}"
    );
}

/// A process whose io_uring has a worker (a kernel thread sharing its fd
/// table, which ptrace cannot hold still) maps a library the policy
/// allows, as one without. Only in `a` (RuntimeDefault has no io_uring).
async fn uring_maps_as_any(rt: &mut imacri_integration::client::Rt, c: &str, a: &str) {
    if c != a {
        return;
    }
    let (code, out, err) = exec_sh(rt, c, "escape uring-mmap /bin/busybox").await;
    assert_eq!(code, 0, "uring-mmap: {out}{err}");
    assert!(out.contains("MAPPED uring-mmap"), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn executable_mappings_are_measured_or_refused() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    let page = page_digest();
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);

    // The control: every one of them runs in a plain pod.
    let plain = pod_config("escape-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    for m in MAPPINGS.iter().chain(&AROUND_THE_GUARD) {
        let (code, out, err) = exec_sh(&mut rt, &c, &format!("escape {m}")).await;
        assert_eq!(code, 0, "control {m}: {out}{err}");
        assert!(out.contains(&format!("RAN {m}")), "control {m}: {out}");
    }
    // io_uring can swap the file under an fd (the swap is done at 200 ms).
    let (_, out, err) = exec_sh(&mut rt, &c, "escape uring-swap 400").await;
    assert!(out.contains("RAN uring-swap"), "control: {out}{err}");
    // So can a process sharing only the address space run what is swapped in.
    let (_, out, err) = exec_sh(&mut rt, &c, "escape uring-vm-swap 400").await;
    assert!(out.contains("RAN uring-vm-swap"), "control: {out}{err}");
    stop_pod(&mut rt, &pod).await;

    // Measure mode, without a seccomp profile and with RuntimeDefault: what
    // ran is in the log with the digest of what was mapped; what cannot be
    // measured (SHM_EXEC, READ_IMPLIES_EXEC) is refused.
    let (pod, a, b) = two_containers(&d, &mut rt, "escape-measure", "measure", &image).await;
    for c in [&a, &b] {
        for m in [
            "memfd-mmap",
            "memfd-mprotect",
            "shm-mprotect",
            "file-mmap",
            "worker-mmap",
            "worker-mprotect",
            "fd-pass-mmap",
        ] {
            let (_, out, err) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert!(
                out.contains(&format!("RAN {m}")),
                "{m}: {out}{err}\n{}",
                d.log()
            );
        }
        for m in ["shmat-exec", "personality"] {
            let (code, out, _) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert_ne!(code, 0, "{m}: {out}");
            assert!(out.contains("Operation not permitted"), "{m}: {out}");
        }
        around_the_guard_fails(&mut rt, c).await;
        uring_maps_as_any(&mut rt, c, &a).await;
        // A dynamic program: the loader is an execution, libc a mapping.
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        // A program run through an fd another process passed over a unix
        // socket (fexecve) is measured like any execution.
        assert_eq!(
            sh_ok(
                &mut rt,
                c,
                "cp /bin/busybox /tmp/passed-true && escape fd-pass-exec /tmp/passed-true; echo rc=$?"
            )
            .await,
            "rc=0"
        );
    }
    let lines = log_lines(&d, &pod);
    for c in [&a, &b] {
        let mine = entries_of(&lines, c);
        assert!(
            logged(&mine, "memfd:payload", Some(&page), "mmap"),
            "{mine:#?}"
        );
        // A memfd is always open for writing: what runs may change.
        assert!(
            logged(&mine, "memfd:payload", Some(&page), "writers"),
            "{mine:#?}"
        );
        assert!(logged(&mine, "/SYSV", Some(&page), "mmap"), "{mine:#?}");
        assert!(
            logged(&mine, "/tmp/code.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(
            logged(&mine, "/tmp/passed.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        // Mapped by a thread other than the main one (a library loaded
        // from a worker thread).
        assert!(
            logged(&mine, "/tmp/worker.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(
            logged(&mine, "/tmp/wprot.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(logged(&mine, "/tmp/passed-true", None, "exec"), "{mine:#?}");
        assert!(logged(&mine, LOADER, None, "exec"), "{mine:#?}");
        assert!(logged(&mine, LIBC, None, "mmap"), "{mine:#?}");
        assert!(logged(&mine, "/bin/hello", None, "exec"), "{mine:#?}");
        assert!(logged(&mine, "", None, "start"), "{mine:#?}");
    }
    stop_pod(&mut rt, &pod).await;

    // Enforce mode with the image's golden policy: the image's own programs,
    // loader and libc run; every other mapping is refused and logged.
    let (pod, a, b) = two_containers(&d, &mut rt, "escape-enforce", "strict", &image).await;
    for c in [&a, &b] {
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        // A worker thread loading a library the policy allows.
        let (code, out, err) = exec_sh(&mut rt, c, &format!("escape worker-mmap {LIBC}")).await;
        assert_eq!(code, 0, "{out}{err}\n{}", d.log());
        assert!(out.contains("MAPPED worker-mmap"), "{out}{err}");
        around_the_guard_fails(&mut rt, c).await;
        uring_maps_as_any(&mut rt, c, &a).await;
        for m in MAPPINGS {
            let (code, out, err) = exec_sh(&mut rt, c, &format!("escape {m}")).await;
            assert_ne!(code, 0, "{m} ran under enforce: {out}{err}");
            assert!(!out.contains("RAN"), "{m}: {out}");
            assert!(out.contains("Operation not permitted"), "{m}: {out}");
        }
        // The loader mapping a changed program: refused, whatever its name.
        let (_, out, err) = exec_sh(
            &mut rt,
            c,
            &format!("cp /bin/hello /tmp/evil && printf X | dd of=/tmp/evil bs=1 seek=400 conv=notrunc 2>/dev/null; {LOADER} /tmp/evil; echo rc=$?"),
        )
        .await;
        assert!(
            !out.contains("hello dynamic"),
            "ld.so ran a changed program: {out}{err}"
        );
        // An execution refused leaves no way to map the file instead.
        let (_, out, _) = exec_sh(&mut rt, c, "escape after-deny /tmp/evil").await;
        assert!(out.contains("execve: Operation not permitted"), "{out}");
        assert!(out.contains("after-deny: Operation not permitted"), "{out}");
        // A passed fd is no way around the policy either.
        let (_, out, _) = exec_sh(
            &mut rt,
            c,
            "cp /bin/busybox /tmp/passed-true && escape fd-pass-exec /tmp/passed-true; echo rc=$?",
        )
        .await;
        assert!(
            out.contains("fd-pass-exec: Operation not permitted"),
            "{out}"
        );
        // Reading is not running: a binary outside the policy can be read.
        let sum = sh_ok(&mut rt, c, "sha256sum /tmp/evil | head -c 64").await;
        assert_eq!(sum.len(), 64);
    }
    let lines = log_lines(&d, &pod);
    // Memory-backed files can change under the mapping: refused as
    // `writers` before any policy check. The rest: not in the policy.
    for path in ["memfd:payload", "/SYSV"] {
        assert!(logged(&lines, path, None, "writers"), "{path}: {lines:#?}");
    }
    for path in [
        "/tmp/code.bin",
        "/tmp/worker.bin",
        "/tmp/wprot.bin",
        "/tmp/evil",
        "/tmp/passed.bin",
        "/tmp/passed-true",
    ] {
        assert!(logged(&lines, path, None, "deny"), "{path}: {lines:#?}");
    }
    stop_pod(&mut rt, &pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn other_roots_shm_scripts_and_rewritten_files() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    // Containers share the pod's pid namespace: each sees pause as pid 1
    // and the other's processes.
    let shared = |n: &str, arg: &str| {
        let mut c = container_config(n, &image, &["sleep", arg]);
        c.linux
            .get_or_insert_with(Default::default)
            .security_context = Some(cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        });
        c
    };
    let find_b = "for p in /proc/[0-9]*; do grep -q 2002 $p/cmdline 2>/dev/null && echo ${p#/proc/} && break; done";

    for (policy, enforce) in [("measure", false), ("strict", true)] {
        let mut cfg = ima(&format!("roots-{policy}"), policy);
        cfg.linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
            .namespace_options = Some(cri::NamespaceOption {
            pid: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        });
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let a = start_container(&mut rt, &pod, &cfg, shared("a", "1001")).await;
        let b = start_container(&mut rt, &pod, &cfg, shared("b", "2002")).await;

        // Pause's rootfs through /proc/1/root: nothing runs from it.
        let (_, out, err) = exec_sh(&mut rt, &a, "/proc/1/root/pause; echo rc=$?").await;
        assert!(out.contains("rc=126"), "{out}{err}");
        assert!(err.contains("Permission denied"), "{err}");

        // Another container's root: that container's mark would measure
        // it, but execution is allowed only beneath the caller's own root
        // (imacri's init, Landlock): refused in either mode.
        sh_ok(&mut rt, &b, "mkdir -p /tmp/other && cp /bin/busybox /tmp/other/echo && printf X | dd of=/tmp/other/echo bs=1 seek=300 conv=notrunc 2>/dev/null; echo ok").await;
        let pid_b = sh_ok(&mut rt, &a, find_b).await;
        assert!(!pid_b.is_empty());
        let (_, out, err) = exec_sh(
            &mut rt,
            &a,
            &format!("/proc/{pid_b}/root/tmp/other/echo via-root; echo rc=$?"),
        )
        .await;
        assert!(
            !out.contains("via-root") && out.contains("rc=126"),
            "{out}{err}"
        );
        assert!(err.contains("Permission denied"), "{err}");
        // Its own container runs it, measured there.
        let (_, out, err) = exec_sh(&mut rt, &b, "/tmp/other/echo in-b; echo rc=$?").await;
        assert_eq!(out.contains("in-b"), !enforce, "{out}{err}");

        // /dev/shm (POSIX shm) is noexec: neither executed nor mapped.
        let (_, out, err) = exec_sh(
            &mut rt,
            &a,
            "cp /bin/busybox /dev/shm/x && /dev/shm/x echo shm-ran; echo rc=$?; escape file-mmap /dev/shm/code.bin",
        )
        .await;
        assert!(
            !out.contains("shm-ran") && !out.contains("RAN"),
            "{out}{err}"
        );
        assert!(err.contains("Permission denied"), "{err}");

        // A script run by its shebang is an execution of the script.
        let (_, out, err) = exec_sh(
            &mut rt,
            &a,
            "printf '#!/bin/sh\\necho script-ran\\n' > /tmp/s.sh && chmod +x /tmp/s.sh && /tmp/s.sh; echo rc=$?",
        )
        .await;
        assert_eq!(out.contains("script-ran"), !enforce, "{out}{err}");

        // Mapped while open for writing: a `writers` violation, refused
        // under enforce.
        let (_, out, _) = exec_sh(&mut rt, &a, "escape writers-mmap /tmp/w.bin").await;
        assert_eq!(out.contains("RAN"), !enforce, "{out}");

        let lines = log_lines(&d, &pod);
        let other = if enforce { "deny" } else { "exec" };
        assert!(
            lines
                .iter()
                .any(|l| l.contains("/tmp/other/echo") && l.contains(&b) && l.ends_with(other)),
            "{lines:#?}"
        );
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("/tmp/other/echo") && l.contains(&a)),
            "{lines:#?}"
        );
        // Each container's processes ran through imacri's init, measured
        // like any other program, with the digest its start entry declares
        // (what lets a verifier of another build trust it).
        for c in [&a, &b] {
            let init = lines
                .iter()
                .find(|l| {
                    l.contains(c)
                        && l.contains(&format!(" {} ", imacri_runtime::integrity::init::PATH))
                        && l.ends_with(" exec")
                })
                .unwrap_or_else(|| panic!("{lines:#?}"));
            let digest = init.split(' ').nth(3).unwrap();
            assert!(
                lines.iter().any(|l| l.contains(c)
                    && l.ends_with(" start")
                    && l.contains(&format!("init={digest}"))),
                "{lines:#?}"
            );
        }
        assert!(logged(&lines, "/tmp/s.sh", None, other), "{lines:#?}");
        assert!(logged(&lines, "/tmp/w.bin", None, "writers"), "{lines:#?}");
        assert!(!lines.iter().any(|l| l.contains("/pause ")), "{lines:#?}");

        if !enforce {
            // A binary rewritten in place after it ran is measured again.
            let (_, out, err) = exec_sh(
                &mut rt,
                &a,
                "mkdir /tmp/rw && cp /bin/busybox /tmp/rw/true && /tmp/rw/true && printf Y | dd of=/tmp/rw/true bs=1 seek=200 conv=notrunc 2>/dev/null && /tmp/rw/true; echo rc=$?",
            )
            .await;
            assert!(out.contains("rc=0"), "{out}{err}");
            let lines = log_lines(&d, &pod);
            let rw: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains(" /tmp/rw/true ") && l.ends_with(" exec"))
                .collect();
            let digests: std::collections::HashSet<&str> =
                rw.iter().filter_map(|l| l.split(' ').nth(3)).collect();
            assert_eq!(digests.len(), 2, "{rw:#?}");
            // A name that is not UTF-8 is logged byte for byte (escaped),
            // never collapsed into a replacement character.
            let (_, out, err) = exec_sh(
                &mut rt,
                &a,
                "d=\"/tmp/n$(printf '\\377')\"; mkdir \"$d\" && cp /bin/busybox \"$d/true\" && \"$d/true\"; echo rc=$?",
            )
            .await;
            assert!(out.contains("rc=0"), "{out}{err}");
            let lines = log_lines(&d, &pod);
            // The path text is /tmp/n\xff/true; the log line escapes its
            // backslash once more.
            assert!(
                lines.iter().any(|l| l.contains(" /tmp/n\\x5cxff/true ")),
                "{lines:#?}"
            );
            assert!(!lines.iter().any(|l| l.contains('\u{fffd}')), "{lines:#?}");
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// Code injection by ptrace (which IMA cannot see) between an exec and the
/// container's own processes: each runs under a Landlock domain of its own
/// (imacri's init restricted each), and Landlock lets a process trace only
/// processes of its own domain or nested ones, so an exec cannot attach to
/// the entrypoint. The control: the same attach works in a plain pod.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_cannot_ptrace_the_containers_processes() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    // The entrypoint's child is the target: a pid namespace's init cannot
    // be attached to at all.
    let sleeper = |n: &str| container_config(n, &image, &["sh", "-c", "sleep 1001 & wait"]);
    // StartContainer returns once the shell runs; its sleep may not be
    // forked yet (an ima pod measures it first), so wait for it.
    let target = "for i in $(seq 100); do pidof sleep && exit 0; sleep 0.05; done; exit 1";
    for (cfg, ima_pod) in [
        (pod_config("ptrace-plain"), false),
        (ima("ptrace-ima", "measure"), true),
    ] {
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let c = start_container(&mut rt, &pod, &cfg, sleeper("c")).await;
        let pid = sh_ok(&mut rt, &c, target).await;
        assert!(!pid.is_empty());
        let (_, out, err) = exec_sh(&mut rt, &c, &format!("escape ptrace {pid}")).await;
        if ima_pod {
            assert!(!out.contains("RAN"), "{out}{err}");
            assert!(
                out.contains("ptrace: Operation not permitted"),
                "{out}{err}"
            );
            // Within one domain (the exec's own child) ptrace works: it is
            // the domains that differ, not ptrace that is gone.
            // (SIGKILL: attached before its execve, the child takes the
            // attach's SIGSTOP after the detach and would stay stopped,
            // deaf to SIGTERM, holding the exec's output open.)
            let (_, out, err) =
                exec_sh(&mut rt, &c, "sleep 1002 & escape ptrace $!; kill -9 $!").await;
            assert!(out.contains("RAN ptrace"), "own child: {out}{err}");
        } else {
            assert!(out.contains("RAN ptrace"), "control: {out}{err}");
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// How a file handed in over a unix socket can be executed.
const RECEIVED: [&str; 5] = [
    "recv-fexecve",
    "recv-proc",
    "recv-dirfd",
    "recv-cwd",
    "recv-chroot",
];

/// A helper outside the pod (here a plain pod sharing a hostPath with it)
/// hands a changed busybox, and its directory, over a unix socket. Their
/// filesystem is none the pod's marks watch, so no fanotify event would
/// measure their execution: in an ima pod every way to execute them is
/// refused, measure mode included. The control runs each in a plain pod.
#[tokio::test(flavor = "multi_thread")]
async fn files_handed_in_from_outside_the_pod_do_not_run() {
    let env = Env::get();
    let (d, image, work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let shared = work.path().join("fds");
    std::fs::create_dir_all(&shared).unwrap();
    let with_shared = |mut c: cri::ContainerConfig| {
        c.mounts.push(cri::Mount {
            container_path: "/x".into(),
            host_path: shared.to_string_lossy().into(),
            ..Default::default()
        });
        c
    };
    let sleeper = |n: &str| with_shared(container_config(n, &image, &["sleep", "1000"]));
    let profile = work.path().join("no-landlock.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "prctl"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();

    let helper = pod_config("fd-helper");
    let hp = run_pod(&mut rt, &helper).await.unwrap();
    let serve = "cp /bin/busybox /tmp/evil && printf X | dd of=/tmp/evil bs=1 seek=300 conv=notrunc 2>/dev/null && exec escape serve-fds /x/s /tmp/evil";
    start_container(
        &mut rt,
        &hp,
        &helper,
        with_shared(container_config("srv", &image, &["sh", "-c", serve])),
    )
    .await;
    for _ in 0..100 {
        if shared.join("s").exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        shared.join("s").exists(),
        "the helper's socket never appeared"
    );

    let plain = pod_config("fd-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    for m in RECEIVED {
        let (_, out, err) = exec_sh(&mut rt, &c, &format!("escape {m} /x/s")).await;
        assert!(out.contains(&format!("RAN {m}")), "control {m}: {out}{err}");
    }
    stop_pod(&mut rt, &pod).await;

    for policy in ["measure", "strict"] {
        let cfg = ima(&format!("fd-{policy}"), policy);
        let pod = run_pod(&mut rt, &cfg)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        let a = start_container(&mut rt, &pod, &cfg, sleeper("a")).await;
        let b = start_container(&mut rt, &pod, &cfg, runtime_default(sleeper("b"))).await;
        // A profile of the pod's own that refuses Landlock and prctl: the
        // init's calls are allowed anyway, and no_new_privs comes from runc.
        let mut refusing = sleeper("c");
        refusing
            .linux
            .get_or_insert_with(Default::default)
            .security_context = Some(cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: profile.to_string_lossy().into(),
            }),
            ..Default::default()
        });
        let c = start_container(&mut rt, &pod, &cfg, refusing).await;
        assert_eq!(sh_ok(&mut rt, &c, "echo up").await, "up");
        for c in [&a, &b, &c] {
            for m in RECEIVED {
                let (_, out, err) = exec_sh(&mut rt, c, &format!("escape {m} /x/s")).await;
                assert!(!out.contains("RAN"), "{policy} {m}: {out}{err}");
                assert!(
                    out.contains(&format!("{m}: Permission denied")),
                    "{policy} {m}: {out}{err}"
                );
            }
        }
        stop_pod(&mut rt, &pod).await;
    }
    stop_pod(&mut rt, &hp).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_new_paths_hits_the_quota() {
    let env = Env::get();
    let (d, image, _work) = node(env, "max_entries_per_pod = 20").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("quota", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    // Copies of one file: a new path (and entry) each.
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "i=0; while [ $i -lt 40 ]; do mkdir /tmp/d$i && cp /bin/busybox /tmp/d$i/true && /tmp/d$i/true || echo refused-$i; i=$((i+1)); done",
    )
    .await;
    assert!(
        out.contains("refused-"),
        "no refusal after the quota: {out}{err}"
    );
    assert!(!out.contains("refused-0\n"), "{out}");
    let lines = log_lines(&d, &pod);
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(" quota")).count(),
        1,
        "{lines:#?}"
    );
    assert!(lines.len() <= 21, "{} entries: {lines:#?}", lines.len());
    // Known measurements still run; the pod is reported as violating.
    assert_eq!(sh_ok(&mut rt, &c, "echo still").await, "still");
    let info = imacri_integration::client::pod_info(&mut rt, &pod).await;
    assert!(
        info["ima"]["lastViolation"]
            .as_str()
            .unwrap_or_default()
            .contains("quota"),
        "{info}"
    );
    stop_pod(&mut rt, &pod).await;
}

/// Accesses imacri refuses unmeasured (a file past `ima.max_file_size`, one
/// that cannot be hashed or keeps changing) are `gap` entries: an attacker
/// repeating one, or under new names, must not grow the node log (and the
/// TPM's extends) past the pod's quota, which each used to bypass.
#[tokio::test(flavor = "multi_thread")]
async fn refused_accesses_cannot_grow_the_log_past_the_quota() {
    let env = Env::get();
    let (d, image, _work) = node(env, "max_entries_per_pod = 20").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("gaps", "measure");
    let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    // One over-limit file executed 50 times: one gap.
    let t0 = std::time::Instant::now();
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "truncate -s 5G /tmp/over && chmod +x /tmp/over && i=0; while [ $i -lt 50 ]; do /tmp/over 2>/dev/null && echo RAN; i=$((i+1)); done; echo done",
    )
    .await;
    assert!(out.contains("done") && !out.contains("RAN"), "{out}{err}");
    let lines = log_lines(&d, &pod);
    assert_eq!(
        lines
            .iter()
            .filter(|l| logged(&[l.to_string()], "/tmp/over", None, "gap"))
            .count(),
        1,
        "{lines:#?}"
    );
    // Under 40 new names: bounded by the quota, one quota entry, and every
    // one still refused.
    let (_, out, err) = exec_sh(
        &mut rt,
        &c,
        "i=0; while [ $i -lt 40 ]; do ln /tmp/over /tmp/over$i && /tmp/over$i 2>/dev/null && echo RAN; i=$((i+1)); done; echo done",
    )
    .await;
    assert!(out.contains("done") && !out.contains("RAN"), "{out}{err}");
    let lines = log_lines(&d, &pod);
    assert!(lines.len() <= 21, "{} entries: {lines:#?}", lines.len());
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(" quota")).count(),
        1,
        "{lines:#?}"
    );
    // Nor imacri's own log, nor kubelet's events: a warning per logged
    // gap, and violations reported at most 20 at once and one a second
    // after (the last saying how many it left out).
    let secs = t0.elapsed().as_secs() as usize + 1;
    let log = d.log_with(&["unreported="]).await;
    let mine = |what: &str| {
        log.lines()
            .filter(|l| l.contains(&c) && l.contains(what))
            .count()
    };
    assert!(
        (1..=21).contains(&mine("max_file_size: refused unhashed")),
        "{log}"
    );
    assert!(
        (20..=20 + secs).contains(&mine("ima violation")),
        "{} in {secs} s:\n{log}",
        mine("ima violation")
    );
    let mut violations = 0;
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout(std::time::Duration::from_millis(500), events.message())
            .await
            .map(|m| m.transpose())
    {
        violations += usize::from(
            e.container_event_type == cri::ContainerEventType::ImaViolationEvent as i32
                && e.container_id == c,
        );
    }
    assert!((20..=20 + secs).contains(&violations), "{violations}");
    stop_pod(&mut rt, &pod).await;
}

/// A process that was running before imacri went away maps a file
/// executable while imacri is down and after it is back: the call waits for
/// the next imacri (the fd keeper held the seccomp listener), which measures
/// it; it neither fails with ENOSYS nor runs unmeasured.
#[tokio::test(flavor = "multi_thread")]
async fn mappings_of_running_processes_wait_for_a_restarted_imacri() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("escape-restart", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    // The container's own process tree (not an exec) does the mapping when
    // /tmp/go appears.
    let script = "while true; do if [ -f /tmp/go ]; then p=$(cat /tmp/go); rm /tmp/go; \
        escape file-mmap $p > /tmp/out.new 2>&1; mv /tmp/out.new /tmp/out; fi; \
        sleep 0.05; done";
    let c = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("loop", &image, &["sh", "-c", script]),
    )
    .await;
    let info = imacri_integration::client::container_info(&mut rt, &c).await;
    let pid = info["pid"].as_u64().unwrap();
    let tmp = std::path::PathBuf::from(format!("/proc/{pid}/root/tmp"));
    let wait_out = |what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(o) = std::fs::read_to_string(tmp.join("out")) {
                return o;
            }
            assert!(std::time::Instant::now() < deadline, "no output {what}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // Control: with imacri up it maps and runs.
    std::fs::write(tmp.join("go"), "/tmp/before.bin").unwrap();
    assert!(wait_out("first").contains("RAN file-mmap"));
    std::fs::remove_file(tmp.join("out")).unwrap();

    d.kill();
    std::fs::write(tmp.join("go"), "/tmp/after.bin").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        !tmp.join("out").exists(),
        "the mapping did not wait for imacri: {:?}",
        std::fs::read_to_string(tmp.join("out"))
    );
    d.spawn().await.unwrap();
    let out = wait_out("after the restart");
    assert!(out.contains("RAN file-mmap"), "{out}\n{}", d.log());
    // And it was measured, by the new imacri.
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    let lines = log_lines(&d, &pod);
    assert!(
        lines.iter().any(|l| l.contains("/tmp/after.bin")
            && l.contains(&code_file)
            && l.ends_with(" mmap")),
        "{lines:#?}"
    );
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// While imacri is down (killed, or stopped for an upgrade), an ima
/// container's fanotify group stays with the fd keeper: an execution then
/// waits, and the next imacri measures it (measure) or refuses it
/// (enforce). Nothing ran unmeasured, so no gap is logged and fail_mode
/// "closed" has nothing to kill.
#[tokio::test(flavor = "multi_thread")]
async fn executions_wait_for_a_restarted_imacri() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "fail_mode = \"closed\"").await;
    for (policy, graceful) in [("measure", false), ("strict", true)] {
        let mut rt = d.runtime().await.unwrap();
        let cfg = ima(&format!("exec-restart-{policy}"), policy);
        let pod = run_pod(&mut rt, &cfg).await.unwrap();
        // A changed busybox: in no policy.
        let setup = "mkdir -p /tmp/new && cp /bin/busybox /tmp/new/true && echo x >> /tmp/new/true";
        let (c, tmp) = runner(&mut rt, &pod, &cfg, &image, "/tmp/new/true", setup).await;
        let pid = imacri_integration::client::container_info(&mut rt, &c).await["pid"].as_u64();
        drop(rt);
        if graceful {
            d.stop();
        } else {
            d.kill();
        }
        go_while_down(&tmp, policy);
        d.spawn().await.unwrap();
        let out = next_out(&tmp, "after the restart", &d);
        let lines = log_lines(&d, &pod);
        if policy == "measure" {
            assert_eq!(out.trim(), "ran", "{out}");
            assert!(logged(&lines, "/tmp/new/true", None, "exec"), "{lines:#?}");
        } else {
            assert!(out.contains("refused"), "{out}");
            assert!(logged(&lines, "/tmp/new/true", None, "deny"), "{lines:#?}");
        }
        assert!(
            !lines.iter().any(|l| l.ends_with(" gap")),
            "{policy}: a gap was logged though nothing ran unmeasured: {lines:#?}"
        );
        assert!(
            d.log()
                .contains("fanotify group taken back from the fd keeper"),
            "{}",
            d.log()
        );
        let mut rt = d.runtime().await.unwrap();
        let st = imacri_integration::client::container_info(&mut rt, &c).await;
        assert_eq!(
            st["pid"].as_u64(),
            pid,
            "fail_mode closed killed a container that waited"
        );
        stop_pod(&mut rt, &pod).await;
    }
}

/// An event an imacri read but never answered (it died hashing) is refused
/// once it is gone (by the fd keeper, and again by the next imacri before
/// it answers anything): the kernel matches answers by fd number, so an old
/// event must not be answered by a new event's "allow", nor leave its task
/// waiting forever.
#[tokio::test(flavor = "multi_thread")]
async fn an_execution_in_flight_at_a_crash_is_refused() {
    let env = Env::get();
    let (mut d, image, _work) = node_with(env, "IMACRI_TEST_FANOTIFY_STALL", "/tmp/stall/").await;
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima("exec-in-flight", "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let setup = "mkdir -p /tmp/stall && cp /bin/busybox /tmp/stall/true";
    let (_c, tmp) = runner(&mut rt, &pod, &cfg, &image, "/tmp/stall/true", setup).await;
    drop(rt);
    // Read by imacri and never answered: the execution waits...
    go_while_down(&tmp, "stalled");
    // ...and is refused once that imacri is gone.
    d.kill();
    d.vars.clear();
    d.spawn().await.unwrap();
    let out = next_out(&tmp, "after the restart", &d);
    assert!(out.contains("refused"), "{out}");
    // The next execution of the same file is measured as usual.
    std::fs::write(tmp.join("go"), "").unwrap();
    let out = next_out(&tmp, "for the second execution", &d);
    assert_eq!(out.trim(), "ran", "{out}");
    let lines = log_lines(&d, &pod);
    assert!(
        logged(&lines, "/tmp/stall/true", None, "exec"),
        "{lines:#?}"
    );
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// seccomp's CONTINUE lets the kernel read a call's arguments again after
/// the map guard checked them: a second thread `dup2`s another file onto an
/// mmap's fd (also when the mmap is a worker thread's, or the process's
/// main thread is gone), or maps a file under an anonymous range being
/// made executable, in between (the window widened here by
/// IMACRI_TEST_MAPGUARD_SWAP_WINDOW). The threads sharing the caller's
/// table are held still from before the check until the call returned.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_swapped_in_during_the_check_is_not_mapped() {
    let env = Env::get();
    let (d, image, _work) = node_with(env, "IMACRI_TEST_MAPGUARD_SWAP_WINDOW", "600").await;
    let mut rt = d.runtime().await.unwrap();
    let swap = |m: &str| format!("escape swap-{m} /bin/busybox");
    let held = |v: serde_json::Value| v["fanotify"]["heldCalls"].as_u64().unwrap();
    // The threads that would swap are held still from before the check
    // until the call has returned: what was measured is what is mapped, in
    // either mode, and nothing needs killing.
    for (name, policy) in [("hold-measure", "measure"), ("hold-enforce", "strict")] {
        let (pod, a, b) = two_containers(&d, &mut rt, name, policy, &image).await;
        let before = held(imacri_integration::client::integrity_stats(&mut rt).await);
        for c in [&a, &b] {
            for m in ["mmap", "mprotect", "worker", "leader"] {
                let (code, out, err) = exec_sh(&mut rt, c, &swap(m)).await;
                assert!(!out.contains("RAN"), "{policy} {m}: {out}{err}");
                // The mapping holds what was measured; or (mprotect) the
                // file was mapped over the range only after the call, not
                // executable, and jumping into it faults (SIGSEGV).
                assert!(
                    out.contains(&format!("swap-{m}: not swapped in time")) || code == 139,
                    "{policy} {m}: {code} {out}{err}\n{}",
                    d.log()
                );
            }
            // An honest multi-threaded program maps what it asks for.
            let (_, out, err) = exec_sh(&mut rt, c, "escape threaded-mmap /bin/busybox").await;
            assert!(out.contains("MAPPED threaded-mmap"), "{policy}: {out}{err}");
            // The swapper went on afterwards: an honest program's threads
            // are only paused.
            let st = imacri_integration::client::container_status(&mut rt, c).await;
            assert_eq!(
                st.state,
                cri::ContainerState::ContainerRunning as i32,
                "{policy}: {st:?}"
            );
        }
        // An io_uring request (run by a kernel thread, which ptrace cannot
        // hold) puts another file under the fd during the check: what was
        // mapped is compared after the call, before any of it can run, and
        // the process is killed (a `tomtou` entry; under enforce its
        // container too). (No io_uring under RuntimeDefault.)
        let (code, out, err) = exec_sh(&mut rt, &a, "escape uring-swap 0").await;
        assert!(!out.contains("RAN"), "{policy} uring-swap: {out}{err}");
        assert_eq!(code, 137, "{policy} uring-swap: {out}{err}\n{}", d.log());
        // A process sharing only the address space (not the fd table),
        // spinning on the address mapped over, is held too and killed with
        // the caller. (In a container of its own: under enforce `a` is gone
        // now, and `b` runs under RuntimeDefault, which has no io_uring.)
        let v = start_container(
            &mut rt,
            &pod,
            &ima(name, policy),
            container_config("v", &image, &["sleep", "1000"]),
        )
        .await;
        let (code, out, err) = exec_sh(&mut rt, &v, "escape uring-vm-swap 0").await;
        assert!(!out.contains("RAN"), "{policy} uring-vm-swap: {out}{err}");
        assert_eq!(code, 137, "{policy} uring-vm-swap: {out}{err}\n{}", d.log());
        let stats = imacri_integration::client::integrity_stats(&mut rt).await;
        let now = held(stats.clone());
        assert!(now >= before + 8, "{policy}: {before} -> {now}");
        assert_eq!(stats["fanotify"]["unheldCalls"], 0, "{stats}");
        let lines = log_lines(&d, &pod);
        for c in [&a, &b] {
            let mine = entries_of(&lines, c);
            assert!(
                !mine.iter().any(|l| l.contains("/tmp/swapped-")),
                "{policy}: {mine:#?}"
            );
            assert!(!logged(&mine, "-", None, "gap"), "{policy}: {mine:#?}");
        }
        for c in [&a, &v] {
            let mine = entries_of(&lines, c);
            assert!(
                logged(&mine, "/tmp/uswap.bin", None, "tomtou"),
                "{policy}: {mine:#?}"
            );
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// Where the sharers cannot be held (a test hook stands for a task blocked
/// in the kernel or traced by someone else), the call is refused: nothing
/// else could tell what the kernel maps. Single-threaded callers are not
/// affected.
#[tokio::test(flavor = "multi_thread")]
async fn calls_whose_sharers_cannot_be_held_are_refused() {
    let env = Env::get();
    let (d, image, _work) = node_with(env, "IMACRI_TEST_MAPGUARD_NO_HOLD", "1").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, a, b) = two_containers(&d, &mut rt, "unheld", "measure", &image).await;
    for c in [&a, &b] {
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        for cmd in [
            "escape swap-mmap /bin/busybox",
            "escape threaded-mmap /bin/busybox",
        ] {
            let (code, out, err) = exec_sh(&mut rt, c, cmd).await;
            assert_ne!(code, 0, "{cmd}: {out}{err}");
            assert!(out.contains("Operation not permitted"), "{cmd}: {out}{err}");
            assert!(
                !out.contains("RAN") && !out.contains("MAPPED"),
                "{cmd}: {out}"
            );
        }
        let st = imacri_integration::client::container_status(&mut rt, c).await;
        assert_eq!(
            st.state,
            cri::ContainerState::ContainerRunning as i32,
            "{st:?}"
        );
    }
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    assert!(
        stats["fanotify"]["unheldCalls"].as_u64() >= Some(4),
        "{stats}"
    );
    let lines = log_lines(&d, &pod);
    assert!(
        !lines.iter().any(|l| l.contains("/tmp/swapped-")),
        "{lines:#?}"
    );
    stop_pod(&mut rt, &pod).await;
}

/// The same for an executable mapping: a notification the dead imacri
/// received and never answered is refused (EPERM) instead of leaving its
/// task blocked in mmap until killed.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_in_flight_at_a_crash_is_refused() {
    let env = Env::get();
    let (mut d, image, _work) =
        node_with(env, "IMACRI_TEST_MAPGUARD_STALL", "/tmp/stall.bin").await;
    let (pod, tmp) = mapping_runner(&d, &image, "map-in-flight", "/tmp/stall.bin").await;
    go_while_down(&tmp, "stalled mapping");
    d.kill();
    d.vars.clear();
    d.spawn().await.unwrap();
    let out = next_out(&tmp, "after the restart", &d);
    assert!(!out.contains("RAN file-mmap"), "{out}");
    assert!(out.contains("refused"), "{out}");
    // Mapping it again is measured and allowed.
    std::fs::write(tmp.join("go"), "").unwrap();
    let out = next_out(&tmp, "for the second mapping", &d);
    assert!(out.contains("RAN file-mmap"), "{out}");
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// A crash while a mapped file is being hashed: the map guard handed the
/// file to the fd keeper under the notification's id first (the caller
/// shares nothing, so the file cannot change under its fd), so the next
/// imacri measures it and answers the call: the mapping succeeds and is
/// logged. (A call received and not handed over is still refused: above.)
#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_hashed_at_a_crash_is_measured_by_the_next_imacri() {
    let env = Env::get();
    let (mut d, image, _work) = node_with(env, "IMACRI_TEST_HASH_DELAY", "/tmp/slowmap.bin").await;
    let (pod, tmp) = mapping_runner(&d, &image, "map-hashed", "/tmp/slowmap.bin").await;
    std::fs::write(tmp.join("go"), "").unwrap();
    imacri_integration::poll::eventually(
        "the mapped file's hash in flight",
        std::time::Duration::from_secs(20),
        || async {
            d.log()
                .contains("test hook: hashing 2 s longer")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    d.kill();
    d.vars.clear();
    d.spawn().await.unwrap();
    let out = next_out(&tmp, "after the restart", &d);
    assert!(out.contains("RAN file-mmap"), "{out}\n{}", d.log());
    let lines = log_lines(&d, &pod);
    assert!(
        logged(&lines, "/tmp/slowmap.bin", None, "mmap"),
        "{lines:#?}"
    );
    let mut rt = d.runtime().await.unwrap();
    stop_pod(&mut rt, &pod).await;
}

/// A measure-mode ima pod whose runner maps `path` executable (after
/// writing code to it) each time it is told to; returns the pod and the
/// runner's `/tmp` as the host sees it.
async fn mapping_runner(
    d: &Imacri,
    image: &str,
    name: &str,
    path: &str,
) -> (String, std::path::PathBuf) {
    let mut rt = d.runtime().await.unwrap();
    let cfg = ima(name, "measure");
    let pod = run_pod(&mut rt, &cfg).await.unwrap();
    let prog = format!("escape file-mmap {path}");
    let (_c, tmp) = runner(&mut rt, &pod, &cfg, image, &prog, "true").await;
    (pod, tmp)
}

/// ToMToU: a file mapped executable and then rewritten in place runs what
/// was written (the mapping reads the page cache), not what was measured.
/// In a plain pod the rewritten code runs; in an ima pod the write is a
/// `tomtou` entry (a violation the verifier reports) in measure mode, and
/// kills the container in enforce mode, where the file was one the policy
/// allows (the image's libc, first copied up so that it can be written in
/// place).
#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_file_rewritten_in_place_is_a_violation() {
    let env = Env::get();
    let (mut d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);

    let plain = pod_config("tomtou-plain");
    let pod = run_pod(&mut rt, &plain).await.unwrap();
    let c = start_container(&mut rt, &pod, &plain, sleeper("c")).await;
    let (_, out, err) = exec_sh(&mut rt, &c, "escape tomtou /tmp/t.bin").await;
    assert!(out.contains("RAN tomtou 43"), "control: {out}{err}");
    stop_pod(&mut rt, &pod).await;

    let (pod, a, b) = two_containers(&d, &mut rt, "tomtou-measure", "measure", &image).await;
    for c in [&a, &b] {
        let (_, out, err) = exec_sh(&mut rt, c, "escape tomtou /tmp/t.bin").await;
        assert!(out.contains("RAN tomtou 43"), "{out}{err}");
        let lines = log_lines(&d, &pod);
        let mine = entries_of(&lines, c);
        assert!(
            logged(&mine, "/tmp/t.bin", Some(&code_file), "mmap"),
            "{mine:#?}"
        );
        assert!(
            logged(&mine, "/tmp/t.bin", None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
        // Mapping it again measures it again (what it holds now); reading
        // a watched file is no violation.
        let before = entries_of(&log_lines(&d, &pod), c).len();
        sh_ok(
            &mut rt,
            c,
            "escape threaded-mmap /tmp/t.bin; cat /tmp/t.bin > /dev/null",
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mine = entries_of(&log_lines(&d, &pod), c);
        let c43 = sha256_hex(&[0xb8, 0x2b, 0, 0, 0, 0xc3]);
        assert!(logged(&mine, "/tmp/t.bin", Some(&c43), "mmap"), "{mine:#?}");
        let new: Vec<_> = mine[before..]
            .iter()
            .filter(|l| l.ends_with(" tomtou"))
            .collect();
        assert!(new.is_empty(), "{new:#?}");
        // truncate(2) opens nothing and sends fanotify no event: the read
        // lease sees it, and the `tomtou` is logged before the cut lands.
        let out = sh_ok(
            &mut rt,
            c,
            "cp /tmp/t.bin /tmp/cut.bin && escape truncate /tmp/cut.bin",
        )
        .await;
        assert!(out.contains("CUT truncate 0"), "{out}");
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(
            logged(&mine, "/tmp/cut.bin", None, "tomtou"),
            "{mine:#?}\n{}",
            d.log()
        );
    }
    let st = imacri_integration::client::container_status(&mut rt, &a).await;
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    stop_pod(&mut rt, &pod).await;

    // Enforce, with a file the policy allows that the pod can write in
    // place: the image's libc, copied up (same digest). Once it is mapped,
    // an open for writing is refused before a byte is written; the
    // container runs on with what was measured.
    let (pod, a, b) = two_containers(&d, &mut rt, "tomtou-enforce", "strict", &image).await;
    let refused = |out: &str| out.contains("Operation not permitted");
    for c in [&a, &b] {
        sh_ok(
            &mut rt,
            c,
            &format!("cp {LIBC} /tmp/l && cat /tmp/l > {LIBC}"),
        )
        .await;
        let (code, out, err) = exec_sh(&mut rt, c, &format!("escape tomtou {LIBC} keep")).await;
        assert_ne!(code, 0, "{out}{err}");
        assert!(!out.contains("WROTE"), "{out}{err}");
        assert!(refused(&out), "{out}{err}\n{}", d.log());
        let out = sh_ok(&mut rt, c, &format!("cat /tmp/l > {LIBC}; echo rc=$?")).await;
        assert!(out.ends_with("rc=1"), "{out}");
        assert_eq!(sh_ok(&mut rt, c, "hello").await, "hello dynamic");
        let st = imacri_integration::client::container_status(&mut rt, c).await;
        assert_eq!(
            st.state,
            cri::ContainerState::ContainerRunning as i32,
            "{st:?}"
        );
        let mine = entries_of(&log_lines(&d, &pod), c);
        assert!(logged(&mine, LIBC, None, "mmap"), "{mine:#?}");
        assert!(logged(&mine, LIBC, None, "deny"), "{mine:#?}");
        assert!(!logged(&mine, LIBC, None, "tomtou"), "{mine:#?}");
    }
    // A truncate cannot be refused like an open: the truncater waits on
    // the lease while the container is killed, so it never cuts.
    let truncated = |d: &Imacri, c: &str| {
        let mine = entries_of(&log_lines(d, &pod), c);
        logged(&mine, LIBC, None, "tomtou")
    };
    let mut events = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let (_, out, err) = exec_sh(&mut rt, &a, &format!("escape truncate {LIBC}")).await;
    assert!(out.contains("MAPPED") && !out.contains("CUT"), "{out}{err}");
    let stats = imacri_integration::client::integrity_stats(&mut rt).await;
    assert_eq!(stats["fanotify"]["unleasedFiles"], 0, "{stats}");
    let st = imacri_integration::client::wait_exited(&mut rt, &a).await;
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}");
    assert!(
        st.message.contains("truncated (its read lease broke)"),
        "{st:?}"
    );
    let violation = async {
        while let Ok(Some(e)) = events.message().await {
            if e.container_event_type == cri::ContainerEventType::ImaViolationEvent as i32
                && e.container_id == a
            {
                return true;
            }
        }
        false
    };
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), violation).await;
    assert_eq!(seen, Ok(true), "IMA_VIOLATION_EVENT for {a}");
    drop(events);
    assert!(truncated(&d, &a), "{}", d.log());
    // The watches are the group's and the leases the keeper's: a restarted
    // imacri reads them back and still refuses (not only notices after).
    d.kill();
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let (_, out, err) = exec_sh(&mut rt, &b, &format!("cat /tmp/l > {LIBC}; echo rc=$?")).await;
    assert!(out.trim_end().ends_with("rc=1"), "{out}{err}\n{}", d.log());
    assert!(refused(&err), "{out}{err}");
    let st = imacri_integration::client::container_status(&mut rt, &b).await;
    assert_eq!(
        st.state,
        cri::ContainerState::ContainerRunning as i32,
        "{st:?}\n{}",
        d.log()
    );
    // A truncate while imacri is down waits on the kept lease; the next
    // imacri finds it breaking and kills the container.
    sh_ok(
        &mut rt,
        &b,
        &format!("escape truncate {LIBC} 2 > /tmp/cut.out 2>&1 &"),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    d.kill();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    d.spawn().await.unwrap();
    let mut rt = d.runtime().await.unwrap();
    let st = imacri_integration::client::wait_exited(&mut rt, &b).await;
    assert_eq!(st.reason, "ImaUnmeasured", "{st:?}\n{}", d.log());
    assert!(st.message.contains("while imacri was down"), "{st:?}");
    assert!(truncated(&d, &b), "{}", d.log());
    stop_pod(&mut rt, &pod).await;
}

/// A process that holds a write lease makes every other open of its file
/// wait for it (up to fs.lease-break-time, 45 s). imacri opens the files it
/// measures (the event fd fanotify opens for the reader, its own file for a
/// read lease of a mapped one) without waiting: a lease holder in one pod
/// cannot stall a reader or the hashing threads every pod shares. Mapping
/// the file works (without a lease of imacri's); running it is refused at
/// once (the kernel denies an event whose file fanotify cannot open).
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_holder_cannot_stall_the_engine() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let (pod, a, _b) = two_containers(&d, &mut rt, "wrlease", "measure", &image).await;
    let ms = |out: &str| -> u64 {
        out.trim()
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let (code, out, err) = exec_sh(&mut rt, &a, "escape wrlease-mmap /tmp/wl.bin").await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("RAN wrlease-mmap 42 IN"), "{out}\n{}", d.log());
    assert!(
        ms(&out) < 5000,
        "the mapping waited on the lease: {out}\n{}",
        d.log()
    );
    let mine = entries_of(&log_lines(&d, &pod), &a);
    let code_file = sha256_hex(&[0xb8, 0x2a, 0, 0, 0, 0xc3]);
    assert!(
        logged(&mine, "/tmp/wl.bin", Some(&code_file), "mmap"),
        "{mine:#?}\n{}",
        d.log()
    );
    let (code, out, err) = exec_sh(
        &mut rt,
        &a,
        "cp /bin/busybox /tmp/wl-exec && escape wrlease-exec /tmp/wl-exec",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("EXEC ") && !out.starts_with("EXEC 0 "),
        "{out}\n{}",
        d.log()
    );
    assert!(ms(&out) < 5000, "the execution waited on the lease: {out}");
    // The reader goes on: the next execution runs at once.
    let t0 = std::time::Instant::now();
    assert_eq!(sh_ok(&mut rt, &a, "hello").await, "hello dynamic");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    stop_pod(&mut rt, &pod).await;
}

/// A pod cannot hold up other pods' measurements with big files: each pod
/// has hashing threads of its own, which take a slice of a file at a time,
/// so only the pod executing a huge file waits for it; a file larger than
/// `ima.max_file_size` is refused at once, unhashed (a `gap`).
#[tokio::test(flavor = "multi_thread")]
async fn huge_files_cannot_hold_up_other_pods() {
    let env = Env::get();
    let (d, image, _work) = node(env, "max_file_size = 17179869184").await;
    let mut rt = d.runtime().await.unwrap();
    let sleeper = |n: &str| container_config(n, &image, &["sleep", "1000"]);
    let cfg = ima("huge-a", "measure");
    let a_pod = run_pod(&mut rt, &cfg).await.unwrap();
    let a = start_container(&mut rt, &a_pod, &cfg, sleeper("a")).await;
    // Past the limit: refused without being read.
    let t0 = std::time::Instant::now();
    let (_, out, err) = exec_sh(
        &mut rt,
        &a,
        "truncate -s 20G /tmp/over && chmod +x /tmp/over && /tmp/over; echo rc=$?",
    )
    .await;
    assert!(
        err.contains("/tmp/over: Operation not permitted"),
        "{out}{err}"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t0.elapsed()
    );
    // Two containers executing huge (sparse) programs keep both hashing
    // threads busy for minutes.
    for n in ["hog1", "hog2"] {
        let hog = container_config(
            n,
            &image,
            &[
                "sh",
                "-c",
                "truncate -s 15G /tmp/big && chmod +x /tmp/big && exec /tmp/big",
            ],
        );
        start_container(&mut rt, &a_pod, &cfg, hog).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    // Another pod starts and runs programs no one hashed yet meanwhile.
    let t0 = std::time::Instant::now();
    let cfg = ima("huge-b", "measure");
    let b_pod = run_pod(&mut rt, &cfg).await.unwrap();
    let b = start_container(&mut rt, &b_pod, &cfg, sleeper("b")).await;
    assert_eq!(sh_ok(&mut rt, &b, "hello").await, "hello dynamic");
    let took = t0.elapsed();
    assert!(
        took < std::time::Duration::from_secs(20),
        "another pod waited {took:?} for pod a's huge files\n{}",
        d.log()
    );
    let lines = log_lines(&d, &a_pod);
    assert!(logged(&lines, "/tmp/over", None, "gap"), "{lines:#?}");
    stop_pod(&mut rt, &b_pod).await;
    // The huge files are not hashed on for containers that are gone.
    let t0 = std::time::Instant::now();
    stop_pod(&mut rt, &a_pod).await;
    let stopped = t0.elapsed();
    assert!(stopped < std::time::Duration::from_secs(30), "{stopped:?}");
    // Nothing is read any more: the counter of bytes read stands still.
    let hashed = |v: serde_json::Value| v["fanotify"]["hashedBytes"].as_u64().unwrap();
    let mut last = hashed(imacri_integration::client::integrity_stats(&mut rt).await);
    for i in 0.. {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = hashed(imacri_integration::client::integrity_stats(&mut rt).await);
        if now == last {
            break;
        }
        assert!(
            i < 20,
            "still hashing for a stopped pod: {now} bytes\n{}",
            d.log()
        );
        last = now;
    }
}

/// A script is read by its interpreter after its execution was measured,
/// a buffer at a time: rewritten in place while the interpreter sleeps, it
/// runs what was written (the control, in a plain pod). In an ima pod the
/// rewrite is seen as IMA's ToMToU sees it (the file is open by a reader
/// of the pod): in `measure` mode a `tomtou` violation, under `enforce`
/// the open for writing is refused (a `deny` entry) and what was measured
/// runs. Once the script is done, rewriting it is no violation. Under
/// `enforce` imacri is restarted while the script runs: the watch is the
/// group's, read back by the next imacri.
#[tokio::test(flavor = "multi_thread")]
async fn a_script_rewritten_while_it_runs_is_seen() {
    let env = Env::get();
    let (mut d, image, work) = node(env, "").await;
    // Longer than ash's read buffer, so that the last line is read after
    // the sleep.
    let pad = "# padding padding padding padding padding padding padding";
    let mut text = String::from("#!/bin/sh\nsleep 6\n");
    for _ in 0..200 {
        text.push_str(pad);
        text.push('\n');
    }
    let off = text.len() + "echo ".len();
    text.push_str("echo SAFE\n");
    // The strict policy allows this script (by digest, anywhere).
    let golden = work.path().join("golden.json");
    let mut g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&golden).unwrap()).unwrap();
    g["digests"] = serde_json::json!([format!("sha256:{}", sha256_hex(text.as_bytes()))]);
    std::fs::write(&golden, serde_json::to_vec(&g).unwrap()).unwrap();
    let make = format!(
        "printf '#!/bin/sh\\nsleep 6\\n' > /tmp/s.sh && for i in $(seq 200); do echo '{pad}' >> /tmp/s.sh; done && echo 'echo SAFE' >> /tmp/s.sh && chmod +x /tmp/s.sh"
    );
    let rewrite =
        format!("printf EVIL | dd of=/tmp/s.sh bs=1 seek={off} conv=notrunc 2>&1; echo dd=$?");
    let mut rt = d.runtime().await.unwrap();
    for (cfg, ev) in [
        (pod_config("script-plain"), None),
        (ima("script-measure", "measure"), Some("tomtou")),
        (ima("script-strict", "strict"), Some("deny")),
    ] {
        let (pod, c) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
        let (code, out, err) = exec_sh(
            &mut rt,
            &c,
            &format!("{make} && (/tmp/s.sh > /tmp/out 2>&1 &)"),
        )
        .await;
        assert_eq!(code, 0, "{out}{err}");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if ev == Some("deny") {
            d.kill();
            d.spawn().await.unwrap();
            rt = d.runtime().await.unwrap();
        }
        let run = format!("{rewrite}; while [ ! -s /tmp/out ]; do sleep 0.2; done; cat /tmp/out");
        let (_, out, err) = exec_sh(&mut rt, &c, &run).await;
        match ev {
            Some("deny") => {
                assert!(out.contains("Operation not permitted"), "{out}{err}");
                assert!(out.contains("SAFE") && !out.contains("EVIL"), "{out}{err}");
            }
            _ => {
                assert!(out.contains("dd=0"), "{out}{err}");
                assert!(out.contains("EVIL"), "the rewrite ran: {out}{err}");
            }
        }
        if let Some(ev) = ev {
            let lines = log_lines(&d, &pod);
            assert!(logged(&lines, "/tmp/s.sh", None, ev), "{lines:#?}");
            let violations = lines.len();
            // Done running: a rewrite is fine (and what runs next is
            // measured again).
            let (_, out, err) = exec_sh(&mut rt, &c, &rewrite).await;
            assert!(out.contains("dd=0"), "{out}{err}");
            assert_eq!(log_lines(&d, &pod).len(), violations, "{}", d.log());
        }
        stop_pod(&mut rt, &pod).await;
    }
}

/// A container's watches are its fanotify group's, and a mark that asks
/// for permission events makes every open of its file wait for the group's
/// reader: once the container is gone, so must its group be, or the next
/// open of a file it mapped waits forever (what outlives a container: a
/// pod's tmpfs volume, measured under `volumes = "measure"`; the host's
/// files a guarded process maps). Here one container mapped a file of the
/// pod's volume and ran a script from it, another mapped one and exited by
/// itself. Once they are gone, the host opens each for writing at once,
/// and nothing more is logged for them.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_containers_watches_hold_up_no_open() {
    let env = Env::get();
    let (d, image, work) = node(env, "[ima.policies.vols]\nvolumes = \"measure\"").await;
    let mut rt = d.runtime().await.unwrap();
    let vol = work.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &vol,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .unwrap();
    let with_vol = |mut c: cri::ContainerConfig| {
        c.mounts.push(cri::Mount {
            container_path: "/x".into(),
            host_path: vol.to_string_lossy().into(),
            ..Default::default()
        });
        c
    };
    let cfg = ima("gone-watch", "vols");
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let stopped = start_container(
        &mut rt,
        &pod,
        &cfg,
        with_vol(container_config("a", &image, &["sleep", "1000"])),
    )
    .await;
    let (code, out, err) = exec_sh(
        &mut rt,
        &stopped,
        "escape file-mmap /x/a.bin && printf '#!/bin/sh\\nexec sleep 1000\\n' > /x/s.sh && chmod +x /x/s.sh && (/x/s.sh > /dev/null 2>&1 &)",
    )
    .await;
    assert_eq!(code, 0, "{out}{err}\n{}", d.log());
    let exited = start_container(
        &mut rt,
        &pod,
        &cfg,
        with_vol(container_config(
            "b",
            &image,
            &["escape", "file-mmap", "/x/b.bin"],
        )),
    )
    .await;
    let st = imacri_integration::client::wait_exited(&mut rt, &exited).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    let lines = log_lines(&d, &pod);
    assert!(
        logged(&entries_of(&lines, &stopped), "/x/a.bin", None, "mmap"),
        "{lines:#?}"
    );
    assert!(
        logged(&entries_of(&lines, &exited), "/x/b.bin", None, "mmap"),
        "{lines:#?}"
    );
    rt.stop_container(cri::StopContainerRequest {
        container_id: stopped.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    for c in [&stopped, &exited] {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: c.to_string(),
        })
        .await
        .unwrap();
    }
    let logged_before = log_lines(&d, &pod).len();
    for f in ["a.bin", "s.sh", "b.bin"] {
        // In a thread of its own: an open that waits on a permission
        // event nobody reads cannot be given up by the one waiting.
        let path = vol.join(f);
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let opened = std::fs::OpenOptions::new().write(true).open(&path);
            let _ = done.send(opened.map(drop).map_err(|e| e.to_string()));
        });
        match result.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(r) => assert_eq!(r, Ok(()), "{f}"),
            Err(_) => panic!(
                "opening {f} for writing waits on a gone container's watch (/proc/locks:\n{})\n{}",
                std::fs::read_to_string("/proc/locks").unwrap_or_default(),
                d.log()
            ),
        }
    }
    assert_eq!(log_lines(&d, &pod).len(), logged_before);
    stop_pod(&mut rt, &pod).await;
    nix::mount::umount2(&vol, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// imacri's CPU time so far (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // utime and stime: fields 14 and 15, 12 and 13 after the comm.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The pod's cgroup in the cpu and cpuacct hierarchies, made as kubelet
/// makes a pod's, with a CPU limit of a tenth of a core; removed (in every
/// hierarchy runc made it in) on drop.
struct PodCgroup(String);

impl PodCgroup {
    fn limited(name: &str) -> PodCgroup {
        use imacri_runtime::integrity::charge::dir_in;
        let cg = PodCgroup(format!("/{name}"));
        let cpu = dir_in("cpu", &cg.0).expect("a cgroup v1 cpu hierarchy");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::create_dir_all(dir_in("cpuacct", &cg.0).unwrap()).unwrap();
        std::fs::write(cpu.join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "10000").unwrap();
        cg
    }

    fn dir(&self, controller: &str) -> std::path::PathBuf {
        imacri_runtime::integrity::charge::dir_in(controller, &self.0).unwrap()
    }

    /// CPU time charged to the pod so far.
    fn usage(&self) -> std::time::Duration {
        let ns = std::fs::read_to_string(self.dir("cpuacct").join("cpuacct.usage")).unwrap();
        std::time::Duration::from_nanos(ns.trim().parse().unwrap())
    }

    /// Threads of process `pid` named `comm` in the pod's cpu cgroup.
    fn threads_of(&self, pid: u32, comm: &str) -> usize {
        let tasks = std::fs::read_to_string(self.dir("cpu").join("tasks")).unwrap();
        tasks
            .lines()
            .filter(|t| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{t}/comm"))
                    .is_ok_and(|c| c.trim() == comm)
            })
            .count()
    }
}

impl PodCgroup {
    /// Whether `pid` is listed in the pod's cgroup or one below it, in
    /// either hierarchy (what kubelet reads before it kills).
    fn lists_process(&self, pid: u32) -> bool {
        fn walk(dir: &std::path::Path, pid: u32) -> bool {
            let here = std::fs::read_to_string(dir.join("cgroup.procs"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()));
            here || std::fs::read_dir(dir).is_ok_and(|d| {
                d.flatten()
                    .any(|e| e.file_type().is_ok_and(|t| t.is_dir()) && walk(&e.path(), pid))
            })
        }
        ["cpu", "cpuacct"].iter().any(|c| walk(&self.dir(c), pid))
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let d = h.path().join(self.0.trim_start_matches('/'));
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A pod pays for its own measurements, as under kernel IMA (which hashes
/// in the executing task): imacri's hashing of its files and its seccomp
/// listeners' answers run in its cgroup and are throttled with it. The
/// attacker, limited to a tenth of a core, (1) executes a huge (sparse)
/// program, which imacri would read at a full core for minutes, then (2)
/// loops `mprotect(PROT_EXEC)`, a guarded call each, which would keep a
/// listener thread at a full core, then (3) loops opens of a file under a
/// policy that measures reads, a fanotify permission event each; imacri
/// must spend about what the pod may.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_pays_for_its_measurements() {
    let env = Env::get();
    if imacri_runtime::integrity::charge::available().is_err() {
        panic!("this machine has a cgroup v1 cpu hierarchy: pods must be charged");
    }
    // A policy that measures reads too (as an admin may configure).
    let (d, image, _work) = node(
        env,
        "max_file_size = 17179869184\n[ima.policies.reads]\nrules = [\"measure func=BPRM_CHECK mask=MAY_EXEC\", \"measure func=FILE_MMAP mask=MAY_EXEC\", \"measure func=FILE_CHECK mask=MAY_READ uid=0\"]",
    )
    .await;
    let mut rt = d.runtime().await.unwrap();
    let pid = d.pid().unwrap();
    let cg = PodCgroup::limited(&format!("imacri-test-charge-{}", std::process::id()));
    let mut cfg = ima("charged", "reads");
    cfg.linux.get_or_insert_with(Default::default).cgroup_parent = cg.0.clone();
    let pod = run_pod(&mut rt, &cfg)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    // Over 4 s, imacri spends at most about what the pod may (0.4 s), and
    // the pod is charged for it.
    let measure = |what: &'static str| {
        let cg = &cg;
        async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let (c0, u0, t0) = (cpu_ticks(pid), cg.usage(), std::time::Instant::now());
            tokio::time::sleep(std::time::Duration::from_secs(4)).await;
            let ticks = libc_ticks();
            let spent = std::time::Duration::from_secs_f64((cpu_ticks(pid) - c0) as f64 / ticks);
            let charged = cg.usage() - u0;
            let took = t0.elapsed();
            eprintln!(
                "{what}: imacri spent {spent:?}, the pod was charged {charged:?} in {took:?}"
            );
            assert!(
                spent < took / 4,
                "{what}: imacri spent {spent:?} of CPU in {took:?} for a pod limited to 10%"
            );
            assert!(
                charged > std::time::Duration::from_millis(150),
                "{what}: the pod was charged only {charged:?} (imacri spent {spent:?})"
            );
        }
    };
    let hog = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config(
            "hog",
            &image,
            &[
                "sh",
                "-c",
                "truncate -s 15G /tmp/big && chmod +x /tmp/big && exec /tmp/big",
            ],
        ),
    )
    .await;
    measure("hashing").await;
    assert!(cg.threads_of(pid, "imacri-hash") >= 1, "{}", d.log());
    rt.stop_container(cri::StopContainerRequest {
        container_id: hog,
        timeout: 0,
    })
    .await
    .unwrap();
    // (2) a loop of `mprotect(PROT_EXEC)`: a guarded call each, answered by
    // the container's seccomp listener; (2b) the same from a process with a
    // second thread: each call is held (its sharers stopped while it is
    // checked) on a thread of imacri's started for it.
    for (name, mode, thread) in [
        ("flood", "single", "imacri-seccomp"),
        ("threaded-flood", "threaded", "imacri-maphold"),
    ] {
        let flood = start_container(
            &mut rt,
            &pod,
            &cfg,
            container_config(name, &image, &["escape", "mprotect-flood", mode]),
        )
        .await;
        measure(name).await;
        // (A held call's thread lives for the call: sampled.)
        let mut seen = false;
        for _ in 0..200 {
            seen = cg.threads_of(pid, thread) >= 1;
            if seen {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(
            seen,
            "{name}: no {thread} thread in the pod's cgroup\n{}",
            d.log()
        );
        let st = imacri_integration::client::container_status(&mut rt, &flood).await;
        assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
        rt.stop_container(cri::StopContainerRequest {
            container_id: flood,
            timeout: 0,
        })
        .await
        .unwrap();
    }
    // (3) a loop of opens of a file, each a read the policy measures: a
    // permission event for the container's fanotify reader each.
    start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("opener", &image, &["escape", "open-flood", "/etc/passwd"]),
    )
    .await;
    measure("open flood").await;
    assert!(cg.threads_of(pid, "imacri-fanotify") >= 1, "{}", d.log());
    assert!(cg.lists_process(pid));
    let lines = log_lines(&d, &pod);
    assert!(logged(&lines, "/etc/passwd", None, "read"), "{lines:#?}");
    stop_pod(&mut rt, &pod).await;
    // Once the pod is stopped and removed, nothing of imacri's is left in
    // its cgroup: kubelet SIGKILLs every PID listed there before it
    // removes it.
    assert!(!cg.lists_process(pid), "{}", d.log());
}

/// A pod's threads, each looping a guarded call that is held (the calling
/// process is multi-threaded), keep as many calls waiting at once as it has
/// threads: imacri handles them with a bounded number of threads of its own
/// (one at a time per container, as their holding is), not a thread per
/// waiting call (until 2026-12-03: +3212 threads in 3 s), and goes on
/// answering them.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_held_calls_takes_a_bounded_number_of_threads() {
    let env = Env::get();
    let (d, image, _work) = node(env, "").await;
    let mut rt = d.runtime().await.unwrap();
    let pid = d.pid().unwrap();
    let threads = || {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<i64>().ok())
            .unwrap()
    };
    let cfg = ima("held-flood", "measure");
    let (pod, _) = sleeping_pod(&mut rt, &d, &cfg, &image).await;
    let held = |v: serde_json::Value| v["fanotify"]["heldCalls"].as_u64().unwrap();
    let before = threads();
    let calls0 = held(imacri_integration::client::integrity_stats(&mut rt).await);
    let flood = start_container(
        &mut rt,
        &pod,
        &cfg,
        container_config("flood", &image, &["escape", "held-flood", "300"]),
    )
    .await;
    let mut most = 0;
    for _ in 0..60 {
        most = most.max(threads() - before);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let calls = held(imacri_integration::client::integrity_stats(&mut rt).await) - calls0;
    eprintln!("imacri threads: {before} before, up to +{most} with 300 flooding threads; {calls} calls held");
    assert!(
        most < 30,
        "imacri took {most} threads more for one container's held calls"
    );
    // Each holds the 299 other threads still (~100 us each): slow, but on.
    assert!(calls > 20, "only {calls} held calls in 3 s");
    let st = imacri_integration::client::container_status(&mut rt, &flood).await;
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    stop_pod(&mut rt, &pod).await;
}

/// A pod at its CPU limit does not stall other pods' executions: imacri's
/// threads working for it run in its cgroup, and one throttled while it
/// holds something every pod's events need (the node log, a cache) would
/// make every pod wait out the throttled pod's period (90 ms of each
/// 100 ms at a 10% limit). The throttled pod floods opens under a policy
/// that measures reads, held mapping calls and the hashing of a huge file;
/// a bystander pod times 2000 executions. Until 2026-12-03 the node log's
/// "logged already?" check took the log's one lock: the bystander's
/// longest execution was 88-97 ms in 2 of 5 runs (the opens alone).
#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_pod_does_not_stall_other_pods() {
    let env = Env::get();
    let (d, image, _work) = node(
        env,
        "[ima.policies.reads]\nrules = [\"measure func=BPRM_CHECK mask=MAY_EXEC\", \"measure func=FILE_MMAP mask=MAY_EXEC\", \"measure func=FILE_CHECK mask=MAY_READ uid=0\"]",
    )
    .await;
    let mut rt = d.runtime().await.unwrap();
    let cg = PodCgroup::limited(&format!("imacri-test-stall-{}", std::process::id()));
    let mut limited = ima("throttled", "reads");
    limited
        .linux
        .get_or_insert_with(Default::default)
        .cgroup_parent = cg.0.clone();
    let (slow, _) = sleeping_pod(&mut rt, &d, &limited, &image).await;
    let other = ima("bystander", "measure");
    let (fast, c) = sleeping_pod(&mut rt, &d, &other, &image).await;
    // "EXEC-TIMES p50 N p99 N max N"
    let times = |out: &str| -> (u64, u64, u64) {
        let f: Vec<u64> = out
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(f.len(), 3, "{out}");
        (f[0], f[1], f[2])
    };
    // Cached executions (the digest cache and the log looked up), and
    // executions of new files (each queued for hashing, hashed, cached and
    // logged): every structure every pod's accesses share.
    let runs = ["escape exec-times 2000", "escape exec-new-times 500"];
    let mut quiet = Vec::new();
    for run in runs {
        let (_, out, err) = exec_sh(&mut rt, &c, run).await;
        quiet.push(times(&format!("{out}{err}")));
    }
    let throttled = || {
        let st = std::fs::read_to_string(cg.dir("cpu").join("cpu.stat")).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap()
    };
    let throttled0 = throttled();
    for (name, cmd) in [
        ("opener", vec!["escape", "open-flood", "/etc/passwd"]),
        (
            "rewriter",
            vec!["escape", "rewrite-flood", "/tmp/rewritten"],
        ),
        ("flipper", vec!["escape", "held-flood", "4"]),
        (
            "hog",
            vec![
                "sh",
                "-c",
                "truncate -s 15G /tmp/big && chmod +x /tmp/big && exec /tmp/big",
            ],
        ),
    ] {
        start_container(
            &mut rt,
            &slow,
            &limited,
            container_config(name, &image, &cmd),
        )
        .await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut busy = Vec::new();
    for run in runs {
        let (_, out, err) = exec_sh(&mut rt, &c, run).await;
        busy.push(times(&format!("{out}{err}")));
    }
    let periods = throttled() - throttled0;
    eprintln!("bystander's executions, cached then new (p50, p99, max us): quiet {quiet:?}, next to a throttled pod {busy:?} (throttled in {periods} periods)");
    assert!(periods > 10, "the pod was not at its limit: {periods}");
    // New files' executions waited out the throttled pod's period (~95 ms
    // in 11 of 46 runs) until the fd keeper stopped reading a connection
    // before its request was there (a throttled reader between its connect
    // and its send).
    for (q, b) in quiet.iter().zip(&busy) {
        assert!(
            b.1 < q.1 * 3 + 20_000 && b.2 < 60_000,
            "quiet {quiet:?}, next to a throttled pod {busy:?}"
        );
    }
    stop_pod(&mut rt, &slow).await;
    stop_pod(&mut rt, &fast).await;
}

fn libc_ticks() -> f64 {
    // SAFETY: sysconf has no side effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}
