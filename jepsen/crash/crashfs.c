/*
 * crashfs: an LD_PRELOAD library for the chaos harness's crash and slow-disk nemeses.
 *
 * A process killed with kill -9 loses nothing it wrote: the kernel's page cache survives it.
 * A machine that loses power loses every write since the file's last fsync, or some of them,
 * page by page. To test the second without a power switch, this library keeps, for every
 * file on the tracked filesystem (ENGRAM_CRASH_DEV: a path on it, the node's disk), an undo
 * log of what each write overwrote since that file's last successful fsync:
 *
 *   - before a write, truncate, fallocate, copy_file_range or O_TRUNC open changes bytes,
 *     the bytes it replaces and the file's size are appended to
 *     ENGRAM_CRASH_UNDO/<dev>-<ino>.undo (that directory is on another filesystem);
 *   - after fsync / fdatasync of the file succeeds, its undo log is emptied (sync and syncfs
 *     empty all of them);
 *   - unlink and rename drop the undo log of a file they remove.
 *
 * After the harness kills the process it applies the undo logs (jepsen/src/disk.rs): all of
 * them (every un-fsynced write lost) or a random choice of pages (torn writes). The record is
 * written before the change, and the log is emptied only after fsync returns, so the
 * harness never undoes a write that a completed fsync covered.
 *
 * ENGRAM_CRASH_CTL names a file holding a number of milliseconds: every fsync / fdatasync of
 * a tracked file waits that long before it starts (the slow-disk nemesis; the crash nemesis
 * uses `<that file>.crash`, and the larger wins), and what it is to flush stays un-flushed
 * meanwhile. Missing or 0: no delay. Writes on O_SYNC / O_DSYNC descriptors and with
 * RWF_SYNC / RWF_DSYNC are durable at once and not logged.
 *
 * Not modelled: directory operations (a create, rename or unlink is durable at once), writes
 * made through mmap, and writes that glibc makes without its exported symbols (stdio's
 * fwrite): such writes count as durable at once, which can hide a bug but never invents one.
 *
 * Record format (native endianness; the harness runs on the same machine):
 *   u32 magic 0x4e554745 ("EGUN"), u32 zero, u64 offset, u64 length, u64 old_size,
 *   then `length` bytes: what the file held at [offset, offset + length) before the change.
 * Undoing the records from last to first (write the bytes back, set the size to old_size)
 * gives the file as its last fsync left it.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4e554745u

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int tracking;
static dev_t tracked_dev;
static char undo_dir[PATH_MAX - 128];
static char ctl_path[PATH_MAX];

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static ssize_t (*real_pwritev64v2)(int, const struct iovec *, int, off_t, int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_fallocate64)(int, int, off_t, off_t);
static int (*real_posix_fallocate)(int, off_t, off_t);
static int (*real_posix_fallocate64)(int, off_t, off_t);
static ssize_t (*real_copy_file_range)(int, off_t *, int, off_t *, size_t, unsigned int);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static void (*real_sync)(void);
static int (*real_syncfs)(int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);

#define RESOLVE(name) real_##name = dlsym(RTLD_NEXT, #name)

static void init(void) {
    RESOLVE(write);
    RESOLVE(pwrite);
    RESOLVE(pwrite64);
    RESOLVE(writev);
    RESOLVE(pwritev);
    RESOLVE(pwritev64);
    RESOLVE(pwritev2);
    RESOLVE(pwritev64v2);
    RESOLVE(ftruncate);
    RESOLVE(ftruncate64);
    RESOLVE(fallocate);
    RESOLVE(fallocate64);
    RESOLVE(posix_fallocate);
    RESOLVE(posix_fallocate64);
    RESOLVE(copy_file_range);
    RESOLVE(fsync);
    RESOLVE(fdatasync);
    RESOLVE(sync);
    RESOLVE(syncfs);
    RESOLVE(open);
    RESOLVE(open64);
    RESOLVE(openat);
    RESOLVE(openat64);
    RESOLVE(unlink);
    RESOLVE(unlinkat);
    RESOLVE(rename);
    RESOLVE(renameat);
    RESOLVE(renameat2);
    const char *dev = getenv("ENGRAM_CRASH_DEV");
    const char *undo = getenv("ENGRAM_CRASH_UNDO");
    const char *ctl = getenv("ENGRAM_CRASH_CTL");
    struct stat st;
    if (dev && undo && stat(dev, &st) == 0 && strlen(undo) < sizeof(undo_dir)) {
        tracked_dev = st.st_dev;
        strcpy(undo_dir, undo);
        tracking = 1;
    }
    if (ctl && strlen(ctl) < sizeof(ctl_path)) strcpy(ctl_path, ctl);
}

static void ensure_init(void) { pthread_once(&once, init); }

/* Whether `fd` is a regular file on the tracked filesystem; fills `st`. */
static int tracked_fd(int fd, struct stat *st) {
    ensure_init();
    if (!tracking || fd < 0) return 0;
    if (fstat(fd, st) != 0) return 0;
    return S_ISREG(st->st_mode) && st->st_dev == tracked_dev;
}

