/*
 * fastpath.h - the one boundary between the supervisor (Python, through cffi)
 * and the C fast path.
 *
 * The fast path owns the TUN device and one UDP socket per WAN link, and in
 * threads of its own (no GIL) moves packets between them:
 *
 *   TUN -> prefix table -> peer (a group: a member per flow) -> link policy -> seal -> UDP
 *   UDP -> demux (data vs control) -> index -> open -> replay check -> TUN
 *                                                  \-> (relay) seal to another peer
 *
 * Everything that is not a data packet (DTLS records, STUN, probes) is queued
 * for Python (known sources in a lane of their own, unknown ones rate-limited per source), which waits on fp_ctrl_fd() and sends its own control packets
 * through fp_ctrl_send() so that they share the data socket's NAT mapping.
 *
 * Rules of this header (it is also the cffi cdef): plain structs and enums,
 * integer #defines only, no inline code. Functions return 0 (or a length) on
 * success and -errno on failure. Everything allocated by fp_new is released by
 * fp_free. The wire format is documented in docs/dataplane.md.
 */
#ifndef SDWAN_FASTPATH_H
#define SDWAN_FASTPATH_H

#include <stddef.h>
#include <stdint.h>

#define FP_KEY_LEN 32
#define FP_HEADER_LEN 16
#define FP_TAG_LEN 16
#define FP_OVERHEAD 32
#define FP_TYPE_DATA 208
#define FP_MAX_INNER 9216
#define FP_CTRL_MAX 4096
#define FP_REPLAY_WINDOW 4096

/* Why a packet was dropped; index into fp_counters.drops. */
enum fp_drop_reason {
    FP_DROP_MALFORMED = 0,     /* too short, too long, bad type or header */
    FP_DROP_UNKNOWN_INDEX = 1, /* receiver index names no key: unknown peer */
    FP_DROP_BAD_TAG = 2,       /* authentication failed */
    FP_DROP_REPLAY = 3,        /* counter seen before, or left of the window */
    FP_DROP_KEY_EXPIRED = 4,   /* key too old or too used: refused */
    FP_DROP_NO_ROUTE = 5,      /* no prefix matches the destination */
    FP_DROP_NO_KEY = 6,        /* peer has no transmit key yet */
    FP_DROP_NO_ENDPOINT = 7,   /* peer has no link/endpoint yet */
    FP_DROP_QUEUE_FULL = 8,    /* control queue full (the known sources' lane) */
    FP_DROP_SEND_ERROR = 9,    /* sendmsg/write failed */
    FP_DROP_SPOOFED = 10,      /* inner source does not route back to the sending peer
                                  (check_source), or is not among its allowed sources
                                  (fp_peer_set_source_owner) */
    FP_DROP_TOO_BIG = 11,      /* larger than the peer's path allows (answered with ICMP
                                  "fragmentation needed" / "packet too big" when due) */
    FP_DROP_OFFCLOUD_DOWN = 12, /* matched an off-cloud transport rule while the prefix has no
                                  off-cloud path up, and the rule's secondary allows nothing
                                  else (none; or cloud without a cloud path) */
    FP_DROP_NO_MEMBER = 13,    /* routed to a peer group none of whose members has a
                                  transmit key and an endpoint (or that has no members) */
    FP_DROP_CONGESTED = 14,    /* the link's socket buffer stayed full (a congested uplink)
                                  past the bounded wait for room */
    FP_DROP_CTRL_RATE_LIMITED = 15, /* a control datagram from an unknown source over its
                                  source's rate or all unknown sources' budget */
    FP_DROP_CTRL_UNKNOWN_FULL = 16, /* the unknown sources' control lane full */
    FP_DROP__COUNT = 17
};

/* What fp_process_* decided about one packet. */
enum fp_verdict {
    FP_V_DROP = 0,      /* dropped; the reason was counted */
    FP_V_SEND = 1,      /* out holds a wire packet for res.link_id / res.to */
    FP_V_TUN = 2,       /* out holds a plaintext IP packet for the TUN */
    FP_V_CONTROL = 3,   /* not a data packet: queued for Python */
    FP_V_KEEPALIVE = 4, /* authenticated empty packet: counted, nothing to deliver */
    FP_V_FRAGMENT = 5   /* IPv4 without DF too big for res.peer_id's path: out holds the
                           packet (out_len bytes), to be cut into fragments that fit and
                           sealed for that peer (the threads do; fp_test_ip4_fragment) */
};

/* Events on the control queue. */
enum fp_event {
    FP_EV_PACKET = 1,      /* a control datagram arrived on link_id from `from` */
    FP_EV_REKEY = 2,       /* peer_id's transmit key passed the rekey limits */
    FP_EV_KEY_EXPIRED = 3, /* peer_id's transmit key passed the reject limits */
    FP_EV_PROBE_ACK = 4    /* peer_id answered a path MTU probe (fp_peer_probe) on link_id
                              from `from`: data holds the probe id and the length of the
                              datagram the peer received, 4 bytes each, big-endian */
};

