/*
 * flood.c - the lab's control-plane flooder (tests/lab/test_control_flood.py, bench/flood).
 * Not part of the firmware: it sends, as fast as it can (or at --pps), UDP datagrams with
 * spoofed IPv4 sources to one or more address:port targets through a raw socket
 * (IP_HDRINCL) in batches of sendmmsg, and prints what it sent as one JSON line.
 *
 *   sdwan-flood --to IP:PORT [--to IP:PORT ...] --from CIDR [--kind hello|garbage|mix]
 *               [--seconds S] [--pps N] [--batch N] [--seed N]
 *
 * --from 198.18.0.0/15 draws a random source address (and port) per datagram; a /32 is a
 * single source. hello: a DTLS 1.2 ClientHello record without a cookie, a new random each
 * time (what a server answers with a HelloVerifyRequest); garbage: random bytes of random
 * length whose first byte is never the data packet type (208); mix: one of each in turn.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TO 8
#define MAX_BATCH 256
#define PKT_MAX 256

struct target {
    struct sockaddr_in sa;
};

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * UINT64_C(2685821657736338717);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_to(const char *s, struct target *t)
{
    char ip[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof(ip))
        return -1;
    memcpy(ip, s, (size_t)(colon - s));
    ip[colon - s] = 0;
    memset(t, 0, sizeof(*t));
    t->sa.sin_family = AF_INET;
    long port = strtol(colon + 1, NULL, 10);
    if (port < 1 || port > 65535 || inet_pton(AF_INET, ip, &t->sa.sin_addr) != 1)
        return -1;
    t->sa.sin_port = htons((uint16_t)port);
    return 0;
}

static int parse_cidr(const char *s, uint32_t *base, uint32_t *mask)
{
    char ip[64];
    int plen = 32;
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    if (n >= sizeof(ip))
        return -1;
    memcpy(ip, s, n);
    ip[n] = 0;
    if (slash)
        plen = atoi(slash + 1);
    struct in_addr a;
    if (plen < 8 || plen > 32 || inet_pton(AF_INET, ip, &a) != 1)
        return -1;
    *mask = plen == 32 ? 0xffffffffu : ~((1u << (32 - plen)) - 1);
    *base = ntohl(a.s_addr) & *mask;
    return 0;
}

/* A DTLS 1.2 ClientHello record without a cookie: 67 bytes at p. */
static size_t hello(uint8_t *p, uint64_t seq)
{
    static const uint8_t head[] = {
        22, 0xfe, 0xfd, 0, 0,           /* handshake, DTLS 1.2, epoch 0 */
        0, 0, 0, 0, 0, 0,               /* sequence (below) */
        0, 54,                          /* record length */
        1, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0, 42, /* client_hello, len, msg_seq, frag */
        0xfe, 0xfd,                     /* client_version */
    };
    memcpy(p, head, sizeof(head));
    for (int i = 0; i < 6; i++)
        p[5 + i] = (uint8_t)(seq >> (8 * (5 - i)));
    uint8_t *r = p + sizeof(head);
    for (int i = 0; i < 32; i += 8) {
        uint64_t v = rnd();
        memcpy(r + i, &v, 8);
    }
    static const uint8_t tail[] = {0, 0, 0, 2, 0xc0, 0x2f, 1, 0}; /* sid, cookie, suites, comp */
    memcpy(r + 32, tail, sizeof(tail));
    return sizeof(head) + 32 + sizeof(tail);
}

static size_t garbage(uint8_t *p)
{
    size_t len = 20 + rnd() % 180;
    for (size_t i = 0; i < len; i += 8) {
        uint64_t v = rnd();
        memcpy(p + i, &v, len - i < 8 ? len - i : 8);
    }
    if (p[0] == 208)
        p[0] = 1;
    return len;
}

