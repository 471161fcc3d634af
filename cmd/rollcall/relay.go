package main

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
)

// relay forwards the TCP connections it accepts on addr to target. The demo
// puts one in front of its embedded etcd: embed.Etcd.Close lets open watch
// streams drain for up to 7 seconds, serving them meanwhile, whereas a
// process that dies drops its connections at once. Cutting the relay
// together with Close makes a stop look like the latter to the clients.
type relay struct {
	addr, target string

	mu    sync.Mutex
	lis   net.Listener
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newRelay(addr, target string) *relay {
	return &relay{addr: addr, target: target, conns: map[net.Conn]struct{}{}}
}

// start listens on addr (again, after cut).
func (r *relay) start() error {
	lis, err := net.Listen("tcp", r.addr)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.lis = lis
	r.mu.Unlock()
	r.wg.Add(1)
	go r.accept(lis)
	return nil
}

func (r *relay) accept(lis net.Listener) {
	defer r.wg.Done()
	for {
		c, err := lis.Accept()
		if err != nil {
			return // closed by cut
		}
		r.wg.Add(1)
		go r.pipe(c)
	}
}

// track registers conns to be closed by cut; false if the relay is cut.
func (r *relay) track(cs ...net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lis == nil {
		return false
	}
	for _, c := range cs {
		r.conns[c] = struct{}{}
	}
	return true
}

func (r *relay) pipe(c net.Conn) {
	defer r.wg.Done()
	u, err := net.Dial("tcp", r.target)
	if err != nil {
		c.Close()
		return
	}
	if !r.track(c, u) {
		c.Close()
		u.Close()
		return
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
	<-done // either side ended: end both
	c.Close()
	u.Close()
	<-done
	r.mu.Lock()
	delete(r.conns, c)
	delete(r.conns, u)
	r.mu.Unlock()
}

// cut stops listening and drops every connection at once, and waits for
// the relay's goroutines.
func (r *relay) cut() {
	r.mu.Lock()
	if r.lis != nil {
		r.lis.Close()
		r.lis = nil
	}
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// severable dials the connections of one etcd client and can sever them all
// at once and refuse new ones, as the death of a process does to its
// sockets. Closing the client alone is not a crash: closing it ends the
// lease keepalives first, and what reacts to that can still reach etcd
// before the connection closes.
type severable struct {
	mu    sync.Mutex
	dead  bool
	conns []net.Conn
}

var errSevered = errors.New("connection severed: the process crashed")

func (s *severable) dial(ctx context.Context, addr string) (net.Conn, error) {
	s.mu.Lock()
	dead := s.dead
	s.mu.Unlock()
	if dead {
		return nil, errSevered
	}
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dead {
		c.Close()
		return nil, errSevered
	}
	s.conns = append(s.conns, c)
	return c, nil
}

func (s *severable) sever() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dead = true
	for _, c := range s.conns {
		c.Close()
	}
	s.conns = nil
}
