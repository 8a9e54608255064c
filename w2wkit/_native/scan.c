/*
 * The factors scan's per-file work without the interpreter (w2wkit/native.py).
 *
 * A reader thread of a scan hands a run of files to w2w_read_files (read each whole
 * into its slot of an aligned buffer and hash it), checks the headers itself, then
 * hands the rows to w2w_gather (check the alphas and that every value is finite, copy
 * the row out of the data section and add it to the column sums of the shifted rows
 * and of their squares, float64). w2w_stats adds a block of rows to such sums (the
 * rows the Python readers give). ctypes releases the GIL around each call, so the
 * threads' reads, hashes and copies overlap with no hand-over per file.
 *
 * Plain C99 and POSIX, no Python headers: the library is loaded with ctypes, never
 * imported. The SHA-256 is the one the process's hashlib uses (OpenSSL's SHA256,
 * passed in as a function pointer).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef unsigned char *(*sha256_fn)(const unsigned char *data, size_t n, unsigned char *md);

/* entries of a file's info row */
enum { INFO_GOT, INFO_SIZE, INFO_MTIME_NS, INFO_HELD, INFO_DIRECT, INFO_REFUSED, INFO_WIDTH };
/* flags of w2w_read_files */
enum { ASK_HELD = 1, DIRECT = 2 };

/* The interface's version (w2wkit/native.py loads only the one it was written for): bump
   it whenever a function's arguments or the info row change. */
int64_t w2w_abi(void) { return 1000 + INFO_WIDTH; }

#ifndef SYS_cachestat
#if defined(__x86_64__) || defined(__aarch64__) || defined(__riscv) || defined(__powerpc64__) || \
    defined(__s390x__)
#define SYS_cachestat 451
#endif
#endif

static int cachestat_works = 1;

/* 1 when every page of the file's first size bytes is in the page cache, 0 when not,
   -1 when the kernel cannot tell (cachestat refused and no mincore mapping) */
static int held_in_page_cache(int fd, int64_t size) {
    long page = sysconf(_SC_PAGESIZE);
    uint64_t pages = (uint64_t)((size + page - 1) / page);
    if (size <= 0) return 1;
#ifdef SYS_cachestat
    if (cachestat_works) {
        struct { uint64_t off, len; } range = {0, (uint64_t)size};
        struct { uint64_t cache, dirty, writeback, evicted, recently_evicted; } st;
        if (syscall(SYS_cachestat, fd, &range, &st, 0) == 0) return st.cache >= pages;
        if (errno == ENOSYS || errno == EPERM || errno == EOPNOTSUPP) cachestat_works = 0;
    }
#endif
    void *addr = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
    if (addr == MAP_FAILED) return -1;
    unsigned char vec[4096];
    int held = 1;
    for (uint64_t p = 0; p < pages && held == 1; p += sizeof vec) {
        uint64_t count = pages - p < sizeof vec ? pages - p : sizeof vec;
        if (mincore((char *)addr + p * page, (size_t)(count * page), vec) != 0) {
            held = -1;
            break;
        }
        for (uint64_t j = 0; j < count; j++)
            if (!(vec[j] & 1)) {
                held = 0;
                break;
            }
    }
    munmap(addr, (size_t)size);
    return held;
}

/* Read from fd at offset 0 until buf (span bytes, a multiple of the page size) is full or
   the file ends. A read that stops short of a page boundary has met the end of the file:
   no read follows it (an O_DIRECT read at such an offset may be refused). */
static int64_t read_whole(int fd, unsigned char *buf, int64_t span) {
    const int64_t page = (int64_t)sysconf(_SC_PAGESIZE);
    int64_t got = 0;
    while (got < span) {
        ssize_t r = pread(fd, buf + got, (size_t)(span - got), got);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) break;
        got += r;
        if (got % page) break;
    }
    return got;
}

/*
 * Read and hash the m files paths[k] into buf + k * span (span a multiple of the page
 * size, buf page-aligned). info[k * INFO_WIDTH + ...]:
 *   INFO_GOT       bytes read (the file's size when below span), or -errno; a file that
 *                  is not a regular file gives -EINVAL; a file of span bytes or more is
 *                  read to span and not hashed (the caller reads it another way)
 *   INFO_SIZE, INFO_MTIME_NS   its fstat
 *   INFO_HELD      1 / 0: the page cache held it whole or not, -1 unknown (ASK_HELD)
 *   INFO_DIRECT    1: read with O_DIRECT (DIRECT, and the page cache did not hold it)
 *   INFO_REFUSED   1: the file system refused O_DIRECT (the read went through the cache)
 * digests[k * 32 ...] the SHA-256 of the bytes read. Returns m.
 */
