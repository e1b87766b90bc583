/*
 * fp_internal.h - private state of the fast path, shared by its .c files.
 *
 * Locking, from outermost to innermost:
 *   api_lock   serialises the control-plane calls that start/stop threads
 *              (start, stop, tun_*, link_*, threads_restart, test_thread_fail;
 *              threads_status reads the links under it), so a thread is never
 *              spawned or joined twice.
 *   tun_rd_lock  the right to read the TUN, with the reader's buffers
 *              (tun_rx): held by the TUN thread for a drain, or taken with
 *              trylock by a link thread that just wrote to the TUN, so
 *              whatever the kernel answered during that write leaves at once
 *              instead of after waking the TUN thread. One reader at a time
 *              keeps a flow's packets in order.
 *   lock       rwlock over every table (peers, peer groups, key index, routes,
 *              links, the transport rules, the allowed sources).
 *              Packet processing holds it shared for a whole batch; table
 *              changes from Python hold it exclusive. It prefers writers so
 *              a busy data path cannot starve a route change.
 *   l->rx_lock the right to receive on a link, with its buffers: held by
 *              the link's thread, or taken with trylock by the TUN thread
 *              that waits for the answer to a packet it just sent (tun_spin).
 *   key->tx_lock / key->rx_lock   one EVP context per key and direction is
 *              not safe for concurrent use; rx_lock also covers the replay
 *              window so "check, open, update" is atomic.
 *   peer->ep_lock  the endpoints and link policy, written by roaming from any
 *              link thread and by Python under the shared lock.
 *   sync_fc_lock  the flow cache of the synchronous fp_process_outbound.
 *   cq.lock    the control queue.
 */
#ifndef FP_INTERNAL_H
#define FP_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>

#include <openssl/evp.h>

#include "fastpath.h"

#define FP_MAX_LINKS 32
/* Ring of twice the window so that bits of a block being recycled are never
 * inside the window (RFC 6479 keeps one spare block; we keep a spare half). */
#define FP_REPLAY_BLOCKS (2 * FP_REPLAY_WINDOW / 64)
#define FP_INDEX_BUCKETS 4096
#define FP_PEER_BUCKETS 1024
#define FP_BATCH_MAX 1024
/* WireGuard's REJECT_AFTER_MESSAGES: far enough from 2^64 that counters taken
 * past the limit by concurrent senders can never wrap. */
#define FP_REJECT_PACKETS_MAX (UINT64_MAX - (UINT64_C(1) << 13))
/* Room for the largest packet we accept, and one byte more to see oversize. */
#define FP_BUF_LEN (FP_HEADER_LEN + FP_MAX_INNER + FP_TAG_LEN + 64)

struct fp_ctr {
    _Atomic uint64_t rx_packets;
    _Atomic uint64_t rx_bytes;
    _Atomic uint64_t tx_packets;
    _Atomic uint64_t tx_bytes;
    _Atomic uint64_t drops[FP_DROP__COUNT];
    _Atomic uint64_t last_rx_ns;
    _Atomic uint64_t last_tx_ns;
};

struct fp_replay {
    uint64_t last;                      /* highest counter accepted */
    uint64_t bitmap[FP_REPLAY_BLOCKS];
};

struct fp_peer;

struct fp_key {
    struct fp_key *index_next;          /* chain in fp->index */
    struct fp_peer *peer;
    uint32_t local_index;
    uint32_t remote_index;
    uint64_t created_ns;
    /* The ages at which this key asks for a rekey and is refused, in seconds (0: the
     * fp_config's): the peer's fp_peer_set_key_lifetime when installed, later only
     * lengthened unless it is the peer's newest key. */
    _Atomic uint32_t rekey_after_s;
    _Atomic uint32_t reject_after_s;
    _Atomic uint64_t tx_counter;
    atomic_int rekey_sent;
    atomic_int expired_sent;
    pthread_mutex_t tx_lock;
    pthread_mutex_t rx_lock;
    EVP_CIPHER_CTX *tx_ctx;
    EVP_CIPHER_CTX *rx_ctx;
    struct fp_replay replay;            /* under rx_lock */
};

/* One endpoint of a peer (one per link). Slots never move, so a slot index
 * taken under ep_lock stays meaningful; the counters are plain, under ep_lock,
 * which every packet takes anyway. */
