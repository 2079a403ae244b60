/* rawsock: holds an IP socket that is neither TCP nor UDP and ticks.
 *   rawsock raw|raw6|packet|icmp
 *     raw     socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)     (needs CAP_NET_RAW)
 *     raw6    socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)  (needs CAP_NET_RAW)
 *     packet  socket(AF_PACKET, SOCK_DGRAM, 0)            (needs CAP_NET_RAW;
 *             protocol 0: it receives nothing)
 *     icmp    socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)   (an ICMP datagram
 *             socket: allowed when the group is in net.ipv4.ping_group_range)
 * Prints `ready kind=K fd=FD`, or `unavailable kind=K err=ERRNO-TEXT` and
 * exits 0 when the socket cannot be created here; then `tick N` every ~20 ms.
 * At `go` it checks the fd is still that socket (SO_TYPE, SO_DOMAIN) and
 * prints `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <netinet/in.h>
#include <sys/socket.h>

int main(int argc, char **argv) {
    setup();
    const char *kind = argc > 1 ? argv[1] : "raw";
    int dom, type, proto;
    if (strcmp(kind, "raw") == 0) dom = AF_INET, type = SOCK_RAW, proto = IPPROTO_ICMP;
    else if (strcmp(kind, "raw6") == 0) dom = AF_INET6, type = SOCK_RAW, proto = IPPROTO_ICMPV6;
    else if (strcmp(kind, "packet") == 0) dom = AF_PACKET, type = SOCK_DGRAM, proto = 0;
    else if (strcmp(kind, "icmp") == 0) dom = AF_INET, type = SOCK_DGRAM, proto = IPPROTO_ICMP;
    else {
        out("FAIL unknown kind %s\n", kind);
        return 2;
    }
    int s = socket(dom, type, proto);
    if (s < 0) {
        out("unavailable kind=%s err=%s\n", kind, strerror(errno));
        return 0;
    }
    out("ready kind=%s fd=%d\n", kind, s);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        out("tick %u\n", n);
        sleep_ms(20);
    }
    int v = -1;
    socklen_t l = sizeof v;
    CHECK(getsockopt(s, SOL_SOCKET, SO_TYPE, &v, &l) == 0 && v == type, "SO_TYPE %d, want %d", v, type);
    l = sizeof v;
    CHECK(getsockopt(s, SOL_SOCKET, SO_DOMAIN, &v, &l) == 0 && v == dom, "SO_DOMAIN %d, want %d", v, dom);
    finish("ticks=%u", n);
    return 0;
}