static void usage(void)
{
    fprintf(stderr, "usage: sdwan-flood --to IP:PORT [--to ...] --from CIDR "
                    "[--kind hello|garbage|mix] [--seconds S] [--pps N] [--batch N] "
                    "[--seed N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    struct target to[MAX_TO];
    int nto = 0;
    uint32_t src_base = 0, src_mask = 0;
    int have_src = 0;
    const char *kind = "mix";
    double seconds = 5, pps = 0;
    int batch = 64;
    rng_state = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ 0x9e3779b97f4a7c15u;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--to")) {
            if (nto == MAX_TO || parse_to(v, &to[nto++]) < 0)
                usage();
        } else if (!strcmp(a, "--from")) {
            if (parse_cidr(v, &src_base, &src_mask) < 0)
                usage();
            have_src = 1;
        } else if (!strcmp(a, "--kind")) {
            kind = v;
        } else if (!strcmp(a, "--seconds")) {
            seconds = atof(v);
        } else if (!strcmp(a, "--pps")) {
            pps = atof(v);
        } else if (!strcmp(a, "--batch")) {
            batch = atoi(v);
        } else if (!strcmp(a, "--seed")) {
            rng_state = strtoull(v, NULL, 10) | 1;
        } else {
            usage();
        }
    }
    int mode = !strcmp(kind, "hello") ? 0 : !strcmp(kind, "garbage") ? 1 : 2;
    if (!nto || !have_src || seconds <= 0 || batch < 1 || batch > MAX_BATCH ||
        (mode == 2 && strcmp(kind, "mix")))
        usage();
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW); /* IPPROTO_RAW implies IP_HDRINCL */
    if (fd < 0) {
        perror("sdwan-flood: raw socket");
        return 1;
    }
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));

    static uint8_t bufs[MAX_BATCH][PKT_MAX];
    struct iovec iov[MAX_BATCH];
    struct mmsghdr msgs[MAX_BATCH];
    uint64_t sent = 0, errors = 0, seq = 0;
    double t0 = now_s(), end = t0 + seconds, t = t0;
    while (t < end) {
        for (int i = 0; i < batch; i++) {
            uint8_t *p = bufs[i];
            struct target *dst = &to[(sent + (uint64_t)i) % (uint64_t)nto];
            uint32_t src = src_base | ((uint32_t)rnd() & ~src_mask);
            uint16_t sport = (uint16_t)(1024 + rnd() % 64000);
            uint8_t *payload = p + 28;
            int m = mode == 2 ? (int)((seq + (uint64_t)i) & 1) : mode;
            size_t len = m == 0 ? hello(payload, seq + (uint64_t)i) : garbage(payload);
            /* IPv4 header: the kernel fills the total length, id and checksum. */
            memset(p, 0, 28);
            p[0] = 0x45;
            p[8] = 64;
            p[9] = IPPROTO_UDP;
            uint32_t s_be = htonl(src);
            memcpy(p + 12, &s_be, 4);
            memcpy(p + 16, &dst->sa.sin_addr, 4);
            /* UDP header, checksum 0 (none, allowed over IPv4). */
            uint16_t v = htons(sport);
            memcpy(p + 20, &v, 2);
            memcpy(p + 22, &dst->sa.sin_port, 2);
            v = htons((uint16_t)(8 + len));
            memcpy(p + 24, &v, 2);
            iov[i].iov_base = p;
            iov[i].iov_len = 28 + len;
            memset(&msgs[i], 0, sizeof(msgs[i]));
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &dst->sa;
            msgs[i].msg_hdr.msg_namelen = sizeof(dst->sa);
        }
        int n = sendmmsg(fd, msgs, (unsigned)batch, 0);
        if (n < 0) {
            errors++;
            if (errno != ENOBUFS && errno != EAGAIN && errno != EPERM) {
                perror("sdwan-flood: sendmmsg");
                return 1;
            }
        } else {
            sent += (uint64_t)n;
        }
        seq += (uint64_t)batch;
        t = now_s();
        if (pps > 0) {
            double due = t0 + (double)sent / pps;
            if (due > t) {
                struct timespec ts = {(time_t)(due - t), (long)((due - t - (time_t)(due - t)) * 1e9)};
                nanosleep(&ts, NULL);
                t = now_s();
            }
        }
    }
    double el = t - t0;
    printf("{\"sent\": %llu, \"errors\": %llu, \"seconds\": %.3f, \"pps\": %.0f}\n",
           (unsigned long long)sent, (unsigned long long)errors, el, el > 0 ? sent / el : 0.0);
    return 0;
}