struct fp_peer_ep {
    bool used;
    uint32_t link_id;
    uint64_t seq;                       /* when fp_peer_set_endpoint last set it */
    struct fp_addr addr;                /* unused address bytes are zero */
    uint64_t rx_packets, rx_bytes, tx_packets, tx_bytes;
    /* The idle-keepalive pass (fp_liveness_scan): tx_packets when it last looked, and
     * since when nothing more went out over this endpoint. */
    uint64_t ka_mark;
    uint64_t ka_idle_ns;
};

/* A link the weighted policy may pick, derived from policy and endpoints. */
struct fp_cand {
    int slot;
    uint64_t salt;                      /* hash of the link id, mixed into the flow hash */
    double inv_weight;
};

struct fp_peer {
    struct fp_peer *next;               /* chain in fp->peers */
    uint32_t id;
    struct fp_key *slot[2];
    int tx_slot;                        /* -1: no transmit key */
    pthread_mutex_t ep_lock;            /* everything from here to ctr */
    struct fp_peer_ep ep[FP_PEER_ENDPOINTS];
    uint64_t ep_seq;
    uint32_t npol;                      /* 0: default policy */
    struct fp_link_weight pol[FP_PEER_ENDPOINTS];
    uint64_t rx_unlisted;
    /* Derived by fp_peer_choice_update whenever endpoints or policy change, so
     * a packet only indexes (or, per flow, hashes over ncand links). */
    int primary;                        /* slot of the primary endpoint, -1: none */
    int ncand;                          /* 0, or >= 2: choose per flow among cand */
    bool equal_weights;
    struct fp_cand cand[FP_PEER_ENDPOINTS];
    uint32_t mtu;                       /* fp_peer_set_mtu, 0: none */
    /* Derived from mtu and the endpoints' families; read by every packet
     * without ep_lock. 0: no limit but the TUN's. */
    _Atomic uint32_t inner_mtu;
    /* primary >= 0, for the same readers: a group passes over a member without one. */
    _Atomic bool has_endpoint;
    struct fp_ctr ctr;
    /* Liveness under traffic (fp_liveness_scan): when the first data packet
     * sealed since the peer's last authenticated packet was sealed, and when
     * the first data packet received since we last sent to the peer arrived;
     * 0: none. Written on the packet paths only when they change. */
    _Atomic uint64_t unanswered_ns;
    _Atomic uint64_t owed_ns;
    _Atomic uint64_t keepalive_ns;      /* fp_peer_set_keepalive, 0: none */
    /* fp_peer_set_key_lifetime: the ages agreed with this peer, in seconds; 0: the
     * fp_config's. Copied into every key installed for it (struct fp_key). */
    _Atomic uint32_t rekey_after_s;
    _Atomic uint32_t reject_after_s;
    /* fp_peer_set_source_owner (under fp->lock exclusive): whose sources the peer may
     * send, FP_SOURCE_ANY, or 0: not checked. */
    uint32_t source_owner;
    /* Not NULL: this entry is a peer group (groups.c), never sealed for itself; it has no
     * keys nor endpoints, and routes name it as they name a peer. */
    struct fp_group *group;
};

/* A peer group's members (groups.c), changed only under fp->lock exclusive, so a packet
 * holding it shared reads them as they are. */
struct fp_gmember {
    struct fp_peer *peer;
    uint32_t weight;
    uint64_t salt;                      /* hash of the member's id, mixed into the flow hash */
    double inv_weight;
    _Atomic uint64_t packets;           /* handed to it by the group */
};

struct fp_group {
    struct fp_group *next;              /* in fp->groups */
    uint32_t n;
    bool equal_weights;
    struct fp_gmember m[FP_GROUP_MEMBERS];
};

struct fp_route {
    struct fp_route *next;
    uint8_t plen;
    uint8_t addr[16];                   /* masked; IPv4 in the first 4 bytes */
    struct fp_peer *peer;
    /* For the transport rules (rules.c): the off-cloud and the cloud path, NULL: none.
     * fp_peer_del clears them where they name the peer it deletes. */
    struct fp_peer *offcloud;
    struct fp_peer *cloud;
    uint32_t flags;                     /* FP_ROUTE_* of the fp_route_op that set it */
    /* In the source table (sources.c) instead: the site that owns the prefix. */
    uint32_t owner;
};

