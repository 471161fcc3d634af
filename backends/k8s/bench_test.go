package k8s

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/rollcall-go/rollcall/internal/testserver"
	"github.com/rollcall-go/rollcall/registry"
)

// BenchmarkPropagation measures how long a change takes to reach a watcher,
// with 100 instances present, against one kube-apiserver on 127.0.0.1:
//
//   - Registration: Register → a rollcall Watcher (another client) sees it;
//   - ServiceEndpoint: an endpoint added to a plain Service's EndpointSlice
//     (as the EndpointSlice controller writes it) → a rollcall Watcher sees it;
//   - RawCreate and RawUpdate: the same two changes made and watched with
//     client-go alone (Create of a slice → ADDED event; Update of the
//     100-endpoint slice → MODIFIED event), the floor the backend builds on.
//
// Each reports p50-ms and p99-ms. Run with a fixed count, e.g.
// go test -run '^$' -bench Propagation -benchtime 200x ./backends/k8s/
func BenchmarkPropagation(b *testing.B) {
	env := startKube(b)
	const present = 100
	// Each sub-benchmark runs more than once (b.N = 1 first): each run
	// starts afresh in a namespace of its own.

	b.Run("Registration", func(b *testing.B) {
		ns := env.namespace(b)
		r := env.open(b, testserver.KubeAdmin, ns, 10*time.Second)
		w := watchBench(b, env.open(b, testserver.KubeAdmin, ns, 0), "bench-reg")
		for i := range present {
			if _, err := r.Register(ctxFor(b, 30*time.Second), registry.Instance{Service: "bench-reg", ID: fmt.Sprintf("p%03d", i), Addr: fmt.Sprintf("10.8.0.%d:80", i+1)}); err != nil {
				b.Fatal(err)
			}
		}
		w.waitSize(b, present)
		lat := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for i := range b.N {
			id := fmt.Sprintf("x%06d", i)
			start := time.Now()
			reg, err := r.Register(ctxFor(b, 30*time.Second), registry.Instance{Service: "bench-reg", ID: id, Addr: "10.8.1.1:80"})
			if err != nil {
				b.Fatal(err)
			}
			w.waitAdded(b, id)
			lat = append(lat, time.Since(start))
			if err := reg.Deregister(ctxFor(b, 30*time.Second)); err != nil {
				b.Fatal(err)
			}
			w.waitSize(b, present)
		}
		b.StopTimer()
		reportPercentiles(b, lat)
	})

	b.Run("ServiceEndpoint", func(b *testing.B) {
		ns := env.namespace(b)
		api := env.admin.DiscoveryV1().EndpointSlices(ns)
		base := benchEndpoints(present)
		es, err := api.Create(ctxFor(b, 30*time.Second), controllerSlice("bench-svc-1", "bench-svc", discoveryv1.AddressTypeIPv4, base...), metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		w := watchBench(b, env.open(b, testserver.KubeAdmin, ns, 0), "bench-svc:http")
		w.waitSize(b, present)
		lat := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for i := range b.N {
			ip := fmt.Sprintf("10.9.%d.%d", 1+i/250, 1+i%250)
			upd := controllerSlice(es.Name, "bench-svc", discoveryv1.AddressTypeIPv4, append(slices.Clone(base), endpoint{pod: "new", ip: ip})...)
			upd.ResourceVersion = es.ResourceVersion
			start := time.Now()
			if es, err = api.Update(ctxFor(b, 30*time.Second), upd, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
			w.waitAdded(b, ip+":8080")
			lat = append(lat, time.Since(start))
			back := controllerSlice(es.Name, "bench-svc", discoveryv1.AddressTypeIPv4, base...)
			back.ResourceVersion = es.ResourceVersion
			if es, err = api.Update(ctxFor(b, 30*time.Second), back, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
			w.waitSize(b, present)
		}
		b.StopTimer()
		reportPercentiles(b, lat)
	})

	b.Run("RawCreate", func(b *testing.B) {
		ns := env.namespace(b)
		api := env.clientset(b, testserver.KubeAdmin).DiscoveryV1().EndpointSlices(ns)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		for i := range present {
			s := controllerSlice(fmt.Sprintf("raw-%03d", i), "bench-raw", discoveryv1.AddressTypeIPv4, endpoint{pod: "p", ip: fmt.Sprintf("10.10.0.%d", i+1)})
			if _, err := api.Create(ctx, s, metav1.CreateOptions{}); err != nil {
				b.Fatal(err)
			}
		}
		list, err := api.List(ctx, metav1.ListOptions{LabelSelector: LabelServiceName + "=bench-raw"})
		if err != nil {
			b.Fatal(err)
		}
		wi, err := api.Watch(ctx, metav1.ListOptions{LabelSelector: LabelServiceName + "=bench-raw", ResourceVersion: list.ResourceVersion})
		if err != nil {
			b.Fatal(err)
		}
		defer wi.Stop()
		lat := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for i := range b.N {
			name := fmt.Sprintf("raw-x%06d", i)
			s := controllerSlice(name, "bench-raw", discoveryv1.AddressTypeIPv4, endpoint{pod: "p", ip: "10.10.1.1"})
			start := time.Now()
			if _, err := api.Create(ctx, s, metav1.CreateOptions{}); err != nil {
				b.Fatal(err)
			}
			waitEvent(b, wi, watch.Added, name)
			lat = append(lat, time.Since(start))
			if err := api.Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
				b.Fatal(err)
			}
			waitEvent(b, wi, watch.Deleted, name)
		}
		b.StopTimer()
		reportPercentiles(b, lat)
	})

	b.Run("RawUpdate", func(b *testing.B) {
		ns := env.namespace(b)
		api := env.clientset(b, testserver.KubeAdmin).DiscoveryV1().EndpointSlices(ns)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		base := benchEndpoints(present)
		es, err := api.Create(ctx, controllerSlice("bench-rawsvc-1", "bench-rawsvc", discoveryv1.AddressTypeIPv4, base...), metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		wi, err := api.Watch(ctx, metav1.ListOptions{LabelSelector: LabelServiceName + "=bench-rawsvc", ResourceVersion: es.ResourceVersion})
		if err != nil {
			b.Fatal(err)
		}
		defer wi.Stop()
		lat := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for i := range b.N {
			ip := fmt.Sprintf("10.11.%d.%d", 1+i/250, 1+i%250)
			upd := controllerSlice(es.Name, "bench-rawsvc", discoveryv1.AddressTypeIPv4, append(slices.Clone(base), endpoint{pod: "new", ip: ip})...)
			upd.ResourceVersion = es.ResourceVersion
			start := time.Now()
			if es, err = api.Update(ctx, upd, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
			waitEvent(b, wi, watch.Modified, es.Name)
			lat = append(lat, time.Since(start))
			back := controllerSlice(es.Name, "bench-rawsvc", discoveryv1.AddressTypeIPv4, base...)
			back.ResourceVersion = es.ResourceVersion
			if es, err = api.Update(ctx, back, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
			waitEvent(b, wi, watch.Modified, es.Name)
		}
		b.StopTimer()
		reportPercentiles(b, lat)
	})
}

func benchEndpoints(n int) []endpoint {
	eps := make([]endpoint, n)
	for i := range eps {
		eps[i] = endpoint{pod: fmt.Sprintf("pod-%03d", i), ip: fmt.Sprintf("10.12.%d.%d", i/250, 1+i%250)}
	}
	return eps
}

func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
	b.ReportMetric(ms(lat[min(len(lat)-1, len(lat)*99/100)]), "p99-ms")
}

func waitEvent(b *testing.B, wi watch.Interface, typ watch.EventType, name string) {
	b.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev, ok := <-wi.ResultChan():
			if !ok {
				b.Fatal("raw watch ended")
			}
			if ev.Type == watch.Error {
				b.Fatalf("raw watch error: %v", ev.Object)
			}
			if es, ok := ev.Object.(*discoveryv1.EndpointSlice); ok && ev.Type == typ && es.Name == name {
				return
			}
		case <-timeout:
			b.Fatalf("no %s event for %s", typ, name)
		}
	}
}

// benchWatcher consumes a Watcher on the benchmark's goroutine.
type benchWatcher struct {
	w    *registry.Watcher
	ctx  context.Context
	size int
}

func watchBench(b *testing.B, r registry.Registry, service string) *benchWatcher {
	ctx, cancel := context.WithCancel(context.Background())
	w, err := r.Watch(ctx, service)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cancel(); w.Close() })
	return &benchWatcher{w: w, ctx: ctx}
}

