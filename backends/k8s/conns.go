package k8s

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"
)

// connTracker dials the API server for a client of the backend's own and
// remembers the connections, so that Close can end them all: closing idle
// connections is not enough, an HTTP/2 connection whose last watch is still
// being canceled would stay open, with its goroutines, until its idle
// timeout.
type connTracker struct {
	dial func(ctx context.Context, network, addr string) (net.Conn, error)

	mu     sync.Mutex
	closed bool
	conns  map[*trackedConn]struct{}
}

func newConnTracker(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *connTracker {
	if dial == nil {
		d := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
		dial = d.DialContext
	}
	return &connTracker{dial: dial, conns: map[*trackedConn]struct{}{}}
}

var errTrackerClosed = errors.New("k8s: client closed")

func (t *connTracker) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := t.dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, t: t}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return nil, errTrackerClosed
	}
	t.conns[tc] = struct{}{}
	return tc, nil
}

// closeAll closes every connection and refuses new ones.
func (t *connTracker) closeAll() {
	t.mu.Lock()
	t.closed = true
	conns := make([]*trackedConn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

type trackedConn struct {
	net.Conn
	t    *connTracker
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.conns, c)
		c.t.mu.Unlock()
	})
	return c.Conn.Close()
}