/* The flow of an inner packet as the transport rules see it (fp_flow_parse). Every byte is
 * set (unused address bytes and ports zero), so a key compares with memcmp. */
#define FP_FLOW_PORTS_UNKNOWN 1         /* ports not in the packet (a later fragment, cut short) */
#define FP_FLOW_PROTO_UNKNOWN 2         /* upper-layer protocol not found (IPv6 header chain) */
#define FP_FLOW_MAX_EXT 8               /* IPv6 extension headers walked at most */
struct fp_flow {
    uint8_t family;                     /* 4 or 6 */
    uint8_t proto;                      /* IPv4 protocol, IPv6 next header */
    uint8_t has_ports;                  /* TCP or UDP, ports in the packet */
    uint8_t unknown;                    /* FP_FLOW_*_UNKNOWN: fields a rule takes as matching */
    uint16_t sport;
    uint16_t dport;
    uint8_t src[16];
    uint8_t dst[16];
};

/* The transport rules as fp_rules_set installed them (rules.c); replaced whole, never
 * changed in place, under fp->lock exclusive. */
struct fp_rule_c {
    uint64_t key;
    uint8_t transport;
    uint8_t secondary;
    uint16_t proto;                     /* FP_RULE_PROTO_ANY or a protocol number */
    uint32_t src_first, src_n, dst_first, dst_n, ports_first, ports_n;
};

struct fp_rules {
    uint64_t gen;                       /* never 0; flow cache entries of another are stale */
    uint32_t n;
    struct fp_rule_c *rules;
    struct fp_rule_net *nets;
    struct fp_rule_ports *ports;
    _Atomic uint64_t *hits;             /* per rule, packets */
};

/* A flow cache: 5-tuple -> index of the first matching rule (-1: none), valid while its
 * generation is the table's. Direct-mapped; one per TUN reader (struct fp_tun_rx, under
 * tun_rd_lock) and one for the synchronous fp_process_outbound (under sync_fc_lock). It
 * holds rule indices, never peers: the route's peers are read per packet, so route changes
 * need no invalidation. */
#define FP_FLOWCACHE_SLOTS 1024
struct fp_flowcache_slot {
    uint64_t gen;
    struct fp_flow key;
    int32_t rule;
};
struct fp_flowcache {
    struct fp_flowcache_slot slot[FP_FLOWCACHE_SLOTS];
};

struct fp_rtable {
    int alen;                           /* 4 or 16 */
    struct fp_route **buckets;
    uint32_t nbuckets;                  /* power of two */
    uint32_t count;
    uint32_t plen_count[129];
    uint8_t plens[129];                 /* lengths present, longest first */
    int nplens;
};

/* A data-path thread's health (threads.c, fastpath.h "fp_threads_status"): written by the
 * thread when it leaves its loop and by whoever starts it (under api_lock), read without
 * locks. */
struct fp_thr {
    _Atomic int state;                  /* enum fp_thread_state */
    _Atomic int err;
    _Atomic uint32_t where;
    _Atomic uint64_t died_ns;
    _Atomic uint64_t deaths;
    _Atomic uint64_t restarts;
    _Atomic int inject;                 /* fp_test_thread_fail: die with it at the next wake */
    _Atomic int start_err;              /* fp_test_thread_start_fail: the next start fails */
};

struct fp_link {
    struct fp *fp;
    uint32_t id;
    int fd;
    int family;                         /* AF_INET or AF_INET6 of the socket */
    int wake_fd;                        /* eventfd: wakes its thread (link_del, an injection);
                                           drained whenever a thread is started on it */
    atomic_bool deleting;               /* set by link_del before it wakes the thread: the
                                           only wake-up that means "stop" */
    pthread_t thread;
    bool thread_running;                /* started and not joined yet (it may have died) */
    struct fp_thr thr;
    bool gro;                           /* UDP_GRO is on: datagrams arrive coalesced */
    atomic_bool no_gso;                 /* UDP_SEGMENT failed once: send one by one */
    pthread_mutex_t rx_lock;            /* the right to receive on fd, with rx */
    struct fp_link_rx *rx;              /* io.c: the receive buffers */
    struct fp_ctr ctr;
};

