// ferrogate's in-kernel deny list: an XDP program that drops TCP packets
// from denied sources to the data-plane ports, before any socket sees them.
//
// Maps (filled and read by gateway/src/xdp.rs):
//   DENY_V4, DENY_V6  LPM tries of denied source prefixes (address bytes in
//                     network order); the value is unused.
//   PORTS             data-plane TCP ports (network order) the list guards;
//                     every other port passes, so SSH and the rest of the
//                     host are never cut off.
//   DROPS             per-CPU drop counters: 0 IPv4, 1 IPv6.
//
// IPv6 extension headers before TCP (hop-by-hop, routing, destination
// options, authentication, a first fragment) are skipped, up to
// MAX_EXTENSIONS of them, so they cannot carry a denied source past the
// list. Anything the program does not understand (other protocols, longer
// chains, later fragments, a truncated header) passes, and user space
// judges it as before.
//
// Built by gateway/build.rs when clang with the bpf target is installed:
//   clang -O2 -g -target bpf -c xdp_deny.c -o xdp_deny.o && llvm-strip -g xdp_deny.o
// The stripped object is committed beside this file for machines without
// clang.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) __typeof__(val) *name

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define net16(x) __builtin_bswap16(x)
#else
#define net16(x) (x)
#endif

static void *(*bpf_map_lookup_elem)(void *map, const void *key) =
    (void *)BPF_FUNC_map_lookup_elem;

struct v4_prefix {
    __u32 prefixlen;
    __u8 addr[4];
};

struct v6_prefix {
    __u32 prefixlen;
    __u8 addr[16];
};

// max_entries of the tries is set by the loader (`xdp.max_entries`).
struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __type(key, struct v4_prefix);
    __type(value, __u8);
    __uint(max_entries, 65536);
    __uint(map_flags, BPF_F_NO_PREALLOC);
} DENY_V4 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __type(key, struct v6_prefix);
    __type(value, __u8);
    __uint(max_entries, 65536);
    __uint(map_flags, BPF_F_NO_PREALLOC);
} DENY_V6 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __type(key, __u16);
    __type(value, __u8);
    __uint(max_entries, 64);
} PORTS SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __type(key, __u32);
    __type(value, __u64);
    __uint(max_entries, 2);
} DROPS SEC(".maps");

// Extension headers looked through before giving up (and passing).
#define MAX_EXTENSIONS 6

#define EXT_HOP 0
#define EXT_ROUTING 43
#define EXT_FRAGMENT 44
#define EXT_AUTH 51
#define EXT_DEST 60

struct ext_header {
    __u8 next;
    __u8 len;
};

struct vlan {
    __be16 tci;
    __be16 proto;
};

static __always_inline int guarded(__be16 port)
{
    __u16 key = port;
    return bpf_map_lookup_elem(&PORTS, &key) != 0;
}

static __always_inline int dropped(__u32 family)
{
    __u64 *count = bpf_map_lookup_elem(&DROPS, &family);
    if (count)
        *count += 1;
    return XDP_DROP;
}

static __always_inline int judge_v4(void *l3, void *end)
{
    struct iphdr *ip = l3;
    if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP)
        return XDP_PASS;
    // A later fragment carries no TCP header to read the port from.
    if (ip->frag_off & net16(0x1fff))
        return XDP_PASS;
    __u32 len = ip->ihl * 4;
    if (len < sizeof(*ip))
        return XDP_PASS;
    struct tcphdr *tcp = l3 + len;
    if ((void *)(tcp + 1) > end || !guarded(tcp->dest))
        return XDP_PASS;
    struct v4_prefix key = {.prefixlen = 32};
    __builtin_memcpy(key.addr, &ip->saddr, 4);
    if (!bpf_map_lookup_elem(&DENY_V4, &key))
        return XDP_PASS;
    return dropped(0);
}

static __always_inline int judge_v6(void *l3, void *end)
{
    struct ipv6hdr *ip = l3;
    if ((void *)(ip + 1) > end)
        return XDP_PASS;
    __u8 next = ip->nexthdr;
    void *at = ip + 1;
#pragma unroll
    for (int i = 0; i < MAX_EXTENSIONS; i++) {
        if (next != EXT_HOP && next != EXT_ROUTING && next != EXT_FRAGMENT &&
            next != EXT_AUTH && next != EXT_DEST)
            break;
        struct ext_header *ext = at;
        if ((void *)(ext + 1) > end)
            return XDP_PASS;
        __u32 len;
        if (next == EXT_FRAGMENT) {
            // Offset (13 bits) in bytes 2-3: only the first fragment has
            // the TCP header.
            __be16 *offset = at + 2;
            if ((void *)(offset + 1) > end || (*offset & net16(0xfff8)))
                return XDP_PASS;
            len = 8;
        } else if (next == EXT_AUTH) {
            len = ((__u32)ext->len + 2) * 4;
        } else {
            len = ((__u32)ext->len + 1) * 8;
        }
        next = ext->next;
        at += len;
    }
    if (next != IPPROTO_TCP)
        return XDP_PASS;
    struct tcphdr *tcp = at;
    if ((void *)(tcp + 1) > end || !guarded(tcp->dest))
        return XDP_PASS;
    struct v6_prefix key = {.prefixlen = 128};
    __builtin_memcpy(key.addr, &ip->saddr, 16);
    if (!bpf_map_lookup_elem(&DENY_V6, &key))
        return XDP_PASS;
    return dropped(1);
}

SEC("xdp")
int xdp_deny(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return XDP_PASS;
    __be16 proto = eth->h_proto;
    void *l3 = eth + 1;
    if (proto == net16(ETH_P_8021Q) || proto == net16(ETH_P_8021AD)) {
        struct vlan *tag = l3;
        if ((void *)(tag + 1) > end)
            return XDP_PASS;
        proto = tag->proto;
        l3 = tag + 1;
    }
    if (proto == net16(ETH_P_IP))
        return judge_v4(l3, end);
    if (proto == net16(ETH_P_IPV6))
        return judge_v6(l3, end);
    return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