struct fp_config {
    uint64_t rekey_after_packets;  /* ask for a rekey (FP_EV_REKEY) */
    uint64_t reject_after_packets; /* refuse the key from then on */
    uint32_t rekey_after_seconds;
    uint32_t reject_after_seconds;
    uint32_t ctrl_queue_len;       /* control messages kept for Python: the known lane */
    uint32_t ctrl_unknown_queue_len; /* ... the unknown sources' lane */
    uint32_t ctrl_source_pps;      /* control datagrams per second of one unknown source IP */
    uint32_t ctrl_source_burst;    /* ... and its bucket's depth */
    uint32_t ctrl_unknown_pps;     /* of all unknown sources together */
    uint32_t ctrl_unknown_burst;
    uint32_t ctrl_sources;         /* unknown source IPs tracked (their buckets) */
    uint32_t batch;                /* recvmmsg/sendmmsg batch size */
    int relay;                     /* forward peer->peer packets (the PoP) */
    int check_source;              /* drop decrypted packets whose source address
                                      does not route back to the peer that sent them */
    uint32_t warm_ms;              /* an idle thread runs a dummy seal+open this often
                                      (0 = never): see docs/dataplane.md, "Latency" */
    uint32_t warm_for_ms;          /* ... but only this long after the thread last
                                      carried data (0 = always): a box with no traffic
                                      sleeps */
    uint32_t spin_us;              /* after sending a lone packet that ended an idle
                                      spell, the TUN thread polls that link this long
                                      for the answer before it sleeps (0 = never) */
};

/* An IPv4 or IPv6 address and UDP port. family is 4 or 6; port in host order;
 * IPv4 addresses use the first 4 bytes of addr. */
struct fp_addr {
    uint8_t family;
    uint16_t port;
    uint8_t addr[16];
};

struct fp_counters {
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t drops[17];       /* by enum fp_drop_reason (FP_DROP__COUNT) */
    uint64_t last_rx_ns;      /* CLOCK_MONOTONIC of last authenticated rx, 0 = never */
    uint64_t last_tx_ns;
};

/* What the TUN thread's waits for answers (fp_config.spin_us) did. */
struct fp_spin_stats {
    uint64_t spins;           /* waits begun */
    uint64_t hits;            /* ... that saw the answer arrive */
    uint64_t spin_ns;         /* time spent in them */
};

struct fp_key_info {
    int has_tx;               /* a transmit key is active */
    uint32_t tx_local_index;  /* our index of the transmit key */
    uint32_t tx_remote_index; /* the index the peer gave us for it */
    uint64_t tx_counter;      /* next counter to be used */
    uint32_t tx_age_s;
    int slots_used;           /* 0, 1 or 2 keys held */
};

/* The result of processing one packet synchronously. */
struct fp_result {
    int verdict;              /* enum fp_verdict */
    int drop_reason;          /* enum fp_drop_reason when verdict is FP_V_DROP */
    uint32_t peer_id;         /* peer it came from (inbound) or goes to (outbound) */
    uint32_t link_id;         /* link to send on (FP_V_SEND) */
    struct fp_addr to;        /* endpoint to send to (FP_V_SEND) */
    uint32_t out_len;
};

struct fp_ctrl_msg {
    uint32_t event;           /* enum fp_event */
    uint32_t link_id;
    uint32_t peer_id;
    struct fp_addr from;
    uint32_t len;
    uint8_t data[4096];
};

typedef struct fp fp_t;

void fp_config_default(struct fp_config *cfg);
int fp_new(const struct fp_config *cfg, fp_t **out);
void fp_free(fp_t *fp);

/* Devices. The fast path keeps its own duplicate of every fd it is given. */
int fp_tun_open(fp_t *fp, const char *name);  /* create/attach TUN `name` (IFF_TUN|IFF_NO_PI) */
int fp_tun_attach(fp_t *fp, int fd);          /* a TUN fd made by the caller, or any packet
                                                 fd (tests use a socketpair) */
int fp_link_add(fp_t *fp, uint32_t link_id, int udp_fd);
int fp_link_del(fp_t *fp, uint32_t link_id);

/* Peers and the prefix table (longest prefix match, IPv4 and IPv6). */
int fp_peer_add(fp_t *fp, uint32_t peer_id);
int fp_peer_del(fp_t *fp, uint32_t peer_id);  /* also drops its routes and keys */
int fp_route_set(fp_t *fp, const struct fp_addr *prefix, uint8_t plen, uint32_t peer_id);
int fp_route_del(fp_t *fp, const struct fp_addr *prefix, uint8_t plen);

/* Many route changes under one acquisition of the table lock, all or nothing:
 * every op is checked first (verb, address, prefix length, host bits of a
 * set, the peer of a set exists) and the first bad one rejects the whole batch with
 * -EINVAL (-ENOENT: unknown peer; -ENOMEM) and its index in *bad (if bad is
 * not NULL); nothing changes then. Ops apply in order; deleting a prefix that
 * is not in the table is no error (a batch states what the table should hold). */
enum fp_route_verb {
    FP_ROUTE_SET = 0,         /* route the prefix to peer_id (replacing its peer) */
    FP_ROUTE_DEL = 1          /* delete the prefix (peer_id ignored) */
};