struct fp_tun_rx;                       /* io.c: the TUN reader's buffers */
struct fp_link_rx;

struct fp_ctrl_lane {
    struct fp_ctrl_msg *ring;
    uint32_t cap;
    uint32_t head;
    uint32_t count;
    uint64_t queued;                    /* pushed, ever */
};

/* A source IP's datagrams waiting in the known lane (ctrlq.c), in an open-addressing table
 * of twice the lane's size or more (it holds at most one entry per datagram queued). */
struct fp_ctrlq_share {
    uint8_t family;                     /* 0: free */
    uint8_t ip[16];
    uint32_t count;
};

struct fp_ctrlq {
    pthread_mutex_t lock;               /* both lanes and total */
    struct fp_ctrl_lane lane[FP_LANES];
    uint32_t total;                     /* in both lanes: the eventfd is readable while > 0 */
    int efd;
    uint64_t seed;                      /* of the share's hash, random */
    uint32_t share_max;                 /* datagrams of one source IP in the known lane */
    struct fp_ctrlq_share *share;
    uint32_t share_mask;
};

/* ctrlgate.c: which lane a control datagram takes. A token bucket, in thousandths of a
 * datagram. */
struct fp_bucket {
    uint64_t milli;
    uint64_t at_ns;                     /* when it was last refilled */
};

struct fp_srcb {                        /* an unknown source IP's bucket */
    uint8_t family;                     /* 0: free */
    uint8_t ip[16];
    uint64_t seen_ns;                   /* its last datagram: the oldest is evicted */
    struct fp_bucket b;
};

struct fp_ctrlgate {
    pthread_mutex_t lock;               /* everything here */
    uint64_t seed;                      /* of the hashes, random: no chosen collisions */
    struct fp_addr *declared;           /* fp_ctrl_known_set */
    uint32_t ndeclared;
    bool stale;                         /* declared changed since the known set was built */
    uint64_t ep_gen;                    /* fp->ep_gen the known set was built at */
    struct fp_addr *known;              /* open addressing, family 0: free; NULL: none */
    uint32_t known_mask;
    uint32_t nknown;
    bool has_wildcard;                  /* some declared address has port 0 */
    struct fp_srcb *src;                /* ctrl_sources buckets, open addressing */
    uint32_t src_mask;
    uint32_t nsrc;
    struct fp_bucket all;               /* every unknown source together */
    uint64_t evictions, limited_source, limited_global;
    _Atomic uint64_t known_full, unknown_full; /* counted without the lock */
};

struct fp {
    struct fp_config cfg;
    pthread_mutex_t api_lock;
    pthread_rwlock_t lock;
    struct fp_peer *peers[FP_PEER_BUCKETS];
    struct fp_group *groups;            /* every group, also among the peers */
    struct fp_key *index[FP_INDEX_BUCKETS];
    struct fp_rtable rt4;
    struct fp_rtable rt6;
    struct fp_rtable src4;              /* allowed sources (sources.c), apart from routes */
    struct fp_rtable src6;
    struct fp_link *links[FP_MAX_LINKS];
    int nlinks;
    _Atomic int tun_fd;                 /* -1 until tun_open/tun_attach */
    int tun_features;                   /* FP_TUN_F_*: set with tun_fd */
    pthread_t tun_thread;
    bool tun_thread_running;            /* started and not joined yet (it may have died) */
    struct fp_thr tun_thr;
    int tun_wake_fd;                    /* eventfd: fp_test_thread_fail wakes the TUN thread */
    _Atomic uint64_t thread_deaths;     /* fp_threads_deaths */
    pthread_mutex_t tun_rd_lock;
    struct fp_tun_rx *tun_rx;           /* under tun_rd_lock; NULL without a TUN thread */
    int stop_fd;                        /* eventfd: fp_stop wakes every thread */
    bool running;
    struct fp_ctrlq cq;
    struct fp_ctrlgate gate;
    struct fp_ctr gctr;
    _Atomic uint64_t spins;             /* fp_spin_stats */
    _Atomic uint64_t spin_hits;
    _Atomic uint64_t spin_ns;
    _Atomic uint64_t ep_gen;            /* fp_endpoints_gen */
    /* fp_liveness_scan's shortcut: live_gen counts the peers' owed/unanswered clocks
     * starting (rare: once per burst, not per packet); the scan walks the peers only
     * when one may be running or idle keepalives are due. */
    _Atomic uint64_t live_gen;
    _Atomic uint64_t scan_gen;          /* live_gen when the last full pass began */
    _Atomic bool scan_pending;          /* ... and whether it found a clock running */
    _Atomic uint64_t scan_keepalive_ns; /* when the next keepalive pass is due */
    /* fp_liveness_wake_fd: written when a clock starts after a scan found none running, so
     * a supervisor that ticks slowly while nothing runs is woken; once until a scan again
     * finds none running (live_wake_sent). */
    int live_wake_fd;
    _Atomic bool live_wake_sent;
    /* Transport rules (rules.c): the table (NULL: none) under fp->lock, the last generation
     * given out, flows looked up in the table, the synchronous callers' flow cache. */
    struct fp_rules *rules;
    uint64_t rules_gen;
    _Atomic uint64_t rule_evals;
    pthread_mutex_t sync_fc_lock;
    struct fp_flowcache *sync_fc;
};

