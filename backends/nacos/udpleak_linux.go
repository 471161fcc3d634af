package nacos

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// nacos-sdk-go v2.3.5 starts, for every naming client, a UDP "push receiver"
// (clients/naming_client/naming_http/push_receiver.go) on a random port in
// 54951-55950 whose goroutine blocks in ReadFromUDP and only looks at the
// client's context between datagrams: after CloseClient it and its socket
// stay forever. NewClient notes which such sockets the SDK opened (the
// process's UDP sockets in that range that were not there before, read from
// /proc under sdkMu) and CloseClient sends each one datagram, after the
// client's context is canceled, so that the goroutine wakes up, sees the
// context done and closes the socket.

const udpReceiverLow, udpReceiverHigh = 54951, 55950

// udpReceivers returns the ports in the SDK's receiver range of this
// process's UDP sockets.
func udpReceivers() map[int]bool {
	inodes := map[string]bool{}
	fds, _ := filepath.Glob("/proc/self/fd/*")
	for _, fd := range fds {
		l, err := os.Readlink(fd)
		if err == nil && strings.HasPrefix(l, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	ports := map[int]bool{}
	for _, name := range []string{"/proc/self/net/udp", "/proc/self/net/udp6"} {
		f, err := os.Open(name)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || !inodes[fs[9]] {
				continue
			}
			i := strings.LastIndexByte(fs[1], ':')
			p, err := strconv.ParseInt(fs[1][i+1:], 16, 32)
			if err == nil && p >= udpReceiverLow && p <= udpReceiverHigh {
				ports[int(p)] = true
			}
		}
		f.Close()
	}
	return ports
}

// wakeUDPReceivers sends one datagram to each port on the loopback
// interface. The SDK answers it with an "unknow-ack" and, its context being
// done, returns.
func wakeUDPReceivers(ports []int) {
	for _, p := range ports {
		for _, host := range []string{"127.0.0.1", "::1"} {
			c, err := net.DialTimeout("udp", net.JoinHostPort(host, strconv.Itoa(p)), time.Second)
			if err != nil {
				continue
			}
			_, _ = c.Write([]byte("{}"))
			c.Close()
		}
	}
}