struct fp_route_op {
    uint32_t verb;            /* enum fp_route_verb; anything else is invalid */
    struct fp_addr prefix;    /* port ignored */
    uint8_t plen;
    uint32_t peer_id;
    /* For the transport rules below (0 = none; a set checks that they exist, as peer_id):
     * the peer of the prefix's off-cloud path while it is up (a mesh tunnel, or the
     * direct tunnel peer_id itself), and the peer of its cloud path (the PoP's tunnel). */
    uint32_t offcloud_peer;
    uint32_t cloud_peer;
    uint32_t flags;           /* FP_ROUTE_*; any other bit is invalid */
};
/* peer_id is no secondary for the transport rules (an Alt-WAN tunnel: docs/recovery.md): an
 * off-cloud rule's AUTOMATIC secondary takes the cloud peer instead, and drops without one. */
#define FP_ROUTE_PEER_NOT_SECONDARY 1
int fp_route_batch(fp_t *fp, const struct fp_route_op *ops, size_t n, size_t *bad);

/* Allowed sources (docs/dataplane.md, "Allowed sources"): a table kept apart from the
 * routes, prefix -> owner (a site id), longest prefix match, so a switch of transport
 * (a route moving between peers) never changes what a peer may send. A peer given an
 * owner (fp_peer_set_source_owner; 0, the default: not checked) may send a decrypted
 * data packet only when its inner source lies in a prefix of the table owned by that
 * owner; FP_SOURCE_ANY: in any prefix of the table (a PoP session relaying every site),
 * never one outside it (our own LAN). Anything else is dropped as FP_DROP_SPOOFED on the
 * peer. fp_source_batch changes the table as fp_route_batch does the routes: all or
 * nothing under one lock, every op checked first (verb, family, length, no host bits in a
 * set, an owner other than 0 and FP_SOURCE_ANY), the first bad one rejects the batch with
 * -EINVAL and its index in *bad; deleting an absent prefix is no error. Deleting a peer
 * leaves the table alone (owners are sites, not peers). fp_source_lookup gives the owner
 * of the longest prefix holding addr (port ignored), -ENOENT for none. */
#define FP_SOURCE_ANY 0xffffffff

enum fp_source_verb {
    FP_SOURCE_SET = 0,        /* the prefix is owner's (replacing its owner) */
    FP_SOURCE_DEL = 1         /* delete the prefix (owner ignored) */
};

struct fp_source_op {
    uint32_t verb;            /* enum fp_source_verb */
    struct fp_addr prefix;    /* port ignored */
    uint8_t plen;
    uint32_t owner;
};
int fp_source_batch(fp_t *fp, const struct fp_source_op *ops, size_t n, size_t *bad);
int fp_source_lookup(fp_t *fp, const struct fp_addr *addr, uint32_t *owner);
int fp_peer_set_source_owner(fp_t *fp, uint32_t peer_id, uint32_t owner);

/* Off-cloud transport rules (docs/dataplane.md, "Transport rules"), evaluated per flow on
 * packets from the TUN after the prefix lookup, top-down, first match wins. A rule matches
 * a packet of its flow in either direction: (source in src, destination in dst, destination
 * port in the ranges) or the reverse (destination in src, source in dst, source port in the
 * ranges), so the answers of a flow take the same transport at the far site. What it
 * decides, from the route's three peers (fp_route_op):
 *   FP_RULE_CLOUD: the cloud peer, else the route's peer;
 *   FP_RULE_OFFCLOUD: the off-cloud peer; while there is none, by the secondary:
 *     AUTOMATIC the route's peer (the cloud peer when the route says its peer is none:
 *     FP_ROUTE_PEER_NOT_SECONDARY), CLOUD the cloud peer, NONE nothing: the packet (and a
 *     CLOUD secondary without a cloud peer) is dropped as FP_DROP_OFFCLOUD_DOWN.
 * No match: the route's peer, as without rules. Fields: proto is an IP protocol number or
 * FP_RULE_PROTO_ANY (ICMP, 1, also matches ICMPv6, 58); src/dst are runs of `nets` (n = 0:
 * any address), an address matching when it lies in one of them; ports are runs of
 * `ports`, inclusive ranges (n = 0: any, and packets without ports too); a rule with ports
 * matches only TCP and UDP packets that carry them: not fragments (IPv4 MF or an offset),
 * nor IPv6 packets whose next header is not TCP or UDP (extension headers are not walked).
 * fp_rules_set replaces the whole table at once (n_rules = 0: no rules, no cost); every
 * field is checked first and the first bad rule rejects the call with -EINVAL and its
 * index in *bad (a net with host bits, a bad family or length, a range outside the arrays,
 * lo > hi, an unknown transport or secondary, more than FP_RULES_MAX rules: -E2BIG), and
 * the table is untouched. A rule whose key equals one of the replaced table's keeps its
 * hit count. fp_rules_counters copies the hits (packets matched, per rule, in order) of
 * up to cap rules and returns the number of rules. */