static inline uint64_t fp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void fp_ctr_add(_Atomic uint64_t *c, uint64_t v)
{
    atomic_fetch_add_explicit(c, v, memory_order_relaxed);
}

/* Some peer's endpoints changed (fp_endpoints_gen). */
static inline void fp_ep_changed(struct fp *fp)
{
    atomic_fetch_add_explicit(&fp->ep_gen, 1, memory_order_relaxed);
}

static inline void fp_ctr_set(_Atomic uint64_t *c, uint64_t v)
{
    atomic_store_explicit(c, v, memory_order_relaxed);
}

void fp_ctr_snapshot(const struct fp_ctr *c, struct fp_counters *out);

/* aead.c */
EVP_CIPHER_CTX *fp_aead_new(const uint8_t *key, int encrypt);
int fp_aead_seal(EVP_CIPHER_CTX *ctx, const uint8_t *iv, const uint8_t *aad, size_t aad_len,
                 const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag);
int fp_aead_open(EVP_CIPHER_CTX *ctx, const uint8_t *iv, const uint8_t *aad, size_t aad_len,
                 const uint8_t *in, size_t len, const uint8_t *tag, uint8_t *out);
struct fp_key *fp_key_new(const uint8_t *tx_key, const uint8_t *rx_key, uint64_t now);
void fp_key_free(struct fp_key *k);

/* replay.c */
void fp_replay_init(struct fp_replay *r);
bool fp_replay_check(const struct fp_replay *r, uint64_t counter);
bool fp_replay_update(struct fp_replay *r, uint64_t counter);

/* packet.c */
void fp_hdr_write(uint8_t *h, uint32_t index, uint64_t counter);
int fp_hdr_parse(const uint8_t *p, size_t len, uint32_t *index, uint64_t *counter);
void fp_nonce(uint8_t iv[12], uint64_t counter);
/* A throw-away AES-256-GCM key pair that an idle thread runs through a seal and
 * an open, so the code and page-table entries of the AEAD path stay in this
 * core's caches (aead.c). Its key is random and never leaves the thread. */
struct fp_warm;
struct fp_warm *fp_warm_new(void);
void fp_warm_run(struct fp_warm *w);
void fp_warm_free(struct fp_warm *w);
/* The poll timeout for an idle thread whose last data was at last_data_ns: warm_ms
 * while warming is on and recent enough, else -1 (forever). */
int fp_warm_timeout(const struct fp *fp, const struct fp_warm *w, uint64_t last_data_ns);

int fp_ip_dst(const uint8_t *ip, size_t len, uint8_t addr[16]);
int fp_ip_src(const uint8_t *ip, size_t len, uint8_t addr[16]);
bool fp_addr_valid(const struct fp_addr *a);
void fp_addr_normalize(struct fp_addr *a);
bool fp_addr_equal(const struct fp_addr *a, const struct fp_addr *b);
int fp_addr_to_sockaddr(const struct fp_addr *a, int sock_family,
                        struct sockaddr_storage *ss, socklen_t *len);
