/* loopback_shim.so: LD_PRELOADed into adbd for the loopback tests.
 *
 * - socket(AF_VSOCK, ...) fails with EAFNOSUPPORT: adbd's vsock listener gives up at once
 *   (adbd treats EAFNOSUPPORT as "this transport does not exist"). vsock is not isolated by
 *   network namespaces, so without this adbd would listen on the host's vsock port 5555.
 * - bind() to a wildcard address is turned into a loopback bind: 0.0.0.0 -> 127.0.0.1,
 *   :: -> ::ffff:127.0.0.1 (adbd's dual-stack socket then takes IPv4 loopback only).
 * The daemon already runs in a private network namespace whose only interface is lo; this
 * makes "listens on loopback only" hold socket by socket, which the test asserts.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

int socket(int domain, int type, int protocol) {
  static int (*real)(int, int, int);
  if (domain == AF_VSOCK) {
    errno = EAFNOSUPPORT;
    return -1;
  }
  if (!real) real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
  return real(domain, type, protocol);
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static int (*real)(int, const struct sockaddr *, socklen_t);
  if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
  if (addr && addr->sa_family == AF_VSOCK) {
    errno = EAFNOSUPPORT;
    return -1;
  }
  if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in a;
    memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return real(fd, (const struct sockaddr *)&a, sizeof a);
  }
  if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a;
    memcpy(&a, addr, sizeof a);
    if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
      static const unsigned char mapped_lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1};
      memcpy(&a.sin6_addr, mapped_lo, 16);
    }
    return real(fd, (const struct sockaddr *)&a, sizeof a);
  }
  return real(fd, addr, len);
}