#define FP_RULES_MAX 1024
#define FP_RULE_NETS_MAX 65536
#define FP_RULE_PORTS_MAX 65536
#define FP_RULE_PROTO_ANY 256

enum fp_rule_transport {
    FP_RULE_CLOUD = 0,
    FP_RULE_OFFCLOUD = 1
};

enum fp_rule_secondary {
    FP_RULE_SEC_AUTOMATIC = 0,
    FP_RULE_SEC_NONE = 1,
    FP_RULE_SEC_CLOUD = 2
};

struct fp_rule_net {
    uint8_t family;           /* 4 or 6 */
    uint8_t plen;
    uint8_t addr[16];         /* host bits zero; IPv4 in the first 4 bytes */
};

struct fp_rule_ports {
    uint16_t lo;
    uint16_t hi;
};

struct fp_rule {
    uint64_t key;             /* the caller's name for it: hits survive a replacement */
    uint32_t transport;       /* enum fp_rule_transport */
    uint32_t secondary;       /* enum fp_rule_secondary, FP_RULE_OFFCLOUD only */
    uint32_t proto;           /* IP protocol number or FP_RULE_PROTO_ANY */
    uint32_t src_first;       /* nets[src_first .. src_first + src_n) */
    uint32_t src_n;
    uint32_t dst_first;
    uint32_t dst_n;
    uint32_t ports_first;     /* ports[ports_first .. ports_first + ports_n) */
    uint32_t ports_n;
};

struct fp_rule_table {
    const struct fp_rule *rules;
    uint32_t n_rules;
    const struct fp_rule_net *nets;
    uint32_t n_nets;
    const struct fp_rule_ports *ports;
    uint32_t n_ports;
};

struct fp_rules_info {
    uint64_t generation;      /* changes with every fp_rules_set; 0: never set */
    uint32_t n_rules;
    uint64_t evaluations;     /* flows looked up in the table (flow cache misses) */
};

int fp_rules_set(fp_t *fp, const struct fp_rule_table *table, size_t *bad);
int fp_rules_counters(fp_t *fp, uint64_t *hits, size_t cap, struct fp_rules_info *info);

/* Multi-link peers (docs/dataplane.md, "Multi-link peers"). A peer has at most
 * one endpoint per link and at most FP_PEER_ENDPOINTS of them; which one a
 * packet goes to is decided per packet from the peer's policy:
 *   - default (no policy set, or set with n == 0): the endpoint set most
 *     recently by fp_peer_set_endpoint that is still there;
 *   - one link (n == 1): that link's endpoint;
 *   - weighted (n >= 2): per flow (inner addresses, protocol, TCP/UDP ports),
 *     by weighted rendezvous hashing over the listed links that have an
 *     endpoint, so a flow stays on its link while that set is unchanged.
 * When none of the policy's links has an endpoint, the default choice is used.
 * fp_peer_set_endpoint adds or replaces the endpoint of (peer, link);
 * fp_peer_get_endpoint gives the primary: where a packet without a flow (a
 * keepalive) goes, the heaviest policy link with an endpoint (first listed on
 * a tie), else the default choice; -ENOTCONN without endpoints.
 * fp_peer_del_endpoint: -ENOTCONN if (peer, link) had none. fp_link_del drops
 * the link's endpoints from every peer. An authenticated packet from a new
 * source moves the endpoint of the link it came in on; one on a link where
 * the peer has no endpoint is delivered but changes nothing (counted in
 * fp_peer_links.rx_unlisted). set_policy: weights > 0, distinct links,
 * n <= FP_PEER_ENDPOINTS, else -EINVAL; the links need not exist yet. */
#define FP_PEER_ENDPOINTS 8

struct fp_link_weight {
    uint32_t link_id;
    uint32_t weight;
};

struct fp_endpoint {
    uint32_t link_id;
    struct fp_addr addr;
    int primary;              /* what fp_peer_get_endpoint returns */
    uint64_t rx_packets;      /* authenticated packets from the peer on this link (inner bytes) */
    uint64_t rx_bytes;
    uint64_t tx_packets;      /* packets sealed for this endpoint (inner bytes) */
    uint64_t tx_bytes;
};

struct fp_peer_links {
    uint32_t n_endpoints;
    struct fp_endpoint ep[8];         /* FP_PEER_ENDPOINTS */
    uint32_t n_policy;                /* 0: the default policy */
    struct fp_link_weight policy[8];
    uint64_t rx_unlisted;             /* authenticated packets on links without an endpoint */
    uint32_t mtu;                     /* path MTU set by fp_peer_set_mtu, 0: none */
    uint32_t inner_mtu;               /* the largest inner packet it allows, 0: no limit */
};

int fp_peer_set_endpoint(fp_t *fp, uint32_t peer_id, uint32_t link_id, const struct fp_addr *ep);
int fp_peer_del_endpoint(fp_t *fp, uint32_t peer_id, uint32_t link_id);
int fp_peer_get_endpoint(fp_t *fp, uint32_t peer_id, uint32_t *link_id, struct fp_addr *ep);
int fp_peer_endpoints(fp_t *fp, uint32_t peer_id, struct fp_peer_links *out);
/* A number that changes whenever any peer's endpoints do (set, deleted, dropped with
 * their link, moved by roaming): whoever follows hundreds of peers' endpoints polls this
 * instead of each peer's fp_peer_endpoints. */
