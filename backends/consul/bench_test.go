package consul_test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/rollcall-go/rollcall/backends/consul"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// Benchmarks against a real agent (the persistent single-server agent of the
// tests), each contender next to a raw consul/api loop doing the same work in
// the same run:
//
//	go test -run '^$' -bench . -benchtime 200x ./backends/consul/

// sightings records when each contender first saw an instance ID appear and
// disappear.
type sightings struct {
	mu      sync.Mutex
	added   map[string]time.Time
	removed map[string]time.Time
	changed chan struct{}
}

func newSightings() *sightings {
	return &sightings{added: map[string]time.Time{}, removed: map[string]time.Time{}, changed: make(chan struct{}, 1)}
}

// set records the current list of IDs.
func (s *sightings) set(now time.Time, ids map[string]bool, prev map[string]bool) {
	s.mu.Lock()
	for id := range ids {
		if !prev[id] {
			s.added[id] = now
		}
	}
	for id := range prev {
		if !ids[id] {
			s.removed[id] = now
		}
	}
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *sightings) when(id string, added bool) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.removed
	if added {
		m = s.added
	}
	at, ok := m[id]
	return at, ok
}

// await waits until every s saw id added (or removed).
func await(b *testing.B, id string, added bool, all ...*sightings) []time.Time {
	deadline := time.Now().Add(30 * time.Second)
	out := make([]time.Time, len(all))
	for i, s := range all {
		for {
			if at, ok := s.when(id, added); ok {
				out[i] = at
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("contender %d did not see %s (added=%v) within 30s", i, id, added)
			}
			select {
			case <-s.changed:
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return out
}

// rawWatch is the raw consul/api contender: a blocking health query loop,
// passing only, with the same wait time and the same index rules.
func rawWatch(ctx context.Context, cli *api.Client, service string, wait time.Duration, s *sightings, count *int64, mu *sync.Mutex) {
	var index uint64
	prev := map[string]bool{}
	for ctx.Err() == nil {
		qctx, cancel := context.WithTimeout(ctx, wait+wait/16+time.Second)
		entries, meta, err := cli.Health().Service(service, "", true, (&api.QueryOptions{WaitIndex: index, WaitTime: wait}).WithContext(qctx))
		cancel()
		if count != nil {
			mu.Lock()
			*count++
			mu.Unlock()
		}
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		now := time.Now()
		ids := make(map[string]bool, len(entries))
		for _, e := range entries {
			ids[e.Service.ID] = true
		}
		s.set(now, ids, prev)
		prev = ids
		if meta.LastIndex < index {
			index = 0
		} else {
			index = max(meta.LastIndex, 1)
		}
	}
}

func percentile(d []time.Duration, p float64) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	i := min(len(s)-1, int(p*float64(len(s))))
	return float64(s[i]) / float64(time.Millisecond)
}

// BenchmarkPropagation measures register→watcher latency with 100 instances
// present: each iteration registers one instance (agent API, no check),
// waits until the rollcall watcher and the raw loop both show it, then
// deregisters it and waits until both dropped it. Latency runs from the
// start of the registration request to the moment each contender has the
// new list.
//
// Two agents: "dev" (-dev, state in memory) shows the watch path itself;
// "server" (a server agent with a data directory) adds the fsync of each
// Raft write, which dominates on this machine's disk.
func BenchmarkPropagation(b *testing.B) {
	b.Run("agent=dev", func(b *testing.B) {
		benchPropagation(b, testserver.StartConsulServerWith(b, testserver.ConsulServerOptions{Dev: true}).Addr())
	})
	b.Run("agent=server", func(b *testing.B) { benchPropagation(b, testserver.StartConsulServer(b).Addr()) })
}

func benchPropagation(b *testing.B, addr string) {
	regTr := newCutTransport()
	regCli := newClient(b, addr, regTr)
	const svc = "bench"
	for i := range 100 {
		reg := &api.AgentServiceRegistration{ID: fmt.Sprintf("%s~p%03d", svc, i), Name: svc, Address: "127.0.0.1", Port: 20000 + i}
		if err := regCli.Agent().ServiceRegister(reg); err != nil {
			b.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	// rollcall contender.
	r := consul.New(newClient(b, addr, newCutTransport()), &consul.Options{Logger: testLogger()})
	defer r.Close()
	rs := newSightings()
	w, err := r.Watch(ctx, svc)
	if err != nil {
		b.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		prev := map[string]bool{}
		for {
			u, err := w.Next(ctx)
			if err != nil {
				return
			}
			now := time.Now()
			ids := make(map[string]bool, len(prev)+1)
			for _, in := range u.Instances() {
				ids[svc+"~"+in.ID] = true
			}
			rs.set(now, ids, prev)
			prev = ids
		}
	}()
	// raw contender.
	raw := newSightings()
	rawCli := newClient(b, addr, newCutTransport())
	wg.Add(1)
	go func() {
		defer wg.Done()
		rawWatch(ctx, rawCli, svc, consul.DefaultWaitTime, raw, nil, nil)
	}()
	await(b, svc+"~p099", true, rs, raw)

	var lr, lraw, lreg []time.Duration
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("%s~n%06d", svc, i)
		start := time.Now()
		reg := &api.AgentServiceRegistration{ID: id, Name: svc, Address: "127.0.0.1", Port: 30000 + i%30000}
		if err := regCli.Agent().ServiceRegister(reg); err != nil {
			b.Fatal(err)
		}
		lreg = append(lreg, time.Since(start))
		at := await(b, id, true, rs, raw)
		lr = append(lr, at[0].Sub(start))
		lraw = append(lraw, at[1].Sub(start))
		if err := regCli.Agent().ServiceDeregister(id); err != nil {
			b.Fatal(err)
		}
		await(b, id, false, rs, raw)
	}
	b.StopTimer()
	b.ReportMetric(percentile(lr, 0.50), "rollcall-p50-ms")
	b.ReportMetric(percentile(lr, 0.99), "rollcall-p99-ms")
	b.ReportMetric(percentile(lraw, 0.50), "raw-p50-ms")
	b.ReportMetric(percentile(lraw, 0.99), "raw-p99-ms")
	b.ReportMetric(percentile(lreg, 0.50), "register-p50-ms")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkIdleRequests counts, with a counting http.RoundTripper, the HTTP
// requests made per minute while nothing changes: by a rollcall watcher
// (default wait 5s), by the raw loop with the same wait, and by a registrar
// holding 100 instances with the default TTL of 10s. It observes one minute
// per iteration: run it with -benchtime 1x.
func BenchmarkIdleRequests(b *testing.B) {
	srv := testserver.StartConsulServer(b)
	const svc = "idle"
	wtr, rtr := newCutTransport(), newCutTransport()
	w := consul.New(newClient(b, srv.Addr(), wtr), &consul.Options{Logger: testLogger()})
	defer w.Close()
	reg := consul.New(newClient(b, srv.Addr(), rtr), &consul.Options{Logger: testLogger()})
	defer reg.Close()
	for i := range 100 {
		in := registry.Instance{Service: svc, ID: fmt.Sprintf("i%03d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 20000+i)}
		if _, err := reg.Register(context.Background(), in); err != nil {
			b.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	watcher, err := w.Watch(ctx, svc)
	if err != nil {
		b.Fatal(err)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if _, err := watcher.Next(ctx); err != nil {
				return
			}
		}
	}()
	var rawCount int64
	var rawMu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		rawWatch(ctx, newClient(b, srv.Addr(), newCutTransport()), svc, consul.DefaultWaitTime, newSightings(), &rawCount, &rawMu)
	}()
	time.Sleep(2 * time.Second) // let both reach their steady state
	const window = time.Minute
	var wr, rr, raws float64
	b.ResetTimer()
	for range b.N {
		w0, r0 := wtr.count.Load(), rtr.count.Load()
		rawMu.Lock()
		raw0 := rawCount
		rawMu.Unlock()
		time.Sleep(window) // the span whose requests are counted
		rawMu.Lock()
		raws += float64(rawCount - raw0)
		rawMu.Unlock()
		wr += float64(wtr.count.Load() - w0)
		rr += float64(rtr.count.Load() - r0)
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(wr/n, "watcher-req/min")
	b.ReportMetric(raws/n, "raw-watch-req/min")
	b.ReportMetric(rr/n, "registrar100-req/min")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkFanoutRequests: 100 consumers of one service in one process
// (100 gRPC ClientConns) while one instance changes every second, over 20s
// per iteration (run it with -benchtime 1x): the HTTP requests and new TCP
// connections to the agent per minute. rollcall's 100 Watchers of one
// Registry share one blocking query; the raw column runs 100 blocking
// query loops on one client (what each ClientConn watching on its own
// costs).
func BenchmarkFanoutRequests(b *testing.B) {
	srv := testserver.StartConsulServer(b)
	const consumers, window = 100, 20 * time.Second
	for _, who := range []string{"rollcall", "raw"} {
		b.Run(who, func(b *testing.B) {
			svc := "fan-" + who
			tr := newCutTransport()
			var dials atomic.Int64
			dial := tr.base.DialContext
			tr.base.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
				dials.Add(1)
				return dial(ctx, network, addr)
			}
			reg := consul.New(newClient(b, srv.Addr(), newCutTransport()), &consul.Options{Logger: testLogger()})
			defer reg.Close()
			var regs []*registry.Registration
			for i := range 10 {
				r, err := reg.Register(context.Background(), registry.Instance{Service: svc, ID: fmt.Sprintf("i%02d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 20000+i)})
				if err != nil {
					b.Fatal(err)
				}
				regs = append(regs, r)
			}
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			defer wg.Wait()
			defer cancel()
			var rawCount int64
			var rawMu sync.Mutex
			switch who {
			case "rollcall":
				r := consul.New(newClient(b, srv.Addr(), tr), &consul.Options{Logger: testLogger()})
				defer r.Close()
				for range consumers {
					w, err := r.Watch(ctx, svc)
					if err != nil {
						b.Fatal(err)
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						defer w.Close()
						for {
							if _, err := w.Next(ctx); err != nil {
								return
							}
						}
					}()
				}
			case "raw":
				cli := newClient(b, srv.Addr(), tr)
				for range consumers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						rawWatch(ctx, cli, svc, consul.DefaultWaitTime, newSightings(), &rawCount, &rawMu)
					}()
				}
			}
			var reqs, conns float64
			round := 0
			b.ResetTimer()
			for range b.N {
				r0, d0 := tr.count.Load(), dials.Load()
				end := time.Now().Add(window)
				for tick := time.NewTicker(time.Second); time.Now().Before(end); <-tick.C { // the workload's rate: one change a second
					round++
					in := registry.Instance{Service: svc, ID: "i00", Addr: "127.0.0.1:20000", Metadata: map[string]string{"round": fmt.Sprint(round)}}
					if err := regs[0].Update(ctx, in); err != nil {
						b.Fatal(err)
					}
				}
				reqs += float64(tr.count.Load() - r0)
				conns += float64(dials.Load() - d0)
			}
			b.StopTimer()
			perMin := float64(time.Minute) / float64(window) / float64(b.N)
			b.ReportMetric(reqs*perMin, "agent-req/min")
			b.ReportMetric(conns*perMin, "new-conns/min")
			b.ReportMetric(0, "ns/op")
		})
	}
}
