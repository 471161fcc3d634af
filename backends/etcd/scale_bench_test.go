package etcd_test

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// Scale benchmarks (issue 13): what a process costs, and what it costs the
// server, as watchers, registrars and instances grow. Each runs rollcall and
// raw clientv3 doing the same work against the same etcd in the same run:
//
//	go test -run '^$' -bench 'Fanout|Fleet|LargeService|ManyServices' -benchtime 3x -timeout 30m ./backends/etcd/
//
// Figures are in docs/BENCHMARKS.md.

// rawValue is an instance's value as rollcall writes it.
func rawValue(addr string, round int) string {
	v, _ := json.Marshal(map[string]any{"Addr": addr, "Metadata": map[string]string{"round": fmt.Sprint(round)}})
	return string(v)
}

// putInstances writes n instances of svc (IDs i00000...) in transactions of
// 128 puts on lease.
func putInstances(b testing.TB, cli *clientv3.Client, svc string, n, round int, lease clientv3.LeaseID) {
	b.Helper()
	ctx := context.Background()
	for lo := 0; lo < n; lo += 128 {
		var ops []clientv3.Op
		for j := lo; j < min(n, lo+128); j++ {
			ops = append(ops, clientv3.OpPut(fmt.Sprintf("%s%s/i%05d", etcd.DefaultPrefix, svc, j), rawValue(fmt.Sprintf("127.0.0.1:%d", 1+j%60000), round), clientv3.WithLease(lease)))
		}
		if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			b.Fatal(err)
		}
	}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkFanout: C consumers of one service in one process (C gRPC
// ClientConns), a raw writer making E changes; the process CPU until every
// consumer has seen the last one, per change, and the etcd server watchers
// and events sent for them. rollcall's C Watchers share one etcd watch; the
// raw column opens one clientv3 watch per consumer (what each ClientConn
// doing its own watch costs).
func BenchmarkFanout(b *testing.B) {
	srv := testserver.StartEtcd(b)
	writer := newClient(b, srv.Endpoint())
	defer writer.Close()
	const changes = 500
	round := 0 // every change writes a new value, across runs
	for _, consumers := range []int{1, 100} {
		for _, who := range []string{"rollcall", "raw"} {
			b.Run(fmt.Sprintf("%s/consumers=%d", who, consumers), func(b *testing.B) {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				svc := fmt.Sprintf("fan-%s-%d", who, consumers)
				dir := etcd.DefaultPrefix + svc + "/"
				lease, err := writer.Grant(ctx, 120)
				if err != nil {
					b.Fatal(err)
				}
				defer writer.Revoke(context.Background(), lease.ID)
				putInstances(b, writer, svc, 10, 0, lease.ID)
				watchers0 := serverWatchers(b, srv.Endpoint())

				// seen[c] receives the round of the marker consumer c saw.
				seen := make([]chan int, consumers)
				for c := range seen {
					seen[c] = make(chan int, 1)
				}
				var heapPer float64
				var wg sync.WaitGroup
				defer wg.Wait()
				defer cancel()
				switch who {
				case "rollcall":
					r := benchRegistry(b, srv.Endpoint(), 30*time.Second)
					var h0 uint64
					for c := range consumers {
						if c == 1 {
							h0 = heapInUse()
						}
						w, err := r.Watch(ctx, svc)
						if err != nil {
							b.Fatal(err)
						}
						if _, err := w.Next(ctx); err != nil {
							b.Fatal(err)
						}
						wg.Add(1)
						go func() {
							defer wg.Done()
							defer w.Close()
							for {
								u, err := w.Next(ctx)
								if err != nil {
									return
								}
								for _, in := range u.Changed {
									if in.ID == "i00000" {
										var round int
										fmt.Sscan(in.Metadata["round"], &round)
										select {
										case seen[c] <- round:
										default:
											<-seen[c]
											seen[c] <- round
										}
									}
								}
							}
						}()
					}
					if consumers > 1 {
						heapPer = (float64(heapInUse()) - float64(h0)) / float64(consumers-1)
					}
				case "raw":
					cli := newClient(b, srv.Endpoint())
					defer cli.Close()
					for c := range consumers {
						resp, err := cli.Get(ctx, dir, clientv3.WithPrefix())
						if err != nil {
							b.Fatal(err)
						}
						known := map[string]string{}
						for _, kv := range resp.Kvs {
							known[string(kv.Key)] = string(kv.Value)
						}
						wch := cli.Watch(ctx, dir, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
						wg.Add(1)
						go func() {
							defer wg.Done()
							for resp := range wch {
								for _, ev := range resp.Events {
									var v struct {
										Addr     string
										Metadata map[string]string
									}
									if json.Unmarshal(ev.Kv.Value, &v) != nil {
										continue
									}
									known[string(ev.Kv.Key)] = v.Addr
									if string(ev.Kv.Key) == dir+"i00000" {
										var round int
										fmt.Sscan(v.Metadata["round"], &round)
										select {
										case seen[c] <- round:
										default:
											<-seen[c]
											seen[c] <- round
										}
									}
								}
							}
						}()
					}
				}
				watchers := serverWatchers(b, srv.Endpoint()) - watchers0
				events0 := serverMetric(b, srv.Endpoint(), "etcd_debugging_mvcc_events_total")
				var cpu time.Duration
				b.ResetTimer()
				for range b.N {
					c0 := cpuTime()
					// changes-1 changes to the other instances, then the
					// marker: a change of i00000 to this round.
					for j := range changes - 1 {
						key := fmt.Sprintf("%si%05d", dir, 1+j%9)
						round++
						if _, err := writer.Put(ctx, key, rawValue("127.0.0.1:9", round), clientv3.WithLease(lease.ID)); err != nil {
							b.Fatal(err)
						}
					}
					round++
					if _, err := writer.Put(ctx, dir+"i00000", rawValue("127.0.0.1:1", round), clientv3.WithLease(lease.ID)); err != nil {
						b.Fatal(err)
					}
					for c := range consumers {
						for r := <-seen[c]; r != round; r = <-seen[c] {
						}
					}
					cpu += cpuTime() - c0
				}
				b.StopTimer()
				events := serverMetric(b, srv.Endpoint(), "etcd_debugging_mvcc_events_total") - events0
				b.ReportMetric(float64(cpu.Microseconds())/float64(b.N*changes), "cpu-us/change")
				b.ReportMetric(float64(watchers), "server-watchers")
				b.ReportMetric(events/float64(b.N*changes), "server-events/change")
				if consumers > 1 && who == "rollcall" {
					b.ReportMetric(heapPer, "heap-B/extra-watcher")
				}
			})
		}
	}
}

// BenchmarkFleet: 50 registrar processes (each its own client and
// Registry), one instance each, spread over 20 services; each iteration is
// one second with one change per service (an Update by one of its
// registrars). Reported: the events etcd sends per registrar per second
// (rollcall's registrar watches the directories of the services it
// registers in, to see its keys deleted or taken over), next to the events
// the whole fleet makes per second (what a registrar watching the whole
// prefix would receive); the server's watchers and leases. The raw
// registrar (a lease, a put, keepalives, as go-zero's Publisher) watches
// nothing and so cannot notice its key deleted.
func BenchmarkFleet(b *testing.B) {
	const registrars, services = 50, 20
	for _, who := range []string{"rollcall", "raw"} {
		b.Run(who, func(b *testing.B) {
			srv := testserver.StartEtcd(b)
			ctx := context.Background()
			admin := newClient(b, srv.Endpoint())
			defer admin.Close()
			update := make([]func(round int) error, registrars)
			for i := range registrars {
				svc := fmt.Sprintf("fleet-%02d", i%services)
				id := fmt.Sprintf("r%02d", i)
				addr := fmt.Sprintf("127.0.0.1:%d", 10000+i)
				switch who {
				case "rollcall":
					r := benchRegistry(b, srv.Endpoint(), 10*time.Second)
					reg, err := r.Register(ctx, registry.Instance{Service: svc, ID: id, Addr: addr, Metadata: map[string]string{"round": "0"}})
					if err != nil {
						b.Fatal(err)
					}
					update[i] = func(round int) error {
						return reg.Update(ctx, registry.Instance{Service: svc, ID: id, Addr: addr, Metadata: map[string]string{"round": fmt.Sprint(round)}})
					}
				case "raw":
					cli := newClient(b, srv.Endpoint())
					b.Cleanup(func() { cli.Close() })
					lease, err := cli.Grant(ctx, 10)
					if err != nil {
						b.Fatal(err)
					}
					kctx, cancel := context.WithCancel(ctx)
					b.Cleanup(cancel)
					ka, err := cli.KeepAlive(kctx, lease.ID)
					if err != nil {
						b.Fatal(err)
					}
					go func() {
						for range ka {
						}
					}()
					key := etcd.DefaultPrefix + svc + "/" + id
					update[i] = func(round int) error {
						_, err := cli.Put(ctx, key, rawValue(addr, round), clientv3.WithLease(lease.ID))
						return err
					}
					if err := update[i](0); err != nil {
						b.Fatal(err)
					}
				}
			}
			// The whole fleet's events, as one prefix watch sees them.
			wctx, cancel := context.WithCancel(ctx)
			defer cancel()
			prefixEvents := 0
			var mu sync.Mutex
			done := make(chan struct{})
			wch := admin.Watch(wctx, etcd.DefaultPrefix, clientv3.WithPrefix(), clientv3.WithCreatedNotify())
			<-wch
			go func() {
				defer close(done)
				for resp := range wch {
					mu.Lock()
					prefixEvents += len(resp.Events)
					mu.Unlock()
				}
			}()
			events0 := serverMetric(b, srv.Endpoint(), "etcd_debugging_mvcc_events_total")
			tick := time.NewTicker(time.Second) // the workload's rate: one change per service per second
			defer tick.Stop()
			start := time.Now()
			b.ResetTimer()
			for i := range b.N {
				for s := range services {
					// The registrars of service s are s, s+20, s+40.
					n := (registrars - s + services - 1) / services
					if err := update[s+services*(i%n)](i + 1); err != nil {
						b.Fatal(err)
					}
				}
				<-tick.C
			}
			b.StopTimer()
			secs := time.Since(start).Seconds()
			cancel()
			<-done
			events := serverMetric(b, srv.Endpoint(), "etcd_debugging_mvcc_events_total") - events0 - float64(prefixEvents)
			leases, err := admin.Leases(ctx)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(events/registrars/secs, "events/registrar/s")
			b.ReportMetric(float64(prefixEvents)/secs, "fleet-events/s")
			b.ReportMetric(float64(serverWatchers(b, srv.Endpoint())), "server-watchers")
			b.ReportMetric(float64(len(leases.Leases)), "server-leases")
		})
	}
}

// BenchmarkLargeService: one service of N instances. Reported once per N:
// the time from Watch to the first list and the heap held per instance by
// a Registry watching it (the raw column: a Get decoded into a map, then a
// watch); per iteration, one change of one instance until the watcher has
// it: wall time and process CPU, which must not grow with N.
func BenchmarkLargeService(b *testing.B) {
	srv := testserver.StartEtcd(b)
	writer := newClient(b, srv.Endpoint())
	defer writer.Close()
	round := 0 // every change writes a new value, across runs
	for _, n := range []int{1000, 10000} {
		svc := fmt.Sprintf("large-%d", n)
		dir := etcd.DefaultPrefix + svc + "/"
		lease, err := writer.Grant(context.Background(), 600)
		if err != nil {
			b.Fatal(err)
		}
		putInstances(b, writer, svc, n, 0, lease.ID)
		for _, who := range []string{"rollcall", "raw"} {
			b.Run(fmt.Sprintf("%s/N=%d", who, n), func(b *testing.B) {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				var next func() (string, error) // the ID of the next change seen
				var keep any
				h0 := heapInUse()
				t0 := time.Now()
				switch who {
				case "rollcall":
					r := benchRegistry(b, srv.Endpoint(), 30*time.Second)
					w, err := r.Watch(ctx, svc)
					if err != nil {
						b.Fatal(err)
					}
					defer w.Close()
					u, err := w.Next(ctx)
					if err != nil || len(u.Instances()) != n {
						b.Fatalf("first list: %d instances, %v", len(u.Instances()), err)
					}
					keep = w
					next = func() (string, error) {
						u, err := w.Next(ctx)
						if err != nil || len(u.Changed) == 0 {
							return "", err
						}
						return u.Changed[0].ID, nil
					}
				case "raw":
					cli := newClient(b, srv.Endpoint())
					defer cli.Close()
					resp, err := cli.Get(ctx, dir, clientv3.WithPrefix())
					if err != nil {
						b.Fatal(err)
					}
					type inst struct {
						Addr     string
						Metadata map[string]string
					}
					known := make(map[string]inst, len(resp.Kvs))
					for _, kv := range resp.Kvs {
						var v inst
						if json.Unmarshal(kv.Value, &v) == nil {
							known[string(kv.Key[len(dir):])] = v
						}
					}
					wch := cli.Watch(ctx, dir, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
					keep = known
					var pending []string
					next = func() (string, error) {
						for len(pending) == 0 {
							resp, ok := <-wch
							if !ok {
								return "", fmt.Errorf("watch ended")
							}
							for _, ev := range resp.Events {
								var v inst
								if json.Unmarshal(ev.Kv.Value, &v) == nil {
									id := string(ev.Kv.Key[len(dir):])
									known[id] = v
									pending = append(pending, id)
								}
							}
						}
						id := pending[0]
						pending = pending[1:]
						return id, nil
					}
				}
				first := time.Since(t0)
				heap := (float64(heapInUse()) - float64(h0)) / float64(n)
				var cpu time.Duration
				b.ResetTimer()
				for i := range b.N {
					id := fmt.Sprintf("i%05d", (i*7919)%n)
					round++
					c0 := cpuTime()
					if _, err := writer.Put(ctx, dir+id, rawValue("127.0.0.2:1", round), clientv3.WithLease(lease.ID)); err != nil {
						b.Fatal(err)
					}
					for got := ""; got != id; {
						if got, err = next(); err != nil {
							b.Fatal(err)
						}
					}
					cpu += cpuTime() - c0
				}
				b.StopTimer()
				runtime.KeepAlive(keep)
				b.ReportMetric(float64(first.Microseconds())/1000, "first-list-ms")
				b.ReportMetric(heap, "heap-B/instance")
				b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-us/change")
			})
		}
	}
}

// BenchmarkManyServices: one process watching S services of 10 instances
// each (a gateway). Reported: the time until every service's first list,
// the heap per watched service, the server's watchers, and per iteration
// one idle second: the process CPU it costs (etcd's watch progress
// requests, which rollcall sends on each idle watch every
// ProgressInterval, 2s by default). The raw column: one Get and one
// clientv3 watch per service, all on one gRPC stream, no progress requests
// (and so no stall detection).
func BenchmarkManyServices(b *testing.B) {
	const services, per = 1000, 10
	srv := testserver.StartEtcd(b)
	writer := newClient(b, srv.Endpoint())
	defer writer.Close()
	lease, err := writer.Grant(context.Background(), 600)
	if err != nil {
		b.Fatal(err)
	}
	for s := range services {
		putInstances(b, writer, fmt.Sprintf("many-%04d", s), per, 0, lease.ID)
	}
	for _, who := range []string{"rollcall", "raw"} {
		b.Run(who, func(b *testing.B) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			watchers0 := serverWatchers(b, srv.Endpoint())
			h0 := heapInUse()
			t0 := time.Now()
			var keep []any
			switch who {
			case "rollcall":
				r := benchRegistry(b, srv.Endpoint(), 30*time.Second)
				err := parallel(services, 64, func(s int) error {
					w, err := r.Watch(ctx, fmt.Sprintf("many-%04d", s))
					if err != nil {
						return err
					}
					u, err := w.Next(ctx)
					if err == nil && len(u.Instances()) != per {
						err = fmt.Errorf("many-%04d: %d instances", s, len(u.Instances()))
					}
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
				keep = append(keep, r)
			case "raw":
				cli := newClient(b, srv.Endpoint())
				defer cli.Close()
				var mu sync.Mutex
				err := parallel(services, 64, func(s int) error {
					dir := fmt.Sprintf("%smany-%04d/", etcd.DefaultPrefix, s)
					resp, err := cli.Get(ctx, dir, clientv3.WithPrefix())
					if err != nil {
						return err
					}
					known := map[string]string{}
					for _, kv := range resp.Kvs {
						known[string(kv.Key)] = string(kv.Value)
					}
					wch := cli.Watch(ctx, dir, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
					go func() {
						for range wch {
						}
					}()
					mu.Lock()
					keep = append(keep, known)
					mu.Unlock()
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			first := time.Since(t0)
			heap := (float64(heapInUse()) - float64(h0)) / services
			watchers := serverWatchers(b, srv.Endpoint()) - watchers0
			var cpu time.Duration
			b.ResetTimer()
			for range b.N {
				c0 := cpuTime()
				time.Sleep(time.Second) // the idle span being measured
				cpu += cpuTime() - c0
			}
			b.StopTimer()
			runtime.KeepAlive(keep)
			b.ReportMetric(float64(first.Milliseconds()), "all-listed-ms")
			b.ReportMetric(heap, "heap-B/service")
			b.ReportMetric(float64(watchers), "server-watchers")
			b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "idle-cpu-ms/s")
		})
	}
}