uint64_t fp_endpoints_gen(fp_t *fp);
int fp_peer_set_policy(fp_t *fp, uint32_t peer_id, const struct fp_link_weight *w, size_t n);

/* Peer groups (docs/dataplane.md, "Peer groups"): an id that routes (their peer, off-cloud
 * peer and cloud peer alike) may name in place of a peer, whose packets go, per flow, to one
 * of its member peers, by the same flow hash and weighted rendezvous hashing as a peer's
 * links: a flow stays on its member while the members and weights stay, and only the flows
 * of a member removed or reweighted move. A member without a transmit key or without an
 * endpoint is passed over (its flows go to their next-best member, and come back when it
 * has both again). A member of weight 0 is a standby: chosen (equally among the standbys)
 * only while no weighted member is usable, and, like every member, allowed to send from the
 * group's prefixes where the relay checks sources. With none left, or no members, the
 * packet is dropped as FP_DROP_NO_MEMBER. fp_group_set creates the group or replaces its members (n == 0: none);
 * members are existing peers, distinct, no groups, at most FP_GROUP_MEMBERS
 * (else -EINVAL; -ENOENT: a member is no peer; -EEXIST: group_id is a peer's). Deleting a
 * peer (fp_peer_del) takes it out of every group; fp_group_del deletes the group and, as
 * fp_peer_del does for a peer, the routes it is the peer of (-ENOENT: none; -EINVAL: a
 * peer's id). A group shares the peers' ids, so fp_peer_add refuses its id (-EEXIST); the
 * calls that configure or read one peer's transport (endpoints, policy, MTU, keys,
 * keepalives, probes, source owner, fp_peer_del) refuse a group with -EINVAL, while
 * fp_peer_counters gives its drops (no_member) and, as tx_packets, the packets it handed
 * to its members; everything sealed is counted on the member. fp_group_members copies up
 * to cap members in order and returns their number (-ENOENT, -EINVAL as fp_group_del). */
#define FP_GROUP_MEMBERS 8

struct fp_peer_weight {
    uint32_t peer_id;
    uint32_t weight;
};

struct fp_group_member {
    uint32_t peer_id;
    uint32_t weight;
    int usable;               /* has a transmit key and an endpoint now */
    uint64_t packets;         /* packets the group handed to it (it may still drop them) */
};

int fp_group_set(fp_t *fp, uint32_t group_id, const struct fp_peer_weight *m, size_t n);
int fp_group_del(fp_t *fp, uint32_t group_id);
int fp_group_members(fp_t *fp, uint32_t group_id, struct fp_group_member *out, size_t cap);

/* Path MTU (docs/dataplane.md, "Path MTU"). fp_peer_set_mtu sets the largest IP
 * packet the path to the peer carries (what the supervisor's probing found), or 0
 * for none known (only the TUN MTU limits packets, as before); otherwise
 * FP_PMTU_MIN..65535, else -EINVAL. The inner MTU is that minus the outer IP
 * header (20, or 40 when one of the peer's endpoints is IPv6), UDP (8) and
 * FP_OVERHEAD. An inner packet larger than it: IPv4 without DF is cut into
 * fragments that fit, as a router would (FP_V_FRAGMENT from fp_process_*);
 * IPv4 with DF and IPv6 are dropped as FP_DROP_TOO_BIG and answered, into the
 * TUN (at a relay: to the sending peer), with ICMP "fragmentation needed" /
 * ICMPv6 "packet too big" carrying the inner MTU. TCP SYNs to and from the
 * peer get their MSS option lowered to fit it.
 * fp_peer_probe seals a probe of exactly `size` bytes on the wire (outer IP
 * header included; padding inside the AEAD) to the peer's endpoint on link_id
 * and sends it with DF; the peer's fast path answers an authenticated probe
 * with a small ack, queued here as FP_EV_PROBE_ACK. -ENOTCONN: no endpoint on
 * that link; -ENOKEY: no transmit key; -EINVAL: size below FP_PMTU_MIN or
 * above what a data packet may carry; -EMSGSIZE and other errors from sendto. */
#define FP_PMTU_MIN 576
int fp_peer_set_mtu(fp_t *fp, uint32_t peer_id, uint32_t mtu);
int fp_peer_probe(fp_t *fp, uint32_t peer_id, uint32_t link_id, uint32_t size, uint32_t probe_id);

/* Keys: two slots per peer. install puts a key in the slot not used for
 * transmit (evicting what was there) and accepts packets for local_index at
 * once; activate makes it the transmit key, sending with remote_index in the
 * header. The previous key keeps receiving until the next install, so a
 * rekey loses nothing. */
int fp_key_install(fp_t *fp, uint32_t peer_id, uint32_t local_index,
                   const uint8_t *tx_key, const uint8_t *rx_key);
