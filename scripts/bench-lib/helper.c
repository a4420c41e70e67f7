/*
 * Small timing helper for scripts/bench (compiled by the script with gcc).
 *
 *   helper seqwrite FILE MIB
 *       Creates/truncates FILE, writes MIB blocks of 1 MiB (pseudo-random,
 *       each block stamped with its index), fsync()s, closes.  The clock runs
 *       from open() to the return of close(), so the fsync is included.
 *       Prints JSON: {"bytes":..,"seconds":..,"mib_s":..}
 *
 *   helper meta DIR N
 *       mkdir DIR, then times four phases, each over all N names
 *       ("f00000".. relative to an fd on DIR):
 *         create  openat(O_CREAT|O_EXCL|O_WRONLY, 0644) + close
 *         stat    fstatat()
 *         readdir open DIR, readdir() until the end (count checked), close
 *         unlink  unlinkat()
 *       then rmdir DIR.  Prints JSON with the seconds of each phase.
 *
 *   helper stall FILE STOPFILE
 *       Creates/truncates FILE and pwrite()s 64-byte records into its first
 *       64 KiB in a loop until STOPFILE exists (checked every 64 writes).
 *       Prints JSON: the number of writes, the largest gap between two
 *       consecutive write() completions, and every gap over 2 ms as
 *       [end, seconds] with `end` on CLOCK_MONOTONIC (Python's
 *       time.monotonic()), so the caller can tell which gaps fell in which
 *       interval.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what, const char *arg) {
    fprintf(stderr, "helper: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(1);
}

static int seqwrite(const char *path, long mib) {
    const size_t bs = 1 << 20;
    uint64_t *buf = aligned_alloc(4096, bs);
    if (!buf) die("alloc", NULL);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < bs / 8; i++) { /* xorshift64: incompressible */
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        buf[i] = x;
    }
    double t0 = now();
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("open", path);
    for (long b = 0; b < mib; b++) {
        buf[0] = (uint64_t)b; /* no two blocks identical */
        size_t off = 0;
        while (off < bs) {
            ssize_t n = write(fd, (char *)buf + off, bs - off);
            if (n < 0) { if (errno == EINTR) continue; die("write", path); }
            off += (size_t)n;
        }
    }
    if (fsync(fd) != 0) die("fsync", path);
    if (close(fd) != 0) die("close", path);
    double dt = now() - t0;
    printf("{\"bytes\": %ld, \"seconds\": %.6f, \"mib_s\": %.3f}\n",
           mib * (long)bs, dt, (double)mib / dt);
    return 0;
}

static int meta(const char *dir, long n) {
    char name[32];
    struct stat st;
    if (mkdir(dir, 0755) != 0) die("mkdir", dir);
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd < 0) die("open", dir);

    double t0 = now();
    for (long i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05ld", i);
        int fd = openat(dfd, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
        if (fd < 0) die("create", name);
        if (close(fd) != 0) die("close", name);
    }
    double t1 = now();
    for (long i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05ld", i);
        if (fstatat(dfd, name, &st, 0) != 0) die("stat", name);
        if (!S_ISREG(st.st_mode)) { errno = EINVAL; die("stat: not a regular file", name); }
    }
    double t2 = now();
    int lfd = openat(dfd, ".", O_RDONLY | O_DIRECTORY);
    if (lfd < 0) die("opendir", dir);
    DIR *d = fdopendir(lfd);
    if (!d) die("fdopendir", dir);
    long count = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) count++;
    }
    if (errno != 0) die("readdir", dir);
    closedir(d);
    double t3 = now();
    if (count != n) {
        fprintf(stderr, "helper: readdir of %s returned %ld entries, expected %ld\n", dir, count, n);
        return 1;
    }
    for (long i = 0; i < n; i++) {
        snprintf(name, sizeof name, "f%05ld", i);
        if (unlinkat(dfd, name, 0) != 0) die("unlink", name);
    }
    double t4 = now();
    close(dfd);
    if (rmdir(dir) != 0) die("rmdir", dir);
    printf("{\"files\": %ld, \"create_s\": %.6f, \"stat_s\": %.6f, \"readdir_s\": %.6f, "
           "\"unlink_s\": %.6f}\n", n, t1 - t0, t2 - t1, t3 - t2, t4 - t3);
    return 0;
}

static int stall(const char *path, const char *stopfile) {
    char rec[64];
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) die("open", path);
    size_t cap = 4096, ngaps = 0;
    double *gaps = malloc(cap * 2 * sizeof(double));
    if (!gaps) die("alloc", NULL);
    long writes = 0;
    double max_gap = 0, last = now();
    for (;;) {
        if (writes % 64 == 0 && access(stopfile, F_OK) == 0) break;
        memset(rec, 'a' + (int)(writes % 26), sizeof rec);
        if (pwrite(fd, rec, sizeof rec, (off_t)(writes % 1024) * 64) != (ssize_t)sizeof rec)
            die("pwrite", path);
        double t = now(), gap = t - last;
        last = t;
        writes++;
        if (gap > max_gap) max_gap = gap;
        if (gap > 0.002) {
            if (ngaps == cap) {
                cap *= 2;
                gaps = realloc(gaps, cap * 2 * sizeof(double));
                if (!gaps) die("alloc", NULL);
            }
            gaps[2 * ngaps] = t;
            gaps[2 * ngaps + 1] = gap;
            ngaps++;
        }
    }
    if (close(fd) != 0) die("close", path);
    printf("{\"writes\": %ld, \"max_gap_s\": %.6f, \"gaps\": [", writes, max_gap);
    for (size_t i = 0; i < ngaps; i++)
        printf("%s[%.6f, %.6f]", i ? ", " : "", gaps[2 * i], gaps[2 * i + 1]);
    printf("]}\n");
    free(gaps);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "seqwrite") == 0) return seqwrite(argv[2], atol(argv[3]));
    if (argc == 4 && strcmp(argv[1], "meta") == 0) return meta(argv[2], atol(argv[3]));
    if (argc == 4 && strcmp(argv[1], "stall") == 0) return stall(argv[2], argv[3]);
    fprintf(stderr, "usage: helper seqwrite FILE MIB | helper meta DIR N | helper stall FILE STOPFILE\n");
    return 2;
}