void fp_addr_from_sockaddr(const struct sockaddr_storage *ss, struct fp_addr *a);

/* table.c (callers hold fp->lock) */
int fp_tables_init(struct fp *fp);
void fp_tables_free(struct fp *fp);
/* A peer or a peer group. */
struct fp_peer *fp_peer_find(struct fp *fp, uint32_t id);
/* A peer, not a group: for the calls that configure or read one peer's transport. NULL
 * with *rc -ENOENT (no such id) or -EINVAL (a group). */
struct fp_peer *fp_peer_find_plain(struct fp *fp, uint32_t id, int *rc);
/* A new entry for the peers' table, not linked in (NULL: no memory); fp_peer_insert links
 * it (the id is free: the caller checked, under fp->lock exclusive). */
struct fp_peer *fp_peer_new(uint32_t id);
void fp_peer_insert(struct fp *fp, struct fp_peer *p);
/* Unlink an entry from the peers' table and every route (fp->lock exclusive), and free it
 * with its keys or group. */
void fp_peer_remove(struct fp *fp, struct fp_peer *p);
struct fp_key *fp_index_find(struct fp *fp, uint32_t index);
struct fp_peer *fp_route_lookup(struct fp *fp, int family, const uint8_t *addr);
/* The longest-prefix route itself (its peer and the rules' peers), NULL for none. */
const struct fp_route *fp_route_find(struct fp *fp, int family, const uint8_t *addr);
struct fp_link *fp_link_find(struct fp *fp, uint32_t id);
/* table.c: the prefix tables as such, for the routes and the allowed sources. fp_rt_check
 * checks a prefix (a set: no host bits) and masks it into m; fp_rt_match is the longest
 * prefix match; fp_rt_get finds (m, plen) or links `fresh` in for it (the caller frees
 * fresh when another node is returned); fp_rt_unlink takes a node out (NULL: none). */
int fp_rt_init(struct fp_rtable *t, int alen);
void fp_rt_free(struct fp_rtable *t);
int fp_rt_check(const struct fp_addr *prefix, uint8_t plen, bool set, uint8_t m[16]);
const struct fp_route *fp_rt_match(const struct fp_rtable *t, const uint8_t *addr);
struct fp_route *fp_rt_get(struct fp_rtable *t, const uint8_t m[16], uint8_t plen,
                           struct fp_route *fresh);
struct fp_route *fp_rt_unlink(struct fp_rtable *t, const uint8_t m[16], uint8_t plen);
/* sources.c: may a peer whose source owner is `owner` (not 0) send this inner packet
 * (family: of its destination)? Callers hold fp->lock. */
bool fp_source_allowed(struct fp *fp, uint32_t owner, int family, const uint8_t *ip,
                       size_t len);

/* table.c: multi-link peers (callers hold p->ep_lock, and fp->lock) */
void fp_peer_choice_update(struct fp_peer *p);
/* The endpoint slot a packet (inner IP packet `ip`, len 0: no flow) goes to,
 * -1 for none. */
int fp_peer_choose(const struct fp_peer *p, const uint8_t *ip, size_t len);
/* Weighted rendezvous hashing, shared by a peer's links and a group's members: the score
 * of a candidate (its salt, 1 / weight) for a flow hash; the lowest wins. With equal
 * weights the highest fp_mix64(flow ^ salt) wins, the same choice without the logarithm. */
double fp_hrw_score(uint64_t flow, uint64_t salt, double inv_weight);
int fp_peer_ep_slot(const struct fp_peer *p, uint32_t link_id);
/* fp_link_del: drops the link's endpoints everywhere (fp->lock exclusive). */
void fp_peers_drop_link(struct fp *fp, uint32_t link_id);
/* packet.c: the flow of an inner IP packet (addresses, protocol, TCP/UDP ports
 * unless a fragment), for the per-flow choice of link. */
uint64_t fp_flow_hash(const uint8_t *ip, size_t len);
/* packet.c: the flow of an inner IP packet for the transport rules: IPv6 extension headers
 * walked, the first fragment's ports, unknown fields flagged; -1 if it is no IPv4/IPv6
 * packet. */
int fp_flow_parse(const uint8_t *ip, size_t len, struct fp_flow *f);
uint64_t fp_mix64(uint64_t x);

