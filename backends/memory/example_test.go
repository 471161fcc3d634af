package memory_test

import (
	"context"
	"fmt"
	"time"

	"github.com/rollcall-go/rollcall/backends/memory"
	"github.com/rollcall-go/rollcall/registry"
)

// Two Registries opened on the same mem:// name share one in-process
// server, as two processes share a real registry: what one registers, the
// other sees.
func Example() {
	ctx := context.Background()
	server, err := registry.Open(ctx, "mem://example?ttl=5s")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer server.Close()
	client, err := registry.Open(ctx, "mem://example")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer client.Close()

	w, err := client.Watch(ctx, "greeter")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer w.Close()
	u, _ := w.Next(ctx)
	fmt.Println("first update:", len(u.Instances()), "instances, synced:", u.Synced)

	if _, err := server.Register(ctx, registry.Instance{Service: "greeter", ID: "g1", Addr: "127.0.0.1:8080"}); err != nil {
		fmt.Println(err)
		return
	}
	u, _ = w.Next(ctx)
	fmt.Println("added:", u.Added[0].ID, u.Added[0].Addr)
	// Output:
	// first update: 0 instances, synced: true
	// added: g1 127.0.0.1:8080
}

// New over a Server of one's own, with its fault controls: a paused server
// keeps the watcher's last list, marked stale.
func ExampleNew() {
	srv := memory.NewServer()
	writer := memory.New(srv, &memory.Options{TTL: 5 * time.Second})
	defer writer.Close()
	reader := memory.New(srv, nil)
	defer reader.Close()

	ctx := context.Background()
	if _, err := writer.Register(ctx, registry.Instance{Service: "greeter", Addr: "127.0.0.1:8080"}); err != nil {
		fmt.Println(err)
		return
	}
	w, err := reader.Watch(ctx, "greeter")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer w.Close()
	u, _ := w.Next(ctx)
	fmt.Println("fresh:", len(u.Instances()), "stale:", u.Stale)

	srv.Pause()
	defer srv.Resume()
	for !u.Stale {
		if u, err = w.Next(ctx); err != nil {
			fmt.Println(err)
			return
		}
	}
	fmt.Println("paused:", len(u.Instances()), "stale:", u.Stale)
	// Output:
	// fresh: 1 stale: false
	// paused: 1 stale: true
}