static void undo_path(char *out, size_t n, dev_t dev, ino_t ino) {
    snprintf(out, n, "%s/%llx-%llx.undo", undo_dir, (unsigned long long)dev, (unsigned long long)ino);
}

/* The harness cannot apply a record it cannot trust: a write that could not be logged is
 * refused (EIO), as a failing disk would refuse it. */
static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t w = real_write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Appends one record: the bytes of the file at [off, off + len) (clipped to its size) and
 * its size. Returns 0, or -1 with errno set. Called with `mu` held. */
static int record_locked(int fd, const struct stat *st, off_t off, off_t len) {
    char path[PATH_MAX];
    undo_path(path, sizeof path, st->st_dev, st->st_ino);
    int u = real_open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (u < 0) return -1;
    off_t size = st->st_size;
    off_t have = 0;
    if (off < size) have = (len < size - off) ? len : size - off;
    if (have < 0) have = 0;
    uint64_t head[4];
    uint32_t *magic = (uint32_t *)&head[0];
    magic[0] = MAGIC;
    magic[1] = 0;
    head[1] = (uint64_t)off;
    head[2] = (uint64_t)have;
    head[3] = (uint64_t)size;
    int rc = write_all(u, head, sizeof head);
    if (rc == 0 && have > 0) {
        /* The fd may be write-only: read the old bytes through a fresh read-only open. */
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        int r = real_open(self, O_RDONLY | O_CLOEXEC);
        if (r < 0) {
            rc = -1;
        } else {
            char buf[65536];
            off_t done = 0;
            while (rc == 0 && done < have) {
                size_t want = (size_t)((have - done) < (off_t)sizeof buf ? (have - done) : (off_t)sizeof buf);
                ssize_t got = pread(r, buf, want, off + done);
                if (got < 0 && errno == EINTR) continue;
                if (got < 0) {
                    rc = -1;
                    break;
                }
                if (got == 0) {
                    /* Shorter than fstat said: pad with zeros so the record stays framed. */
                    memset(buf, 0, want);
                    got = (ssize_t)want;
                }
                rc = write_all(u, buf, (size_t)got);
                done += got;
            }
            int e = errno;
            close(r);
            errno = e;
        }
    }
    int e = errno;
    close(u);
    errno = e;
    return rc;
}

/* Records what [off, off + len) holds before a change. `at_end`: the change goes at the end
 * of the file (O_APPEND). `to_end`: the change reaches the end of the file whatever its size
 * (a shrink, an O_TRUNC): at least `len`, and everything from `off` on. Sizes are read under
 * the lock, so a concurrent writer cannot make the record short. */
static int record_span(int fd, off_t off, off_t len, int at_end, int to_end) {
    struct stat st;
    if (!tracked_fd(fd, &st)) return 0;
    /* A write on an O_SYNC / O_DSYNC descriptor is durable when it returns. */
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && (flags & (O_SYNC | O_DSYNC))) return 0;
    pthread_mutex_lock(&mu);
    if (fstat(fd, &st) != 0) {
        pthread_mutex_unlock(&mu);
        return 0;
    }
    if (at_end) off = st.st_size;
    if (to_end && st.st_size - off > len) len = st.st_size - off;
    int rc = record_locked(fd, &st, off, len);
    pthread_mutex_unlock(&mu);
    if (rc != 0) errno = EIO;
    return rc;
}

static int record(int fd, off_t off, off_t len, int at_end) { return record_span(fd, off, len, at_end, 0); }

/* The offset a write() at the file position would go to. */
static int position(int fd, off_t *off, int *at_end) {
    int flags = fcntl(fd, F_GETFL);
    *at_end = flags >= 0 && (flags & O_APPEND);
    *off = *at_end ? 0 : lseek(fd, 0, SEEK_CUR);
    return *off >= 0 ? 0 : -1;
}

static off_t iov_len(const struct iovec *iov, int n) {
    off_t t = 0;
    for (int i = 0; i < n; i++) t += (off_t)iov[i].iov_len;
    return t;
}

static void forget_stat(const struct stat *st) {
    char path[PATH_MAX];
    undo_path(path, sizeof path, st->st_dev, st->st_ino);
    pthread_mutex_lock(&mu);
    real_unlink(path);
    pthread_mutex_unlock(&mu);
}

/* After a successful fsync: everything written to the file so far is durable. */
static void synced(int fd) {
    struct stat st;
    if (tracked_fd(fd, &st)) forget_stat(&st);
}

