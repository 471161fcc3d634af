package etcd_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/rollcall-go/rollcall/backends/etcd"
	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// Benchmarks compare rollcall with raw clientv3 doing the same work against
// the same etcd in the same run. Run them with:
//
//	go test -run '^$' -bench . -benchtime 200x ./backends/etcd/
//
// (the burst benchmarks do one burst per iteration; -benchtime 200x gives
// the propagation benchmark 200 samples and the bursts 200 bursts, so use
// -bench 'Propagation' -benchtime 200x and -bench 'Burst' -benchtime 3x).

func percentile(d []time.Duration, p float64) float64 {
	slices.Sort(d)
	if len(d) == 0 {
		return 0
	}
	i := int(float64(len(d)-1) * p)
	return float64(d[i].Microseconds()) / 1000
}

func benchRegistry(b *testing.B, ep string, ttl time.Duration) registry.Registry {
	cli := newClient(b, ep)
	r, err := etcd.New(cli, &etcd.Options{TTL: ttl})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { r.Close(); cli.Close() })
	return r
}

// BenchmarkPropagation: with 100 instances present, the time from calling
// Register until a watcher sees the new instance: rollcall's Watcher next to
// a raw clientv3 Watch on the same prefix, both timing the same event.
func BenchmarkPropagation(b *testing.B) {
	srv := testserver.StartEtcd(b)
	ctx := context.Background()
	writer := benchRegistry(b, srv.Endpoint(), 10*time.Second)
	reader := benchRegistry(b, srv.Endpoint(), 10*time.Second)
	rawCli := newClient(b, srv.Endpoint())
	defer rawCli.Close()
	const svc = "bench.rpc"
	for i := range 100 {
		if _, err := writer.Register(ctx, registry.Instance{Service: svc, ID: fmt.Sprintf("base-%03d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 20000+i)}); err != nil {
			b.Fatal(err)
		}
	}
	w, err := reader.Watch(ctx, svc)
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	if _, err := w.Next(ctx); err != nil {
		b.Fatal(err)
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	rawCh := rawCli.Watch(wctx, etcd.DefaultPrefix+svc+"/", clientv3.WithPrefix())

	var ours, raw []time.Duration
	b.ResetTimer()
	for i := range b.N {
		id := fmt.Sprintf("new-%06d", i)
		var wg sync.WaitGroup
		var start time.Time
		startc := make(chan struct{})
		wg.Add(2)
		go func() { // rollcall watcher
			defer wg.Done()
			for {
				u, err := w.Next(ctx)
				if err != nil {
					b.Error(err)
					return
				}
				if len(u.Added) > 0 && u.Added[0].ID == id {
					<-startc
					ours = append(ours, time.Since(start))
					return
				}
			}
		}()
		go func() { // raw clientv3 watch: decode the value as a client would
			defer wg.Done()
			for resp := range rawCh {
				for _, ev := range resp.Events {
					var v struct{ Addr string }
					if ev.Type == clientv3.EventTypePut && json.Unmarshal(ev.Kv.Value, &v) == nil &&
						string(ev.Kv.Key) == etcd.DefaultPrefix+svc+"/"+id {
						<-startc
						raw = append(raw, time.Since(start))
						return
					}
				}
			}
		}()
		start = time.Now()
		close(startc)
		reg, err := writer.Register(ctx, registry.Instance{Service: svc, ID: id, Addr: "127.0.0.1:30000"})
		if err != nil {
			b.Fatal(err)
		}
		wg.Wait()
		b.StopTimer()
		if err := reg.Deregister(ctx); err != nil {
			b.Fatal(err)
		}
		if _, err := w.Next(ctx); err != nil { // the removal
			b.Fatal(err)
		}
		for resp := range rawCh { // and its raw counterpart
			if len(resp.Events) > 0 {
				break
			}
		}
		b.StartTimer()
	}
	b.StopTimer()
	b.ReportMetric(percentile(ours, 0.5), "rollcall-p50-ms")
	b.ReportMetric(percentile(ours, 0.99), "rollcall-p99-ms")
	b.ReportMetric(percentile(raw, 0.5), "raw-p50-ms")
	b.ReportMetric(percentile(raw, 0.99), "raw-p99-ms")
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkBurstRegister: wall time to register N instances from one
// process, 64 at a time: rollcall's Register (one shared lease) next to raw
// clientv3 Puts on one shared lease.
func BenchmarkBurstRegister(b *testing.B) {
	srv := testserver.StartEtcd(b)
	for _, n := range []int{1000, 5000} {
		for _, who := range []string{"rollcall", "raw"} {
			b.Run(fmt.Sprintf("%s/N=%d", who, n), func(b *testing.B) {
				ctx := context.Background()
				var wall time.Duration
				for i := range b.N {
					svc := fmt.Sprintf("burst-%s-%d-%d", who, n, i)
					var put func(j int) error
					var done func()
					switch who {
					case "rollcall":
						r := benchRegistry(b, srv.Endpoint(), 30*time.Second)
						put = func(j int) error {
							_, err := r.Register(ctx, registry.Instance{Service: svc, ID: fmt.Sprintf("i%05d", j), Addr: fmt.Sprintf("127.0.0.1:%d", 1+j)})
							return err
						}
						done = func() { r.Close() }
					case "raw":
						cli := newClient(b, srv.Endpoint())
						lease, err := cli.Grant(ctx, 30)
						if err != nil {
							b.Fatal(err)
						}
						put = func(j int) error {
							v, _ := json.Marshal(map[string]any{"Addr": fmt.Sprintf("127.0.0.1:%d", 1+j)})
							_, err := cli.Put(ctx, fmt.Sprintf("%s%s/i%05d", etcd.DefaultPrefix, svc, j), string(v), clientv3.WithLease(lease.ID))
							return err
						}
						done = func() { cli.Revoke(ctx, lease.ID); cli.Close() }
					}
					start := time.Now()
					if err := parallel(n, 64, put); err != nil {
						b.Fatal(err)
					}
					wall += time.Since(start)
					b.StopTimer()
					done()
					b.StartTimer()
				}
				b.ReportMetric(float64(wall.Milliseconds())/float64(b.N), "ms/burst")
			})
		}
	}
}

func parallel(n, width int, f func(int) error) error {
	sem := make(chan struct{}, width)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for j := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errs <- f(j)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// BenchmarkBurstWatch: a raw writer puts N instances as fast as it can; the
// time until a watcher has all N, and the process CPU spent meanwhile
// (writer included, the same for both): rollcall's Watcher next to a raw
// clientv3 Watch that decodes and indexes the events into a map.
func BenchmarkBurstWatch(b *testing.B) {
	srv := testserver.StartEtcd(b)
	writer := newClient(b, srv.Endpoint())
	defer writer.Close()
	for _, n := range []int{1000, 5000} {
		for _, who := range []string{"rollcall", "raw"} {
			b.Run(fmt.Sprintf("%s/N=%d", who, n), func(b *testing.B) {
				ctx := context.Background()
				var wall, cpu time.Duration
				reader := benchRegistry(b, srv.Endpoint(), 30*time.Second)
				rawCli := newClient(b, srv.Endpoint())
				defer rawCli.Close()
				for i := range b.N {
					svc := fmt.Sprintf("bw-%s-%d-%d", who, n, i)
					dir := etcd.DefaultPrefix + svc + "/"
					ready := make(chan struct{})
					finished := make(chan error, 1)
					wctx, cancel := context.WithCancel(ctx)
					switch who {
					case "rollcall":
						w, err := reader.Watch(wctx, svc)
						if err != nil {
							b.Fatal(err)
						}
						go func() {
							defer w.Close()
							if _, err := w.Next(wctx); err != nil {
								finished <- err
								return
							}
							close(ready)
							have := 0
							for have < n {
								u, err := w.Next(wctx)
								if err != nil {
									finished <- err
									return
								}
								have += len(u.Added)
							}
							finished <- nil
						}()
					case "raw":
						wch := rawCli.Watch(wctx, dir, clientv3.WithPrefix(), clientv3.WithCreatedNotify())
						go func() {
							<-wch // created
							close(ready)
							seen := map[string]string{}
							for resp := range wch {
								for _, ev := range resp.Events {
									var v struct{ Addr string }
									if json.Unmarshal(ev.Kv.Value, &v) == nil {
										seen[string(ev.Kv.Key)] = v.Addr
									}
								}
								if len(seen) >= n {
									finished <- nil
									return
								}
							}
							finished <- fmt.Errorf("watch ended")
						}()
					}
					<-ready
					lease, err := writer.Grant(ctx, 60)
					if err != nil {
						b.Fatal(err)
					}
					c0, t0 := cpuTime(), time.Now()
					if err := parallel(n, 64, func(j int) error {
						v, _ := json.Marshal(map[string]any{"Addr": fmt.Sprintf("127.0.0.1:%d", 1+j)})
						_, err := writer.Put(ctx, fmt.Sprintf("%si%05d", dir, j), string(v), clientv3.WithLease(lease.ID))
						return err
					}); err != nil {
						b.Fatal(err)
					}
					if err := <-finished; err != nil {
						b.Fatal(err)
					}
					wall += time.Since(t0)
					cpu += cpuTime() - c0
					cancel()
					b.StopTimer()
					writer.Revoke(ctx, lease.ID)
					b.StartTimer()
				}
				b.ReportMetric(float64(wall.Milliseconds())/float64(b.N), "ms/burst")
				b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/burst")
				b.ReportMetric(float64(cpu.Microseconds())/float64(b.N*n), "cpu-us/event")
			})
		}
	}
}