int fp_key_activate(fp_t *fp, uint32_t peer_id, uint32_t local_index, uint32_t remote_index);
int fp_key_clear(fp_t *fp, uint32_t peer_id);
int fp_key_info(fp_t *fp, uint32_t peer_id, struct fp_key_info *out);
int fp_send_keepalive(fp_t *fp, uint32_t peer_id);
/* Keepalives on an idle tunnel, sent by fp_liveness_scan (it looks once a second): a peer
 * that has a transmit key and an endpoint and to which nothing was sent for interval_ms
 * gets one (0 = none, the default). One pass in C over hundreds of mesh peers instead of a call per peer. */
int fp_peer_set_keepalive(fp_t *fp, uint32_t peer_id, uint32_t interval_ms);
/* The idle keepalives alone, now, whatever fp_liveness_scan's once-a-second pace: every peer
 * with an fp_peer_set_keepalive interval, a transmit key and an endpoint over which nothing
 * went out for that interval gets one. For a caller with keepalives well under a second (a
 * PoP's 200 ms) that calls it from a thread of its own, so they go out whatever its event
 * loop is doing. Returns how many peers it looked at, or -errno. */
int fp_keepalive_pass(fp_t *fp);
/* fp_keepalive_pass every every_ms (1..60000) from a thread of its own, until
 * fp_keepalive_thread_stop (which joins it: call it before fp_close). NULL on failure. */
typedef struct fp_ka_thread fp_ka_thread_t;
fp_ka_thread_t *fp_keepalive_thread_start(fp_t *fp, uint32_t every_ms);
uint64_t fp_keepalive_thread_passes(fp_ka_thread_t *t);
void fp_keepalive_thread_stop(fp_ka_thread_t *t);
/* The key lifetime agreed with the peer (docs/tunnel.md, "Agreed timers"): its keys ask for
 * a rekey (FP_EV_REKEY) at rekey_after_seconds of age and are refused for tx and rx at
 * reject_after_seconds, in place of the fp_config's (0 = the fp_config's, the default),
 * shorter or longer. It applies to the peer's newest key and every key installed later; an
 * older key (still receiving) takes only a longer limit, never a shorter one. -EINVAL when
 * rekey comes after reject; a peer group: -EINVAL. */
int fp_peer_set_key_lifetime(fp_t *fp, uint32_t peer_id, uint32_t rekey_after_seconds,
                             uint32_t reject_after_seconds);

/* Liveness under traffic (docs/dataplane.md). A peer is owed an answer once we
 * received a data packet from it and have sent it nothing since; it is silent
 * once we sealed a data packet for it and nothing authenticated came back
 * since. fp_liveness_scan, called periodically: sends a keepalive to every
 * peer owed an answer for ack_after_ns (so a live peer answers one-way traffic
 * within that) and to every peer idle past its fp_peer_set_keepalive interval,
 * and writes the ids of up to cap peers silent for
 * silent_after_ns into ids (a silent peer is reported by the scan that finds it
 * silent, then by the once-a-second keepalive pass until it answers or
 * fp_key_activate gives it new keys). Returns how many ids it wrote, or
 * -errno. */
int fp_liveness_scan(fp_t *fp, uint64_t ack_after_ns, uint64_t silent_after_ns, uint32_t *ids,
                     size_t cap);
/* Whether a liveness clock may be running (the last scan found one, or one started since):
 * while it does, scan often; while not, a scan once a second sends the idle keepalives. */
int fp_liveness_busy(fp_t *fp);               /* 1 or 0 */
/* An eventfd that becomes readable when a clock starts after a scan that found none running:
 * a supervisor that scans rarely while none runs waits on it and reads it (8 bytes) to
 * acknowledge. Written once, then not again until a scan finds no clock running. */
int fp_liveness_wake_fd(fp_t *fp);

/* What the TUN device does for us (fp_tun_features). fp_tun_open asks for
 * IFF_VNET_HDR and checksum/TSO (and, where the kernel has it, USO) offload, so
 * the TUN thread reads superpackets of up to 64 KiB and cuts them itself, and
 * the link threads write coalesced TCP superpackets. fp_tun_attach does the same
 * for a TUN fd created with IFF_VNET_HDR (socketd makes its device with
 * python-pytun); any other fd carries plain packets (features 0). */
/* VNET: a virtio_net_hdr in front of every packet; TSO: TCP superpackets
 * (TUN_F_TSO4/6); USO: UDP superpackets (TUN_F_USO4/6). FP_VNET_HDR_LEN is the
 * size of struct virtio_net_hdr. fp_tun_features: FP_TUN_F_* of the current
 * TUN, 0 without one. */
#define FP_TUN_F_VNET 1
#define FP_TUN_F_TSO 2
#define FP_TUN_F_USO 4
#define FP_VNET_HDR_LEN 10
int fp_tun_features(fp_t *fp);

/* Threads. */
int fp_start(fp_t *fp);
int fp_stop(fp_t *fp);

/* The data-path threads' health (docs/dataplane.md, "Threads"). A thread never ends on its
 * own without saying why: one that leaves its loop for anything but fp_stop, fp_link_del or
 * fp_free is DIED, with the errno and the place (enum fp_thread_where), until it is
 * restarted. The supervisor looks at fp_threads_deaths every tick (one atomic load), and on
 * a change reads fp_threads_status and calls fp_threads_restart. */