/* pmtu.c: path MTU. A probe's plaintext starts with FP_PROBE (an IP version
 * nibble of 1), then 3 zero bytes, the probe id (BE32) and padding; its ack is
 * FP_PROBE_ACK, 3 zero bytes, the id and the length of the probe datagram as
 * received (BE32): FP_PROBE_ACK_LEN bytes. */
#define FP_PROBE 0x10
#define FP_PROBE_ACK 0x11
#define FP_PROBE_HDR_LEN 8
#define FP_PROBE_ACK_LEN 12
/* The ICMP error for a packet too big for `mtu` (the inner MTU) into out (not
 * overlapping ip): its length, 0 when none is due, -1 if ip is no IP packet. */
int fp_icmp_too_big(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap);
bool fp_ip_df(const uint8_t *ip, size_t len);
/* Cut an IPv4 packet without DF into fragments of at most mtu bytes, fragment
 * i at out + i * stride + headroom (RFC 791: options with the copy flag
 * repeated); returns their number and lengths, or -errno. */
int fp_ip4_fragment(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap,
                    size_t headroom, size_t tailroom, uint32_t *lens, uint32_t max,
                    size_t *stride_out);
/* Most fragments one packet is cut into (FP_MAX_INNER at the smallest MTU). */
#define FP_FRAGS_MAX 24
/* A TCP segment with SYN (IPv4 first fragment, IPv6 without extension headers). */
bool fp_tcp_syn(const uint8_t *ip, size_t len);
/* Lower the MSS option of a TCP SYN to fit inner_mtu; true if it changed. */
bool fp_mss_clamp(uint8_t *ip, size_t len, uint32_t inner_mtu);

/* ctrlq.c */
int fp_ctrlq_init(struct fp_ctrlq *q, uint32_t known_cap, uint32_t unknown_cap);
void fp_ctrlq_free(struct fp_ctrlq *q);
int fp_ctrlq_push(struct fp_ctrlq *q, int lane, uint32_t event, uint32_t link_id,
                  uint32_t peer_id, const struct fp_addr *from, const uint8_t *data, size_t len);

/* ctrlgate.c. fp_ctrl_lane_for: the lane of a control datagram from `from` (NULL: no
 * address, as in synchronous use: known), or -1 when it is rate-limited (counted); the
 * caller holds fp->lock shared (the known set is rebuilt from the peers when they moved).
 * fp_ctrl_lane_full counts a datagram its lane had no room for. */
int fp_ctrlgate_init(struct fp_ctrlgate *g, const struct fp_config *cfg);
void fp_ctrlgate_free(struct fp_ctrlgate *g);
int fp_ctrl_lane_for(struct fp *fp, const struct fp_addr *from, uint64_t now);
void fp_ctrl_lane_full(struct fp *fp, int lane);

/* groups.c (callers hold fp->lock). fp_group_resolve: the member a packet routed to group
 * g goes to (counted on it), NULL when no member is usable. fp_group_has: whether p is one
 * of g's members. fp_groups_drop_peer: p leaves every group (exclusive, before it is
 * freed). */
struct fp_peer *fp_group_resolve(struct fp_peer *g, const uint8_t *ip, size_t len);
bool fp_group_has(const struct fp_peer *g, const struct fp_peer *p);
void fp_groups_drop_peer(struct fp *fp, struct fp_peer *p);

/* rules.c (callers hold fp->lock shared): the peer a packet from the TUN goes to by the
 * transport rules, given its route; NULL when a rule drops it. fc may be NULL (no cache). */
struct fp_peer *fp_rules_apply(struct fp *fp, struct fp_flowcache *fc, const struct fp_route *rt,
                               const uint8_t *ip, size_t len);
void fp_rules_free(struct fp_rules *r);

/* process.c (callers hold fp->lock shared; fc: the caller's flow cache, or NULL) */
int fp_outbound_locked(struct fp *fp, const uint8_t *ip, size_t len, uint8_t *out, size_t cap,
                       struct fp_result *res, uint64_t now, struct fp_flowcache *fc);
int fp_inbound_locked(struct fp *fp, struct fp_link *link, uint32_t link_id,
                      const struct fp_addr *from, const uint8_t *pkt, size_t len, uint8_t *out,
                      size_t cap, struct fp_result *res, uint64_t now);