int64_t w2w_read_files(const char *const *paths, int64_t m, unsigned char *buf, int64_t span,
                       unsigned char *digests, int64_t *info, int64_t flags, sha256_fn sha) {
    for (int64_t k = 0; k < m; k++) {
        int64_t *row = info + k * INFO_WIDTH;
        unsigned char *dst = buf + k * span;
        memset(row, 0, sizeof(int64_t) * INFO_WIDTH);
        row[INFO_HELD] = -1;
        int fd = open(paths[k], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            row[INFO_GOT] = -errno;
            continue;
        }
        struct stat st;
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            row[INFO_GOT] = -EINVAL;
            close(fd);
            continue;
        }
        row[INFO_SIZE] = (int64_t)st.st_size;
        row[INFO_MTIME_NS] = (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
        if (flags & (ASK_HELD | DIRECT)) row[INFO_HELD] = held_in_page_cache(fd, st.st_size);
        if ((flags & DIRECT) && row[INFO_HELD] == 0 && st.st_size < span) {
            int fl = fcntl(fd, F_GETFL);
            if (fl != -1 && fcntl(fd, F_SETFL, fl | O_DIRECT) == 0) row[INFO_DIRECT] = 1;
            else row[INFO_REFUSED] = 1;
        }
        int64_t got = read_whole(fd, dst, span);
        if (got == -EINVAL && row[INFO_DIRECT]) { /* refused at the read: buffered */
            int fl = fcntl(fd, F_GETFL);
            if (fl != -1) fcntl(fd, F_SETFL, fl & ~O_DIRECT);
            row[INFO_DIRECT] = 0;
            row[INFO_REFUSED] = 1;
            got = read_whole(fd, dst, span);
        }
        close(fd);
        row[INFO_GOT] = got;
        if (got >= 0 && got < span) sha(dst, (size_t)got, digests + 32 * k);
    }
    return m;
}

/* 1 when the n float32 at p (any alignment) are all finite */
static int all_finite(const unsigned char *p, int64_t n) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits;
        memcpy(&bits, p + 4 * j, 4);
        bad |= (bits & 0x7f800000u) == 0x7f800000u; /* every exponent bit: inf or NaN */
    }
    return !bad;
}

/* dst[j] = x[j] (unless dst is NULL), t1[j] += x[j] - s[j], t2[j] += (x[j] - s[j])^2 for
   the n float32 x at src (any alignment); -O3 unswitches the loop on dst */
static inline void copy_and_sum(const unsigned char *src, int64_t n, float *restrict dst,
                                const double *restrict s, double *restrict t1,
                                double *restrict t2) {
    for (int64_t j = 0; j < n; j++) {
        float v;
        memcpy(&v, src + 4 * j, 4);
        if (dst) dst[j] = v;
        double t = (double)v - s[j];
        t1[j] += t;
        t2[j] += t * t;
    }
}

/*
 * Copy the rows of the m files whose ok[k] is set out of their data sections
 * (buf + k * span + start[k]) into out + k * d: out[a:b] = data[c : c + b - a] for
 * each run (a, b, c) of runs (3 * nruns int64). ok[k] is cleared first for a file
 * whose float32 at data[alpha_index[i]] is not alpha_value[i] (as == compares them)
 * or whose row holds a value that is not finite. out NULL: the rows are checked (and
 * summed) but not copied anywhere. With shift (else NULL) each row
 * copied is added to total[j] += x[j] - shift[j] and total_sq[j] += (...)^2 (float64,
 * as w2w_stats adds a block) in the same loop: the row is read from the file's bytes
 * once (per row, sums updated as it goes: 52 us a row of 99,648 here, against 79-84
 * for a copy and then a pass over the block, 80 for the two a stretch of every row at
 * a time). Returns the files still ok.
 */
int64_t w2w_gather(const unsigned char *buf, int64_t span, const int64_t *start, int64_t m,
                   const int64_t *runs, int64_t nruns, const int64_t *alpha_index,
                   const float *alpha_value, int64_t nalpha, float *out, int64_t d,
                   unsigned char *ok, const double *shift, double *total, double *total_sq) {
    int64_t kept = 0;
    for (int64_t k = 0; k < m; k++) {
        if (!ok[k]) continue;
        const unsigned char *data = buf + k * span + start[k];
        int same = 1;
        for (int64_t i = 0; i < nalpha && same; i++) {
            float v;
            memcpy(&v, data + 4 * alpha_index[i], 4);
            same = v == alpha_value[i];
        }
        for (int64_t r = 0; r < nruns && same; r++) {
            const int64_t *run = runs + 3 * r;
            same = all_finite(data + 4 * run[2], run[1] - run[0]);
        }
        ok[k] = (unsigned char)same;
        if (!same) continue;
        kept++;
        for (int64_t r = 0; r < nruns; r++) {
            const int64_t a = runs[3 * r], n = runs[3 * r + 1] - a;
            const unsigned char *src = data + 4 * runs[3 * r + 2];
            float *dst = out ? out + k * d + a : NULL;
            if (!shift) {
                if (dst) memcpy(dst, src, (size_t)(4 * n));
            } else {
                copy_and_sum(src, n, dst, shift + a, total + a, total_sq + a);
            }
        }
    }
    return kept;
}

/*
 * Add the rows of block (rows x d float32, C order) to the column sums of the shifted
 * rows and of their squares: total[j] += x[i, j] - shift[j], total_sq[j] += (...)^2,
 * in float64, a stretch of columns at a time (the stretch of the sums stays in cache
 * over the rows).
 */
void w2w_stats(const float *block, int64_t rows, int64_t d, const double *shift, double *total,
               double *total_sq) {
    const int64_t stretch = 1024;
    for (int64_t lo = 0; lo < d; lo += stretch) {
        int64_t hi = lo + stretch < d ? lo + stretch : d;
        for (int64_t i = 0; i < rows; i++) {
            const float *x = block + i * d;
            for (int64_t j = lo; j < hi; j++) {
                double t = (double)x[j] - shift[j];
                total[j] += t;
                total_sq[j] += t * t;
            }
        }
    }
}
