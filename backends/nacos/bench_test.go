package nacos_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nacos-group/nacos-sdk-go/v2/model"
	"github.com/nacos-group/nacos-sdk-go/v2/vo"

	"github.com/rollcall-go/rollcall/backends/nacos"
	"github.com/rollcall-go/rollcall/internal/testserver/nacosserver"
	"github.com/rollcall-go/rollcall/internal/testutil"
	"github.com/rollcall-go/rollcall/registry"
)

// benchPresent is how many instances the benchmarked service holds besides
// the one registered and deregistered by each iteration.
const benchPresent = 100

// BenchmarkPropagation measures, against one in-process server with no push
// delay and benchPresent instances present, how long a registration takes to
// reach a watcher on another client: through rollcall (Register, then the
// Watcher's update that adds it) and through the raw SDK (RegisterInstance,
// then the Subscribe callback whose list holds it). Each iteration then
// deregisters the instance and waits for the watcher to drop it. A third
// contender registers with the raw SDK and watches with rollcall, to isolate
// the watch path. p50-ms and
// p99-ms are the percentiles of the propagation time alone (rollcall's
// Register runs meanwhile: it returns once the registrar's own subscription
// shows the instance, which the server pushes at about the same time).
func BenchmarkPropagation(b *testing.B) {
	srv := nacosserver.Start(b)
	srv.SetPushDelay(0)
	for _, svc := range []string{"bench-rollcall", "bench-mixed", "bench-sdk", "bench-sdk-self"} {
		for i := range benchPresent {
			srv.Inject("", "", svc, model.Instance{Ip: "10.1.0.1", Port: uint64(1000 + i), Weight: 1, Enable: true, Healthy: true,
				Ephemeral: true, Metadata: map[string]string{nacos.MetaID: fmt.Sprintf("p%03d", i), "zone": "z1"}})
		}
	}
	client := func(b *testing.B) *nacos.Client {
		cli, err := nacos.NewClient(nacos.ClientOptions{Servers: []string{srv.Addr()}, CacheDir: testutil.TempDir(b)})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(cli.CloseClient)
		return cli
	}
	report := func(b *testing.B, ds []time.Duration) {
		slices.Sort(ds)
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		b.ReportMetric(ms(ds[len(ds)/2]), "p50-ms")
		b.ReportMetric(ms(ds[len(ds)*99/100]), "p99-ms")
	}
	addr := func(i int) string { return fmt.Sprintf("127.0.0.1:%d", 20000+i%40000) }

	b.Run("rollcall", func(b *testing.B) {
		ctx := context.Background()
		const svc = "bench-rollcall"
		r1, err := nacos.New(client(b), nil)
		if err != nil {
			b.Fatal(err)
		}
		defer r1.Close()
		r2, err := nacos.New(client(b), nil)
		if err != nil {
			b.Fatal(err)
		}
		defer r2.Close()
		w, err := r2.Watch(ctx, svc)
		if err != nil {
			b.Fatal(err)
		}
		defer w.Close()
		if u, err := w.Next(ctx); err != nil || len(u.Instances()) != benchPresent {
			b.Fatalf("first update: %v instances, %v", len(u.Instances()), err)
		}
		// wait reads updates until the instance id is present (or absent).
		wait := func(id string, present bool) {
			for {
				u, err := w.Next(ctx)
				if err != nil {
					b.Fatal(err)
				}
				for _, in := range u.Added {
					if in.ID == id && present {
						return
					}
				}
				for _, in := range u.Removed {
					if in.ID == id && !present {
						return
					}
				}
			}
		}
		ds := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for i := range b.N {
			id := fmt.Sprintf("n%06d", i)
			start := time.Now()
			regc := make(chan *registry.Registration, 1)
			go func() {
				reg, err := r1.Register(ctx, registry.Instance{Service: svc, ID: id, Addr: addr(i), Metadata: map[string]string{"zone": "z1"}})
				if err != nil {
					b.Error(err)
				}
				regc <- reg
			}()
			wait(id, true)
			ds = append(ds, time.Since(start))
			reg := <-regc
			if reg == nil {
				b.FailNow()
			}
			if err := reg.Deregister(ctx); err != nil {
				b.Fatal(err)
			}
			wait(id, false)
		}
		b.StopTimer()
		report(b, ds)
	})

	// raw SDK registrations, watched by rollcall: the watch path alone.
	b.Run("sdk-register-rollcall-watch", func(b *testing.B) {
		ctx := context.Background()
		const svc = "bench-mixed"
		reg := client(b)
		r2, err := nacos.New(client(b), nil)
		if err != nil {
			b.Fatal(err)
		}
		defer r2.Close()
		w, err := r2.Watch(ctx, svc)
		if err != nil {
			b.Fatal(err)
		}
		defer w.Close()
		if u, err := w.Next(ctx); err != nil || len(u.Instances()) != benchPresent {
			b.Fatalf("first update: %v instances, %v", len(u.Instances()), err)
		}
		wait := func(id string, present bool) {
			for {
				u, err := w.Next(ctx)
				if err != nil {
					b.Fatal(err)
				}
				for _, in := range u.Added {
					if in.ID == id && present {
						return
					}
				}
				for _, in := range u.Removed {
					if in.ID == id && !present {
						return
					}
				}
			}
		}
		ds := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for i := range b.N {
			id := fmt.Sprintf("n%06d", i)
			port := uint64(20000 + i%40000)
			start := time.Now()
			ok, err := reg.RegisterInstance(vo.RegisterInstanceParam{Ip: "127.0.0.1", Port: port, Weight: 1, Enable: true, Healthy: true,
				Ephemeral: true, ServiceName: svc, Metadata: map[string]string{nacos.MetaID: id, "zone": "z1"}})
			if err != nil || !ok {
				b.Fatal(ok, err)
			}
			wait(id, true)
			ds = append(ds, time.Since(start))
			if ok, err := reg.DeregisterInstance(vo.DeregisterInstanceParam{Ip: "127.0.0.1", Port: port, ServiceName: svc, Ephemeral: true}); err != nil || !ok {
				b.Fatal(ok, err)
			}
			wait(id, false)
		}
		b.StopTimer()
		report(b, ds)
	})

	// The raw SDK, with (selfSub) or without the registrar also subscribed to
	// the service, as rollcall's registrar is (to know when its instance is
	// visible and to notice it vanish).
	rawSDK := func(svc string, selfSub bool) func(b *testing.B) {
		return func(b *testing.B) {
			reg, watch := client(b), client(b)
			if selfSub {
				self := &vo.SubscribeParam{ServiceName: svc, SubscribeCallback: func([]model.Instance, error) {}}
				if err := reg.Subscribe(self); err != nil {
					b.Fatal(err)
				}
				defer func() { _ = reg.Unsubscribe(self) }()
			}
			lists := make(chan []model.Instance, 64)
			param := &vo.SubscribeParam{ServiceName: svc, SubscribeCallback: func(hosts []model.Instance, err error) {
				if err == nil {
					lists <- slices.Clone(hosts) // copy: the slice is the SDK's cache
				}
			}}
			if err := watch.Subscribe(param); err != nil {
				b.Fatal(err)
			}
			defer func() { _ = watch.Unsubscribe(param) }()
			wait := func(port uint64, present bool) {
				for hosts := range lists {
					if slices.ContainsFunc(hosts, func(h model.Instance) bool { return h.Port == port && h.Ip == "127.0.0.1" }) == present {
						return
					}
				}
			}
			ds := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				port := uint64(20000 + i%40000)
				start := time.Now()
				ok, err := reg.RegisterInstance(vo.RegisterInstanceParam{Ip: "127.0.0.1", Port: port, Weight: 1, Enable: true, Healthy: true,
					Ephemeral: true, ServiceName: svc, Metadata: map[string]string{nacos.MetaID: fmt.Sprintf("n%06d", i), "zone": "z1"}})
				if err != nil || !ok {
					b.Fatal(ok, err)
				}
				wait(port, true)
				ds = append(ds, time.Since(start))
				if ok, err := reg.DeregisterInstance(vo.DeregisterInstanceParam{Ip: "127.0.0.1", Port: port, ServiceName: svc, Ephemeral: true}); err != nil || !ok {
					b.Fatal(ok, err)
				}
				wait(port, false)
			}
			b.StopTimer()
			report(b, ds)
		}
	}
	b.Run("sdk", rawSDK("bench-sdk", false))
	b.Run("sdk-registrar-subscribed", rawSDK("bench-sdk-self", true))
}