int fp_seal_for_peer(struct fp *fp, struct fp_peer *peer, const uint8_t *in, size_t len,
                     uint8_t *out, size_t cap, struct fp_result *res, uint64_t now);
/* Seal for peer to a given link and address (a probe, a probe's ack), not by
 * its policy; counts on the peer, not on an endpoint. */
int fp_seal_to(struct fp *fp, struct fp_peer *peer, uint32_t link_id, const struct fp_addr *to,
               const uint8_t *in, size_t len, uint8_t *out, size_t cap, struct fp_result *res,
               uint64_t now);

/* offload.c: struct virtio_net_hdr as the TUN reads and writes it with
 * IFF_VNET_HDR (legacy layout, host byte order). */
#define FP_VNET_LEN 10
#define FP_VNET_F_NEEDS_CSUM 1
#define FP_VNET_GSO_NONE 0
#define FP_VNET_GSO_TCPV4 1
#define FP_VNET_GSO_TCPV6 4
#define FP_VNET_GSO_UDP_L4 5
#define FP_VNET_GSO_ECN 0x80
/* Largest superpacket the TUN hands over (IPv6: 40 + 64 KiB payload). */
#define FP_SUPER_MAX (65535 + 40)
/* Most datagrams one UDP GSO send carries (and packets one coalesced write). */
#define FP_GSO_SEGS_MAX 64
/* Most segments one superpacket may be cut into: 64 KiB at TCP's smallest
 * MSS (tcp_min_snd_mss, 48) is about 1400. */
#define FP_GSO_SPLIT_MAX 2048
/* Packets considered together for coalescing. */
#define FP_GRO_BATCH 256

struct fp_vnet {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
};

/* One plaintext packet bound for the TUN, as fp_gro_build sees it. */
struct fp_gro_pkt {
    uint8_t *p;
    uint32_t len;
    uint32_t next;          /* next packet of the same superpacket, or UINT32_MAX */
    uint16_t hlen;          /* IP + TCP header length, for appended packets */
    bool head;              /* written out: alone, or as the head of a superpacket */
    struct fp_vnet vnet;    /* the header to write it with (valid when head) */
};

void fp_vnet_parse(const uint8_t *b, struct fp_vnet *v);
void fp_vnet_write(uint8_t *b, const struct fp_vnet *v);
int fp_csum_complete(const struct fp_vnet *v, uint8_t *pkt, size_t len);
/* Cut a GSO superpacket into segments at out + i * stride + headroom; returns
 * their number and lengths, or -errno for anything malformed. */
int fp_gso_split(const struct fp_vnet *v, const uint8_t *pkt, size_t len, uint8_t *out,
                 size_t cap, size_t headroom, size_t tailroom, uint32_t *lens, uint32_t max_segs,
                 size_t *stride_out);
/* Group pk[0..n) into TCP (if tcp) and UDP (if udp) superpackets; rewrites
 * the headers of heads. */
void fp_gro_build(struct fp_gro_pkt *pk, uint32_t n, bool tcp, bool udp);

/* threads.c: a thread leaves its loop. Died: on an error (where, err), counted, and seen
 * by fp_threads_status until it is restarted; stopped: on request (stop, link_del, free). */
void fp_thr_died(struct fp *fp, struct fp_thr *t, uint32_t where, int err);
void fp_thr_stopped(struct fp_thr *t);
/* The thread is about to be started (api_lock held); returns the state it had. */
int fp_thr_starting(struct fp_thr *t);
/* The err fp_test_thread_fail left for the thread, 0 for none (taken: read once). */
int fp_thr_injected(struct fp_thr *t);
/* The errno fp_test_thread_start_fail left for the thread's next start, 0 for none (taken). */
int fp_thr_start_err(struct fp_thr *t);

/* io.c */
int fp_io_start_link(struct fp *fp, struct fp_link *l);
int fp_io_start_tun(struct fp *fp);
void fp_io_stop_all(struct fp *fp);
void fp_link_destroy(struct fp_link *l);
struct fp_link_rx *fp_link_rx_new(const struct fp *fp, bool gro);
void fp_link_rx_free(struct fp_link_rx *x);

#endif
