// Command nacos-test-server runs the project's Nacos 2.x protocol server
// (package nacosserver) as a process of its own, for the container image the
// conformance suite uses with ROLLCALL_TEST_SERVERS=containers
// (scripts/build-images.sh builds it FROM scratch, statically linked).
//
// It serves the Nacos ports on every interface, as a Nacos server does:
// -port (8848) and -port+1000 (9848, gRPC, which the SDK derives from the
// first), and a control API for the tests on -control-port (18848):
//
//	GET  /healthz                          200 once serving
//	POST /push-delay?d=200ms               nacosserver.Server.SetPushDelay
//	POST /drop-connections                 nacosserver.Server.DropConnections; answers the count
//	POST /inject?namespace=&group=&service=  body: a model.Instance as JSON; nacosserver.Server.Inject
//
// A paused, stopped or restarted container is a paused, stopped or
// restarted server; the data lives in memory, so a restart starts empty.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"

	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
)

// processTB lets nacosserver.Start, written for tests, run in a process:
// it implements the testing.TB methods the package uses (Helper, Fatalf,
// Logf, Cleanup). The embedded interface is nil: any other method panics.
type processTB struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
}

func (*processTB) Helper()                           {}
func (*processTB) Fatalf(format string, args ...any) { log.Fatalf(format, args...) }
func (*processTB) Logf(format string, args ...any)   { log.Printf(format, args...) }

func (p *processTB) Cleanup(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cleanups = append(p.cleanups, f)
}

// cleanup runs the cleanups, last first, as testing does.
func (p *processTB) cleanup() {
	p.mu.Lock()
	fs := p.cleanups
	p.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

func main() {
	port := flag.Int("port", 8848, "Nacos port; gRPC listens on port+1000")
	control := flag.Int("control-port", 18848, "port of the tests' control API")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	tb := &processTB{}
	srv := nacosserver.Start(tb) // on 127.0.0.1, free ports
	forward(fmt.Sprintf(":%d", *port), srv.Addr())
	forward(fmt.Sprintf(":%d", *port+1000), srv.GRPCAddr())

	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("POST /push-delay", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("d"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		srv.SetPushDelay(d)
	})
	mux.HandleFunc("POST /drop-connections", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, srv.DropConnections())
	})
	mux.HandleFunc("POST /inject", func(w http.ResponseWriter, r *http.Request) {
		var inst model.Instance
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&inst); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		q := r.URL.Query()
		srv.Inject(q.Get("namespace"), q.Get("group"), q.Get("service"), inst)
	})
	ctl, err := net.Listen("tcp", ":"+strconv.Itoa(*control))
	if err != nil {
		log.Fatal(err)
	}
	go func() { log.Fatal(http.Serve(ctl, mux)) }()
	log.Printf("nacos-test-server: serving on :%d and :%d (gRPC), control API on :%d", *port, *port+1000, *control)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	tb.cleanup()
}

// forward accepts connections on addr and relays each to target, closing
// both sides when either ends (a connection the server drops is dropped for
// the client too).
func forward(addr, target string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				log.Fatal(err)
			}
			go relay(c, target)
		}
	}()
}

func relay(c net.Conn, target string) {
	defer c.Close()
	u, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		log.Printf("relay to %s: %v", target, err)
		return
	}
	defer u.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
	<-done // either side ended: close both (deferred)
}