enum fp_thread_kind {
    FP_THREAD_TUN = 1,         /* the TUN thread */
    FP_THREAD_LINK = 2         /* a link's thread (link_id) */
};

enum fp_thread_state {
    FP_THREAD_STOPPED = 0,     /* not started, or stopped on request */
    FP_THREAD_RUNNING = 1,
    FP_THREAD_DIED = 2         /* left its loop on an error: err and where say why */
};

enum fp_thread_where {
    FP_WHERE_NONE = 0,
    FP_WHERE_POLL = 1,         /* poll() failed with err */
    FP_WHERE_HANGUP = 2,       /* its device hung up or went away: EBADF (fd not open),
                                  ENODEV (POLLERR: a TUN device deleted), EPIPE (POLLHUP) */
    FP_WHERE_ALLOC = 3,        /* its buffers could not be allocated (ENOMEM) */
    FP_WHERE_INJECTED = 4      /* fp_test_thread_fail: err is the one given */
};

struct fp_thread_status {
    uint32_t kind;            /* enum fp_thread_kind */
    uint32_t link_id;         /* FP_THREAD_LINK */
    int state;                /* enum fp_thread_state */
    int err;                  /* positive errno of the last death, 0: never died */
    uint32_t where;           /* enum fp_thread_where of the last death */
    uint64_t died_ns;         /* CLOCK_MONOTONIC of the last death, 0: never */
    uint64_t deaths;          /* deaths of this thread (a link's: since fp_link_add) */
    uint64_t restarts;        /* fp_threads_restart calls that started it again */
};

/* Copies the status of up to cap threads (the TUN thread first, if there is a TUN, then the
 * links) and returns how many there are (may exceed cap). The links come in the order of
 * the fast path's link table: in the order they were added until a fp_link_del, which moves
 * the last link into the deleted one's place; a caller that wants a link finds it by
 * link_id, not by position. */
int fp_threads_status(fp_t *fp, struct fp_thread_status *out, size_t cap);
/* Deaths of any data-path thread since fp_new (links deleted since included). */
uint64_t fp_threads_deaths(fp_t *fp);
/* Start again every thread that died, in the same instance (peers, keys, routes and
 * counters stay). Returns how many it restarted, or -errno for the first it could not:
 * -ENODEV when the thread's device is gone (its fd hangs up: a deleted TUN device, a closed
 * socketpair), so a new thread would die at once; -EAGAIN/-ENOMEM from pthread_create;
 * -ESRCH when the fast path is not started. Threads it could not restart stay DIED. */
int fp_threads_restart(fp_t *fp);

/* Control path. */
int fp_ctrl_fd(fp_t *fp);                                /* readable while the queue is not empty */
int fp_ctrl_recv(fp_t *fp, struct fp_ctrl_msg *out);     /* 0, or -EAGAIN */
int fp_ctrl_send(fp_t *fp, uint32_t link_id, const struct fp_addr *to,
                 const uint8_t *buf, size_t len);

/* The control lanes (docs/dataplane.md, "Control queue"). A control datagram whose source
 * is known goes to lane FP_LANE_KNOWN, with the fast path's own events; any other passes
 * its source IP's token bucket and the bucket of all unknown sources (else it is dropped
 * as FP_DROP_CTRL_RATE_LIMITED) into lane FP_LANE_UNKNOWN. Known: the endpoint of any peer,
 * and the addresses the caller declares with fp_ctrl_known_set, which replaces the whole
 * declared set (at most FP_CTRL_KNOWN_MAX; port 0 declares every port of that address):
 * -EINVAL for a bad address, -E2BIG, -ENOMEM. fp_ctrl_recv takes the known lane first;
 * fp_ctrl_recv_lane takes from one lane only (-EAGAIN: empty, -EINVAL: no such lane).
 * The eventfd (fp_ctrl_fd) is readable while either lane is not empty. */
#define FP_CTRL_KNOWN_MAX 16384
enum fp_ctrl_lane_id {
    FP_LANE_KNOWN = 0,
    FP_LANE_UNKNOWN = 1,
    FP_LANES = 2
};

struct fp_ctrl_stats {
    uint32_t known_len;             /* in the known lane now */
    uint32_t known_cap;
    uint32_t unknown_len;           /* in the unknown lane now */
    uint32_t unknown_cap;
    uint64_t known_queued;          /* queued into the known lane, ever */
    uint64_t unknown_queued;        /* ... into the unknown lane */
    uint64_t known_full;            /* dropped: the known lane full (queue_full) */
    uint64_t unknown_full;          /* dropped: the unknown lane full */
    uint64_t rate_limited_source;   /* dropped by the source's own bucket */
    uint64_t rate_limited_global;   /* dropped by all unknown sources' bucket */
    uint32_t sources;               /* unknown source IPs with a bucket now */
    uint32_t sources_cap;
    uint64_t evictions;             /* buckets given to another source */
    uint32_t declared;              /* addresses declared known (fp_ctrl_known_set) */
    uint32_t known_addrs;           /* known addresses: declared and peer endpoints */
};