func (bw *benchWatcher) next(b *testing.B) registry.Update {
	ctx, cancel := context.WithTimeout(bw.ctx, 30*time.Second)
	defer cancel()
	u, err := bw.w.Next(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if u.Stale {
		b.Fatalf("watcher stale: %v", u.Err)
	}
	bw.size += len(u.Added) - len(u.Removed)
	return u
}

func (bw *benchWatcher) waitSize(b *testing.B, n int) {
	for bw.size != n {
		bw.next(b)
	}
}

func (bw *benchWatcher) waitAdded(b *testing.B, id string) {
	for {
		u := bw.next(b)
		for _, in := range u.Added {
			if in.ID == id {
				return
			}
		}
	}
}

// BenchmarkIdleRequests counts the HTTP requests a rollcall client sends
// while nothing changes, over 30s (reported per minute): a registrar holding
// 100 instances (TTL 10s), and a process watching one service (health
// checks of /readyz, skipped when watch events arrive). Run with
// -benchtime 1x.
func BenchmarkIdleRequests(b *testing.B) {
	env := startKube(b)
	const span = 30 * time.Second
	count := func(b *testing.B, ns string, ttl time.Duration) (*kubeRegistry, *atomic.Int64) {
		n := new(atomic.Int64)
		cfg := env.config(testserver.KubeAdmin)
		cfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper {
			return roundTripFunc(func(r *http.Request) (*http.Response, error) {
				n.Add(1)
				return rt.RoundTrip(r)
			})
		}
		r, err := NewForConfig(cfg, &Options{Namespace: ns, TTL: ttl, Logger: testLogger()})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { r.Close() })
		return r.(*kubeRegistry), n
	}
	b.Run("Registrar100", func(b *testing.B) {
		ns := env.namespace(b)
		for range b.N {
			r, n := count(b, ns, 10*time.Second)
			for i := range 100 {
				if _, err := r.Register(ctxFor(b, 30*time.Second), registry.Instance{Service: "idle", ID: fmt.Sprintf("i%03d", i), Addr: fmt.Sprintf("10.13.0.%d:80", i+1)}); err != nil {
					b.Fatal(err)
				}
			}
			start := n.Load()
			time.Sleep(span) // the idle span being measured
			b.ReportMetric(float64(n.Load()-start)*float64(time.Minute)/float64(span), "requests/min")
		}
	})
	b.Run("Watcher", func(b *testing.B) {
		ns := env.namespace(b)
		for range b.N {
			r, n := count(b, ns, 0)
			w := watchBench(b, r, "idle")
			w.next(b)
			start := n.Load()
			time.Sleep(span) // the idle span being measured
			b.ReportMetric(float64(n.Load()-start)*float64(time.Minute)/float64(span), "requests/min")
		}
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