/* Before a path is removed or replaced: its un-fsynced writes no longer matter. */
static void forget_path(int dirfd, const char *p) {
    struct stat st;
    ensure_init();
    if (!tracking || !p) return;
    if (fstatat(dirfd, p, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) && st.st_dev == tracked_dev &&
        st.st_nlink <= 1)
        forget_stat(&st);
}

static long read_ms(const char *path) {
    int c = real_open(path, O_RDONLY | O_CLOEXEC);
    if (c < 0) return 0;
    char buf[32] = {0};
    ssize_t n = read(c, buf, sizeof buf - 1);
    close(c);
    return n > 0 ? strtol(buf, NULL, 10) : 0;
}

/* The delay is the larger of the control file's and `<control file>.crash`'s (the crash
 * nemesis's own, so the two never overwrite each other). */
static void slow_sync(int fd) {
    struct stat st;
    if (!ctl_path[0] || !tracked_fd(fd, &st)) return;
    char crash[PATH_MAX + 8];
    snprintf(crash, sizeof crash, "%s.crash", ctl_path);
    long ms = read_ms(ctl_path);
    long crash_ms = read_ms(crash);
    if (crash_ms > ms) ms = crash_ms;
    if (ms <= 0) return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

ssize_t write(int fd, const void *buf, size_t n) {
    ensure_init();
    off_t off;
    int at_end;
    struct stat st;
    if (n > 0 && tracked_fd(fd, &st) && position(fd, &off, &at_end) == 0 && record(fd, off, (off_t)n, at_end) != 0)
        return -1;
    return real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    ensure_init();
    if (n > 0 && record(fd, off, (off_t)n, 0) != 0) return -1;
    return real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    ensure_init();
    if (n > 0 && record(fd, off, (off_t)n, 0) != 0) return -1;
    return real_pwrite64(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    ensure_init();
    off_t off;
    int at_end;
    struct stat st;
    if (tracked_fd(fd, &st) && position(fd, &off, &at_end) == 0 && record(fd, off, iov_len(iov, cnt), at_end) != 0)
        return -1;
    return real_writev(fd, iov, cnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    ensure_init();
    if (record(fd, off, iov_len(iov, cnt), 0) != 0) return -1;
    return real_pwritev(fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    ensure_init();
    if (record(fd, off, iov_len(iov, cnt), 0) != 0) return -1;
    return real_pwritev64(fd, iov, cnt, off);
}

static ssize_t pwritev2_common(ssize_t (*real)(int, const struct iovec *, int, off_t, int), int fd,
                               const struct iovec *iov, int cnt, off_t off, int flags) {
    ensure_init();
    struct stat st;
    /* RWF_DSYNC / RWF_SYNC: this write is durable when it returns. */
    if (flags & (RWF_DSYNC | RWF_SYNC)) return real(fd, iov, cnt, off, flags);
    if (off == -1) {
        int at_end;
        if (tracked_fd(fd, &st) && position(fd, &off, &at_end) == 0 &&
            record(fd, off, iov_len(iov, cnt), at_end) != 0)
            return -1;
        return real(fd, iov, cnt, -1, flags);
    }
    if (record(fd, off, iov_len(iov, cnt), 0) != 0) return -1;
    return real(fd, iov, cnt, off, flags);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    ensure_init();
    if (!real_pwritev2) {
        errno = ENOSYS;
        return -1;
    }
    return pwritev2_common(real_pwritev2, fd, iov, cnt, off, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    ensure_init();
    if (!real_pwritev64v2) {
        errno = ENOSYS;
        return -1;
    }
    return pwritev2_common(real_pwritev64v2, fd, iov, cnt, off, flags);
}

/* A size change: the bytes a shrink cuts off (and the old size) are recorded. */
static int record_resize(int fd, off_t len) { return record_span(fd, len, 0, 0, 1); }

int ftruncate(int fd, off_t len) {
    ensure_init();
    if (record_resize(fd, len) != 0) return -1;
    return real_ftruncate(fd, len);
}

int ftruncate64(int fd, off_t len) {
    ensure_init();
    if (record_resize(fd, len) != 0) return -1;
    return real_ftruncate64(fd, len);
}

/* fallocate may grow the file, or (punch hole, zero range, collapse) change bytes: record the
 * range it touches and everything after it for the shifting modes. */
static int record_fallocate(int fd, int mode, off_t off, off_t len) {
    if (mode & ~(0x01 /* FALLOC_FL_KEEP_SIZE */)) return record_span(fd, off, len, 0, 1);
    return record(fd, off, 0, 0);
}

int fallocate(int fd, int mode, off_t off, off_t len) {
    ensure_init();
    if (record_fallocate(fd, mode, off, len) != 0) return -1;
    return real_fallocate(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off_t off, off_t len) {
    ensure_init();
    if (record_fallocate(fd, mode, off, len) != 0) return -1;
    return real_fallocate64(fd, mode, off, len);
}

int posix_fallocate(int fd, off_t off, off_t len) {
    ensure_init();
    if (record(fd, off, 0, 0) != 0) return EIO;
    return real_posix_fallocate(fd, off, len);
}

int posix_fallocate64(int fd, off_t off, off_t len) {
    ensure_init();
    if (record(fd, off, 0, 0) != 0) return EIO;
    return real_posix_fallocate64(fd, off, len);
}

ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t len, unsigned int flags) {
    ensure_init();
    struct stat st;
    if (tracked_fd(out, &st)) {
        off_t off;
        int at_end = 0;
        if (out_off)
            off = *out_off;
        else if (position(out, &off, &at_end) != 0)
            off = 0;
        if (record(out, off, (off_t)len, at_end) != 0) return -1;
    }
    if (!real_copy_file_range) {
        errno = ENOSYS;
        return -1;
    }
    return real_copy_file_range(in, in_off, out, out_off, len, flags);
}

int fsync(int fd) {
    ensure_init();
    slow_sync(fd);
    int rc = real_fsync(fd);
    if (rc == 0) synced(fd);
    return rc;
}

int fdatasync(int fd) {
    ensure_init();
    slow_sync(fd);
    int rc = real_fdatasync(fd);
    if (rc == 0) synced(fd);
    return rc;
}

static void forget_all(void) {
    if (!tracking) return;
    pthread_mutex_lock(&mu);
    DIR *d = opendir(undo_dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            size_t n = strlen(e->d_name);
            if (n > 5 && strcmp(e->d_name + n - 5, ".undo") == 0) real_unlinkat(dirfd(d), e->d_name, 0);
        }
        closedir(d);
    }
    pthread_mutex_unlock(&mu);
}

void sync(void) {
    ensure_init();
    real_sync();
    forget_all();
}

int syncfs(int fd) {
    ensure_init();
    int rc = real_syncfs(fd);
    if (rc == 0) forget_all();
    return rc;
}

/* O_TRUNC empties an existing file: record what it held first. */
static int before_open(int dirfd, const char *p, int flags) {
    ensure_init();
    if (!tracking || !(flags & O_TRUNC) || !p) return 0;
    struct stat st;
    if (fstatat(dirfd, p, &st, 0) != 0 || !S_ISREG(st.st_mode) || st.st_dev != tracked_dev || st.st_size == 0)
        return 0;
    int fd = real_openat(dirfd, p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    int rc = record_span(fd, 0, 0, 0, 1);
    close(fd);
    return rc;
}

#define OPEN_MODE(flags)                                   \
    mode_t mode = 0;                                       \
    if ((flags) & (O_CREAT | __O_TMPFILE)) {               \
        va_list ap;                                        \
        va_start(ap, flags);                               \
        mode = (mode_t)va_arg(ap, int);                    \
        va_end(ap);                                        \
    }

int open(const char *p, int flags, ...) {
    OPEN_MODE(flags);
    if (before_open(AT_FDCWD, p, flags) != 0) return -1;
    return real_open(p, flags, mode);
}

int open64(const char *p, int flags, ...) {
    OPEN_MODE(flags);
    if (before_open(AT_FDCWD, p, flags) != 0) return -1;
    return real_open64(p, flags, mode);
}

int openat(int dirfd, const char *p, int flags, ...) {
    OPEN_MODE(flags);
    if (before_open(dirfd, p, flags) != 0) return -1;
    return real_openat(dirfd, p, flags, mode);
}

int openat64(int dirfd, const char *p, int flags, ...) {
    OPEN_MODE(flags);
    if (before_open(dirfd, p, flags) != 0) return -1;
    return real_openat64(dirfd, p, flags, mode);
}

int unlink(const char *p) {
    forget_path(AT_FDCWD, p);
    return real_unlink(p);
}

int unlinkat(int dirfd, const char *p, int flags) {
    ensure_init();
    if (!(flags & AT_REMOVEDIR)) forget_path(dirfd, p);
    return real_unlinkat(dirfd, p, flags);
}

int rename(const char *from, const char *to) {
    forget_path(AT_FDCWD, to);
    return real_rename(from, to);
}

int renameat(int fd1, const char *from, int fd2, const char *to) {
    forget_path(fd2, to);
    return real_renameat(fd1, from, fd2, to);
}

int renameat2(int fd1, const char *from, int fd2, const char *to, unsigned int flags) {
    if (!real_renameat2) {
        errno = ENOSYS;
        return -1;
    }
    forget_path(fd2, to);
    return real_renameat2(fd1, from, fd2, to, flags);
}