int fp_ctrl_known_set(fp_t *fp, const struct fp_addr *addrs, size_t n);
int fp_ctrl_recv_lane(fp_t *fp, uint32_t lane, struct fp_ctrl_msg *out);
void fp_ctrl_stats(fp_t *fp, struct fp_ctrl_stats *out);

/* Counters. */
int fp_peer_counters(fp_t *fp, uint32_t peer_id, struct fp_counters *out);
int fp_link_counters(fp_t *fp, uint32_t link_id, struct fp_counters *out);
void fp_global_counters(fp_t *fp, struct fp_counters *out);
void fp_spin_stats(fp_t *fp, struct fp_spin_stats *out);

/* One packet, synchronously: the threads run exactly this code. Used by the
 * tests and the fuzz target. Returns 0 or -errno; the outcome is in res. */
int fp_process_outbound(fp_t *fp, const uint8_t *ip, size_t len,
                        uint8_t *out, size_t cap, struct fp_result *res);
int fp_process_inbound(fp_t *fp, uint32_t link_id, const struct fp_addr *from,
                       const uint8_t *pkt, size_t len,
                       uint8_t *out, size_t cap, struct fp_result *res);

/* Test hooks, for tests/native and the fuzz target only; the supervisor never
 * calls them. fp_test_aead runs the fast path's own AES-256-GCM code on an
 * arbitrary 12-byte IV and AAD (known-answer vectors); it returns 0, or
 * -EBADMSG when decryption fails authentication. fp_test_set_tx_counter sets
 * the next counter of the peer's transmit key (limits near 2^64). */
int fp_test_aead(int encrypt, const uint8_t *key, const uint8_t *iv,
                 const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t len,
                 uint8_t *out, uint8_t *tag);
int fp_test_set_tx_counter(fp_t *fp, uint32_t peer_id, uint64_t counter);
/* Fault injection: the thread (kind, link_id: as in fp_thread_status) leaves its loop at
 * once as DIED with err (1..4095) and FP_WHERE_INJECTED, as a thread whose poll failed would.
 * -ENOENT: no such thread running; -EINVAL: bad kind or err. Only a caller of this library
 * (a test, a supervisor asked by root on its control socket with faults enabled) can reach
 * it; nothing a packet carries does. */
int fp_test_thread_fail(fp_t *fp, uint32_t kind, uint32_t link_id, int err);
/* Fault injection: the thread's next start (fp_start, fp_threads_restart) fails with err
 * (1..4095) as if pthread_create had refused it (EAGAIN, ENOMEM); once, the start after it
 * is a real one. -ENOENT: no such thread; -EINVAL: bad kind or err. */
int fp_test_thread_start_fail(fp_t *fp, uint32_t kind, uint32_t link_id, int err);

/* The path MTU code as pure functions. fp_test_icmp_too_big writes the ICMP
 * error an inner packet too big for inner_mtu gets (fragmentation needed, or
 * ICMPv6 packet too big, addressed to its source) into out and returns its
 * length, or 0 when none is due (IPv4 without DF, an ICMP error, a later
 * fragment, a source that is no single host), -EINVAL for no IP packet.
 * fp_test_ip4_fragment cuts an IPv4 packet without DF into fragments of at most
 * mtu bytes, written back to back into out (lengths in lens); returns their
 * number, or -EINVAL (DF set, malformed, mtu too small), -ENOSPC.
 * fp_test_mss_clamp lowers the MSS option of a TCP SYN to what inner_mtu
 * allows, fixing the checksum; returns 1 if it changed the packet, else 0. */
int fp_test_icmp_too_big(const uint8_t *ip, size_t len, uint32_t inner_mtu, uint8_t *out,
                         size_t cap);
int fp_test_mss_clamp(uint8_t *ip, size_t len, uint32_t inner_mtu);
int fp_test_ip4_fragment(const uint8_t *ip, size_t len, uint32_t mtu, uint8_t *out, size_t cap,
                         uint32_t *lens, uint32_t max);

/* The offload code as pure functions. fp_test_gso_segment cuts one packet as
 * read from a TUN with a FP_VNET_HDR_LEN-byte virtio_net_hdr `vnet` into
 * segments written back to back into out (lengths in seg_lens); returns their
 * number or -errno (malformed, too many segments, no room). A header without
 * GSO gives the packet itself with its checksum completed.
 * fp_test_gro_coalesce groups the n packets laid back to back in pkts (lengths
 * in lens) as the link threads would before writing them to the TUN; writes
 * each result to out as a virtio_net_hdr followed by the packet (lengths,
 * header included, in out_lens) and returns their number or -errno. */
int fp_test_gso_segment(const uint8_t *vnet, const uint8_t *pkt, size_t len, uint8_t *out,
                        size_t cap, uint32_t *seg_lens, uint32_t max_segs);
int fp_test_gro_coalesce(const uint8_t *pkts, const uint32_t *lens, uint32_t n, uint8_t *out,
                         size_t cap, uint32_t *out_lens, uint32_t max_out);

#endif
